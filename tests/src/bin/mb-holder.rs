//! Test helper: acts as a VMM holding leases, driven by command-line arguments.
//!
//! ```text
//! mb-holder SOCKET create NAME SIZE [persistent]   create, fill with pattern 7, print "ready", wait
//! mb-holder SOCKET open NAME ro|rw [probe-dax]      open, check pattern 7 on the first page,
//!                                                   print "ok" or "error CODE: MESSAGE"; with
//!                                                   probe-dax also try every /dev/dax* and a
//!                                                   mapping past the lease, printing what happened
//! mb-holder SOCKET poison NAME ro|rw OFFSET LEN     open, report poison at OFFSET+LEN, print
//!                                                   "ok" or "error CODE: MESSAGE"
//! ```
//! It waits for stdin to close (or a kill) before exiting, so the test decides when it goes.

use std::io::Read;

use membroker_client::{Client, CreateLease};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("usage: see source; args {args:?}"))
    };
    let mut client = match Client::connect(arg(1)) {
        Ok(c) => c,
        Err(e) => {
            println!("error connect: {e}");
            std::process::exit(2);
        }
    };
    let lease = match arg(2) {
        "create" => {
            let size = membroker_client::size::parse_size(arg(5 - 1)).expect("size");
            let persistent = args.get(5).is_some_and(|a| a == "persistent");
            client.create(CreateLease::new(arg(3), size).persistent(persistent))
        }
        "open" | "poison" => client.open(arg(3), arg(4) == "rw"),
        other => panic!("unknown command {other}"),
    };
    let lease = match lease {
        Ok(lease) => lease,
        Err(e) => {
            println!("error {:?}: {e}", e.code());
            std::process::exit(1);
        }
    };
    if arg(2) == "poison" {
        let number = |i| arg(i).parse::<u64>().expect("a number");
        match client.report_poison(arg(3), number(5), number(6)) {
            Ok(()) => println!("ok"),
            Err(e) => println!("error {:?}: {e}", e.code()),
        }
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        drop(lease);
        return;
    }
    let map = lease.map().expect("map");
    let page = lease.page_size().bytes() as usize;
    if arg(2) == "create" {
        for offset in 0..page.min(map.len()) {
            map.store(offset, membroker_tests::pattern(7, offset))
                .expect("store");
        }
        println!("ready");
    } else {
        let mut first = vec![0u8; page.min(map.len())];
        map.read_at(0, &mut first).expect("read");
        let good = first
            .iter()
            .enumerate()
            .all(|(i, b)| *b == membroker_tests::pattern(7, i));
        println!("{}", if good { "ok" } else { "ok-but-pattern-differs" });
        if args.get(5).is_some_and(|a| a == "probe-dax") {
            probe_dax(&lease);
        }
    }
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// What an unprivileged holder of a device lease can and cannot do.
fn probe_dax(lease: &membroker_client::Lease) {
    let mut opened = Vec::new();
    for entry in std::fs::read_dir("/dev").expect("read /dev").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("dax") {
            match std::fs::OpenOptions::new().read(true).open(entry.path()) {
                Ok(_) => opened.push(name),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                Err(e) => panic!("open /dev/{name}: unexpected {e}"),
            }
        }
    }
    println!(
        "dax-opened {}",
        if opened.is_empty() {
            "none".to_string()
        } else {
            opened.join(",")
        }
    );
    let page = lease.page_size().bytes();
    match lease.map_range(0, lease.size() + page) {
        Ok(_) => println!("map-past-end allowed"),
        Err(_) => println!("map-past-end refused"),
    }
}
