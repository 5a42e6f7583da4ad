//! One client connection: handshake, then request → reply until it closes or misbehaves.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use membroker_client::codec::{self, CodecError, MAX_MSG_SIZE};
use membroker_client::proto::{ErrorCode, PROTOCOL_MAX, PROTOCOL_MIN, Request, Response};
use membroker_client::transport::{self, TransportError};
use rustix::event::{PollFd, PollFlags};

use super::broker::{Broker, Reply};
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
    match run(broker, &sock, &peer, shutdown) {
        End::Closed => tracing::debug!("client closed the connection"),
        End::Shutdown => tracing::debug!("connection closed for shutdown"),
        End::Protocol(why) => tracing::warn!(why, "protocol error; client disconnected"),
    }
    broker.disconnect(peer.conn);
}

fn run(broker: &Broker, sock: &OwnedFd, peer: &Peer, shutdown: BorrowedFd<'_>) -> End {
    let mut buf = vec![0u8; MAX_MSG_SIZE + 1];
    let mut version: Option<u16> = None;
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
            Err(e) => return refuse(sock, version, ErrorCode::Protocol, codec_text(&e)),
        };
        if !received.fds.is_empty() {
            let why = format!("requests carry no fds, {} attached", received.fds.len());
            drop(received.fds); // closed here: nothing a client sends is kept
            return refuse(sock, version, ErrorCode::Protocol, why);
        }
        let (header, request) = match codec::decode_request(&buf[..received.len]) {
            Ok(decoded) => decoded,
            Err(e @ CodecError::Version(_)) => {
                return refuse(sock, version, ErrorCode::Version, codec_text(&e));
            }
            Err(e) => return refuse(sock, version, ErrorCode::Protocol, codec_text(&e)),
        };
        let reply = match (version, request) {
            (
                None,
                Request::Hello {
                    min_version,
                    max_version,
                    client,
                },
            ) => {
                let best = max_version.min(PROTOCOL_MAX);
                if best < min_version.max(PROTOCOL_MIN) {
                    let why = format!(
                        "client speaks protocol {min_version}..={max_version}, broker {PROTOCOL_MIN}..={PROTOCOL_MAX}"
                    );
                    return refuse(sock, None, ErrorCode::Version, why);
                }
                tracing::debug!(client, version = best, "hello");
                version = Some(best);
                Reply {
                    response: Response::Hello {
                        version: best,
                        server: broker.instance().to_string(),
                    },
                    fd: None,
                }
            }
            (None, _) => {
                return refuse(
                    sock,
                    None,
                    ErrorCode::Protocol,
                    "the first message must be Hello".into(),
                );
            }
            (Some(_), Request::Upgrade) if !peer.admin => Reply::error(
                ErrorCode::PermissionDenied,
                "permission denied: only root and the admin group may upgrade the broker",
            ),
            (Some(v), Request::Upgrade) => {
                let ok = Reply {
                    response: Response::Ok,
                    fd: None,
                };
                if let Err(e) = send(sock, v, ok) {
                    return End::Protocol(format!("reply not delivered: {e}"));
                }
                // Returns only if the exec failed: tell the requester, keep serving.
                let Err(why) = broker.upgrade(peer);
                Reply::error(ErrorCode::Internal, format!("upgrade failed: {why}"))
            }
            (Some(_), Request::Hello { .. }) => {
                return refuse(
                    sock,
                    version,
                    ErrorCode::Protocol,
                    "Hello may only be the first message".into(),
                );
            }
            (Some(v), _) if header.version != v => {
                let why = format!(
                    "message at protocol {} after agreeing on {v}",
                    header.version
                );
                return refuse(sock, version, ErrorCode::Protocol, why);
            }
            (Some(_), request) => broker.handle(peer, request),
        };
        if let Err(e) = send(sock, version.unwrap_or(PROTOCOL_MIN), reply) {
            return End::Protocol(format!("reply not delivered: {e}"));
        }
    }
}

fn send(sock: &OwnedFd, version: u16, reply: Reply) -> Result<(), String> {
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

fn refuse(sock: &OwnedFd, version: Option<u16>, code: ErrorCode, message: String) -> End {
    let reply = Reply::error(code, message.clone());
    let _ = send(sock, version.unwrap_or(PROTOCOL_MIN), reply);
    End::Protocol(message)
}

fn codec_text(e: &dyn std::error::Error) -> String {
    super::error_chain(e)
}
