//! The systemd side of a `Type=notify` service (sd_notify), written out: readiness, status,
//! stopping, the watchdog (`WatchdogSec=`), start-up steps that extend the start timeout
//! (`EXTEND_TIMEOUT_USEC=`), and the fd store that keeps memfd leases alive across a broker
//! crash.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};

/// A connection to `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    sock: OwnedFd,
    addr: SocketAddrUnix,
    /// `WATCHDOG_USEC`, when systemd watches this process.
    watchdog: Option<Duration>,
    /// Bytes the fd store's names take in `LISTEN_FDNAMES` (see [`FD_NAMES_BUDGET`]).
    names: AtomicUsize,
}

/// What the fd store's names may take of `LISTEN_FDNAMES`, the one environment string
/// systemd hands them over in when it starts the broker again: the kernel refuses to exec
/// with a string of 128 KiB or more, and the broker could not start. Kept back: the
/// variable's name, a socket unit's fd names, and creates checked at the same time.
pub const FD_NAMES_BUDGET: usize = (128 << 10) - 4096;

/// The longest entry a lease adds to `LISTEN_FDNAMES` (its name with the largest id, and
/// the `:` between names).
const LONGEST_ENTRY: usize = "lease.".len() + 20 + 1;

/// What a lease's name adds to `LISTEN_FDNAMES`.
fn entry_len(id: u64) -> usize {
    fd_name(id).len() + 1
}

/// How long one start-up step (replaying the journal, restoring one pool) may take before
/// systemd gives up on the start.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The watchdog timeout systemd set for this process (`WATCHDOG_USEC`, for this pid if
/// `WATCHDOG_PID` says whom).
fn watchdog_from_env() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let pid = std::env::var("WATCHDOG_PID").ok();
    let ours = rustix::process::getpid().as_raw_nonzero().get().to_string();
    (usec > 0 && pid.is_none_or(|p| p == ours)).then(|| Duration::from_micros(usec))
}

/// fd-store name of a lease.
pub fn fd_name(id: u64) -> String {
    format!("lease.{id}")
}

impl Notifier {
    /// None when not started by systemd (no `NOTIFY_SOCKET`).
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => SocketAddrUnix::new_abstract_name(abstract_name),
            None => SocketAddrUnix::new(bytes.as_slice()),
        };
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        );
        match (addr, sock) {
            (Ok(addr), Ok(sock)) => Some(Notifier {
                sock,
                addr,
                watchdog: watchdog_from_env(),
                names: AtomicUsize::new(0),
            }),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; not notifying systemd");
                None
            }
        }
    }

    fn send(&self, state: &str, fds: &[BorrowedFd<'_>]) {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            tracing::warn!("too many fds for one notification");
            return;
        }
        let sent = rustix::net::sendmsg_addr(
            &self.sock,
            &self.addr,
            &[IoSlice::new(state.as_bytes())],
            &mut control,
            SendFlags::NOSIGNAL,
        );
        if let Err(e) = sent {
            tracing::warn!(error = %e, state, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        let mut state = format!("READY=1\nSTATUS={status}");
        if let Some(timeout) = self.watchdog {
            // Back to the configured timeout after the start-up steps (see [`Notifier::step`]).
            state.push_str(&format!(
                "\nWATCHDOG=1\nWATCHDOG_USEC={}",
                timeout.as_micros()
            ));
        }
        self.send(&state, &[]);
    }

    /// A start-up step begins (`what`, shown as the status): systemd's start timeout is
    /// extended to [`STEP_TIMEOUT`] from now, and so is the watchdog's (an upgrade restores
    /// under the watchdog), until [`Notifier::ready`].
    pub fn step(&self, what: &str) {
        let usec = STEP_TIMEOUT.as_micros();
        let mut state = format!("EXTEND_TIMEOUT_USEC={usec}\nSTATUS={what}");
        if let Some(timeout) = self.watchdog {
            let usec = usec.max(timeout.as_micros());
            state.push_str(&format!("\nWATCHDOG=1\nWATCHDOG_USEC={usec}"));
        }
        self.send(&state, &[]);
    }

    /// How often to tell the watchdog the broker is alive (half its timeout), if it is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|t| t / 2)
    }

    /// Tells the watchdog the broker is alive.
    pub fn alive(&self) {
        self.send("WATCHDOG=1", &[]);
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping", &[]);
    }

    /// Counts the memfds of `ids`, which the fd store keeps from before this start (systemd
    /// or the broker that upgraded to this one handed them over).
    pub fn stored_before(&self, ids: impl Iterator<Item = u64>) {
        let bytes: usize = ids.map(entry_len).sum();
        self.names.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Whether the fd store has room for one more lease's memfd: its name must still fit
    /// `LISTEN_FDNAMES` (see [`FD_NAMES_BUDGET`]). Returns the bytes its names take if not.
    pub fn store_is_full(&self) -> Option<usize> {
        let names = self.names.load(Ordering::Relaxed);
        (names + LONGEST_ENTRY > FD_NAMES_BUDGET).then_some(names)
    }

    /// Keeps a lease's memfd in the service's fd store.
    pub fn store(&self, id: u64, fd: BorrowedFd<'_>) {
        self.names.fetch_add(entry_len(id), Ordering::Relaxed);
        self.send(&format!("FDSTORE=1\nFDNAME={}", fd_name(id)), &[fd]);
    }

    /// Drops a lease's memfd from the fd store.
    pub fn remove(&self, id: u64) {
        let _ = self
            .names
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(entry_len(id)))
            });
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={}", fd_name(id)), &[]);
    }
}
