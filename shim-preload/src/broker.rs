//! The slow path: talking to the broker when QEMU activates or frees a RAM block.
//!
//! Runs on QEMU's main thread (activation) or RCU thread (free), never in a signal handler,
//! so it may allocate and take the one mutex that serialises it. Hooks enter it with the
//! re-entry guard set, so anything it maps goes straight to the kernel.
//!
//! # Broker restarts
//!
//! The main connection is a [`Client`], which reconnects by itself when a call finds it
//! broken and re-opens every lease it holds, so the broker counts this process as a holder
//! again; the guest's mappings and the lease fds in the block table are never touched. So
//! that this happens even when QEMU makes no call (a running guest changes no RAM block, and
//! the broker releases an unheld non-persistent lease once its grace period after the restart
//! ends), a watcher thread, started with the first connection and with every signal
//! blocked, waits for either socket to be closed by the broker and then reconnects at once
//! (waiting for the broker without holding the state lock, so hooks never wait behind it).
//!
//! The poison-report connection is used from the SIGBUS handler, which must stay
//! async-signal-safe: it never reconnects. While that socket is dead (from the moment the
//! broker goes away until the watcher, or the next redirected mmap or munmap, re-arms it) a
//! report's `send` fails and **the report is lost**; QEMU's own handler still runs and the
//! guest still sees the memory error. Re-arming keeps the socket's fd number (the new
//! connection is `dup3`'d over the old one), so the handler never sends on a stale fd.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU16, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use membroker_client::proto::PROTOCOL_MIN;
use membroker_client::reconnect::Backoff;
use membroker_client::{Client, CreateLease, ErrorCode, LostLease, Options, PageSize};
use rustix::event::{PollFd, PollFlags};

use crate::classify::Guard;
use crate::config::{Config, ConfigError, Fallback};
use crate::table::{Backing, Block, NAME_MAX, SLOTS, TABLE};

/// Why a RAM block could not be backed by a lease.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("bad configuration")]
    Config(#[source] ConfigError),
    #[error(transparent)]
    Client(membroker_client::Error),
    #[error("lease {name} is {actual} bytes, QEMU asked for {wanted}")]
    SizeMismatch {
        name: String,
        actual: u64,
        wanted: u64,
    },
    #[error(
        "guest RAM at {addr:#x} (+{len:#x}) is not aligned to lease {name}'s {page}-byte pages (set MEMBROKER_PAGE_SIZE to the pool's page size so the shim aligns QEMU's reservation)"
    )]
    Misaligned {
        name: String,
        addr: usize,
        len: usize,
        page: u64,
    },
    #[error("mapping lease {name} over guest RAM failed (errno {errno})")]
    Map { name: String, errno: i32 },
    #[error(
        "lease {name} belongs to uid {owner}, not to this process's uid {uid}: refusing to put guest RAM on memory another uid controls (choose another MEMBROKER_LEASE_PREFIX, or have its owner or an admin remove it)"
    )]
    NotOwner { name: String, owner: u32, uid: u32 },
    #[error(
        "lease {name} is device-dax memory, which QEMU refuses under memory-backend-memfd (it has no align option): set MEMBROKER_POOL to a memfd pool for memfd-backed VMs"
    )]
    DevDaxBackend { name: String },
    #[error("putting lease {name} under QEMU's memory-backend memfd failed (errno {errno})")]
    Adopt { name: String, errno: i32 },
    #[error("more than {SLOTS} RAM blocks redirected")]
    TableFull,
    #[error(
        "lease name {name} is {} bytes; the shim's memory-error reports carry at most {NAME_MAX} (choose a shorter MEMBROKER_LEASE_PREFIX)", name.len()
    )]
    NameTooLong { name: String },
    #[error("lease {name}: {problem}")]
    Policy { name: String, problem: String },
    #[error(
        "lease {name}: no pool of the broker is on NUMA node {nodes} with {page} pages and {size} free (see `membroker df`; bind one with --pool memfd:NAME:SIZE:{page}:node=N)"
    )]
    NoNodePool {
        name: String,
        nodes: String,
        page: PageSize,
        size: String,
    },
    #[error(
        "lease {name} was re-attached with the guest's memory, and its pool {pool} is not on NUMA node {nodes}: the shim does not move a live guest's memory (create the lease on a pool of that node, or drop the binding)"
    )]
    Placed {
        name: String,
        pool: String,
        nodes: String,
    },
    #[error(
        "lease {name} backs a memory-backend-memfd whose fd QEMU holds and hands to vhost-user back-ends, and its pool {pool} is not on NUMA node {nodes}: the shim cannot change that fd's memory (set MEMBROKER_POOL to a pool on that node for this QEMU, or use memory-backend-ram/file for blocks bound to other nodes)"
    )]
    SharedFd {
        name: String,
        pool: String,
        nodes: String,
    },
}

impl ShimError {
    /// The errno QEMU's mmap sees. The one place shim errors become errno.
    pub fn errno(&self) -> i32 {
        match self {
            ShimError::Config(_) => libc::EINVAL,
            ShimError::Client(membroker_client::Error::Connect { source, .. }) => {
                source.raw_os_error()
            }
            ShimError::Client(
                membroker_client::Error::Unavailable { .. }
                | membroker_client::Error::Timeout { .. },
            ) => libc::ETIMEDOUT,
            ShimError::Client(e) => match e.code() {
                Some(ErrorCode::PermissionDenied) => libc::EACCES,
                Some(ErrorCode::InvalidArgument) => libc::EINVAL,
                _ => libc::ENOMEM,
            },
            ShimError::SizeMismatch { .. }
            | ShimError::Misaligned { .. }
            | ShimError::DevDaxBackend { .. } => libc::EINVAL,
            ShimError::Map { errno, .. } | ShimError::Adopt { errno, .. } => *errno,
            ShimError::NotOwner { .. } => libc::EACCES,
            ShimError::TableFull => libc::ENOMEM,
            ShimError::NameTooLong { .. }
            | ShimError::Policy { .. }
            | ShimError::NoNodePool { .. }
            | ShimError::Placed { .. }
            | ShimError::SharedFd { .. } => libc::EINVAL,
        }
    }
}

/// A lease ready to be mapped over a RAM block.
#[derive(Debug)]
pub struct Acquired {
    pub fd: OwnedFd,
    pub name: String,
    pub backing: Backing,
    pub page: u64,
    /// Made for this block (nothing has used it yet), not re-attached with a guest's memory.
    pub created: bool,
}

struct Conn {
    pid: u32,
    client: Client,
    /// A second connection only the SIGBUS handler writes to (see [`POISON_FD`]).
    poison: Client,
}

struct State {
    conn: Option<Conn>,
    next_index: u32,
    names: [Option<String>; SLOTS],
    /// Per slot: where the block's lease came from, which says whether it may move.
    origin: [Origin; SLOTS],
}

/// Where a block's lease came from, which decides whether an `mbind` may move the block to
/// another lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Re-attached by name: it holds a guest's memory.
    Reattached,
    /// Made for the block (see [`Acquired::created`]): nothing has used it yet.
    Created,
    /// A `memory-backend-memfd`'s: QEMU holds its fd too and hands it to vhost-user back-ends.
    Backend,
}

static STATE: Mutex<State> = Mutex::new(State {
    conn: None,
    next_index: 0,
    names: [const { None }; SLOTS],
    origin: [Origin::Reattached; SLOTS],
});
static CONFIG: OnceLock<Result<Config, ConfigError>> = OnceLock::new();

/// The raw fd of the pre-connected poison-report socket, or -1.
pub static POISON_FD: AtomicI32 = AtomicI32::new(-1);
/// The protocol version the poison-report connection agreed on (stored before its fd).
pub static POISON_VERSION: AtomicU16 = AtomicU16::new(PROTOCOL_MIN);

/// The process whose watcher thread runs (a forked child starts its own), or 0.
static WATCHER: AtomicU32 = AtomicU32::new(0);

/// How long re-arming the poison-report socket from a hook may wait for the broker.
const POISON_RECONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads the environment; called from the library constructor.
pub fn load_config() -> Option<&'static Config> {
    CONFIG.get_or_init(Config::from_env).as_ref().ok()
}

fn config() -> Result<&'static Config, ShimError> {
    CONFIG
        .get_or_init(Config::from_env)
        .as_ref()
        .map_err(|e| ShimError::Config(e.clone()))
}

fn state() -> MutexGuard<'static, State> {
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The client options of every connection: the deadline of `MEMBROKER_TIMEOUT`, so that a
/// stopped broker fails (or falls back) a RAM block in bounded time and never wedges QEMU
/// behind the state lock.
fn options(cfg: &Config) -> Options {
    Options::default().timeout(cfg.timeout)
}

fn connect(cfg: &Config) -> Result<Conn, ShimError> {
    let client = Client::connect_with(&cfg.socket, options(cfg)).map_err(ShimError::Client)?;
    let mut poison = Client::connect_with(&cfg.socket, options(cfg)).map_err(ShimError::Client)?;
    poison.set_reconnect_timeout(POISON_RECONNECT_TIMEOUT);
    POISON_VERSION.store(poison.version(), Ordering::Release);
    POISON_FD.store(poison.as_fd().as_raw_fd(), Ordering::Release);
    Ok(Conn {
        pid: std::process::id(),
        client,
        poison,
    })
}

/// Drops the broker's replies to poison reports and, if the broker closed the poison-report
/// connection, connects it again under the same fd number (see the module docs).
fn rearm_poison(conn: &mut Conn) {
    drain(&conn.poison);
    if conn.poison.is_closed() {
        // A handler that loads -1 skips its report, which the dead socket would lose anyway.
        POISON_FD.store(-1, Ordering::Release);
        let _ = conn.poison.reconnect();
        POISON_VERSION.store(conn.poison.version(), Ordering::Release);
        POISON_FD.store(conn.poison.as_fd().as_raw_fd(), Ordering::Release);
    }
}

/// Says on stderr which leases the main connection could not re-attach after a reconnect.
fn report_lost(client: &mut Client) {
    for LostLease { name, reason, .. } in client.take_lost_leases() {
        let line = format!(
            "membroker-preload: lease {name} was not re-attached after the broker restarted ({reason}); the guest keeps its memory, but the broker no longer counts this process as its holder\n"
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// Starts the watcher thread of this process, once.
fn start_watcher(cfg: &'static Config) {
    let pid = std::process::id();
    if WATCHER.swap(pid, Ordering::AcqRel) == pid {
        return;
    }
    if let Err(e) = crate::sys::spawn_blocking_signals("membroker-watch", move || watch(cfg)) {
        WATCHER.store(0, Ordering::Release);
        let line = format!(
            "membroker-preload: cannot start the broker watcher thread ({e}); after a broker restart, leases are re-attached only at the next RAM block change\n"
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// The watcher thread: waits until the broker closes the main or the poison-report
/// connection (or sends a reply to a poison report), then reconnects and re-arms.
fn watch(cfg: &Config) {
    // Whatever this thread maps goes straight to the kernel.
    let _guard = Guard::enter();
    let pid = std::process::id();
    let mut complained = false;
    loop {
        // Wait on copies of the sockets, so the state lock is free meanwhile. A copy of a
        // socket replaced by a reconnect elsewhere is dead and wakes the poll at once.
        let copies = {
            let st = state();
            match st.conn.as_ref() {
                Some(c) if c.pid == pid => (
                    c.client.as_fd().try_clone_to_owned(),
                    c.poison.as_fd().try_clone_to_owned(),
                ),
                _ => return,
            }
        };
        let (Ok(main), Ok(poison)) = copies else {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        // Replies on the main connection belong to calls in flight: only its hang-up counts.
        let mut fds = [
            PollFd::new(&main, PollFlags::RDHUP),
            PollFd::new(&poison, PollFlags::IN | PollFlags::RDHUP),
        ];
        if rustix::event::poll(&mut fds, None).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        // Either socket hung up: the broker went away. Wait for it here, without the lock,
        // so that hooks never wait behind the watcher.
        let hangup = PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR | PollFlags::NVAL;
        let down = fds.iter().any(|f| f.revents().intersects(hangup));
        drop((main, poison));
        if down {
            wait_for_broker(cfg);
        }
        let failed = {
            let mut st = state();
            let Some(conn) = st.conn.as_mut().filter(|c| c.pid == pid) else {
                return;
            };
            // Poison reports first: once the broker counts this process as a holder again,
            // its memory-error reports reach the broker too.
            rearm_poison(conn);
            let result = if conn.client.is_closed() {
                conn.client.reconnect()
            } else {
                Ok(())
            };
            report_lost(&mut conn.client);
            result.err()
        };
        match failed {
            None => complained = false,
            Some(e) => {
                if !complained {
                    complained = true;
                    let line = format!(
                        "membroker-preload: reconnecting to the broker failed: {e}; retrying\n"
                    );
                    let _ = std::io::stderr().write_all(line.as_bytes());
                }
                // The connection stays dead and wakes the poll at once: pace the retries.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Returns once a broker answers at the socket (connect and Hello), retrying with backoff.
fn wait_for_broker(cfg: &Config) {
    let mut backoff = Backoff::new();
    while Client::connect_with(&cfg.socket, options(cfg)).is_err() {
        std::thread::sleep(backoff.next_delay());
    }
}

/// Gets a lease for the next RAM block of `len` bytes: re-attaches to `PREFIX/ramN` when it
/// exists, else creates it, with `MEMBROKER_PAGE_SIZE` pages or else `page_hint`'s (the huge
/// pages a memfd backend asked for). Connects on first use.
pub fn acquire(len: u64, page_hint: Option<PageSize>) -> Result<Acquired, ShimError> {
    let cfg = config()?;
    let mut st = state();
    let pid = std::process::id();
    if st.conn.as_ref().is_some_and(|c| c.pid != pid) {
        // A forked child must not speak on its parent's connection.
        if let Some(conn) = st.conn.take() {
            std::mem::forget(conn);
        }
        POISON_FD.store(-1, Ordering::Release);
    }
    if st.conn.is_none() {
        st.conn = Some(connect(cfg)?);
        start_watcher(cfg);
    }
    let index = st.next_index;
    st.next_index += 1;
    let uid = rustix::process::geteuid().as_raw();
    let name = cfg.lease_name(index, pid, uid);
    if name.len() > NAME_MAX {
        return Err(ShimError::NameTooLong { name });
    }
    let conn = st.conn.as_mut().expect("connected above");
    let existing = if cfg.prefix.is_some() {
        match conn.client.open(&name, true) {
            Ok(lease) => Some(lease),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => None,
            Err(e) => return Err(ShimError::Client(e)),
        }
    } else {
        None
    };
    let created = existing.is_none();
    let lease = match existing {
        Some(lease) => lease,
        None => {
            let mut req = CreateLease::new(name.clone(), len).persistent(cfg.persist);
            if let Some(page) = cfg.page_size.or(page_hint) {
                req = req.page_size(page);
            }
            if let Some(pool) = &cfg.pool {
                req = req.pool(pool.clone());
            }
            conn.client.create(req).map_err(ShimError::Client)?
        }
    };
    report_lost(&mut conn.client);
    rearm_poison(conn);
    let release = |conn: &mut Conn| {
        let _ = conn.client.release(&name);
    };
    // Re-attach only to this uid's own lease: another uid may have made the name first
    // (with a mode that lets anyone open it) to read or write this guest's RAM.
    if lease.info().uid != uid {
        release(conn);
        return Err(ShimError::NotOwner {
            name,
            owner: lease.info().uid,
            uid,
        });
    }
    if lease.size() != len {
        release(conn);
        return Err(ShimError::SizeMismatch {
            name,
            actual: lease.size(),
            wanted: len,
        });
    }
    let backing = match lease.backing() {
        Ok(membroker_client::Backing::Memfd) => Backing::Memfd,
        Ok(membroker_client::Backing::DevDax) => Backing::DevDax,
        Err(e) => {
            release(conn);
            return Err(ShimError::Client(e));
        }
    };
    let page = lease.page_size().bytes();
    Ok(Acquired {
        fd: lease.into_fd(),
        name,
        backing,
        page,
        created,
    })
}

/// Records a mapped lease in the block table.
pub fn commit(acquired: Acquired, start: usize, len: usize) -> Result<(), ShimError> {
    record(acquired, start, len, false)
}

/// Records the mapped lease of a `memory-backend-memfd` in the block table: QEMU holds the
/// lease's fd under its own number and hands it to vhost-user back-ends, so the block can never
/// move to another lease.
pub fn commit_backend(acquired: Acquired, start: usize, len: usize) -> Result<(), ShimError> {
    record(acquired, start, len, true)
}

fn record(acquired: Acquired, start: usize, len: usize, backend: bool) -> Result<(), ShimError> {
    let mut st = state();
    let fd = acquired.fd.as_raw_fd();
    let page = usize::try_from(acquired.page).unwrap_or(usize::MAX);
    let Some(slot) = TABLE.insert(start, len, fd, acquired.backing, page, &acquired.name) else {
        if let Some(conn) = st.conn.as_mut() {
            let _ = conn.client.release(&acquired.name);
        }
        return Err(ShimError::TableFull);
    };
    let _ = acquired.fd.into_raw_fd();
    st.names[slot] = Some(acquired.name);
    st.origin[slot] = match (backend, acquired.created) {
        (true, _) => Origin::Backend,
        (false, true) => Origin::Created,
        (false, false) => Origin::Reattached,
    };
    Ok(())
}

/// Gives a lease back after its mapping failed.
pub fn abandon(acquired: Acquired) {
    let mut st = state();
    if let Some(conn) = st.conn.as_mut() {
        let _ = conn.client.release(&acquired.name);
    }
}

/// QEMU unmapped the block in `slot`: forget it, close its fd and release the lease (a
/// persistent lease stays with the broker, idle, for the next re-attach).
pub fn forget(slot: usize) {
    let mut st = state();
    let Some(block) = TABLE.remove(slot) else {
        return;
    };
    // The fd was leaked into the table by `commit`, which owned it alone.
    crate::sys::close_table_fd(block.fd);
    let name = st.names[slot].take();
    if let (Some(name), Some(conn)) = (name, st.conn.as_mut())
        && conn.pid == std::process::id()
    {
        if conn.client.is_closed() {
            // The broker went away and took this holder with the old connection: just
            // do not re-attach on reconnect, rather than wait for the broker here.
            conn.client.forget_lease(&name);
        } else {
            let _ = conn.client.release(&name);
            report_lost(&mut conn.client);
            rearm_poison(conn);
        }
    }
}

/// Reads (and drops) the broker's replies to poison reports, without blocking.
fn drain(poison: &Client) {
    let mut buf = [0u8; 256];
    while rustix::net::recv(
        poison.as_fd(),
        &mut buf[..],
        rustix::net::RecvFlags::DONTWAIT,
    )
    .is_ok_and(|(n, _)| n > 0)
    {}
}

/// What QEMU gets instead of a lease under `MEMBROKER_FALLBACK=anon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instead {
    /// Anonymous RAM: the mapping QEMU asked for.
    Anonymous,
    /// A memfd backend: the ordinary memfd QEMU made.
    Memfd,
}

/// Says on stderr, in one line, why a RAM block is not on broker memory and what happens now.
pub fn complain(err: &ShimError, len: usize, instead: Instead) -> Fallback {
    let (socket, fallback) = match CONFIG.get() {
        Some(Ok(cfg)) => (cfg.socket.display().to_string(), cfg.fallback),
        _ => (
            membroker_client::default_socket_path()
                .display()
                .to_string(),
            Fallback::Fail,
        ),
    };
    let reason = membroker_client::error_chain(err);
    let what = match fallback {
        Fallback::Fail => {
            "failing the allocation (set MEMBROKER_FALLBACK=anon to use anonymous memory instead)"
        }
        Fallback::Anon => match instead {
            Instead::Anonymous => "using anonymous memory (MEMBROKER_FALLBACK=anon)",
            Instead::Memfd => "keeping QEMU's own memfd (MEMBROKER_FALLBACK=anon)",
        },
    };
    let line = format!(
        "membroker-preload: guest RAM block of {} not backed by broker {socket}: {reason}; {what}\n",
        membroker_client::size::format_size(len as u64)
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    fallback
}

/// A policy the shim cannot follow for `block`, with its lease's name.
pub fn policy_error(block: &Block, problem: String) -> ShimError {
    let name = state().names[block.slot].clone().unwrap_or_default();
    ShimError::Policy { name, problem }
}

/// Gets a lease on one of `nodes` for `block`, in node order, for QEMU's `mbind`: `None` when
/// its lease already is on one of them, or (not `strict`: a preferred node) when no pool on
/// them has room. The old lease, made for the block and never touched, is removed first, so
/// its memory is free for the new one, which takes its name. A lease re-attached with a
/// guest's memory is never replaced.
pub fn place(block: &Block, nodes: &[u32], strict: bool) -> Result<Option<Acquired>, ShimError> {
    let cfg = config()?;
    let mut st = state();
    let name = st.names[block.slot].clone().unwrap_or_default();
    let origin = st.origin[block.slot];
    let pid = std::process::id();
    let Some(conn) = st.conn.as_mut().filter(|c| c.pid == pid) else {
        return Err(ShimError::Policy {
            name,
            problem: "not connected to the broker in this process".into(),
        });
    };
    let info = conn.client.stat(&name).map_err(ShimError::Client)?;
    let pools = conn.client.df().map_err(ShimError::Client)?;
    let node_of = |pool: &str| pools.iter().find(|p| p.name == pool).and_then(|p| p.node);
    let list = nodes
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" or ");
    if node_of(&info.pool).is_some_and(|n| nodes.contains(&n)) {
        return Ok(None);
    }
    let target = nodes.iter().copied().find(|n| {
        pools
            .iter()
            .any(|p| p.node == Some(*n) && p.page_size == info.page_size && p.free >= info.size)
    });
    let node = match (target, strict) {
        (Some(node), _) => node,
        (None, false) => return Ok(None),
        (None, true) => {
            return Err(ShimError::NoNodePool {
                name,
                nodes: list,
                page: info.page_size,
                size: membroker_client::size::format_size(info.size),
            });
        }
    };
    // A lease that holds the guest's memory, or whose fd QEMU holds, stays: a preferred
    // binding is satisfied as it is, a strict one is refused.
    if origin != Origin::Created {
        if !strict {
            return Ok(None);
        }
        let (pool, nodes) = (info.pool, list);
        return Err(if origin == Origin::Backend {
            ShimError::SharedFd { name, pool, nodes }
        } else {
            ShimError::Placed { name, pool, nodes }
        });
    }
    conn.client.remove(&name).map_err(ShimError::Client)?;
    conn.client.release(&name).map_err(ShimError::Client)?;
    let req = CreateLease::new(name.clone(), info.size)
        .persistent(cfg.persist)
        .page_size(info.page_size)
        .node(node);
    let lease = conn.client.create(req).map_err(ShimError::Client)?;
    let backing = match lease.backing() {
        Ok(membroker_client::Backing::Memfd) => Backing::Memfd,
        Ok(membroker_client::Backing::DevDax) => Backing::DevDax,
        Err(e) => {
            let _ = conn.client.release(&name);
            return Err(ShimError::Client(e));
        }
    };
    Ok(Some(Acquired {
        page: lease.page_size().bytes(),
        fd: lease.into_fd(),
        name,
        backing,
        created: true,
    }))
}

/// The lease `acquired` is mapped over the block in `slot`: close the old lease's fd and
/// record the new one.
pub fn replace(slot: usize, acquired: Acquired, start: usize, len: usize) -> Result<(), ShimError> {
    {
        let mut st = state();
        if let Some(old) = TABLE.remove(slot) {
            crate::sys::close_table_fd(old.fd);
        }
        st.names[slot] = None;
        st.origin[slot] = Origin::Reattached;
    }
    commit(acquired, start, len)
}

/// Says on stderr, in one line, why QEMU's `mbind` of a RAM block fails.
pub fn complain_mbind(err: &ShimError) {
    let line = format!(
        "membroker-preload: cannot place guest RAM as QEMU's mbind asks: {}; the mbind fails\n",
        membroker_client::error_chain(err)
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}
