//! Request handling: the namespace, the pools, and the fds that go back to clients.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use membroker_client::codec::{MAX_PAYLOAD, encoded_len};
use membroker_client::error_chain;
use membroker_client::proto::{ErrorCode, LeaseInfo, PoolInfo, Request, Response};
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use crate::namespace::{Freed, Namespace, NsError, Peer, PoolAccount};
use crate::pool::{Allocation, Pool, PoolError};

/// A reply and the fd that travels with it, if any.
#[derive(Debug)]
pub struct Reply {
    pub response: Response,
    pub fd: Option<ReplyFd>,
}

/// The fd of a lease reply: the broker's own (shared) or a read-only reopening of it.
#[derive(Debug)]
pub enum ReplyFd {
    Shared(Arc<Allocation>),
    Owned(OwnedFd),
}

impl AsFd for ReplyFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            ReplyFd::Shared(fd) => fd.as_fd(),
            ReplyFd::Owned(fd) => fd.as_fd(),
        }
    }
}

impl Reply {
    fn new(response: Response) -> Reply {
        Reply { response, fd: None }
    }

    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::new(Response::Error {
            code,
            message: message.into(),
        })
    }
}

impl From<NsError> for Reply {
    fn from(e: NsError) -> Reply {
        Reply::error(e.code(), e.to_string())
    }
}

/// The broker's state shared by every connection.
#[derive(Debug)]
pub struct Broker {
    pools: Vec<Pool>,
    ns: Mutex<Namespace>,
    admin_gid: Option<u32>,
    /// Requests hold it shared; an upgrade takes it exclusively so nothing is half done when
    /// the process image is replaced.
    ops: parking_lot::RwLock<()>,
    notifier: Option<crate::notify::Notifier>,
    /// Duplicates of the listening socket and the lock file, inherited by an upgrade.
    handover: parking_lot::Mutex<Option<(OwnedFd, OwnedFd)>>,
    /// This instance, for `Hello`: a restart or upgrade changes it.
    instance: String,
}

impl Broker {
    /// A broker over `pools` (the first is the default); members of `admin_gid` (by primary
    /// group) and root may manage every lease.
    pub fn new(
        pools: Vec<Pool>,
        admin_gid: Option<u32>,
        journal: Option<Arc<crate::journal::Journal>>,
        notifier: Option<crate::notify::Notifier>,
    ) -> Broker {
        let accounts = pools
            .iter()
            .map(|p| PoolAccount {
                name: p.name.clone(),
                kind: p.kind,
                page_size: p.page_size,
                size: p.size,
                used: 0,
                leases: 0,
            })
            .collect();
        let mut ns = Namespace::new(accounts);
        if let Some(journal) = journal {
            ns.set_journal(journal);
        }
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Broker {
            pools,
            ns: Mutex::new(ns),
            admin_gid,
            ops: parking_lot::RwLock::new(()),
            notifier,
            handover: parking_lot::Mutex::new(None),
            instance: format!(
                "membroker {} (pid {}, started {}.{:03})",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                started.as_secs(),
                started.subsec_millis()
            ),
        }
    }

    /// Who is serving: version, pid, start time (changes with every restart or upgrade).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The systemd notifier, if started by systemd.
    pub fn notifier(&self) -> Option<&crate::notify::Notifier> {
        self.notifier.as_ref()
    }

    /// What an upgrade hands over besides the leases: the listening socket and lock file.
    pub fn set_handover(&self, listener: OwnedFd, lock: OwnedFd) {
        *self.handover.lock() = Some((listener, lock));
    }

    /// Re-executes `exe` with the same arguments, handing over the listening socket, the lock
    /// file and every memfd lease. Waits for requests in flight first. Only returns on failure
    /// (then nothing changed and this broker goes on serving).
    pub fn upgrade(&self, peer: &Peer) -> Result<std::convert::Infallible, String> {
        if !peer.admin {
            return Err(
                "permission denied: only root and the admin group may upgrade the broker".into(),
            );
        }
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the broker binary: {e}"))?;
        let exe = PathBuf::from(exe.to_string_lossy().trim_end_matches(" (deleted)"));
        if !exe.is_file() {
            return Err(format!(
                "the broker binary {} is gone; install it first",
                exe.display()
            ));
        }
        let _quiet = self.ops.write();
        let handover = self.handover.lock();
        let Some((listener, lock)) = handover.as_ref() else {
            return Err("this broker has no hand-over state (started without a listener)".into());
        };
        let memory = self.ns.lock().memory();
        let memfds: Vec<(u64, BorrowedFd<'_>)> = memory
            .iter()
            .filter(|(_, pool, _)| self.pools[*pool].kind == membroker_client::PoolKind::Memfd)
            .map(|(id, _, m)| (*id, m.fd.as_fd()))
            .collect();
        let all = || {
            [listener.as_fd(), lock.as_fd()]
                .into_iter()
                .chain(memfds.iter().map(|(_, fd)| *fd))
        };
        let prepared = match crate::handover::prepare(listener.as_fd(), lock.as_fd(), &memfds) {
            Ok(prepared) => prepared,
            Err(e) => {
                crate::handover::restore_cloexec(all());
                return Err(format!("cannot prepare the hand-over: {e}"));
            }
        };
        tracing::info!(exe = %exe.display(), leases = memory.len(), "upgrading: re-executing the broker");
        // execve itself: a file the kernel refuses (truncated, not a program) fails here and
        // this broker goes on, instead of glibc retrying it with /bin/sh.
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let err = crate::sys::execve(&exe, &args, (crate::handover::HANDOVER_ENV, &prepared.env));
        crate::handover::restore_cloexec(all());
        prepared.discard();
        tracing::error!(error = %err, "upgrade failed; still serving");
        Err(format!(
            "exec {} failed: {err}; the running broker goes on serving",
            exe.display()
        ))
    }

    /// The identity of a connection.
    pub fn peer(&self, conn: u64, pid: u32, uid: u32, gid: u32) -> Peer {
        let admin = uid == 0 || self.admin_gid == Some(gid);
        Peer {
            conn,
            pid,
            uid,
            gid,
            admin,
        }
    }

    /// Handles one request (after the handshake) from `peer`.
    pub fn handle(&self, peer: &Peer, request: Request) -> Reply {
        let _ops = self.ops.read();
        let result = match request {
            Request::Upgrade => {
                return Reply::error(ErrorCode::Protocol, "Upgrade is handled by the connection");
            }
            Request::Hello { .. } => {
                return Reply::error(ErrorCode::Protocol, "Hello may only be the first message");
            }
            Request::Create(req) => return self.create(peer, req),
            Request::Open { name, writable } => self.open(peer, &name, writable),
            Request::Release { name } => self.freeing(|ns| ns.release(peer, &name)),
            Request::Remove { name } => {
                let reply = self.freeing(|ns| ns.remove(peer, &name));
                if reply.is_ok() {
                    tracing::info!(lease = %name, "removed");
                }
                reply
            }
            Request::Stat { name } => self
                .ns
                .lock()
                .stat(&name)
                .map(|info| Reply::new(Response::Stat(info))),
            Request::List { prefix, after } => Ok(self.list(&prefix, after.as_deref())),
            Request::Df => Ok(Reply::new(Response::Df(self.df()))),
            Request::ReportPoison { name, offset, len } => {
                let result = self.ns.lock().report_poison(peer, &name, offset, len);
                result.map(|(pool, memory)| {
                    tracing::warn!(lease = %name, offset, len, "memory error reported");
                    for range in self.pools[pool].quarantine(&memory, offset, len) {
                        self.ns.lock().record_quarantine(pool, range);
                    }
                    Reply::new(Response::Ok)
                })
            }
        };
        result.unwrap_or_else(Reply::from)
    }

    fn create(&self, peer: &Peer, req: membroker_client::CreateLease) -> Reply {
        let reservation = match self.ns.lock().reserve(peer, &req) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        // The allocation (fallocate of up to the whole lease) runs outside the lock.
        let pool = &self.pools[reservation.pool];
        match pool.allocate(&reservation.name, reservation.size) {
            Ok(allocation) => {
                let committed = self.ns.lock().commit(peer, reservation, allocation);
                match committed {
                    Ok((id, info, fd)) => {
                        if let (Some(n), membroker_client::PoolKind::Memfd) =
                            (&self.notifier, pool.kind)
                        {
                            n.store(id, fd.fd.as_fd());
                        }
                        tracing::info!(lease = %info.name, size = info.size, pool = %info.pool, persistent = info.persistent, "created");
                        Reply {
                            response: Response::Lease(info),
                            fd: Some(ReplyFd::Shared(fd)),
                        }
                    }
                    Err(failed) => {
                        let (e, memory) = *failed;
                        tracing::error!(error = %e, "create not journaled; memory given back");
                        pool.discard(memory);
                        e.into()
                    }
                }
            }
            Err(e) => {
                self.ns.lock().abort(reservation);
                tracing::warn!(lease = %req.name, error = %e, "allocation failed");
                let code = match e {
                    PoolError::NoHugePages { .. } | PoolError::NoMemory { .. } => {
                        ErrorCode::OutOfMemory
                    }
                    PoolError::NoSpace { .. }
                    | PoolError::Dax {
                        source: crate::pool::DaxError::StaticBusy { .. },
                        ..
                    } => ErrorCode::NoSpace,
                    PoolError::Dax {
                        source: crate::pool::DaxError::StaticWholeOnly { .. },
                        ..
                    } => ErrorCode::InvalidArgument,
                    _ => ErrorCode::Internal,
                };
                Reply::error(code, format!("lease {}: {}", req.name, error_chain(&e)))
            }
        }
    }

    fn open(&self, peer: &Peer, name: &str, writable: bool) -> Result<Reply, NsError> {
        let (info, fd) = self.ns.lock().open(peer, name, writable)?;
        if writable {
            return Ok(Reply {
                response: Response::Lease(info),
                fd: Some(ReplyFd::Shared(fd)),
            });
        }
        // A read-only holder gets its own O_RDONLY file description, so it cannot map the
        // memory writable.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd.fd));
        match rustix::fs::open(
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(ro) => Ok(Reply {
                response: Response::Lease(info),
                fd: Some(ReplyFd::Owned(ro)),
            }),
            Err(e) => {
                drop(self.freeing(|ns| ns.release(peer, name)));
                Ok(Reply::error(
                    ErrorCode::Internal,
                    format!("lease {name}: reopening read-only failed: {e}"),
                ))
            }
        }
    }

    fn freeing(
        &self,
        op: impl FnOnce(&mut Namespace) -> Result<Freed, NsError>,
    ) -> Result<Reply, NsError> {
        let freed = op(&mut self.ns.lock())?;
        self.give_back(freed);
        Ok(Reply::new(Response::Ok))
    }

    /// Returns leases nobody holds to their pools, outside the namespace lock: closing the
    /// last fd of a memfd may free a lot of memory, a device gets scrubbed.
    fn give_back(&self, freed: Freed) {
        for lease in freed {
            let pool = &self.pools[lease.pool];
            if let (Some(n), membroker_client::PoolKind::Memfd) = (&self.notifier, pool.kind) {
                n.remove(lease.id);
            }
            pool.release(lease.id, lease.memory);
        }
    }

    /// The namespace's accounting, completed by what pools track themselves (device-dax: free
    /// aligned space, bytes being scrubbed, quarantined bytes).
    fn df(&self) -> Vec<PoolInfo> {
        let mut pools = self.ns.lock().df();
        for (info, pool) in pools.iter_mut().zip(&self.pools) {
            if let Some(usage) = pool.usage() {
                info.free = usage.free;
                info.scrubbing = usage.scrubbing;
                info.quarantined = usage.quarantined;
            }
        }
        pools
    }

    fn list(&self, prefix: &str, after: Option<&str>) -> Reply {
        // Both the wire size and the count are bounded, so a page always decodes within the
        // client's allocation budget (codec::MAX_DECODED).
        const MAX_PAGE: usize = 256;
        let budget = MAX_PAYLOAD - 1024;
        let (mut used, mut count) = (0usize, 0usize);
        let fits = |info: &LeaseInfo| {
            used = used.saturating_add(encoded_len(info));
            count += 1;
            used <= budget && count <= MAX_PAGE
        };
        let (leases, more) = self.ns.lock().list(prefix, after, fits);
        Reply::new(Response::List { leases, more })
    }

    /// Puts the journal's leases back (after a restart), with the memory the pools recovered;
    /// leases whose memory is gone are journaled as freed. Then compacts the journal.
    pub fn restore(
        &self,
        replayed: &crate::journal::Replayed,
        memory: Vec<(u64, Allocation)>,
        lost: Vec<(u64, String)>,
        journal: &crate::journal::Journal,
    ) {
        let mut ns = self.ns.lock();
        ns.restore_quarantine(&replayed.quarantine);
        for (id, memory) in memory {
            let lease = &replayed.leases[&id];
            if let Err(why) = ns.restore(lease, memory) {
                tracing::error!(lease = %lease.lease.name, why, "cannot restore lease");
            }
        }
        const NAMED: usize = 20;
        for (i, (id, why)) in lost.iter().enumerate() {
            if i < NAMED {
                let lease = &replayed.leases[id];
                tracing::error!(lease = %lease.lease.name, id, why, "lease lost across the restart");
            }
            if let Some(n) = &self.notifier {
                n.remove(*id);
            }
        }
        if lost.len() > NAMED {
            tracing::error!(
                more = lost.len() - NAMED,
                "more leases lost across the restart"
            );
        }
        // The compacted journal no longer lists lost leases; only if compaction fails are they
        // journaled as freed one by one.
        if let Err(e) = journal.compact(&ns.snapshot()) {
            tracing::error!(error = %error_chain(&e), "journal compaction at start failed");
            for (id, _) in &lost {
                if let Err(e) = journal.append(&crate::journal::Record::Freed { id: *id }) {
                    tracing::error!(error = %error_chain(&e), "cannot journal a lost lease");
                }
            }
        }
    }

    /// Ends the re-attach grace period after a restart.
    pub fn expire_orphans(&self) {
        let freed = self.ns.lock().expire_orphans();
        if !freed.is_empty() {
            tracing::info!(
                leases = freed.len(),
                "released leases nobody re-attached to after the restart"
            );
        }
        self.give_back(freed);
    }

    /// Leases, for logs.
    pub fn lease_count(&self) -> usize {
        self.ns.lock().df().iter().map(|p| p.leases as usize).sum()
    }

    /// A connection closed: release everything it held.
    pub fn disconnect(&self, conn: u64) {
        let freed = self.ns.lock().disconnect(conn);
        if !freed.is_empty() {
            tracing::info!(leases = freed.len(), "released on disconnect");
        }
        self.give_back(freed);
    }
}
