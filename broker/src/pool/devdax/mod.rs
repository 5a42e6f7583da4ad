//! device-dax pools: one dax device per lease, placed on extents the broker chose.
//!
//! A `/dev/daxR.N` fd lets its holder map any offset of that device, so each lease gets a
//! device of its own: created in the region, given the lease's align, its `mapping` written
//! range by range while unbound (a bound device oopses on new ranges), bound to device_dax,
//! opened, delivered. Release, off the request path, first unbinds and deletes the device
//! (every holder's mapping and fd is dead from then on), then zeroes its extents through a
//! fresh device only the broker opens, deleted in turn; only then are the extents free again.
//! A static region (pmem namespace) cannot be subdivided and serves whole-device leases only;
//! its device is re-created by the kernel (see `sysfs::recreate_static`) before it is zeroed.

mod restore;
mod scrub;
mod sysfs;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use membroker_client::PageSize;
use membroker_client::proto::Extent;
use membroker_client::size::format_size;
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use super::extents::ExtentAllocator;
use super::{Allocation, Usage};
use crate::error::error_chain;
use crate::journal::{Journal, Record};
use scrub::Scrubber;
use sysfs::Region;

/// Why a device-dax pool could not start or make a lease.
#[derive(Debug, thiserror::Error)]
pub enum DaxError {
    #[error(
        "no dax region {0}: /sys/bus/dax/devices has no dax{0}.* device (are dax_hmem and device_dax \
         loaded? `daxctl list -R` lists regions)"
    )]
    NoRegion(u32),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected content in {}: {text:?}", path.display())]
    Parse { path: PathBuf, text: String },
    #[error("writing {value:?} to {} failed", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("/proc/iomem hides physical addresses: device-dax pools need root")]
    NotRoot,
    #[error(
        "region{region} is already in use by {devices}; membroker takes a dynamic region whole: \
         destroy those devices first (daxctl destroy-device) or use another region"
    )]
    InUse { region: u32, devices: String },
    #[error(
        "region{region} is static (a pmem namespace): it serves only whole-device leases of exactly \
         {size} ({device}), {asked} asked"
    )]
    StaticWholeOnly {
        region: u32,
        device: String,
        size: String,
        asked: String,
    },
    #[error(
        "region{region} is static and its only device {device} is leased or still being \
         scrubbed; try again once `membroker df` shows nothing scrubbing"
    )]
    StaticBusy { region: u32, device: String },
    #[error("region{region} has no usable device")]
    StaticEmpty { region: u32 },
    #[error("align {align} is not usable on region{region} (region align {region_align})")]
    BadAlign {
        region: u32,
        align: PageSize,
        region_align: u64,
    },
    #[error("the state journal refused the change: {0}")]
    Journal(String),
    #[error("zeroing {device} failed")]
    Zero {
        device: String,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("cannot re-create the static device {device}: {problem}")]
    Recreate { device: String, problem: String },
    #[error("cannot return it to the free memory")]
    NotQuarantined(#[source] crate::pool::extents::ExtentError),
    #[error(
        "region{region} is static: it keeps no quarantine of its own (the lease records the poison)"
    )]
    StaticNoQuarantine { region: u32 },
    #[error("no space: {free} bytes free in aligned extents")]
    NoSpace { free: u64 },
    #[error("device node {} did not appear", .0.display())]
    NoNode(PathBuf),
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rustix::io::Errno,
    },
    #[error(
        "device {device} is {actual} bytes after its mappings were written, {expected} expected"
    )]
    SizeMismatch {
        device: String,
        expected: u64,
        actual: u64,
    },
}

/// A device-dax region owned by the broker.
#[derive(Debug)]
pub struct DevdaxPool {
    name: String,
    journal: Option<Arc<Journal>>,
    region: Region,
    align: PageSize,
    /// Extents of a dynamic region (free, leased, quarantined).
    extents: Arc<Mutex<ExtentAllocator>>,
    /// The one device of a static region, and whether it is leased.
    whole: Option<(String, u64, Arc<AtomicBool>)>,
    /// Serialises device create/configure/delete: `create` reads back the newest device.
    sysfs: Arc<Mutex<()>>,
    scrubber: Scrubber,
}

fn describe(devices: &[sysfs::DeviceState]) -> String {
    let list: Vec<String> = devices
        .iter()
        .map(|d| {
            let driver = d
                .driver
                .as_deref()
                .map(|dr| format!(", {dr}"))
                .unwrap_or_default();
            format!("{} ({}{driver})", d.name, format_size(d.size))
        })
        .collect();
    list.join(", ")
}

impl DevdaxPool {
    /// Takes region `id`: frees its seed device if that spans the whole region, refuses a
    /// region that has any other device, changes nothing on refusal.
    ///
    /// With `adopt` (the journal knows this pool from an earlier run) nothing is freed or
    /// refused here: [`DevdaxPool::restore`] reconciles the devices with the journal.
    pub fn open(
        name: &str,
        id: u32,
        align: Option<PageSize>,
        scrub_workers: usize,
        adopt: bool,
        journal: Option<Arc<Journal>>,
    ) -> Result<DevdaxPool, DaxError> {
        let region = Region::find(id)?;
        let mut devices = Vec::new();
        for device in sysfs::region_devices(id)? {
            devices.push(sysfs::device_state(&device)?);
        }
        let used: Vec<sysfs::DeviceState> = devices.into_iter().filter(|d| d.size > 0).collect();
        let sysfs_lock = Arc::new(Mutex::new(()));
        let extents = Arc::new(Mutex::new(ExtentAllocator::new(region.base, region.size)));
        if !region.dynamic {
            let [device] = used.as_slice() else {
                return Err(DaxError::StaticEmpty { region: id });
            };
            let align =
                PageSize::from_bytes(sysfs::align(&device.name)?).unwrap_or(PageSize::Huge2M);
            let scrubber = Scrubber::new(
                scrub_workers,
                extents.clone(),
                sysfs_lock.clone(),
                (region.clone(), align.bytes()),
                journal.clone(),
            );
            tracing::info!(pool = name, device = %device.name, size = device.size, "static dax region: whole-device leases");
            return Ok(DevdaxPool {
                whole: Some((
                    device.name.clone(),
                    device.size,
                    Arc::new(AtomicBool::new(false)),
                )),
                name: name.to_string(),
                journal: None,
                region,
                align,
                extents,
                sysfs: sysfs_lock,
                scrubber,
            });
        }
        // Unless told, a restarted broker keeps the align its leases' devices have.
        let kept = used
            .iter()
            .filter(|_| adopt)
            .find_map(|d| PageSize::from_bytes(sysfs::align(&d.name).ok()?));
        let align = align
            .or(kept)
            .unwrap_or_else(|| least_overhead_align(name, &region));
        if align.bytes() < region.align || align == PageSize::Base4K {
            return Err(DaxError::BadAlign {
                region: id,
                align,
                region_align: region.align,
            });
        }
        // The seed spanning the whole region (the state after boot) is ours to free; any other
        // device means someone else uses the region.
        let foreign: Vec<sysfs::DeviceState> = used
            .iter()
            .filter(|d| {
                !(d.size == region.size && d.driver.as_deref().is_none_or(|dr| dr == "device_dax"))
            })
            .cloned()
            .collect();
        if !adopt && !foreign.is_empty() {
            return Err(DaxError::InUse {
                region: id,
                devices: describe(&foreign),
            });
        }
        if !adopt {
            for seed in &used {
                sysfs::unbind(&seed.name)?;
                sysfs::set_size_zero(&seed.name)?;
                tracing::info!(pool = name, device = %seed.name, "freed the region's seed device");
            }
        }
        let journal_for_pool = journal.clone();
        let scrubber = Scrubber::new(
            scrub_workers,
            extents.clone(),
            sysfs_lock.clone(),
            (region.clone(), align.bytes()),
            journal,
        );
        Ok(DevdaxPool {
            name: name.to_string(),
            journal: journal_for_pool,
            region,
            align,
            extents,
            whole: None,
            sysfs: sysfs_lock,
            scrubber,
        })
    }

    pub fn align(&self) -> PageSize {
        self.align
    }

    /// The NUMA node of the region's memory, if the kernel knows one.
    pub fn node(&self) -> Option<u32> {
        self.region.node
    }

    pub fn size(&self) -> u64 {
        match &self.whole {
            Some((_, size, _)) => *size,
            None => self.region.size,
        }
    }

    /// Makes a device of `size` bytes on extents the allocator chose.
    pub fn allocate(&self, size: u64) -> Result<Allocation, DaxError> {
        if let Some((device, whole, leased)) = &self.whole {
            return self.allocate_whole(device, *whole, leased, size);
        }
        let align = self.align.bytes();
        let extents = {
            let mut alloc = self.extents.lock();
            alloc.allocate(size, align).ok_or(DaxError::NoSpace {
                free: alloc.free_bytes(),
            })?
        };
        // Before any sysfs write: after a crash, the journal names the half-made device.
        if let Err(e) = self.log(&Record::Creating {
            pool: self.name.clone(),
            extents: extents.clone(),
        }) {
            give_back(&self.extents, &extents);
            return Err(e);
        }
        let _sysfs = self.sysfs.lock();
        let device = match self.region.create_device() {
            Ok(device) => device,
            Err(e) => {
                self.abandon(&extents);
                return Err(e);
            }
        };
        match self.configure(&device, &extents, size) {
            Ok(fd) => Ok(Allocation {
                fd,
                extents,
                device: Some(device),
            }),
            Err(e) => {
                if let Err(undo) = scrub::destroy(&self.region, &device) {
                    tracing::error!(%device, error = %undo, "cannot destroy a half-made device; its extents stay reserved");
                    return Err(e);
                }
                self.abandon(&extents);
                Err(e)
            }
        }
    }

    fn log(&self, record: &Record) -> Result<(), DaxError> {
        match &self.journal {
            Some(journal) => journal
                .append(record)
                .map_err(|e| DaxError::Journal(error_chain(&e))),
            None => Ok(()),
        }
    }

    /// A creation that delivered nothing: extents free again, journaled as such.
    fn abandon(&self, extents: &[Extent]) {
        give_back(&self.extents, extents);
        self.abandon_journal(extents);
    }

    /// Journals that the creation of `extents` is over without a lease.
    pub(super) fn abandon_journal(&self, extents: &[Extent]) {
        let record = Record::Abandoned {
            pool: self.name.clone(),
            extents: extents.to_vec(),
        };
        if let Err(e) = self.log(&record) {
            tracing::error!(error = %e, "cannot journal an abandoned device creation");
        }
    }

    fn configure(&self, device: &str, extents: &[Extent], size: u64) -> Result<OwnedFd, DaxError> {
        configure(device, self.align.bytes(), extents, size)
    }

    fn allocate_whole(
        &self,
        device: &str,
        whole: u64,
        leased: &AtomicBool,
        size: u64,
    ) -> Result<Allocation, DaxError> {
        if size != whole {
            return Err(DaxError::StaticWholeOnly {
                region: self.region.id,
                device: device.to_string(),
                size: format_size(whole),
                asked: format_size(size),
            });
        }
        if leased.swap(true, Ordering::AcqRel) {
            return Err(DaxError::StaticBusy {
                region: self.region.id,
                device: device.to_string(),
            });
        }
        let node = PathBuf::from("/dev").join(device);
        match rustix::fs::open(&node, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => Ok(Allocation {
                fd,
                extents: vec![Extent {
                    start: 0,
                    len: whole,
                }],
                device: None,
            }),
            Err(source) => {
                leased.store(false, Ordering::Release);
                Err(DaxError::Open { path: node, source })
            }
        }
    }

    /// A lease nobody holds: scrub it, then make its memory free (and journal `Freed{id}`).
    pub fn release(&self, id: u64, memory: Arc<Allocation>) {
        match &self.whole {
            // Zeroed off the request path too; the device stays leased until it is done.
            Some((device, _, leased)) => {
                self.scrubber
                    .submit_whole(id, memory, device.clone(), leased.clone())
            }
            // The extents stay leased (never allocatable) until the device is zeroed and gone.
            None => self.scrubber.submit(id, memory),
        }
    }

    /// Quarantines the physical memory behind `[offset, offset + len)` of a lease and
    /// journals the physical ranges.
    pub fn quarantine(&self, extents: &[Extent], offset: u64, len: u64) {
        if self.whole.is_some() {
            return; // static: no physical bookkeeping; the lease records the poison
        }
        let mut ranges = Vec::new();
        let mut alloc = self.extents.lock();
        let (mut file_offset, end) = (0u64, offset.saturating_add(len));
        for extent in extents {
            let (lo, hi) = (offset.max(file_offset), end.min(file_offset + extent.len));
            if lo < hi {
                let start = extent.start + (lo - file_offset);
                tracing::warn!(
                    start = format_args!("{start:#x}"),
                    len = hi - lo,
                    "quarantined"
                );
                let range = Extent {
                    start,
                    len: hi - lo,
                };
                match alloc.quarantine(range) {
                    Ok(()) => ranges.push(range),
                    Err(e) => tracing::error!(error = %e, "cannot quarantine"),
                }
            }
            file_offset += extent.len;
        }
        // Journaled before the lock goes, so a concurrent `unquarantine` of the same range is
        // journaled after it, in the allocator's order.
        let records: Vec<Record> = ranges
            .iter()
            .map(|range| Record::Quarantine {
                pool: self.name.clone(),
                start: range.start,
                len: range.len,
            })
            .collect();
        if let Some(journal) = &self.journal
            && let Err(e) = journal.append_all(&records)
        {
            tracing::error!(error = %error_chain(&e), "cannot journal quarantined memory; it is out of use until the broker restarts");
        }
        drop(alloc);
    }

    /// Quarantined physical ranges, lowest first (a static region keeps none).
    pub fn quarantined(&self) -> Vec<Extent> {
        if self.whole.is_some() {
            return Vec::new();
        }
        self.extents.lock().quarantined().collect()
    }

    /// Returns a quarantined range to free memory (a false report), journaled first. Only
    /// quarantined bytes qualify (see [`ExtentAllocator::unquarantine`]).
    pub fn unquarantine(&self, range: Extent) -> Result<(), DaxError> {
        if self.whole.is_some() {
            return Err(DaxError::StaticNoQuarantine {
                region: self.region.id,
            });
        }
        let mut alloc = self.extents.lock();
        // Checked first: nothing is journaled that the allocator would refuse.
        alloc
            .check_unquarantine(range)
            .map_err(DaxError::NotQuarantined)?;
        self.log(&Record::Unquarantine {
            pool: self.name.clone(),
            start: range.start,
            len: range.len,
        })?;
        alloc
            .unquarantine(range)
            .map_err(DaxError::NotQuarantined)?;
        tracing::warn!(
            start = format_args!("{:#x}", range.start),
            len = range.len,
            "quarantine cleared: back in the free memory"
        );
        Ok(())
    }

    /// Destroys a device made for a lease that was never delivered (no scrub needed: nobody
    /// mapped it, and its extents were zero when it was made).
    pub fn discard(&self, memory: Allocation) {
        if let Some((_, _, leased)) = &self.whole {
            leased.store(false, Ordering::Release);
            return;
        }
        let Some(device) = &memory.device else { return };
        drop(memory.fd);
        let destroyed = {
            let _sysfs = self.sysfs.lock();
            scrub::destroy(&self.region, device)
        };
        match destroyed {
            Ok(()) => self.abandon(&memory.extents),
            Err(e) => {
                tracing::error!(%device, error = %e, "cannot destroy an undelivered device; its extents stay reserved")
            }
        }
    }

    /// Ranges the allocator tracks (free, leased, quarantined); the one device of a static region.
    pub fn ranges(&self) -> u64 {
        if self.whole.is_some() {
            return 1;
        }
        self.extents.lock().ranges().count() as u64
    }

    pub fn usage(&self) -> Usage {
        if let Some((_, size, leased)) = &self.whole {
            let free = if leased.load(Ordering::Acquire) {
                0
            } else {
                *size
            };
            return Usage {
                free,
                scrubbing: self.scrubber.pending_bytes(),
                quarantined: 0,
            };
        }
        let alloc = self.extents.lock();
        Usage {
            free: alloc.free_bytes(),
            scrubbing: self.scrubber.pending_bytes(),
            quarantined: alloc.quarantined_bytes() + alloc.poisoned_leased_bytes(),
        }
    }
}

/// The align whose devices cost the kernel least (see `pool::overhead`): 1G when the region
/// holds a whole aligned GiB and the CPU maps 1 GiB pages (a device's faults are never smaller
/// than its align), else 2M.
fn least_overhead_align(pool: &str, region: &Region) -> PageSize {
    let align = if holds_aligned_gib(region.base, region.size, region.align) && cpu_maps_1g_pages()
    {
        PageSize::Huge1G
    } else {
        PageSize::Huge2M
    };
    tracing::info!(pool, %align, "device align (least kernel overhead this region allows; ALIGN in the pool spec overrides)");
    align
}

/// `[base, base + size)` of a region of `align` holds a whole 1 GiB-aligned GiB.
fn holds_aligned_gib(base: u64, size: u64, align: u64) -> bool {
    let gib = PageSize::Huge1G.bytes();
    align <= gib
        && base
            .checked_next_multiple_of(gib)
            .and_then(|start| start.checked_add(gib))
            .is_some_and(|end| end <= base.saturating_add(size))
}

/// The CPU has 1 GiB page table entries (`pdpe1gb`).
fn cpu_maps_1g_pages() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "pdpe1gb"))
    })
}

/// Gives a new, empty device its align and `extents` (while unbound), binds it and opens it.
fn configure(device: &str, align: u64, extents: &[Extent], size: u64) -> Result<OwnedFd, DaxError> {
    sysfs::set_align(device, align)?;
    for extent in extents {
        // The allocator aligns; the kernel accepts a misaligned start and fails the bind
        // with a WARNING, so check again here where it matters.
        assert!(
            extent.start % align == 0 && extent.len % align == 0,
            "misaligned extent {extent:?}"
        );
        sysfs::add_mapping(device, extent.start, extent.len)?;
    }
    let actual = sysfs::size(device)?;
    if actual != size {
        return Err(DaxError::SizeMismatch {
            device: device.to_string(),
            expected: size,
            actual,
        });
    }
    sysfs::bind(device)?;
    let node = sysfs::wait_for_node(device)?;
    rustix::fs::open(&node, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|source| DaxError::Open { path: node, source })
}

/// Leased extents straight back to free (poisoned parts to quarantine).
pub(super) fn give_back(extents: &Mutex<ExtentAllocator>, ranges: &[Extent]) {
    if let Err(e) = extents.lock().release(ranges) {
        tracing::error!(error = %e, "extent bookkeeping refused a release");
    }
}

#[cfg(test)]
mod tests {
    use super::holds_aligned_gib;

    #[test]
    fn one_gib_align_needs_an_aligned_gib() {
        const G: u64 = 1 << 30;
        const M: u64 = 1 << 20;
        assert!(holds_aligned_gib(4 * G, 2 * G, 2 * M));
        assert!(holds_aligned_gib(4 * G, G, 2 * M));
        assert!(!holds_aligned_gib(4 * G, 256 * M, 2 * M));
        assert!(
            !holds_aligned_gib(4 * G + 2 * M, G, 2 * M),
            "a GiB, but not aligned"
        );
        assert!(holds_aligned_gib(4 * G + 2 * M, 2 * G, 2 * M));
        assert!(
            !holds_aligned_gib(4 * G, 2 * G, 2 * G),
            "the region's align is larger"
        );
        assert!(!holds_aligned_gib(u64::MAX - G, G, 2 * M));
    }
}
