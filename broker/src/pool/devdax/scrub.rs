//! Scrubbing released device leases on worker threads, off the request path.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};
use parking_lot::Mutex;

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
    journal: Option<Arc<Journal>>,
}

impl Scrubber {
    pub fn new(
        workers: usize,
        extents: Arc<Mutex<ExtentAllocator>>,
        sysfs: Arc<Mutex<()>>,
        region: Region,
        journal: Option<Arc<Journal>>,
    ) -> Scrubber {
        let (tx, rx) = unbounded::<Job>();
        let pending = Arc::new(AtomicU64::new(0));
        let workers = (0..workers.max(1))
            .map(|i| {
                let (rx, extents, sysfs, region) =
                    (rx.clone(), extents.clone(), sysfs.clone(), region.clone());
                let (pending, journal) = (pending.clone(), journal.clone());
                std::thread::Builder::new()
                    .name(format!("scrub-{i}"))
                    .spawn(move || {
                        for job in rx {
                            let done = match &job.whole {
                                Some(leased) => scrub_whole(&job.memory, leased),
                                None => scrub_one(&job.memory, &extents, &sysfs, &region),
                            };
                            if done {
                                freed(journal.as_deref(), job.id);
                            }
                            pending.fetch_sub(lease_len(&job.memory), Ordering::Relaxed);
                        }
                    })
                    .expect("spawn a scrub worker")
            })
            .collect();
        Scrubber {
            jobs: Some(tx),
            workers,
            pending,
            journal,
        }
    }

    /// Journals that lease `id`'s memory is free again.
    pub fn journal_freed(&self, id: u64) {
        freed(self.journal.as_deref(), id);
    }

    /// Queues a released lease; its extents stay leased until it is zeroed and destroyed.
    pub fn submit(&self, id: u64, memory: Arc<Allocation>) {
        self.send(Job {
            id,
            memory,
            whole: None,
        });
    }

    /// Queues the released lease of a static region's only device: zeroed, never destroyed;
    /// `leased` is cleared when it is done.
    pub fn submit_whole(&self, id: u64, memory: Arc<Allocation>, leased: Arc<AtomicBool>) {
        self.send(Job {
            id,
            memory,
            whole: Some(leased),
        });
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            self.pending
                .fetch_add(lease_len(&job.memory), Ordering::Relaxed);
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
    memory: Arc<Allocation>,
    /// For a static region's device: its `leased` flag.
    whole: Option<Arc<AtomicBool>>,
}

fn scrub_whole(memory: &Allocation, leased: &AtomicBool) -> bool {
    let len = lease_len(memory);
    if let Err(e) = zero(&memory.fd, len) {
        tracing::error!(error = %e, "scrubbing the static device failed; it stays out of use");
        return false;
    }
    leased.store(false, Ordering::Release);
    tracing::info!(bytes = len, "static device scrubbed");
    true
}

fn scrub_one(
    memory: &Allocation,
    extents: &Mutex<ExtentAllocator>,
    sysfs: &Mutex<()>,
    region: &Region,
) -> bool {
    let device = memory.device.as_deref().unwrap_or("?");
    let len = lease_len(memory);
    let started = std::time::Instant::now();
    let fd: BorrowedFd<'_> = std::os::fd::AsFd::as_fd(&memory.fd);
    if let Err(e) = zero(&fd, len) {
        // Never hand out memory that was not zeroed: the extents stay leased.
        tracing::error!(device, error = %e, "scrub failed; its extents stay out of use");
        return false;
    }
    let destroyed = {
        let _guard = sysfs.lock();
        destroy(region, device)
    };
    if let Err(e) = destroyed {
        tracing::error!(device, error = %crate::error::error_chain(&e), "cannot destroy a scrubbed device; its extents stay out of use");
        return false;
    }
    super::give_back(extents, &memory.extents);
    tracing::info!(
        device,
        bytes = len,
        ms = started.elapsed().as_millis() as u64,
        "scrubbed and destroyed"
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

fn lease_len(memory: &Allocation) -> u64 {
    memory.extents.iter().map(|e| e.len).sum()
}

impl Drop for Scrubber {
    fn drop(&mut self) {
        self.jobs = None; // workers finish the queue, then see the channel closed
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
