//! What the kernel spends on the memory it hands out, per GiB, measured in the project's test VM
//! (tests/vm/run-in-vm, Debian's kernel under TCG): ordinary RAM, memfd pools of 4K, 2M and 1G
//! pages (hugetlb with its vmemmap optimisation off and on), and device-dax at 4K, 2M and 1G
//! alignment. Every case is a fresh boot; free memory is `MemFree` plus the per-CPU free lists
//! after dropping the caches (`membroker_tests::meminfo`).
//!
//! - RAM-backed cases add 1 GiB to a 2 GiB guest and compare with a 2 GiB boot of the same
//!   round: the kernel spent `1 GiB - (free gained) - (memory the case holds)`, where the case
//!   holds a 1 GiB memfd (its pages, or the huge pages reserved at boot for it).
//! - device-dax cases boot with a 2 GiB region whose seed device is bound at 2M (the state
//!   after boot), free it as the broker does at start, then make a device over the whole region
//!   at the align, bind it, and count the free memory it took; twice per boot (unbind, shrink,
//!   again). A last case binds a never-bound seed at 1G, to show the one-time cost of the
//!   region's first device.
//!
//! `scripts/bench accounting` (as root). `BENCH_REPS` rounds (default 3), medians and ranges.

use std::path::Path;
use std::process::{Command, Stdio};

use membroker_tests::median;
use membroker_tests::meminfo::free_kib;

const GIB: u64 = 1 << 30;
const GIB_KIB: f64 = (1u64 << 20) as f64;
/// Binds per device-dax boot.
const CYCLES: usize = 2;

struct Case {
    name: &'static str,
    label: &'static str,
    vm: &'static [&'static str],
    /// Kernel command line added (`run-in-vm --append`).
    append: &'static str,
}

const fn case(name: &'static str, label: &'static str, vm: &'static [&'static str]) -> Case {
    with(name, label, vm, "")
}

const fn with(
    name: &'static str,
    label: &'static str,
    vm: &'static [&'static str],
    append: &'static str,
) -> Case {
    Case {
        name,
        label,
        vm,
        append,
    }
}

const RAM: &[&str] = &["--no-dax", "--ram", "3G"];
const DAX: &[&str] = &["--dax-size", "2G"];
const HUGE_2M_OFF: &str = "hugepagesz=2M hugepages=512 hugetlb_free_vmemmap=off";
const HUGE_2M_ON: &str = "hugepagesz=2M hugepages=512 hugetlb_free_vmemmap=on";
const HUGE_1G_OFF: &str = "hugepagesz=1G hugepages=1 hugetlb_free_vmemmap=off";
const HUGE_1G_ON: &str = "hugepagesz=1G hugepages=1 hugetlb_free_vmemmap=on";

const CASES: &[Case] = &[
    case(
        "base",
        "2 GiB guest (baseline)",
        &["--no-dax", "--ram", "2G"],
    ),
    case("ram", "ordinary RAM", RAM),
    case("memfd-4K", "memfd 4K (shmem)", RAM),
    with(
        "memfd-2M",
        "memfd 2M, vmemmap optimisation off",
        RAM,
        HUGE_2M_OFF,
    ),
    with(
        "memfd-2M",
        "memfd 2M, vmemmap optimisation on",
        RAM,
        HUGE_2M_ON,
    ),
    with(
        "memfd-1G",
        "memfd 1G, vmemmap optimisation off",
        RAM,
        HUGE_1G_OFF,
    ),
    with(
        "memfd-1G",
        "memfd 1G, vmemmap optimisation on",
        RAM,
        HUGE_1G_ON,
    ),
    case("dax-4K", "device-dax, align 4K", DAX),
    case("dax-2M", "device-dax, align 2M", DAX),
    case("dax-1G", "device-dax, align 1G", DAX),
    case(
        "dax-first-1G",
        "device-dax 1G, region's first device",
        &["--dax-size", "2G", "--dax-seed", "unbound"],
    ),
];

// ---- inside the VM

fn sysfs_write(path: &Path, value: &str) {
    std::fs::write(path, value)
        .unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
}

fn hugetlb_bytes() -> u64 {
    std::fs::read_dir("/sys/kernel/mm/hugepages")
        .expect("/sys/kernel/mm/hugepages")
        .flatten()
        .map(|d| {
            let name = d.file_name().to_string_lossy().into_owned();
            let kib: u64 = name["hugepages-".len()..name.len() - 2]
                .parse()
                .expect("hugepages-NkB");
            let n: u64 = std::fs::read_to_string(d.path().join("nr_hugepages"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            n * kib * 1024
        })
        .sum()
}

fn memfd(page: &str) {
    use rustix::fs::{FallocateFlags, MemfdFlags};
    let flags = match page {
        "4K" => MemfdFlags::CLOEXEC,
        "2M" => MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
        _ => MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_1GB,
    };
    let fd = rustix::fs::memfd_create("lease", flags).expect("memfd_create");
    rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, GIB).expect("fallocate 1 GiB");
    let hugetlb = hugetlb_bytes();
    assert!(
        page == "4K" || hugetlb == GIB,
        "{hugetlb} bytes of huge pages reserved, not 1 GiB"
    );
    println!("free {}", free_kib());
    println!("held {}", if page == "4K" { GIB } else { hugetlb } / 1024);
    drop(fd);
}

fn align_bytes(align: &str) -> &'static str {
    match align {
        "4K" => "4096",
        "2M" => "2097152",
        _ => "1073741824",
    }
}

fn dax(align: &str, cycles: usize, first: bool) {
    let dev = Path::new("/sys/bus/dax/devices/dax0.0");
    let region = std::fs::canonicalize(dev)
        .unwrap()
        .parent()
        .unwrap()
        .join("dax_region");
    let driver = Path::new("/sys/bus/dax/drivers/device_dax");
    if !first {
        sysfs_write(&driver.join("unbind"), "dax0.0");
        sysfs_write(&dev.join("size"), "0");
    }
    // The whole region: free once the seed is shrunk, or the never-bound seed's own size.
    let size = std::fs::read_to_string(if first {
        dev.join("size")
    } else {
        region.join("available_size")
    })
    .unwrap();
    for _ in 0..cycles {
        let before = free_kib();
        sysfs_write(&dev.join("align"), align_bytes(align));
        if !first {
            sysfs_write(&dev.join("size"), size.trim());
        }
        sysfs_write(&driver.join("bind"), "dax0.0");
        let after = free_kib();
        println!("spent {} {}", before as i64 - after as i64, size.trim());
        sysfs_write(&driver.join("unbind"), "dax0.0");
        if !first {
            sysfs_write(&dev.join("size"), "0");
        }
    }
}

fn guest(case: &str) {
    match case.split_once('-') {
        None => println!("free {}\nheld 0", free_kib()),
        Some(("memfd", page)) => memfd(page),
        Some(("dax", "first-1G")) => dax("1G", 1, true),
        Some(("dax", align)) => dax(align, CYCLES, false),
        _ => panic!("unknown case {case}"),
    }
}

// ---- on the host

/// One boot: the guest's `key value...` lines.
fn boot(case: &Case) -> Vec<(String, Vec<i64>)> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(workspace.join("tests/vm/run-in-vm"))
        .current_dir(workspace)
        .args(case.vm)
        .args(
            ["--append", case.append]
                .iter()
                .filter(|_| !case.append.is_empty()),
        )
        .args(["--timeout", "300", "--env", "MEMBROKER_IN_VM=1", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--guest", case.name])
        .stderr(Stdio::inherit())
        .output()
        .expect("tests/vm/run-in-vm");
    assert!(out.status.success(), "{}: {}", case.label, out.status);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let key = words.next()?.to_string();
            Some((key, words.map(|w| w.parse().unwrap()).collect()))
        })
        .collect()
}

fn value(lines: &[(String, Vec<i64>)], key: &str) -> i64 {
    lines
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key}"))
        .1[0]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--guest") {
        guest(&args[i + 1]);
        return;
    }
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    // MiB per GiB, per case, every sample.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    for round in 0..reps {
        eprintln!("round {}/{reps}", round + 1);
        let mut base = None;
        for (i, case) in CASES.iter().enumerate() {
            let lines = boot(case);
            if case.name == "base" {
                base = Some(value(&lines, "free"));
            } else if case.name.starts_with("dax") {
                for (_, v) in lines.iter().filter(|(k, _)| k == "spent") {
                    let gib = v[1] as f64 / GIB as f64;
                    samples[i].push(v[0] as f64 / 1024.0 / gib);
                }
            } else {
                let gained = value(&lines, "free") - base.expect("baseline first");
                let spent = GIB_KIB - gained as f64 - value(&lines, "held") as f64;
                samples[i].push(spent / 1024.0);
            }
        }
    }
    let ram = median(samples[1].clone());
    println!(
        "kernel memory spent per GiB handed out (test VM, Linux {}, {reps} boots per case; \
         device-dax {CYCLES} binds per boot)",
        kernel()
    );
    println!(
        "{:<40} {:>10} {:>17} {:>9} {:>4}",
        "case", "MiB/GiB", "range", "vs RAM", "n"
    );
    for (case, s) in CASES.iter().zip(&mut samples).skip(1) {
        let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let n = s.len();
        let m = median(s.clone());
        let ratio = if case.name == "dax-first-1G" {
            String::from("-")
        } else {
            format!("{:.3}", m / ram)
        };
        println!(
            "{:<40} {m:>10.3} {:>17} {ratio:>9} {n:>4}",
            case.label,
            format!("{lo:.3}..{hi:.3}")
        );
    }
}

fn kernel() -> String {
    let boot = std::fs::read_dir("/boot")
        .map(|d| {
            let mut v: Vec<String> = d
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("vmlinuz-")
                        .map(String::from)
                })
                .collect();
            v.sort();
            v.pop().unwrap_or_default()
        })
        .unwrap_or_default();
    std::env::var("MEMBROKER_VM_KERNEL").unwrap_or(boot)
}
