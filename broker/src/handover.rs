//! File descriptors that outlive a broker process: `membroker upgrade` re-executes the broker
//! with its listening socket, lock file and memfd leases inherited, and under systemd the memfd
//! leases also live in the service's fd store (`FDSTORE=1`), which survives even a crash.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::sys::{remove_env, take_inherited_fd};

/// Environment variable carrying the upgrade hand-over: `listen=FD;lock=FD;leases=ID:FD,ID:FD`.
pub const HANDOVER_ENV: &str = "MEMBROKER_HANDOVER";

/// What a starting broker inherited.
#[derive(Debug, Default)]
pub struct Inherited {
    pub listener: Option<OwnedFd>,
    pub lock: Option<OwnedFd>,
    /// memfd leases by lease id.
    pub leases: HashMap<u64, OwnedFd>,
    /// Where they came from, for the log.
    pub source: &'static str,
}

/// Collects inherited fds: the upgrade hand-over if present, else systemd's `LISTEN_FDS`
/// (names `lease.ID`), else nothing. Clears the variables so children do not see them.
pub fn take() -> Inherited {
    let mut inherited = Inherited::default();
    if let Some(spec) = std::env::var_os(HANDOVER_ENV) {
        remove_env(HANDOVER_ENV);
        inherited.source = "upgrade";
        for part in spec.to_string_lossy().split(';') {
            let Some((key, value)) = part.split_once('=') else {
                continue;
            };
            match key {
                "listen" => inherited.listener = value.parse().ok().and_then(take_inherited_fd),
                "lock" => inherited.lock = value.parse().ok().and_then(take_inherited_fd),
                "leases" => {
                    for pair in value.split(',').filter(|p| !p.is_empty()) {
                        let Some((id, fd)) = pair.split_once(':') else {
                            continue;
                        };
                        if let (Ok(id), Some(fd)) =
                            (id.parse(), fd.parse().ok().and_then(take_inherited_fd))
                        {
                            inherited.leases.insert(id, fd);
                        }
                    }
                }
                _ => {}
            }
        }
        return inherited;
    }
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
        == Some(rustix::process::getpid().as_raw_nonzero().get());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if ours && count > 0 {
        inherited.source = "systemd fd store";
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let names: Vec<&str> = names.split(':').collect();
        for i in 0..count {
            let Some(fd) = take_inherited_fd(3 + i) else {
                continue;
            };
            let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
            match names
                .get(i as usize)
                .and_then(|n| n.strip_prefix("lease."))
                .and_then(|id| id.parse().ok())
            {
                Some(id) => {
                    inherited.leases.insert(id, fd);
                }
                None => tracing::warn!(
                    fd = 3 + i,
                    name = names.get(i as usize).copied().unwrap_or(""),
                    "unknown fd from systemd; closed"
                ),
            }
        }
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        remove_env(var);
    }
    inherited
}

/// Builds the hand-over for an exec: clears CLOEXEC on every fd and returns the environment
/// value. On failure (or when the exec fails) call [`restore_cloexec`].
pub fn prepare(
    listener: BorrowedFd<'_>,
    lock: BorrowedFd<'_>,
    leases: &[(u64, BorrowedFd<'_>)],
) -> rustix::io::Result<String> {
    let inherit = |fd: BorrowedFd<'_>| rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty());
    inherit(listener)?;
    inherit(lock)?;
    let mut spec = format!(
        "listen={};lock={};leases=",
        listener.as_raw_fd(),
        lock.as_raw_fd()
    );
    for (i, (id, fd)) in leases.iter().enumerate() {
        inherit(fd.as_fd())?;
        if i > 0 {
            spec.push(',');
        }
        spec.push_str(&format!("{id}:{}", fd.as_raw_fd()));
    }
    Ok(spec)
}

/// Puts CLOEXEC back after a failed exec.
pub fn restore_cloexec<'a>(fds: impl IntoIterator<Item = BorrowedFd<'a>>) {
    for fd in fds {
        let _ = rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC);
    }
}
