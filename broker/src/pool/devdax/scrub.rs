//! Scrubbing released device leases on worker threads, off the request path.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};
use membroker_client::proto::Extent;
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use super::sysfs::{self, Region};
use super::{Allocation, DaxError};
use crate::journal::{Journal, Record};
use crate::pool::extents::ExtentAllocator;

/// Zeroes the first `len` bytes of a device (large sequential clears through a mapping).
pub fn zero(fd: &impl std::os::fd::AsFd, len: u64) -> Result<(), rustix::io::Errno> {
    crate::sys::zero_shared(fd.as_fd(), len)
}

/// Unbinds, shrinks and deletes a device.
pub fn destroy(region: &Region, device: &str) -> Result<(), DaxError> {
    sysfs::unbind(device)?;
    sysfs::set_size_zero(device)?;
    region.delete_device(device)
}

/// A pool of scrub workers fed through a channel.
#[derive(Debug)]
pub struct Scrubber {
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    /// Bytes queued or being zeroed.
    pending: Arc<AtomicU64>,
}

/// What a worker needs of the region: sysfs, and the align of the devices it makes.
#[derive(Debug, Clone)]
struct Workshop {
    extents: Arc<Mutex<ExtentAllocator>>,
    sysfs: Arc<Mutex<()>>,
    region: Region,
    align: u64,
}

impl Scrubber {
    /// `region`: the region and the align of its lease devices.
    pub fn new(
        workers: usize,
        extents: Arc<Mutex<ExtentAllocator>>,
        sysfs: Arc<Mutex<()>>,
        (region, align): (Region, u64),
        journal: Option<Arc<Journal>>,
    ) -> Scrubber {
        let (tx, rx) = unbounded::<Job>();
        let pending = Arc::new(AtomicU64::new(0));
        let shop = Workshop {
            extents,
            sysfs,
            region,
            align,
        };
        let workers = (0..workers.max(1))
            .map(|i| {
                let (rx, shop) = (rx.clone(), shop.clone());
                let (pending, journal) = (pending.clone(), journal.clone());
                std::thread::Builder::new()
                    .name(format!("scrub-{i}"))
                    .spawn(move || {
                        for job in rx {
                            let len = job.len();
                            let done = match &job.whole {
                                Some((device, leased)) => scrub_whole(job.memory, device, leased),
                                None => scrub_one(job.memory, &job.extents, &shop),
                            };
                            if done {
                                freed(journal.as_deref(), job.id);
                            }
                            pending.fetch_sub(len, Ordering::Relaxed);
                        }
                    })
                    .expect("spawn a scrub worker")
            })
            .collect();
        Scrubber {
            jobs: Some(tx),
            workers,
            pending,
        }
    }

    /// Queues a released lease; its extents stay leased until its device is destroyed and
    /// its memory zeroed.
    pub fn submit(&self, id: u64, memory: Arc<Allocation>) {
        self.send(Job {
            id,
            extents: memory.extents.clone(),
            memory: Some(memory),
            whole: None,
        });
    }

    /// Queues the extents of a released lease whose device is already gone (a restart after
    /// the broker destroyed it and before the memory was zeroed); the caller claimed them.
    pub fn submit_extents(&self, id: u64, extents: Vec<Extent>) {
        self.send(Job {
            id,
            extents,
            memory: None,
            whole: None,
        });
    }

    /// Queues the released lease of a static region's only device `device`: re-created and
    /// zeroed; `leased` is cleared when it is done.
    pub fn submit_whole(
        &self,
        id: u64,
        memory: Arc<Allocation>,
        device: String,
        leased: Arc<AtomicBool>,
    ) {
        self.send(Job {
            id,
            extents: memory.extents.clone(),
            memory: Some(memory),
            whole: Some((device, leased)),
        });
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            self.pending.fetch_add(job.len(), Ordering::Relaxed);
            if jobs.send(job).is_err() {
                tracing::error!("scrub workers are gone; the lease's memory stays out of use");
            }
        }
    }

    /// Bytes waiting for or under scrubbing.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// A released lease to scrub.
#[derive(Debug)]
struct Job {
    id: u64,
    extents: Vec<Extent>,
    /// The device holders had, with the broker's own fd of it (gone after a restart that
    /// found it destroyed).
    memory: Option<Arc<Allocation>>,
    /// For a static region: its device and its `leased` flag.
    whole: Option<(String, Arc<AtomicBool>)>,
}

impl Job {
    fn len(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }
}

/// A static region's device cannot be destroyed: the kernel re-creates it (its pmem
/// namespace's dax device is unbound from its driver and bound again), which kills every
/// mapping and fd of the old one for good; then the new device is zeroed through an fd only
/// the broker has.
fn scrub_whole(memory: Option<Arc<Allocation>>, device: &str, leased: &AtomicBool) -> bool {
    let Some(memory) = memory else { return false };
    let len = memory.extents.iter().map(|e| e.len).sum();
    drop(memory);
    let zeroed = sysfs::recreate_static(device).and_then(|node| {
        let fd = rustix::fs::open(&node, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
            .map_err(|source| DaxError::Open { path: node, source })?;
        zero(&fd, len).map_err(|source| DaxError::Zero {
            device: device.to_string(),
            source,
        })
    });
    if let Err(e) = zeroed {
        tracing::error!(%device, error = %crate::error::error_chain(&e), "scrubbing the static device failed; it stays out of use");
        return false;
    }
    leased.store(false, Ordering::Release);
    tracing::info!(%device, bytes = len, "static device re-created and scrubbed");
    true
}

/// Hand-over of a dynamic lease: the device holders had is unbound and destroyed first (the
/// kernel unmaps it everywhere and refuses every fault and mmap through its fds from then
/// on, for good: a destroyed device is never bound again), then its extents get a fresh
/// device only the broker opens, which zeroes them and is destroyed in turn. Only then are
/// the extents free.
fn scrub_one(memory: Option<Arc<Allocation>>, extents: &[Extent], shop: &Workshop) -> bool {
    let started = std::time::Instant::now();
    let len: u64 = extents.iter().map(|e| e.len).sum();
    if let Some(memory) = memory {
        let device = memory.device.clone().unwrap_or_default();
        drop(memory);
        let destroyed = {
            let _guard = shop.sysfs.lock();
            destroy(&shop.region, &device)
        };
        if let Err(e) = destroyed {
            tracing::error!(%device, error = %crate::error::error_chain(&e), "cannot destroy a released device; its extents stay out of use");
            return false;
        }
    }
    let fresh = {
        let _guard = shop.sysfs.lock();
        shop.region.create_device().and_then(|device| {
            match super::configure(&device, shop.align, extents, len) {
                Ok(fd) => Ok((device, fd)),
                Err(e) => {
                    if let Err(undo) = destroy(&shop.region, &device) {
                        tracing::error!(%device, error = %undo, "cannot destroy a half-made scrub device");
                    }
                    Err(e)
                }
            }
        })
    };
    let (device, fd) = match fresh {
        Ok(fresh) => fresh,
        Err(e) => {
            tracing::error!(error = %crate::error::error_chain(&e), "cannot make a device to scrub released extents; they stay out of use");
            return false;
        }
    };
    if let Err(e) = zero(&fd, len) {
        // Never hand out memory that was not zeroed: the extents stay leased.
        tracing::error!(%device, error = %e, "scrub failed; its extents stay out of use");
        return false;
    }
    drop(fd);
    let destroyed = {
        let _guard = shop.sysfs.lock();
        destroy(&shop.region, &device)
    };
    if let Err(e) = destroyed {
        tracing::error!(%device, error = %crate::error::error_chain(&e), "cannot destroy a scrub device; its extents stay out of use");
        return false;
    }
    super::give_back(&shop.extents, extents);
    tracing::info!(
        %device,
        bytes = len,
        ms = started.elapsed().as_millis() as u64,
        "released device destroyed; its extents scrubbed and destroyed through a fresh device"
    );
    true
}

fn freed(journal: Option<&Journal>, id: u64) {
    if let Some(journal) = journal
        && let Err(e) = journal.append(&Record::Freed { id })
    {
        tracing::error!(id, error = %crate::error::error_chain(&e), "cannot journal a scrubbed lease as free");
    }
}

impl Drop for Scrubber {
    fn drop(&mut self) {
        self.jobs = None; // workers finish the queue, then see the channel closed
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
