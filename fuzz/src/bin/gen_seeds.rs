//! Writes the seed corpora, `corpus/<target>/`, from valid messages and records: a few small
//! files per target. Re-run after a protocol or journal format change:
//! `cargo run --manifest-path fuzz/Cargo.toml --bin gen_seeds`.

use std::path::Path;

use membroker::journal::{DirRecord, LeaseRecord, Record};
use membroker_client::PageSize;
use membroker_client::codec::{encode_request, encode_response};
use membroker_client::proto::{
    BindLabel, CreateLease, DirInfo, ErrorCode, Extent, HolderInfo, LeaseInfo, LeaseState,
    LeaseTotals, Mkdir, PROTOCOL_MAX, PoisonInfo, PoisonedLease, PoolInfo, PoolKind,
    QuarantineAfter, QuarantineInfo, QuotaInfo, Request, Response,
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
        label: Some("libvirt-6f1c0a7e-1b2d-4c3e-9f00-0123456789ab".into()),
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
            node: Some(1),
            label: BindLabel::Named("libvirt-1234".into()),
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
        Request::Mkdir(Mkdir {
            path: "tenant/vm1".into(),
            mode: 0o1750,
            owner: Some(1000),
            group: Some(50),
            parents: true,
        }),
        Request::Chmod {
            name: "tenant".into(),
            mode: 0o755,
        },
        Request::Chown {
            name: "tenant/vm1/ram0".into(),
            uid: None,
            gid: Some(50),
        },
        Request::Dirs {
            prefix: "tenant".into(),
            after: None,
        },
        Request::Quota,
        Request::Quarantine,
        Request::ClearQuarantine {
            pool: "dax".into(),
            start: 1 << 32,
            len: 2 << 20,
        },
        Request::Describe {
            name: "tenant/vm1/ram0".into(),
        },
        Request::QuotaPage {
            after: Some(("uid".into(), 1000)),
        },
        Request::QuarantinePage {
            after: Some(QuarantineAfter {
                pool: "dax".into(),
                range: None,
                lease: Some(("vm1".into(), 1)),
            }),
        },
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
            node: Some(1),
            kernel_overhead: 4 << 20,
            broker_metadata: 600,
        }]),
        Response::Error {
            code: ErrorCode::NoSpace,
            message: "no".into(),
        },
        Response::Dirs {
            dirs: vec![DirInfo {
                path: "uid-1000".into(),
                uid: 1000,
                gid: 1000,
                mode: 0o700,
                auto: true,
            }],
            more: false,
        },
        Response::Quota(vec![QuotaInfo {
            scope: "uid".into(),
            id: 1000,
            label: "uid 1000".into(),
            default: false,
            bytes_limit: Some(8 << 30),
            leases_limit: None,
            bytes_used: 2 << 20,
            leases_used: 1,
        }]),
        Response::Quarantine(vec![QuarantineInfo {
            pool: "dax".into(),
            kind: PoolKind::Devdax,
            ranges: vec![Extent {
                start: 1 << 32,
                len: 2 << 20,
            }],
            leases: vec![PoisonedLease {
                name: "vm1".into(),
                poison: vec![PoisonInfo {
                    offset: 0,
                    len: 2 << 20,
                }],
            }],
        }]),
        Response::Described {
            info: lease_info(),
            totals: LeaseTotals {
                holders: 12_000,
                extents: 1,
                poison: 0,
            },
        },
        Response::QuotaPage {
            quotas: vec![QuotaInfo {
                scope: "default".into(),
                id: 0,
                label: "default".into(),
                default: true,
                bytes_limit: None,
                leases_limit: Some(4),
                bytes_used: 0,
                leases_used: 0,
            }],
            more: true,
        },
        Response::QuarantinePage {
            pools: vec![QuarantineInfo {
                pool: "mem".into(),
                kind: PoolKind::Memfd,
                ranges: Vec::new(),
                leases: vec![PoisonedLease {
                    name: "vm2".into(),
                    poison: vec![PoisonInfo {
                        offset: 4096,
                        len: 4096,
                    }],
                }],
            }],
            more: false,
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
        label: id.is_multiple_of(2).then(|| format!("membroker-test-{id}")),
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
        Record::Dir(DirRecord {
            path: "tenant".into(),
            uid: 0,
            gid: 0,
            mode: 0o1777,
            auto: false,
        }),
        Record::Meta {
            id: 3,
            uid: 1001,
            gid: 50,
            mode: 0o640,
        },
        Record::Rmdir {
            path: "tenant".into(),
        },
        Record::Unquarantine {
            pool: "dax".into(),
            start: 1 << 32,
            len: 1 << 20,
        },
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

/// Extent operation programs (see `membroker_fuzz::extents`): a region header (unit shift,
/// cells as u16, base kind and its byte), then ops; one op per line, opcode first (0–1 allocate,
/// 2 claim, 3–4 release, 5–6 quarantine, 7 query).
fn extent_programs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        // 2 MiB cells, 64 of them from 0: the broker's order of use.
        (
            "alloc-poison-release",
            [
                &[21, 64, 0, 2, 0][..],
                &[0, 0, 8, 1],           // allocate 8 × 2 MiB at 2 MiB
                &[1, 4, 4, 1, 1],        // allocate 32 MiB at 32 MiB
                &[5, 2, 1, 0],           // quarantine cell 2: inside the first lease
                &[6, 40, 2, 0],          // quarantine cells 40-41: free
                &[3, 1, 0],              // release the first lease (its poison is quarantined)
                &[4, 0, 0, 0, 50, 1, 0], // release cell 50: free, refused
                &[0, 0, 10, 1],          // allocate 10 × 2 MiB at 2 MiB
                &[7, 1],                 // free at 1 GiB
                &[3, 1, 0],              // release the rest
                &[3, 1, 0],
            ]
            .concat(),
        ),
        // 1 MiB cells, 100 of them from 3 MiB: claim as a restart does, then allocate around.
        (
            "claim-unaligned-base",
            [
                &[20, 100, 0, 2, 3][..],
                &[2, 1, 10, 5, 0, 30, 2, 0], // claim cells 10-14 and 30-31
                &[2, 0, 12, 4, 0],           // claim cells 12-15: partly leased, refused
                &[5, 50, 1, 0],              // quarantine cell 50
                &[0, 0, 20, 1],              // allocate 20 × 2 MiB at 2 MiB
                &[1, 0, 3, 0],               // allocate 3 × 2 MiB + 1 MiB: bad size
                &[3, 1, 0],                  // release the claimed device
                &[7, 5, 2],                  // free at 4 MiB
            ]
            .concat(),
        ),
        // 1 GiB cells right under u64::MAX.
        (
            "top-of-u64",
            [
                &[30, 16, 0, 1, 1][..],
                &[0, 1, 4, 1],       // allocate 4 GiB at 1 GiB
                &[5, 0, 0, 0xff, 2], // quarantine past u64::MAX: refused
                &[5, 3, 1, 0],       // quarantine cell 3
                &[3, 1, 0],          // release
                &[7, 0],             // free at a device page size (here a cell, 1 GiB)
            ]
            .concat(),
        ),
    ]
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).expect("create corpus folder");
    std::fs::write(dir.join(name), data).expect("write seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (i, req) in requests().iter().enumerate() {
        let msg = encode_request(PROTOCOL_MAX, req).expect("seed request encodes");
        write(
            &root.join("codec_request"),
            &format!("kind-{:02}", i + 1),
            &msg,
        );
    }
    for (i, resp) in responses().iter().enumerate() {
        let msg = encode_response(PROTOCOL_MAX, resp).expect("seed response encodes");
        write(
            &root.join("codec_response"),
            &format!("kind-{:02}", i + 1),
            &msg,
        );
    }
    // Version 1's layouts of the messages version 2 extended (a Create without a node or a
    // label).
    let mut create = requests()
        .into_iter()
        .find(|r| matches!(r, Request::Create(_)))
        .expect("a Create seed");
    if let Request::Create(c) = &mut create {
        c.node = None;
        c.label = BindLabel::Creator;
    }
    let msg = encode_request(1, &create).expect("version-1 Create encodes");
    write(&root.join("codec_request"), "create-v1", &msg);
    let df = responses()
        .into_iter()
        .find(|r| matches!(r, Response::Df(_)))
        .expect("a Df seed");
    let msg = encode_response(1, &df).expect("version-1 Df encodes");
    write(&root.join("codec_response"), "df-v1", &msg);
    for (name, data) in journals() {
        write(&root.join("journal_replay"), name, &data);
    }
    for (name, data) in extent_programs() {
        write(&root.join("extents_ops"), name, &data);
    }
    println!("seeds written to {}", root.display());
}
