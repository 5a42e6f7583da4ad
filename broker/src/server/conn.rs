//! One client connection's transport: receive and decode one request, have [`Broker::handle`]
//! answer it, send the reply. The event loop (`mod.rs`) calls [`step`] each time the socket is
//! readable; between requests a connection is a socket and this struct, no thread.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use membroker_client::codec::{self, CodecError};
use membroker_client::proto::{ErrorCode, PROTOCOL_MIN, Response};
use membroker_client::transport::{self, TransportError};

use rustix::io::Errno;

use super::broker::{Answer, Broker, Deferred, Reply, ReplyFd, Session, Then};
use crate::error::error_chain;
use crate::namespace::Peer;

/// How long a reply may wait for a client that does not read before it is disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection between requests. Its socket is non-blocking: a worker never waits on it.
#[derive(Debug)]
pub struct Conn {
    pub sock: OwnedFd,
    pub session: Session,
    /// When it was accepted (the `Hello` deadline counts from here).
    pub accepted: Instant,
    /// A reply the client's socket had no room for yet.
    pub pending: Option<Pending>,
}

/// A reply waiting for room in the client's socket.
#[derive(Debug)]
pub struct Pending {
    msg: Vec<u8>,
    fd: Option<ReplyFd>,
    /// Since when it waits ([`SEND_TIMEOUT`] counts from here).
    pub since: Instant,
}

/// What a connection does after a step.
pub enum Step {
    /// Wait on its socket.
    Wait(Wait),
    /// Its request's reply waits for the journal ([`Broker::when_durable`], then [`answer`]).
    Durable(Deferred),
}

/// What a connection waits for next.
pub enum Wait {
    /// Its next request.
    Request,
    /// Room for its pending reply.
    Room,
}

/// Why a connection ends.
pub enum End {
    /// The client closed it.
    Closed,
    /// The client broke the protocol; it was told why (best effort) and dropped.
    Protocol(String),
    /// Like `Protocol`, already logged by whoever closed it (rate-limited: expected in floods).
    Quiet(String),
}

impl Conn {
    pub fn new(sock: OwnedFd, peer: Peer) -> Conn {
        Conn {
            sock,
            session: Session::new(peer),
            accepted: Instant::now(),
            pending: None,
        }
    }

    /// Logs why the connection ends and releases what it held.
    pub fn end(self, broker: &Broker, end: End) {
        match end {
            End::Closed => tracing::debug!("client closed the connection"),
            End::Protocol(why) => tracing::warn!(why, "protocol error; client disconnected"),
            End::Quiet(why) => tracing::debug!(why, "client disconnected"),
        }
        let conn = self.session.peer.conn;
        drop(self.sock);
        broker.disconnect(conn);
    }
}

/// Sends the pending reply of a writable socket, or reads one request from a readable one,
/// has the broker answer it and sends the reply (or says that the reply waits for the
/// journal): the transport only. `Err` ends the connection.
pub fn step(broker: &Broker, conn: &mut Conn, buf: &mut [u8]) -> Result<Step, End> {
    let (sock, session) = (&conn.sock, &mut conn.session);
    if let Some(pending) = conn.pending.take() {
        return match pending.send(sock) {
            Ok(None) => Ok(Step::Wait(Wait::Request)),
            Ok(Some(pending)) => {
                conn.pending = Some(pending);
                Ok(Step::Wait(Wait::Room))
            }
            Err(e) => Err(End::Protocol(format!("reply not delivered: {e}"))),
        };
    }
    let received = match transport::recv(sock, buf) {
        Ok(r) => r,
        Err(TransportError::Io(Errno::AGAIN)) => return Ok(Step::Wait(Wait::Request)),
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
    if session.version.is_none() {
        // Who it is beyond the uid, read once, before the handshake is answered.
        match super::label::peer_label(sock.as_fd(), session.peer.pid) {
            Ok(label) => session.peer.label = label.map(Into::into),
            Err(e) => {
                let why = format!(
                    "the broker cannot read this process's security label ({e}), so it cannot \
                     tell which leases it may use; try again"
                );
                return Err(refuse(sock, session, ErrorCode::Internal, why));
            }
        }
    }
    match broker.handle(session, header.version, request) {
        Answer::Now(reply) => answer(broker, conn, reply).map(Step::Wait),
        Answer::Durable(deferred) => Ok(Step::Durable(deferred)),
    }
}

/// Sends the reply to the request just read and says what the connection waits for next.
pub fn answer(broker: &Broker, conn: &mut Conn, mut reply: Reply) -> Result<Wait, End> {
    let (sock, session) = (&conn.sock, &conn.session);
    loop {
        let then = reply.then;
        let why = match &reply.response {
            Response::Error { message, .. } if then == Then::Close => message.clone(),
            _ => String::new(),
        };
        match (then, send(sock, session, reply)) {
            (Then::Close, _) => return Err(End::Protocol(why)), // told why, best effort
            (_, Err(e)) => return Err(End::Protocol(format!("reply not delivered: {e}"))),
            (Then::Continue, Ok(None)) => return Ok(Wait::Request),
            // A client that sends requests without reading the replies: its next reply
            // waits for room, without a worker.
            (Then::Continue, Ok(Some(pending))) => {
                conn.pending = Some(pending);
                return Ok(Wait::Room);
            }
            (Then::Upgrade, Ok(Some(_))) => {
                return Err(End::Protocol("reply not delivered: no room".into()));
            }
            (Then::Upgrade, Ok(None)) => {
                // Returns only if the exec failed: tell the requester, keep serving.
                let Err(why) = broker.upgrade();
                reply = Reply::error(ErrorCode::Internal, format!("upgrade failed: {why}"));
            }
        }
    }
}

/// Sends a reply; `Ok(Some(_))` if the client's socket has no room for it now.
pub fn send(sock: &OwnedFd, session: &Session, reply: Reply) -> Result<Option<Pending>, String> {
    let version = session.version.unwrap_or(PROTOCOL_MIN);
    let (msg, fd) = match codec::encode_response(version, &reply.response) {
        Ok(msg) => (msg, reply.fd.filter(|_| reply.response.fd_count() > 0)),
        Err(e) => {
            // E.g. a lease description that does not fit a message: say so, without the fd.
            let fallback = Response::Error {
                code: ErrorCode::Internal,
                message: format!("reply does not encode: {e}"),
            };
            let msg = codec::encode_response(version, &fallback).map_err(|e| e.to_string())?;
            (msg, None)
        }
    };
    let since = Instant::now();
    Pending { msg, fd, since }.send(sock)
}

impl Pending {
    /// Sends it; `Ok(Some(self))` if there is still no room.
    fn send(self, sock: &OwnedFd) -> Result<Option<Pending>, String> {
        let fds: Vec<BorrowedFd<'_>> = self.fd.iter().map(|fd| fd.as_fd()).collect();
        let sent = transport::send(sock.as_fd(), &self.msg, &fds);
        drop(fds);
        match sent {
            Ok(()) => Ok(None),
            Err(TransportError::Io(Errno::AGAIN)) => Ok(Some(self)),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Tells the client what it got wrong (best effort) and ends the connection.
pub fn refuse(sock: &OwnedFd, session: &Session, code: ErrorCode, message: String) -> End {
    let _ = send(sock, session, Reply::error(code, message.clone()));
    End::Protocol(message)
}
