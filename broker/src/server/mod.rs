//! The daemon: socket, lock file, signals, and the event loop that serves every connection
//! with a small pool of workers (`event_loop.rs`).

mod broker;
mod conn;
mod event_loop;
mod label;
mod limits;
mod pages;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

pub use broker::{Broker, Reply, Session, Then};
pub use event_loop::run;
pub use limits::{ConnLimits, set_nofile};

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another broker is already serving {} (it holds {}); stop it first or use another --socket", socket.display(), lock.display())]
    AlreadyRunning { socket: PathBuf, lock: PathBuf },
    #[error("systemd passed a listening socket bound to {bound}, but --socket is {}; make the socket unit's ListenSequentialPacket= and --socket the same path", socket.display())]
    ForeignSocket { socket: PathBuf, bound: String },
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

/// A bound listening socket, guarded by its lock file; the socket file is removed on drop
/// unless systemd owns it (a socket unit).
#[derive(Debug)]
pub struct Listener {
    sock: OwnedFd,
    path: PathBuf,
    _lock: File,
    activated: bool,
}

/// Takes `<path>.lock`, which guards the socket path: one broker per socket.
fn take_lock(path: &Path) -> Result<File, ServeError> {
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
        Ok(()) => Ok(lock),
        Err(Errno::WOULDBLOCK) => Err(ServeError::AlreadyRunning {
            socket: path.to_path_buf(),
            lock: lock_path,
        }),
        Err(e) => Err(ServeError::Io {
            what: "cannot lock",
            path: lock_path,
            source: e.into(),
        }),
    }
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
        let lock = take_lock(path)?;
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
            activated: false,
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

    /// Serves the listening socket systemd passed (`membroker.socket`), which must be bound to
    /// `path`; takes the lock file like [`Listener::bind`]. systemd keeps the socket file.
    pub fn activated(sock: OwnedFd, path: &Path) -> Result<Listener, ServeError> {
        let bound = rustix::net::getsockname(&sock).map_err(sys("getsockname"))?;
        let bound = SocketAddrUnix::try_from(bound)
            .ok()
            .and_then(|a| a.path().map(|p| p.to_string_lossy().into_owned()));
        if bound.as_deref().map(Path::new) != Some(path) {
            return Err(ServeError::ForeignSocket {
                socket: path.to_path_buf(),
                bound: bound.unwrap_or_else(|| "no path".into()),
            });
        }
        let lock = take_lock(path)?;
        // The event loop accepts until EAGAIN. (The flag is on the socket systemd shares with
        // us; systemd only polls it.)
        rustix::fs::fcntl_setfl(&sock, rustix::fs::OFlags::NONBLOCK).map_err(sys("fcntl"))?;
        Ok(Listener {
            sock,
            path: path.to_path_buf(),
            _lock: lock,
            activated: true,
        })
    }

    /// Takes over the listening socket and lock file an upgrade handed over; `activated`:
    /// the socket is systemd's.
    pub fn adopt(sock: OwnedFd, lock: OwnedFd, path: &Path, activated: bool) -> Listener {
        Listener {
            sock,
            path: path.to_path_buf(),
            _lock: File::from(lock),
            activated,
        }
    }

    /// Whether the socket is systemd's (a socket unit).
    pub fn is_activated(&self) -> bool {
        self.activated
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
        if !self.activated {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
