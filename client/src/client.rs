//! A connection to the broker.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::{DupFlags, Errno};
use rustix::net::{AddressFamily, RecvFlags, SocketAddrUnix, SocketFlags, SocketType};

use crate::codec::{self, MAX_MSG_SIZE};
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::options::Options;
use crate::proto::{
    CreateLease, ErrorCode, LeaseInfo, LeaseTotals, PROTOCOL_MAX, PROTOCOL_MIN, PoolInfo, Request,
    Response,
};
use crate::reconnect::{DEFAULT_RECONNECT_TIMEOUT, GaveUp, RealClock, Step, retry_until};
use crate::transport::{self, TransportError};

/// Environment variable naming the broker socket.
pub const SOCKET_ENV: &str = "MEMBROKER_SOCKET";

/// The socket a client uses when none is given: `$MEMBROKER_SOCKET`, else
/// `/run/membroker/broker.sock` for root, else `$XDG_RUNTIME_DIR/membroker/broker.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let uid = rustix::process::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/membroker/broker.sock");
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", uid.as_raw())));
    runtime.join("membroker/broker.sock")
}

/// A lease the client held but could not re-attach to after the broker restarted (see
/// [`Client::lost_leases`]). Its fd and mappings stay valid, but the broker no longer counts
/// this client as a holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostLease {
    pub name: String,
    /// Whether the client held it writable.
    pub writable: bool,
    /// The broker's error code for the refused re-open (`NotFound` when the lease is gone).
    pub code: ErrorCode,
    /// Why, for a person.
    pub reason: String,
}

/// A lease this connection holds, as the broker described it when it was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    writable: bool,
    /// Its owner and size: a re-attach by name after a restart must find the same.
    owner: u32,
    size: u64,
}

/// A failed exchange, and whether the request reached the socket (so the broker may have
/// applied it).
struct CallError {
    err: Error,
    sent: bool,
}

impl From<Error> for CallError {
    fn from(err: Error) -> CallError {
        CallError { err, sent: false }
    }
}

/// One connection to the broker. Leases received on it are held until released or until
/// the connection closes (non-persistent leases then go back to the pool).
///
/// When the broker goes away (crash, restart, `membroker upgrade`), the next call notices the
/// broken connection and reconnects by itself: it retries the socket with a short backoff for
/// at most [`Client::reconnect_timeout`], negotiates again, re-opens every lease this client
/// holds (so that it is a holder again; the fds that come back are closed, the client's own
/// fds and mappings are never touched), then retries the failed request once. A lease that
/// cannot be re-opened is listed in [`Client::lost_leases`]. If no broker answers in time the
/// call fails with [`Error::Unavailable`]. The socket's fd number stays the same across
/// reconnects (the new connection is `dup3`'d over the old one).
///
/// Every wait has a deadline ([`Options::timeout`], [`DEFAULT_TIMEOUT`](crate::DEFAULT_TIMEOUT)
/// unless set): connecting, and each call's send and receive. A broker that does not answer
/// in time (stopped, wedged) fails the call with [`Error::Timeout`]. The connection is kept,
/// so the leases it holds stay held; the next call first reads and drops the late reply.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    path: PathBuf,
    version: u16,
    server: String,
    buf: Vec<u8>,
    /// Leases this connection holds, by name.
    held: BTreeMap<String, Held>,
    lost: Vec<LostLease>,
    reconnect_timeout: Duration,
    reconnects: u64,
    /// The deadline of every wait for the broker.
    timeout: Option<Duration>,
    /// Replies the broker still owes on this connection (calls that passed their deadline):
    /// the next call reads and drops them first.
    owed: u32,
}

/// Opens a connected socket to `path`; with `timeout`, connect and every later send and receive
/// on it give up after that long (`EAGAIN`).
fn open_socket(path: &Path, timeout: Option<Duration>) -> Result<OwnedFd> {
    let connect_err = |source| Error::Connect {
        path: path.to_path_buf(),
        source,
    };
    let addr = SocketAddrUnix::new(path).map_err(connect_err)?;
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(connect_err)?;
    if let Some(timeout) = timeout {
        set_timeouts(&sock, Some(timeout)).map_err(connect_err)?;
    }
    rustix::net::connect(&sock, &addr).map_err(connect_err)?;
    Ok(sock)
}

/// Sets (or with `None` clears) the send and receive timeouts of `sock`; for a Unix socket
/// the send timeout also bounds `connect` on a full backlog.
fn set_timeouts(sock: &OwnedFd, timeout: Option<Duration>) -> rustix::io::Result<()> {
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    set_socket_timeout(sock, Timeout::Send, timeout)?;
    set_socket_timeout(sock, Timeout::Recv, timeout)
}

/// Whether `err` is a socket deadline passing (`SO_SNDTIMEO`/`SO_RCVTIMEO`: `EAGAIN`).
fn timed_out(err: &Error) -> bool {
    matches!(
        err,
        Error::Transport(TransportError::Io(Errno::AGAIN))
            | Error::Connect {
                source: Errno::AGAIN,
                ..
            }
    )
}

/// Sends one request on `sock` and waits for its reply and fds. If the deadline passes
/// after the request was sent, the broker still owes its reply: `owed` counts it.
fn exchange(
    sock: &OwnedFd,
    version: u16,
    buf: &mut [u8],
    owed: &mut u32,
    req: &Request,
) -> std::result::Result<(Response, Vec<OwnedFd>), CallError> {
    let msg = codec::encode_request(version, req).map_err(Error::from)?;
    transport::send(sock.as_fd(), &msg, &[]).map_err(Error::from)?;
    let sent = |err: Error| CallError { err, sent: true };
    let received = transport::recv(sock, buf).map_err(|e| {
        if matches!(e, TransportError::Io(Errno::AGAIN)) {
            *owed += 1;
        }
        sent(e.into())
    })?;
    let (_, resp) = codec::decode_response(&buf[..received.len]).map_err(|e| sent(e.into()))?;
    if received.fds.len() != resp.fd_count() {
        return Err(sent(Error::Protocol(format!(
            "reply carries {} fds, expected {}",
            received.fds.len(),
            resp.fd_count()
        ))));
    }
    if let Response::Error { code, message } = resp {
        return Err(sent(Error::Broker { code, message }));
    }
    Ok((resp, received.fds))
}

/// Negotiates the protocol version on a fresh connection.
fn hello(sock: &OwnedFd, buf: &mut [u8]) -> Result<(u16, String)> {
    let hello = Request::Hello {
        min_version: PROTOCOL_MIN,
        max_version: PROTOCOL_MAX,
        client: format!("membroker-client {}", env!("CARGO_PKG_VERSION")),
    };
    match exchange(sock, PROTOCOL_MIN, buf, &mut 0, &hello).map_err(|e| e.err)? {
        (Response::Hello { version, server }, _)
            if (PROTOCOL_MIN..=PROTOCOL_MAX).contains(&version) =>
        {
            Ok((version, server))
        }
        (other, _) => Err(unexpected(&other)),
    }
}

/// Whether an error met while reconnecting may pass by trying again (nobody listens yet, the
/// connection broke again, the broker did not answer in time).
fn retryable(err: &Error) -> bool {
    matches!(err, Error::Connect { .. } | Error::Transport(_))
}

/// A new connection that has said Hello and re-opened `held`.
struct Fresh {
    sock: OwnedFd,
    version: u16,
    server: String,
    lost: Vec<LostLease>,
}

/// One reconnect attempt: connect, Hello, re-open every lease in `held` (closing the fds that
/// come back). Every blocking step is bounded by `left`.
fn attempt_reconnect(
    path: &Path,
    buf: &mut [u8],
    held: &BTreeMap<String, Held>,
    skip: Option<&str>,
    left: Duration,
    timeout: Option<Duration>,
) -> Step<Fresh, Error> {
    let step = |err: Error| {
        if retryable(&err) {
            Step::Retry(err)
        } else {
            Step::Fail(err)
        }
    };
    let sock = match open_socket(path, Some(left)) {
        Ok(sock) => sock,
        Err(e) => return step(e),
    };
    let (version, server) = match hello(&sock, buf) {
        Ok(v) => v,
        Err(e) => return step(e),
    };
    let mut lost = Vec::new();
    for (name, &Held { writable, .. }) in held.iter().filter(|(n, _)| Some(n.as_str()) != skip) {
        let open = Request::Open {
            name: name.clone(),
            writable,
        };
        match exchange(&sock, version, buf, &mut 0, &open) {
            // The client keeps using its own fd; this one only made it a holder again.
            Ok((Response::Lease(info), fds)) => {
                drop(fds);
                if let Some(changed) = not_the_same(&held[name], &info) {
                    // Somebody else's lease under the same name: do not keep it alive.
                    let release = Request::Release { name: name.clone() };
                    if let Err(e) = exchange(&sock, version, buf, &mut 0, &release) {
                        return step(e.err);
                    }
                    lost.push(LostLease {
                        name: name.clone(),
                        writable,
                        code: ErrorCode::PermissionDenied,
                        reason: changed,
                    });
                }
            }
            Ok((other, _)) => return Step::Fail(unexpected(&other)),
            Err(CallError {
                err: Error::Broker { code, message },
                ..
            }) => lost.push(LostLease {
                name: name.clone(),
                writable,
                code,
                reason: message,
            }),
            Err(e) => return step(e.err),
        }
    }
    if let Err(source) = set_timeouts(&sock, timeout) {
        return Step::Retry(Error::Connect {
            path: path.to_path_buf(),
            source,
        });
    }
    Step::Done(Fresh {
        sock,
        version,
        server,
        lost,
    })
}

/// Why the lease `info` found by name is not the one this client held, if it is not.
fn not_the_same(held: &Held, info: &LeaseInfo) -> Option<String> {
    if info.uid != held.owner {
        return Some(format!(
            "lease {} now belongs to uid {}, not to uid {} as when this client held it: not \
             re-attached",
            info.name, info.uid, held.owner
        ));
    }
    (info.size != held.size).then(|| {
        format!(
            "lease {} is now {} bytes, not {} as when this client held it: not re-attached",
            info.name, info.size, held.size
        )
    })
}

impl Client {
    /// Connects to the socket at `path` and negotiates the protocol version, with the default
    /// [`Options`]. Fails at once if nobody listens there (only a broken connection is
    /// retried, see [`Client`]).
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Client::connect_with(path, Options::default())
    }

    /// [`Client::connect`] with `options`; a broker that does not answer the handshake
    /// within [`Options::timeout`] fails it with [`Error::Timeout`].
    pub fn connect_with(path: impl AsRef<Path>, options: Options) -> Result<Client> {
        let path = path.as_ref();
        let timed_out = |err: Error| match options.timeout {
            Some(timeout) if timed_out(&err) => Error::Timeout {
                path: path.to_path_buf(),
                timeout,
            },
            _ => err,
        };
        let sock = open_socket(path, options.timeout).map_err(timed_out)?;
        let mut buf = vec![0; MAX_MSG_SIZE + 1];
        let (version, server) = hello(&sock, &mut buf).map_err(timed_out)?;
        Ok(Client {
            sock,
            path: path.to_path_buf(),
            version,
            server,
            buf,
            held: BTreeMap::new(),
            lost: Vec::new(),
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
            reconnects: 0,
            timeout: options.timeout,
            owed: 0,
        })
    }

    /// Connects to [`default_socket_path`].
    pub fn connect_default() -> Result<Client> {
        Client::connect(default_socket_path())
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The broker's self-description from the handshake.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The socket this client connects to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// How long a call waits for the broker to come back after the connection broke
    /// ([`DEFAULT_RECONNECT_TIMEOUT`] unless set).
    pub fn reconnect_timeout(&self) -> Duration {
        self.reconnect_timeout
    }

    /// Sets how long a call waits for the broker after the connection broke;
    /// `Duration::ZERO` turns transparent reconnection off (a broken connection then fails
    /// the call with the transport error, and [`Client::reconnect`] tries exactly once).
    pub fn set_reconnect_timeout(&mut self, timeout: Duration) {
        self.reconnect_timeout = timeout;
    }

    /// The deadline of every wait for the broker ([`Options::timeout`]).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Sets the deadline of every later wait for the broker (`None`: wait for ever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        set_timeouts(&self.sock, timeout).map_err(|source| Error::Connect {
            path: self.path.clone(),
            source,
        })?;
        self.timeout = timeout;
        Ok(())
    }

    /// `err`, or [`Error::Timeout`] if it is the deadline passing.
    fn deadline(&self, err: Error) -> Error {
        match self.timeout {
            Some(timeout) if timed_out(&err) => Error::Timeout {
                path: self.path.clone(),
                timeout,
            },
            _ => err,
        }
    }

    /// Reads and drops the late replies of calls that passed their deadline, so that the
    /// next reply read is the next call's. The connection is kept (it is what holds this
    /// client's leases). A late lease this client does not hold (a create or open the caller
    /// was told had timed out) is released again.
    fn settle(&mut self) -> std::result::Result<(), CallError> {
        while self.owed > 0 {
            let received = transport::recv(&self.sock, &mut self.buf).map_err(Error::from)?;
            self.owed -= 1;
            drop(received.fds);
            if let Ok((_, Response::Lease(info))) =
                codec::decode_response(&self.buf[..received.len])
                && !self.held.contains_key(&info.name)
            {
                let release = Request::Release { name: info.name };
                let msg = codec::encode_request(self.version, &release).map_err(Error::from)?;
                transport::send(self.sock.as_fd(), &msg, &[]).map_err(Error::from)?;
                self.owed += 1;
            }
        }
        Ok(())
    }

    /// How many times this client has reconnected.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The leases this connection holds (and re-opens after a reconnect): name and whether
    /// writable, in name order.
    pub fn held_leases(&self) -> impl Iterator<Item = (&str, bool)> {
        self.held.iter().map(|(n, h)| (n.as_str(), h.writable))
    }

    /// Leases that could not be re-opened after a reconnect (removed meanwhile, refused), in
    /// the order they were lost. The library logs nothing: look here after a call.
    pub fn lost_leases(&self) -> &[LostLease] {
        &self.lost
    }

    /// Returns and clears [`Client::lost_leases`].
    pub fn take_lost_leases(&mut self) -> Vec<LostLease> {
        std::mem::take(&mut self.lost)
    }

    /// Stops tracking a lease without telling the broker: it is no longer re-opened after a
    /// reconnect. For a holder that drops a lease while the broker is away (its holder status
    /// went with the old connection anyway). Returns whether it was tracked.
    pub fn forget_lease(&mut self, name: &str) -> bool {
        self.held.remove(name).is_some()
    }

    /// Whether the broker has closed this connection (without blocking; a reply or message
    /// waiting to be read counts as open).
    pub fn is_closed(&self) -> bool {
        let mut byte = [0u8; 1];
        match rustix::net::recv(
            &self.sock,
            &mut byte[..],
            RecvFlags::PEEK | RecvFlags::DONTWAIT,
        ) {
            Ok((0, _)) => true,
            Ok(_) => false,
            Err(Errno::AGAIN | Errno::INTR) => false,
            Err(_) => true,
        }
    }

    /// Reconnects if the broker has closed the connection (see [`Client::is_closed`]);
    /// returns whether it did. For a holder that polls the client's fd in its event loop:
    /// readable without a call in flight means the broker went away, and reconnecting at
    /// once re-attaches the held leases before the broker's grace period ends.
    pub fn reconnect_if_closed(&mut self) -> Result<bool> {
        if !self.is_closed() {
            return Ok(false);
        }
        self.reconnect()?;
        Ok(true)
    }

    /// Replaces the connection with a new one now: waits for the broker (at most
    /// [`Client::reconnect_timeout`], one attempt if zero), says Hello and re-opens every held
    /// lease. Mappings and lease fds are not touched.
    pub fn reconnect(&mut self) -> Result<()> {
        self.reconnect_skipping(None)
    }

    /// [`Client::reconnect`], not re-opening `skip` (a lease being released).
    fn reconnect_skipping(&mut self, skip: Option<&str>) -> Result<()> {
        let Client {
            path,
            buf,
            held,
            reconnect_timeout,
            timeout,
            ..
        } = self;
        let outcome = retry_until(*reconnect_timeout, &mut RealClock, |left| {
            attempt_reconnect(path, buf, held, skip, left, *timeout)
        });
        let fresh = match outcome {
            Ok(fresh) => fresh,
            Err(GaveUp::Failed(err)) => return Err(err),
            Err(GaveUp::TimedOut { waited, last }) => {
                return Err(Error::Unavailable {
                    path: self.path.clone(),
                    waited,
                    last: last.map(Box::new),
                });
            }
        };
        // Keep the fd number: whoever holds it (a signal handler that sends on it, a poll
        // set) now talks to the new broker. Only if that fails take the new number.
        if rustix::io::dup3(&fresh.sock, &mut self.sock, DupFlags::CLOEXEC).is_err() {
            self.sock = fresh.sock;
        }
        self.version = fresh.version;
        self.server = fresh.server;
        self.owed = 0;
        if let Some(name) = skip {
            self.held.remove(name);
        }
        for lost in fresh.lost {
            self.held.remove(&lost.name);
            self.lost.push(lost);
        }
        self.reconnects += 1;
        Ok(())
    }

    /// Sends one request and waits for its reply and fds. If the connection turns out to be
    /// broken, reconnects (see [`Client`]) and retries the request once; a `Create` whose
    /// reply was lost and that then fails with `Exists` is retried as an `Open` of the same
    /// name (it was applied), a `Remove` that then fails with `NotFound` succeeds, and a
    /// `Release` of a held lease succeeds without a retry (the broker dropped this client as
    /// a holder with the old connection). `Hello` and `Upgrade` are never retried (an
    /// upgrade ends with the broker closing the connection; the next call reconnects).
    pub fn call(&mut self, req: &Request) -> Result<(Response, Vec<OwnedFd>)> {
        let result = match self
            .settle()
            .and_then(|()| exchange(&self.sock, self.version, &mut self.buf, &mut self.owed, req))
        {
            Err(CallError { err, .. }) if timed_out(&err) => Err(err),
            Err(CallError { err, sent })
                if err.is_connection_lost()
                    && !self.reconnect_timeout.is_zero()
                    && !matches!(req, Request::Hello { .. } | Request::Upgrade) =>
            {
                self.recover(req, sent)
            }
            other => other.map_err(|e| e.err),
        };
        if let Ok((resp, _)) = &result {
            self.track(req, resp);
        }
        result.map_err(|e| self.deadline(e))
    }

    /// Reconnects after `req` met a broken connection, then retries it once.
    fn recover(&mut self, req: &Request, sent: bool) -> Result<(Response, Vec<OwnedFd>)> {
        let releasing = match req {
            Request::Release { name } if self.held.contains_key(name) => Some(name.as_str()),
            _ => None,
        };
        self.reconnect_skipping(releasing)?;
        if releasing.is_some() {
            return Ok((Response::Ok, Vec::new()));
        }
        let retried = exchange(&self.sock, self.version, &mut self.buf, &mut self.owed, req)
            .map_err(|e| e.err);
        if !sent {
            return retried;
        }
        // The broker may have applied the first attempt before it went away.
        match (req, retried) {
            (Request::Create(create), Err(err)) if err.code() == Some(ErrorCode::Exists) => {
                self.adopt_created(create, err)
            }
            (Request::Remove { .. }, Err(err)) if err.code() == Some(ErrorCode::NotFound) => {
                Ok((Response::Ok, Vec::new()))
            }
            (_, retried) => retried,
        }
    }

    /// A `Create` whose reply was lost found the name taken on retry: most likely its own
    /// lease, so open it; if what is there does not match the request (another owner
    /// included: a lease someone else made first is never adopted), report `exists`.
    fn adopt_created(
        &mut self,
        create: &CreateLease,
        exists: Error,
    ) -> Result<(Response, Vec<OwnedFd>)> {
        let owner = create
            .owner
            .unwrap_or_else(|| rustix::process::geteuid().as_raw());
        let open = Request::Open {
            name: create.name.clone(),
            writable: true,
        };
        match exchange(
            &self.sock,
            self.version,
            &mut self.buf,
            &mut self.owed,
            &open,
        ) {
            Ok((Response::Lease(info), fds))
                if info.uid == owner
                    && info.size == create.size
                    && create.page_size.is_none_or(|p| p == info.page_size)
                    && create.pool.as_ref().is_none_or(|p| *p == info.pool)
                    && info.persistent == create.persistent =>
            {
                Ok((Response::Lease(info), fds))
            }
            Ok((Response::Lease(_), _)) => {
                let release = Request::Release {
                    name: create.name.clone(),
                };
                let _ = exchange(
                    &self.sock,
                    self.version,
                    &mut self.buf,
                    &mut self.owed,
                    &release,
                );
                Err(exists)
            }
            _ => Err(exists),
        }
    }

    /// Keeps the held set in step with what the broker said.
    fn track(&mut self, req: &Request, resp: &Response) {
        match (req, resp) {
            (Request::Create(_) | Request::Open { .. }, Response::Lease(info)) => {
                let held = Held {
                    writable: false,
                    owner: info.uid,
                    size: info.size,
                };
                self.held.entry(info.name.clone()).or_insert(held).writable |= info.writable;
            }
            (Request::Release { name } | Request::Remove { name }, Response::Ok) => {
                self.held.remove(name);
            }
            _ => {}
        }
    }

    fn lease_call(&mut self, req: &Request) -> Result<Lease> {
        match self.call(req)? {
            (Response::Lease(info), mut fds) => match fds.pop() {
                Some(fd) => Lease::new(fd, info),
                None => Err(Error::Protocol("lease reply without fd".into())),
            },
            (other, _) => Err(unexpected(&other)),
        }
    }

    pub(crate) fn ok_call(&mut self, req: &Request) -> Result<()> {
        match self.call(req)? {
            (Response::Ok, _) => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Creates a lease; this connection holds it.
    pub fn create(&mut self, req: CreateLease) -> Result<Lease> {
        self.lease_call(&Request::Create(req))
    }

    /// Opens an existing lease by name (re-attach); this connection holds it.
    pub fn open(&mut self, name: &str, writable: bool) -> Result<Lease> {
        self.lease_call(&Request::Open {
            name: name.into(),
            writable,
        })
    }

    /// Stops holding a lease on this connection (mappings and fds stay valid).
    pub fn release(&mut self, name: &str) -> Result<()> {
        self.ok_call(&Request::Release { name: name.into() })
    }

    /// Removes a lease by name.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.ok_call(&Request::Remove { name: name.into() })
    }

    /// Reports a memory error seen at `[offset, offset + len)` of a lease.
    pub fn report_poison(&mut self, name: &str, offset: u64, len: u64) -> Result<()> {
        self.ok_call(&Request::ReportPoison {
            name: name.into(),
            offset,
            len,
        })
    }

    /// Describes one lease.
    pub fn stat(&mut self, name: &str) -> Result<LeaseInfo> {
        match self.call(&Request::Stat { name: name.into() })? {
            (Response::Stat(info), _) => Ok(info),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Describes one lease and says how many holders, extents and poison ranges it has (the
    /// description lists at most [`crate::proto::MAX_LISTED`] of each).
    pub fn describe(&mut self, name: &str) -> Result<(LeaseInfo, LeaseTotals)> {
        match self.call(&Request::Describe { name: name.into() })? {
            (Response::Described { info, totals }, _) => Ok((info, totals)),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Describes every visible lease under `prefix` (`""` for all), in name order.
    pub fn list(&mut self, prefix: &str) -> Result<Vec<LeaseInfo>> {
        self.all_pages(
            |after| Request::List {
                prefix: prefix.into(),
                after,
            },
            |resp| match resp {
                Response::List { leases, more } => Ok((leases, more)),
                other => Err(unexpected(&other)),
            },
            |l| l.name.clone(),
        )
    }

    /// Asks for pages (`request(after)`) until the broker says no more follow.
    pub(crate) fn all_pages<T, K>(
        &mut self,
        request: impl Fn(Option<K>) -> Request,
        page: impl Fn(Response) -> Result<(Vec<T>, bool)>,
        key: impl Fn(&T) -> K,
    ) -> Result<Vec<T>> {
        let mut all: Vec<T> = Vec::new();
        loop {
            let (resp, _) = self.call(&request(all.last().map(&key)))?;
            let (items, more) = page(resp)?;
            if more && items.is_empty() {
                return Err(Error::Protocol("empty page with more to come".into()));
            }
            all.extend(items);
            if !more {
                return Ok(all);
            }
        }
    }

    /// Describes the pools.
    pub fn df(&mut self) -> Result<Vec<PoolInfo>> {
        match self.call(&Request::Df)? {
            (Response::Df(pools), _) => Ok(pools),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

pub(crate) fn unexpected(resp: &Response) -> Error {
    Error::Protocol(format!("unexpected reply kind {:#06x}", resp.kind()))
}
