//! Every raw-pointer operation of the C ABI: C strings and handles in, results out through
//! caller buffers, the handle's box. The exported functions (`api`) pass on what the header
//! promises about each pointer; these helpers check for NULL and make Rust values.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char};
use std::mem::MaybeUninit;

use crate::error::{Error, Result};
use crate::handle::Membroker;

fn null(what: &str) -> Error {
    Error::Argument(format!("{what} is NULL"))
}

/// The C string at `ptr`, NULL meaning `None`.
///
/// # Safety
///
/// `ptr` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
pub(crate) unsafe fn opt_cstr_arg<'a>(ptr: *const c_char) -> Option<&'a CStr> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: not NULL, and the caller promises a NUL-terminated string valid for 'a.
    Some(unsafe { CStr::from_ptr(ptr) })
}

/// The UTF-8 string at `ptr`; `what` names the argument in the error.
///
/// # Safety
///
/// `ptr` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, what: &str) -> Result<&'a str> {
    // SAFETY: the caller's contract, passed on.
    let text = unsafe { opt_str_arg(ptr, what) }?;
    text.ok_or_else(|| null(what))
}

/// Like [`str_arg`], with NULL meaning `None`.
///
/// # Safety
///
/// As for [`str_arg`].
pub(crate) unsafe fn opt_str_arg<'a>(ptr: *const c_char, what: &str) -> Result<Option<&'a str>> {
    // SAFETY: the caller's contract, passed on.
    let text = unsafe { opt_cstr_arg(ptr) };
    text.map(|t| t.to_str())
        .transpose()
        .map_err(|_| Error::Argument(format!("{what} is not UTF-8")))
}

/// The handle at `ptr`.
///
/// # Safety
///
/// `ptr` is NULL or was returned by `membroker_connect` and has not been given to
/// `membroker_disconnect` (which no other thread may call while the reference lives).
pub(crate) unsafe fn handle<'a>(ptr: *const Membroker) -> Result<&'a Membroker> {
    // SAFETY: the caller's contract; `as_ref` turns NULL into `None`.
    let handle = unsafe { ptr.as_ref() };
    handle.ok_or_else(|| null("the membroker handle"))
}

/// Gives a handle to C.
pub(crate) fn into_raw(handle: Membroker) -> *mut Membroker {
    Box::into_raw(Box::new(handle))
}

/// Takes back and drops a handle (closing its connection); NULL does nothing.
///
/// # Safety
///
/// `ptr` is NULL or was returned by `membroker_connect`, is not in use by another thread and
/// is never used again.
pub(crate) unsafe fn drop_raw(ptr: *mut Membroker) {
    if !ptr.is_null() {
        // SAFETY: the pointer came from `into_raw` (Box::into_raw) and is given up by the
        // caller, so this is the only owner.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

/// The caller's struct at `ptr`, to be filled; `what` names the argument in the error.
///
/// # Safety
///
/// `ptr` is NULL or valid for writes of one aligned `T` for `'a`, and nothing else accesses
/// it meanwhile.
pub(crate) unsafe fn out_arg<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut MaybeUninit<T>> {
    // SAFETY: the caller's contract; MaybeUninit needs no initialised value behind the pointer,
    // and `as_mut` turns NULL into `None`.
    let out = unsafe { ptr.cast::<MaybeUninit<T>>().as_mut() };
    out.ok_or_else(|| null(what))
}

/// Like [`out_arg`], with NULL meaning "not wanted".
///
/// # Safety
///
/// As for [`out_arg`].
pub(crate) unsafe fn opt_out_arg<'a, T>(ptr: *mut T) -> Option<&'a mut MaybeUninit<T>> {
    // SAFETY: as in `out_arg`.
    unsafe { ptr.cast::<MaybeUninit<T>>().as_mut() }
}

/// The caller's array of `cap` elements at `ptr`, to be filled (NULL is fine when `cap` is 0).
///
/// # Safety
///
/// When `cap` is not 0, `ptr` is NULL or valid for writes of `cap` aligned `T`s for `'a`, and
/// nothing else accesses them meanwhile.
pub(crate) unsafe fn out_slice<'a, T>(
    ptr: *mut T,
    cap: usize,
    what: &str,
) -> Result<&'a mut [MaybeUninit<T>]> {
    if cap == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(null(what));
    }
    // SAFETY: not NULL, and the caller promises `cap` writable, aligned elements not aliased
    // for 'a; MaybeUninit needs them initialised.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.cast::<MaybeUninit<T>>(), cap) })
}
