//! Memory-error reports on leases, and the limits that keep them from being a weapon.
//!
//! A report quarantines physical memory for good on device-dax, so only those who could
//! damage the memory anyway may make one: a holder of a writable fd, the owner, root and the
//! admin group (a read-only holder may not). A report is widened to whole pages of the lease's
//! page size (the kernel poisons whole pages, and byte-sized reports would split the pool's
//! map without bound), merged with the ranges it touches, and limited:
//!
//! - a lease keeps at most [`MAX_POISON_RANGES`] distinct ranges, so its description (`ls`,
//!   `stat`) stays small whatever is reported;
//! - a uid that is not root or an admin may report at most [`MAX_POISON_PAGES_PER_UID`] pages
//!   over the broker's run (counted from its start; ranges already poisoned cost nothing).

use std::sync::Arc;

use membroker_client::proto::{PoisonInfo, PoisonedLease};

use super::{Namespace, NsError, Peer, Result};
use crate::journal::{Record as JournalRecord, add_poison};
use crate::pool::Allocation;

/// Distinct poisoned ranges a lease may have (after merging).
pub const MAX_POISON_RANGES: usize = 64;

/// Pages a uid other than root or an admin may report poisoned per broker run.
pub const MAX_POISON_PAGES_PER_UID: u64 = 64;

/// An accepted report: the lease's pool and memory, and the range widened to whole pages.
#[derive(Debug)]
pub struct PoisonReport {
    pub pool: usize,
    pub memory: Arc<Allocation>,
    pub offset: u64,
    pub len: u64,
    /// Whether any of it was not reported before (the pool has something to quarantine).
    pub new: bool,
}

impl Namespace {
    /// Records a memory error a writable holder, the owner or an admin reported at
    /// `[offset, offset + len)`, widened to whole pages.
    pub fn report_poison(
        &mut self,
        peer: &Peer,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<PoisonReport> {
        let (id, entry) = self.lookup(name)?;
        Self::check_label(peer, entry, "report poison on it")?;
        let writer = entry.writers.contains(&peer.conn);
        if !writer && !peer.admin && peer.uid != entry.lease.uid {
            let op = if entry.holders.contains_key(&peer.conn) {
                "report poison on it (a read-only holder may not)"
            } else {
                "report poison on it"
            };
            return Err(Self::denied(entry, op));
        }
        let size = entry.lease.size;
        let end = offset
            .checked_add(len)
            .filter(|&end| len > 0 && end <= size);
        let Some(end) = end else {
            return Err(NsError::Invalid(format!(
                "lease {name}: poison range {offset}+{len} is outside its {size} bytes"
            )));
        };
        let page = entry.lease.page_size.bytes();
        // The size is a multiple of the page, so the widened range stays inside the lease.
        let (start, end) = (offset - offset % page, end.div_ceil(page) * page);
        let report = PoisonInfo {
            offset: start,
            len: end - start,
        };
        let before: u64 = entry.poison.iter().map(|p| p.len).sum();
        let mut merged = entry.poison.clone();
        let new = add_poison(&mut merged, report);
        if merged.len() > MAX_POISON_RANGES {
            return Err(NsError::PoisonLimit(format!(
                "lease {name}: {} poisoned ranges are already reported, at most \
                 {MAX_POISON_RANGES} are kept; report a range that covers them, or ask an \
                 admin (`membroker quarantine`)",
                entry.poison.len()
            )));
        }
        let pages = (merged.iter().map(|p| p.len).sum::<u64>() - before) / page;
        if !peer.admin {
            let reported = self.poison_reported.get(&peer.uid).copied().unwrap_or(0);
            if reported + pages > MAX_POISON_PAGES_PER_UID {
                return Err(NsError::PoisonLimit(format!(
                    "lease {name}: uid {} reported {reported} poisoned pages since the broker \
                     started, at most {MAX_POISON_PAGES_PER_UID} are accepted, {pages} more \
                     asked; ask an admin",
                    peer.uid
                )));
            }
            *self.poison_reported.entry(peer.uid).or_default() += pages;
        }
        let entry = self.leases.get_mut(&id).expect("named lease exists");
        if new {
            entry.poison = merged;
            self.unjournaled.push(JournalRecord::Poison {
                id,
                offset: report.offset,
                len: report.len,
            });
        }
        Ok(PoisonReport {
            pool: entry.pool,
            memory: entry.memory.clone(),
            offset: report.offset,
            len: report.len,
            new,
        })
    }

    /// Leases with reported poison that `peer` may see (as `ls` shows them: another tenant's
    /// private lease is not named), by pool index, in name order (leases removed while held
    /// keep their name: those of one name in the order they were made).
    pub fn poisoned(&self, peer: &Peer) -> Vec<(usize, PoisonedLease)> {
        let mut poisoned: Vec<_> = self
            .names
            .values()
            .map(|id| &self.leases[id])
            .chain(self.leases.values().filter(|e| e.removed))
            .filter(|e| !e.poison.is_empty() && Self::visible(peer, e))
            .collect();
        poisoned.sort_by(|a, b| {
            (a.pool, &a.lease.name, a.lease.id).cmp(&(b.pool, &b.lease.name, b.lease.id))
        });
        poisoned
            .into_iter()
            .map(|e| {
                let lease = PoisonedLease {
                    name: e.lease.name.clone(),
                    poison: e.poison.clone(),
                };
                (e.pool, lease)
            })
            .collect()
    }
}
