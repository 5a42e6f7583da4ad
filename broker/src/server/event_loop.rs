//! The event loop: one thread accepts connections and waits (epoll) on every connection's
//! socket; when one is readable it hands the connection to a small pool of workers, which
//! read one request, answer it ([`conn::step`]) and re-arm the socket (`EPOLLONESHOT`, so a
//! connection is served by one worker at a time). An idle connection is a socket and a
//! [`Conn`], no thread.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use membroker_client::codec::MAX_MSG_SIZE;
use membroker_client::proto::ErrorCode;
use parking_lot::Mutex;
use rustix::event::{Timespec, epoll};
use rustix::io::Errno;
use rustix::net::SocketFlags;

use super::broker::{Broker, Session};
use super::conn::{self, Conn, End, SEND_TIMEOUT, Step, Wait};
use super::limits::{ConnCount, ConnLimits, FD_RESERVE};
use super::{Listener, ServeError, sys};

/// Epoll tokens that are not connections (connection numbers count up from 1).
const LISTENER: u64 = u64::MAX;
const SIGNAL: u64 = u64::MAX - 1;

/// How long the listener rests after accept ran out of files.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections accepted per wake-up, so that requests are not starved by a flood.
const ACCEPT_BATCH: usize = 64;

/// The longest the event loop sleeps (it then checks the deadlines of pending replies).
const TICK: Duration = Duration::from_secs(1);

/// How a connection waits for what it waits for.
fn armed(wait: &Wait) -> epoll::EventFlags {
    let on = match wait {
        Wait::Request => epoll::EventFlags::IN,
        Wait::Room => epoll::EventFlags::OUT,
    };
    on | epoll::EventFlags::ONESHOT
}

/// What the event loop and the workers share.
struct Shared {
    broker: Arc<Broker>,
    epoll: OwnedFd,
    /// Connections waiting for their next request, by number (their epoll token). One that a
    /// worker is serving is not here.
    idle: Mutex<HashMap<u64, Conn>>,
    count: Mutex<ConnCount>,
    /// Connections whose reply waits for room, by the time it started waiting.
    unread: Mutex<VecDeque<(Instant, u64)>>,
}

impl Shared {
    /// Puts a served connection back to wait for its next request, or for room for its reply.
    fn park(&self, conn: Conn, wait: Wait) {
        let id = conn.session.peer.conn;
        if let (Wait::Room, Some(pending)) = (&wait, &conn.pending) {
            self.unread.lock().push_back((pending.since, id));
        }
        let mut idle = self.idle.lock();
        // Re-armed under the lock: the event loop finds it in `idle` when it fires.
        let token = epoll::EventData::new_u64(id);
        match epoll::modify(&self.epoll, &conn.sock, token, armed(&wait)) {
            Ok(()) => {
                idle.insert(id, conn);
            }
            Err(e) => {
                drop(idle);
                self.close(
                    conn,
                    End::Protocol(format!("cannot wait on the socket: {e}")),
                );
            }
        }
    }

    /// Ends a connection: releases its holds and its place.
    fn close(&self, conn: Conn, end: End) {
        let _ = epoll::delete(&self.epoll, &conn.sock);
        let uid = conn.session.peer.uid;
        conn.end(&self.broker, end);
        self.count.lock().release(uid);
        self.broker.metrics().disconnected();
        // After a flood, give back the table's memory.
        let mut idle = self.idle.lock();
        if idle.capacity() > 1024 && idle.len() * 8 < idle.capacity() {
            let keep = idle.len() * 2;
            idle.shrink_to(keep);
        }
    }
}

/// Logs a repeated warning at most once per interval, with how many were left out.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    const INTERVAL: Duration = Duration::from_secs(10);

    /// `Some(suppressed since the last one)` if this one may be logged.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The event loop's own state.
struct Loop {
    shared: Arc<Shared>,
    limits: ConnLimits,
    nofile: u64,
    next_conn: u64,
    /// Connections that have not sent `Hello` yet, by deadline (accept order is deadline order).
    hello: VecDeque<(Instant, u64)>,
    /// While set, the listener rests (accept ran out of files).
    paused_until: Option<Instant>,
    accept_failed: Throttle,
    refused: Throttle,
    /// Connections closed for saying no Hello in time (a flood of idle ones is expected).
    silent: Throttle,
    work: crossbeam_channel::Sender<Conn>,
    /// systemd's watchdog, if on: how often to tell it the loop is alive, and when next. Told
    /// from this thread, so a loop that hangs is restarted.
    watchdog: Option<(Duration, Instant)>,
}

/// Serves `listener` until SIGTERM or SIGINT, then closes every connection and returns.
pub fn run(broker: Arc<Broker>, listener: Listener, limits: ConnLimits) -> Result<(), ServeError> {
    let nofile = super::limits::nofile_limit();
    let (signal_rx, signal_tx) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )
    .map_err(sys("pipe"))?;
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let tx = signal_tx.try_clone().map_err(|e| ServeError::Sys {
            what: "dup",
            source: Errno::from_io_error(&e).unwrap_or(Errno::IO),
        })?;
        signal_hook::low_level::pipe::register(signal, tx).map_err(super::io(
            "cannot install signal handler",
            std::path::Path::new(""),
        ))?;
    }
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(sys("epoll_create"))?;
    let token = epoll::EventData::new_u64;
    epoll::add(
        &epoll,
        &listener.sock,
        token(LISTENER),
        epoll::EventFlags::IN,
    )
    .map_err(sys("epoll_ctl"))?;
    epoll::add(&epoll, &signal_rx, token(SIGNAL), epoll::EventFlags::IN)
        .map_err(sys("epoll_ctl"))?;
    let shared = Arc::new(Shared {
        broker,
        epoll,
        idle: Mutex::new(HashMap::new()),
        count: Mutex::new(ConnCount::default()),
        unread: Mutex::new(VecDeque::new()),
    });
    let (work, queue) = crossbeam_channel::unbounded::<Conn>();
    let workers = start_workers(&shared, &queue)?;
    drop(queue);
    let mut state = Loop {
        shared: shared.clone(),
        limits,
        nofile,
        next_conn: 0,
        hello: VecDeque::new(),
        paused_until: None,
        accept_failed: Throttle::default(),
        refused: Throttle::default(),
        silent: Throttle::default(),
        work,
        watchdog: shared
            .broker
            .notifier()
            .and_then(|n| n.watchdog_interval())
            .map(|every| (every, Instant::now())),
    };
    tracing::info!(
        socket = %listener.path().display(),
        workers = workers.len(),
        max_connections = limits.max,
        per_uid = limits.per_uid,
        open_file_limit = nofile,
        "serving"
    );
    let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
    'serve: loop {
        events.clear();
        let timeout =
            Timespec::try_from(state.next_timer().saturating_duration_since(Instant::now())).ok();
        match epoll::wait(
            &shared.epoll,
            rustix::buffer::spare_capacity(&mut events),
            timeout.as_ref(),
        ) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(sys("epoll_wait")(e)),
        }
        for event in &events {
            match event.data.u64() {
                SIGNAL => {
                    tracing::info!("signal received, shutting down");
                    break 'serve;
                }
                LISTENER => state.accept(&listener),
                id => {
                    let conn = shared.idle.lock().remove(&id);
                    if let Some(conn) = conn {
                        let _ = state.work.send(conn);
                    }
                }
            }
        }
        state.timers(&listener);
    }
    drop(state); // no more work: the workers finish what they have and stop
    for worker in workers {
        let _ = worker.join();
    }
    let idle: Vec<Conn> = shared.idle.lock().drain().map(|(_, c)| c).collect();
    for conn in idle {
        shared.close(conn, End::Closed);
    }
    tracing::info!("stopped");
    Ok(())
}

fn start_workers(
    shared: &Arc<Shared>,
    queue: &crossbeam_channel::Receiver<Conn>,
) -> Result<Vec<JoinHandle<()>>, ServeError> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (0..(4 * cores).clamp(4, 32))
        .map(|i| {
            let (shared, queue) = (shared.clone(), queue.clone());
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || work(&shared, &queue))
                .map_err(super::io(
                    "cannot start a worker thread",
                    std::path::Path::new(""),
                ))
        })
        .collect()
}

/// A worker: serves one request of each connection it is handed. A request whose reply waits
/// for the journal leaves the worker free: the reply is sent by whoever ends the sync.
fn work(shared: &Arc<Shared>, queue: &crossbeam_channel::Receiver<Conn>) {
    let mut buf = vec![0u8; MAX_MSG_SIZE + 1];
    for mut conn in queue {
        let span = conn_span(&conn);
        let _enter = span.enter();
        match conn::step(&shared.broker, &mut conn, &mut buf) {
            Ok(Step::Wait(wait)) => shared.park(conn, wait),
            Ok(Step::Durable(deferred)) => {
                let then = shared.clone();
                shared.broker.when_durable(deferred, move |reply| {
                    let span = conn_span(&conn);
                    let _enter = span.enter();
                    match conn::answer(&then.broker, &mut conn, reply) {
                        Ok(wait) => then.park(conn, wait),
                        Err(end) => then.close(conn, end),
                    }
                });
            }
            Err(end) => shared.close(conn, end),
        }
    }
}

fn conn_span(conn: &Conn) -> tracing::Span {
    let peer = &conn.session.peer;
    tracing::info_span!("conn", id = peer.conn, uid = peer.uid, pid = peer.pid)
}

impl Loop {
    /// When the event loop must wake up even if nothing happens.
    fn next_timer(&self) -> Instant {
        let tick = Instant::now() + TICK;
        let hello = self.hello.front().map_or(tick, |(at, _)| *at);
        let watchdog = self.watchdog.map_or(tick, |(_, at)| at);
        hello
            .min(self.paused_until.unwrap_or(tick))
            .min(watchdog)
            .min(tick)
    }

    /// Closes connections past their `Hello` deadline; lets the listener work again.
    fn timers(&mut self, listener: &Listener) {
        let now = Instant::now();
        if let Some((every, at)) = &mut self.watchdog
            && *at <= now
        {
            // Alive means this loop runs and requests can take the namespace: a worker stuck
            // holding it (a deadlock) stops the pings too, and systemd restarts the broker.
            let broker = &self.shared.broker;
            match broker.notifier() {
                Some(n) if broker.responsive(*every / 4) => n.alive(),
                Some(_) => tracing::error!(
                    "the namespace has been locked for {:?}; not telling the watchdog this broker is alive",
                    *every / 4
                ),
                None => {}
            }
            *at = Instant::now() + *every;
        }
        while let Some(&(deadline, id)) = self.hello.front() {
            if deadline > now {
                break;
            }
            self.hello.pop_front();
            if self.hello.is_empty() {
                self.hello.shrink_to(64);
            }
            // One a worker is serving now is either saying Hello or being closed.
            let conn = {
                let mut idle = self.shared.idle.lock();
                match idle.get(&id) {
                    Some(c) if c.session.version.is_none() => idle.remove(&id),
                    _ => None,
                }
            };
            if let Some(conn) = conn {
                let why = format!(
                    "no Hello within {} s of connecting; connection closed",
                    self.limits.hello_timeout.as_secs_f32()
                );
                let conn::End::Protocol(why) =
                    conn::refuse(&conn.sock, &conn.session, ErrorCode::Protocol, why)
                else {
                    unreachable!("a refusal ends the connection for a protocol error")
                };
                if let Some(suppressed) = self.silent.ready() {
                    tracing::warn!(
                        uid = conn.session.peer.uid,
                        suppressed,
                        why,
                        "connection closed"
                    );
                }
                self.shared.close(conn, conn::End::Quiet(why));
            }
        }
        self.unread_replies(now);
        if self.paused_until.is_some_and(|t| t <= now) {
            self.paused_until = None;
            let token = epoll::EventData::new_u64(LISTENER);
            if let Err(e) = epoll::modify(
                &self.shared.epoll,
                &listener.sock,
                token,
                epoll::EventFlags::IN,
            ) {
                tracing::error!(error = %e, "cannot wait on the listening socket again");
            }
        }
    }

    /// Closes connections that left a reply unread for [`SEND_TIMEOUT`].
    fn unread_replies(&mut self, now: Instant) {
        loop {
            let expired = {
                let mut unread = self.shared.unread.lock();
                match unread.front() {
                    Some(&(since, id)) if since + SEND_TIMEOUT <= now => {
                        unread.pop_front();
                        Some((since, id))
                    }
                    _ => None,
                }
            };
            let Some((since, id)) = expired else { return };
            let conn = {
                let mut idle = self.shared.idle.lock();
                match idle.get(&id) {
                    Some(c) if c.pending.as_ref().is_some_and(|p| p.since == since) => {
                        idle.remove(&id)
                    }
                    _ => None,
                }
            };
            if let Some(conn) = conn {
                let why = format!(
                    "reply not delivered: the client read nothing for {} s",
                    SEND_TIMEOUT.as_secs()
                );
                let span = tracing::info_span!("conn", id, uid = conn.session.peer.uid);
                let _enter = span.enter();
                self.shared.close(conn, End::Protocol(why));
            }
        }
    }

    /// Accepts the connections waiting, a batch at most.
    fn accept(&mut self, listener: &Listener) {
        for _ in 0..ACCEPT_BATCH {
            let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
            match rustix::net::accept_with(&listener.sock, flags) {
                Ok(sock) => self.admit(sock),
                Err(Errno::AGAIN) => return,
                Err(Errno::INTR | Errno::CONNABORTED) => continue,
                Err(e @ (Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)) => {
                    // Out of files or memory: rest instead of spinning on a listener that
                    // stays readable.
                    if let Some(suppressed) = self.accept_failed.ready() {
                        tracing::warn!(error = %e, suppressed, open_file_limit = self.nofile, "accept failed; not accepting for 100 ms");
                    }
                    self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    let token = epoll::EventData::new_u64(LISTENER);
                    let _ = epoll::modify(
                        &self.shared.epoll,
                        &listener.sock,
                        token,
                        epoll::EventFlags::empty(),
                    );
                    return;
                }
                Err(e) => {
                    if let Some(suppressed) = self.accept_failed.ready() {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    return;
                }
            }
        }
    }

    /// Identifies a new connection and admits it, or tells it why not.
    fn admit(&mut self, sock: OwnedFd) {
        let cred = match rustix::net::sockopt::socket_peercred(&sock) {
            Ok(cred) => cred,
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; connection refused");
                return;
            }
        };
        // Group permissions and the admin group count supplementary groups too.
        let groups = match crate::sys::peer_groups(sock.as_fd()) {
            Ok(groups) => groups,
            // A kernel before 4.13: fewer groups only ever mean less access.
            Err(Errno::NOPROTOOPT) => {
                tracing::warn!("SO_PEERGROUPS unsupported: supplementary groups do not count");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERGROUPS failed; connection refused");
                return;
            }
        };
        self.next_conn += 1;
        let peer = self.shared.broker.peer(
            self.next_conn,
            cred.pid.as_raw_nonzero().get() as u32,
            cred.uid.as_raw(),
            cred.gid.as_raw(),
            groups,
            // Read when it says Hello (`conn::step`): an idle flood costs no /proc reads.
            None,
        );
        // The lowest free fd is the one handed out: this one's number says at least that
        // many files are open.
        let admitted = if !peer.admin
            && (sock.as_raw_fd() as u64).saturating_add(FD_RESERVE) >= self.nofile
        {
            Err(format!(
                "the broker is near its open-file limit ({} of {}); the rest is kept for root and the admin group",
                sock.as_raw_fd(),
                self.nofile
            ))
        } else {
            self.shared.count.lock().admit(&self.limits, &peer)
        };
        if let Err(why) = admitted {
            if let Some(suppressed) = self.refused.ready() {
                tracing::warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    suppressed,
                    why,
                    "connection refused"
                );
            }
            let session = Session::new(peer);
            conn::refuse(&sock, &session, ErrorCode::NoSpace, why);
            // Closing a socket with unread messages would have the client's next receive fail
            // (ECONNRESET) before it reads why: its Hello, if already sent, is read first.
            let mut scratch = [0u8; 64];
            for _ in 0..4 {
                if rustix::net::recv(&sock, &mut scratch, rustix::net::RecvFlags::DONTWAIT).is_err()
                {
                    break;
                }
            }
            return;
        }
        let (id, uid) = (peer.conn, peer.uid);
        let conn = Conn::new(sock, peer);
        let token = epoll::EventData::new_u64(id);
        let mut idle = self.shared.idle.lock();
        if let Err(e) = epoll::add(&self.shared.epoll, &conn.sock, token, armed(&Wait::Request)) {
            drop(idle);
            tracing::warn!(error = %e, "cannot wait on a new connection; refused");
            self.shared.count.lock().release(uid);
            return;
        }
        self.hello
            .push_back((conn.accepted + self.limits.hello_timeout, id));
        idle.insert(id, conn);
        self.shared.broker.metrics().connected();
    }
}
