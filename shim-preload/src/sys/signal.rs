//! SIGBUS: the `sigaction`/`signal` family hooks and the shim's handler, which reports memory
//! errors in redirected blocks to the broker and then runs the application's handler.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

use libc::{c_int, c_void, sighandler_t, siginfo_t};

use super::{
    REAL_BSD_SIGNAL, REAL_SIGNAL, REAL_SYSV_SIGNAL, SignalFn, errno, real_sigaction, resolved,
    set_errno,
};
use crate::broker;
use crate::poison;
use crate::table::{NAME_MAX, TABLE};

type InfoHandler = extern "C" fn(c_int, *mut siginfo_t, *mut c_void);
type PlainHandler = extern "C" fn(c_int);

const SIGACTION_WORDS: usize = std::mem::size_of::<libc::sigaction>().div_ceil(8);

/// The SIGBUS action the application believes is installed (a raw copy of its struct).
static APP_ACTION: [AtomicU64; SIGACTION_WORDS] = [const { AtomicU64::new(0) }; SIGACTION_WORDS];
/// Whether the application ever set a SIGBUS action through the hooks.
static APP_SET: AtomicBool = AtomicBool::new(false);
/// The application's handler and flags, for the signal handler.
static APP_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static APP_FLAGS: AtomicI32 = AtomicI32::new(0);

const BUS_MCEERR_AR: c_int = 4;
const BUS_MCEERR_AO: c_int = 5;
/// Offset of `si_addr_lsb` in the kernel's siginfo for SIGBUS on 64-bit (after `si_addr`).
const SI_ADDR_LSB_OFFSET: usize = 24;

fn store_app(action: &libc::sigaction) {
    let mut words = [0u64; SIGACTION_WORDS];
    // SAFETY: `words` is at least as large as the struct, and both are plain data.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (action as *const libc::sigaction).cast::<u8>(),
            words.as_mut_ptr().cast::<u8>(),
            std::mem::size_of::<libc::sigaction>(),
        )
    };
    for (dst, w) in APP_ACTION.iter().zip(words) {
        dst.store(w, Ordering::Relaxed);
    }
    APP_FLAGS.store(action.sa_flags, Ordering::Relaxed);
    APP_HANDLER.store(action.sa_sigaction, Ordering::Release);
    APP_SET.store(true, Ordering::Release);
}

fn load_app() -> libc::sigaction {
    let mut words = [0u64; SIGACTION_WORDS];
    for (w, src) in words.iter_mut().zip(&APP_ACTION) {
        *w = src.load(Ordering::Relaxed);
    }
    let mut action = MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: copies back bytes that `store_app` took from a valid struct sigaction (or zeroes,
    // a valid SIG_DFL action).
    unsafe {
        std::ptr::copy_nonoverlapping(
            words.as_ptr().cast::<u8>(),
            action.as_mut_ptr().cast::<u8>(),
            std::mem::size_of::<libc::sigaction>(),
        );
        action.assume_init()
    }
}

/// Interposed `sigaction`: for SIGBUS the application's handler is recorded, the shim's is
/// what the kernel runs, and the application always sees its own handler as the old action.
///
/// # Safety
/// As for sigaction(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if sig != libc::SIGBUS {
        // SAFETY: exactly our caller's request.
        return unsafe { real_sigaction(sig, act, old) };
    }
    // SAFETY: the caller passes null or valid pointers.
    unsafe { bus_sigaction(act.as_ref(), old.as_mut()) }
}

/// # Safety
/// None beyond the references being valid; unsafe only because it installs handlers.
unsafe fn bus_sigaction(act: Option<&libc::sigaction>, old: Option<&mut libc::sigaction>) -> c_int {
    let previous = if APP_SET.load(Ordering::Acquire) {
        load_app()
    } else {
        let mut kernel = MaybeUninit::<libc::sigaction>::zeroed();
        // SAFETY: a query into a local struct.
        if unsafe { real_sigaction(libc::SIGBUS, std::ptr::null(), kernel.as_mut_ptr()) } != 0 {
            return -1;
        }
        // SAFETY: sigaction filled it (and it was zeroed before).
        unsafe { kernel.assume_init() }
    };
    if let Some(act) = act {
        let handler = act.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // SAFETY: the caller's own action.
            if unsafe { real_sigaction(libc::SIGBUS, act, std::ptr::null_mut()) } != 0 {
                return -1;
            }
            store_app(act);
        } else if handler != on_sigbus as InfoHandler as usize {
            let mut ours = *act;
            ours.sa_sigaction = on_sigbus as InfoHandler as usize;
            ours.sa_flags = libc::SA_SIGINFO
                | (act.sa_flags & (libc::SA_ONSTACK | libc::SA_NODEFER | libc::SA_RESTART));
            // Record first, so a SIGBUS right after the install finds the new handler.
            store_app(act);
            // SAFETY: installs the shim's handler, a valid SA_SIGINFO handler for the process's life.
            if unsafe { real_sigaction(libc::SIGBUS, &ours, std::ptr::null_mut()) } != 0 {
                let e = errno();
                store_app(&previous);
                set_errno(e);
                return -1;
            }
        }
    }
    if let Some(old) = old {
        *old = previous;
    }
    0
}

fn signal_like(
    sig: c_int,
    handler: sighandler_t,
    flags: c_int,
    real: &AtomicUsize,
    name: &CStr,
) -> sighandler_t {
    if sig != libc::SIGBUS {
        let f = resolved(real, name);
        if f == 0 {
            set_errno(libc::ENOSYS);
            return libc::SIG_ERR;
        }
        // SAFETY: `f` came from dlsym of a signal(3)-shaped function.
        let f: SignalFn = unsafe { std::mem::transmute::<usize, SignalFn>(f) };
        // SAFETY: exactly our caller's request.
        return unsafe { f(sig, handler) };
    }
    // SAFETY: a zeroed sigaction is valid; the fields that matter are set below.
    let mut act: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    act.sa_sigaction = handler;
    act.sa_flags = flags;
    if flags & libc::SA_NODEFER == 0 {
        // SAFETY: adds a valid signal to a local set.
        unsafe { libc::sigaddset(&mut act.sa_mask, sig) };
    }
    // SAFETY: a zeroed sigaction is valid.
    let mut old: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    // SAFETY: both references are to locals.
    if unsafe { bus_sigaction(Some(&act), Some(&mut old)) } != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// Interposed `signal` (BSD semantics, like glibc's).
///
/// # Safety
/// As for signal(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: sighandler_t) -> sighandler_t {
    signal_like(sig, handler, libc::SA_RESTART, &REAL_SIGNAL, c"signal")
}

/// Interposed `bsd_signal`.
///
/// # Safety
/// As for bsd_signal(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: sighandler_t) -> sighandler_t {
    signal_like(
        sig,
        handler,
        libc::SA_RESTART,
        &REAL_BSD_SIGNAL,
        c"bsd_signal",
    )
}

/// Interposed `sysv_signal` (one-shot, not deferred).
///
/// # Safety
/// As for sysv_signal(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sysv_signal(sig: c_int, handler: sighandler_t) -> sighandler_t {
    signal_like(
        sig,
        handler,
        libc::SA_RESETHAND | libc::SA_NODEFER,
        &REAL_SYSV_SIGNAL,
        c"sysv_signal",
    )
}

/// The SIGBUS handler the kernel runs: report memory errors in redirected blocks to the
/// broker, then run the application's handler with the same arguments. Async-signal-safe.
extern "C" fn on_sigbus(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let saved = errno();
    if !info.is_null() {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let code = unsafe { (*info).si_code };
        if code == BUS_MCEERR_AR || code == BUS_MCEERR_AO {
            // SAFETY: as above; for SIGBUS the union holds si_addr.
            let addr = unsafe { (*info).si_addr() } as usize;
            // SAFETY: si_addr_lsb follows si_addr in the SIGBUS member of the union, inside
            // the 128-byte siginfo.
            let lsb = unsafe {
                info.cast::<u8>()
                    .add(SI_ADDR_LSB_OFFSET)
                    .cast::<i16>()
                    .read_unaligned()
            };
            report_poison(addr, lsb);
        }
    }
    set_errno(saved);
    chain(sig, info, ctx);
    set_errno(saved);
}

fn report_poison(addr: usize, lsb: i16) {
    let fd = broker::POISON_FD.load(Ordering::Acquire);
    let Some(block) = TABLE.find(addr) else {
        return;
    };
    if fd < 0 {
        return;
    }
    let mut name = [0u8; NAME_MAX];
    let Some(name_len) = TABLE.copy_name(&block, &mut name) else {
        return;
    };
    let Some(name) = name
        .get(..name_len)
        .and_then(|n| std::str::from_utf8(n).ok())
    else {
        return;
    };
    let (offset, len) = poison::error_range(block.start, block.len, addr, lsb);
    let mut buf = [0u8; poison::REPORT_MAX];
    let version = broker::POISON_VERSION.load(Ordering::Acquire);
    let Some(n) = poison::encode(&mut buf, version, name, offset, len) else {
        return;
    };
    // Drop the broker's replies to earlier reports first, so they never fill the socket.
    let mut sink = [0u8; 128];
    // SAFETY: non-blocking recv(2) into a stack buffer; async-signal-safe.
    while unsafe { libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT) } > 0 {}
    // SAFETY: send(2) of a stack buffer on the pre-connected socket; async-signal-safe.
    unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            n,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

fn chain(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let handler = APP_HANDLER.load(Ordering::Acquire);
    let flags = APP_FLAGS.load(Ordering::Relaxed);
    if handler == libc::SIG_IGN {
        return;
    }
    if handler == libc::SIG_DFL || flags & libc::SA_RESETHAND != 0 {
        // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask.
        let dfl: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
        APP_HANDLER.store(libc::SIG_DFL, Ordering::Release);
        // SAFETY: sigaction is async-signal-safe; `dfl` is a valid local.
        unsafe { real_sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()) };
        if handler == libc::SIG_DFL {
            // Default action: a real fault refaults on return; a queued signal is re-sent and
            // stays pending until this handler returns.
            // SAFETY: raw syscalls with integer arguments, async-signal-safe.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::syscall(libc::SYS_gettid),
                    libc::SIGBUS,
                );
            }
            return;
        }
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the application installed this value as an SA_SIGINFO handler.
        let f: InfoHandler = unsafe { std::mem::transmute::<usize, InfoHandler>(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the application installed this value as a plain handler.
        let f: PlainHandler = unsafe { std::mem::transmute::<usize, PlainHandler>(handler) };
        f(sig);
    }
}
