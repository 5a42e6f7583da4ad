//! Driving `mb-tenant`, the helper that plays a tenant attacking other tenants' memory.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::{Helper, TestBroker, bin_path};

/// Starts `mb-tenant SOCKET ARGS...` as uid/gid 65534.
pub fn as_nobody(broker: &TestBroker, args: &[&str]) -> Helper {
    let mut cmd = Command::new(bin_path("mb-tenant"));
    cmd.arg(broker.socket())
        .args(args)
        .uid(65534)
        .gid(65534)
        .stderr(Stdio::inherit());
    Helper::spawn(cmd)
}

/// Runs `mb-tenant SOCKET attack NAME MODE` as uid/gid 65534: its lines up to "done".
pub fn attack_as_nobody(broker: &TestBroker, name: &str, mode: &str) -> Vec<String> {
    let mut helper = as_nobody(broker, &["attack", name, mode]);
    let mut lines = Vec::new();
    loop {
        match helper.line() {
            done if done == "done" => return lines,
            line => lines.push(line),
        }
    }
}

/// The line `mb-tenant` prints for a route the kernel refused with `e`.
pub fn refused(route: &str, e: rustix::io::Errno) -> String {
    format!("{route} errno {}", e.raw_os_error())
}

/// What a victim wrote at the start of its lease.
pub const VICTIM: &[u8] = b"the victim's own bytes";

/// Root's lease `root/shared` of `size` bytes, mode 0644 (uid 65534 may read it), persistent,
/// starting with [`VICTIM`].
pub fn victim_lease(broker: &TestBroker, size: u64) -> membroker_client::Lease {
    let lease = broker
        .client()
        .create(
            membroker_client::CreateLease::new("root/shared", size)
                .persistent(true)
                .mode(0o644),
        )
        .expect("create the victim's lease");
    lease
        .map()
        .and_then(|map| map.write_at(0, VICTIM))
        .expect("write the victim's bytes");
    lease
}

/// What `mb-tenant attack NAME ro` prints on a lease of either kind when every route to write
/// is refused (only reopening read-only works).
pub fn reader_refused_everywhere() -> Vec<String> {
    use rustix::io::Errno;
    vec![
        refused("mmap-write", Errno::ACCESS),
        refused("write", Errno::BADF),
        refused("reopen-rw", Errno::ACCESS),
        "reopen-ro ok".to_string(),
        refused("fchmod", Errno::PERM),
        refused("fchown", Errno::PERM),
        refused("fallocate-punch", Errno::BADF),
        refused("add-seals", Errno::PERM),
        refused("ftruncate", Errno::INVAL),
    ]
}
