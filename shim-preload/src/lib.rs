//! `libmembroker_preload.so`: run unmodified QEMU on membroker memory (the crate's README.md;
//! the QEMU behaviour it relies on is in `docs/qemu-guest-ram.md`).
//!
//! Loaded with `LD_PRELOAD`, the library interposes `mmap`/`mmap64`, `munmap`, `madvise`,
//! `mbind`, `sigaction`, the `signal` family, `memfd_create`, `ftruncate`/`ftruncate64` and
//! `fcntl`/`fcntl64`:
//!
//! - QEMU's anonymous RAM *activation* (a `MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS` read-write
//!   mapping inside the `PROT_NONE` reservation of `len + 2 MiB` the same thread made just
//!   before, at least `MEMBROKER_MIN_SIZE`) is replaced in place by a `MAP_SHARED|MAP_FIXED`
//!   mapping of a broker lease ([`classify`], [`broker`]);
//! - unmapping a whole redirected block releases its lease;
//! - `MADV_DONTNEED`/`MADV_REMOVE`/`MADV_FREE` inside a redirected block punch a hole in the
//!   lease (or zero a device lease), so the memory reads zero and is freed;
//! - the kernel runs the shim's SIGBUS handler, which reports memory errors in redirected
//!   blocks to the broker ([`poison`]) and then runs QEMU's handler, which QEMU always gets
//!   back as the installed action;
//! - QEMU's poison remap (anonymous `MAP_FIXED` over a redirected page) gets lease memory;
//! - a `memory-backend-memfd`'s memfd becomes a lease under QEMU's own fd number when QEMU
//!   sizes it (`memfd_create`, `ftruncate`, `fcntl(F_ADD_SEALS)`, [`backend`]), so that
//!   vhost-user back-ends QEMU hands the fd to map lease memory too;
//! - QEMU's `mbind` of a redirected block to a NUMA node puts the block on a lease from a pool
//!   on that node ([`numa`]).
//!
//! All unsafe code is in the private `sys` module; the rest of the crate is safe.
#![deny(unsafe_code)]

pub mod backend;
pub mod broker;
pub mod classify;
pub mod config;
pub mod numa;
pub mod poison;
mod sys;
pub mod table;
