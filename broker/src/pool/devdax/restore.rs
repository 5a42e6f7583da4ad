//! Reconciling a device-dax region with the journal after a broker restart (the device-dax
//! half of `crate::restore`).
//!
//! The devices of live leases persist by themselves: each is checked against the journal
//! (same ranges), rebound if a crash left it unbound, reopened, and its extents claimed.
//! Leases that were being scrubbed are scrubbed again (through a fresh device when theirs was
//! already destroyed). Devices the journal does not know are
//! reported and their ranges kept out of use — never destroyed.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use membroker_client::proto::Extent;
use rustix::fs::{Mode, OFlags};

use super::{DaxError, DevdaxPool, sysfs};
use crate::journal::ReplayedLease;
use crate::pool::{Allocation, Restored};

fn open_device(device: &str) -> Result<std::os::fd::OwnedFd, DaxError> {
    if sysfs::device_state(device)?.driver.is_none() {
        sysfs::bind(device)?;
    }
    let node = sysfs::wait_for_node(device)?;
    rustix::fs::open(&node, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|source| DaxError::Open { path: node, source })
}

impl DevdaxPool {
    /// Takes back the journal's leases of this pool and its quarantine.
    /// `creating`: device creations the journal saw start and never resolved; a device with
    /// exactly those ranges was never delivered, and is destroyed.
    pub fn restore(
        &self,
        leases: &[&ReplayedLease],
        quarantine: &[Extent],
        creating: &[Vec<Extent>],
    ) -> Restored {
        let mut out = Restored::default();
        if let Some((device, size, leased)) = &self.whole {
            for l in leases {
                match open_device(device) {
                    Ok(fd) if !l.scrubbing => {
                        leased.store(true, Ordering::Release);
                        out.memory.push((
                            l.lease.id,
                            Allocation {
                                fd,
                                extents: vec![Extent {
                                    start: 0,
                                    len: *size,
                                }],
                                device: None,
                            },
                        ));
                    }
                    Ok(fd) => {
                        leased.store(true, Ordering::Release);
                        self.release(
                            l.lease.id,
                            Arc::new(Allocation {
                                fd,
                                extents: vec![Extent {
                                    start: 0,
                                    len: *size,
                                }],
                                device: None,
                            }),
                        );
                        out.rescrubbing += 1;
                    }
                    Err(e) => out.lost.push((l.lease.id, crate::error::error_chain(&e))),
                }
            }
            return out;
        }
        let mut known = std::collections::BTreeSet::new();
        let mut rescrub: Vec<(u64, Vec<Extent>)> = Vec::new();
        for l in leases {
            let Some(device) = l.lease.device.clone() else {
                out.lost
                    .push((l.lease.id, "journal names no device".into()));
                continue;
            };
            match self.adopt(&device, &l.lease.extents) {
                Ok(fd) => {
                    known.insert(device.clone());
                    let memory = Allocation {
                        fd,
                        extents: l.lease.extents.clone(),
                        device: Some(device),
                    };
                    if l.scrubbing {
                        self.release(l.lease.id, Arc::new(memory));
                        out.rescrubbing += 1;
                    } else {
                        out.memory.push((l.lease.id, memory));
                    }
                }
                Err(why) if l.scrubbing && !sysfs::exists(&device) => {
                    // The crash came after the holders' device was destroyed, perhaps before
                    // its memory was zeroed: zero it again through a fresh device (once a
                    // half-done scrub device on exactly these extents is destroyed, below).
                    tracing::info!(%device, why, "released device already gone; scrubbing its extents again");
                    match self.extents.lock().claim(&l.lease.extents) {
                        Ok(()) => rescrub.push((l.lease.id, l.lease.extents.clone())),
                        Err(e) => out.lost.push((l.lease.id, e.to_string())),
                    }
                }
                Err(why) => out.lost.push((l.lease.id, why)),
            }
        }
        // Devices nobody recorded: never destroyed, kept out of use, reported; unless the
        // journal shows a creation of exactly those ranges that never finished (never delivered).
        let mut creating: Vec<&Vec<Extent>> = creating.iter().collect();
        if let Ok(devices) = sysfs::region_devices(self.region.id) {
            for device in devices {
                let Ok(state) = sysfs::device_state(&device) else {
                    continue;
                };
                if state.size == 0 || known.contains(&device) {
                    continue;
                }
                let ranges: Vec<Extent> = sysfs::mappings(&device)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(start, len)| Extent { start, len })
                    .collect();
                if rescrub.iter().any(|(_, extents)| *extents == ranges) {
                    // A scrub device the broker made for itself, never delivered.
                    let destroyed = {
                        let _sysfs = self.sysfs.lock();
                        super::scrub::destroy(&self.region, &device)
                    };
                    match destroyed {
                        Ok(()) => {
                            tracing::info!(%device, "destroyed the device of an interrupted scrub")
                        }
                        Err(e) => {
                            tracing::error!(%device, error = %crate::error::error_chain(&e), "cannot destroy the device of an interrupted scrub")
                        }
                    }
                    continue;
                }
                if let Some(i) = creating.iter().position(|c| **c == ranges) {
                    creating.remove(i);
                    let destroyed = {
                        let _sysfs = self.sysfs.lock();
                        super::scrub::destroy(&self.region, &device)
                    };
                    match destroyed {
                        Ok(()) => {
                            tracing::info!(%device, "destroyed a half-made device of an interrupted create (never delivered)");
                            self.abandon_journal(&ranges);
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(%device, error = %crate::error::error_chain(&e), "cannot destroy a half-made device")
                        }
                    }
                }
                if let Err(e) = self.extents.lock().claim(&ranges) {
                    tracing::error!(%device, error = %e, "unknown device overlaps memory the journal assigns");
                }
                tracing::warn!(%device, size = state.size, "device-dax device not in the journal: left alone, its memory kept out of use");
                out.unknown.push(device);
            }
        }
        out.rescrubbing += rescrub.len();
        for (id, extents) in rescrub {
            self.scrubber.submit_extents(id, extents);
        }
        // Creations that had not made a device yet: nothing to undo.
        for extents in creating {
            self.abandon_journal(extents);
        }
        let mut alloc = self.extents.lock();
        for range in quarantine {
            if let Err(e) = alloc.quarantine(*range) {
                tracing::error!(error = %e, "cannot restore a quarantined range");
            }
        }
        out
    }

    /// Checks a journaled device against sysfs, claims its extents, reopens it.
    fn adopt(&self, device: &str, extents: &[Extent]) -> Result<std::os::fd::OwnedFd, String> {
        if !sysfs::exists(device) {
            return Err(format!("device {device} no longer exists"));
        }
        let ranges = sysfs::mappings(device).map_err(|e| crate::error::error_chain(&e))?;
        let journal: Vec<(u64, u64)> = extents.iter().map(|e| (e.start, e.len)).collect();
        if ranges != journal {
            return Err(format!(
                "device {device} has ranges {ranges:x?}, the journal says {journal:x?}"
            ));
        }
        let fd = open_device(device).map_err(|e| crate::error::error_chain(&e))?;
        self.extents
            .lock()
            .claim(extents)
            .map_err(|e| e.to_string())?;
        Ok(fd)
    }
}
