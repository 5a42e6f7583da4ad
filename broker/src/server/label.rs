//! A connecting peer's security label (AppArmor profile, SELinux context), read at accept.
//!
//! `SO_PEERSEC` gives the label the peer had when it connected, wherever the LSM answers it
//! for Unix sockets (SELinux; AppArmor with Unix-socket mediation, as in Ubuntu's kernels).
//! Upstream AppArmor without that mediation (Debian's 6.1 kernel) answers `ENOPROTOOPT`; the
//! label is then read from the peer's `/proc/PID/attr`, through a directory opened once, so
//! every read is of the same process, which must still be alive when it is done.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::namespace::{MAX_LABEL, parse_label};

/// The label of the peer `pid` connected on `sock`, None when it is unconfined or no LSM
/// labels it. An error refuses the connection: a label that cannot be read must not become
/// "no label" (a lease created then would not be bound).
pub fn peer_label(sock: BorrowedFd<'_>, pid: u32) -> Result<Option<String>, Errno> {
    if let Some(raw) = crate::sys::peer_security(sock, MAX_LABEL)? {
        return Ok(parse_label(&raw));
    }
    if pid == 0 {
        // The peer is in a pid namespace the broker cannot see into.
        return Ok(None);
    }
    let proc_dir = rustix::fs::open(
        format!("/proc/{pid}"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // The AppArmor-only file first (kernels with LSM stacking), then the one of the major LSM.
    let raw = match read_attr(proc_dir.as_fd(), "attr/apparmor/current") {
        Err(Errno::NOENT) => read_attr(proc_dir.as_fd(), "attr/current"),
        other => other,
    };
    let label = match raw {
        Ok(raw) => parse_label(&raw),
        // No LSM keeps a label for the process.
        Err(Errno::INVAL | Errno::NOENT) => None,
        Err(e) => return Err(e),
    };
    // Still the same, living process: a pid reused meanwhile would fail here (ESRCH).
    read_attr(proc_dir.as_fd(), "stat")?;
    Ok(label)
}

/// Reads a small file of a `/proc/PID` directory, at most [`MAX_LABEL`] bytes.
fn read_attr(dir: BorrowedFd<'_>, path: &str) -> Result<Vec<u8>, Errno> {
    let file: OwnedFd =
        rustix::fs::openat(dir, path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mut buf = vec![0u8; MAX_LABEL + 1];
    let mut len = 0;
    loop {
        match rustix::io::read(&file, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    break;
                }
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    if len > MAX_LABEL && path != "stat" {
        return Err(Errno::TOOBIG);
    }
    buf.truncate(len);
    Ok(buf)
}
