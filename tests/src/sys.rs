//! The test harness's unsafe code: catching SIGBUS around a memory-error injection, and a
//! child that ends with the test.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

static CODE: AtomicI32 = AtomicI32::new(0);
static ADDR: AtomicUsize = AtomicUsize::new(0);
static LSB: AtomicU64 = AtomicU64::new(0);

extern "C" fn record(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let info = unsafe { &*info };
    CODE.store(info.si_code, Ordering::SeqCst);
    // SAFETY: si_addr is valid for SIGBUS.
    ADDR.store(unsafe { info.si_addr() } as usize, Ordering::SeqCst);
    // si_addr_lsb (a short) follows si_addr in the SIGBUS layout: offset 16 + 8 on x86_64.
    // SAFETY: siginfo_t is 128 bytes; offset 24 is inside it.
    let lsb = unsafe {
        (info as *const libc::siginfo_t)
            .cast::<u8>()
            .add(24)
            .cast::<i16>()
            .read_unaligned()
    };
    LSB.store(lsb as u64, Ordering::SeqCst);
}

/// A SIGBUS the kernel delivered: si_code, si_addr, si_addr_lsb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sigbus {
    pub code: i32,
    pub addr: usize,
    pub lsb: u32,
}

/// `madvise(addr, len, MADV_HWPOISON)` (root) with a recording SIGBUS handler installed;
/// returns the signal if one arrived.
pub fn inject_hwpoison(addr: *mut u8, len: usize) -> Result<Option<Sigbus>, std::io::Error> {
    CODE.store(0, Ordering::SeqCst);
    // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler that only stores atomics.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = record as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    let mut old: libc::sigaction = unsafe {
        // SAFETY: plain data, filled by the kernel below.
        std::mem::zeroed()
    };
    // SAFETY: valid pointers to sigaction structs.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the caller's mapping; MADV_HWPOISON only marks the page poisoned (root).
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HWPOISON) };
    let err = std::io::Error::last_os_error();
    // SAFETY: restores the previous action.
    unsafe { libc::sigaction(libc::SIGBUS, &old, std::ptr::null_mut()) };
    if rc != 0 && CODE.load(Ordering::SeqCst) == 0 {
        return Err(err);
    }
    let code = CODE.load(Ordering::SeqCst);
    Ok((code != 0).then(|| Sigbus {
        code,
        addr: ADDR.load(Ordering::SeqCst),
        lsb: LSB.load(Ordering::SeqCst) as u32,
    }))
}

/// Tries a shared, writable mapping of `len` bytes of `fd` and unmaps it at once: whether the
/// kernel lets this fd write the memory through a mapping.
pub fn try_map_shared_writable(
    fd: std::os::fd::BorrowedFd<'_>,
    len: usize,
) -> Result<(), rustix::io::Errno> {
    use rustix::mm::{MapFlags, ProtFlags};
    // SAFETY: a fresh mapping at a kernel-chosen address, unmapped below without being used.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd,
            0,
        )
    }?;
    // SAFETY: exactly the range mmap returned above, never used.
    unsafe { rustix::mm::munmap(ptr, len) }
}

/// Makes the program `cmd` runs get SIGTERM when the thread that spawned it ends, so that a
/// daemon a test starts (libvirtd) does not outlive a test that was killed.
pub fn terminate_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let set = || {
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
            .map_err(std::io::Error::from)
    };
    // SAFETY: the closure only makes one prctl system call, which is async-signal-safe, and
    // touches no memory of the parent.
    unsafe {
        cmd.pre_exec(set);
    }
}

/// The NUMA node of each page at `addr + i * page` for `i` in `0..count`, as move_pages(2)
/// reports it without moving anything (a negative errno for a page it cannot tell, e.g.
/// `-ENOENT` for one not mapped yet).
pub fn page_nodes(addr: *const u8, count: usize, page: usize) -> std::io::Result<Vec<i32>> {
    let pages: Vec<*const libc::c_void> = (0..count)
        .map(|i| addr.wrapping_add(i * page).cast())
        .collect();
    let mut status = vec![i32::MIN; count];
    // SAFETY: move_pages(2) on this process (pid 0) with `nodes` NULL only reads the `count`
    // page addresses and writes `count` statuses, both arrays of that length; it moves nothing.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            count as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(status)
}
