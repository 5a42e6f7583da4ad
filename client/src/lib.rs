//! Client library for membroker.
//!
//! A VMM connects to the broker, creates or re-opens *leases* (sealed, fixed-size memory
//! delivered as an fd over the socket), maps them and releases them:
//!
//! ```no_run
//! use membroker_client::{Client, CreateLease};
//! let mut client = Client::connect_default()?;
//! let lease = client.create(CreateLease::new("tenant/vm1/ram0", 1 << 30).persistent(true))?;
//! let ram = lease.map()?;
//! ram.write_at(0, b"hello")?;
//! # Ok::<(), membroker_client::Error>(())
//! ```
#![deny(unsafe_code)]

mod client;
pub mod codec;
mod error;
#[cfg(feature = "vm-memory")]
mod guest;
mod lease;
mod mapping;
pub mod proto;
pub mod reconnect;
pub mod size;
mod sys;
pub mod transport;

pub use client::{Client, LostLease, SOCKET_ENV, default_socket_path};
pub use error::{Error, Result, error_chain};
pub use lease::{Backing, LEASE_SEALS, Lease};
pub use mapping::Mapping;
pub use proto::{CreateLease, ErrorCode, LeaseInfo, LeaseState, PageSize, PoolInfo, PoolKind};
pub use reconnect::DEFAULT_RECONNECT_TIMEOUT;
/// The `vm-memory` this crate builds guest regions with, for VMMs that want the same version.
#[cfg(feature = "vm-memory")]
pub use vm_memory;

impl CreateLease {
    /// A request for a private (0600), non-persistent lease of `size` bytes from the default
    /// pool at its page size.
    pub fn new(name: impl Into<String>, size: u64) -> CreateLease {
        CreateLease {
            name: name.into(),
            size,
            page_size: None,
            pool: None,
            persistent: false,
            mode: 0o600,
            owner: None,
        }
    }

    pub fn page_size(mut self, page_size: PageSize) -> Self {
        self.page_size = Some(page_size);
        self
    }

    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    pub fn owner(mut self, uid: u32) -> Self {
        self.owner = Some(uid);
        self
    }
}
