//! A lease as rust-vmm guest memory (the `vm-memory` feature).
//!
//! VMMs built on the rust-vmm crates (Cloud Hypervisor, Firecracker, and the ones written
//! from the same parts) describe guest RAM as `vm-memory` regions: a `MAP_SHARED` mapping of
//! a file at a guest-physical base. [`Lease::guest_region`] builds exactly that from a lease,
//! so a lease slots in where such a VMM would otherwise create its own memfd or open a
//! hugetlbfs file.

use std::fs::File;

use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use crate::error::{Error, Result};
use crate::lease::{Backing, Lease};
use crate::proto::PageSize;

impl Lease {
    /// Maps the whole lease as a guest memory region that starts at guest-physical
    /// `guest_base`: a shared mapping of (a duplicate of) the lease fd, writable when the
    /// lease is, of the lease's size.
    ///
    /// The fd's size and seals are checked first, as for [`Lease::map`], and `guest_base` must
    /// be a multiple of the lease's page size (so that huge pages stay huge in the guest).
    /// The region owns its own fd, so it stays valid after this `Lease` is dropped; the broker
    /// counts the lease as held until the [`Client`](crate::Client) that received it releases
    /// it or disconnects, and the memory itself lives as long as any fd or mapping of it.
    ///
    /// ```no_run
    /// use membroker_client::{Client, CreateLease};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    ///
    /// let mut client = Client::connect_default()?;
    /// let lease = client.create(CreateLease::new("tenant/vm1/ram0", 1 << 30).persistent(true))?;
    /// let ram = lease.guest_region(GuestAddress(0))?;
    /// let memory = GuestMemoryMmap::from_regions(vec![ram]).expect("one region");
    /// # Ok::<(), membroker_client::Error>(())
    /// ```
    pub fn guest_region(&self, guest_base: GuestAddress) -> Result<GuestRegionMmap> {
        let problem = |problem: String| Error::Lease {
            name: self.name().to_string(),
            problem,
        };
        let page = self.page_size().bytes();
        if !guest_base.0.is_multiple_of(page) {
            return Err(problem(format!(
                "guest base {:#x} is not aligned to the lease's {} pages",
                guest_base.0,
                self.page_size()
            )));
        }
        let size = usize::try_from(self.size())
            .map_err(|_| problem(format!("size {} does not fit in memory", self.size())))?;
        self.verify()?;
        let fd = rustix::io::fcntl_dupfd_cloexec(self, 0).map_err(|source| Error::Sys {
            name: self.name().to_string(),
            op: "dup",
            source,
        })?;
        let prot = if self.writable() {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let mut mapping = MmapRegion::build(
            Some(FileOffset::new(File::from(fd), 0)),
            size,
            prot,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|source| Error::GuestMemory {
            name: self.name().to_string(),
            source,
        })?;
        let hugetlb = self.backing()? == Backing::Memfd && self.page_size() != PageSize::Base4K;
        mapping.set_hugetlbfs(hugetlb);
        GuestRegionMmap::new(mapping, guest_base).ok_or_else(|| {
            problem(format!(
                "guest base {:#x} + {size} bytes overflows the guest address space",
                guest_base.0
            ))
        })
    }
}
