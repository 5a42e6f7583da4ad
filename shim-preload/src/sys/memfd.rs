//! The memfd-backend hooks: `memfd_create` (remember a backend's memfd), `ftruncate`/
//! `ftruncate64` (put a lease of that size under QEMU's fd number), `fcntl`/`fcntl64` (seals
//! the lease already carries) and the `mmap` of the lease ([`map_backend`], called from the
//! mmap hook). The sequence and the bookkeeping are in [`crate::backend`].
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{c_char, c_int, c_uint, c_ulong, c_void, off_t};

use super::{errno, real_mmap, resolve, set_errno};
use crate::backend::{self, FileId, Pending};
use crate::broker::{self, Acquired, Instead, ShimError};
use crate::classify::{self, Guard, MmapArgs};
use crate::config::Fallback;
use crate::table::Backing;

type MemfdCreateFn = unsafe extern "C" fn(*const c_char, c_uint) -> c_int;
type FtruncateFn = unsafe extern "C" fn(c_int, off_t) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;

static REAL_MEMFD_CREATE: AtomicUsize = AtomicUsize::new(0);
static REAL_FTRUNCATE: AtomicUsize = AtomicUsize::new(0);
static REAL_FTRUNCATE64: AtomicUsize = AtomicUsize::new(0);
static REAL_FCNTL: AtomicUsize = AtomicUsize::new(0);
static REAL_FCNTL64: AtomicUsize = AtomicUsize::new(0);

/// Resolves the real symbols; called from the library constructor.
pub(super) fn init() {
    resolve(&REAL_MEMFD_CREATE, c"memfd_create");
    resolve(&REAL_FTRUNCATE, c"ftruncate");
    resolve(&REAL_FTRUNCATE64, c"ftruncate64");
    resolve(&REAL_FCNTL, c"fcntl");
    resolve(&REAL_FCNTL64, c"fcntl64");
}

/// The identity of an open file, or `None` when `fd` is not open.
fn file_id(fd: c_int) -> Option<FileId> {
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd is only borrowed for the fstat below, while our caller's call runs with
    // it; a closed number makes fstat fail with EBADF, nothing else.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// Interposed `memfd_create`: a memory backend's memfd is remembered for [`ftruncate64`].
///
/// # Safety
/// As for memfd_create(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memfd_create(name: *const c_char, flags: c_uint) -> c_int {
    let f = REAL_MEMFD_CREATE.load(Ordering::Acquire);
    let fd = if f == 0 {
        // SAFETY: the caller's arguments, as the system call takes them.
        unsafe { libc::syscall(libc::SYS_memfd_create, name, flags) as c_int }
    } else {
        // SAFETY: `f` came from dlsym("memfd_create").
        let f: MemfdCreateFn = unsafe { std::mem::transmute::<usize, MemfdCreateFn>(f) };
        // SAFETY: the caller's contract.
        unsafe { f(name, flags) }
    };
    if fd < 0 || name.is_null() || classify::in_shim() {
        return fd;
    }
    // SAFETY: the kernel just read `name` as a NUL-terminated string of the caller's.
    let is_backend = backend::is_backend_name(unsafe { CStr::from_ptr(name) }.to_bytes());
    if is_backend && classify::MIN_SIZE.load(Ordering::Relaxed) != usize::MAX {
        let saved = errno();
        if let Some(id) = file_id(fd) {
            backend::created(fd, id, flags);
        }
        set_errno(saved);
    }
    fd
}

/// # Safety
/// As for ftruncate(2).
unsafe fn real_ftruncate(slot: &AtomicUsize, fd: c_int, len: off_t) -> c_int {
    let f = slot.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: the caller's arguments.
        return unsafe { libc::syscall(libc::SYS_ftruncate, fd, len) } as c_int;
    }
    // SAFETY: `f` came from dlsym("ftruncate") or dlsym("ftruncate64"), both FtruncateFn.
    let f: FtruncateFn = unsafe { std::mem::transmute::<usize, FtruncateFn>(f) };
    // SAFETY: the caller's contract.
    unsafe { f(fd, len) }
}

/// Interposed `ftruncate`.
///
/// # Safety
/// As for ftruncate(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: off_t) -> c_int {
    // SAFETY: same contract.
    unsafe { size_backend(&REAL_FTRUNCATE, fd, len) }
}

/// Interposed `ftruncate64` (the same function on 64-bit glibc; QEMU imports this one).
///
/// # Safety
/// As for ftruncate(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: off_t) -> c_int {
    // SAFETY: same contract.
    unsafe { size_backend(&REAL_FTRUNCATE64, fd, len) }
}

/// Sizing a backend's memfd: put a lease of `len` bytes under `fd`.
///
/// # Safety
/// As for ftruncate(2).
unsafe fn size_backend(real: &AtomicUsize, fd: c_int, len: off_t) -> c_int {
    if backend::CREATED.load(Ordering::Relaxed) == 0 || classify::in_shim() {
        // SAFETY: exactly our caller's request.
        return unsafe { real_ftruncate(real, fd, len) };
    }
    let saved = errno();
    let created = backend::take_created(fd, file_id(fd));
    let min = classify::MIN_SIZE.load(Ordering::Relaxed);
    let size = usize::try_from(len).unwrap_or(0);
    let Some(created) = created.filter(|_| size >= min && size > 0) else {
        set_errno(saved);
        // SAFETY: exactly our caller's request.
        return unsafe { real_ftruncate(real, fd, len) };
    };
    let _guard = Guard::enter();
    for stale in backend::take_stale(|fd, id| file_id(fd) == Some(id)) {
        broker::abandon(stale);
    }
    let adopted = broker::acquire(size as u64, backend::page_hint(created.flags))
        .and_then(|lease| adopt(fd, created.flags, size as u64, lease));
    match adopted {
        Ok(()) => {
            set_errno(saved);
            0
        }
        Err(err) => match broker::complain(&err, size, Instead::Memfd) {
            Fallback::Fail => {
                set_errno(err.errno());
                -1
            }
            Fallback::Anon => {
                set_errno(saved);
                // SAFETY: exactly our caller's request, on the memfd QEMU made.
                unsafe { real_ftruncate(real, fd, len) }
            }
        },
    }
}

/// Puts `lease` under QEMU's fd number (closing QEMU's own memfd) and keeps it until QEMU
/// maps it.
fn adopt(fd: c_int, flags: c_uint, size: u64, lease: Acquired) -> Result<(), ShimError> {
    if lease.backing == Backing::DevDax {
        let err = ShimError::DevDaxBackend {
            name: lease.name.clone(),
        };
        broker::abandon(lease);
        return Err(err);
    }
    let Some(id) = file_id(lease.fd.as_raw_fd()) else {
        let err = ShimError::Adopt {
            name: lease.name.clone(),
            errno: errno(),
        };
        broker::abandon(lease);
        return Err(err);
    };
    let cloexec = if flags & libc::MFD_CLOEXEC != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    // SAFETY: dup3 onto the fd number our caller is sizing (its own memfd, which this closes)
    // a copy of the lease fd; no memory is passed.
    if unsafe { libc::dup3(lease.fd.as_raw_fd(), fd, cloexec) } < 0 {
        let err = ShimError::Adopt {
            name: lease.name.clone(),
            errno: errno(),
        };
        broker::abandon(lease);
        return Err(err);
    }
    backend::hold(Pending {
        fd,
        id,
        size,
        lease,
    })
    .map_err(|lease| {
        let err = ShimError::TableFull;
        broker::abandon(lease);
        err
    })
}

/// # Safety
/// As for fcntl(2) with the caller's arguments.
unsafe fn real_fcntl(slot: &AtomicUsize, fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let f = slot.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: the caller's arguments.
        return unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) } as c_int;
    }
    // SAFETY: `f` came from dlsym("fcntl") or dlsym("fcntl64"), both variadic after `cmd`.
    let f: FcntlFn = unsafe { std::mem::transmute::<usize, FcntlFn>(f) };
    // SAFETY: the caller's contract; the one variadic argument is passed on as it came.
    unsafe { f(fd, cmd, arg) }
}

/// Interposed `fcntl`. Declared with one fixed third argument: on the x86_64 and aarch64
/// Linux ABIs a variadic integer or pointer argument arrives exactly where a fixed one does,
/// and every fcntl command takes at most one.
///
/// # Safety
/// As for fcntl(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: same contract.
    unsafe { seal_backend(&REAL_FCNTL, fd, cmd, arg) }
}

/// Interposed `fcntl64` (QEMU imports this one).
///
/// # Safety
/// As for fcntl(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: same contract.
    unsafe { seal_backend(&REAL_FCNTL64, fd, cmd, arg) }
}

/// `F_ADD_SEALS` on a backend's lease succeeds when the lease already carries those seals (the
/// broker sealed it with `F_SEAL_SEAL`, so the kernel would refuse any new seal).
///
/// # Safety
/// As for fcntl(2).
unsafe fn seal_backend(real: &AtomicUsize, fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    if cmd != libc::F_ADD_SEALS
        || backend::PENDING.load(Ordering::Relaxed) == 0
        || classify::in_shim()
    {
        // SAFETY: exactly our caller's request.
        return unsafe { real_fcntl(real, fd, cmd, arg) };
    }
    let saved = errno();
    if backend::is_pending(fd, file_id(fd)) {
        // SAFETY: F_GET_SEALS takes no argument and changes nothing.
        let current = unsafe { real_fcntl(real, fd, libc::F_GET_SEALS, 0) };
        if u32::try_from(current).is_ok_and(|c| backend::seals_satisfied(arg as u32, c)) {
            set_errno(saved);
            return 0;
        }
    }
    set_errno(saved);
    // SAFETY: exactly our caller's request.
    unsafe { real_fcntl(real, fd, cmd, arg) }
}

/// QEMU's mapping of a pending backend's lease: map it shared (the lease is the RAM even when
/// the backend says `share=off`) and record the block, or `None` when the call is not that.
pub(super) fn map_backend(args: &MmapArgs) -> Option<*mut c_void> {
    let id = file_id(args.fd);
    let pending = backend::take_pending(args.fd, id, args.len, args.offset)?;
    let _guard = Guard::enter();
    let shared = MmapArgs {
        flags: (args.flags & !libc::MAP_TYPE) | libc::MAP_SHARED,
        ..*args
    };
    // SAFETY: our caller's own request (its fd, address, length and protection), shared.
    let ptr = unsafe { real_mmap(&shared) };
    if ptr == libc::MAP_FAILED {
        let saved = errno();
        if let Err(lease) = backend::hold(pending) {
            broker::abandon(lease);
        }
        set_errno(saved);
        return Some(ptr);
    }
    let saved = errno();
    // A full table leaves the mapping as it is: it is QEMU's fd, already the lease.
    let _ = broker::commit_backend(pending.lease, ptr as usize, args.len);
    set_errno(saved);
    Some(ptr)
}
