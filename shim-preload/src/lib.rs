//! LD_PRELOAD shim for unmodified QEMU (see DESIGN.md §7). Not implemented yet.
#![deny(unsafe_code)]
