//! The state journal: the one writer of `--state-dir/journal`.
//!
//! Every change the broker must remember across a restart reaches the disk here and nowhere
//! else: the other layers hand [`Journal::append_all`] the [`Record`]s of what they did, and
//! this module writes, syncs, tracks and compacts them.
//!
//! # Format
//!
//! One record per line: `CRC32 JSON\n`, the CRC (hex) over the JSON bytes. Every record that a
//! reply depends on is on disk (fdatasync, unless `--no-sync`) before the reply. At start the
//! journal is replayed; a torn or corrupt *last* record (a crash mid-write) is dropped with a
//! warning, damage followed by intact records stops the start with instructions.
//!
//! # Group commit
//!
//! Writing and syncing are two steps. [`Journal::write`] appends a batch to the file (the page
//! cache) and returns a [`Ticket`]; it is cheap, and callers that need the journal's order to
//! match theirs call it under their own lock. [`Journal::wait`] returns once everything up to
//! the ticket is on disk: the first waiter runs one `fdatasync` for every batch written so far
//! while the others wait for it, so concurrent changes share a sync and nobody syncs under the
//! namespace lock.
//!
//! A server need not hold a thread per change in flight: [`Journal::when_durable`] runs a
//! callback (which sends the reply) once the ticket is on disk. With no sync running, the
//! caller runs one itself (one client alone waits no longer than with [`Journal::wait`]);
//! otherwise the callback is queued and the change's thread goes on serving. Whoever ends a
//! sync runs the callbacks it covers; while callbacks are still queued the journal's two sync
//! threads keep syncing (one starts the next sync while the other runs callbacks), so the
//! group a sync covers is every change written while the previous one ran, however many that
//! is.
//!
//! # When the disk fails
//!
//! A failed write is cut back to the last whole record. A failed write or `fdatasync` puts the
//! journal in a *failing* state: the file can no longer be trusted to hold what was written
//! (after a failed `fdatasync` the kernel may have dropped the dirty pages, so syncing again
//! would prove nothing). From then on nothing is acknowledged as durable. The records still
//! reach the live model, and the next write (at most once a second) tries to recover by
//! rewriting the whole state into a new file (compaction: write, sync, rename, sync the
//! directory). When that succeeds the journal is whole again and serving goes on by itself.
//!
//! # Who writes which record
//!
//! | record | written when | handed over by |
//! |---|---|---|
//! | `Lease` | a create is committed, before the reply carries the fd | the server, for the namespace |
//! | `Unnamed` | `rm` of a lease somebody still holds | the namespace |
//! | `Poison` | a new memory-error report on a lease | the namespace |
//! | `Freed` (memfd) | the last holder of a memfd lease let go (release, disconnect, `rm`, grace expiry) | the namespace |
//! | `Scrub` | the last holder of a device lease let go: its scrub starts | the namespace |
//! | `Freed` (device-dax) | the scrub zeroed and destroyed the device; its extents are free | the device-dax scrubber |
//! | `Quarantine` | a reported memory error's physical range leaves a device-dax pool | the device-dax pool |
//! | `Unquarantine` | an admin returns a quarantined range to its pool (`membroker quarantine clear`), before the allocator frees it | the device-dax pool |
//! | `Creating` | a device is about to be made, before the first sysfs write | the device-dax pool |
//! | `Abandoned` | a `Creating` that delivered nothing is undone | the device-dax pool, the restore |
//! | `Freed` (lost) | at start, a lease whose memory did not survive the restart | the restore |
//! | `Dir` | `mkdir`, a directory made on the way to a new lease, `chmod`/`chown` of a directory | the namespace |
//! | `Rmdir` | `rm` of an empty directory, or the last entry of an automatic one went | the namespace |
//! | `Meta` | `chmod`/`chown` of a lease | the namespace |
//!
//! The namespace's records are appended while the namespace lock is held, so the journal's
//! order is the namespace's order (the server's `Broker::change` sees to it).
//!
//! # Why this order is crash-safe
//!
//! - **`Lease` before the reply.** No client ever holds memory the journal does not know. A
//!   crash between the record and the reply leaves a lease nobody received: it is restored as
//!   an orphan, kept if persistent (the client re-attaches by name) and released after the
//!   re-attach grace otherwise.
//! - **`Freed` and `Unnamed` under the namespace lock.** A name freed and taken again appears
//!   as the old lease's `Freed`/`Unnamed` before the new lease's `Lease`, so replay never sees
//!   one name twice.
//! - **`Scrub` before zeroing, device-dax `Freed` only after the device is gone.** Extents are
//!   never free in the journal before their memory is zeroed. A crash mid-scrub finds `Scrub`
//!   without `Freed` and scrubs again; a crash after the device was destroyed but before
//!   `Freed` finds the device gone and journals `Freed` then.
//! - **`Creating` before any sysfs write.** A crash mid-create leaves a device whose ranges
//!   match an unresolved `Creating`: it was never delivered, so the restart destroys it
//!   (`Abandoned`). A `Lease` with the same pool and extents resolves the `Creating`.
//! - **Compaction** writes the live state to `journal.new`, syncs it, renames it over
//!   `journal` and syncs the directory: a crash sees the old file or the new one, whole.
//!
//! # The live model and compaction
//!
//! The journal keeps the state its records amount to ([`Replayed`]), updated by the same
//! `apply` that replays a file, so a record that contradicts the journal (a bug elsewhere) is
//! refused before it is written, and compaction needs nobody else's view of the world: it
//! writes [`Replayed::snapshot`]. It runs by itself once the file has grown to twice its size
//! after the last compaction (plus 4096 records), whatever the records are.

mod record;
mod replay;

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

pub use record::{DirRecord, LeaseRecord, Record, ReplayedLease, add_poison};
pub use replay::Replayed;

#[cfg(test)]
use replay::apply;

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "journal {} is damaged at line {line} (byte {offset}) of {lines}: records after it are \
         intact, so this is not a torn write from a crash. membroker will not guess what was lost: \
         restore the journal from a backup, or move it aside to start with no leases (running VMs \
         keep their memory, but the broker forgets every lease and device-dax regions must be \
         cleared by hand)",
        path.display()
    )]
    Damaged {
        path: PathBuf,
        line: usize,
        offset: usize,
        lines: usize,
    },
    #[error("journal {}: line {line} contradicts earlier records: {problem}", path.display())]
    Inconsistent {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("journal {}: refused a record that contradicts it (a broker bug; nothing was written): {problem}", path.display())]
    Refused { path: PathBuf, problem: String },
    #[error(
        "journal {} cannot be written ({why}); changes are not acknowledged until it can be \
         rewritten (free space in the state directory or fix the disk: the broker retries by itself)",
        path.display()
    )]
    Failing { path: PathBuf, why: String },
}

/// Lease ids stay below this (2^62): far beyond any real history, and `id + 1` never overflows.
pub const MAX_ID: u64 = 1 << 62;

/// Records beyond twice the compacted size before the journal compacts itself.
const COMPACT_SLACK: u64 = 4096;

/// How often a failing journal tries to rewrite itself.
const RECOVER_EVERY: Duration = Duration::from_secs(1);

/// The end of a batch in the journal's history: [`Journal::wait`] for it to be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a ticket means nothing until it is waited for"]
pub struct Ticket(u64);

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, JournalError>;

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    dir: PathBuf,
    sync: bool,
    inner: Mutex<Inner>,
    durability: Mutex<Durability>,
    /// Signalled when a sync ends.
    synced: Condvar,
    /// Where each `fdatasync`'s duration goes, once metrics are on ([`Journal::time_syncs`]).
    sync_timer: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
    /// Wakes the sync thread: callbacks are queued and no sync runs.
    queued: Condvar,
    /// The sync threads were started.
    sync_thread: std::sync::Once,
}

/// What runs once a ticket is on disk (or cannot be).
type Settle = Box<dyn FnOnce(Result<()>) + Send>;

/// What is known to be on disk.
#[derive(Default)]
struct Durability {
    /// Batches up to this one are on disk.
    durable: u64,
    /// A waiter is running `fdatasync` for the others.
    syncing: bool,
    /// The journal is failing (see the module documentation): why.
    failing: Option<String>,
    /// Callbacks of [`Journal::when_durable`] waiting for their ticket. While
    /// there are any, a sync runs or the sync thread has been woken.
    queued: VecDeque<(u64, Settle)>,
}

impl std::fmt::Debug for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durability")
            .field("durable", &self.durable)
            .field("syncing", &self.syncing)
            .field("failing", &self.failing)
            .field("queued", &self.queued.len())
            .finish()
    }
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// Bytes of whole records in the file: a failed append is cut back to this.
    len: u64,
    /// Records in the file.
    records: u64,
    /// Records in the file right after the last compaction (or the start).
    compacted: u64,
    /// What the records amount to (including records a failing journal could not write).
    state: Replayed,
    /// Batches written since the journal was opened (the last ticket handed out).
    written: u64,
    /// When a failing journal may next try to recover.
    retry_at: Option<Instant>,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Opens (creating) `dir/journal` and replays it. `sync`: fdatasync every append.
    pub fn open(dir: &Path, sync: bool) -> Result<(Journal, Replayed)> {
        let path = dir.join("journal");
        let io = |what| {
            let path = path.clone();
            move |source| JournalError::Io { path, what, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("cannot create the state directory"))?;
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("cannot read")(e)),
        };
        let (replayed, good_len) = replay::replay(&path, &data)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("cannot open"))?;
        if good_len < data.len() {
            file.set_len(good_len as u64)
                .map_err(io("cannot drop the torn last record"))?;
            file.sync_all().map_err(io("cannot sync"))?;
        }
        let journal = Journal {
            dir: dir.to_path_buf(),
            sync,
            inner: Mutex::new(Inner {
                file,
                len: good_len as u64,
                records: replayed.records,
                compacted: replayed.records,
                state: replayed.clone(),
                written: 0,
                retry_at: None,
            }),
            durability: Mutex::new(Durability::default()),
            synced: Condvar::new(),
            sync_timer: std::sync::OnceLock::new(),
            queued: Condvar::new(),
            sync_thread: std::sync::Once::new(),
            path,
        };
        Ok((journal, replayed))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, records how long each `fdatasync` of the journal takes (seconds).
    pub fn time_syncs(&self, histogram: prometheus_client::metrics::histogram::Histogram) {
        let _ = self.sync_timer.set(histogram);
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
        move |source| JournalError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Appends one record; on return it is on disk (unless syncing is off).
    pub fn append(&self, record: &Record) -> Result<()> {
        self.append_all(std::slice::from_ref(record))
    }

    /// Appends records in order and waits until they are on disk ([`Journal::write`] then
    /// [`Journal::wait`]).
    pub fn append_all(&self, records: &[Record]) -> Result<()> {
        let ticket = self.write(records)?;
        self.wait(ticket)
    }

    /// Appends records in order to the file, not yet synced; [`Journal::wait`] for the ticket
    /// before acknowledging anything that depends on them. A record that contradicts the
    /// journal refuses the whole batch, unwritten and unapplied. Otherwise the records reach
    /// the live model even when the file cannot take them (the journal is then failing and
    /// this returns the error; a recovery rewrites them from the model).
    pub fn write(&self, records: &[Record]) -> Result<Ticket> {
        let mut inner = self.inner.lock();
        let mut batch = BTreeSet::new();
        let mut bytes = Vec::new();
        for record in records {
            replay::check(&inner.state, &batch, record).map_err(|problem| {
                JournalError::Refused {
                    path: self.path.clone(),
                    problem,
                }
            })?;
            if let Record::Lease(l) = record {
                batch.insert(l.id);
            }
            bytes.extend_from_slice(&replay::encode(record));
        }
        for record in records {
            replay::apply(&mut inner.state, record.clone()).expect("checked before writing");
        }
        let failing = self.durability.lock().failing.clone();
        if let Some(why) = failing {
            // Everything, these records included, is rewritten from the model.
            self.recover(&mut inner)
                .map_err(|_| self.failing_error(why))?;
            return Ok(Ticket(inner.written));
        }
        if let Err(e) = inner.file.write_all(&bytes) {
            // Never leave half a record behind a later one.
            let _ = inner.file.set_len(inner.len);
            let error = self.io("cannot append")(e);
            return Err(self.fail(&mut inner, &error));
        }
        inner.len += bytes.len() as u64;
        inner.records += records.len() as u64;
        inner.written += 1;
        let ticket = Ticket(inner.written);
        if inner.records > 2 * inner.compacted + COMPACT_SLACK
            && let Err(e) = self.compact_locked(&mut inner)
        {
            // Not again before the file has grown as much once more.
            inner.compacted = inner.records;
            tracing::error!(error = %crate::error::error_chain(&e), "journal compaction failed");
        }
        Ok(ticket)
    }

    /// Whether changes can be journaled now: a failing journal first tries to recover (at
    /// most once a second). Callers refuse a change up front on an error, so that nothing is
    /// changed that could not be recorded.
    pub fn ready(&self) -> Result<()> {
        let failing = self.durability.lock().failing.clone();
        let Some(why) = failing else {
            return Ok(());
        };
        let mut inner = self.inner.lock();
        self.recover(&mut inner)
            .map_err(|_| self.failing_error(why))
    }

    /// Returns once everything up to `ticket` is on disk: one `fdatasync` serves every batch
    /// written before it started. Fails while the journal is failing.
    pub fn wait(&self, ticket: Ticket) -> Result<()> {
        let mut d = self.durability.lock();
        loop {
            if let Some(outcome) = self.outcome(&d, ticket.0) {
                return outcome;
            }
            if d.syncing {
                self.synced.wait(&mut d);
                continue;
            }
            d = self.sync_round(d);
        }
    }

    /// Runs `then` once everything up to `ticket` is on disk, with what [`Journal::wait`]
    /// would return, without holding the calling thread while other changes' sync runs:
    /// `then` runs here when the ticket is on disk already or this thread runs the sync, and
    /// otherwise on the thread that ends the sync covering it.
    pub fn when_durable(
        self: &Arc<Self>,
        ticket: Ticket,
        then: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let mut d = self.durability.lock();
        if let Some(outcome) = self.outcome(&d, ticket.0) {
            drop(d);
            return then(outcome);
        }
        self.sync_thread.call_once(|| self.start_sync_thread());
        d.queued.push_back((ticket.0, Box::new(then)));
        if !d.syncing {
            drop(self.sync_round(d));
        }
    }

    /// The threads that keep syncing while callbacks are queued, so that no server thread
    /// does more than one sync for others: two, so that one syncs while the other runs the
    /// callbacks of the sync before. They end with the journal.
    fn start_sync_thread(self: &Arc<Self>) {
        for i in 0..2 {
            let journal = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name(format!("journal-sync-{i}"))
                .spawn(move || Journal::sync_thread(&journal));
            if let Err(e) = spawned {
                // Callbacks are then settled by the next writer's sync instead.
                tracing::error!(error = %e, "cannot start a journal sync thread");
            }
        }
    }

    fn sync_thread(journal: &Weak<Journal>) {
        while let Some(journal) = journal.upgrade() {
            let mut d = journal.durability.lock();
            if d.queued.is_empty() || d.syncing {
                journal.queued.wait_for(&mut d, Duration::from_secs(1));
                continue;
            }
            drop(journal.sync_round(d));
        }
    }

    /// One `fdatasync` of every batch written so far, by the caller, while nobody else syncs;
    /// then wakes the waiters and runs the callbacks it covers (every one, with the error,
    /// when the journal is failing). Hands on to the sync thread if callbacks are left.
    fn sync_round<'a>(&'a self, mut d: MutexGuard<'a, Durability>) -> MutexGuard<'a, Durability> {
        d.syncing = true;
        drop(d);
        // Everything written so far; the sync runs without the write lock, so writers go on.
        let (target, file) = {
            let inner = self.inner.lock();
            (inner.written, inner.file.try_clone())
        };
        let started = Instant::now();
        let synced = file.and_then(|f| f.sync_data());
        if let Some(timer) = self.sync_timer.get() {
            timer.observe(started.elapsed().as_secs_f64());
        }
        d = self.durability.lock();
        d.syncing = false;
        match synced {
            Ok(()) => d.durable = d.durable.max(target),
            Err(e) => {
                let error = self.io("cannot sync")(e);
                tracing::error!(error = %crate::error::error_chain(&error), "journal is failing: nothing more is acknowledged until it is rewritten");
                d.failing = Some(crate::error::error_chain(&error));
            }
        }
        self.synced.notify_all();
        let mut settled = Vec::new();
        for (ticket, then) in std::mem::take(&mut d.queued) {
            match self.outcome(&d, ticket) {
                Some(outcome) => settled.push((then, outcome)),
                None => d.queued.push_back((ticket, then)),
            }
        }
        if !d.queued.is_empty() {
            // The next sync starts (on a sync thread) while this one's callbacks run.
            self.queued.notify_one();
        }
        if !settled.is_empty() {
            drop(d);
            for (then, outcome) in settled {
                then(outcome);
            }
            d = self.durability.lock();
        }
        if !d.queued.is_empty() && !d.syncing {
            self.queued.notify_one();
        }
        d
    }

    /// What waiting for `ticket` comes to now, if it is settled: on disk (or nothing is
    /// synced), or refused because the journal is failing; `None` while it waits for a sync.
    fn outcome(&self, d: &Durability, ticket: u64) -> Option<Result<()>> {
        if let Some(why) = &d.failing {
            return Some(Err(self.failing_error(why.clone())));
        }
        (!self.sync || d.durable >= ticket).then_some(Ok(()))
    }

    fn failing_error(&self, why: String) -> JournalError {
        JournalError::Failing {
            path: self.path.clone(),
            why,
        }
    }

    /// Enters the failing state after `error`; returns the error that says so (and what to do).
    fn fail(&self, inner: &mut Inner, error: &JournalError) -> JournalError {
        let why = crate::error::error_chain(error);
        tracing::error!(error = %why, "journal is failing: nothing more is acknowledged until it is rewritten");
        inner.retry_at = Some(Instant::now() + RECOVER_EVERY);
        self.durability.lock().failing = Some(why.clone());
        self.failing_error(why)
    }

    /// A failing journal rewrites its whole state (at most once every [`RECOVER_EVERY`]).
    fn recover(&self, inner: &mut Inner) -> Result<()> {
        if inner.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(self.failing_error("still failing".into()));
        }
        match self.compact_locked(inner) {
            Ok(()) => {
                inner.retry_at = None;
                self.durability.lock().failing = None;
                tracing::info!("journal rewritten: acknowledging changes again");
                Ok(())
            }
            Err(e) => {
                inner.retry_at = Some(Instant::now() + RECOVER_EVERY);
                Err(e)
            }
        }
    }

    /// Records in the file now.
    pub fn records(&self) -> u64 {
        self.inner.lock().records
    }

    /// Rewrites the journal as the records of its live state: write-new, sync, rename, sync
    /// the directory.
    pub fn compact(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        self.compact_locked(&mut inner)
    }

    fn compact_locked(&self, inner: &mut Inner) -> Result<()> {
        let new = self.dir.join("journal.new");
        let written = self.write_new(inner, &new);
        if written.is_err() {
            // A half-written file only takes space a full disk needs for the next try.
            let _ = std::fs::remove_file(&new);
        }
        written
    }

    fn write_new(&self, inner: &mut Inner, new: &Path) -> Result<()> {
        let io = |what| {
            let path = new.to_path_buf();
            move |source| JournalError::Io { path, what, source }
        };
        let snapshot = inner.state.snapshot();
        let mut buf = Vec::new();
        for record in &snapshot {
            buf.extend_from_slice(&replay::encode(record));
        }
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(new)
            .map_err(io("cannot create"))?;
        out.write_all(&buf).map_err(io("cannot write"))?;
        out.sync_all().map_err(io("cannot sync"))?;
        std::fs::rename(new, &self.path).map_err(io("cannot rename over the journal"))?;
        sync_dir(&self.dir).map_err(io("cannot sync the state directory"))?;
        inner.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io("cannot reopen"))?;
        inner.len = buf.len() as u64;
        inner.records = snapshot.len() as u64;
        inner.compacted = inner.records;
        // The new file holds every batch written so far, synced.
        inner.written += 1;
        let mut d = self.durability.lock();
        d.durable = d.durable.max(inner.written);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
