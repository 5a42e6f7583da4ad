use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

use proptest::prelude::*;

use super::*;

fn text() -> String {
    "up 1\n".to_string()
}

fn answer_to(request: &str) -> String {
    String::from_utf8(answer(request.as_bytes(), &text)).unwrap()
}

#[test]
fn get_and_head_metrics_get_the_text_and_its_length() {
    let get = answer_to("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        get,
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: {}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nup 1\n",
            super::super::CONTENT_TYPE
        )
    );
    let head = answer_to("HEAD /metrics?x=1 HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(
        head.ends_with("Content-Length: 5\r\nConnection: close\r\n\r\n"),
        "{head}"
    );
}

#[test]
fn other_methods_paths_and_junk_are_refused() {
    let post = answer_to("POST /metrics HTTP/1.0\r\n\r\n");
    assert!(
        post.starts_with("HTTP/1.0 405 Method Not Allowed\r\n"),
        "{post}"
    );
    assert!(
        post.contains("Allow: GET, HEAD\r\n") && post.ends_with("GET only\n"),
        "{post}"
    );
    let other = answer_to("GET /other HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.0 404 Not Found\r\n"), "{other}");
    assert!(
        other.ends_with("\r\n\r\nmetrics are at /metrics\n"),
        "{other}"
    );
    for junk in [
        "GET /metrics HTTP/9.9 extra\r\n\r\n",
        "GET /metrics\r\n\r\n",
        "\u{16}\u{3}\u{1}\r\n\r\n",
        "\r\n\r\n",
    ] {
        let reply = answer_to(junk);
        assert!(
            reply.starts_with("HTTP/1.0 400 Bad Request\r\n"),
            "{junk:?}: {reply}"
        );
    }
    let binary = answer(&[0xff; 64], &text);
    assert!(binary.starts_with(b"HTTP/1.0 400 "));
}

/// Hands out its bytes a few at a time, then says "would block" (or EOF).
struct Trickle<'a> {
    chunks: std::slice::Iter<'a, &'a [u8]>,
    eof: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.chunks.next() {
            Some(chunk) => {
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                Ok(n)
            }
            None if self.eof => Ok(0),
            None => Err(ErrorKind::WouldBlock.into()),
        }
    }
}

fn read_all(chunks: &[&[u8]], eof: bool, max: usize) -> (Got, Vec<u8>) {
    let mut trickle = Trickle {
        chunks: chunks.iter(),
        eof,
    };
    let mut request = Vec::new();
    let got = read_request(&mut trickle, &mut request, max);
    (got, request)
}

#[test]
fn a_request_is_complete_at_its_blank_line_even_across_reads() {
    let (got, _) = read_all(&[b"GET /metrics HTTP/1.0\r", b"\n\r", b"\n"], false, 8192);
    assert_eq!(got, Got::Complete(25));
    let (got, _) = read_all(&[b"GET / HTTP/1.0\n", b"\n"], false, 8192);
    assert_eq!(got, Got::Complete(16));
    let (got, request) = read_all(&[b"GET /metrics HTTP/1.0\r\n"], false, 8192);
    assert_eq!((got, request.len()), (Got::More, 23));
    let (got, _) = read_all(&[b"GET /metrics HTTP/1.0\r\n"], true, 8192);
    assert_eq!(got, Got::Closed);
}

#[test]
fn a_request_past_the_limit_is_too_long_and_never_read_further() {
    let long = [b'a'; 1000];
    let chunks = [&long[..]; 20];
    let (got, request) = read_all(&chunks, false, 4096);
    assert_eq!((got, request.len()), (Got::TooLong, 4096));
}

/// A server on a loopback port, on a thread of its own, with room for 4 connections and
/// `deadline` for each.
fn serve(deadline: Duration, render: impl Fn() -> String + Send + 'static) -> SocketAddr {
    let limits = Limits {
        connections: 4,
        deadline,
        request: 8192,
    };
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), limits, render).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    addr
}

/// Sends `request` on a new connection and reads the reply.
fn ask(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

/// Whether the server closed `stream` within `wait` (it never sends them anything).
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    match stream.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(n) => panic!("{n} bytes to a client that sent nothing"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("read: {e}"),
    }
}

#[test]
fn when_full_the_oldest_unfinished_request_makes_room() {
    let addr = serve(Duration::from_secs(60), text);
    let mut idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Let the server take them, in order.
    for stream in &mut idle {
        assert!(!closed_within(stream, Duration::from_millis(50)));
    }
    assert!(ask(addr, b"GET /metrics HTTP/1.0\r\n\r\n").ends_with("\r\n\r\nup 1\n"));
    assert!(
        closed_within(&mut idle[0], Duration::from_secs(5)),
        "the oldest"
    );
    for stream in &mut idle[1..] {
        assert!(!closed_within(stream, Duration::from_millis(50)));
    }
}

#[test]
fn a_client_that_does_not_finish_in_time_is_closed() {
    let deadline = Duration::from_millis(200);
    let addr = serve(deadline, text);
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.0\r\n").unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)));
    assert!(closed_within(&mut slow, Duration::from_secs(5)));
    // A reply nobody reads: closed at the deadline, and others are served meanwhile.
    let big = serve(deadline, || "x".repeat(16 << 20));
    let mut unread = TcpStream::connect(big).unwrap();
    unread.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    unread.shutdown(Shutdown::Write).unwrap();
    let reply = ask(big, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
    std::thread::sleep(Duration::from_millis(500));
    unread
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    let end = unread.read_to_end(&mut got);
    assert!(
        got.len() < (16 << 20)
            && (end.is_ok() || end.is_err_and(|e| e.kind() == ErrorKind::ConnectionReset)),
        "read {} bytes",
        got.len()
    );
}

/// Checks a whole reply: a status line, headers, and as many body bytes as it says (or none,
/// to a `HEAD`).
fn well_formed(reply: &[u8], head: bool) {
    let text = String::from_utf8(reply.to_vec()).expect("a reply is text");
    let (headers, body) = text.split_once("\r\n\r\n").expect("a header block");
    assert!(headers.starts_with("HTTP/1.0 "), "{headers}");
    assert!(headers.ends_with("\r\nConnection: close"), "{headers}");
    let length: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.parse().ok())
        .expect("Content-Length");
    assert!(body.len() == length || head && body.is_empty(), "{headers}");
}

proptest! {
    /// Whatever a client sends, in whatever pieces: a request, refused or answered in full,
    /// or nothing; never more than the limit read, never a panic.
    #[test]
    fn any_bytes_in_any_pieces_get_a_whole_reply_or_none(
        bytes in prop::collection::vec(
            prop_oneof![
                Just(b'\r'), Just(b'\n'), Just(b' '), Just(b'?'), any::<u8>(),
                Just(b'G'), Just(b'E'), Just(b'T'), Just(b'/'),
            ],
            0..600,
        ),
        prefix in prop_oneof![
            Just(&b""[..]), Just(&b"GET /metrics HTTP/1.1"[..]),
            Just(&b"HEAD /metrics HTTP/1.0\r\n"[..]), Just(&b"POST /x HTTP/1.1\r\n"[..]),
        ],
        cuts in prop::collection::vec(0usize..700, 0..8),
        eof in any::<bool>(),
    ) {
        let mut all = prefix.to_vec();
        all.extend_from_slice(&bytes);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(all.len())).collect();
        cuts.push(0);
        cuts.push(all.len());
        cuts.sort_unstable();
        let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &all[w[0]..w[1]]).filter(|c| !c.is_empty()).collect();
        let (got, request) = read_all(&chunks, eof, 256);
        prop_assert!(request.len() <= 256);
        match got {
            Got::Complete(len) => {
                prop_assert!(head_end(&request[..len]) == Some(len));
                well_formed(&answer(&request[..len], &text), request.starts_with(b"HEAD "));
            }
            Got::TooLong => prop_assert_eq!(request.len(), 256),
            Got::More => prop_assert!(!eof && head_end(&request).is_none()),
            Got::Closed => prop_assert!(eof && head_end(&request).is_none()),
        }
    }
}
