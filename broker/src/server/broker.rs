//! Request handling: the one dispatcher. Every request a connection decodes, the handshake
//! and `Upgrade` included, is answered by [`Broker::handle`], which calls the namespace, the
//! pools and the journal and builds the reply and the fd that travels with it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use membroker_client::codec::encoded_len;
use membroker_client::proto::{
    DirInfo, ErrorCode, Extent, LeaseInfo, PROTOCOL_MAX, PROTOCOL_MIN, PoisonedLease, PoolInfo,
    PoolKind, QuarantineAfter, QuarantineInfo, QuotaInfo, Request, Response,
};
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use crate::error::{WireError, error_chain};
use crate::journal::{Journal, JournalError, Ticket};
use crate::metrics::Metrics;
use crate::namespace::{Freed, Namespace, NsError, Peer};
use crate::notify::Notifier;
use crate::pool::{Allocation, Pool, overhead};

use super::pages::{PoolQuarantine, page_fits, quarantine_page};

/// A reply, the fd that travels with it, and what the connection does next.
#[derive(Debug)]
pub struct Reply {
    pub response: Response,
    pub fd: Option<ReplyFd>,
    pub then: Then,
}

/// What a connection does once a reply is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Read the next request.
    Continue,
    /// Close the connection: the client broke the protocol (the reply says how).
    Close,
    /// Re-execute the broker ([`Broker::upgrade`]); the reply was `Ok`.
    Upgrade,
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
        Reply {
            response,
            fd: None,
            then: Then::Continue,
        }
    }

    fn lease(info: LeaseInfo, fd: ReplyFd) -> Reply {
        Reply {
            fd: Some(fd),
            ..Reply::new(Response::Lease(info))
        }
    }

    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::new(Response::Error {
            code,
            message: message.into(),
        })
    }

    /// An error reply after which the connection is closed (a protocol violation).
    pub fn fatal(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply {
            then: Then::Close,
            ..Reply::error(code, message)
        }
    }

    /// The error's code and its whole cause chain.
    fn failed(e: &dyn WireError) -> Reply {
        Reply::error(e.code(), error_chain(e))
    }
}

/// What [`Broker::handle`] answers: a reply now, or one that waits for the journal.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "moved once, from the dispatcher to the transport; boxing would cost every reply an allocation"
)]
pub enum Answer {
    Now(Reply),
    /// The request changed the namespace and its reply may only go once the change's records
    /// are on disk: [`Broker::when_durable`] builds it then, without holding the calling
    /// thread meanwhile.
    Durable(Deferred),
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Answer {
        Answer::Now(reply)
    }
}

/// The rest of a request whose records are written but maybe not yet on disk: builds the
/// reply from whether they reached it.
pub struct Deferred {
    ticket: Ticket,
    finish: Finish,
    /// Counts it among the changes in flight until it is finished (or dropped).
    _in_flight: InFlight,
}

/// What builds a deferred reply, given whether its records reached the disk.
type Finish = Box<dyn FnOnce(&Broker, Result<(), JournalError>) -> Reply + Send>;

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

/// One change whose reply waits for the journal; an upgrade waits until there are none.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An acknowledged change's reply once its records are on disk, or could not be put there.
fn acknowledge(reply: Reply, durable: Result<(), JournalError>) -> Reply {
    match durable {
        Err(e) if matches!(reply.response, Response::Ok) => Reply::error(
            ErrorCode::Internal,
            format!(
                "the change was made but the state journal did not record it, so it may not \
                 survive a broker restart: {}",
                error_chain(&e)
            ),
        ),
        _ => reply,
    }
}

/// One connection's protocol state: who it is and the version the handshake agreed on.
#[derive(Debug)]
pub struct Session {
    pub peer: Peer,
    /// `None` until `Hello`.
    pub version: Option<u16>,
}

impl Session {
    pub fn new(peer: Peer) -> Session {
        Session {
            peer,
            version: None,
        }
    }
}

/// The broker's state shared by every connection.
#[derive(Debug)]
pub struct Broker {
    pools: Vec<Pool>,
    /// The namespace; whoever changes it journals its records before letting go (see
    /// [`Broker::change`]).
    ns: Mutex<Namespace>,
    journal: Option<Arc<Journal>>,
    admin_gid: Option<u32>,
    /// Requests hold it shared; an upgrade takes it exclusively so nothing is half done when
    /// the process image is replaced.
    ops: parking_lot::RwLock<()>,
    notifier: Option<Notifier>,
    /// Duplicates of the listening socket and the lock file, and whether the socket is
    /// systemd's, inherited by an upgrade.
    handover: parking_lot::Mutex<Option<(OwnedFd, OwnedFd, bool)>>,
    /// This instance, for `Hello`: a restart or upgrade changes it.
    instance: String,
    metrics: Arc<Metrics>,
    /// Changes whose reply waits for the journal ([`Deferred`]).
    in_flight: Arc<AtomicUsize>,
}

impl Broker {
    /// A broker over `pools` (the first is the default) and the namespace restored for them;
    /// members of `admin_gid` (primary or supplementary group) and root may manage every lease.
    pub fn new(
        pools: Vec<Pool>,
        ns: Namespace,
        admin_gid: Option<u32>,
        journal: Option<Arc<Journal>>,
        notifier: Option<Notifier>,
    ) -> Broker {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let metrics = Arc::new(Metrics::default());
        if let Some(journal) = &journal {
            journal.time_syncs(metrics.journal_sync());
        }
        Broker {
            pools,
            ns: Mutex::new(ns),
            journal,
            admin_gid,
            ops: parking_lot::RwLock::new(()),
            notifier,
            handover: parking_lot::Mutex::new(None),
            in_flight: Arc::new(AtomicUsize::new(0)),
            instance: format!(
                "membroker {} (pid {}, started {}.{:03})",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                started.as_secs(),
                started.subsec_millis()
            ),
            metrics,
        }
    }

    /// What the broker counts.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The metrics' text now (Prometheus exposition format).
    pub fn metrics_text(&self) -> String {
        let (pools, states) = {
            let ns = self.ns.lock();
            (ns.df(), ns.lease_states())
        };
        let pools = self.with_usage(pools).into_iter().zip(states).collect();
        self.metrics.encode(crate::metrics::State { pools })
    }

    /// The systemd notifier, if started by systemd.
    pub fn notifier(&self) -> Option<&Notifier> {
        self.notifier.as_ref()
    }

    /// What an upgrade hands over besides the leases: the listening socket and lock file;
    /// `activated`: the socket is systemd's.
    pub fn set_handover(&self, listener: OwnedFd, lock: OwnedFd, activated: bool) {
        *self.handover.lock() = Some((listener, lock, activated));
    }

    /// The identity of a connection: `groups` are its supplementary groups, `label` its
    /// security label; root and members of the admin group (primary or supplementary) are
    /// admins.
    pub fn peer(
        &self,
        conn: u64,
        pid: u32,
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
        label: Option<String>,
    ) -> Peer {
        let mut peer = Peer {
            conn,
            pid,
            uid,
            gid,
            groups: groups.into(),
            admin: uid == 0,
            label: label.map(Into::into),
        };
        peer.admin |= self.admin_gid.is_some_and(|admin| peer.in_group(admin));
        peer
    }

    /// Answers one decoded request of a connection; `version` is the one its header carries.
    pub fn handle(&self, session: &mut Session, version: u16, request: Request) -> Answer {
        let started = Instant::now();
        let op = crate::metrics::Op::of(&request);
        match self.answer(session, version, request) {
            Answer::Now(reply) => {
                self.metrics.request(op, &reply.response, started.elapsed());
                Answer::Now(reply)
            }
            // Counted once its reply is built, when its records are on disk.
            Answer::Durable(mut deferred) => {
                let finish = deferred.finish;
                deferred.finish = Box::new(move |broker, durable| {
                    let reply = finish(broker, durable);
                    broker
                        .metrics
                        .request(op, &reply.response, started.elapsed());
                    reply
                });
                Answer::Durable(deferred)
            }
        }
    }

    fn answer(&self, session: &mut Session, version: u16, request: Request) -> Answer {
        let agreed = match (session.version, request) {
            (
                None,
                Request::Hello {
                    min_version,
                    max_version,
                    client,
                },
            ) => {
                return self
                    .hello(session, min_version, max_version, &client)
                    .into();
            }
            (None, _) => {
                return Reply::fatal(ErrorCode::Protocol, "the first message must be Hello").into();
            }
            (Some(_), Request::Hello { .. }) => {
                return Reply::fatal(ErrorCode::Protocol, "Hello may only be the first message")
                    .into();
            }
            (Some(agreed), _) if version != agreed => {
                return Reply::fatal(
                    ErrorCode::Protocol,
                    format!("message at protocol {version} after agreeing on {agreed}"),
                )
                .into();
            }
            (Some(_), request) => request,
        };
        let peer = &session.peer;
        let _ops = self.ops.read();
        let reply = match agreed {
            Request::Hello { .. } => unreachable!("answered above"),
            Request::Upgrade if !peer.admin => Reply::error(
                ErrorCode::PermissionDenied,
                "permission denied: only root and the admin group may upgrade the broker",
            ),
            Request::Upgrade => Reply {
                then: Then::Upgrade,
                ..Reply::new(Response::Ok)
            },
            Request::Create(req) => match super::limits::check_fd_headroom(peer) {
                Ok(()) => return self.create(peer, req),
                Err(why) => Reply::error(ErrorCode::NoSpace, format!("lease {}: {why}", req.name)),
            },
            Request::Open { name, writable } => self.open(peer, &name, writable),
            Request::Release { name } => return self.freeing(|ns| ns.release(peer, &name), None),
            Request::Remove { name } => {
                return self.freeing(|ns| ns.remove(peer, &name), Some(name.clone()));
            }
            Request::Stat { name } => match self.ns.lock().stat(peer, &name) {
                Ok(info) => Reply::new(Response::Stat(info)),
                Err(e) => Reply::failed(&e),
            },
            Request::Describe { name } => match self.ns.lock().describe(peer, &name) {
                Ok((info, totals)) => Reply::new(Response::Described { info, totals }),
                Err(e) => Reply::failed(&e),
            },
            Request::List { prefix, after } => self.list(peer, &prefix, after.as_deref()),
            Request::Df => Reply::new(Response::Df(self.df())),
            Request::ReportPoison { name, offset, len } => {
                let (uid, lease) = (peer.uid, name.clone());
                return self.acknowledged(
                    |ns| ns.report_poison(peer, &name, offset, len),
                    move |broker, report| match report {
                        Ok(report) => {
                            let (offset, len) = (report.offset, report.len);
                            tracing::warn!(%lease, offset, len, uid, new = report.new, "memory error reported");
                            if report.new {
                                broker.pools[report.pool].quarantine(&report.memory, offset, len);
                            }
                            Reply::new(Response::Ok)
                        }
                        Err(e) => Reply::failed(&e),
                    },
                );
            }
            Request::Mkdir(req) => {
                return self.meta(req.path.clone(), "mkdir", |ns| ns.mkdir(peer, &req));
            }
            Request::Chmod { name, mode } => {
                return self.meta(name.clone(), "chmod", |ns| ns.chmod(peer, &name, mode));
            }
            Request::Chown { name, uid, gid } => {
                return self.meta(name.clone(), "chown", |ns| ns.chown(peer, &name, uid, gid));
            }
            Request::Dirs { prefix, after } => self.dirs(peer, &prefix, after.as_deref()),
            Request::Quota => Reply::new(Response::Quota(self.ns.lock().quotas(peer))),
            Request::Quarantine => Reply::new(Response::Quarantine(self.quarantine(peer))),
            Request::QuotaPage { after } => self.quota_page(peer, after.as_ref()),
            Request::QuarantinePage { after } => self.quarantine_page(peer, after.as_ref()),
            Request::ClearQuarantine { .. } if !peer.admin => Reply::error(
                ErrorCode::PermissionDenied,
                "permission denied: only root and the admin group may clear quarantine",
            ),
            Request::ClearQuarantine { pool, start, len } => {
                let Some(p) = self.pools.iter().find(|p| p.name == pool) else {
                    return Reply::error(ErrorCode::NotFound, format!("no pool named {pool:?}"))
                        .into();
                };
                match p.unquarantine(Extent { start, len }) {
                    Ok(()) => Reply::new(Response::Ok),
                    Err(e) => Reply::failed(&e),
                }
            }
        };
        reply.into()
    }

    /// Calls `then` with a deferred reply once its records are on disk (or the journal says
    /// they cannot be): on this thread if they are already or it runs the sync, else on the
    /// thread that ends the sync covering them. Meanwhile this thread is free.
    pub fn when_durable(
        self: &Arc<Self>,
        deferred: Deferred,
        then: impl FnOnce(Reply) + Send + 'static,
    ) {
        let finish = move |broker: &Broker, durable| {
            let Deferred {
                finish, _in_flight, ..
            } = deferred;
            let reply = finish(broker, durable);
            drop(_in_flight);
            then(reply);
        };
        match &self.journal {
            Some(journal) => {
                let broker = self.clone();
                let ticket = deferred.ticket;
                journal.when_durable(ticket, move |durable| finish(&broker, durable));
            }
            None => finish(self, Ok(())),
        }
    }

    /// A reply that waits for `written` to be on disk, finished by `finish`; now if there is
    /// nothing to wait for.
    fn after_journal(
        &self,
        written: Option<crate::journal::Result<Ticket>>,
        finish: impl FnOnce(&Broker, Result<(), JournalError>) -> Reply + Send + 'static,
    ) -> Answer {
        match written {
            Some(Ok(ticket)) => Answer::Durable(Deferred {
                ticket,
                finish: Box::new(finish),
                _in_flight: InFlight::new(&self.in_flight),
            }),
            Some(Err(e)) => finish(self, Err(e)).into(),
            None => finish(self, Ok(())).into(),
        }
    }

    /// A change of names, owners or modes: journaled before the reply.
    fn meta(
        &self,
        name: String,
        what: &'static str,
        op: impl FnOnce(&mut Namespace) -> Result<(), crate::namespace::NsError>,
    ) -> Answer {
        self.acknowledged(op, move |broker, result| match result {
            Ok(()) => {
                tracing::info!(name, what, "namespace changed");
                // A lease's memory carries its owner and mode (reopening by path is checked
                // against them): keep it in step.
                let lease = broker.ns.lock().lease_memory(&name);
                if let Some((pool, memory, (uid, gid, mode))) = lease
                    && let Err(e) = broker.pools[pool].set_owner(&memory, uid, gid, mode)
                {
                    tracing::error!(name, error = %error_chain(&e), "cannot give the lease memory its new owner or mode");
                    return Reply::failed(&e);
                }
                Reply::new(Response::Ok)
            }
            Err(e) => Reply::failed(&e),
        })
    }

    fn hello(&self, session: &mut Session, min: u16, max: u16, client: &str) -> Reply {
        let best = max.min(PROTOCOL_MAX);
        if best < min.max(PROTOCOL_MIN) {
            return Reply::fatal(
                ErrorCode::Version,
                format!(
                    "client speaks protocol {min}..={max}, broker {PROTOCOL_MIN}..={PROTOCOL_MAX}"
                ),
            );
        }
        tracing::debug!(client, version = best, "hello");
        session.version = Some(best);
        Reply::new(Response::Hello {
            version: best,
            server: self.instance.clone(),
        })
    }

    /// Runs a change of the namespace under its lock and writes the records it made to the
    /// journal before the lock is released, so the journal's order is the namespace's; then,
    /// outside the lock, waits for them to be on disk (group commit). For changes nobody is
    /// told about (a disconnect, the end of the grace period): a failing journal is logged,
    /// the change stands (the journal's model keeps it, and a recovery writes it).
    fn change<T>(&self, op: impl FnOnce(&mut Namespace) -> T) -> T {
        let (out, durable) = self.change_durably(op);
        if let Err(e) = durable {
            tracing::error!(error = %error_chain(&e), "journal append failed");
        }
        out
    }

    /// [`Broker::change`], telling whether the change's records are on disk.
    fn change_durably<T>(
        &self,
        op: impl FnOnce(&mut Namespace) -> T,
    ) -> (T, Result<(), crate::journal::JournalError>) {
        let (out, written) = self.change_written(op);
        let durable = match (&self.journal, written) {
            (Some(journal), Some(written)) => written.and_then(|ticket| journal.wait(ticket)),
            _ => Ok(()),
        };
        (out, durable)
    }

    /// Runs a change of the namespace under its lock and writes its records to the journal
    /// before the lock is released; `None` if there was nothing to write.
    fn change_written<T>(
        &self,
        op: impl FnOnce(&mut Namespace) -> T,
    ) -> (T, Option<crate::journal::Result<Ticket>>) {
        let mut ns = self.ns.lock();
        let out = op(&mut ns);
        let records = ns.take_records();
        let written = match &self.journal {
            Some(journal) if !records.is_empty() => Some(journal.write(&records)),
            _ => None,
        };
        (out, written)
    }

    /// A change a client is told about: refused up front, nothing changed, while the journal
    /// cannot be written; reported as not durable if its records did not reach the disk after
    /// all. `reply` turns the change's result into the reply once its records are on disk.
    fn acknowledged<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Namespace) -> T,
        reply: impl FnOnce(&Broker, T) -> Reply + Send + 'static,
    ) -> Answer {
        if let Some(journal) = &self.journal
            && let Err(e) = journal.ready()
        {
            return Reply::error(ErrorCode::Internal, error_chain(&e)).into();
        }
        let (out, written) = self.change_written(op);
        self.after_journal(written, move |broker, durable| {
            acknowledge(reply(broker, out), durable)
        })
    }

    fn create(&self, peer: &Peer, req: membroker_client::CreateLease) -> Answer {
        let reservation = match self.ns.lock().reserve(peer, &req) {
            Ok(r) => r,
            Err(e) => return Reply::failed(&e).into(),
        };
        let pool_index = reservation.pool;
        // The allocation (fallocate of up to the whole lease) runs outside the lock.
        let pool = &self.pools[reservation.pool];
        if let (Some(n), PoolKind::Memfd) = (&self.notifier, pool.kind)
            && let Some(bytes) = n.store_is_full()
        {
            self.ns.lock().abort(reservation);
            return Reply::error(
                ErrorCode::NoSpace,
                format!(
                    "lease {}: systemd's fd store cannot keep another memfd of pool {}: the \
                     names of those it keeps take {bytes} bytes of LISTEN_FDNAMES, which must \
                     stay under 128 KiB for systemd to start the broker again; remove leases \
                     nobody needs, or use a device-dax pool",
                    req.name, pool.name
                ),
            )
            .into();
        }
        let allocation = match pool.allocate(&reservation.name, reservation.size) {
            Ok(allocation) => allocation,
            Err(e) => {
                self.ns.lock().abort(reservation);
                tracing::warn!(lease = %req.name, error = %e, "allocation failed");
                return Reply::error(e.code(), format!("lease {}: {}", req.name, error_chain(&e)))
                    .into();
            }
        };
        // Before anyone has the fd: reopening it by path is then checked against the lease's
        // own owner and mode.
        let (uid, gid, mode) = reservation.owner();
        if let Err(e) = pool.set_owner(&allocation, uid, gid, mode) {
            self.ns.lock().abort(reservation);
            pool.discard(allocation);
            tracing::error!(lease = %req.name, error = %e, "cannot give the lease memory its owner");
            return Reply::error(e.code(), format!("lease {}: {}", req.name, error_chain(&e)))
                .into();
        }
        // Durable before the lease is visible and before the reply that hands it out: its
        // records are written under the namespace lock like any change's, synced outside it.
        let (prepared, written) =
            self.change_written(|ns| ns.prepare(peer, reservation, allocation));
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(failed) => {
                let (e, memory) = *failed;
                tracing::warn!(error = %e, "create not committed; memory given back");
                pool.discard(memory);
                return Reply::failed(&e).into();
            }
        };
        let peer = peer.clone();
        self.after_journal(written, move |broker, durable| {
            broker.created(&peer, pool_index, &req.name, prepared, durable)
        })
    }

    /// The end of a create whose records reached the disk (the lease is committed, visible
    /// and held) or did not (its memory goes back).
    fn created(
        &self,
        peer: &Peer,
        pool_index: usize,
        name: &str,
        prepared: crate::namespace::Prepared,
        durable: Result<(), JournalError>,
    ) -> Reply {
        let pool = &self.pools[pool_index];
        if let Err(e) = durable {
            let memory = self.change(|ns| ns.abort_prepared(prepared));
            pool.discard(memory);
            let e = NsError::Journal {
                name: name.to_owned(),
                problem: error_chain(&e),
            };
            tracing::error!(error = %e, "create not journaled; memory given back");
            return Reply::failed(&e);
        }
        let (id, info, memory) = self.ns.lock().commit(peer, prepared);
        if let (Some(n), PoolKind::Memfd) = (&self.notifier, pool.kind) {
            n.store(id, memory.fd.as_fd());
        }
        tracing::info!(lease = %info.name, size = info.size, pool = %info.pool, persistent = info.persistent, "created");
        Reply::lease(info, ReplyFd::Shared(memory))
    }

    fn open(&self, peer: &Peer, name: &str, writable: bool) -> Reply {
        let opened = self.ns.lock().open(peer, name, writable);
        let (info, fd) = match opened {
            Ok(opened) => opened,
            Err(e) => return Reply::failed(&e),
        };
        if writable {
            return Reply::lease(info, ReplyFd::Shared(fd));
        }
        // A read-only holder gets its own O_RDONLY file description, so it cannot map the
        // memory writable.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd.fd));
        match rustix::fs::open(
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(ro) => Reply::lease(info, ReplyFd::Owned(ro)),
            Err(e) => {
                if let Ok(freed) = self.change(|ns| ns.release(peer, name)) {
                    self.give_back(freed);
                }
                Reply::error(
                    ErrorCode::Internal,
                    format!("lease {name}: reopening read-only failed: {e}"),
                )
            }
        }
    }

    /// A release or a removal (of `removed`, logged).
    fn freeing(
        &self,
        op: impl FnOnce(&mut Namespace) -> Result<Freed, crate::namespace::NsError>,
        removed: Option<String>,
    ) -> Answer {
        self.acknowledged(op, move |broker, result| match result {
            Ok(freed) => {
                broker.give_back(freed);
                if let Some(name) = removed {
                    tracing::info!(lease = %name, "removed");
                }
                Reply::new(Response::Ok)
            }
            Err(e) => Reply::failed(&e),
        })
    }

    /// Returns leases nobody holds to their pools, outside the namespace lock: closing the
    /// last fd of a memfd may free a lot of memory, a device gets scrubbed.
    fn give_back(&self, freed: Freed) {
        for lease in freed {
            let pool = &self.pools[lease.pool];
            if let (Some(n), PoolKind::Memfd) = (&self.notifier, pool.kind) {
                n.remove(lease.id);
            }
            pool.release(lease.id, lease.memory);
        }
    }

    /// The namespace's accounting, completed by what pools track themselves (device-dax: free
    /// aligned space, bytes being scrubbed, quarantined bytes).
    fn df(&self) -> Vec<PoolInfo> {
        let pools = self.ns.lock().df();
        self.with_usage(pools)
    }

    /// Completes the namespace's `df` with what the pools track themselves.
    fn with_usage(&self, mut pools: Vec<PoolInfo>) -> Vec<PoolInfo> {
        for (info, pool) in pools.iter_mut().zip(&self.pools) {
            if let Some(usage) = pool.usage() {
                info.free = usage.free;
                info.scrubbing = usage.scrubbing;
                info.quarantined = usage.quarantined;
            }
            let footprint = pool.footprint(info.used, info.scrubbing, info.leases);
            info.kernel_overhead = overhead::kernel_overhead(&footprint);
            info.broker_metadata = overhead::broker_metadata(&footprint);
        }
        pools
    }

    /// Per pool, its quarantined physical ranges, and the leases with reported poison by pool
    /// index, as far as `peer` may see them: the ranges are the host's memory map, for root
    /// and the admin group only (`df` shows everybody how much is quarantined); the leases
    /// are those `peer` sees in `ls`.
    fn quarantine_parts(&self, peer: &Peer) -> (Vec<PoolQuarantine>, Vec<(usize, PoisonedLease)>) {
        let poisoned = self.ns.lock().poisoned(peer);
        let pools = self
            .pools
            .iter()
            .map(|p| PoolQuarantine {
                name: p.name.clone(),
                kind: p.kind,
                ranges: if peer.admin {
                    p.quarantined()
                } else {
                    Vec::new()
                },
            })
            .collect();
        (pools, poisoned)
    }

    /// The whole quarantine listing in one reply (see [`Broker::quarantine_parts`]).
    fn quarantine(&self, peer: &Peer) -> Vec<QuarantineInfo> {
        let (pools, poisoned) = self.quarantine_parts(peer);
        let mut out: Vec<QuarantineInfo> = pools
            .into_iter()
            .map(|p| QuarantineInfo {
                pool: p.name,
                kind: p.kind,
                ranges: p.ranges,
                leases: Vec::new(),
            })
            .collect();
        for (pool, lease) in poisoned {
            out[pool].leases.push(lease);
        }
        out
    }

    /// A page of the quarantine listing (see [`quarantine_page`]).
    fn quarantine_page(&self, peer: &Peer, after: Option<&QuarantineAfter>) -> Reply {
        let (pools, poisoned) = self.quarantine_parts(peer);
        match quarantine_page(pools, poisoned, after) {
            Ok((pools, more)) => Reply::new(Response::QuarantinePage { pools, more }),
            Err(why) => Reply::error(ErrorCode::NotFound, why),
        }
    }

    fn quota_page(&self, peer: &Peer, after: Option<&(String, u32)>) -> Reply {
        let (quotas, more) =
            self.ns
                .lock()
                .quota_page(peer, after, page_fits(encoded_len::<QuotaInfo>));
        Reply::new(Response::QuotaPage { quotas, more })
    }

    fn list(&self, peer: &Peer, prefix: &str, after: Option<&str>) -> Reply {
        let (leases, more) =
            self.ns
                .lock()
                .list(peer, prefix, after, page_fits(encoded_len::<LeaseInfo>));
        Reply::new(Response::List { leases, more })
    }

    fn dirs(&self, peer: &Peer, prefix: &str, after: Option<&str>) -> Reply {
        let (dirs, more) =
            self.ns
                .lock()
                .dirs(peer, prefix, after, page_fits(encoded_len::<DirInfo>));
        Reply::new(Response::Dirs { dirs, more })
    }

    /// Re-executes `exe` with the same arguments, handing over the listening socket, the lock
    /// file and every memfd lease. Waits for requests in flight first. Only returns on failure
    /// (then nothing changed and this broker goes on serving). Called by a connection after
    /// [`Broker::handle`] accepted an `Upgrade` (which checked the peer may).
    pub fn upgrade(&self) -> Result<std::convert::Infallible, String> {
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
        // Changes whose replies wait for the journal finish first (no new one starts).
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return Err("changes in flight did not finish within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let handover = self.handover.lock();
        let Some((listener, lock, activated)) = handover.as_ref() else {
            return Err("this broker has no hand-over state (started without a listener)".into());
        };
        let memory = self.ns.lock().memory();
        let memfds: Vec<(u64, BorrowedFd<'_>)> = memory
            .iter()
            .filter(|(_, pool, _)| self.pools[*pool].kind == PoolKind::Memfd)
            .map(|(id, _, m)| (*id, m.fd.as_fd()))
            .collect();
        let all = || {
            [listener.as_fd(), lock.as_fd()]
                .into_iter()
                .chain(memfds.iter().map(|(_, fd)| *fd))
        };
        let prepared =
            match crate::handover::prepare(listener.as_fd(), lock.as_fd(), *activated, &memfds) {
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

    /// Ends the re-attach grace period after a restart.
    pub fn expire_orphans(&self) {
        let freed = self.change(Namespace::expire_orphans);
        if !freed.is_empty() {
            tracing::info!(
                leases = freed.len(),
                "released leases nobody re-attached to after the restart"
            );
        }
        self.give_back(freed);
    }

    /// Whether the namespace can be taken within `wait` (for the watchdog).
    pub fn responsive(&self, wait: std::time::Duration) -> bool {
        self.ns.try_lock_for(wait).is_some()
    }

    /// Leases, for logs.
    pub fn lease_count(&self) -> usize {
        self.ns.lock().df().iter().map(|p| p.leases as usize).sum()
    }

    /// A connection closed: release everything it held.
    pub fn disconnect(&self, conn: u64) {
        let freed = self.change(|ns| ns.disconnect(conn));
        if !freed.is_empty() {
            tracing::info!(leases = freed.len(), "released on disconnect");
        }
        self.give_back(freed);
    }
}
