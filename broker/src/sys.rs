//! The broker's only unsafe code: mapping a device to zero it, `execve`, reading a peer's
//! supplementary groups and security label, binding memory to a NUMA node.
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

/// Bytes zeroed per step (keeps a huge device from needing one giant mapping).
const CHUNK: u64 = 1 << 30;

/// Writes zeros over `[0, len)` of a shared-mappable fd (a device-dax device), in 1 GiB
/// windows; `len` must be a multiple of the device's align.
pub fn zero_shared(fd: BorrowedFd<'_>, len: u64) -> Result<(), Errno> {
    let mut offset = 0;
    while offset < len {
        let window = usize::try_from(CHUNK.min(len - offset)).map_err(|_| Errno::INVAL)?;
        // SAFETY: a fresh shared mapping at a kernel-chosen address, unmapped below; nothing
        // else in this process refers to it.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                window,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        // SAFETY: `ptr` is a writable mapping of exactly `window` bytes.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, window) };
        // SAFETY: exactly the range mmap returned above.
        unsafe { rustix::mm::munmap(ptr, window) }?;
        offset += window as u64;
    }
    Ok(())
}

/// Takes ownership of a file descriptor this process inherited across exec (the upgrade
/// hand-over) or from systemd (`LISTEN_FDS`). Returns None if `raw` is not open.
///
/// Only call this at start, once per fd number named by the hand-over environment, before
/// anything else in the process could own that number.
pub fn take_inherited_fd(raw: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    if raw < 0 {
        return None;
    }
    // SAFETY: only used for the validity probe below; `raw` is non-negative.
    let probe = unsafe { BorrowedFd::borrow_raw(raw) };
    rustix::io::fcntl_getfd(probe).ok()?;
    // SAFETY: `raw` is open (probed above) and, by this function's contract, inherited and
    // owned by nothing else in this process, so the OwnedFd is its only owner.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// Removes an environment variable. Only call this at start, before any thread is spawned.
pub fn remove_env(var: &str) {
    // SAFETY: by this function's contract no other thread exists that could read or write the
    // environment concurrently.
    unsafe { std::env::remove_var(var) };
}

/// Replaces the process image with `path` (execve(2), no PATH search and, unlike glibc's
/// execvp behind `Command::exec`, no `/bin/sh` retry of a file the kernel refuses), with
/// `args` and the current environment plus `extra`. Returns only on failure.
pub fn execve(
    path: &std::path::Path,
    args: &[std::ffi::OsString],
    extra: (&str, &str),
) -> std::io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |b: &[u8]| {
        CString::new(b).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let build = || -> std::io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let path = cstr(path.as_os_str().as_bytes())?;
        let argv = args
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if k.as_bytes() != extra.0.as_bytes() {
                envp.push(cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat())?);
            }
        }
        envp.push(cstr(format!("{}={}", extra.0, extra.1).as_bytes())?);
        Ok((path, argv, envp))
    };
    let (path, argv, envp) = match build() {
        Ok(built) => built,
        Err(e) => return e,
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: every pointer is to a NUL-terminated string kept alive by `path`, `argv` and
    // `envp` for the duration of the call, and both arrays end with a null pointer.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    std::io::Error::last_os_error()
}

/// The supplementary groups of the peer of a connected Unix socket (`SO_PEERGROUPS`, the
/// groups it had when it connected).
pub fn peer_groups(sock: BorrowedFd<'_>) -> Result<Vec<u32>, Errno> {
    use std::os::fd::AsRawFd;
    // Most processes are in a few groups; the kernel says how many bytes it needs when the
    // buffer is too small (ERANGE), up to NGROUPS_MAX (65536).
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice()))
            .map_err(|_| Errno::RANGE)?;
        // SAFETY: `groups` is a writable buffer of exactly `len` bytes, and `len` a valid
        // in/out length; the kernel writes at most `len` bytes.
        let ret = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if ret == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL);
        if err != Errno::RANGE || needed <= groups.len() || needed > 65536 {
            return Err(err);
        }
        groups.resize(needed, 0);
    }
}

/// The security label of the peer of a connected Unix socket (`SO_PEERSEC`, the label it had
/// when it connected), as the kernel writes it; None when no LSM answers for Unix sockets
/// (`ENOPROTOOPT`). At most `max` bytes.
pub fn peer_security(sock: BorrowedFd<'_>, max: usize) -> Result<Option<Vec<u8>>, Errno> {
    use std::os::fd::AsRawFd;
    let mut label = vec![0u8; 256.min(max)];
    loop {
        let mut len = libc::socklen_t::try_from(label.len()).map_err(|_| Errno::RANGE)?;
        // SAFETY: `label` is a writable buffer of exactly `len` bytes, and `len` a valid
        // in/out length; the kernel writes at most `len` bytes.
        let ret = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERSEC,
                label.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize;
        if ret == 0 {
            label.truncate(needed);
            return Ok(Some(label));
        }
        let err = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL);
        match err {
            Errno::NOPROTOOPT => return Ok(None),
            Errno::RANGE if needed > label.len() && needed <= max => label.resize(needed, 0),
            _ => return Err(err),
        }
    }
}

/// `MPOL_BIND` of linux/mempolicy.h: allocate only on the given nodes, never elsewhere.
const MPOL_BIND: libc::c_long = 2;

/// A node mask with only `node` set, as `mbind`/`set_mempolicy` read it, and the `maxnode`
/// argument that makes the kernel read exactly those words (it reads `maxnode - 1` bits).
fn node_mask(node: u32) -> (Vec<libc::c_ulong>, libc::c_ulong) {
    let bits = libc::c_ulong::BITS;
    let mut mask = vec![0; (node / bits) as usize + 1];
    mask[(node / bits) as usize] = 1 << (node % bits);
    let maxnode = (mask.len() as libc::c_ulong) * libc::c_ulong::from(bits) + 1;
    (mask, maxnode)
}

fn check(ret: libc::c_long) -> Result<(), Errno> {
    if ret == 0 {
        Ok(())
    } else {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL))
    }
}

/// Binds `[0, len)` of a shmem file (a memfd without huge pages) to NUMA node `node`: the
/// file's shared memory policy, kept by its inode and used for every page the file gets
/// afterwards (fallocate, faults after a hole was punched), whoever allocates it. Done
/// through a brief `PROT_NONE` mapping that touches no page; call it before the memory exists.
pub fn bind_shmem(fd: BorrowedFd<'_>, len: u64, node: u32) -> Result<(), Errno> {
    let len = usize::try_from(len).map_err(|_| Errno::INVAL)?;
    // SAFETY: a fresh inaccessible shared mapping at a kernel-chosen address, unmapped below;
    // nothing reads or writes through it.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::empty(),
            MapFlags::SHARED,
            fd,
            0,
        )
    }?;
    let (mask, maxnode) = node_mask(node);
    // SAFETY: mbind(2) on exactly the mapping made above, with a node mask of `maxnode - 1`
    // readable bits; it changes a memory policy and no memory contents.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            ptr,
            len,
            MPOL_BIND,
            mask.as_ptr(),
            maxnode,
            0 as libc::c_uint,
        )
    };
    let bound = check(ret);
    // SAFETY: exactly the range mmap returned above.
    unsafe { rustix::mm::munmap(ptr, len) }?;
    bound
}

/// Binds the calling thread's future allocations to NUMA node `node` (set_mempolicy(2)).
/// Only for a thread made for the allocation and ended after it: the binding lasts as long
/// as the thread.
pub fn bind_thread(node: u32) -> Result<(), Errno> {
    let (mask, maxnode) = node_mask(node);
    // SAFETY: set_mempolicy(2) reads `maxnode - 1` bits of `mask`, which holds that many.
    check(unsafe { libc::syscall(libc::SYS_set_mempolicy, MPOL_BIND, mask.as_ptr(), maxnode) })
}
