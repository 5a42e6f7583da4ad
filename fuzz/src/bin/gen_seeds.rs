//! Writes the seed corpora, `corpus/<target>/`, from valid messages and records: a few small
//! files per target. Re-run after a protocol or journal format change:
//! `cargo run --manifest-path fuzz/Cargo.toml --bin gen_seeds`.

use std::path::Path;

use membroker::journal::{LeaseRecord, Record};
use membroker_client::PageSize;
use membroker_client::codec::{encode_request, encode_response};
use membroker_client::proto::{
    CreateLease, ErrorCode, Extent, HolderInfo, LeaseInfo, LeaseState, PoisonInfo, PoolInfo,
    PoolKind, Request, Response,
};
use membroker_fuzz::journal::encode_input;

fn lease_info() -> LeaseInfo {
    LeaseInfo {
        name: "t/vm1/ram0".into(),
        size: 4 << 20,
        page_size: PageSize::Huge2M,
        pool: "dax".into(),
        uid: 1000,
        gid: 1000,
        mode: 0o600,
        persistent: true,
        state: LeaseState::Held,
        created: 1_700_000_000,
        extents: vec![Extent {
            start: 1 << 30,
            len: 4 << 20,
        }],
        holders: vec![HolderInfo { pid: 42, uid: 1000 }],
        poison: vec![PoisonInfo {
            offset: 0,
            len: 2 << 20,
        }],
        writable: true,
        device: Some("dax0.1".into()),
    }
}

fn requests() -> Vec<Request> {
    vec![
        Request::Hello {
            min_version: 1,
            max_version: 1,
            client: "fuzz".into(),
        },
        Request::Create(CreateLease {
            name: "t/vm1/ram0".into(),
            size: 1 << 30,
            page_size: Some(PageSize::Huge1G),
            pool: Some("dax".into()),
            persistent: true,
            mode: 0o640,
            owner: Some(1000),
        }),
        Request::Open {
            name: "t/vm1/ram0".into(),
            writable: false,
        },
        Request::Release { name: "a".into() },
        Request::Remove { name: "b".into() },
        Request::Stat { name: "c".into() },
        Request::List {
            prefix: "t/".into(),
            after: Some("t/vm1".into()),
        },
        Request::Df,
        Request::ReportPoison {
            name: "t/vm1/ram0".into(),
            offset: 0x20_0000,
            len: 0x1000,
        },
        Request::Upgrade,
    ]
}

fn responses() -> Vec<Response> {
    vec![
        Response::Hello {
            version: 1,
            server: "membroker".into(),
        },
        Response::Lease(lease_info()),
        Response::Ok,
        Response::Stat(lease_info()),
        Response::List {
            leases: vec![lease_info(), lease_info()],
            more: true,
        },
        Response::Df(vec![PoolInfo {
            name: "default".into(),
            kind: PoolKind::Devdax,
            page_size: PageSize::Base4K,
            size: 1 << 34,
            used: 1 << 30,
            free: 15 << 30,
            scrubbing: 0,
            quarantined: 2 << 20,
            leases: 1,
            default: true,
        }]),
        Response::Error {
            code: ErrorCode::NoSpace,
            message: "no".into(),
        },
    ]
}

fn lease(id: u64) -> Record {
    Record::Lease(LeaseRecord {
        id,
        name: format!("vm{id}"),
        pool: "dax".into(),
        size: 2 << 20,
        page_size: PageSize::Huge2M,
        uid: 1000,
        gid: 1000,
        mode: 0o600,
        persistent: true,
        created: 1_700_000_000,
        extents: vec![Extent {
            start: id << 21,
            len: 2 << 20,
        }],
        device: Some(format!("dax0.{id}")),
    })
}

fn journals() -> Vec<(&'static str, Vec<u8>)> {
    let all = encode_input(&[
        lease(1),
        lease(2),
        Record::Poison {
            id: 2,
            offset: 0,
            len: 2 << 20,
        },
        Record::Unnamed { id: 2 },
        lease(3),
        Record::Scrub { id: 3 },
        Record::Quarantine {
            pool: "dax".into(),
            start: 1 << 32,
            len: 2 << 20,
        },
        Record::Freed { id: 1 },
    ]);
    // The same journal as a raw file (mode byte 0): the CRCs are the real ones.
    let mut raw = vec![0u8];
    raw.extend(membroker_fuzz::journal::file_contents(&all));
    let mut torn = encode_input(&[lease(1)]);
    torn.extend_from_slice(br#"{"op":"freed","#);
    let mut damaged = encode_input(&[lease(1)]);
    damaged.extend_from_slice(b"!00000000 {\"op\":\"freed\",\"id\":1}\n");
    damaged.extend_from_slice(&encode_input(&[lease(2)])[1..]);
    vec![
        ("all-records", all),
        ("raw-file", raw),
        ("torn-tail", torn),
        ("damaged-middle", damaged),
        ("unknown-lease", encode_input(&[Record::Scrub { id: 7 }])),
        ("empty", vec![1]),
    ]
}

/// Extent operation programs (see `membroker_fuzz::extents`): region header, then ops.
fn extent_programs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        // unit 2^21 (2 MiB), 64 cells, low base; allocate, release, take_dirty, scrubbed.
        (
            "alloc-release-scrub",
            vec![21, 64, 0, 2, 0, 0, 4, 1, 3, 3, 0, 0, 5, 1, 0, 6, 1, 0],
        ),
        // unit 1 MiB, 100 cells at base 3 MiB: quarantine, claim, allocate at 2 MiB.
        (
            "unaligned-base",
            vec![20, 100, 0, 3, 3, 7, 5, 2, 1, 2, 4, 3, 1, 0, 0, 4, 1],
        ),
        // unit 1 GiB right under u64::MAX.
        ("top-of-u64", vec![30, 16, 0, 1, 1, 0, 1, 2, 1, 9, 4, 9, 0]),
    ]
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).expect("create corpus folder");
    std::fs::write(dir.join(name), data).expect("write seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (i, req) in requests().iter().enumerate() {
        let msg = encode_request(1, req).expect("seed request encodes");
        write(
            &root.join("codec_request"),
            &format!("kind-{:02}", i + 1),
            &msg,
        );
    }
    for (i, resp) in responses().iter().enumerate() {
        let msg = encode_response(1, resp).expect("seed response encodes");
        write(
            &root.join("codec_response"),
            &format!("kind-{:02}", i + 1),
            &msg,
        );
    }
    for (name, data) in journals() {
        write(&root.join("journal_replay"), name, &data);
    }
    for (name, data) in extent_programs() {
        write(&root.join("extents_ops"), name, &data);
    }
    println!("seeds written to {}", root.display());
}
