//! Lease semantics against the real broker: shared bytes, seals, admission, holders, uids,
//! hugetlb.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use membroker_client::{CreateLease, ErrorCode, LEASE_SEALS, LeaseState, PageSize};
use membroker_tests::{Helper, TestBroker, bin_path, pattern, stderr_err, stdout_ok, wait_until};
use rustix::io::Errno;

const MIB: u64 = 1 << 20;

fn used(broker: &TestBroker, pool: &str) -> u64 {
    broker
        .client()
        .df()
        .unwrap()
        .into_iter()
        .find(|p| p.name == pool)
        .expect("pool")
        .used
}

#[test]
fn bytes_written_by_one_holder_are_read_by_another() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let mut a = broker.client();
    let lease = a
        .create(CreateLease::new("tenant/vm1/ram0", 8 * MIB).persistent(true))
        .unwrap();
    let map_a = lease.map().unwrap();
    let data: Vec<u8> = (0..map_a.len()).map(|i| pattern(1, i)).collect();
    map_a.write_at(0, &data).unwrap();

    let mut b = broker.client();
    let again = b.open("tenant/vm1/ram0", true).unwrap();
    assert_eq!(again.size(), 8 * MIB);
    let map_b = again.map().unwrap();
    let mut back = vec![0u8; map_b.len()];
    map_b.read_at(0, &mut back).unwrap();
    assert!(back == data, "second holder reads different bytes");

    // And the other way round, through the live first mapping.
    map_b.write_at(4 * MIB as usize, b"from b").unwrap();
    let mut word = [0u8; 6];
    map_a.read_at(4 * MIB as usize, &mut word).unwrap();
    assert_eq!(&word, b"from b");

    let info = b.stat("tenant/vm1/ram0").unwrap();
    assert_eq!(info.holders.len(), 2);
    assert_eq!(info.state, LeaseState::Held);
}

#[test]
fn lease_is_sealed_and_mapping_is_bounded() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let mut client = broker.client();
    let lease = client.create(CreateLease::new("sealed", 4 * MIB)).unwrap();
    assert_eq!(lease.seals().unwrap(), LEASE_SEALS, "F_GET_SEALS");
    assert_eq!(
        rustix::fs::ftruncate(lease.as_fd(), 2 * MIB),
        Err(Errno::PERM),
        "shrink"
    );
    assert_eq!(
        rustix::fs::ftruncate(lease.as_fd(), 8 * MIB),
        Err(Errno::PERM),
        "grow"
    );
    assert_eq!(
        rustix::fs::fcntl_add_seals(lease.as_fd(), rustix::fs::SealFlags::WRITE),
        Err(Errno::PERM),
        "seal sealed"
    );
    let st = rustix::fs::fstat(lease.as_fd()).unwrap();
    assert!(
        st.st_blocks as u64 * 512 >= 4 * MIB,
        "memory not backed at lease time"
    );

    let err = lease.map_range(0, 8 * MIB).unwrap_err().to_string();
    assert!(err.contains("outside the lease"), "{err}");
    assert!(lease.map_range(4 * MIB, 4096).is_err(), "offset at the end");
    assert!(lease.map_range(u64::MAX - 4095, 4096).is_err(), "overflow");
    assert!(lease.map_range(100, 4096).is_err(), "unaligned");
    let map = lease.map_range(MIB, MIB).unwrap();
    assert!(
        map.write_at(MIB as usize - 2, b"abc").is_err(),
        "write past the mapping"
    );
    assert!(map.load(MIB as usize).is_err(), "read past the mapping");
}

#[test]
fn read_only_open_cannot_write() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let mut owner = broker.client();
    let lease = owner
        .create(CreateLease::new("ro", 2 * MIB).persistent(true))
        .unwrap();
    lease.map().unwrap().write_at(0, b"hello").unwrap();
    let mut reader = broker.client();
    let ro = reader.open("ro", false).unwrap();
    assert!(!ro.writable());
    let flags = rustix::fs::fcntl_getfl(ro.as_fd()).unwrap();
    assert_eq!(
        flags & rustix::fs::OFlags::ACCMODE,
        rustix::fs::OFlags::RDONLY,
        "delivered O_RDONLY"
    );
    let map = ro.map().unwrap();
    let mut word = [0u8; 5];
    map.read_at(0, &mut word).unwrap();
    assert_eq!(&word, b"hello");
    assert!(map.write_at(0, b"x").is_err());
    // Even raw: a writable shared mapping of the read-only fd is refused by the kernel.
    let fd = ro.into_fd();
    let raw = rustix::fs::ftruncate(&fd, 0);
    assert!(raw.is_err());
}

#[test]
fn admission_control_refuses_and_capacity_comes_back() {
    let broker = TestBroker::start(&["--pool", "memfd:small:64M"]);
    let mut client = broker.client();
    let err = client
        .create(CreateLease::new("vm/too-big", 128 * MIB))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSpace));
    assert_eq!(
        err.to_string(),
        "lease vm/too-big: pool small has 64 MiB free, 128 MiB asked"
    );

    let _held = client.create(CreateLease::new("vm/a", 48 * MIB)).unwrap();
    assert_eq!(used(&broker, "small"), 48 * MIB);
    let err = client
        .create(CreateLease::new("vm/b", 32 * MIB))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "lease vm/b: pool small has 16 MiB free, 32 MiB asked"
    );
    client.release("vm/a").unwrap();
    assert_eq!(used(&broker, "small"), 0, "non-persistent lease released");
    assert!(matches!(
        client.stat("vm/a").unwrap_err().code(),
        Some(ErrorCode::NotFound)
    ));
    client.create(CreateLease::new("vm/b", 32 * MIB)).unwrap();
    assert_eq!(used(&broker, "small"), 32 * MIB);
    drop(client);
    wait_until(Duration::from_secs(5), "disconnect releases vm/b", || {
        used(&broker, "small") == 0
    });
}

#[test]
fn kill_9_of_a_holder_releases_its_lease() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let mut cmd = Command::new(bin_path("mb-holder"));
    cmd.arg(broker.socket())
        .args(["create", "vm/victim", "32M"]);
    let mut holder = Helper::spawn(cmd);
    assert_eq!(holder.line(), "ready");
    let info = broker.client().stat("vm/victim").unwrap();
    assert_eq!(info.holders[0].pid, holder.child.id());
    assert_eq!(used(&broker, "t"), 32 * MIB);
    holder.child.kill().unwrap(); // SIGKILL
    holder.child.wait().unwrap();
    wait_until(
        Duration::from_secs(5),
        "capacity back after kill -9",
        || used(&broker, "t") == 0,
    );
    assert!(broker.client().stat("vm/victim").is_err());
}

#[test]
fn persistent_lease_survives_its_holder() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let mut cmd = Command::new(bin_path("mb-holder"));
    cmd.arg(broker.socket())
        .args(["create", "vm/keep", "8M", "persistent"]);
    let mut holder = Helper::spawn(cmd);
    assert_eq!(holder.line(), "ready");
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    wait_until(Duration::from_secs(5), "holder gone", || {
        broker.client().stat("vm/keep").unwrap().holders.is_empty()
    });
    assert_eq!(
        broker.client().stat("vm/keep").unwrap().state,
        LeaseState::Idle
    );
    // A restarted VMM re-attaches and finds what the first one wrote.
    let mut cmd = Command::new(bin_path("mb-holder"));
    cmd.arg(broker.socket()).args(["open", "vm/keep", "rw"]);
    assert_eq!(Helper::spawn(cmd).line(), "ok");
    assert_eq!(used(&broker, "t"), 8 * MIB);
    stdout_ok(&broker.run_cli(&["rm", "vm/keep"]));
    assert_eq!(used(&broker, "t"), 0);
}

/// Runs `mb-holder open NAME MODE` as uid/gid 65534 and returns its first line.
fn open_as_nobody(broker: &TestBroker, name: &str, mode: &str) -> String {
    let mut cmd = Command::new(bin_path("mb-holder"));
    cmd.arg(broker.socket())
        .args(["open", name, mode])
        .uid(65534)
        .gid(65534)
        .stderr(Stdio::piped());
    Helper::spawn(cmd).line()
}

fn rm_as_nobody(broker: &TestBroker, name: &str) -> std::process::Output {
    broker
        .cli()
        .args(["rm", name])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn another_uid_is_denied_unless_the_mode_allows() {
    assert!(
        rustix::process::getuid().is_root(),
        "this test must run as root (it switches to uid 65534)"
    );
    let broker = TestBroker::start(&["--pool", "memfd:t:64M", "--socket-group", "65534"]);
    let mut owner = broker.client();
    let first_page: Vec<u8> = (0..4096).map(|i| pattern(7, i)).collect();
    owner
        .create(CreateLease::new("root/private", 4 * MIB).persistent(true))
        .unwrap();
    let shared = owner
        .create(
            CreateLease::new("root/shared", 4 * MIB)
                .persistent(true)
                .mode(0o644),
        )
        .unwrap();
    shared.map().unwrap().write_at(0, &first_page).unwrap();
    let open = owner
        .create(
            CreateLease::new("root/open", 4 * MIB)
                .persistent(true)
                .mode(0o666),
        )
        .unwrap();
    open.map().unwrap().write_at(0, &first_page).unwrap();

    let line = open_as_nobody(&broker, "root/private", "ro");
    assert!(
        line.starts_with("error Some(PermissionDenied): lease root/private: permission denied"),
        "{line}"
    );
    let err = stderr_err(&rm_as_nobody(&broker, "root/private"));
    assert!(err.contains("permission denied to remove it"), "{err}");
    assert!(owner.stat("root/private").is_ok(), "still there");

    assert_eq!(
        open_as_nobody(&broker, "root/shared", "ro"),
        "ok",
        "0644: read allowed, same bytes"
    );
    let line = open_as_nobody(&broker, "root/shared", "rw");
    assert!(
        line.contains("permission denied to open it for writing"),
        "{line}"
    );
    stderr_err(&rm_as_nobody(&broker, "root/shared"));

    assert_eq!(
        open_as_nobody(&broker, "root/open", "rw"),
        "ok",
        "0666: read and write allowed"
    );
    stdout_ok(&rm_as_nobody(&broker, "root/open"));
    assert!(owner.stat("root/open").is_err(), "removed by the other uid");
}

fn hugetlb_round_trip(page: PageSize, spec: &str, size: u64) {
    let broker = TestBroker::start(&["--pool", spec]);
    let mut client = broker.client();
    let lease = client
        .create(CreateLease::new("huge", size).page_size(page))
        .unwrap();
    assert_eq!(lease.page_size(), page);
    assert_eq!(lease.seals().unwrap(), LEASE_SEALS);
    let st = rustix::fs::fstat(lease.as_fd()).unwrap();
    assert_eq!(st.st_blksize as u64, page.bytes(), "hugetlbfs page size");
    let map = lease.map().unwrap();
    map.fill(0, map.len(), 0x5a).unwrap();
    let second = client.open("huge", true).unwrap().map().unwrap();
    assert_eq!(second.load(map.len() - 1).unwrap(), 0x5a);
    assert!(
        lease.map_range(0, 4096).is_err(),
        "4 KiB mapping of a huge lease"
    );
    let err = client
        .create(CreateLease::new("odd", page.bytes() / 2).page_size(page))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn hugetlb_2m_lease() {
    let _pages = membroker_tests::HugePages::reserve(2048, 8);
    hugetlb_round_trip(PageSize::Huge2M, "memfd:h2:16M:2M", 8 * MIB);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn hugetlb_1g_lease() {
    // In a fresh guest kernel: a busy host's memory may be too fragmented for a 1 GiB page.
    if !membroker_tests::in_vm_with_ram_for_1g_pages("hugetlb_1g_lease") {
        return;
    }
    let _pages = membroker_tests::HugePages::reserve(1048576, 1);
    hugetlb_round_trip(PageSize::Huge1G, "memfd:h1:1G:1G", 1 << 30);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn hugetlb_shortage_is_a_clear_error() {
    // No reservation: a pool bigger than the free huge pages must fail at lease time, clearly.
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let size = (free + 1) * 2 * MIB;
    let broker = TestBroker::start(&["--pool", &format!("memfd:h2:{size}:2M")]);
    let err = broker
        .client()
        .create(CreateLease::new("short", size))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::OutOfMemory));
    assert!(err.to_string().contains("no 2M huge pages left"), "{err}");
    assert_eq!(used(&broker, "h2"), 0, "failed create gave its charge back");
}
