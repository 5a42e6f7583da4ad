//! The exported functions. Each checks its pointers through `sys`, runs inside
//! [`guard`] (no panic unwinds into C) and on failure returns -1 or NULL with `errno` and
//! `membroker_last_error()` set. Handles and pointers follow the contract in `membroker.h`.
#![allow(unsafe_code)]

use std::ffi::{OsStr, c_char, c_int};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::time::Duration;

use membroker_client::{CreateLease, Lease, PageSize};

use crate::error::{Error, Result, guard, last_errno, last_message};
use crate::handle::Membroker;
use crate::info::{CLeaseInfo, CLostLease, CRange};
use crate::sys;

/// Fills `out` (when wanted) and hands the lease fd over to the caller.
fn deliver(lease: Lease, out: Option<&mut MaybeUninit<CLeaseInfo>>) -> Result<c_int> {
    if let Some(out) = out {
        out.write(CLeaseInfo::new(lease.info())?);
    }
    Ok(lease.into_fd().into_raw_fd())
}

/// 0 on success, for the calls that return nothing else.
fn done(result: membroker_client::Result<()>) -> Result<c_int> {
    result?;
    Ok(0)
}

fn page_size_arg(bytes: u64) -> Result<Option<PageSize>> {
    if bytes == 0 {
        return Ok(None);
    }
    PageSize::from_bytes(bytes).map(Some).ok_or_else(|| {
        Error::Argument(format!(
            "page size {bytes}: use 4096, 2097152 (2 MiB), 1073741824 (1 GiB), or 0 for the pool's"
        ))
    })
}

/// Connects to the broker at `socket_path`, or when it is NULL at the default socket
/// (`$MEMBROKER_SOCKET`, else `/run/membroker/broker.sock` for root, else
/// `$XDG_RUNTIME_DIR/membroker/broker.sock`). Fails at once when no broker listens there.
/// Returns a handle for the other calls, or NULL on error.
///
/// # Safety
///
/// `socket_path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_connect(socket_path: *const c_char) -> *mut Membroker {
    guard(ptr::null_mut(), || {
        // SAFETY: the header asks for NULL or a C string.
        let path = unsafe { sys::opt_cstr_arg(socket_path) };
        let path = path.map(|p| Path::new(OsStr::from_bytes(p.to_bytes())));
        Ok(sys::into_raw(Membroker::connect(path)?))
    })
}

/// Closes the connection: the broker releases every lease it held (non-persistent leases
/// then go back to their pool once no other connection holds them). Lease fds and mappings
/// the caller has stay valid. `b` may be NULL; it must not be used again.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected, that no other thread
/// uses now and nobody uses afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_disconnect(b: *mut Membroker) {
    guard((), || {
        // SAFETY: the header asks for NULL or a live handle that no other thread uses and
        // that is not used again.
        unsafe { sys::drop_raw(b) };
        Ok(())
    });
}

/// Creates a private lease of `size` bytes from the default pool at its page size, with
/// permission bits `mode` (e.g. 0600); a persistent lease outlives its holders until
/// `membroker_remove`. This connection holds it. Returns the lease fd, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_create(
    b: *mut Membroker,
    name: *const c_char,
    size: u64,
    mode: u32,
    persistent: bool,
) -> c_int {
    // SAFETY: the same contract for `b` and `name`; NULL pool and out are allowed.
    unsafe {
        membroker_create_ex(
            b,
            name,
            size,
            0,
            ptr::null(),
            mode,
            persistent,
            ptr::null_mut(),
        )
    }
}

/// `membroker_create` with a page size in bytes (4096, 2 MiB or 1 GiB; 0 for the pool's) and
/// a pool name (NULL for the broker's default pool). Fills `*out` when `out` is not NULL.
/// Returns the lease fd, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string, and so is `pool`; `out` is NULL or points to a writable, aligned
/// `membroker_lease_info`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn membroker_create_ex(
    b: *mut Membroker,
    name: *const c_char,
    size: u64,
    page_size: u64,
    pool: *const c_char,
    mode: u32,
    persistent: bool,
    out: *mut CLeaseInfo,
) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        // SAFETY: the header asks for a C string.
        let name = unsafe { sys::str_arg(name, "name") }?;
        // SAFETY: the header asks for NULL or a C string.
        let pool = unsafe { sys::opt_str_arg(pool, "pool") }?;
        // SAFETY: the header asks for NULL or a struct to fill.
        let out = unsafe { sys::opt_out_arg(out) };
        let mut req = CreateLease::new(name, size)
            .mode(mode)
            .persistent(persistent);
        if let Some(page_size) = page_size_arg(page_size)? {
            req = req.page_size(page_size);
        }
        if let Some(pool) = pool {
            req = req.pool(pool);
        }
        deliver(b.lock().client.create(req)?, out)
    })
}

/// Opens an existing lease by name (to re-attach after a restart, or to share it); the fd
/// allows writable mappings when `writable`. This connection holds it. Returns the lease fd,
/// or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_open(
    b: *mut Membroker,
    name: *const c_char,
    writable: bool,
) -> c_int {
    // SAFETY: the same contract for `b` and `name`; a NULL out is allowed.
    unsafe { membroker_open_ex(b, name, writable, ptr::null_mut()) }
}

/// `membroker_open`, filling `*out` when `out` is not NULL.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string; `out` is NULL or points to a writable, aligned
/// `membroker_lease_info`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_open_ex(
    b: *mut Membroker,
    name: *const c_char,
    writable: bool,
    out: *mut CLeaseInfo,
) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        // SAFETY: the header asks for a C string.
        let name = unsafe { sys::str_arg(name, "name") }?;
        // SAFETY: the header asks for NULL or a struct to fill.
        let out = unsafe { sys::opt_out_arg(out) };
        deliver(b.lock().client.open(name, writable)?, out)
    })
}

/// Stops holding a lease on this connection. Fds and mappings stay valid. Returns 0, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_release(b: *mut Membroker, name: *const c_char) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        // SAFETY: the header asks for a C string.
        let name = unsafe { sys::str_arg(name, "name") }?;
        done(b.lock().client.release(name))
    })
}

/// Removes a lease's name; its memory returns to the pool once nobody holds it. Returns 0,
/// or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_remove(b: *mut Membroker, name: *const c_char) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        // SAFETY: the header asks for a C string.
        let name = unsafe { sys::str_arg(name, "name") }?;
        done(b.lock().client.remove(name))
    })
}

/// Describes a lease into `*out` (required). Returns 0, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string; `out` is NULL or points to a writable, aligned
/// `membroker_lease_info`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_stat(
    b: *mut Membroker,
    name: *const c_char,
    out: *mut CLeaseInfo,
) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        // SAFETY: the header asks for a C string.
        let name = unsafe { sys::str_arg(name, "name") }?;
        // SAFETY: the header asks for a struct to fill.
        let out = unsafe { sys::out_arg(out, "out") }?;
        let info = b.lock().client.stat(name)?;
        out.write(CLeaseInfo::new(&info)?);
        Ok(0)
    })
}

/// Lists the poisoned ranges reported for a lease: fills up to `cap` entries of `out` (which
/// may be NULL when `cap` is 0) and returns how many there are in all (more than `cap` means
/// the list was cut: call again with a larger array), or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string; unless `cap` is 0, `out` is NULL or points to `cap` writable
/// `membroker_range`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_poison_ranges(
    b: *mut Membroker,
    name: *const c_char,
    out: *mut CRange,
    cap: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        // SAFETY: the header asks for a C string.
        let name = unsafe { sys::str_arg(name, "name") }?;
        // SAFETY: the header asks for an array of `cap` entries (NULL when `cap` is 0).
        let out = unsafe { sys::out_slice(out, cap, "out") }?;
        let info = b.lock().client.stat(name)?;
        for (slot, poison) in out.iter_mut().zip(&info.poison) {
            slot.write(CRange::from(poison));
        }
        c_int::try_from(info.poison.len())
            .map_err(|_| Error::TooLong(format!("lease {name}: too many poisoned ranges")))
    })
}

/// Tells the broker that the memory at `[offset, offset + len)` of a lease is bad (a machine
/// check, a SIGBUS with `BUS_MCEERR_*`): it quarantines those pages when the lease is freed.
/// Returns 0, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `name` is NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_report_poison(
    b: *mut Membroker,
    name: *const c_char,
    offset: u64,
    len: u64,
) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        // SAFETY: the header asks for a C string.
        let name = unsafe { sys::str_arg(name, "name") }?;
        done(b.lock().client.report_poison(name, offset, len))
    })
}

/// Sets how long a call waits for the broker to come back when it finds the connection
/// broken (default 10 s). 0 turns transparent reconnection off: a broken connection then
/// fails the call, and `membroker_reconnect` tries exactly once. Returns 0, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_set_reconnect_timeout(
    b: *mut Membroker,
    timeout_ms: u32,
) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        b.lock().client.set_reconnect_timeout(timeout);
        Ok(0)
    })
}

/// Replaces the connection with a new one now (waiting for the broker up to the reconnect
/// timeout) and re-attaches every lease this connection holds; fds and mappings are not
/// touched. Leases that could not be re-attached are reported by `membroker_next_lost_lease`.
/// Returns 0, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_reconnect(b: *mut Membroker) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        done(b.lock().client.reconnect())
    })
}

/// Reconnects (as `membroker_reconnect`) only if the broker has closed the connection. For
/// an event loop that polls `membroker_fd`: readable with no call in flight means the broker
/// went away, and reconnecting at once re-attaches the leases within the broker's grace
/// period. Returns 1 when it reconnected, 0 when the connection was fine, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_reconnect_if_closed(b: *mut Membroker) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        Ok(c_int::from(b.lock().client.reconnect_if_closed()?))
    })
}

/// Takes the oldest lease that could not be re-attached after a reconnect (removed
/// meanwhile, refused) into `*out` (required). Returns 1 when it did, 0 when there is none,
/// or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected; `out` is NULL or
/// points to a writable, aligned `membroker_lost_lease`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_next_lost_lease(
    b: *mut Membroker,
    out: *mut CLostLease,
) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        // SAFETY: the header asks for a struct to fill.
        let out = unsafe { sys::out_arg(out, "out") }?;
        match b.lock().next_lost() {
            Some(lost) => {
                out.write(CLostLease::new(&lost)?);
                Ok(1)
            }
            None => Ok(0),
        }
    })
}

/// The connection's socket, for poll/epoll (readable without a call in flight: the broker
/// went away). It belongs to the handle: never read, write or close it. Its number stays the
/// same across reconnects. Returns the fd, or -1.
///
/// # Safety
///
/// `b` is NULL or a handle from `membroker_connect` not yet disconnected.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn membroker_fd(b: *mut Membroker) -> c_int {
    guard(-1, || {
        // SAFETY: the header asks for a live handle.
        let b = unsafe { sys::handle(b) }?;
        Ok(b.lock().client.as_fd().as_raw_fd())
    })
}

/// This thread's last error from this library, for a person: what failed, on what, and why
/// (the broker's own message when it refused). Never NULL after a failed call; NULL before
/// the first. The string stays valid until the next failing call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn membroker_last_error() -> *const c_char {
    last_message()
}

/// The errno of this thread's last failed call into this library (also set in `errno` at
/// the failure, but other calls may have changed `errno` since); 0 before the first.
#[unsafe(no_mangle)]
pub extern "C" fn membroker_last_errno() -> c_int {
    last_errno()
}
