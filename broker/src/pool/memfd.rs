//! memfd pools: each lease is its own sealed memfd (shmem, or hugetlb with 2 MiB / 1 GiB pages).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};
use rustix::io::Errno;

use membroker_client::proto::Extent;
use membroker_client::size::format_size;
use membroker_client::{LEASE_SEALS, PageSize};

use super::{Allocation, PoolError, Result};

/// Makes memfd leases of one page size, on one NUMA node if the pool is bound to one.
#[derive(Debug)]
pub struct MemfdPool {
    name: String,
    page_size: PageSize,
    node: Option<u32>,
}

impl MemfdPool {
    pub fn new(name: &str, page_size: PageSize, node: Option<u32>) -> MemfdPool {
        MemfdPool {
            name: name.to_string(),
            page_size,
            node,
        }
    }

    fn flags(&self) -> MemfdFlags {
        let base = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        match self.page_size {
            PageSize::Base4K => base,
            PageSize::Huge2M => base | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
            PageSize::Huge1G => base | MemfdFlags::HUGETLB | MemfdFlags::HUGE_1GB,
        }
    }

    /// Creates, sizes, backs (fallocate: a holder never faults for lack of memory) and seals
    /// a memfd of `size` bytes. A pool bound to a node backs it from that node only, or fails.
    pub fn allocate(&self, lease: &str, size: u64) -> Result<Allocation> {
        let sys = |op| {
            move |source| PoolError::Sys {
                pool: self.name.clone(),
                op,
                source,
            }
        };
        // memfd names are at most 249 bytes; the lease name is for /proc/PID/maps readers.
        let mut label = format!("membroker:{lease}");
        // Lease names are ASCII (checked by the namespace), so any byte index is a boundary.
        label.truncate(240);
        let fd =
            rustix::fs::memfd_create(label.as_str(), self.flags()).map_err(sys("memfd_create"))?;
        rustix::fs::ftruncate(&fd, size).map_err(sys("ftruncate"))?;
        match (self.back(&fd, size)?, self.node) {
            (Ok(()), _) => {}
            (Err(Errno::NOMEM | Errno::NOSPC), Some(node)) => {
                return Err(PoolError::NodeFull {
                    pool: self.name.clone(),
                    node,
                    page: self.page_size,
                    size: format_size(size),
                });
            }
            (Err(Errno::NOMEM | Errno::NOSPC), None) if self.page_size != PageSize::Base4K => {
                return Err(PoolError::NoHugePages {
                    pool: self.name.clone(),
                    page: self.page_size,
                    size: format_size(size),
                });
            }
            (Err(Errno::NOMEM | Errno::NOSPC), None) => {
                return Err(PoolError::NoMemory {
                    pool: self.name.clone(),
                    size: format_size(size),
                });
            }
            (Err(e), _) => return Err(sys("fallocate")(e)),
        }
        rustix::fs::fcntl_add_seals(&fd, LEASE_SEALS).map_err(sys("F_ADD_SEALS"))?;
        debug_assert!(rustix::fs::fcntl_get_seals(&fd).is_ok_and(|s| s.contains(SealFlags::SEAL)));
        Ok(Allocation {
            fd,
            extents: vec![Extent {
                start: 0,
                len: size,
            }],
            device: None,
        })
    }

    /// Allocates every page of the fresh memfd `fd` (fallocate), on the pool's node if it has
    /// one. The outer error is a failed binding, the inner one fallocate's.
    fn back(&self, fd: &OwnedFd, size: u64) -> Result<rustix::io::Result<()>> {
        let fallocate = || rustix::fs::fallocate(fd, FallocateFlags::empty(), 0, size);
        let Some(node) = self.node else {
            return Ok(fallocate());
        };
        let bind_failed = |op| {
            move |source| PoolError::Sys {
                pool: self.name.clone(),
                op,
                source,
            }
        };
        if self.page_size == PageSize::Base4K {
            // shmem allocates by the file's own policy first: bound once, every page the file
            // ever gets (a hole a holder punched and touched again too) is on the node.
            crate::sys::bind_shmem(fd.as_fd(), size, node).map_err(bind_failed("mbind"))?;
            return Ok(fallocate());
        }
        // hugetlbfs has no per-file policy: it takes huge pages by the allocating thread's
        // policy, so a thread bound to the node and ended afterwards does the fallocate.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    crate::sys::bind_thread(node).map_err(bind_failed("set_mempolicy"))?;
                    Ok(fallocate())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Frees every page of a memfd lease nobody holds any more (`PUNCH_HOLE|KEEP_SIZE`), before
/// the broker closes its fd: the pages the broker was charged for are gone even if an
/// ex-holder kept an fd or a mapping. Such an ex-holder reads zeros, and what it writes again
/// is new memory charged to its own memory cgroup, never to the broker's.
pub fn punch(fd: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let size = rustix::fs::fstat(fd)?.st_size as u64;
    rustix::fs::fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        size,
    )
}

/// Checks a memfd handed over by the previous broker: at least `size` bytes and sealed.
pub fn adopt(
    fd: std::os::fd::OwnedFd,
    size: u64,
) -> std::result::Result<std::os::fd::OwnedFd, String> {
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("fstat of the handed-over fd: {e}"))?;
    if (st.st_size as u64) < size {
        return Err(format!(
            "handed-over memfd is {} bytes, the lease {size}",
            st.st_size
        ));
    }
    match rustix::fs::fcntl_get_seals(&fd) {
        Ok(seals) if seals.contains(LEASE_SEALS) => Ok(fd),
        Ok(seals) => Err(format!("handed-over memfd is not sealed ({seals:?})")),
        Err(e) => Err(format!("handed-over fd is not a memfd: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_lease_is_sized_backed_and_sealed() {
        let pool = MemfdPool::new("t", PageSize::Base4K, None);
        let a = pool.allocate("tenant/vm/ram0", 8 << 20).unwrap();
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&a.fd)
        ))
        .unwrap();
        assert_eq!(
            link.to_string_lossy(),
            "/memfd:membroker:tenant/vm/ram0 (deleted)"
        );
        let st = rustix::fs::fstat(&a.fd).unwrap();
        assert_eq!(st.st_size, 8 << 20);
        assert!(st.st_blocks as u64 * 512 >= 8 << 20, "not backed up front");
        assert_eq!(rustix::fs::fcntl_get_seals(&a.fd).unwrap(), LEASE_SEALS);
        assert_eq!(rustix::fs::ftruncate(&a.fd, 4096), Err(Errno::PERM));
    }
}
