//! An owned, bounds-checked mapping of a lease.

use std::os::fd::AsFd;

use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::sys::SharedMap;

/// A shared mapping of (part of) a lease, unmapped on drop.
///
/// Other processes can write this memory at any time, so it is never exposed as `&[u8]`:
/// use [`read_at`](Mapping::read_at) / [`write_at`](Mapping::write_at), or
/// [`as_ptr`](Mapping::as_ptr) for raw access.
#[derive(Debug)]
pub struct Mapping {
    map: SharedMap,
    offset: u64,
    writable: bool,
    name: String,
}

impl Mapping {
    pub(crate) fn new(lease: &Lease, offset: u64, len: u64) -> Result<Mapping> {
        let name = lease.name().to_string();
        let problem = |problem: String| Error::Lease {
            name: name.clone(),
            problem,
        };
        let page = lease.page_size().bytes();
        let end = offset
            .checked_add(len)
            .ok_or_else(|| problem(format!("offset {offset} + length {len} overflows")))?;
        if len == 0 || end > lease.size() {
            return Err(problem(format!(
                "range {offset}..{end} is outside the lease (0..{})",
                lease.size()
            )));
        }
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(problem(format!(
                "range {offset}..{end} is not aligned to the lease's {} pages",
                lease.page_size()
            )));
        }
        let len = usize::try_from(len)
            .map_err(|_| problem(format!("length {len} does not fit in memory")))?;
        lease.verify()?;
        let map =
            SharedMap::new(lease.as_fd(), offset, len, lease.writable()).map_err(|source| {
                Error::Sys {
                    name: name.clone(),
                    op: "mmap",
                    source,
                }
            })?;
        Ok(Mapping {
            map,
            offset,
            writable: lease.writable(),
            name,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: empty mappings are refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Offset of this mapping within the lease.
    pub fn lease_offset(&self) -> u64 {
        self.offset
    }

    /// Start address, for raw access (e.g. registering guest memory with KVM).
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    fn out_of_range(&self, offset: usize, count: usize) -> Error {
        Error::Lease {
            name: self.name.clone(),
            problem: format!(
                "access {offset}+{count} is outside the {}-byte mapping",
                self.len()
            ),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::Lease {
                name: self.name.clone(),
                problem: "mapping is read-only".into(),
            })
        }
    }

    /// Copies bytes at `offset` into `buf`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.map
            .copy_out(offset, buf)
            .map_err(|_| self.out_of_range(offset, buf.len()))
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.map
            .copy_in(offset, data)
            .map_err(|_| self.out_of_range(offset, data.len()))
    }

    /// Sets `count` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, count: usize, byte: u8) -> Result<()> {
        self.check_writable()?;
        self.map
            .fill(offset, count, byte)
            .map_err(|_| self.out_of_range(offset, count))
    }

    /// Loads one byte with a volatile read.
    pub fn load(&self, offset: usize) -> Result<u8> {
        self.map
            .read_volatile(offset)
            .map_err(|_| self.out_of_range(offset, 1))
    }

    /// Stores one byte with a volatile write.
    pub fn store(&self, offset: usize, byte: u8) -> Result<()> {
        self.check_writable()?;
        self.map
            .write_volatile(offset, byte)
            .map_err(|_| self.out_of_range(offset, 1))
    }

    /// Writes one byte in every `stride` bytes (e.g. each page), to fault the memory in.
    pub fn touch(&self, stride: usize, byte: u8) -> Result<()> {
        let stride = stride.max(1);
        for offset in (0..self.len()).step_by(stride) {
            self.store(offset, byte)?;
        }
        Ok(())
    }
}
