//! The daemon: socket, lock file, signals, accept loop, a thread per connection.

mod broker;
mod conn;
mod label;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::FlockOperation;
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

pub use broker::{Broker, Reply, Session, Then};

/// Most connections served at once; more are closed at accept with a warning.
pub const MAX_CONNECTIONS: usize = 4096;

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another broker is already serving {} (it holds {}); stop it first or use another --socket", socket.display(), lock.display())]
    AlreadyRunning { socket: PathBuf, lock: PathBuf },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: Errno,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn sys(what: &'static str) -> impl FnOnce(Errno) -> ServeError {
    move |source| ServeError::Sys { what, source }
}

/// A bound listening socket, guarded by its lock file; the socket file is removed on drop.
#[derive(Debug)]
pub struct Listener {
    sock: OwnedFd,
    path: PathBuf,
    _lock: File,
}

impl Listener {
    /// Takes `<path>.lock`, replaces a stale socket, binds, and sets mode 0660 (group `gid`
    /// when given) so that the group can connect.
    pub fn bind(path: &Path, gid: Option<u32>) -> Result<Listener, ServeError> {
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(io("cannot create", dir))?;
            // umask 077 applies to mkdir: make the directory searchable so the group can reach the socket.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io("cannot chmod", dir))?;
        }
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open lock file", &lock_path))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(ServeError::AlreadyRunning {
                    socket: path.to_path_buf(),
                    lock: lock_path,
                });
            }
            Err(e) => {
                return Err(ServeError::Io {
                    what: "cannot lock",
                    path: lock_path,
                    source: e.into(),
                });
            }
        }
        // We hold the lock, so any socket file left here is stale.
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(socket = %path.display(), "removed stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove stale socket", path)(e)),
        }
        let addr = SocketAddrUnix::new(path).map_err(|e| io("bad socket path", path)(e.into()))?;
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(sys("socket"))?;
        rustix::net::bind(&sock, &addr).map_err(|e| io("cannot bind", path)(e.into()))?;
        let listener = Listener {
            sock,
            path: path.to_path_buf(),
            _lock: lock,
        };
        if let Some(gid) = gid {
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| io("cannot chgrp", path)(e.into()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io("cannot chmod", path))?;
        rustix::net::listen(&listener.sock, 128).map_err(sys("listen"))?;
        Ok(listener)
    }

    /// Takes over the listening socket and lock file an upgrade handed over.
    pub fn adopt(sock: OwnedFd, lock: OwnedFd, path: &Path) -> Listener {
        Listener {
            sock,
            path: path.to_path_buf(),
            _lock: File::from(lock),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Duplicates of the socket and lock file for a later upgrade hand-over.
    pub fn duplicate(&self) -> std::io::Result<(OwnedFd, OwnedFd)> {
        Ok((
            self.sock.try_clone()?,
            OwnedFd::from(self._lock.try_clone()?),
        ))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `listener` until SIGTERM or SIGINT, then closes every connection and returns.
pub fn run(broker: Arc<Broker>, listener: Listener) -> Result<(), ServeError> {
    let (signal_rx, signal_tx) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )
    .map_err(sys("pipe"))?;
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let tx = signal_tx.try_clone().map_err(|e| ServeError::Sys {
            what: "dup",
            source: Errno::from_io_error(&e).unwrap_or(Errno::IO),
        })?;
        signal_hook::low_level::pipe::register(signal, tx)
            .map_err(io("cannot install signal handler", Path::new("")))?;
    }
    // Readable (never read) once shutdown starts: wakes every connection thread.
    let (shutdown_rx, shutdown_tx) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(sys("pipe"))?;
    let shutdown_rx = Arc::new(shutdown_rx);
    let active = Arc::new(AtomicUsize::new(0));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_conn: u64 = 0;
    tracing::info!(socket = %listener.path().display(), "serving");
    loop {
        let mut fds = [
            PollFd::new(&listener.sock, PollFlags::IN),
            PollFd::new(&signal_rx, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(sys("poll")(e)),
        }
        if !fds[1].revents().is_empty() {
            tracing::info!("signal received, shutting down");
            break;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        let sock = match rustix::net::accept_with(&listener.sock, SocketFlags::CLOEXEC) {
            Ok(sock) => sock,
            Err(Errno::AGAIN | Errno::INTR | Errno::CONNABORTED) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let cred = match rustix::net::sockopt::socket_peercred(&sock) {
            Ok(cred) => cred,
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; connection refused");
                continue;
            }
        };
        // Group permissions and the admin group count supplementary groups too.
        let groups = match crate::sys::peer_groups(sock.as_fd()) {
            Ok(groups) => groups,
            // A kernel before 4.13: fewer groups only ever mean less access.
            Err(Errno::NOPROTOOPT) => {
                tracing::warn!("SO_PEERGROUPS unsupported: supplementary groups do not count");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERGROUPS failed; connection refused");
                continue;
            }
        };
        let pid = cred.pid.as_raw_nonzero().get() as u32;
        let label = match label::peer_label(sock.as_fd(), pid) {
            Ok(label) => label,
            Err(e) => {
                tracing::warn!(error = %e, pid, "cannot read the peer's security label; connection refused");
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!(uid = cred.uid.as_raw(), "too many connections; refused");
            continue;
        }
        next_conn += 1;
        let peer = broker.peer(
            next_conn,
            pid,
            cred.uid.as_raw(),
            cred.gid.as_raw(),
            groups,
            label,
        );
        active.fetch_add(1, Ordering::Relaxed);
        let (broker, shutdown_rx, counter) = (broker.clone(), shutdown_rx.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{}", peer.conn))
            .spawn(move || {
                let span =
                    tracing::info_span!("conn", id = peer.conn, uid = peer.uid, pid = peer.pid, label = ?peer.label);
                let _enter = span.enter();
                conn::serve(&broker, sock, peer, shutdown_rx.as_fd());
                counter.fetch_sub(1, Ordering::Relaxed);
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                active.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot start a connection thread; refused");
            }
        }
    }
    drop(shutdown_tx); // the read end now reports HUP: every connection thread wakes
    for thread in threads {
        let _ = thread.join();
    }
    tracing::info!("stopped");
    Ok(())
}
