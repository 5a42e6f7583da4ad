//! What one tenant may take of the broker: connections (in all, per uid, a reserve only root
//! and the admin group may use, a deadline for `Hello`) and open files.

use std::collections::HashMap;
use std::time::Duration;

use rustix::process::{Resource, Rlimit};

use crate::namespace::Peer;

/// Open files kept free for root and the admin group, the journal and compaction: a
/// tenant's create or connection is refused before the table comes this close to full.
pub const FD_RESERVE: u64 = 256;

/// The connection limits of `membroker serve`.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections at once, everyone together.
    pub max: usize,
    /// Connections at once from one uid (root and the admin group excepted).
    pub per_uid: usize,
    /// Of `max`, how many only root and the admin group may use.
    pub reserve: usize,
    /// A connection that has not sent `Hello` by then is closed.
    pub hello_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> ConnLimits {
        ConnLimits {
            max: 16384,
            per_uid: 256,
            reserve: 64,
            hello_timeout: Duration::from_secs(5),
        }
    }
}

/// Connections open now, in all and per uid.
#[derive(Debug, Default)]
pub struct ConnCount {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

impl ConnCount {
    /// Counts a new connection of `peer`, or says why it is refused.
    pub fn admit(&mut self, limits: &ConnLimits, peer: &Peer) -> Result<(), String> {
        if self.total >= limits.max {
            return Err(format!(
                "the broker serves {} connections, its limit (--max-connections); try again later",
                self.total
            ));
        }
        let mine = self.per_uid.get(&peer.uid).copied().unwrap_or(0);
        if !peer.admin {
            let shared = limits.max.saturating_sub(limits.reserve);
            if self.total >= shared {
                return Err(format!(
                    "the broker serves {} connections; the last {} are kept for root and the admin group; try again later",
                    self.total, limits.reserve
                ));
            }
            if mine >= limits.per_uid {
                return Err(format!(
                    "uid {} has {mine} connections open, its limit (--max-connections-per-uid); close some first",
                    peer.uid
                ));
            }
        }
        self.total += 1;
        self.per_uid.insert(peer.uid, mine + 1);
        Ok(())
    }

    /// A connection of `uid` ended.
    pub fn release(&mut self, uid: u32) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
        }
    }
}

/// Sets the soft limit on open files to the hard one, or to `lower` if given and lower;
/// returns the limit now in force.
pub fn set_nofile(lower: Option<u64>) -> u64 {
    let Rlimit { current, maximum } = rustix::process::getrlimit(Resource::Nofile);
    let want = match (lower, maximum) {
        (Some(lower), Some(max)) => Some(lower.min(max)),
        (Some(lower), None) => Some(lower),
        (None, max) => max,
    };
    if want != current {
        let raised = Rlimit {
            current: want,
            maximum,
        };
        if let Err(e) = rustix::process::setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot set the open-file limit");
        }
    }
    nofile_limit()
}

/// The soft limit on open files (`u64::MAX` if unlimited).
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Files this process has open now.
pub fn open_files() -> std::io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// The size of this process's file table (`FDSize` in `/proc/self/status`): the kernel grows
/// it in powers of two past the highest fd in use, so it bounds the files open from above,
/// and reading it costs the same however many are open (about 10 µs), where counting them
/// costs an entry each (7 ms with 15 000 open).
pub fn file_table_size() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("FDSize:"))
        .and_then(|size| size.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no FDSize in /proc/self/status"))
}

/// Whether `peer` may open another lease's fd: a tenant must leave [`FD_RESERVE`] files
/// free, root and the admin group a quarter of it (the journal's and compaction's share).
/// Every create asks, so the files are counted only when the file table's size says the
/// limit may be near.
pub fn check_fd_headroom(peer: &Peer) -> Result<(), String> {
    let limit = nofile_limit();
    let keep = if peer.admin {
        FD_RESERVE / 4
    } else {
        FD_RESERVE
    };
    if file_table_size().is_ok_and(|size| size.saturating_add(keep) <= limit) {
        return Ok(());
    }
    let open = match open_files() {
        Ok(open) => open,
        Err(e) => {
            tracing::warn!(error = %e, "cannot count open files");
            return Ok(());
        }
    };
    if open.saturating_add(keep) > limit {
        return Err(format!(
            "the broker is near its open-file limit ({open} of {limit} open, {keep} kept free{}): release leases or close connections first, or raise LimitNOFILE",
            if peer.admin {
                ""
            } else {
                " for root and the admin group"
            }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, admin: bool) -> Peer {
        Peer {
            conn: 1,
            pid: 1,
            uid,
            gid: uid,
            groups: Vec::new().into(),
            admin,
            label: None,
        }
    }

    #[test]
    fn per_uid_and_reserve() {
        let limits = ConnLimits {
            max: 10,
            per_uid: 3,
            reserve: 4,
            hello_timeout: Duration::from_secs(1),
        };
        let mut count = ConnCount::default();
        for _ in 0..3 {
            count.admit(&limits, &peer(1000, false)).unwrap();
        }
        let e = count.admit(&limits, &peer(1000, false)).unwrap_err();
        assert!(e.contains("uid 1000 has 3 connections"), "{e}");
        for _ in 0..3 {
            count.admit(&limits, &peer(1001, false)).unwrap();
        }
        let e = count.admit(&limits, &peer(1002, false)).unwrap_err();
        assert!(e.contains("kept for root"), "{e}");
        for _ in 0..4 {
            count.admit(&limits, &peer(0, true)).unwrap();
        }
        assert!(count.admit(&limits, &peer(0, true)).is_err());
        count.release(1000);
        count.admit(&limits, &peer(0, true)).unwrap();
        for uid in [1000, 1000, 1001, 1001, 1001] {
            count.release(uid);
        }
        for _ in 0..5 {
            count.release(0);
        }
        assert_eq!(count.total, 0);
        assert!(count.per_uid.is_empty());
    }

    #[test]
    fn the_file_table_bounds_the_files_open() {
        let files: Vec<std::fs::File> = (0..300)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let (size, open) = (file_table_size().unwrap(), open_files().unwrap());
        assert!(
            open >= 300 && size >= open,
            "{open} files open, table {size}"
        );
        drop(files);
    }
}
