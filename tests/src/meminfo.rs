//! The guest's free memory, for measuring what the kernel spends on memory (`benches/accounting.rs`,
//! the estimate check in `tests/devdax.rs`).
//!
//! `MemFree` alone misleads: pages the kernel frees (a device's struct pages on unbind) often go
//! to the per-CPU free lists first, which `MemFree` does not count, and an allocation may be
//! served from them without `MemFree` moving. Free memory here is `MemFree` plus the per-CPU
//! lists' pages (`count:` in `/proc/zoneinfo`), after `sync` and dropping the caches.

use std::time::Duration;

/// Reads `KEY:  N kB` from `/proc/meminfo`, in KiB.
pub fn meminfo_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .expect("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/meminfo"))
}

/// Pages on the per-CPU free lists, in KiB (4 KiB pages: the test VM is x86-64).
fn per_cpu_free_kib() -> u64 {
    let pages: u64 = std::fs::read_to_string("/proc/zoneinfo")
        .expect("/proc/zoneinfo")
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("count:"))
        .map(|v| v.trim().parse::<u64>().expect("zoneinfo count"))
        .sum();
    pages * 4
}

/// Free memory in KiB once caches are dropped and the system settled: the median of three
/// readings a moment apart.
pub fn free_kib() -> u64 {
    let mut readings: Vec<u64> = (0..3)
        .map(|_| {
            rustix::fs::sync();
            std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop_caches (root)");
            std::thread::sleep(Duration::from_millis(300));
            meminfo_kib("MemFree") + per_cpu_free_kib()
        })
        .collect();
    readings.sort_unstable();
    readings[1]
}
