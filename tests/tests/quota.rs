//! Quotas (per uid, per group, the default) and the limits on poison reports, against the
//! real broker and CLI. The quota tests switch to other uids (root: the `privileged` feature).

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use membroker_client::proto::PoisonInfo;
use membroker_client::{CreateLease, ErrorCode};
use membroker_tests::{Helper, TestBroker, bin_path, stderr_err, stdout_ok};

const MIB: u64 = 1 << 20;

fn as_user(broker: &TestBroker, uid: u32, gid: u32, args: &[&str]) -> Output {
    broker
        .cli()
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run membroker CLI")
}

fn quotas_json(out: &Output) -> Vec<serde_json::Value> {
    serde_json::from_str::<Vec<serde_json::Value>>(&stdout_ok(out)).expect("quota --json")
}

/// `(label, bytes_used, leases_used)` of each quota shown.
fn usage(out: &Output) -> Vec<(String, u64, u64)> {
    quotas_json(out)
        .iter()
        .map(|q| {
            (
                q["label"].as_str().unwrap().to_string(),
                q["bytes_used"].as_u64().unwrap(),
                q["leases_used"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn assert_root() {
    assert!(
        rustix::process::getuid().is_root(),
        "this test must run as root (it switches to uids 1000 and 1001)"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn quotas_refuse_creates_show_usage_and_survive_a_restart() {
    assert_root();
    let broker = TestBroker::start(&[
        "--pool",
        "memfd:t:64M",
        "--socket-group",
        "1000",
        "--no-sync",
        "--quota",
        "uid:1000:bytes=8M,leases=4",
        "--quota",
        "gid:1000:leases=3",
        "--quota",
        "default:bytes=4M",
    ]);
    let create = |broker: &TestBroker, uid, name: &str, size: &str| {
        as_user(broker, uid, 1000, &["create", name, "--size", size])
    };
    stdout_ok(&create(&broker, 1000, "u1000/a", "6M"));
    let err = stderr_err(&create(&broker, 1000, "u1000/b", "4M"));
    assert!(
        err.contains("lease u1000/b: quota of uid 1000 is 8 MiB, 6 MiB used, 4 MiB asked"),
        "{err}"
    );
    // uid 1001 has no rule of its own: the default limits it, on its own.
    let err = stderr_err(&create(&broker, 1001, "u1001/a", "8M"));
    assert!(
        err.contains("quota of uid 1001 is 4 MiB, 0 B used, 8 MiB asked"),
        "{err}"
    );
    stdout_ok(&create(&broker, 1001, "u1001/a", "2M"));
    stdout_ok(&create(&broker, 1000, "u1000/c", "1M"));
    // Three leases of group 1000 now: the group's quota refuses a fourth.
    let err = stderr_err(&create(&broker, 1000, "u1000/d", "1M"));
    assert!(
        err.contains("quota of gid 1000 is 3 leases, 3 used, 1 more asked"),
        "{err}"
    );
    let mine = usage(&as_user(&broker, 1000, 1000, &["quota", "--json"]));
    assert_eq!(
        mine,
        vec![
            ("uid 1000".to_string(), 7 * MIB, 2),
            ("gid 1000".to_string(), 9 * MIB, 3)
        ],
        "a user sees only the quotas that limit it"
    );
    let table = stdout_ok(&as_user(&broker, 1001, 1000, &["quota"]));
    assert!(table.contains("uid 1001 (default)"), "{table}");
    assert!(!table.contains("uid 1000"), "{table}");
    let all = usage(&broker.run_cli(&["quota", "--json"]));
    // uids, then groups, then the default rule.
    let expected = vec![
        ("uid 1000".to_string(), 7 * MIB, 2),
        ("uid 1001".to_string(), 2 * MIB, 1),
        ("gid 1000".to_string(), 9 * MIB, 3),
        ("default".to_string(), 0, 0),
    ];
    assert_eq!(all, expected, "root sees every quota");

    // Restored leases count again after a restart (an upgrade: the memfds are handed over,
    // the journal replayed).
    let out = broker.run_cli(&["upgrade"]);
    assert!(stdout_ok(&out).contains("leases kept: 3"));
    assert_eq!(usage(&broker.run_cli(&["quota", "--json"])), expected);
    let err = stderr_err(&create(&broker, 1000, "u1000/b", "4M"));
    assert!(
        err.contains("quota of uid 1000 is 8 MiB, 7 MiB used, 4 MiB asked"),
        "{err}"
    );
    // Removing gives the quota back.
    stdout_ok(&as_user(&broker, 1000, 1000, &["rm", "u1000/a"]));
    stdout_ok(&create(&broker, 1000, "u1000/b", "4M"));
}

fn poison_as(broker: &TestBroker, uid: u32, name: &str, mode: &str, offset: u64) -> Helper {
    let mut cmd = Command::new(bin_path("mb-holder"));
    cmd.arg(broker.socket())
        .args(["poison", name, mode, &offset.to_string(), "1"])
        .uid(uid)
        .gid(uid)
        .stderr(Stdio::piped());
    Helper::spawn(cmd)
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn a_read_only_holder_may_not_report_poison() {
    assert_root();
    let broker = TestBroker::start(&["--pool", "memfd:t:64M", "--socket-group", "1000"]);
    let mut owner = broker.client();
    owner
        .create(
            CreateLease::new("shared", 4 * MIB)
                .persistent(true)
                .mode(0o666),
        )
        .unwrap();
    let mut reader = poison_as(&broker, 1000, "shared", "ro", 0);
    let line = reader.line();
    assert!(
        line.starts_with("error Some(PermissionDenied)") && line.contains("read-only holder"),
        "{line}"
    );
    assert!(owner.stat("shared").unwrap().poison.is_empty());
    let mut writer = poison_as(&broker, 1000, "shared", "rw", 4097);
    assert_eq!(writer.line(), "ok");
    assert_eq!(
        owner.stat("shared").unwrap().poison,
        vec![PoisonInfo {
            offset: 4096,
            len: 4096
        }],
        "widened to the page"
    );
}

#[test]
fn a_flood_of_poison_reports_is_merged_capped_and_ls_still_works() {
    let broker = TestBroker::start(&["--pool", "memfd:t:256M", "--no-sync"]);
    let mut client = broker.client();
    client
        .create(CreateLease::new("flood", 128 * MIB).persistent(true))
        .unwrap();
    // Neighbouring pages merge into one range.
    client.report_poison("flood", 0, 1).unwrap();
    client.report_poison("flood", 4096 + 17, 1).unwrap();
    assert_eq!(
        client.stat("flood").unwrap().poison,
        vec![PoisonInfo {
            offset: 0,
            len: 8192
        }]
    );
    // 12 000 one-byte reports on distinct pages: 64 ranges are kept, the rest refused.
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..12_000u64 {
        match client.report_poison("flood", (2 * i + 4) * 4096 + 1, 1) {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (63, 12_000 - 63));
    let info = client.stat("flood").unwrap();
    assert_eq!(info.poison.len(), 64);
    assert!(info.poison.iter().all(|p| p.len % 4096 == 0));
    for name in ["other/a", "other/b"] {
        client
            .create(CreateLease::new(name, 4 * MIB).persistent(true))
            .unwrap();
    }
    assert_eq!(client.list("").unwrap().len(), 3);
    let ls = stdout_ok(&broker.run_cli(&["ls", "-l"]));
    assert!(ls.contains("flood"), "{ls}");
    stdout_ok(&broker.run_cli(&["stat", "--json", "flood"]));
    let quarantine = stdout_ok(&broker.run_cli(&["quarantine", "--json"]));
    let pools: Vec<serde_json::Value> = serde_json::from_str(&quarantine).unwrap();
    assert_eq!(
        pools[0]["leases"][0]["poison"].as_array().unwrap().len(),
        64
    );
}
