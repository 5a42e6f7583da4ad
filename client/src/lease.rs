//! A lease as its holder sees it: an fd plus what the broker said about it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::SealFlags;

use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::proto::{LeaseInfo, PageSize};

/// Seals every memfd lease carries.
pub const LEASE_SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// A lease fd with its description. Dropping it closes the fd; the broker keeps the lease
/// until the connection that received it releases it or goes away.
#[derive(Debug)]
pub struct Lease {
    fd: OwnedFd,
    info: LeaseInfo,
}

/// What kind of file backs a lease fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A sealed memfd (shmem or hugetlb).
    Memfd,
    /// A device-dax character device.
    DevDax,
}

impl Lease {
    /// Wraps an fd received from the broker after checking that it is what `info` says.
    pub fn new(fd: OwnedFd, info: LeaseInfo) -> Result<Lease> {
        let lease = Lease { fd, info };
        lease.verify()?;
        Ok(lease)
    }

    /// Checks the fd: a memfd must be at least the lease size and sealed against resizing;
    /// a device must be a character device.
    pub fn verify(&self) -> Result<()> {
        match self.backing()? {
            Backing::DevDax => Ok(()),
            Backing::Memfd => {
                let size = self.file_size()?;
                if size < self.info.size {
                    return Err(
                        self.problem(format!("fd is {size} bytes, lease is {}", self.info.size))
                    );
                }
                let seals = self.seals()?;
                if !seals.contains(LEASE_SEALS) {
                    return Err(self.problem(format!("fd is not sealed (seals {seals:?})")));
                }
                Ok(())
            }
        }
    }

    fn problem(&self, problem: String) -> Error {
        Error::Lease {
            name: self.info.name.clone(),
            problem,
        }
    }

    fn sys(&self, op: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error + '_ {
        move |source| Error::Sys {
            name: self.info.name.clone(),
            op,
            source,
        }
    }

    /// What backs the fd.
    pub fn backing(&self) -> Result<Backing> {
        let st = rustix::fs::fstat(&self.fd).map_err(self.sys("fstat"))?;
        match rustix::fs::FileType::from_raw_mode(st.st_mode) {
            rustix::fs::FileType::RegularFile => Ok(Backing::Memfd),
            rustix::fs::FileType::CharacterDevice => Ok(Backing::DevDax),
            other => Err(self.problem(format!("fd is a {other:?}, not memory"))),
        }
    }

    fn file_size(&self) -> Result<u64> {
        let st = rustix::fs::fstat(&self.fd).map_err(self.sys("fstat"))?;
        Ok(st.st_size as u64)
    }

    /// The seals on the fd (`F_GET_SEALS`).
    pub fn seals(&self) -> Result<SealFlags> {
        rustix::fs::fcntl_get_seals(&self.fd).map_err(self.sys("F_GET_SEALS"))
    }

    /// What the broker said about this lease when it delivered the fd.
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn page_size(&self) -> PageSize {
        self.info.page_size
    }

    /// Whether the fd allows writable mappings.
    pub fn writable(&self) -> bool {
        self.info.writable
    }

    /// Maps the whole lease.
    pub fn map(&self) -> Result<Mapping> {
        self.map_range(0, self.info.size)
    }

    /// Maps `len` bytes at `offset`. Both must be multiples of the page size and lie within
    /// the lease; the mapping is writable when the lease is.
    pub fn map_range(&self, offset: u64, len: u64) -> Result<Mapping> {
        Mapping::new(self, offset, len)
    }

    /// Gives up the description and returns the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Lease {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
