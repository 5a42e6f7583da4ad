//! Tenants against each other on memfd pools, each attack written as the attack: a reader
//! trying every route to write, an owner reopening its own fd, ex-holders keeping memory the
//! pool already gave back. Each asserts the attack fails and the victim's bytes and the pool's
//! accounting are untouched. (The device-dax side runs in the dax VM: `devdax_isolation.rs`.)

use std::os::fd::AsFd;
use std::time::Duration;

use membroker_client::{CreateLease, PoolInfo};
use membroker_tests::tenant::{
    VICTIM, attack_as_nobody, reader_refused_everywhere, refused as errno, victim_lease,
};
use membroker_tests::{TestBroker, stdout_ok, wait_until};
use rustix::io::Errno;

const MIB: u64 = 1 << 20;

fn pool(broker: &TestBroker) -> PoolInfo {
    broker.client().df().unwrap().remove(0)
}

fn read_victim(fd: std::os::fd::BorrowedFd<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; VICTIM.len()];
    rustix::io::pread(fd, &mut buf, 0).unwrap();
    buf
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn a_reader_cannot_write_by_any_route() {
    assert!(
        rustix::process::getuid().is_root(),
        "this test must run as root (it switches to uid 65534)"
    );
    let broker = TestBroker::start(&["--pool", "memfd:t:64M", "--socket-group", "65534"]);
    let lease = victim_lease(&broker, 4 * MIB);
    let before = pool(&broker);
    let expected = reader_refused_everywhere();
    assert_eq!(attack_as_nobody(&broker, "root/shared", "ro"), expected);

    // The inode keeps its owner across an upgrade (a re-exec handing the memfds over): the
    // same attack fails the same way.
    stdout_ok(&broker.run_cli(&["upgrade"]));
    assert_eq!(attack_as_nobody(&broker, "root/shared", "ro"), expected);

    assert_eq!(read_victim(lease.as_fd()), VICTIM, "the victim's bytes");
    let st = rustix::fs::fstat(lease.as_fd()).unwrap();
    assert_eq!(
        st.st_mode & 0o7777,
        0o644,
        "the inode's mode is the lease's"
    );
    assert_eq!((st.st_uid, st.st_gid), (0, 0));
    assert!(st.st_blocks as u64 * 512 >= 4 * MIB, "nothing punched out");
    let after = pool(&broker);
    assert_eq!((after.used, after.free), (before.used, before.free));
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn an_owner_may_reopen_its_own_fd_writable() {
    // A VMM hands /proc/self/fd/N to QEMU's memory-backend-file: that must keep working.
    let broker = TestBroker::start(&["--pool", "memfd:t:64M", "--socket-group", "65534"]);
    let mut admin = broker.client();
    let lease = admin
        .create(
            CreateLease::new("tenant/ram", 4 * MIB)
                .persistent(true)
                .mode(0o600)
                .owner(65534),
        )
        .unwrap();
    let lines = attack_as_nobody(&broker, "tenant/ram", "rw");
    for route in ["reopen-rw ok", "reopen-rw-mmap-write ok", "reopen-ro ok"] {
        assert!(lines.iter().any(|l| l == route), "{route}: {lines:?}");
    }
    // What no holder can do, writable or not: the seals are sealed, the size is fixed.
    assert!(
        lines.contains(&errno("add-seals", Errno::PERM)),
        "{lines:?}"
    );
    assert!(
        lines.contains(&errno("ftruncate", Errno::PERM)),
        "{lines:?}"
    );
    let st = rustix::fs::fstat(lease.as_fd()).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (65534, 0), "the lease's owner");
}

fn shmem_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo.lines().find(|l| l.starts_with("Shmem:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn ex_holders_keeping_fds_keep_no_memory() {
    // The attack: create 160 MiB, release it (or disconnect) keeping the fd, five times over,
    // against a 256 MiB pool. Without punching, 800 MiB of shmem stays charged to the broker
    // while df shows the pool free.
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let shmem_before = shmem_bytes();
    let mut kept = Vec::new();
    for round in 0..5 {
        let mut tenant = broker.client();
        let lease = tenant
            .create(CreateLease::new("vm/ram", 160 * MIB))
            .unwrap();
        lease.map().unwrap().write_at(0, VICTIM).unwrap();
        let fd = lease.into_fd();
        if round % 2 == 0 {
            tenant.release("vm/ram").unwrap();
        } else {
            drop(tenant); // disconnect
        }
        // The pool punches the memory out right after the namespace gave the lease back.
        wait_until(
            Duration::from_secs(10),
            "the lease's memory to go back",
            || pool(&broker).used == 0 && rustix::fs::fstat(&fd).unwrap().st_blocks == 0,
        );
        let st = rustix::fs::fstat(&fd).unwrap();
        assert_eq!(st.st_size as u64, 160 * MIB, "the size stays (sealed)");
        assert_eq!(
            read_victim(fd.as_fd()),
            vec![0; VICTIM.len()],
            "reads zeros"
        );
        kept.push(fd);
    }
    let df = pool(&broker);
    assert_eq!((df.used, df.free, df.leases), (0, 256 * MIB, 0));
    let grown = shmem_bytes().saturating_sub(shmem_before);
    assert!(
        grown < 160 * MIB,
        "Shmem grew by {} MiB with 5 x 160 MiB kept by ex-holders",
        grown / MIB
    );
    // An ex-holder writing again makes new memory of its own, not the broker's: it shows
    // in the file it keeps, while the pool stays free.
    rustix::io::pwrite(&kept[0], &[1u8; 4096], 0).unwrap();
    assert_eq!(rustix::fs::fstat(&kept[0]).unwrap().st_blocks, 8);
    assert_eq!(pool(&broker).used, 0);
}

/// A memory cgroup of its own (v1 `memory` hierarchy or v2), removed on drop.
struct MemoryCgroup {
    dir: std::path::PathBuf,
    usage: &'static str,
}

impl MemoryCgroup {
    fn new(name: &str) -> MemoryCgroup {
        let (root, usage) = if std::path::Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() {
            ("/sys/fs/cgroup/memory", "memory.usage_in_bytes")
        } else {
            ("/sys/fs/cgroup", "memory.current")
        };
        let dir = std::path::Path::new(root).join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(
            dir.join(usage).exists(),
            "{} has no memory controller",
            dir.display()
        );
        MemoryCgroup { dir, usage }
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    fn usage(&self) -> u64 {
        let text = std::fs::read_to_string(self.dir.join(self.usage)).unwrap();
        text.trim().parse().unwrap()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn an_ex_holder_writing_again_pays_for_it_itself() {
    // Made first, so that they are removed after the processes in them are gone.
    let (broker_cg, tenant_cg) = (
        MemoryCgroup::new("mb-broker"),
        MemoryCgroup::new("mb-tenant"),
    );
    let broker = TestBroker::start(&["--pool", "memfd:t:256M", "--socket-group", "65534"]);
    broker_cg.enter(broker.pid());
    broker
        .client()
        .create(
            CreateLease::new("vm/ram", 128 * MIB)
                .persistent(true)
                .owner(65534),
        )
        .unwrap();
    assert!(
        broker_cg.usage() >= 128 * MIB,
        "the broker pays for a lease"
    );
    let mut tenant = membroker_tests::tenant::as_nobody(&broker, &["keep", "vm/ram"]);
    assert_eq!(tenant.line(), "released");
    tenant_cg.enter(tenant.child.id());
    stdout_ok(&broker.run_cli(&["rm", "vm/ram"]));
    wait_until(
        Duration::from_secs(10),
        "the broker to give the memory back",
        || broker_cg.usage() < 32 * MIB,
    );
    use std::io::Write;
    writeln!(tenant.child.stdin.as_mut().unwrap(), "write").unwrap();
    assert_eq!(tenant.line(), "write ok");
    let (paid_by_tenant, paid_by_broker) = (tenant_cg.usage(), broker_cg.usage());
    assert!(
        paid_by_tenant >= 128 * MIB && paid_by_broker < 32 * MIB,
        "the ex-holder's writes are charged to it ({} MiB), not to the broker ({} MiB)",
        paid_by_tenant / MIB,
        paid_by_broker / MIB
    );
    let df = pool(&broker);
    assert_eq!((df.used, df.free), (0, 256 * MIB));
}
