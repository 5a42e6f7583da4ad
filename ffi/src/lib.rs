//! C ABI of the membroker client: `libmembroker_ffi.so`, `libmembroker_ffi.a` and
//! `include/membroker.h` (generated from this crate by cbindgen; `tests/header.rs` fails when
//! the checked-in header is stale).
//!
//! Every call wraps [`membroker_client::Client`]: the protocol, fd passing, reconnection and
//! lease tracking are the client library's, not a second implementation. This crate adds the
//! C conventions: a `membroker *` handle, lease fds handed over to the caller, -1 or NULL on
//! failure with `errno` and a per-thread message (`membroker_last_error`), and no panic ever
//! unwinding into C.
//!
//! The exported functions are in `api`, all raw-pointer handling in `sys`; the rest is safe.
#![deny(unsafe_code)]

mod api;
mod error;
mod handle;
mod info;
mod sys;

pub use api::*;
pub use handle::Membroker;
pub use info::*;
