//! File descriptors that outlive a broker process: `membroker upgrade` re-executes the broker
//! with its listening socket, lock file and memfd leases inherited, and under systemd the memfd
//! leases also live in the service's fd store (`FDSTORE=1`), which survives even a crash. With
//! a socket unit (`membroker.socket`) systemd owns the listening socket and passes it in too,
//! so clients queue in its backlog while the broker restarts.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::sys::{remove_env, take_inherited_fd};

/// Environment variable carrying the upgrade hand-over: `listen=FD;lock=FD;leases=FD`, where
/// the last fd is a memfd listing `ID FD` per line (one environment variable is capped at
/// 128 KiB, far too small for tens of thousands of leases), and `;activated=1` when the
/// listening socket is systemd's.
pub const HANDOVER_ENV: &str = "MEMBROKER_HANDOVER";

/// What a starting broker inherited.
#[derive(Debug, Default)]
pub struct Inherited {
    pub listener: Option<OwnedFd>,
    pub lock: Option<OwnedFd>,
    /// memfd leases by lease id.
    pub leases: HashMap<u64, OwnedFd>,
    /// Where they came from, for the log ("" when nothing was inherited).
    pub source: &'static str,
    /// The listening socket is systemd's (a socket unit): the broker neither binds nor
    /// removes the socket file.
    pub activated: bool,
}

fn inherited_fd(text: &str) -> Option<OwnedFd> {
    text.parse().ok().and_then(take_inherited_fd)
}

/// Reads the `ID FD` lines of the upgrade's lease list.
fn read_list(list: OwnedFd) -> Vec<(u64, i32)> {
    let mut file = std::fs::File::from(list);
    let mut text = String::new();
    if file.rewind().is_err() || file.read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    text.lines()
        .filter_map(|line| {
            let (id, fd) = line.split_once(' ')?;
            Some((id.parse().ok()?, fd.parse().ok()?))
        })
        .collect()
}

/// Collects inherited fds: the upgrade hand-over if present, else systemd's `LISTEN_FDS`
/// (names `lease.ID`), else nothing. Clears the variables so children do not see them.
/// Call it first thing, before any thread exists.
pub fn take() -> Inherited {
    let mut inherited = Inherited::default();
    if let Some(spec) = std::env::var_os(HANDOVER_ENV) {
        remove_env(HANDOVER_ENV);
        inherited.source = "upgrade";
        for part in spec.to_string_lossy().split(';') {
            match part.split_once('=') {
                Some(("listen", fd)) => inherited.listener = inherited_fd(fd),
                Some(("lock", fd)) => inherited.lock = inherited_fd(fd),
                Some(("activated", "1")) => inherited.activated = true,
                Some(("leases", fd)) => {
                    for (id, raw) in inherited_fd(fd).map(read_list).unwrap_or_default() {
                        if let Some(fd) = take_inherited_fd(raw) {
                            inherited.leases.insert(id, fd);
                        }
                    }
                }
                _ => {}
            }
        }
        return inherited;
    }
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
        == Some(pid);
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if ours && count > 0 {
        inherited.source = "systemd";
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let names: Vec<&str> = names.split(':').collect();
        for i in 0..count {
            let Some(fd) = take_inherited_fd(3 + i) else {
                continue;
            };
            let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
            let name = names.get(i as usize).copied().unwrap_or("");
            match name.strip_prefix("lease.").and_then(|id| id.parse().ok()) {
                Some(id) => {
                    inherited.leases.insert(id, fd);
                }
                None if is_listening_seqpacket(&fd) && inherited.listener.is_none() => {
                    inherited.listener = Some(fd);
                    inherited.activated = true;
                }
                None => tracing::warn!(
                    fd = 3 + i,
                    name,
                    "unknown fd from systemd (a socket unit must be ListenSequentialPacket=); closed"
                ),
            }
        }
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        remove_env(var);
    }
    inherited
}

/// Whether `fd` is a listening `SOCK_SEQPACKET` socket (what `ListenSequentialPacket=` makes).
fn is_listening_seqpacket(fd: &OwnedFd) -> bool {
    use rustix::net::sockopt;
    sockopt::socket_type(fd).is_ok_and(|t| t == rustix::net::SocketType::SEQPACKET)
        && sockopt::socket_acceptconn(fd).unwrap_or(false)
}

/// A prepared hand-over: the environment value, and the memfd listing the leases (it must
/// stay open until the exec).
#[derive(Debug)]
pub struct Prepared {
    pub env: String,
    list: OwnedFd,
}

/// Builds the hand-over for an exec: clears CLOEXEC on every fd and writes the lease list to
/// an inheritable memfd. When it fails, or the exec does, call [`restore_cloexec`].
pub fn prepare(
    listener: BorrowedFd<'_>,
    lock: BorrowedFd<'_>,
    activated: bool,
    leases: &[(u64, BorrowedFd<'_>)],
) -> rustix::io::Result<Prepared> {
    let inherit = |fd: BorrowedFd<'_>| rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty());
    let mut text = String::with_capacity(leases.len() * 16);
    for (id, fd) in leases {
        inherit(fd.as_fd())?;
        text.push_str(&format!("{id} {}\n", fd.as_raw_fd()));
    }
    // No MFD_CLOEXEC: the new image reads it.
    let list = rustix::fs::memfd_create("membroker-handover", rustix::fs::MemfdFlags::empty())?;
    let mut written = 0;
    while written < text.len() {
        written += rustix::io::write(&list, &text.as_bytes()[written..])?;
    }
    inherit(listener)?;
    inherit(lock)?;
    let mut env = format!(
        "listen={};lock={};leases={}",
        listener.as_raw_fd(),
        lock.as_raw_fd(),
        list.as_raw_fd()
    );
    if activated {
        env.push_str(";activated=1");
    }
    Ok(Prepared { env, list })
}

impl Prepared {
    /// Closes the lease list (after a failed exec).
    pub fn discard(self) {
        drop(self.list);
    }
}

/// Puts CLOEXEC back after a failed exec.
pub fn restore_cloexec<'a>(fds: impl IntoIterator<Item = BorrowedFd<'a>>) {
    for fd in fds {
        let _ = rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC);
    }
}
