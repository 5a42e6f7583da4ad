//! Test helper: many connections, or many leases, from one process (run it as a tenant).
//!
//! ```text
//! mb-flood SOCKET idle N     connect N times (or until a connect waits 2 s) and never say
//!                            Hello; print "connected K"; then
//!                            for each stdin line "check R": wait (10 s at most) until R of
//!                            them were answered or closed by the broker, print "refused K"
//!                            and "message M" (the first answer's text, if any)
//! mb-flood SOCKET hello N    connect N times, each saying Hello: print "connected OK
//!                            refused K" and "message M" (the first refusal's text, if any)
//! mb-flood SOCKET unread N   connect N times, say Hello, then send requests and never read a
//!                            reply until the broker stops taking them: print "stuffed N"
//! mb-flood SOCKET create N   on one connection, create 4 KiB leases until one is refused or
//!                            N are made: print "created K" and "message M" if one failed
//! mb-flood SOCKET hold=NAME N
//!                            open lease NAME read-only on N connections (N holders): print
//!                            "held K" (the opens answered with the lease) and "message M"
//!                            (the first other answer, if any)
//! mb-flood SOCKET poison=PREFIX N
//!                            on one connection, create N 4 KiB leases named PREFIX0, PREFIX1,
//!                            ... and report a memory error on each (as their owner): print
//!                            "poisoned K" and "message M" if a create or a report failed
//! ```
//! mb-flood ADDR tcp N       connect N times to the TCP address ADDR (host:port), half of
//!                            them sending nothing, half the start of an HTTP request they
//!                            never finish; print "connected K" (stopping at the first connect
//!                            that takes 2 s); then for each stdin line "check": print
//!                            "closed K" (how many the server has closed)
//! ```
//! Then it keeps everything open until stdin closes (or a kill).

use std::io::BufRead;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use membroker_client::codec::{self, MAX_MSG_SIZE};
use membroker_client::proto::{PROTOCOL_MAX, PROTOCOL_MIN, Request, Response};
use membroker_client::{Client, CreateLease, transport};
use rustix::event::{PollFd, PollFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use rustix::process::{Resource, Rlimit};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, mode, count] = args.as_slice() else {
        panic!(
            "usage: mb-flood SOCKET|ADDR idle|hello|unread|create|hold=NAME|tcp N; args {args:?}"
        );
    };
    let count: usize = count.parse().expect("N");
    let limit = rustix::process::getrlimit(Resource::Nofile);
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )
    .expect("raise RLIMIT_NOFILE");
    let mut stdin = std::io::stdin().lock().lines();
    // Kept until stdin closes.
    let mut _kept: (Vec<OwnedFd>, Option<Client>) = (Vec::new(), None);
    match mode.as_str() {
        "idle" => {
            // Until one connect waits more than 2 s (the broker's backlog is full).
            let socks: Vec<OwnedFd> = (0..count).map_while(|_| try_connect(socket)).collect();
            println!("connected {}", socks.len());
            while let Some(Ok(line)) = stdin.next() {
                let want: usize = line
                    .strip_prefix("check ")
                    .and_then(|n| n.parse().ok())
                    .expect("check R");
                let (refused, message) = answered(&socks, want);
                println!("refused {refused}");
                if let Some(message) = message {
                    println!("message {message}");
                }
            }
            return;
        }
        "hello" => {
            let (mut ok, mut refused, mut first) = (Vec::new(), 0, None);
            for _ in 0..count {
                let sock = connect(socket);
                match hello(&sock) {
                    Ok(()) => ok.push(sock),
                    Err(message) => {
                        refused += 1;
                        first.get_or_insert(message);
                    }
                }
            }
            println!("connected {} refused {refused}", ok.len());
            if let Some(message) = first {
                println!("message {message}");
            }
            _kept.0 = ok;
        }
        "unread" => {
            let socks: Vec<OwnedFd> = (0..count).map(|_| connect(socket)).collect();
            for sock in &socks {
                hello(sock).expect("hello");
            }
            let df = codec::encode_request(PROTOCOL_MAX, &Request::Df).expect("encode");
            for sock in &socks {
                stuff(sock, &df);
            }
            println!("stuffed {}", socks.len());
            _kept.0 = socks;
        }
        "create" => {
            let mut client = Client::connect(socket).expect("connect");
            let uid = rustix::process::getuid().as_raw();
            let mut made = 0;
            let mut failed = None;
            while made < count {
                match client.create(CreateLease::new(format!("flood-{uid}-{made}"), 4096)) {
                    Ok(lease) => {
                        drop(lease); // the broker keeps its own fd; the holder's is not needed
                        made += 1;
                    }
                    Err(e) => {
                        failed = Some(format!(
                            "{}: {e}",
                            e.code().map_or("None".into(), |c| format!("{c:?}"))
                        ));
                        break;
                    }
                }
            }
            println!("created {made}");
            if let Some(message) = failed {
                println!("message {message}");
            }
            _kept.1 = Some(client);
        }
        poison if poison.starts_with("poison=") => {
            let prefix = &poison["poison=".len()..];
            let mut client = Client::connect(socket).expect("connect");
            let (mut poisoned, mut failed) = (0, None);
            while poisoned < count {
                let name = format!("{prefix}{poisoned}");
                let made = client
                    .create(CreateLease::new(name.as_str(), 4096))
                    .and_then(|_lease| client.report_poison(&name, 0, 1));
                if let Err(e) = made {
                    failed = Some(format!("{name}: {e}"));
                    break;
                }
                poisoned += 1;
            }
            println!("poisoned {poisoned}");
            if let Some(message) = failed {
                println!("message {message}");
            }
            _kept.1 = Some(client);
        }
        hold if hold.starts_with("hold=") => {
            let name = &hold["hold=".len()..];
            let open = Request::Open {
                name: name.into(),
                writable: false,
            };
            let open = codec::encode_request(PROTOCOL_MAX, &open).expect("encode");
            let (mut held, mut first) = (Vec::new(), None);
            for _ in 0..count {
                let sock = connect(socket);
                hello(&sock).expect("hello");
                transport::send(rustix::fd::AsFd::as_fd(&sock), &open, &[]).expect("send open");
                // The lease's fd that comes with the answer is closed at once: the connection
                // is the holder.
                match read_answer(&sock) {
                    Some(Response::Lease(_)) => held.push(sock),
                    other => {
                        first.get_or_insert(format!("{other:?}"));
                    }
                }
            }
            println!("held {}", held.len());
            if let Some(message) = first {
                println!("message {message}");
            }
            _kept.0 = held;
        }
        "tcp" => {
            let addr: std::net::SocketAddr = socket.parse().expect("ADDR: host:port");
            let socks: Vec<OwnedFd> = (0..count)
                .map_while(|i| {
                    let mut sock =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
                    if i % 2 == 1 {
                        // Slowloris: a request line, then never the end of the headers.
                        std::io::Write::write_all(&mut sock, b"GET /metrics HTTP/1.1\r\nX-A: ")
                            .ok()?;
                    }
                    Some(sock.into())
                })
                .collect();
            println!("connected {}", socks.len());
            while let Some(Ok(line)) = stdin.next() {
                assert_eq!(line, "check", "only \"check\"");
                println!("closed {}", ready(&socks).len());
            }
            return;
        }
        other => panic!("unknown mode {other:?}"),
    }
    for line in stdin {
        if line.is_err() {
            break;
        }
    }
}

fn connect(path: &str) -> OwnedFd {
    try_connect(path).expect("connect")
}

/// A connection, `None` if the broker did not take it within 2 s.
fn try_connect(path: &str) -> Option<OwnedFd> {
    let addr = SocketAddrUnix::new(path).expect("socket path");
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socket");
    let timeout = rustix::net::sockopt::Timeout::Send;
    rustix::net::sockopt::set_socket_timeout(&sock, timeout, Some(Duration::from_secs(2)))
        .expect("SO_SNDTIMEO");
    match rustix::net::connect(&sock, &addr) {
        Ok(()) => Some(sock),
        Err(rustix::io::Errno::AGAIN) => None,
        Err(e) => panic!("connect: {e}"),
    }
}

/// Sends `msg` until the broker has taken no more for 90 ms.
fn stuff(sock: &OwnedFd, msg: &[u8]) {
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    let mut refused = 0;
    for _ in 0..100_000 {
        match rustix::net::send(sock, msg, flags) {
            Ok(_) => refused = 0,
            Err(rustix::io::Errno::AGAIN) if refused < 3 => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(30));
            }
            Err(_) => return,
        }
    }
}

/// Says Hello; `Err` with the broker's message if it refused.
fn hello(sock: &OwnedFd) -> Result<(), String> {
    let hello = Request::Hello {
        min_version: PROTOCOL_MIN,
        max_version: PROTOCOL_MAX,
        client: "mb-flood".into(),
    };
    let msg = codec::encode_request(PROTOCOL_MIN, &hello).expect("encode");
    // A broker that refused the connection at once has closed it: its reason is still there.
    let sent = transport::send(rustix::fd::AsFd::as_fd(sock), &msg, &[]);
    match read_answer(sock) {
        Some(Response::Hello { .. }) => Ok(()),
        Some(Response::Error { code, message }) => Err(format!("{code:?}: {message}")),
        Some(other) => Err(format!("unexpected {other:?}")),
        None => Err(format!("closed without an answer (send: {sent:?})")),
    }
}

/// The broker's next message on `sock`, `None` if it closed the connection.
fn read_answer(sock: &OwnedFd) -> Option<Response> {
    let mut buf = vec![0u8; MAX_MSG_SIZE + 1];
    let received = transport::recv(sock, &mut buf).ok()?;
    codec::decode_response(&buf[..received.len])
        .ok()
        .map(|(_, r)| r)
}

/// Waits until `want` of `socks` are readable (answered or closed by the broker); returns how
/// many are, and the first answer's text.
fn answered(socks: &[OwnedFd], want: usize) -> (usize, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = ready(socks);
        if ready.len() >= want || Instant::now() > deadline {
            let message = ready.first().map(|&i| match read_answer(&socks[i]) {
                Some(Response::Error { code, message }) => format!("{code:?}: {message}"),
                Some(other) => format!("unexpected {other:?}"),
                None => "closed without an answer".into(),
            });
            return (ready.len(), message);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Which of `socks` are readable now: answered, or closed by the other end.
fn ready(socks: &[OwnedFd]) -> Vec<usize> {
    let mut fds: Vec<PollFd<'_>> = socks
        .iter()
        .map(|s| PollFd::new(s, PollFlags::IN))
        .collect();
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&now)).ok();
    fds.iter()
        .enumerate()
        .filter(|(_, fd)| !fd.revents().is_empty())
        .map(|(i, _)| i)
        .collect()
}
