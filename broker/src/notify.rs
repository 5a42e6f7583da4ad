//! The systemd side of a `Type=notify` service (sd_notify), written out: readiness, status,
//! stopping, and the fd store that keeps memfd leases alive across a broker crash.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};

/// A connection to `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    sock: OwnedFd,
    addr: SocketAddrUnix,
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
            (Ok(addr), Ok(sock)) => Some(Notifier { sock, addr }),
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
        self.send(&format!("READY=1\nSTATUS={status}"), &[]);
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping", &[]);
    }

    /// Keeps a lease's memfd in the service's fd store.
    pub fn store(&self, id: u64, fd: BorrowedFd<'_>) {
        self.send(&format!("FDSTORE=1\nFDNAME={}", fd_name(id)), &[fd]);
    }

    /// Drops a lease's memfd from the fd store.
    pub fn remove(&self, id: u64) {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={}", fd_name(id)), &[]);
    }
}
