//! device-dax pools on a real device-dax kernel: each test boots the project's VM
//! (tests/vm/run-in-vm: Debian kernel, emulated dynamic dax region of 2 GiB at 4 GiB physical,
//! its own NUMA node) and runs itself inside as root.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use membroker_client::proto::Extent;
use membroker_client::{CreateLease, ErrorCode, LeaseInfo, PageSize};
use membroker_tests::{
    Helper, TestBroker, bin_path, in_dax_vm, physical_address, stderr_err, stdout_ok, wait_until,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const REGION_BASE: u64 = 0x1_0000_0000; // where run-in-vm puts the dax range

fn sysfs(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_string()
}

fn hex(text: &str) -> u64 {
    u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap()
}

/// The ranges sysfs shows for a device, in file-offset order.
fn device_ranges(device: &str) -> Vec<Extent> {
    let dir = format!("/sys/bus/dax/devices/{device}");
    (0..)
        .map(|i| format!("{dir}/mapping{i}"))
        .take_while(|m| std::path::Path::new(m).exists())
        .map(|m| {
            let (start, end) = (
                hex(&sysfs(&format!("{m}/start"))),
                hex(&sysfs(&format!("{m}/end"))),
            );
            Extent {
                start,
                len: end + 1 - start,
            }
        })
        .collect()
}

fn devices_with_size() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/sys/bus/dax/devices")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|d| sysfs(&format!("/sys/bus/dax/devices/{d}/size")) != "0")
        .collect();
    out.sort();
    out
}

fn wait_scrubbed(broker: &TestBroker) {
    wait_until(Duration::from_secs(60), "scrubbing to finish", || {
        broker.client().df().unwrap()[0].scrubbing == 0
    });
}

fn check_device(info: &LeaseInfo, align: u64) {
    let device = info
        .device
        .as_deref()
        .expect("a device lease names its device");
    assert_eq!(
        device_ranges(device),
        info.extents,
        "sysfs ranges of {device} = what stat reports"
    );
    assert_eq!(
        sysfs(&format!("/sys/bus/dax/devices/{device}/align")),
        align.to_string()
    );
    assert_eq!(
        sysfs(&format!("/sys/bus/dax/devices/{device}/size")),
        info.size.to_string()
    );
    for e in &info.extents {
        assert!(
            e.start % align == 0 && e.len % align == 0,
            "extent {e:?} aligned to {align}"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn one_device_per_lease_with_the_reported_ranges() {
    if !in_dax_vm("one_device_per_lease_with_the_reported_ranges", &[]) {
        return;
    }
    let broker = TestBroker::start(&["--pool", "devdax:dax:region0:2M"]);
    let mut client = broker.client();
    let small = client
        .create(CreateLease::new("vm1/small", 2 * MIB).persistent(true))
        .unwrap();
    let big = client
        .create(CreateLease::new("vm1/big", GIB).persistent(true))
        .unwrap();
    assert_eq!(small.page_size(), PageSize::Huge2M);
    assert_eq!(
        small.info().extents,
        vec![Extent {
            start: REGION_BASE,
            len: 2 * MIB
        }]
    );
    let mut devices = Vec::new();
    for lease in [&small, &big] {
        let info = client.stat(lease.name()).unwrap();
        check_device(&info, 2 * MIB);
        // The fd is that device.
        let st = rustix::fs::fstat(lease.as_fd()).unwrap();
        let dev = sysfs(&format!(
            "/sys/bus/dax/devices/{}/dev",
            info.device.as_deref().unwrap()
        ));
        let rdev = format!(
            "{}:{}",
            rustix::fs::major(st.st_rdev),
            rustix::fs::minor(st.st_rdev)
        );
        assert_eq!(dev, rdev);
        devices.push(info.device.unwrap());
    }
    let mut expected = devices.clone();
    expected.sort();
    assert_eq!(
        devices_with_size(),
        expected,
        "exactly one device per lease (the seed was freed)"
    );
    // Bytes written through one holder's mapping are read through another's.
    let map = big.map().unwrap();
    map.write_at(GIB as usize - 6, b"dax!!!").unwrap();
    let mut word = [0u8; 6];
    broker
        .client()
        .open("vm1/big", false)
        .unwrap()
        .map()
        .unwrap()
        .read_at(GIB as usize - 6, &mut word)
        .unwrap();
    assert_eq!(&word, b"dax!!!");
    // JSON through the CLI says the same.
    let out = broker.run_cli(&["stat", "vm1/big", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["device"], devices[1].as_str());
    assert_eq!(json["extents"][0]["start"], big.info().extents[0].start);
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn one_gib_aligned_leases() {
    if !in_dax_vm("one_gib_aligned_leases", &["--dax-size", "3G"]) {
        return;
    }
    let broker = TestBroker::start(&["--pool", "devdax:huge:region0:1G"]);
    let mut client = broker.client();
    let err = client
        .create(CreateLease::new("odd", 512 * MIB))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    let lease = client.create(CreateLease::new("vm/ram", 2 * GIB)).unwrap();
    assert_eq!(lease.page_size(), PageSize::Huge1G);
    check_device(lease.info(), GIB);
    let map = lease.map().unwrap();
    map.fill(GIB as usize, 4096, 0x11).unwrap();
    assert!(
        lease.map_range(0, 2 * MIB).is_err(),
        "2 MiB mapping of a 1 GiB-aligned lease"
    );
    let err = client
        .create(CreateLease::new("vm/more", 2 * GIB))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSpace));
    assert!(
        err.to_string()
            .contains("pool huge has 1 GiB free, 2 GiB asked"),
        "{err}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn fragmented_region_gives_one_discontiguous_device_at_the_reported_addresses() {
    if !in_dax_vm(
        "fragmented_region_gives_one_discontiguous_device_at_the_reported_addresses",
        &[],
    ) {
        return;
    }
    let broker = TestBroker::start(&["--pool", "devdax:dax:region0:2M"]);
    let mut client = broker.client();
    let names: Vec<String> = (0..32).map(|i| format!("small/{i:02}")).collect();
    for name in &names {
        client
            .create(CreateLease::new(name, 64 * MIB).persistent(true))
            .unwrap();
        client.release(name).unwrap(); // persistent: stays, nobody holds it
    }
    let err = client
        .create(CreateLease::new("full", 2 * MIB))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSpace), "region full: {err}");
    for name in names.iter().step_by(2) {
        client.remove(name).unwrap();
    }
    wait_scrubbed(&broker);
    let df = &client.df().unwrap()[0];
    assert_eq!(df.free, GIB);
    // No hole is larger than 64 MiB, so 256 MiB must come as one device over several holes.
    let lease = client.create(CreateLease::new("big", 256 * MIB)).unwrap();
    let extents = &lease.info().extents;
    assert_eq!(
        extents.len(),
        4,
        "fewest extents: four 64 MiB holes, got {extents:?}"
    );
    assert!(
        extents
            .windows(2)
            .all(|w| w[0].start + w[0].len != w[1].start),
        "discontiguous: {extents:?}"
    );
    check_device(lease.info(), 2 * MIB);
    // Bytes written at each file offset land on the physical pages the broker reported.
    let map = lease.map().unwrap();
    let mut offset = 0u64;
    for (i, extent) in extents.iter().enumerate() {
        for probe in [0, extent.len / 2, extent.len - 4096] {
            let at = (offset + probe) as usize;
            map.write_at(at, &[i as u8 + 1; 8]).unwrap();
            let phys = physical_address(map.as_ptr() as usize + at);
            assert_eq!(phys, extent.start + probe, "file offset {at:#x}");
        }
        offset += extent.len;
    }
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn unprivileged_holder_maps_its_lease_and_nothing_else() {
    if !in_dax_vm("unprivileged_holder_maps_its_lease_and_nothing_else", &[]) {
        return;
    }
    let broker = TestBroker::start(&["--pool", "devdax:dax:region0:2M", "--socket-group", "65534"]);
    let mut owner = broker.client();
    let lease = owner
        .create(
            CreateLease::new("shared/vm", 64 * MIB)
                .persistent(true)
                .mode(0o666),
        )
        .unwrap();
    let first: Vec<u8> = (0..2 * MIB as usize)
        .map(|i| membroker_tests::pattern(7, i))
        .collect();
    lease.map().unwrap().write_at(0, &first).unwrap();
    owner
        .create(CreateLease::new("private/vm", 64 * MIB).persistent(true))
        .unwrap();
    let mut cmd = Command::new(bin_path("mb-holder"));
    cmd.arg(broker.socket())
        .args(["open", "shared/vm", "rw", "probe-dax"])
        .uid(65534)
        .gid(65534);
    cmd.stderr(Stdio::piped());
    let mut holder = Helper::spawn(cmd);
    assert_eq!(
        holder.line(),
        "ok",
        "uid 65534 maps the lease fd and reads the owner's bytes"
    );
    // A device node carries its lease's owner and mode (so reopening the fd by path is
    // checked like the lease): uid 65534 may open the 0666 lease's device, which gives it
    // nothing the broker would not, and no other device, the private lease's included.
    let shared = owner
        .stat("shared/vm")
        .unwrap()
        .device
        .expect("a device lease");
    assert_eq!(
        holder.line(),
        format!("dax-opened {shared}"),
        "uid 65534 opens no /dev/dax* but the one of the lease its mode gives it"
    );
    assert_eq!(holder.line(), "map-past-end refused");
    let mut cmd = Command::new(bin_path("mb-holder"));
    cmd.arg(broker.socket())
        .args(["open", "private/vm", "ro"])
        .uid(65534)
        .gid(65534);
    let line = Helper::spawn(cmd).line();
    assert!(line.contains("permission denied"), "{line}");
    // Raw mmap past the device end is created by the kernel but faults: the client refuses it.
    let raw = lease.map_range(0, 128 * MIB);
    assert!(raw.is_err());
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn released_memory_is_scrubbed_before_reuse() {
    if !in_dax_vm("released_memory_is_scrubbed_before_reuse", &[]) {
        return;
    }
    let broker = TestBroker::start(&["--pool", "devdax:dax:region0:2M"]);
    let mut a = broker.client();
    let lease = a
        .create(CreateLease::new("tenant-a/ram", 64 * MIB))
        .unwrap();
    let first_extents = lease.info().extents.clone();
    let map = lease.map().unwrap();
    map.fill(0, map.len(), 0xa5).unwrap();
    drop(map);
    drop(lease);
    a.release("tenant-a/ram").unwrap();
    wait_scrubbed(&broker);
    let mut b = broker.client();
    let lease = b
        .create(CreateLease::new("tenant-b/ram", 64 * MIB))
        .unwrap();
    assert_eq!(
        lease.info().extents,
        first_extents,
        "same physical memory as tenant A had"
    );
    let map = lease.map().unwrap();
    let mut buf = vec![0xffu8; map.len()];
    map.read_at(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "tenant B reads tenant A's bytes"
    );
    assert!(broker.log().contains("scrubbed and destroyed"));
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn poisoned_memory_is_quarantined_and_never_leased_again() {
    if !in_dax_vm(
        "poisoned_memory_is_quarantined_and_never_leased_again",
        &["--dax-size", "256M"],
    ) {
        return;
    }
    let broker = TestBroker::start(&["--pool", "devdax:dax:region0:2M"]);
    let mut client = broker.client();
    let lease = client.create(CreateLease::new("vm/ram", 64 * MIB)).unwrap();
    let map = lease.map().unwrap();
    map.fill(0, map.len(), 1).unwrap();
    let target = 10 * MIB as usize + 4096;
    let bus = membroker_tests::sys::inject_hwpoison(unsafe_free_ptr(&map, target), 4096)
        .expect("MADV_HWPOISON")
        .expect("SIGBUS after MADV_HWPOISON");
    assert_eq!(bus.code, 4, "BUS_MCEERR_AR");
    let base = map.as_ptr() as usize;
    let page = 1u64 << bus.lsb;
    assert_eq!(page, 2 * MIB, "device-dax reports the 2 MiB page");
    let offset = (bus.addr - base) as u64;
    assert_eq!(offset, 10 * MIB);
    client.report_poison("vm/ram", offset, page).unwrap();
    let info = client.stat("vm/ram").unwrap();
    assert_eq!(info.poison.len(), 1);
    let bad = Extent {
        start: info.extents[0].start + offset,
        len: page,
    };
    assert_eq!(client.df().unwrap()[0].quarantined, 2 * MIB);
    drop(map);
    drop(lease);
    client.release("vm/ram").unwrap();
    wait_scrubbed(&broker);
    let df = client.df().unwrap()[0].clone();
    assert_eq!((df.free, df.quarantined), (254 * MIB, 2 * MIB));
    // Take every byte that is left: none of it is the poisoned page.
    let mut taken = Vec::new();
    for i in 0.. {
        match client.create(CreateLease::new(format!("fill/{i}"), 2 * MIB)) {
            Ok(l) => taken.extend(l.info().extents.clone()),
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
                break;
            }
        }
    }
    assert_eq!(taken.len(), 127);
    assert!(
        taken
            .iter()
            .all(|e| e.start + e.len <= bad.start || e.start >= bad.start + bad.len),
        "the quarantined page {bad:?} was leased again"
    );
}

/// The mapping's address at `offset`, for a syscall that names memory (not a Rust reference).
fn unsafe_free_ptr(map: &membroker_client::Mapping, offset: usize) -> *mut u8 {
    map.as_ptr().wrapping_add(offset)
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn a_region_in_use_is_refused_and_left_alone() {
    if !in_dax_vm("a_region_in_use_is_refused_and_left_alone", &[]) {
        return;
    }
    // Someone else carved a device out of the region.
    let run = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "sh",
        "-c",
        "echo dax0.0 > /sys/bus/dax/drivers/device_dax/unbind && echo 0 > /sys/bus/dax/devices/dax0.0/size",
    ]);
    run(&["daxctl", "create-device", "-r", "region0", "-s", "256M"]);
    let before = devices_with_size();
    assert_eq!(before.len(), 1);
    let out = Command::new(bin_path("membroker"))
        .args([
            "--socket",
            "/run/refused.sock",
            "serve",
            "--pool",
            "devdax:dax:region0:2M",
        ])
        .output()
        .unwrap();
    let err = stderr_err(&out);
    assert!(
        err.contains(&format!(
            "region0 is already in use by {} (256 MiB, device_dax)",
            before[0]
        )),
        "{err}"
    );
    assert_eq!(devices_with_size(), before, "nothing changed");
    assert_eq!(
        sysfs(&format!("/sys/bus/dax/devices/{}/size", before[0])),
        (256 * MIB).to_string()
    );
    let err = stderr_err(
        &Command::new(bin_path("membroker"))
            .args([
                "--socket",
                "/run/refused.sock",
                "serve",
                "--pool",
                "devdax:dax:region7",
            ])
            .output()
            .unwrap(),
    );
    assert!(err.contains("no dax region 7"), "{err}");
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn device_leases_and_quarantine_survive_a_broker_kill_9() {
    if !in_dax_vm(
        "device_leases_and_quarantine_survive_a_broker_kill_9",
        &["--dax-size", "512M"],
    ) {
        return;
    }
    let mut broker =
        TestBroker::start(&["--pool", "devdax:dax:region0:2M", "--reattach-grace", "1"]);
    let mut client = broker.client();
    let keep = client
        .create(
            CreateLease::new("vm/keep", 64 * MIB)
                .persistent(true)
                .mode(0o640),
        )
        .unwrap();
    let data: Vec<u8> = (0..keep.size() as usize)
        .map(|i| membroker_tests::pattern(3, i))
        .collect();
    keep.map().unwrap().write_at(0, &data).unwrap();
    let bad = client.create(CreateLease::new("vm/bad", 64 * MIB)).unwrap();
    let map = bad.map().unwrap();
    map.fill(0, map.len(), 1).unwrap();
    let bus =
        membroker_tests::sys::inject_hwpoison(map.as_ptr().wrapping_add(4 * MIB as usize), 4096)
            .expect("MADV_HWPOISON")
            .expect("SIGBUS");
    let offset = (bus.addr - map.as_ptr() as usize) as u64;
    client
        .report_poison("vm/bad", offset, 1 << bus.lsb)
        .unwrap();
    let poisoned = Extent {
        start: bad.info().extents[0].start + offset,
        len: 1 << bus.lsb,
    };
    drop((map, bad));
    client.release("vm/bad").unwrap();
    wait_scrubbed(&broker);
    let _temp = client
        .create(CreateLease::new("vm/temp", 32 * MIB))
        .unwrap();
    let before = client.stat("vm/keep").unwrap();
    let stable = |broker: &TestBroker| -> Vec<serde_json::Value> {
        let out = broker.run_cli(&["ls", "--json"]);
        let mut leases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        // The non-persistent vm/temp may already be past its (1 s) re-attach grace period on a
        // slow machine; its release is checked below.
        leases.retain(|l| l["persistent"] == true);
        for l in &mut leases {
            let l = l.as_object_mut().unwrap();
            l.remove("holders");
            l.remove("state");
        }
        leases
    };
    let ls_before = stable(&broker);

    broker.kill9();
    // Meanwhile someone carves a device out of the region's last 32 MiB (free, and away from
    // the quarantined page): reported, never destroyed.
    let script = "R=$(readlink -f /sys/bus/dax/devices/dax0.0/..)/dax_region; echo 1 > $R/create; \
                  N=$(cat $R/create); echo 2097152 > /sys/bus/dax/devices/$N/align; \
                  echo 0x11e000000-0x11fffffff > /sys/bus/dax/devices/$N/mapping; \
                  echo $N > /sys/bus/dax/drivers/device_dax/bind; echo $N";
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let foreign = String::from_utf8(out.stdout).unwrap().trim().to_string();
    broker.restart();

    let mut after = broker.client();
    let again = after.stat("vm/keep").unwrap();
    assert_eq!(
        (&again.extents, &again.device, again.mode, again.uid),
        (&before.extents, &before.device, 0o640, 0)
    );
    check_device(&again, 2 * MIB);
    let lease = after.open("vm/keep", false).unwrap();
    let mut back = vec![0u8; data.len()];
    lease.map().unwrap().read_at(0, &mut back).unwrap();
    assert!(back == data, "contents changed across the restart");
    assert_eq!(
        stable(&broker),
        ls_before,
        "ls after the restart: same leases, owners, modes, extents"
    );
    assert!(
        broker.log().contains("not in the journal"),
        "unknown device reported"
    );
    assert_eq!(
        sysfs(&format!("/sys/bus/dax/devices/{foreign}/size")),
        (32 * MIB).to_string(),
        "unknown device left alone"
    );
    // The non-persistent lease nobody re-attached to goes after the grace period.
    wait_until(
        Duration::from_secs(30),
        "vm/temp released after the grace period",
        || after.stat("vm/temp").is_err(),
    );
    wait_scrubbed(&broker);
    let df = after.df().unwrap()[0].clone();
    assert_eq!(df.quarantined, 2 * MIB, "quarantine survived the restart");
    assert_eq!(df.free, 512 * MIB - 64 * MIB - 32 * MIB - 2 * MIB);
    let mut taken = Vec::new();
    while let Ok(l) = after.create(CreateLease::new(format!("fill/{}", taken.len()), 2 * MIB)) {
        taken.extend(l.info().extents.clone());
    }
    assert!(
        taken
            .iter()
            .all(|e| e.start + e.len <= poisoned.start || e.start >= poisoned.start + poisoned.len),
        "the quarantined page {poisoned:?} was leased again after the restart"
    );
    assert!(taken.iter().all(|e| {
        !before
            .extents
            .iter()
            .any(|k| e.start < k.start + k.len && k.start < e.start + e.len)
    }));
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn a_static_region_serves_whole_device_leases_only() {
    if !in_dax_vm(
        "a_static_region_serves_whole_device_leases_only",
        &["--pmem", "--dax-size", "256M"],
    ) {
        return;
    }
    membroker_tests::make_pmem_devdax();
    let whole: u64 = sysfs("/sys/bus/dax/devices/dax0.0/size").parse().unwrap();
    let broker = TestBroker::start(&["--pool", "devdax:pmem:region0"]);
    let mut client = broker.client();
    let err = client
        .create(CreateLease::new("part", 64 * MIB))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    assert!(
        err.to_string()
            .contains("static (a pmem namespace): it serves only whole-device leases"),
        "{err}"
    );
    let lease = client.create(CreateLease::new("whole", whole)).unwrap();
    let map = lease.map().unwrap();
    map.fill(0, map.len(), 0x77).unwrap();
    drop(map);
    drop(lease);
    let err = broker
        .client()
        .create(CreateLease::new("second", whole))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSpace), "{err}");
    client.release("whole").unwrap();
    wait_scrubbed(&broker);
    let again = client.create(CreateLease::new("next", whole)).unwrap();
    let map = again.map().unwrap();
    let mut buf = vec![1u8; map.len()];
    map.read_at(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "the next tenant reads the previous one's bytes"
    );
    assert_eq!(
        devices_with_size(),
        vec!["dax0.0".to_string()],
        "the static device is never deleted"
    );
}

/// The physical range behind `[offset, offset + len)` of a lease (inside one extent).
fn physical(info: &LeaseInfo, offset: u64, len: u64) -> Extent {
    let mut file_offset = 0;
    for e in &info.extents {
        if offset < file_offset + e.len {
            return Extent {
                start: e.start + offset - file_offset,
                len,
            };
        }
        file_offset += e.len;
    }
    panic!("offset {offset} is outside {info:?}")
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn a_false_poison_report_is_listed_and_cleared_across_restarts() {
    if !in_dax_vm(
        "a_false_poison_report_is_listed_and_cleared_across_restarts",
        &["--dax-size", "256M"],
    ) {
        return;
    }
    let mut broker =
        TestBroker::start(&["--pool", "devdax:dax:region0:2M", "--socket-group", "65534"]);
    let mut client = broker.client();
    let lease = client.create(CreateLease::new("vm/ram", 8 * MIB)).unwrap();
    // One byte reported: the whole 2 MiB page is poisoned, nothing is cleared while leased.
    client.report_poison("vm/ram", 2 * MIB + 1, 1).unwrap();
    let info = client.stat("vm/ram").unwrap();
    assert_eq!(
        info.poison,
        vec![membroker_client::proto::PoisonInfo {
            offset: 2 * MIB,
            len: 2 * MIB
        }]
    );
    let bad = physical(&info, 2 * MIB, 2 * MIB);
    let listed = client.quarantine().unwrap();
    assert!(listed[0].ranges.is_empty(), "{listed:?}");
    assert_eq!(listed[0].leases[0].name, "vm/ram");
    let err = client
        .clear_quarantine("dax", bad.start, bad.len)
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    drop(lease);
    client.release("vm/ram").unwrap();
    wait_scrubbed(&broker);
    assert_eq!(client.quarantine().unwrap()[0].ranges, vec![bad]);
    assert_eq!(client.df().unwrap()[0].quarantined, 2 * MIB);

    broker.kill9();
    broker.restart();
    let mut client = broker.client();
    assert_eq!(
        client.quarantine().unwrap()[0].ranges,
        vec![bad],
        "quarantine survives a restart"
    );
    let start = format!("{:#x}", bad.start);
    let out = broker
        .cli()
        .args(["quarantine", "clear", "dax", &start])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = stderr_err(&out);
    assert!(err.contains("only root and the admin group"), "{err}");
    let text = stdout_ok(&broker.run_cli(&["quarantine", "clear", "dax", &start]));
    assert!(text.contains("back in the free memory"), "{text}");
    assert!(client.quarantine().unwrap()[0].ranges.is_empty());

    broker.kill9();
    broker.restart();
    let mut client = broker.client();
    assert!(
        client.quarantine().unwrap()[0].ranges.is_empty(),
        "the clear was journaled"
    );
    let df = client.df().unwrap()[0].clone();
    assert_eq!((df.free, df.quarantined), (256 * MIB, 0));
    client
        .create(CreateLease::new("vm/all", 256 * MIB))
        .expect("every page is usable again");
}
