//! Replies always fit: a reply that describes a lease lists at most a bounded number of its
//! holders and extents, and says how many there are, however many a tenant piles up; the
//! admin's listings of quotas and of quarantined memory come in pages, however long they grow.
//! Switching uid needs root (the `privileged` feature).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use membroker_client::codec::{MAX_MSG_SIZE, encoded_len};
use membroker_client::proto::Response;
use membroker_tests::tenant::victim_lease;
use membroker_tests::{Helper, TestBroker, bin_path, stdout_ok};

const NOBODY: u32 = 65534;

/// Holders whose descriptions alone (a pid and uid 65534, ~6 bytes each) are larger than the
/// largest message.
const HOLDERS: usize = 12_000;

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn a_lease_with_thousands_of_holders_is_described_within_a_message() {
    let per_uid = (HOLDERS + 100).to_string();
    let broker = TestBroker::start(&[
        "--max-connections-per-uid",
        &per_uid,
        "--socket-group",
        "65534",
        "--pool",
        "memfd:t:64M",
    ]);
    let _victim = victim_lease(&broker, 1 << 20);
    let mut cmd = Command::new(bin_path("mb-flood"));
    cmd.arg(broker.socket())
        .arg("hold=root/shared")
        .arg(HOLDERS.to_string())
        .uid(NOBODY)
        .gid(NOBODY)
        .stderr(Stdio::inherit());
    let mut holder = Helper::spawn(cmd);
    // Every open is answered with the lease (its reply lists the holders too).
    let held = holder.line();
    assert_eq!(
        held,
        format!("held {HOLDERS}"),
        "{}",
        if held == format!("held {HOLDERS}") {
            String::new()
        } else {
            holder.line()
        }
    );

    let mut root = broker.client();
    let info = root
        .stat("root/shared")
        .unwrap_or_else(|e| panic!("stat: {e}"));
    assert!(
        !info.holders.is_empty() && info.holders.len() < HOLDERS,
        "{} holders listed",
        info.holders.len()
    );
    let (described, totals) = root
        .describe("root/shared")
        .unwrap_or_else(|e| panic!("describe: {e}"));
    assert_eq!(described.holders, info.holders);
    assert_eq!(totals.holders, HOLDERS as u64);
    assert_eq!(totals.extents, described.extents.len() as u64);
    let listed = root.list("root/").expect("ls");
    assert_eq!(listed.len(), 1);
    root.open("root/shared", false)
        .unwrap_or_else(|e| panic!("open: {e}"));

    let out = broker.run_cli(&["stat", "root/shared"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let more = HOLDERS + 1 - info.holders.len(); // root's open above holds it too
    assert!(stdout.contains(&format!("... and {more} more")), "{stdout}");
    let out = broker.run_cli(&["ls", "-l", "root/"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    drop(holder.child.stdin.take());
    holder.child.wait().expect("wait holder");
}

/// Asserts that `listing` in one reply would not fit a message (the attack is real).
fn outgrows_a_message(what: &str, listing: &Response) {
    let size = encoded_len(listing);
    eprintln!("the whole {what} listing: {size} bytes");
    assert!(
        size > MAX_MSG_SIZE,
        "{size} bytes fit one message: no attack"
    );
}

/// What `membroker COMMAND --json` prints.
fn cli_json(broker: &TestBroker, command: &str) -> Vec<serde_json::Value> {
    let json = stdout_ok(&broker.run_cli(&[command, "--json"]));
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{command} --json: {e}"))
}

/// Tenants that report poison: each may report 64 pages, here one page on each of 64 leases
/// with names near the 255-byte limit, so the admin's quarantine listing grows by ~16 KiB per
/// uid.
const POISONERS: [u32; 6] = [70_001, 70_002, 70_003, 70_004, 70_005, 70_006];
const POISONED_PER_UID: usize = 64;

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn hostile_poison_reports_do_not_break_the_admins_quarantine_listing() {
    let broker = TestBroker::start(&["--socket-group", "65534", "--pool", "memfd:t:64M"]);
    let mut tenants: Vec<(u32, Helper)> = POISONERS
        .iter()
        .map(|&uid| {
            let prefix = format!("t{uid}/{}-", "p".repeat(235));
            let mut cmd = Command::new(bin_path("mb-flood"));
            cmd.arg(broker.socket())
                .arg(format!("poison={prefix}"))
                .arg(POISONED_PER_UID.to_string())
                .uid(uid)
                .gid(NOBODY)
                .stderr(Stdio::inherit());
            (uid, Helper::spawn(cmd))
        })
        .collect();
    for (uid, tenant) in &mut tenants {
        let line = tenant.line();
        let want = format!("poisoned {POISONED_PER_UID}");
        assert_eq!(
            line,
            want,
            "uid {uid}: {}",
            if line == want {
                String::new()
            } else {
                tenant.line()
            }
        );
    }
    let total = POISONERS.len() * POISONED_PER_UID;

    let pools = broker
        .client()
        .quarantine()
        .unwrap_or_else(|e| panic!("quarantine: {e}"));
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].leases.len(), total);
    assert!(pools[0].leases.iter().all(|l| l.poison.len() == 1));
    outgrows_a_message("quarantine", &Response::Quarantine(pools.clone()));

    let shown = cli_json(&broker, "quarantine");
    assert_eq!(shown.len(), 1);
    let leases = shown[0]["leases"].as_array().expect("leases");
    assert_eq!(leases.len(), total);
    for (lease, want) in leases.iter().zip(&pools[0].leases) {
        assert_eq!(lease["name"].as_str(), Some(want.name.as_str()));
    }
    let table = stdout_ok(&broker.run_cli(&["quarantine"]));
    for uid in POISONERS {
        let rows = table
            .lines()
            .filter(|l| l.contains(&format!("lease t{uid}/")))
            .count();
        assert_eq!(rows, POISONED_PER_UID, "uid {uid}:\n{table}");
    }

    // A tenant sees its own poisoned leases, never another's names (they are private).
    let tenant = POISONERS[1];
    let out = broker
        .cli()
        .args(["quarantine", "--json"])
        .uid(tenant)
        .gid(NOBODY)
        .output()
        .expect("run the CLI as a tenant");
    let shown: Vec<serde_json::Value> =
        serde_json::from_str(&stdout_ok(&out)).expect("quarantine --json as a tenant");
    let names: Vec<&str> = shown[0]["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names.len(), POISONED_PER_UID, "uid {tenant} sees {names:?}");
    let own = format!("t{tenant}/");
    assert!(names.iter().all(|n| n.starts_with(&own)), "{names:?}");

    for (_, mut tenant) in tenants {
        drop(tenant.child.stdin.take());
        tenant.child.wait().expect("wait tenant");
    }
}

/// Quota rules for uids: each takes ~31 bytes of the admin's listing.
const QUOTA_RULES: u32 = 3_000;

#[test]
fn thousands_of_quota_rules_are_all_listed() {
    let rules: Vec<String> = (0..QUOTA_RULES)
        .map(|i| format!("uid:{}:bytes=1G,leases=8", 100_000 + i))
        .collect();
    let mut args = vec![
        "--pool",
        "memfd:t:64M",
        "--no-sync",
        "--quota",
        "default:leases=4",
    ];
    for rule in &rules {
        args.extend(["--quota", rule.as_str()]);
    }
    let broker = TestBroker::start(&args);
    let quotas = broker
        .client()
        .quota()
        .unwrap_or_else(|e| panic!("quota: {e}"));
    assert_eq!(quotas.len(), QUOTA_RULES as usize + 1);
    outgrows_a_message("quota", &Response::Quota(quotas.clone()));

    let shown = cli_json(&broker, "quota");
    let labels: Vec<&str> = shown.iter().map(|q| q["label"].as_str().unwrap()).collect();
    let want: Vec<&str> = quotas.iter().map(|q| q.label.as_str()).collect();
    assert_eq!(labels, want);
    for i in [0, QUOTA_RULES / 2, QUOTA_RULES - 1] {
        assert!(
            labels.contains(&format!("uid {}", 100_000 + i).as_str()),
            "uid {i}"
        );
    }
    assert!(labels.contains(&"default"));
    let table = stdout_ok(&broker.run_cli(&["quota"]));
    let rows = table.lines().filter(|l| l.starts_with("uid 1")).count();
    assert_eq!(rows, QUOTA_RULES as usize, "{table}");
}
