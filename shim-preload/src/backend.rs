//! QEMU's `memory-backend-memfd` (`docs/qemu-guest-ram.md`, "memfd backends"): the memfd QEMU
//! makes for a memory backend becomes a lease, under the same fd number.
//!
//! QEMU 7.2 makes a memfd backend's RAM with
//!
//! ```text
//! fd = memfd_create("memory-backend-memfd", MFD_CLOEXEC [| MFD_ALLOW_SEALING] [| MFD_HUGETLB | size])
//! ftruncate(fd, S)
//! fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)     (seal=on, the default)
//! R = mmap(NULL, S + page, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)
//! mmap(R, S, RW, MAP_SHARED|MAP_FIXED, fd, 0)                             (share=on, the default)
//! ```
//!
//! and hands `fd` to vhost-user back-ends. The shim lets `memfd_create` make an ordinary memfd
//! and remembers it as *created*; `ftruncate` is the first call that knows the size, so there
//! the shim takes a lease of that size and puts it under QEMU's fd number (`dup3`), and the
//! backend is *pending*; the seal call succeeds when the lease already carries the seals; the
//! `mmap` of the lease records the block in the block table, so that discards, memory-error
//! reports and the release at `munmap` work as for anonymous RAM. Every other memfd (other
//! names, or smaller than `MEMBROKER_MIN_SIZE`) stays what QEMU made.
//!
//! Only memfd leases can serve: QEMU 7.2 (linked with libdaxctl) refuses a device-dax fd under
//! a memfd backend, whose `align` is 0 ("backing store align … is larger than 'align' option"),
//! so the shim refuses a device-dax lease there itself, with a message that says what to do.
//!
//! fds are matched by number *and* identity (device and inode), so a number QEMU closed and
//! reused for something else is never mistaken for a backend. Only this module's mutex is
//! taken, on calls already recognised as a backend's; the hooks' fast path reads two counters.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use membroker_client::PageSize;

use crate::broker::Acquired;

/// The name QEMU gives every `memory-backend-memfd` memfd (`TYPE_MEMORY_BACKEND_MEMFD`).
pub const BACKEND_NAME: &[u8] = b"memory-backend-memfd";

/// How many backends may be between `memfd_create` and `mmap` at once (QEMU makes them one at
/// a time, on its main thread).
const SLOTS: usize = 8;

/// A file's identity: (device, inode).
pub type FileId = (u64, u64);

/// How many backends were created and not yet sized; 0 lets `ftruncate` skip every lookup.
pub static CREATED: AtomicUsize = AtomicUsize::new(0);
/// How many backends are sized onto a lease and not yet mapped; 0 lets `fcntl` and `mmap`
/// skip every lookup.
pub static PENDING: AtomicUsize = AtomicUsize::new(0);

/// A backend memfd QEMU made and has not sized yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    pub fd: i32,
    pub id: FileId,
    /// The `memfd_create` flags.
    pub flags: u32,
}

/// A lease now under QEMU's fd number, waiting for QEMU's mapping.
#[derive(Debug)]
pub struct Pending {
    pub fd: i32,
    /// The lease's identity.
    pub id: FileId,
    pub size: u64,
    pub lease: Acquired,
}

struct Backends {
    created: [Option<Created>; SLOTS],
    pending: [Option<Pending>; SLOTS],
}

static BACKENDS: Mutex<Backends> = Mutex::new(Backends {
    created: [None; SLOTS],
    pending: [const { None }; SLOTS],
});

fn backends() -> MutexGuard<'static, Backends> {
    BACKENDS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a memfd of this name is a QEMU memory backend's.
pub fn is_backend_name(name: &[u8]) -> bool {
    name == BACKEND_NAME
}

/// The page size the backend asked for with `MFD_HUGETLB` (`hugetlb=on`, `hugetlbsize=`), if
/// any. Without a size the kernel uses the default huge page size, 2 MiB on x86_64.
pub fn page_hint(flags: u32) -> Option<PageSize> {
    if flags & libc::MFD_HUGETLB == 0 {
        return None;
    }
    match (flags >> libc::MFD_HUGE_SHIFT) & libc::MFD_HUGE_MASK {
        30 => Some(PageSize::Huge1G),
        _ => Some(PageSize::Huge2M),
    }
}

/// Whether a lease that carries `current` seals already has every seal in `requested`, so that
/// QEMU's `F_ADD_SEALS` can succeed without a call the lease's `F_SEAL_SEAL` would refuse.
pub fn seals_satisfied(requested: u32, current: u32) -> bool {
    requested & !current == 0
}

/// Remembers a backend memfd QEMU just made. Returns false when too many are outstanding
/// (the memfd then stays ordinary).
pub fn created(fd: i32, id: FileId, flags: u32) -> bool {
    let mut b = backends();
    // A slot whose fd number is reused is stale: QEMU closed that memfd.
    for slot in b.created.iter_mut() {
        if slot.is_some_and(|c| c.fd == fd) {
            *slot = None;
            CREATED.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let Some(slot) = b.created.iter_mut().find(|s| s.is_none()) else {
        return false;
    };
    *slot = Some(Created { fd, id, flags });
    CREATED.fetch_add(1, Ordering::Relaxed);
    true
}

/// Takes the created backend that `fd` (of identity `id`) still is.
pub fn take_created(fd: i32, id: Option<FileId>) -> Option<Created> {
    let mut b = backends();
    let slot = b
        .created
        .iter_mut()
        .find(|s| s.is_some_and(|c| c.fd == fd))?;
    let created = slot.take()?;
    CREATED.fetch_sub(1, Ordering::Relaxed);
    // Another file under that number: the backend's memfd was closed, forget it.
    (Some(created.id) == id).then_some(created)
}

/// Takes the pending leases whose fd QEMU closed without mapping them (a backend that failed
/// half-way): `is_open(fd, id)` says whether that fd still is that lease.
pub fn take_stale(is_open: impl Fn(i32, FileId) -> bool) -> Vec<Acquired> {
    let mut b = backends();
    let mut stale = Vec::new();
    for slot in b.pending.iter_mut() {
        if slot.as_ref().is_some_and(|p| !is_open(p.fd, p.id))
            && let Some(p) = slot.take()
        {
            PENDING.fetch_sub(1, Ordering::Relaxed);
            stale.push(p.lease);
        }
    }
    stale
}

/// Remembers a lease put under QEMU's fd number until QEMU maps it. Gives the lease back when
/// there is no room.
pub fn hold(pending: Pending) -> Result<(), Acquired> {
    let mut b = backends();
    let Some(slot) = b.pending.iter_mut().find(|s| s.is_none()) else {
        return Err(pending.lease);
    };
    *slot = Some(pending);
    PENDING.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Whether `fd` (of identity `id`) is a pending backend's lease.
pub fn is_pending(fd: i32, id: Option<FileId>) -> bool {
    let b = backends();
    b.pending
        .iter()
        .flatten()
        .any(|p| p.fd == fd && Some(p.id) == id)
}

/// Takes the pending lease that `fd` (of identity `id`) is, when QEMU maps all of it.
pub fn take_pending(fd: i32, id: Option<FileId>, len: usize, offset: i64) -> Option<Pending> {
    let mut b = backends();
    let slot = b.pending.iter_mut().find(|s| {
        s.as_ref()
            .is_some_and(|p| p.fd == fd && Some(p.id) == id && offset == 0 && p.size == len as u64)
    })?;
    let pending = slot.take();
    PENDING.fetch_sub(1, Ordering::Relaxed);
    pending
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_backend_name_is_taken() {
        assert!(is_backend_name(b"memory-backend-memfd"));
        for other in [
            &b"test"[..],
            b"memory-backend-memfd2",
            b"memory-backend-file",
            b"vhost-log",
            b"",
        ] {
            assert!(!is_backend_name(other));
        }
    }

    #[test]
    fn hugetlb_flags_give_the_page_size() {
        let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        assert_eq!(page_hint(base), None);
        assert_eq!(page_hint(base | libc::MFD_HUGETLB), Some(PageSize::Huge2M));
        assert_eq!(
            page_hint(base | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB),
            Some(PageSize::Huge2M)
        );
        assert_eq!(
            page_hint(base | libc::MFD_HUGETLB | libc::MFD_HUGE_1GB),
            Some(PageSize::Huge1G)
        );
    }

    #[test]
    fn seals_already_there_are_satisfied() {
        let qemu = (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL) as u32;
        assert!(seals_satisfied(qemu, qemu));
        assert!(seals_satisfied(0, 0));
        assert!(!seals_satisfied(qemu, libc::F_SEAL_SEAL as u32));
        assert!(!seals_satisfied(libc::F_SEAL_WRITE as u32, qemu));
    }

    #[test]
    fn pending_leases_are_mapped_whole_or_taken_when_stale() {
        let lease = |name: &str| Acquired {
            fd: rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC).unwrap(),
            name: name.to_string(),
            backing: crate::table::Backing::Memfd,
            page: 4096,
            created: true,
        };
        // fd numbers and identities no other test uses.
        let (a, b) = ((9101, (7, 1)), (9102, (7, 2)));
        for ((fd, id), name) in [(a, "a"), (b, "b")] {
            let pending = Pending {
                fd,
                id,
                size: 8192,
                lease: lease(name),
            };
            hold(pending).unwrap();
        }
        let stale = take_stale(|fd, _| fd != a.0);
        assert_eq!(
            stale.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert!(!is_pending(a.0, Some(a.1)));
        assert!(is_pending(b.0, Some(b.1)));
        assert!(
            !is_pending(b.0, Some((7, 3))),
            "another file under that number"
        );
        assert!(
            take_pending(b.0, Some(b.1), 4096, 0).is_none(),
            "part of it"
        );
        assert!(
            take_pending(b.0, Some(b.1), 8192, 4096).is_none(),
            "at an offset"
        );
        assert_eq!(
            take_pending(b.0, Some(b.1), 8192, 0).unwrap().lease.name,
            "b"
        );
        assert!(!is_pending(b.0, Some(b.1)));
    }

    #[test]
    fn created_backends_are_matched_by_number_and_identity() {
        // Uses the global set; fd numbers no other test uses.
        assert!(created(9001, (1, 2), 0));
        assert_eq!(take_created(9001, Some((1, 3))), None);
        assert_eq!(take_created(9001, Some((1, 2))), None, "taken once");
        assert!(created(9002, (1, 4), 3));
        // The number is reused by a new backend: the old entry goes.
        assert!(created(9002, (1, 5), 3));
        assert_eq!(
            take_created(9002, Some((1, 5))),
            Some(Created {
                fd: 9002,
                id: (1, 5),
                flags: 3
            })
        );
        assert_eq!(take_created(9002, Some((1, 4))), None);
    }
}
