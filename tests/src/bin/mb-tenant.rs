//! Test helper: a tenant trying to reach memory it should not, driven by arguments.
//!
//! ```text
//! mb-tenant SOCKET attack NAME ro|rw   open NAME, then try to write it by every route a holder
//!                                      has: one line per route, "ROUTE ok" or "ROUTE errno N",
//!                                      then "done"
//! mb-tenant SOCKET scribble NAME       open NAME rw, map it, release it keeping the fd and the
//!                                      mapping, print "released", then fill the mapping with
//!                                      0xA5 over and over, printing "pass N" after each pass
//! mb-tenant SOCKET keep NAME           open NAME rw, release it keeping the fd, print
//!                                      "released"; then for each stdin line "remap": map the
//!                                      kept fd anew and write 0xA5 over it ("remap ok" or
//!                                      "remap errno N"); "write": write(2) 0xA5 over all of it
//!                                      ("write ok" or "write errno N")
//! ```
//! It waits for stdin to close (or a kill) before exiting, so the test decides when it goes.

use std::io::{BufRead, Read};
use std::os::fd::{AsFd, AsRawFd};

use membroker_client::{Client, Lease};
use rustix::fs::{FallocateFlags, Mode, OFlags, SealFlags};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, command, name, rest @ ..] = args.as_slice() else {
        panic!("usage: see source; args {args:?}");
    };
    let mut client = Client::connect(socket).expect("connect");
    let writable = command != "attack" || rest.first().is_some_and(|m| m == "rw");
    let lease = match client.open(name, writable) {
        Ok(lease) => lease,
        Err(e) => {
            println!("error {:?}: {e}", e.code());
            std::process::exit(1);
        }
    };
    match command.as_str() {
        "attack" => attack(&lease),
        "scribble" => {
            let map = lease.map().expect("map");
            client.release(name).expect("release");
            println!("released");
            for pass in 1.. {
                for offset in (0..map.len()).step_by(4096) {
                    map.write_at(offset, &[0xA5; 64]).expect("write");
                }
                println!("pass {pass}");
            }
        }
        "keep" => {
            client.release(name).expect("release");
            println!("released");
            for line in std::io::stdin().lock().lines() {
                match line.expect("read stdin").as_str() {
                    "write" => println!("{}", outcome("write", write_all(&lease))),
                    _ => println!("{}", outcome("remap", remap(&lease))),
                }
            }
        }
        other => panic!("unknown command {other}"),
    }
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn outcome(route: &str, result: rustix::io::Result<()>) -> String {
    match result {
        Ok(()) => format!("{route} ok"),
        Err(e) => format!("{route} errno {}", e.raw_os_error()),
    }
}

/// Maps the kept lease fd anew, shared and writable, and writes 0xA5 over every 4 KiB.
fn remap(lease: &Lease) -> rustix::io::Result<()> {
    let map = lease.map().map_err(|e| match e {
        membroker_client::Error::Sys { source, .. } => source,
        other => panic!("mapping failed without an errno: {other}"),
    })?;
    for offset in (0..map.len()).step_by(4096) {
        map.write_at(offset, &[0xA5; 64])
            .map_err(|_| rustix::io::Errno::IO)?;
    }
    Ok(())
}

/// Writes 0xA5 over the whole kept lease through its fd (write(2), no mapping).
fn write_all(lease: &Lease) -> rustix::io::Result<()> {
    let chunk = vec![0xA5u8; 1 << 20];
    let mut offset = 0;
    while offset < lease.size() {
        let len = chunk.len().min((lease.size() - offset) as usize);
        offset += rustix::io::pwrite(lease, &chunk[..len], offset)? as u64;
    }
    Ok(())
}

/// Every route a holder has to write its lease's memory, tried one by one.
fn attack(lease: &Lease) {
    let fd = lease.as_fd();
    let size = lease.size();
    let page = lease.page_size().bytes() as usize;
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    println!(
        "{}",
        outcome(
            "mmap-write",
            membroker_tests::sys::try_map_shared_writable(fd, page)
        )
    );
    println!(
        "{}",
        outcome("write", rustix::io::pwrite(fd, b"PWNED!", 0).map(drop))
    );
    let reopened = rustix::fs::open(
        proc_path.as_str(),
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    );
    println!(
        "{}",
        outcome("reopen-rw", reopened.as_ref().map(drop).map_err(|e| *e))
    );
    if let Ok(rw) = &reopened {
        println!(
            "{}",
            outcome(
                "reopen-rw-mmap-write",
                membroker_tests::sys::try_map_shared_writable(rw.as_fd(), page)
            )
        );
    }
    println!(
        "{}",
        outcome(
            "reopen-ro",
            rustix::fs::open(
                proc_path.as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty()
            )
            .map(drop)
        )
    );
    println!(
        "{}",
        outcome("fchmod", rustix::fs::fchmod(fd, Mode::from_raw_mode(0o666)))
    );
    println!(
        "{}",
        outcome(
            "fchown",
            rustix::fs::fchown(fd, Some(rustix::process::getuid()), None)
        )
    );
    println!(
        "{}",
        outcome(
            "fallocate-punch",
            rustix::fs::fallocate(
                fd,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                0,
                size
            )
        )
    );
    println!(
        "{}",
        outcome(
            "add-seals",
            rustix::fs::fcntl_add_seals(fd, SealFlags::WRITE)
        )
    );
    println!("{}", outcome("ftruncate", rustix::fs::ftruncate(fd, 0)));
    println!("done");
}
