//! Replies always fit: a reply that describes a lease lists at most a bounded number of its
//! holders and extents, and says how many there are, however many a tenant piles up.
//! Switching uid needs root (the `privileged` feature).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use membroker_tests::tenant::victim_lease;
use membroker_tests::{Helper, TestBroker, bin_path};

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
