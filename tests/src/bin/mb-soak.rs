//! Test helper for the soak test (`tests/tests/soak.rs`): tenants storming the broker, or a
//! hostile client, until stdin closes; the broker may be killed and restarted all along.
//!
//! ```text
//! mb-soak SOCKET storm PREFIX SEED THREADS   THREADS clients, each looping over: create a
//!                                            persistent lease PREFIX-T-N and write its
//!                                            pattern (membroker_tests::soak_pattern); create,
//!                                            write and release a short-lived one; open one of
//!                                            its own and check its bytes; remove its oldest
//!                                            past a few. Any failure is retried on a new
//!                                            connection (the broker may be down).
//! mb-soak SOCKET hostile SEED                connections that never say Hello, garbage,
//!                                            oversized messages, requests with fds attached
//! ```
//! stdout, one event a line, printed once true:
//! ```text
//! acked NAME SIZE      NAME was acknowledged and holds its pattern
//! removing NAME        an rm of NAME is on its way: it may be gone from now on
//! corrupt NAME WHY     a lease of this client did not hold its pattern
//! done                 stdin closed, every thread stopped
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use membroker_client::codec::{self, MAX_MSG_SIZE};
use membroker_client::proto::{PROTOCOL_MIN, Request};
use membroker_client::{Client, CreateLease, transport};
use membroker_tests::{Rng, soak_pattern};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// Persistent leases a storm thread keeps before removing its oldest.
const KEEP: usize = 6;

fn event(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<std::thread::JoinHandle<()>> = match &args[1..] {
        [socket, mode, prefix, seed, threads] if mode == "storm" => {
            let threads: u64 = threads.parse().expect("THREADS");
            let seed: u64 = seed.parse().expect("SEED");
            (0..threads)
                .map(|t| {
                    let (socket, stop) = (socket.clone(), stop.clone());
                    let prefix = format!("{prefix}-{t}");
                    std::thread::spawn(move || storm(&socket, &prefix, Rng(seed ^ (t + 1)), &stop))
                })
                .collect()
        }
        [socket, mode, seed] if mode == "hostile" => {
            let (socket, stop) = (socket.clone(), stop.clone());
            let rng = Rng(seed.parse().expect("SEED"));
            vec![std::thread::spawn(move || hostile(&socket, rng, &stop))]
        }
        _ => panic!("usage: mb-soak SOCKET storm PREFIX SEED THREADS | hostile SEED; {args:?}"),
    };
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("a soak thread panicked");
    }
    event("done".into());
}

/// A client connection, retried while the broker is down (until `stop`).
fn client(socket: &str, stop: &AtomicBool) -> Option<Client> {
    while !stop.load(Ordering::SeqCst) {
        if let Ok(mut c) = Client::connect(socket) {
            // Failures are this helper's to retry: it must know what was acknowledged.
            c.set_reconnect_timeout(Duration::ZERO);
            return Some(c);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// One storm thread: leases named `PREFIX-N`.
fn storm(socket: &str, prefix: &str, mut rng: Rng, stop: &AtomicBool) {
    let mut kept: VecDeque<String> = VecDeque::new();
    let mut n = 0u64;
    let Some(mut c) = client(socket, stop) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let name = format!("{prefix}-{n}");
        let size = 4096 * (1 + rng.below(4));
        let step = match rng.below(4) {
            0 | 1 => create_persistent(&mut c, &name, size).map(|()| {
                event(format!("acked {name} {size}"));
                kept.push_back(name);
            }),
            2 => short_lived(&mut c, &name, size),
            _ => match kept.get(rng.below(kept.len() as u64) as usize) {
                Some(mine) => check(&mut c, mine),
                None => Ok(()),
            },
        };
        let step = step.and_then(|()| {
            if kept.len() <= KEEP {
                return Ok(());
            }
            let oldest = kept.pop_front().expect("more than KEEP");
            event(format!("removing {oldest}"));
            c.remove(&oldest).map_err(|e| e.to_string())
        });
        if step.is_err() {
            // The broker may be restarting: a new connection (the lease names go on).
            std::thread::sleep(Duration::from_millis(10 + rng.below(40)));
            match client(socket, stop) {
                Some(again) => c = again,
                None => return,
            }
        }
    }
}

fn create_persistent(c: &mut Client, name: &str, size: u64) -> Result<(), String> {
    let lease = c
        .create(CreateLease::new(name, size).persistent(true).mode(0o644))
        .map_err(|e| e.to_string())?;
    let map = lease.map().map_err(|e| e.to_string())?;
    map.write_at(0, &soak_pattern(name, size as usize))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn short_lived(c: &mut Client, name: &str, size: u64) -> Result<(), String> {
    let lease = c
        .create(CreateLease::new(name, size))
        .map_err(|e| e.to_string())?;
    let map = lease.map().map_err(|e| e.to_string())?;
    map.write_at(0, &[0xa5; 64]).map_err(|e| e.to_string())?;
    drop(map);
    drop(lease);
    c.release(name).map_err(|e| e.to_string())
}

/// Opens one of this thread's leases and compares its bytes with its pattern.
fn check(c: &mut Client, name: &str) -> Result<(), String> {
    let lease = c.open(name, false).map_err(|e| e.to_string())?;
    let map = lease.map().map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; map.len()];
    map.read_at(0, &mut bytes).map_err(|e| e.to_string())?;
    if bytes != soak_pattern(name, bytes.len()) {
        event(format!("corrupt {name} bytes differ from the pattern"));
    }
    drop(map);
    drop(lease);
    c.release(name).map_err(|e| e.to_string())
}

/// Floods connections and garbage until `stop`.
fn hostile(socket: &str, mut rng: Rng, stop: &AtomicBool) {
    let addr = SocketAddrUnix::new(socket).expect("socket path");
    while !stop.load(Ordering::SeqCst) {
        let mut open = Vec::new();
        for _ in 0..150 {
            let sock = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                None,
            )
            .expect("socket");
            if rustix::net::connect(&sock, &addr).is_err() {
                break; // down, or the backlog is full
            }
            let garbage: Vec<u8> = match rng.below(5) {
                0 => Vec::new(), // says nothing: closed at the Hello deadline
                1 => (0..1 + rng.below(300))
                    .map(|_| rng.next_u64() as u8)
                    .collect(),
                2 => {
                    // A real header over a payload that does not decode.
                    let mut msg = codec::encode_request(PROTOCOL_MIN, &Request::Df).unwrap();
                    msg.extend((0..40).map(|_| rng.next_u64() as u8));
                    msg
                }
                3 => vec![0x4d; MAX_MSG_SIZE + 100],
                _ => {
                    // A request with an fd attached (its own socket's).
                    let msg = codec::encode_request(PROTOCOL_MIN, &Request::Df).unwrap();
                    let _ = transport::send(sock.as_fd(), &msg, &[sock.as_fd()]);
                    Vec::new()
                }
            };
            if !garbage.is_empty() {
                let _ = transport::send(sock.as_fd(), &garbage, &[]);
            }
            open.push(sock);
        }
        std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
        drop(open);
    }
}
