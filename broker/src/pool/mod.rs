//! Memory pools: where lease memory comes from.
//!
//! A pool is configured at start (`--pool SPEC`) and hands out one [`Allocation`] per lease.
//! Admission control (does the lease fit?) is the namespace's job; a pool only makes memory.

mod memfd;

use std::os::fd::OwnedFd;

use membroker_client::PageSize;
use membroker_client::proto::{Extent, PoolKind};
use membroker_client::size::{format_size, parse_size};

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
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, PoolError>;

/// Memory made for one lease.
#[derive(Debug)]
pub struct Allocation {
    /// The lease memory, sized and (for memfd) sealed.
    pub fd: OwnedFd,
    /// Where in the pool it lies (logical for memfd pools).
    pub extents: Vec<Extent>,
}

/// A parsed `--pool` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSpec {
    /// `memfd:NAME:SIZE[:PAGE]`
    Memfd {
        name: String,
        size: u64,
        page_size: PageSize,
    },
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
            ["memfd", name, size, rest @ ..] if rest.len() <= 1 => {
                check_pool_name(name).map_err(|p| bad(&p))?;
                let size = parse_size(size).map_err(|e| bad(&e.to_string()))?;
                let page_size = match rest.first() {
                    Some(p) => p.parse::<PageSize>().map_err(|e| bad(&e))?,
                    None => PageSize::Base4K,
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
                })
            }
            ["devdax", ..] => Err(bad(
                "device-dax pools are not available in this build yet; use memfd:NAME:SIZE[:PAGE]",
            )),
            _ => Err(bad(
                "expected memfd:NAME:SIZE[:PAGE], e.g. memfd:default:4G:2M",
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
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Memfd(MemfdPool),
}

impl Pool {
    /// Builds the pool a spec describes.
    pub fn open(spec: &PoolSpec) -> Result<Pool> {
        match spec {
            PoolSpec::Memfd {
                name,
                size,
                page_size,
            } => Ok(Pool {
                name: name.clone(),
                kind: PoolKind::Memfd,
                page_size: *page_size,
                size: *size,
                backend: Backend::Memfd(MemfdPool::new(name, *page_size)),
            }),
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
        }
    }

    /// Makes `size` bytes of memory for the lease `lease`.
    pub fn allocate(&self, lease: &str, size: u64) -> Result<Allocation> {
        match &self.backend {
            Backend::Memfd(pool) => pool.allocate(lease, size),
        }
    }

    /// One line for logs: `default (memfd, 4K pages, 11.7 GiB)`.
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            PoolKind::Memfd => "memfd",
            PoolKind::Devdax => "devdax",
        };
        format!(
            "{} ({kind}, {} pages, {})",
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
                page_size: PageSize::Huge2M
            }
        );
        assert_eq!(
            "memfd:small:64M".parse::<PoolSpec>().unwrap(),
            PoolSpec::Memfd {
                name: "small".into(),
                size: 64 << 20,
                page_size: PageSize::Base4K
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
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad} parsed");
        }
        let err = "devdax:fast:region0"
            .parse::<PoolSpec>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("not available"), "{err}");
    }

    #[test]
    fn default_pool_is_a_share_of_ram() {
        let PoolSpec::Memfd {
            size, page_size, ..
        } = Pool::default_spec();
        assert_eq!(page_size, PageSize::Base4K);
        assert!(size > 0 && size % (2 << 20) == 0);
    }
}
