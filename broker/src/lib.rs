//! membroker: the broker daemon and its admin CLI, as a library so that benchmarks and tests
//! can drive the pieces (allocator, namespace) directly. The binary is `src/main.rs`.
#![deny(unsafe_code)]

pub mod cli;
pub mod error;
pub mod handover;
pub mod journal;
pub mod metrics;
pub mod namespace;
pub mod notify;
pub mod pool;
pub mod restore;
pub mod server;
mod sys;
