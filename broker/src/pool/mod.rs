//! Memory pools: where lease memory comes from.
//!
//! A pool is configured at start (`--pool SPEC`) and hands out one [`Allocation`] per lease.
//! Admission control (does the lease fit?) is the namespace's job; a pool only makes memory.

mod devdax;
pub mod extents;
pub mod memfd;
mod numa;
pub mod overhead;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::error::WireError;
use crate::journal::Journal;

use membroker_client::PageSize;
use membroker_client::proto::{ErrorCode, Extent, PoolKind};
use membroker_client::size::{format_size, parse_size};

pub use devdax::{DaxError, DevdaxPool};
pub use memfd::MemfdPool;

/// Why a pool could not be configured or could not make memory.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool spec {spec:?}: {problem}")]
    Spec { spec: String, problem: String },
    #[error("pool {pool}: {op} failed")]
    Sys {
        pool: String,
        op: &'static str,
        #[source]
        source: rustix::io::Errno,
    },
    #[error(
        "pool {pool}: the kernel has no {page} huge pages left for {size} (see HugePages_Free in \
         /proc/meminfo; raise /sys/kernel/mm/hugepages/hugepages-*/nr_hugepages)"
    )]
    NoHugePages {
        pool: String,
        page: PageSize,
        size: String,
    },
    #[error("pool {pool}: the kernel refused {size} of memory")]
    NoMemory { pool: String, size: String },
    #[error(
        "pool {pool} is bound to NUMA node {node}, which has no {size} of {page} pages free \
         (the pool never takes memory from another node; see \
         /sys/devices/system/node/node{node}/meminfo and, for huge pages, \
         /sys/devices/system/node/node{node}/hugepages/hugepages-*/free_hugepages)"
    )]
    NodeFull {
        pool: String,
        node: u32,
        page: PageSize,
        size: String,
    },
    #[error("pool {pool} has {free} free, {asked} asked")]
    NoSpace {
        pool: String,
        free: String,
        asked: String,
    },
    #[error(
        "pool {pool} is a memfd pool: it quarantines no memory (the kernel retires a memfd's \
         poisoned pages)"
    )]
    NoQuarantine { pool: String },
    #[error("pool {pool}")]
    Dax {
        pool: String,
        #[source]
        source: DaxError,
    },
}

impl WireError for PoolError {
    fn code(&self) -> ErrorCode {
        match self {
            PoolError::NoHugePages { .. }
            | PoolError::NoMemory { .. }
            | PoolError::NodeFull { .. } => ErrorCode::OutOfMemory,
            PoolError::NoSpace { .. }
            | PoolError::Dax {
                source: DaxError::StaticBusy { .. },
                ..
            } => ErrorCode::NoSpace,
            PoolError::NoQuarantine { .. }
            | PoolError::Dax {
                source:
                    DaxError::StaticWholeOnly { .. }
                    | DaxError::NotQuarantined(_)
                    | DaxError::StaticNoQuarantine { .. },
                ..
            } => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, PoolError>;

/// Memory made for one lease.
#[derive(Debug)]
pub struct Allocation {
    /// The lease memory: a sized, sealed memfd, or an open device-dax device.
    pub fd: OwnedFd,
    /// Where in the pool it lies: physical ranges for device-dax, in file-offset order; the
    /// whole memfd for memfd pools.
    pub extents: Vec<Extent>,
    /// The device-dax device (`dax0.3`) made for this lease.
    pub device: Option<String>,
}

impl AsFd for Allocation {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What a pool knows about its own space beyond the namespace's accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub free: u64,
    pub scrubbing: u64,
    pub quarantined: u64,
}

/// What a pool took back after a restart (see `crate::restore`).
#[derive(Debug, Default)]
pub struct Restored {
    /// Live leases with their memory.
    pub memory: Vec<(u64, Allocation)>,
    /// Leases whose memory is gone or does not match, with the reason.
    pub lost: Vec<(u64, String)>,
    /// Device leases whose interrupted scrub was queued again.
    pub rescrubbing: usize,
    /// Devices of the region nobody recorded, kept out of use.
    pub unknown: Vec<String>,
}

/// A parsed `--pool` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSpec {
    /// `memfd:NAME:SIZE[:PAGE][:node=N]`
    Memfd {
        name: String,
        size: u64,
        page_size: PageSize,
        /// Every page on this NUMA node, or the allocation fails.
        node: Option<u32>,
    },
    /// `devdax:NAME:REGION[:ALIGN]`
    Devdax {
        name: String,
        region: u32,
        align: Option<PageSize>,
    },
}

impl PoolSpec {
    /// The pool's name.
    pub fn name(&self) -> &str {
        match self {
            PoolSpec::Memfd { name, .. } | PoolSpec::Devdax { name, .. } => name,
        }
    }
}

impl std::str::FromStr for PoolSpec {
    type Err = PoolError;

    fn from_str(spec: &str) -> Result<PoolSpec> {
        let bad = |problem: &str| PoolError::Spec {
            spec: spec.to_string(),
            problem: problem.to_string(),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        match parts.as_slice() {
            ["memfd", name, size, rest @ ..] if rest.len() <= 2 => {
                check_pool_name(name).map_err(|p| bad(&p))?;
                let size = parse_size(size).map_err(|e| bad(&e.to_string()))?;
                let (page, node) = match rest {
                    [last @ .., n] if n.starts_with("node=") => (last.first(), Some(*n)),
                    [page] => (Some(page), None),
                    [] => (None, None),
                    _ => return Err(bad("after PAGE only node=N may follow")),
                };
                let page_size = match page {
                    Some(p) => p.parse::<PageSize>().map_err(|e| bad(&e))?,
                    None => PageSize::Base4K,
                };
                let node = match node.and_then(|n| n.strip_prefix("node=")) {
                    Some(n) => Some(n.parse::<u32>().map_err(|_| {
                        bad("node=N names a NUMA node by number (see /sys/devices/system/node)")
                    })?),
                    None => None,
                };
                if size == 0 || size % page_size.bytes() != 0 {
                    return Err(bad(&format!(
                        "size must be a non-zero multiple of the {page_size} page size"
                    )));
                }
                Ok(PoolSpec::Memfd {
                    name: name.to_string(),
                    size,
                    page_size,
                    node,
                })
            }
            ["devdax", name, region, rest @ ..] if rest.len() <= 1 => {
                check_pool_name(name).map_err(|p| bad(&p))?;
                let id = region.strip_prefix("region").unwrap_or(region);
                let region = id.parse().map_err(|_| {
                    bad("REGION is a dax region such as region0 (see `daxctl list -R`)")
                })?;
                let align = match rest.first() {
                    Some(p) => Some(p.parse::<PageSize>().map_err(|e| bad(&e))?),
                    None => None,
                };
                if align == Some(PageSize::Base4K) {
                    return Err(bad(
                        "device-dax leases use 2M or 1G pages: ALIGN is 2M or 1G",
                    ));
                }
                Ok(PoolSpec::Devdax {
                    name: name.to_string(),
                    region,
                    align,
                })
            }
            _ => Err(bad(
                "expected memfd:NAME:SIZE[:PAGE][:node=N] or devdax:NAME:REGION[:ALIGN], \
                 e.g. memfd:default:4G:2M, memfd:near:4G:2M:node=1 or devdax:fast:region0:2M",
            )),
        }
    }
}

fn check_pool_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!("pool name {name:?}: use 1-64 of A-Z a-z 0-9 . _ -"))
    }
}

/// A configured pool.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub kind: PoolKind,
    pub page_size: PageSize,
    /// Capacity in bytes (admission control limit).
    pub size: u64,
    /// The NUMA node every page of the pool is on: a memfd pool's `node=N`, a device-dax
    /// region's `target_node`.
    pub node: Option<u32>,
    /// hugetlb memfd pools: the kernel frees most of their pages' `struct page`s.
    vmemmap_optimized: bool,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Memfd(MemfdPool),
    Devdax(DevdaxPool),
}

impl Pool {
    /// Builds the pool a spec describes. `adopt`: the journal knows this pool from an
    /// earlier run, so its memory is taken back afterwards (`crate::restore`) rather than
    /// claimed fresh (a device-dax region then keeps its devices).
    pub fn open(
        spec: &PoolSpec,
        scrub_workers: usize,
        journal: Option<Arc<Journal>>,
        adopt: bool,
    ) -> Result<Pool> {
        match spec {
            PoolSpec::Memfd {
                name,
                size,
                page_size,
                node,
            } => {
                if let Some(node) = *node {
                    numa::check_node(node).map_err(|problem| PoolError::Spec {
                        spec: format!("memfd:{name}:...:node={node}"),
                        problem,
                    })?;
                }
                Ok(Pool {
                    name: name.clone(),
                    kind: PoolKind::Memfd,
                    page_size: *page_size,
                    size: *size,
                    node: *node,
                    vmemmap_optimized: *page_size != PageSize::Base4K
                        && overhead::hugetlb_vmemmap_optimized(name, *page_size),
                    backend: Backend::Memfd(MemfdPool::new(name, *page_size, *node)),
                })
            }
            PoolSpec::Devdax {
                name,
                region,
                align,
            } => {
                let pool = DevdaxPool::open(name, *region, *align, scrub_workers, adopt, journal)
                    .map_err(|source| PoolError::Dax {
                    pool: name.clone(),
                    source,
                })?;
                Ok(Pool {
                    name: name.clone(),
                    kind: PoolKind::Devdax,
                    page_size: pool.align(),
                    size: pool.size(),
                    node: pool.node(),
                    vmemmap_optimized: false,
                    backend: Backend::Devdax(pool),
                })
            }
        }
    }

    /// The device-dax side of this pool, if it is one.
    pub fn devdax(&self) -> Option<&DevdaxPool> {
        match &self.backend {
            Backend::Memfd(_) => None,
            Backend::Devdax(pool) => Some(pool),
        }
    }

    /// The pool `membroker serve` runs when none is configured: 4 KiB pages, half of RAM.
    pub fn default_spec() -> PoolSpec {
        let half = total_memory().unwrap_or(8 << 30) / 2;
        let size = (half / PageSize::Huge2M.bytes()).max(1) * PageSize::Huge2M.bytes();
        PoolSpec::Memfd {
            name: "default".into(),
            size,
            page_size: PageSize::Base4K,
            node: None,
        }
    }

    /// Makes `size` bytes of memory for the lease `lease`.
    pub fn allocate(&self, lease: &str, size: u64) -> Result<Allocation> {
        match &self.backend {
            Backend::Memfd(pool) => pool.allocate(lease, size),
            Backend::Devdax(pool) => pool.allocate(size).map_err(|source| match source {
                DaxError::NoSpace { free } => PoolError::NoSpace {
                    pool: self.name.clone(),
                    free: format_size(free),
                    asked: format_size(size),
                },
                source => PoolError::Dax {
                    pool: self.name.clone(),
                    source,
                },
            }),
        }
    }

    /// Gives a lease's memory the lease's owner and mode: the memfd inode, or the device-dax
    /// node. The kernel checks them whenever a holder reopens its fd by path
    /// (`/proc/self/fd/N`), so only who may write the lease can reopen it writable. Call it
    /// before the memory is delivered and whenever the lease's owner or mode change.
    pub fn set_owner(&self, memory: &Allocation, uid: u32, gid: u32, mode: u32) -> Result<()> {
        let sys = |op| {
            move |source| PoolError::Sys {
                pool: self.name.clone(),
                op,
                source,
            }
        };
        match rustix::fs::fchown(
            &memory.fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        ) {
            // A broker that is not root cannot give memory away: the inode stays its own, and
            // the mode alone is then stricter than the lease (others' bits for everyone).
            Err(rustix::io::Errno::PERM) if !rustix::process::geteuid().is_root() => {}
            other => other.map_err(sys("fchown"))?,
        }
        rustix::fs::fchmod(&memory.fd, rustix::fs::Mode::from_raw_mode(mode & 0o777))
            .map_err(sys("fchmod"))
    }

    /// Takes back the memory of lease `id`, which nobody holds any more. A memfd's pages are
    /// punched out, then it is closed; a device is scrubbed off the request path, then destroyed, then its extents are
    /// free (and journaled so).
    pub fn release(&self, id: u64, memory: Arc<Allocation>) {
        match &self.backend {
            Backend::Memfd(_) => {
                if let Err(e) = memfd::punch(memory.fd.as_fd()) {
                    tracing::error!(pool = %self.name, id, error = %e, "cannot punch out a freed memfd lease; its pages live until its last fd closes");
                }
                drop(memory);
            }
            Backend::Devdax(pool) => pool.release(id, memory),
        }
    }

    /// Takes back memory made for a lease that was never delivered.
    pub fn discard(&self, memory: Allocation) {
        match &self.backend {
            Backend::Memfd(_) => drop(memory),
            Backend::Devdax(pool) => pool.discard(memory),
        }
    }

    /// Memory errors at `[offset, offset + len)` of a lease: a device-dax pool quarantines the
    /// physical memory behind it (and journals it); a memfd's memory is the kernel's business.
    pub fn quarantine(&self, memory: &Allocation, offset: u64, len: u64) {
        if let Backend::Devdax(pool) = &self.backend {
            pool.quarantine(&memory.extents, offset, len);
        }
    }

    /// Quarantined physical ranges (device-dax; memfd pools keep none).
    pub fn quarantined(&self) -> Vec<Extent> {
        match &self.backend {
            Backend::Memfd(_) => Vec::new(),
            Backend::Devdax(pool) => pool.quarantined(),
        }
    }

    /// Returns a quarantined range of a device-dax pool to its free memory.
    pub fn unquarantine(&self, range: Extent) -> Result<()> {
        match &self.backend {
            Backend::Memfd(_) => Err(PoolError::NoQuarantine {
                pool: self.name.clone(),
            }),
            Backend::Devdax(pool) => pool.unquarantine(range).map_err(|source| PoolError::Dax {
                pool: self.name.clone(),
                source,
            }),
        }
    }

    /// The estimate model's inputs (see [`overhead`]) for `used` bytes in `leases` leases and
    /// `scrubbing` bytes being scrubbed.
    pub fn footprint(&self, used: u64, scrubbing: u64, leases: u64) -> overhead::Footprint {
        overhead::Footprint {
            kind: self.kind,
            page_size: self.page_size,
            size: self.size,
            leased: used + scrubbing,
            leases,
            ranges: self.devdax().map_or(0, DevdaxPool::ranges),
            vmemmap_optimized: self.vmemmap_optimized,
        }
    }

    /// Space the pool itself tracks (device-dax); `None` when the namespace's accounting is all.
    pub fn usage(&self) -> Option<Usage> {
        match &self.backend {
            Backend::Memfd(_) => None,
            Backend::Devdax(pool) => Some(pool.usage()),
        }
    }

    /// One line for logs: `default (memfd, 4K pages, 11.7 GiB)`.
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            PoolKind::Memfd => "memfd",
            PoolKind::Devdax => "devdax",
        };
        let node = self.node.map(|n| format!(", node {n}")).unwrap_or_default();
        format!(
            "{} ({kind}, {} pages, {}{node})",
            self.name,
            self.page_size,
            format_size(self.size)
        )
    }
}

fn total_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            "memfd:default:4G:2M".parse::<PoolSpec>().unwrap(),
            PoolSpec::Memfd {
                name: "default".into(),
                size: 4 << 30,
                page_size: PageSize::Huge2M,
                node: None
            }
        );
        assert_eq!(
            "memfd:near:4G:2M:node=1".parse::<PoolSpec>().unwrap(),
            PoolSpec::Memfd {
                name: "near".into(),
                size: 4 << 30,
                page_size: PageSize::Huge2M,
                node: Some(1)
            }
        );
        assert_eq!(
            "memfd:near:64M:node=0".parse::<PoolSpec>().unwrap(),
            PoolSpec::Memfd {
                name: "near".into(),
                size: 64 << 20,
                page_size: PageSize::Base4K,
                node: Some(0)
            }
        );
        assert_eq!(
            "memfd:small:64M".parse::<PoolSpec>().unwrap(),
            PoolSpec::Memfd {
                name: "small".into(),
                size: 64 << 20,
                page_size: PageSize::Base4K,
                node: None
            }
        );
        for bad in [
            "memfd",
            "memfd:x",
            "memfd:x:0",
            "memfd:x:3M:2M",
            "memfd:x:1G:8K",
            "memfd:a/b:1G",
            "tmpfs:x:1G",
            "memfd:x:1G:2M:extra",
            "memfd:x:1G:node=1:2M",
            "memfd:x:1G:2M:node=",
            "memfd:x:1G:2M:node=-1",
            "memfd:x:1G:node=1:node=1",
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad} parsed");
        }
        assert_eq!(
            "devdax:fast:region0:1G".parse::<PoolSpec>().unwrap(),
            PoolSpec::Devdax {
                name: "fast".into(),
                region: 0,
                align: Some(PageSize::Huge1G)
            }
        );
        assert_eq!(
            "devdax:d:3".parse::<PoolSpec>().unwrap(),
            PoolSpec::Devdax {
                name: "d".into(),
                region: 3,
                align: None
            }
        );
        for bad in [
            "devdax:d",
            "devdax:d:regionX",
            "devdax:d:region0:4K",
            "devdax:d:0:2M:x",
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn default_pool_is_a_share_of_ram() {
        let PoolSpec::Memfd {
            size, page_size, ..
        } = Pool::default_spec()
        else {
            panic!("the default pool is a memfd pool")
        };
        assert_eq!(page_size, PageSize::Base4K);
        assert!(size > 0 && size % (2 << 20) == 0);
    }
}
