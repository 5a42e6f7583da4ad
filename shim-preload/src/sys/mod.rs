//! The crate's unsafe code: the library constructor, the real libc symbols and errno here; the
//! memory hooks in [`mem`]; the memfd-backend hooks in [`memfd`]; the `mbind` hook in
//! [`numa`]; the signal hooks and the SIGBUS handler in [`signal`].
//!
//! Rules for everything here (the crate's README.md, "Rules for hook code"): hook bodies on the
//! fast path and the SIGBUS handler do not allocate, lock, log or panic; errno is saved and set
//! explicitly; real symbols are resolved with `dlsym(RTLD_NEXT)` in the library constructor,
//! and a hook that runs before that (another library's constructor) or re-enters from the
//! shim's own slow path goes to the kernel with a raw syscall. The shim's own memory calls
//! never go through rustix.
#![allow(unsafe_code)]

mod mem;
mod memfd;
mod numa;
mod signal;

use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{c_int, c_void, off_t, sighandler_t, size_t};

use crate::broker;
use crate::classify::{self, MmapArgs};

type MmapFn = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
type MunmapFn = unsafe extern "C" fn(*mut c_void, size_t) -> c_int;
type MadviseFn = unsafe extern "C" fn(*mut c_void, size_t, c_int) -> c_int;
type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
pub(crate) type SignalFn = unsafe extern "C" fn(c_int, sighandler_t) -> sighandler_t;

static REAL_MMAP: AtomicUsize = AtomicUsize::new(0);
static REAL_MUNMAP: AtomicUsize = AtomicUsize::new(0);
static REAL_MADVISE: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
pub(crate) static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);
pub(crate) static REAL_BSD_SIGNAL: AtomicUsize = AtomicUsize::new(0);
pub(crate) static REAL_SYSV_SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// Runs when the library is loaded, before `main`.
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = init;

extern "C" fn init() {
    resolve(&REAL_MMAP, c"mmap");
    resolve(&REAL_MUNMAP, c"munmap");
    resolve(&REAL_MADVISE, c"madvise");
    resolve(&REAL_SIGACTION, c"sigaction");
    resolve(&REAL_SIGNAL, c"signal");
    resolve(&REAL_BSD_SIGNAL, c"bsd_signal");
    resolve(&REAL_SYSV_SIGNAL, c"sysv_signal");
    memfd::init();
    let saved = errno();
    let min = match broker::load_config() {
        Some(cfg) => {
            if cfg
                .page_size
                .is_some_and(|p| p.bytes() > classify::QEMU_ALIGN as u64)
            {
                let align = cfg.page_size.map_or(0, |p| p.bytes());
                classify::WIDEN_ALIGN.store(usize::try_from(align).unwrap_or(0), Ordering::Relaxed);
            }
            usize::try_from(cfg.min_size).unwrap_or(usize::MAX)
        }
        // A bad configuration is reported at the first RAM block, which then fails.
        None => usize::try_from(crate::config::DEFAULT_MIN_SIZE).unwrap_or(usize::MAX),
    };
    classify::MIN_SIZE.store(min, Ordering::Relaxed);
    set_errno(saved);
}

fn resolve(slot: &AtomicUsize, name: &CStr) {
    // SAFETY: RTLD_NEXT and a NUL-terminated name are what dlsym expects; a null result is
    // kept as 0 and makes the hooks use raw syscalls.
    let sym = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    slot.store(sym as usize, Ordering::Release);
}

/// The real symbol; resolved on the spot when a hook runs before the constructor (another
/// library's constructor calling `signal`, single-threaded during start-up). Never used for
/// mmap, munmap or madvise, which fall back to raw syscalls instead.
pub(crate) fn resolved(slot: &AtomicUsize, name: &CStr) -> usize {
    let f = slot.load(Ordering::Acquire);
    if f != 0 {
        return f;
    }
    resolve(slot, name);
    slot.load(Ordering::Acquire)
}

pub(crate) fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    unsafe { *libc::__errno_location() }
}

pub(crate) fn set_errno(value: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = value };
}

/// The real mmap, or the raw syscall when it is not resolved yet.
///
/// # Safety
/// The caller must be entitled to make this mapping (it is its caller's own request, or a
/// replacement of memory the shim redirected).
pub(crate) unsafe fn real_mmap(args: &MmapArgs) -> *mut c_void {
    let f = REAL_MMAP.load(Ordering::Acquire);
    let addr = args.addr as *mut c_void;
    if f == 0 {
        // SAFETY: the caller's contract; SYS_mmap takes exactly these six arguments.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                addr,
                args.len,
                args.prot,
                args.flags,
                args.fd,
                args.offset,
            )
        };
        return r as *mut c_void;
    }
    // SAFETY: `f` came from dlsym("mmap"), whose type is MmapFn.
    let f: MmapFn = unsafe { std::mem::transmute::<usize, MmapFn>(f) };
    // SAFETY: the caller's contract.
    unsafe { f(addr, args.len, args.prot, args.flags, args.fd, args.offset) }
}

/// # Safety
/// The caller must own the range (its caller's request, or the shim's own trim).
pub(crate) unsafe fn real_munmap(addr: usize, len: usize) -> c_int {
    let f = REAL_MUNMAP.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: the caller's contract.
        return unsafe { libc::syscall(libc::SYS_munmap, addr, len) } as c_int;
    }
    // SAFETY: `f` came from dlsym("munmap").
    let f: MunmapFn = unsafe { std::mem::transmute::<usize, MunmapFn>(f) };
    // SAFETY: the caller's contract.
    unsafe { f(addr as *mut c_void, len) }
}

/// # Safety
/// As for madvise(2) called by the hook's caller.
pub(crate) unsafe fn real_madvise(addr: usize, len: usize, advice: c_int) -> c_int {
    let f = REAL_MADVISE.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: the caller's contract.
        return unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) } as c_int;
    }
    // SAFETY: `f` came from dlsym("madvise").
    let f: MadviseFn = unsafe { std::mem::transmute::<usize, MadviseFn>(f) };
    // SAFETY: the caller's contract.
    unsafe { f(addr as *mut c_void, len, advice) }
}

/// # Safety
/// `act` and `old` must be null or valid.
pub(crate) unsafe fn real_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let f = resolved(&REAL_SIGACTION, c"sigaction");
    if f == 0 {
        // The kernel's struct differs from glibc's; without the real symbol, refuse.
        set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: `f` came from dlsym("sigaction").
    let f: SigactionFn = unsafe { std::mem::transmute::<usize, SigactionFn>(f) };
    // SAFETY: the caller's contract.
    unsafe { f(sig, act, old) }
}

/// Closes a lease fd the block table owned.
pub(crate) fn close_table_fd(fd: i32) {
    if fd >= 0 {
        // SAFETY: the table held the only copy of this fd (see `broker::commit`), and the slot
        // was cleared before this call, so nothing else closes or uses it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Starts a background thread of the shim with every signal blocked, so that QEMU's
/// process-directed signals (SIGTERM, SIGINT, SIGBUS action-optional reports, its own IPIs)
/// are never delivered on a thread QEMU does not know about. The mask is set on the creating
/// thread around the spawn (a new thread inherits it), so no signal reaches the new thread
/// before it could block them itself.
pub(crate) fn spawn_blocking_signals(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; sigfillset initialises it fully.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; zeroed is a valid starting point for sigfillset.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: valid sigset pointers; changes only this thread's mask, restored below.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(body);
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned.map(drop)
}
