//! One message per `SOCK_SEQPACKET` datagram, with fds as `SCM_RIGHTS`.
//!
//! Received fds are wrapped in [`OwnedFd`] at once (closed on every error path), arrive with
//! `MSG_CMSG_CLOEXEC`, and a truncated message or control message is an error.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::codec::MAX_MSG_SIZE;

/// Most fds a receiver accepts on one message (more is a protocol error, and the kernel closes
/// whatever did not fit).
pub const MAX_FDS: usize = 4;

/// What a receive can go wrong with.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("socket I/O failed")]
    Io(#[source] Errno),
    #[error("peer closed the connection")]
    Closed,
    #[error("message larger than {MAX_MSG_SIZE} bytes (truncated)")]
    Truncated,
    #[error("more than {MAX_FDS} fds attached (control message truncated)")]
    ControlTruncated,
    #[error("unexpected ancillary data")]
    UnexpectedAncillary,
}

/// A received message: `len` bytes at the start of the caller's buffer, and its fds.
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
}

/// Sends one message with `fds` attached.
pub fn send(
    sock: BorrowedFd<'_>,
    msg: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), TransportError> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(TransportError::ControlTruncated);
    }
    loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(msg)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(Errno::PIPE | Errno::CONNRESET) => return Err(TransportError::Closed),
            Err(e) => return Err(TransportError::Io(e)),
        }
    }
}

/// Receives one message into `buf` (which should be [`MAX_MSG_SIZE`] + 1 bytes long so that an
/// oversize message is detected as truncated).
pub fn recv(sock: impl AsFd, buf: &mut [u8]) -> Result<Received, TransportError> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let result = loop {
        match rustix::net::recvmsg(
            sock.as_fd(),
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(Errno::INTR) => continue,
            Err(Errno::CONNRESET) => return Err(TransportError::Closed),
            Err(e) => return Err(TransportError::Io(e)),
            Ok(r) => break r,
        }
    };
    // Take ownership of every fd before looking at anything else, so errors close them.
    let mut fds = Vec::new();
    let mut other = false;
    for message in control.drain() {
        match message {
            RecvAncillaryMessage::ScmRights(rights) => fds.extend(rights),
            _ => other = true,
        }
    }
    if result.flags.contains(ReturnFlags::CTRUNC) {
        return Err(TransportError::ControlTruncated);
    }
    if result.flags.contains(ReturnFlags::TRUNC) || result.bytes > MAX_MSG_SIZE {
        return Err(TransportError::Truncated);
    }
    if other {
        return Err(TransportError::UnexpectedAncillary);
    }
    if result.bytes == 0 && fds.is_empty() {
        return Err(TransportError::Closed);
    }
    Ok(Received {
        len: result.bytes,
        fds,
    })
}
