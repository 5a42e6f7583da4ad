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
//!
//! # Using membroker from a rust-vmm VMM
//!
//! VMMs built on the rust-vmm crates, like Cloud Hypervisor and Firecracker, keep guest RAM
//! as `vm-memory` regions (`GuestRegionMmap`: a shared file mapping at a guest-physical base)
//! and hand each region's host address to KVM. With the `vm-memory` feature,
//! `Lease::guest_region` makes such a region from a lease, so adopting membroker is a
//! matter of where the region comes from:
//!
//! ```toml
//! membroker-client = { version = "0.1", features = ["vm-memory"] }
//! ```
//!
//! ```no_run
//! # #[cfg(feature = "vm-memory")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use membroker_client::vm_memory::{GuestAddress, GuestMemoryMmap};
//! use membroker_client::{Client, CreateLease, ErrorCode};
//!
//! let mut broker = Client::connect_default()?;
//! let name = "tenant/vm1/ram0";
//! let lease = match broker.open(name, true) {            // the same memory after a restart
//!     Err(e) if e.code() == Some(ErrorCode::NotFound) => {
//!         broker.create(CreateLease::new(name, 1 << 30).persistent(true))?
//!     }
//!     other => other?,
//! };
//! let ram = lease.guest_region(GuestAddress(0))?;         // size, seals, page size checked
//! let memory = GuestMemoryMmap::from_regions(vec![ram])?;  // as with any other backing
//! // ... then as before: KVM_SET_USER_MEMORY_REGION for each region of `memory`.
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "vm-memory"))]
//! # fn main() {}
//! ```
//!
//! The region maps its own duplicate of the lease fd, writable when the lease is, so it stays
//! valid after the [`Lease`] is dropped; the broker counts the VMM as a holder until the
//! [`Client`] releases the lease or disconnects, and hands the same memory back by name after
//! a VMM restart. In a Cloud Hypervisor-style VMM the place is where the memory manager
//! creates a region per memory zone from a memfd or hugetlbfs file: one lease per zone, named
//! after the VM and zone, with the lease's page size standing in for the zone's `hugepages`
//! setting ([`Lease::page_size`]; regions of hugetlb leases report `is_hugetlbfs`). Keep the
//! `Client` for the VM's lifetime and release the leases when the VM is deleted, or remove
//! persistent ones with [`Client::remove`]. Build against the re-exported `vm_memory` (or
//! the same version) so that the region types match.
//! `examples/kvm-vmm` in the repository is a complete VMM that does this and runs a real-mode
//! guest on `/dev/kvm`.
#![deny(unsafe_code)]

mod admin;
mod client;
pub mod codec;
mod dirs;
mod error;
#[cfg(feature = "vm-memory")]
mod guest;
mod lease;
mod mapping;
pub mod options;
pub mod proto;
pub mod reconnect;
pub mod size;
mod sys;
pub mod transport;

pub use client::{Client, LostLease, SOCKET_ENV, default_socket_path};
pub use error::{Error, Result, error_chain};
pub use lease::{Backing, LEASE_SEALS, Lease};
pub use mapping::Mapping;
pub use options::{DEFAULT_TIMEOUT, Options, TIMEOUT_ENV};
pub use proto::{
    BindLabel, CreateLease, DirInfo, ErrorCode, LeaseInfo, LeaseState, Mkdir, PageSize, PoolInfo,
    PoolKind,
};
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
            node: None,
            label: BindLabel::Creator,
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

    /// Takes the memory from a pool bound to NUMA node `node`.
    pub fn node(mut self, node: u32) -> Self {
        self.node = Some(node);
        self
    }

    /// Binds the lease to `label` instead of its creator's (root and the admin group only).
    pub fn label(mut self, label: BindLabel) -> Self {
        self.label = label;
        self
    }
}
