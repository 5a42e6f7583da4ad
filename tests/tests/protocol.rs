//! Hostile and malformed clients: the broker answers with an error or drops that client,
//! keeps serving everyone else, and leaks no fd.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use membroker_client::codec::{self, HEADER_LEN, MAGIC, MAX_MSG_SIZE};
use membroker_client::proto::{ErrorCode, Request, Response};
use membroker_client::{CreateLease, transport};
use membroker_tests::{TestBroker, wait_until};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

fn raw_connect(broker: &TestBroker) -> OwnedFd {
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::connect(&sock, &SocketAddrUnix::new(broker.socket()).unwrap()).unwrap();
    rustix::net::sockopt::set_socket_timeout(
        &sock,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(5)),
    )
    .unwrap();
    sock
}

fn send_raw(sock: &OwnedFd, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
}

/// What the broker did with a bad message: replied with an error code, then hung up.
#[derive(Debug, PartialEq)]
enum Outcome {
    ErrorThenClose(ErrorCode),
    Closed,
}

fn outcome(sock: &OwnedFd, what: &str) -> Outcome {
    let mut buf = vec![0u8; MAX_MSG_SIZE + 1];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap_or_else(|e| panic!("{what}: broker neither replied nor closed within 5 s: {e}"));
    if got.bytes == 0 {
        return Outcome::Closed;
    }
    let (_, resp) = codec::decode_response(&buf[..got.bytes]).expect("broker reply decodes");
    let Response::Error { code, .. } = resp else {
        panic!("expected an error, got {resp:?}")
    };
    drop(control);
    let mut space2 = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space2);
    let next = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::empty(),
    )
    .unwrap_or_else(|e| panic!("{what}: broker replied {code:?} but did not close: {e}"));
    assert_eq!(
        next.bytes, 0,
        "broker kept the connection after a protocol error"
    );
    Outcome::ErrorThenClose(code)
}

fn hello() -> Vec<u8> {
    codec::encode_request(
        1,
        &Request::Hello {
            min_version: 1,
            max_version: 1,
            client: "test".into(),
        },
    )
    .unwrap()
}

fn after_hello(broker: &TestBroker) -> OwnedFd {
    let sock = raw_connect(broker);
    send_raw(&sock, &hello(), &[]);
    let mut buf = vec![0u8; MAX_MSG_SIZE + 1];
    let got = transport::recv(&sock, &mut buf).unwrap();
    assert!(matches!(
        codec::decode_response(&buf[..got.len]).unwrap().1,
        Response::Hello { version: 1, .. }
    ));
    sock
}

fn header(version: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC.to_le_bytes());
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

#[test]
fn malformed_messages_are_refused_without_leaks() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    // A good client with a live lease, before and after the storm.
    let mut good = broker.client();
    let lease = good.create(CreateLease::new("good/ram", 4 << 20)).unwrap();
    let map = lease.map().unwrap();
    map.write_at(0, b"still here").unwrap();
    let fds_before = broker.fd_count();
    let threads_before = broker.thread_count();

    let mut seed = 0x2545f4914f6cdd1du64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let memfd = rustix::fs::memfd_create("attached", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let hello = hello();
    let mut wrong_version = hello.clone();
    wrong_version[4] = 7;
    let mut bad_reserved = hello.clone();
    bad_reserved[15] = 1;
    let mut oversize = header(1, 1, (MAX_MSG_SIZE + 64 - HEADER_LEN) as u32);
    oversize.resize(MAX_MSG_SIZE + 64, 0xab);
    let mut huge_count = header(1, 7, 11);
    huge_count.extend_from_slice(&[1, b'x', 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    let stat = codec::encode_request(
        1,
        &Request::Stat {
            name: "good/ram".into(),
        },
    )
    .unwrap();
    let bad_hello = codec::encode_request(
        1,
        &Request::Hello {
            min_version: 5,
            max_version: 9,
            client: "future".into(),
        },
    )
    .unwrap();

    let cases: Vec<(&str, bool, Vec<u8>, bool, Outcome)> = vec![
        (
            "random bytes",
            false,
            random(100),
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "random bytes after hello",
            true,
            random(3000),
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "truncated header",
            false,
            hello[..7].to_vec(),
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "header only, payload missing",
            false,
            hello[..HEADER_LEN].to_vec(),
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "oversize message",
            false,
            oversize.clone(),
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "oversize after hello",
            true,
            oversize,
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "wrong header version",
            false,
            wrong_version,
            false,
            Outcome::ErrorThenClose(ErrorCode::Version),
        ),
        (
            "no common version",
            false,
            bad_hello,
            false,
            Outcome::ErrorThenClose(ErrorCode::Version),
        ),
        (
            "reserved bits set",
            false,
            bad_reserved,
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "request before hello",
            false,
            stat.clone(),
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "second hello",
            true,
            hello.clone(),
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "fd attached to hello",
            false,
            hello.clone(),
            true,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "fd attached to stat",
            true,
            stat,
            true,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "huge string length",
            true,
            huge_count,
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
        (
            "kind 0",
            true,
            header(1, 0, 0),
            false,
            Outcome::ErrorThenClose(ErrorCode::Protocol),
        ),
    ];
    for (what, greet, bytes, with_fd, expected) in cases {
        let sock = if greet {
            after_hello(&broker)
        } else {
            raw_connect(&broker)
        };
        let fds = [memfd.as_fd(), memfd.as_fd(), memfd.as_fd()];
        send_raw(&sock, &bytes, if with_fd { &fds } else { &[] });
        assert_eq!(outcome(&sock, what), expected, "{what}");
    }
    // Clients that connect and vanish, mid-handshake or silently.
    for _ in 0..20 {
        drop(raw_connect(&broker));
        let sock = raw_connect(&broker);
        send_raw(&sock, &hello[..HEADER_LEN + 1], &[]);
        drop(sock);
    }

    let mut after = broker.client();
    let info = after.stat("good/ram").unwrap();
    assert_eq!(info.holders.len(), 1);
    let mut word = [0u8; 10];
    map.read_at(0, &mut word).unwrap();
    assert_eq!(&word, b"still here");
    drop(after);
    wait_until(
        Duration::from_secs(5),
        "connection threads to finish",
        || broker.thread_count() <= threads_before,
    );
    // `fds_before` may still count a connection that was closing when it was taken (the
    // harness's readiness probe, on a loaded machine): no leak means never more than that.
    wait_until(
        Duration::from_secs(5),
        "broker fds back to what they were before the hostile clients",
        || broker.fd_count() <= fds_before,
    );
    good.df().expect("the good client is still served");
}

#[test]
fn an_unread_reply_does_not_stall_the_broker() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let sock = after_hello(&broker);
    // Flood requests and never read a reply: the broker blocks on this client only.
    let df = codec::encode_request(1, &Request::Df).unwrap();
    rustix::net::sockopt::set_socket_timeout(
        &sock,
        rustix::net::sockopt::Timeout::Send,
        Some(Duration::from_millis(200)),
    )
    .unwrap();
    for _ in 0..2000 {
        if rustix::net::send(&sock, &df, SendFlags::NOSIGNAL).is_err() {
            break;
        }
    }
    let mut other = broker.client();
    other
        .create(CreateLease::new("other", 4096))
        .expect("other clients are served");
    drop(sock);
}

#[test]
fn many_clients_at_once() {
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let socket = broker.socket().to_path_buf();
            std::thread::spawn(move || {
                let mut client = membroker_client::Client::connect(&socket).unwrap();
                for i in 0..20 {
                    let name = format!("c{t}/l{i}");
                    let lease = client.create(CreateLease::new(&name, 1 << 20)).unwrap();
                    lease.map().unwrap().write_at(0, name.as_bytes()).unwrap();
                    client.release(&name).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let df = broker.client().df().unwrap();
    assert_eq!((df[0].used, df[0].leases), (0, 0));
}

#[test]
fn a_version_1_client_still_creates_and_reads_df() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let sock = after_hello(&broker);
    // What a version-1 client sends: Create without the trailing node (None: one 0 byte) and
    // label (Creator: variant 0, one 0 byte).
    let mut create =
        codec::encode_request(2, &Request::Create(CreateLease::new("old", 4096))).expect("encode");
    assert_eq!(create.pop(), Some(0));
    assert_eq!(create.pop(), Some(0));
    create[4..6].copy_from_slice(&1u16.to_le_bytes());
    let len = (create.len() - HEADER_LEN) as u32;
    create[8..12].copy_from_slice(&len.to_le_bytes());
    let mut buf = vec![0u8; MAX_MSG_SIZE + 1];
    send_raw(&sock, &create, &[]);
    let got = transport::recv(&sock, &mut buf).unwrap();
    assert_eq!(got.fds.len(), 1, "the lease's fd");
    let (header, resp) = codec::decode_response(&buf[..got.len]).unwrap();
    assert_eq!(header.version, 1);
    assert!(
        matches!(resp, Response::Lease(ref l) if l.name == "old"),
        "{resp:?}"
    );
    send_raw(&sock, &codec::encode_request(1, &Request::Df).unwrap(), &[]);
    let got = transport::recv(&sock, &mut buf).unwrap();
    let Response::Df(pools) = codec::decode_response(&buf[..got.len]).unwrap().1 else {
        panic!("not a Df")
    };
    assert_eq!((pools.len(), pools[0].leases), (1, 1));
    // A client of this build agrees on version 2 with the same broker.
    assert_eq!(broker.client().version(), 2);
}
