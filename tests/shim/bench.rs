//! Benchmarks of the preload shim (`cargo bench -p membroker-tests --bench shim`, as root with
//! Debian's qemu-system-x86, a kernel and busybox-static installed):
//!
//! 1. QEMU boot-to-marker wall time, same command with and without the shim, alternating runs
//!    (TCG, 256 MiB guest whose /init writes 64 MiB of pattern); median ratio, target ≤ 1.05×.
//! 2. The cost the mmap hook adds to a call it does not redirect: `mb-shim-helper` loops over
//!    an mmap the kernel refuses at once (EINVAL) and over 64 KiB mmap+munmap pairs, with and
//!    without `LD_PRELOAD`, best of several rounds; target < 100 ns.
//!
//! `BENCH_REPS` (default 5) sets the number of boots per variant.

#[path = "support.rs"]
mod support;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use membroker_tests::{Helper, TestBroker, bin_path, median};
use support::{MARKER, Qemu, initramfs, pattern_init, shim_path};

fn boot(initrd: &std::path::Path, socket: &str, shim: bool) -> f64 {
    let env = [("MEMBROKER_SOCKET", socket)];
    let mut qemu = Qemu::start(initrd, "256M", &[], &env, shim);
    let took = qemu.wait_for(MARKER, Duration::from_secs(300));
    qemu.kill();
    took.as_secs_f64()
}

fn helper_bench(command: &str, preload: bool) -> f64 {
    let mut cmd = Command::new(bin_path("mb-shim-helper"));
    cmd.env_remove("LD_PRELOAD")
        .env("MEMBROKER_SOCKET", "/nonexistent");
    if preload {
        cmd.env("LD_PRELOAD", shim_path());
    }
    let mut h = Helper::spawn(cmd);
    let _ready = h.line();
    let stdin = h.child.stdin.as_mut().expect("stdin");
    writeln!(stdin, "{command}").unwrap();
    stdin.flush().unwrap();
    let reply = h.line();
    reply
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("{reply}"))
        .parse()
        .unwrap()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);

    println!("== mmap hook overhead on calls it does not redirect (best of 7 rounds)");
    for (what, command) in [
        ("mmap refused with EINVAL", "bench-einval 1000000"),
        ("64 KiB mmap+munmap", "bench 100000"),
    ] {
        let (mut plain, mut hooked) = (f64::MAX, f64::MAX);
        for _ in 0..7 {
            plain = plain.min(helper_bench(command, false));
            hooked = hooked.min(helper_bench(command, true));
        }
        println!(
            "{what:28} plain {plain:8.1} ns   shim {hooked:8.1} ns   added {:+6.1} ns",
            hooked - plain
        );
    }

    println!("== QEMU boot to marker, TCG, -m 256M, 64 MiB pattern, {reps} runs each, alternating");
    let broker = TestBroker::start(&["--pool", "memfd:bench:1G"]);
    let socket = broker
        .socket()
        .to_str()
        .expect("utf-8 socket path")
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path(), &pattern_init(64));
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let order = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for shim in order {
            let t = boot(&initrd, &socket, shim);
            println!(
                "  run {rep} {:10} {t:.2} s",
                if shim { "shim" } else { "no shim" }
            );
            if shim { with.push(t) } else { without.push(t) }
        }
    }
    let (w, wo) = (median(with), median(without));
    println!(
        "median: shim {w:.2} s, no shim {wo:.2} s, ratio {:.3}x (target <= 1.05x)",
        w / wo
    );
}
