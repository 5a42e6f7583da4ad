//! One client connection's transport: receive and decode one request, have [`Broker::handle`]
//! answer it, send the reply. The event loop (`mod.rs`) calls [`step`] each time the socket is
//! readable; between requests a connection is a socket and this struct, no thread.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use membroker_client::codec::{self, CodecError};
use membroker_client::proto::{ErrorCode, PROTOCOL_MIN, Response};
use membroker_client::transport::{self, TransportError};

use super::broker::{Broker, Reply, Session, Then};
use crate::error::error_chain;
use crate::namespace::Peer;

/// How long a reply may wait for a client that does not read before it is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection between requests.
#[derive(Debug)]
pub struct Conn {
    pub sock: OwnedFd,
    pub session: Session,
    /// When it was accepted (the `Hello` deadline counts from here).
    pub accepted: Instant,
}

/// Why a connection ends.
pub enum End {
    /// The client closed it.
    Closed,
    /// The client broke the protocol; it was told why (best effort) and dropped.
    Protocol(String),
}

impl Conn {
    pub fn new(sock: OwnedFd, peer: Peer) -> Conn {
        if let Err(e) = rustix::net::sockopt::set_socket_timeout(
            &sock,
            rustix::net::sockopt::Timeout::Send,
            Some(SEND_TIMEOUT),
        ) {
            tracing::warn!(error = %e, "cannot set send timeout");
        }
        Conn {
            sock,
            session: Session::new(peer),
            accepted: Instant::now(),
        }
    }

    /// Logs why the connection ends and releases what it held.
    pub fn end(self, broker: &Broker, end: End) {
        match end {
            End::Closed => tracing::debug!("client closed the connection"),
            End::Protocol(why) => tracing::warn!(why, "protocol error; client disconnected"),
        }
        let conn = self.session.peer.conn;
        drop(self.sock);
        broker.disconnect(conn);
    }
}

/// Reads one request from a readable socket, has the broker answer it, sends the reply: the
/// transport only. `Err` ends the connection.
pub fn step(broker: &Broker, conn: &mut Conn, buf: &mut [u8]) -> Result<(), End> {
    let (sock, session) = (&conn.sock, &mut conn.session);
    let received = match transport::recv(sock, buf) {
        Ok(r) => r,
        Err(TransportError::Closed) => return Err(End::Closed),
        Err(e) => return Err(refuse(sock, session, ErrorCode::Protocol, error_chain(&e))),
    };
    if !received.fds.is_empty() {
        let why = format!("requests carry no fds, {} attached", received.fds.len());
        drop(received.fds); // closed here: nothing a client sends is kept
        return Err(refuse(sock, session, ErrorCode::Protocol, why));
    }
    let (header, request) = match codec::decode_request(&buf[..received.len]) {
        Ok(decoded) => decoded,
        Err(e @ CodecError::Version(_)) => {
            return Err(refuse(sock, session, ErrorCode::Version, error_chain(&e)));
        }
        Err(e) => return Err(refuse(sock, session, ErrorCode::Protocol, error_chain(&e))),
    };
    let mut reply = broker.handle(session, header.version, request);
    loop {
        let then = reply.then;
        let why = match &reply.response {
            Response::Error { message, .. } if then == Then::Close => message.clone(),
            _ => String::new(),
        };
        if let Err(e) = send(sock, session, reply) {
            return Err(End::Protocol(format!("reply not delivered: {e}")));
        }
        match then {
            Then::Continue => return Ok(()),
            Then::Close => return Err(End::Protocol(why)),
            Then::Upgrade => {
                // Returns only if the exec failed: tell the requester, keep serving.
                let Err(why) = broker.upgrade();
                reply = Reply::error(ErrorCode::Internal, format!("upgrade failed: {why}"));
            }
        }
    }
}

pub fn send(sock: &OwnedFd, session: &Session, reply: Reply) -> Result<(), String> {
    let version = session.version.unwrap_or(PROTOCOL_MIN);
    let fds: Vec<BorrowedFd<'_>> = reply.fd.iter().map(|fd| fd.as_fd()).collect();
    let (msg, fds) = match codec::encode_response(version, &reply.response) {
        Ok(msg) => (msg, &fds[..reply.response.fd_count().min(fds.len())]),
        Err(e) => {
            // E.g. a lease description that does not fit a message: say so, without the fd.
            let fallback = Response::Error {
                code: ErrorCode::Internal,
                message: format!("reply does not encode: {e}"),
            };
            (
                codec::encode_response(version, &fallback).map_err(|e| e.to_string())?,
                &[][..],
            )
        }
    };
    transport::send(sock.as_fd(), &msg, fds).map_err(|e| e.to_string())
}

/// Tells the client what it got wrong (best effort) and ends the connection.
pub fn refuse(sock: &OwnedFd, session: &Session, code: ErrorCode, message: String) -> End {
    let _ = send(sock, session, Reply::error(code, message.clone()));
    End::Protocol(message)
}
