//! The `--metrics` HTTP server: one thread, nonblocking sockets and `poll`, one request per
//! connection, answered in HTTP/1.0 with `Connection: close`.
//!
//! Any local user reaches a loopback port, so what a client may take is bounded: at most
//! [`Limits::connections`] open at once (when full, a new connection closes the oldest one
//! still sending its request), [`Limits::deadline`] to send the request and again to take the
//! reply, [`Limits::request`] bytes of request line and headers. A flood of idle connections
//! costs the broker no thread and at most that many fds, and a scraper is still answered.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

/// What the server lets its clients take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Connections open at once.
    pub connections: usize,
    /// Time to send the request line and headers, counted from the accept; then as long
    /// again to take the reply.
    pub deadline: Duration,
    /// Bytes of request line and headers.
    pub request: usize,
}

/// The limits of `serve --metrics`: a few scrapers need a few connections, a scrape's
/// request is a few hundred bytes and comes at once.
pub(super) const LIMITS: Limits = Limits {
    connections: 64,
    deadline: Duration::from_secs(5),
    request: 8192,
};

/// How long accepting pauses after it failed for want of fds or memory (the pending
/// connection stays in the backlog, and `poll` would report it again at once).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// `Content-Type` of the error replies.
const TEXT: &str = "text/plain; charset=utf-8";

/// Where a connection is.
enum Phase {
    /// Sending its request: what came so far.
    Request(Vec<u8>),
    /// Taking the reply: all of it, and how much is sent.
    Reply { bytes: Vec<u8>, sent: usize },
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    /// When it is closed, done or not.
    deadline: Instant,
}

/// Whether a connection stays after a step.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Open,
    Done,
}

/// The listener, the connections in the order they were accepted, and what makes the text.
pub(super) struct Server<R> {
    listener: TcpListener,
    conns: Vec<Conn>,
    limits: Limits,
    render: R,
    /// Accepting waits until then after a failure.
    accept_after: Option<Instant>,
}

impl<R: Fn() -> String> Server<R> {
    pub fn bind(addr: SocketAddr, limits: Limits, render: R) -> std::io::Result<Server<R>> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Server {
            listener,
            conns: Vec::new(),
            limits,
            render,
            accept_after: None,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves for ever.
    pub fn run(mut self) {
        loop {
            self.turn();
        }
    }

    /// Closes the connections past their deadline, waits for one to be ready (or the next
    /// deadline), and serves what is ready.
    fn turn(&mut self) {
        let now = Instant::now();
        self.conns.retain(|c| c.deadline > now);
        if self.accept_after.is_some_and(|t| t <= now) {
            self.accept_after = None;
        }
        let accepting = self.accept_after.is_none() && self.may_accept();
        let wake = self
            .conns
            .iter()
            .map(|c| c.deadline)
            .chain(self.accept_after)
            .min();
        let timeout = wake.and_then(|t| Timespec::try_from(t.saturating_duration_since(now)).ok());
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(self.conns.len() + 1);
        if accepting {
            fds.push(PollFd::new(&self.listener, PollFlags::IN));
        }
        fds.extend(self.conns.iter().map(|c| {
            let events = match c.phase {
                Phase::Request(_) => PollFlags::IN,
                Phase::Reply { .. } => PollFlags::OUT,
            };
            PollFd::new(&c.stream, events)
        }));
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return,
            Err(e) => {
                // Only ENOMEM is possible here: wait and try again.
                tracing::warn!(error = %e, "metrics server: poll failed");
                std::thread::sleep(ACCEPT_BACKOFF);
                return;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|fd| !fd.revents().is_empty()).collect();
        drop(fds);
        let (listener_ready, conns_ready) = ready.split_at(usize::from(accepting));
        let mut ready = conns_ready.iter();
        let (limits, render) = (&self.limits, &self.render);
        self.conns.retain_mut(|conn| {
            !ready.next().copied().unwrap_or(false) || step(conn, limits, render) == Step::Open
        });
        if listener_ready.first().copied().unwrap_or(false) {
            self.accept();
        }
    }

    /// Whether a new connection may come in: there is room, or one still sending its request
    /// to close for it.
    fn may_accept(&self) -> bool {
        self.conns.len() < self.limits.connections
            || self
                .conns
                .iter()
                .any(|c| matches!(c.phase, Phase::Request(_)))
    }

    /// Takes the connections waiting, as long as there is room and at most as many as fit,
    /// so that a stream of new ones does not starve those open; each is served at once as far
    /// as it can be (a scraper's request is usually there already).
    fn accept(&mut self) {
        for _ in 0..self.limits.connections {
            if !self.may_accept() {
                return;
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the broker's own limits come first.
                    tracing::warn!(error = %e, "metrics server: cannot accept; pausing");
                    self.accept_after = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            };
            if self.conns.len() >= self.limits.connections {
                let oldest = self
                    .conns
                    .iter()
                    .position(|c| matches!(c.phase, Phase::Request(_)));
                if let Some(i) = oldest {
                    self.conns.remove(i);
                }
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let mut conn = Conn {
                stream,
                phase: Phase::Request(Vec::new()),
                deadline: Instant::now() + self.limits.deadline,
            };
            if step(&mut conn, &self.limits, &self.render) == Step::Open {
                self.conns.push(conn);
            }
        }
    }
}

/// Reads what the client sent or sends what is left of the reply, without waiting.
fn step(conn: &mut Conn, limits: &Limits, render: &impl Fn() -> String) -> Step {
    if let Phase::Request(request) = &mut conn.phase {
        match read_request(&mut conn.stream, request, limits.request) {
            Got::More => return Step::Open,
            Got::Closed => return Step::Done,
            Got::Complete(len) => {
                let bytes = answer(&request[..len], render);
                conn.phase = Phase::Reply { bytes, sent: 0 };
            }
            Got::TooLong => {
                let bytes = reply(Status::TooLarge, TEXT, "request too long\n", true);
                conn.phase = Phase::Reply { bytes, sent: 0 };
            }
        }
        conn.deadline = Instant::now() + limits.deadline;
    }
    let Phase::Reply { bytes, sent } = &mut conn.phase else {
        return Step::Open;
    };
    while *sent < bytes.len() {
        match conn.stream.write(&bytes[*sent..]) {
            Ok(0) => return Step::Done,
            Ok(n) => *sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Open,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Step::Done,
        }
    }
    Step::Done
}

/// What reading a request came to.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    /// Not all there yet.
    More,
    /// The request line and headers are the first `len` bytes.
    Complete(usize),
    /// Past the size limit without an end.
    TooLong,
    /// Closed (or failed) before the end of the request.
    Closed,
}

/// Reads what `stream` has, up to `max` bytes in all, and says whether the request is there.
fn read_request(stream: &mut impl std::io::Read, request: &mut Vec<u8>, max: usize) -> Got {
    let mut chunk = [0u8; 1024];
    loop {
        let room = max.saturating_sub(request.len()).min(chunk.len());
        if room == 0 {
            return Got::TooLong;
        }
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Got::Closed,
            Ok(n) => {
                // The end may straddle two reads: look from a little before the new bytes.
                let from = request.len().saturating_sub(3);
                request.extend_from_slice(&chunk[..n]);
                if let Some(len) = head_end(&request[from..]) {
                    return Got::Complete(from + len);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Got::More,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Got::Closed,
        }
    }
}

/// The length of the request line and headers in `bytes`, up to the blank line that ends
/// them (`\r\n\r\n`, or `\n\n` from a lax client), if it is there.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    crlf.into_iter().chain(lf).min()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    TooLarge,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::TooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// The reply to `request` (its request line and headers): the text for `GET` or `HEAD
/// /metrics`, 405 for another method there, 404 for another path, 400 if it is not HTTP/1.x.
fn answer(request: &[u8], render: &impl Fn() -> String) -> Vec<u8> {
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let parts: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return reply(Status::BadRequest, TEXT, "not an HTTP/1 request\n", true);
    };
    if !version.starts_with(b"HTTP/1.") {
        return reply(Status::BadRequest, TEXT, "not an HTTP/1 request\n", true);
    }
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    let body = *method != b"HEAD";
    match (*method, path) {
        (b"GET" | b"HEAD", b"/metrics") => reply(Status::Ok, super::CONTENT_TYPE, &render(), body),
        (_, b"/metrics") => reply(Status::MethodNotAllowed, TEXT, "GET only\n", body),
        _ => reply(Status::NotFound, TEXT, "metrics are at /metrics\n", body),
    }
}

/// A whole reply; `body` false (for `HEAD`) leaves the body out but not its length.
fn reply(status: Status, content_type: &str, text: &str, body: bool) -> Vec<u8> {
    let allow = if status == Status::MethodNotAllowed {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut bytes = format!(
        "HTTP/1.0 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        status.line(),
        text.len()
    )
    .into_bytes();
    if body {
        bytes.extend_from_slice(text.as_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests;
