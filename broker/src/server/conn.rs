//! One client connection's transport: receive and decode a request, have [`Broker::handle`]
//! answer it, send the reply; until the client closes the connection or breaks the protocol.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use membroker_client::codec::{self, CodecError, MAX_MSG_SIZE};
use membroker_client::proto::{ErrorCode, PROTOCOL_MIN, Response};
use membroker_client::transport::{self, TransportError};
use rustix::event::{PollFd, PollFlags};

use super::broker::{Broker, Reply, Session, Then};
use crate::error::error_chain;
use crate::namespace::Peer;

/// How long a reply may wait for a client that does not read before it is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection ends.
enum End {
    /// The client closed it.
    Closed,
    /// The broker is shutting down.
    Shutdown,
    /// The client broke the protocol; it was told why (best effort) and dropped.
    Protocol(String),
}

/// Serves one connection until it ends, then releases what it held.
pub fn serve(broker: &Broker, sock: OwnedFd, peer: Peer, shutdown: BorrowedFd<'_>) {
    if let Err(e) = rustix::net::sockopt::set_socket_timeout(
        &sock,
        rustix::net::sockopt::Timeout::Send,
        Some(SEND_TIMEOUT),
    ) {
        tracing::warn!(error = %e, "cannot set send timeout");
    }
    let conn = peer.conn;
    let mut session = Session::new(peer);
    match run(broker, &sock, &mut session, shutdown) {
        End::Closed => tracing::debug!("client closed the connection"),
        End::Shutdown => tracing::debug!("connection closed for shutdown"),
        End::Protocol(why) => tracing::warn!(why, "protocol error; client disconnected"),
    }
    broker.disconnect(conn);
}

/// Reads requests, has the broker answer them, sends the replies: the transport only.
fn run(broker: &Broker, sock: &OwnedFd, session: &mut Session, shutdown: BorrowedFd<'_>) -> End {
    let mut buf = vec![0u8; MAX_MSG_SIZE + 1];
    loop {
        let mut fds = [
            PollFd::new(sock, PollFlags::IN),
            PollFd::new(&shutdown, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return End::Protocol(format!("poll failed: {e}")),
        }
        if !fds[1].revents().is_empty() {
            return End::Shutdown;
        }
        let received = match transport::recv(sock, &mut buf) {
            Ok(r) => r,
            Err(TransportError::Closed) => return End::Closed,
            Err(e) => return refuse(sock, session, ErrorCode::Protocol, error_chain(&e)),
        };
        if !received.fds.is_empty() {
            let why = format!("requests carry no fds, {} attached", received.fds.len());
            drop(received.fds); // closed here: nothing a client sends is kept
            return refuse(sock, session, ErrorCode::Protocol, why);
        }
        let (header, request) = match codec::decode_request(&buf[..received.len]) {
            Ok(decoded) => decoded,
            Err(e @ CodecError::Version(_)) => {
                return refuse(sock, session, ErrorCode::Version, error_chain(&e));
            }
            Err(e) => return refuse(sock, session, ErrorCode::Protocol, error_chain(&e)),
        };
        let mut reply = broker.handle(session, header.version, request);
        loop {
            let then = reply.then;
            let why = match &reply.response {
                Response::Error { message, .. } if then == Then::Close => message.clone(),
                _ => String::new(),
            };
            if let Err(e) = send(sock, session, reply) {
                return End::Protocol(format!("reply not delivered: {e}"));
            }
            match then {
                Then::Continue => break,
                Then::Close => return End::Protocol(why),
                Then::Upgrade => {
                    // Returns only if the exec failed: tell the requester, keep serving.
                    let Err(why) = broker.upgrade();
                    reply = Reply::error(ErrorCode::Internal, format!("upgrade failed: {why}"));
                }
            }
        }
    }
}

fn send(sock: &OwnedFd, session: &Session, reply: Reply) -> Result<(), String> {
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
fn refuse(sock: &OwnedFd, session: &Session, code: ErrorCode, message: String) -> End {
    let _ = send(sock, session, Reply::error(code, message.clone()));
    End::Protocol(message)
}
