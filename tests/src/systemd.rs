//! Plays systemd's side of a `Type=notify` service for a broker process, as documented in
//! sd_notify(3) and sd_listen_fds(3): a notify socket (`NOTIFY_SOCKET`) on which the broker
//! reports `READY=1`, `STATUS=`, `STOPPING=1` and keeps its memfd leases in the fd store
//! (`FDSTORE=1` + `FDNAME=`, dropped again with `FDSTOREREMOVE=1`), and (re)starts that hand
//! the stored fds back: fds 3.. in the new process, `LISTEN_FDS=N`, `LISTEN_FDNAMES=a:b:…`,
//! `LISTEN_PID=` the broker's own pid.
//!
//! `LISTEN_PID` must be the pid of the process that reads it, which the parent only learns
//! after the fork, so the broker is started as
//! `bash -c 'move fds to 3..; export LISTEN_PID=$$; exec "$0" "$@"' membroker serve …`: bash
//! execs the broker in place, so the pid it exported is the broker's.
//!
//! Optionally it also plays a socket unit (`ListenSequentialPacket=`: the harness binds and
//! listens on the broker's socket and passes it first, named like the unit, so clients queue
//! while no broker runs) and the watchdog (`WATCHDOG_USEC=`; `WATCHDOG=1`, `WATCHDOG_USEC=`
//! and `EXTEND_TIMEOUT_USEC=` are recorded).

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use membroker_client::Client;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::bin_path;

/// Most fds one notification may carry here (more is reported as truncated).
const MAX_FDS_PER_MESSAGE: usize = 16;

/// How long a start may take before the harness gives up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Moves the fds listed in `$MB_TEST_FDS` (ascending) to 3, 4, … (closing the originals),
/// exports `LISTEN_PID` as its own pid and execs the broker (`$0`) with the other arguments.
const LAUNCH: &str = r#"i=3
for fd in $MB_TEST_FDS; do [ "$fd" = "$i" ] || eval "exec $i<&$fd $fd<&-"; i=$((i+1)); done
unset MB_TEST_FDS
[ -n "${LISTEN_FDS:-}" ] && export LISTEN_PID=$$
exec "$0" "$@""#;

/// What the service manager has seen on the notify socket.
#[derive(Debug, Default)]
pub struct Notified {
    /// The fd store: name → fd (`FDSTORE=1` replaces an fd of the same name).
    pub store: BTreeMap<String, OwnedFd>,
    /// `READY=1` messages received, over every start.
    pub ready: u64,
    /// The last `STATUS=`.
    pub status: Option<String>,
    /// `STOPPING=1` messages received.
    pub stopping: u64,
    /// `FDSTORE=1` messages received.
    pub stored: u64,
    /// `FDSTOREREMOVE=1` messages received.
    pub removed: u64,
    /// `FDSTOREREMOVE=1` for a name the store did not hold.
    pub removed_unknown: Vec<String>,
    /// When each `WATCHDOG=1` arrived.
    pub watchdog: Vec<Instant>,
    /// The last `WATCHDOG_USEC=` the broker set.
    pub watchdog_usec: Option<u64>,
    /// `EXTEND_TIMEOUT_USEC=` values with the `STATUS=` sent with them.
    pub extended: Vec<(u64, String)>,
    /// Protocol problems systemd would log: fds without `FDSTORE=1`, bad names, truncated
    /// control data, messages from a process other than the main one.
    pub errors: Vec<String>,
    /// Every message, in arrival order (for failure reports).
    pub log: Vec<String>,
    /// The broker's pid (notifications from others are errors, like `NotifyAccess=main`).
    main_pid: Option<i32>,
    /// The last sync marker processed.
    synced: u64,
}

type Shared = Arc<(Mutex<Notified>, Condvar)>;

/// Raises this process's open-file limit to at least `want` (as far as the hard limit
/// allows, or past it as root). Children inherit it: the broker and the fd store both need an
/// fd per memfd lease.
pub fn raise_fd_limit(want: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_none_or(|c| c >= want) {
        return;
    }
    let hard = now.maximum.map_or(want, |m| m.max(want));
    let raised = Rlimit {
        current: Some(want),
        maximum: Some(hard),
    };
    if setrlimit(Resource::Nofile, raised).is_err() {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            },
        );
    }
}

/// A broker run as a systemd `Type=notify` service with an fd store, in its own temporary
/// directory; killed on drop.
#[derive(Debug)]
pub struct Service {
    dir: tempfile::TempDir,
    exe: PathBuf,
    socket: PathBuf,
    notify: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    shared: Shared,
    receiver: Option<JoinHandle<()>>,
    sync_seq: u64,
    /// Start time of the last spawn (for start-up benchmarks).
    spawned_at: Option<Instant>,
    /// The socket unit's listening socket, when playing one.
    socket_unit: Option<OwnedFd>,
    /// `WATCHDOG_USEC` given to the broker.
    watchdog: Option<Duration>,
}

impl Service {
    /// Starts `membroker serve` with these extra arguments under the harness and waits for
    /// `READY=1`.
    pub fn start(args: &[&str]) -> Service {
        Service::start_with(&bin_path("membroker"), args)
    }

    /// As [`Service::start`], running the broker binary at `exe`.
    pub fn start_with(exe: &Path, args: &[&str]) -> Service {
        let mut service = Service::new(exe, args);
        service.restart();
        service
    }

    /// Sets everything up (temp dir, notify socket, receiver thread) without starting the
    /// broker: seed the fd store or the journal first, then call [`Service::restart`].
    pub fn new(exe: &Path, args: &[&str]) -> Service {
        raise_fd_limit(1 << 16);
        let dir = tempfile::Builder::new()
            .prefix("membroker-systemd")
            .tempdir()
            .expect("tempdir");
        let notify = dir.path().join("notify.sock");
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("notify socket");
        let addr = SocketAddrUnix::new(notify.as_path()).expect("notify socket path");
        rustix::net::bind(&sock, &addr).expect("bind the notify socket");
        rustix::net::sockopt::set_socket_passcred(&sock, true).expect("SO_PASSCRED");
        // Room for bursts (10 000 creates): the broker blocks when the queue is full anyway.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 4 << 20);
        let shared: Shared = Arc::new((Mutex::new(Notified::default()), Condvar::new()));
        let receiver = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("notify-socket".into())
                .spawn(move || receive(sock, shared))
                .expect("spawn the notify receiver")
        };
        Service {
            socket: dir.path().join("broker.sock"),
            exe: exe.to_path_buf(),
            notify,
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            shared,
            receiver: Some(receiver),
            sync_seq: 0,
            spawned_at: None,
            socket_unit: None,
            watchdog: None,
        }
    }

    /// Plays `membroker.socket`: binds and listens on the broker's socket now and passes it
    /// to every start, like systemd's socket unit. The socket file stays between starts.
    pub fn with_socket_unit(mut self) -> Service {
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = SocketAddrUnix::new(self.socket.as_path()).expect("socket path");
        rustix::net::bind(&sock, &addr).expect("bind the socket unit's socket");
        rustix::net::listen(&sock, 128).expect("listen");
        self.socket_unit = Some(sock);
        self
    }

    /// Turns systemd's watchdog on for every start (`WATCHDOG_USEC`).
    pub fn with_watchdog(mut self, timeout: Duration) -> Service {
        self.watchdog = Some(timeout);
        self
    }

    /// Runs another binary at the next start (the same launch, arguments and fds).
    pub fn set_exe(&mut self, exe: &Path) {
        self.exe = exe.to_path_buf();
    }

    /// Serves `path` at the next start (`--socket`); a socket unit stays where it is.
    pub fn set_socket(&mut self, path: &Path) {
        self.socket = path.to_path_buf();
    }

    /// Replaces the `serve` arguments for the next start (e.g. other pools).
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| s.to_string()).collect();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// The broker's state directory (journal), unless the arguments named another.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The broker's log so far (every start appends to it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The running broker's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    /// Whether a broker process is running (not reaped).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// When the last (re)start was spawned.
    pub fn spawned_at(&self) -> Option<Instant> {
        self.spawned_at
    }

    /// What the harness has seen so far (lock held while the guard lives).
    pub fn notified(&self) -> MutexGuard<'_, Notified> {
        self.shared.0.lock().expect("notify state")
    }

    /// Names in the fd store.
    pub fn store_names(&self) -> Vec<String> {
        self.notified().store.keys().cloned().collect()
    }

    /// (device, inode) of every fd in the store, by name.
    pub fn store_inodes(&self) -> BTreeMap<String, (u64, u64)> {
        self.notified()
            .store
            .iter()
            .map(|(name, fd)| (name.clone(), inode_of(fd)))
            .collect()
    }

    /// Puts an fd in the store as if the broker had sent it (to seed a start).
    pub fn store_insert(&self, name: &str, fd: OwnedFd) {
        self.notified().store.insert(name.to_string(), fd);
    }

    /// `READY=1` messages so far.
    pub fn ready_count(&self) -> u64 {
        self.notified().ready
    }

    /// Waits until every notification sent before this call has been processed (a marker
    /// datagram goes through the same queue).
    pub fn sync(&mut self) {
        self.sync_seq += 1;
        let seq = self.sync_seq;
        send_to(&self.notify, &format!("X-TEST-SYNC={seq}"));
        let (lock, cond) = &*self.shared;
        let guard = lock.lock().expect("notify state");
        let (_guard, timeout) = cond
            .wait_timeout_while(guard, Duration::from_secs(10), |n| n.synced < seq)
            .expect("notify state");
        assert!(
            !timeout.timed_out(),
            "the notify receiver did not catch up in 10 s"
        );
    }

    /// Spawns the broker with the fd store passed as `LISTEN_FDS` and returns at once.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "stop the broker first");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(LAUNCH)
            .arg(&self.exe)
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args);
        if !self.args.iter().any(|a| a == "--state-dir") {
            cmd.arg("--state-dir").arg(self.state_dir());
        }
        cmd.env("NOTIFY_SOCKET", &self.notify)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("MEMBROKER_HANDOVER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // The stored fds themselves are inherited (CLOEXEC cleared for the spawn only), in
        // ascending fd order: the i-th lowest is at least 3 + i, so moving them down to 3, 4, …
        // in that order never overwrites one not moved yet. (No duplicates: the store and the
        // broker each need an fd per lease already.)
        let shared = self.shared.clone();
        let mut notified = shared.0.lock().expect("notify state");
        // systemd passes a socket unit's fds first, named after the unit (or its
        // FileDescriptorName=); then the fd store's.
        let mut order: Vec<(i32, &str, &OwnedFd)> = self
            .socket_unit
            .iter()
            .map(|fd| (fd.as_raw_fd(), "membroker.socket", fd))
            .chain(
                notified
                    .store
                    .iter()
                    .map(|(name, fd)| (fd.as_raw_fd(), name.as_str(), fd)),
            )
            .collect();
        order.sort_by_key(|(raw, _, _)| *raw);
        for (_, _, fd) in &order {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).expect("clear CLOEXEC");
        }
        if !order.is_empty() {
            let numbers: Vec<String> = order.iter().map(|(raw, _, _)| raw.to_string()).collect();
            let names: Vec<&str> = order.iter().map(|(_, name, _)| *name).collect();
            cmd.env("MB_TEST_FDS", numbers.join(" "))
                .env("LISTEN_FDS", order.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        match self.watchdog {
            Some(timeout) => cmd.env("WATCHDOG_USEC", timeout.as_micros().to_string()),
            None => cmd.env_remove("WATCHDOG_USEC"),
        };
        self.spawned_at = Some(Instant::now());
        let spawned = cmd.spawn();
        for (_, _, fd) in &order {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).expect("set CLOEXEC");
        }
        let child = spawned.expect("spawn bash → membroker serve");
        drop(order);
        notified.main_pid = Some(child.id() as i32);
        drop(notified);
        self.child = Some(child);
    }

    /// Starts the broker (handing over the fd store) and waits for `READY=1`.
    pub fn restart(&mut self) {
        let before = self.ready_count();
        self.spawn();
        self.wait_ready(before);
    }

    /// Waits until more than `before` `READY=1` have arrived; fails if the broker exits.
    pub fn wait_ready(&mut self, before: u64) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            {
                let (lock, cond) = &*self.shared;
                let guard = lock.lock().expect("notify state");
                let (guard, _) = cond
                    .wait_timeout_while(guard, Duration::from_millis(5), |n| n.ready <= before)
                    .expect("notify state");
                if guard.ready > before {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                self.child = None;
                panic!(
                    "broker exited during start ({status}); log:\n{}",
                    self.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no READY=1 after {START_TIMEOUT:?}; log:\n{}",
                self.log_tail(40)
            );
        }
    }

    /// Runs the broker to its end without waiting for readiness: for starts that must fail.
    /// Returns the exit status and the log the attempt wrote.
    pub fn run_to_exit(&mut self) -> (std::process::ExitStatus, String) {
        let before = self.log().len();
        self.spawn();
        let mut child = self.child.take().expect("spawned");
        let deadline = Instant::now() + START_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("broker still running after {START_TIMEOUT:?}; it was expected to stop");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.sync();
        (status, self.log()[before..].to_string())
    }

    /// SIGKILL, reap, and process whatever it sent before dying.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.sync();
        }
    }

    /// SIGTERM; waits for the exit and returns its status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        crate::signal(child.id(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "broker ignored SIGTERM for 10 s; log:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.sync();
        status.code()
    }

    /// A new connection.
    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", self.log_tail(40)))
    }

    /// The `membroker` CLI against this broker.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(bin_path("membroker"));
        cmd.arg("--socket").arg(&self.socket);
        cmd
    }

    /// Runs the CLI with `args` and returns its output.
    pub fn run_cli(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().expect("run membroker CLI")
    }

    /// (device, inode) of every memfd the broker process has open.
    pub fn broker_memfds(&self) -> Vec<(u64, u64)> {
        memfds_of(self.pid())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        send_to(&self.notify, "X-TEST-QUIT=1");
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}

/// (device, inode) of an fd.
pub fn inode_of(fd: impl AsFd) -> (u64, u64) {
    let st = rustix::fs::fstat(fd).expect("fstat");
    (st.st_dev, st.st_ino)
}

/// (device, inode) of every memfd process `pid` has open (links `/memfd:…` in /proc/PID/fd).
pub fn memfds_of(pid: u32) -> Vec<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dir = format!("/proc/{pid}/fd");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
    {
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue; // closed meanwhile
        };
        if !link.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        if let Ok(meta) = std::fs::metadata(entry.path()) {
            out.push((meta.dev(), meta.ino()));
        }
    }
    out
}

/// Sends one datagram to the notify socket at `path` (the harness's own markers).
fn send_to(path: &Path, text: &str) {
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socket");
    let addr = SocketAddrUnix::new(path).expect("notify socket path");
    let mut control = SendAncillaryBuffer::default();
    let _ = rustix::net::sendmsg_addr(
        &sock,
        &addr,
        &[IoSlice::new(text.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}

/// A valid fd name for systemd: 1..=255 printable ASCII characters, no `:`.
fn valid_fd_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// The receiver thread: one datagram at a time, fds taken with `MSG_CMSG_CLOEXEC`.
fn receive(sock: OwnedFd, shared: Shared) {
    let mut buf = vec![0u8; 4096];
    let mut space = vec![
        MaybeUninit::<u8>::uninit();
        rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE), ScmCredentials(1))
    ];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(
            &sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                let (lock, cond) = &*shared;
                lock.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .errors
                    .push(format!("recvmsg on the notify socket failed: {e}"));
                cond.notify_all();
                return;
            }
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut sender = None;
        for message in control.drain() {
            match message {
                RecvAncillaryMessage::ScmRights(rights) => fds.extend(rights),
                RecvAncillaryMessage::ScmCredentials(cred) => {
                    sender = Some(cred.pid.as_raw_nonzero().get())
                }
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&buf[..msg.bytes.min(buf.len())]).into_owned();
        let (lock, cond) = &*shared;
        let mut n = lock.lock().unwrap_or_else(|e| e.into_inner());
        if msg.flags.contains(ReturnFlags::CTRUNC) || msg.flags.contains(ReturnFlags::TRUNC) {
            n.errors.push(format!("truncated notification: {text:?}"));
        }
        let quit = handle(&mut n, &text, fds, sender);
        drop(n);
        cond.notify_all();
        if quit {
            return;
        }
    }
}

/// Applies one notification, the way systemd does. Returns true on the harness's quit marker.
fn handle(n: &mut Notified, text: &str, mut fds: Vec<OwnedFd>, sender: Option<i32>) -> bool {
    let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    if let Some(seq) = fields.get("X-TEST-SYNC") {
        n.synced = seq.parse().unwrap_or(n.synced);
        return false;
    }
    if fields.contains_key("X-TEST-QUIT") {
        return true;
    }
    n.log.push(text.replace('\n', " "));
    if sender.is_some() && sender != n.main_pid {
        n.errors.push(format!(
            "notification from pid {sender:?}, not the main pid {:?}: {text:?}",
            n.main_pid
        ));
    }
    if fields.get("READY") == Some(&"1") {
        n.ready += 1;
    }
    if let Some(status) = fields.get("STATUS") {
        n.status = Some(status.to_string());
    }
    if fields.get("STOPPING") == Some(&"1") {
        n.stopping += 1;
    }
    if fields.get("WATCHDOG") == Some(&"1") {
        n.watchdog.push(Instant::now());
    }
    if let Some(usec) = fields.get("WATCHDOG_USEC") {
        match usec.parse() {
            Ok(usec) => n.watchdog_usec = Some(usec),
            Err(_) => n.errors.push(format!("bad WATCHDOG_USEC={usec}")),
        }
    }
    if let Some(usec) = fields.get("EXTEND_TIMEOUT_USEC") {
        match usec.parse() {
            Ok(usec) => {
                let status = fields.get("STATUS").copied().unwrap_or("").to_string();
                n.extended.push((usec, status));
            }
            Err(_) => n.errors.push(format!("bad EXTEND_TIMEOUT_USEC={usec}")),
        }
    }
    let name = fields.get("FDNAME").copied();
    if let Some(name) = name.filter(|name| !valid_fd_name(name)) {
        n.errors.push(format!("invalid FDNAME {name:?}"));
    }
    if fields.get("FDSTORE") == Some(&"1") {
        n.stored += 1;
        match (name, fds.len()) {
            (Some(name), 1) => {
                let fd = fds.pop().expect("one fd");
                n.store.insert(name.to_string(), fd);
            }
            (name, count) => n.errors.push(format!(
                "FDSTORE=1 with {count} fds and name {name:?}; expected exactly one named fd"
            )),
        }
    } else if !fds.is_empty() {
        n.errors.push(format!(
            "{} fds attached to a message without FDSTORE=1: {text:?}",
            fds.len()
        ));
    }
    if fields.get("FDSTOREREMOVE") == Some(&"1") {
        n.removed += 1;
        match name {
            Some(name) => {
                if n.store.remove(name).is_none() {
                    n.removed_unknown.push(name.to_string());
                }
            }
            None => n.errors.push("FDSTOREREMOVE=1 without FDNAME=".to_string()),
        }
    }
    false
}
