//! A connection to the broker.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::codec::{self, MAX_MSG_SIZE};
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::proto::{
    CreateLease, LeaseInfo, PROTOCOL_MAX, PROTOCOL_MIN, PoolInfo, Request, Response,
};
use crate::transport;

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

/// One connection to the broker. Leases received on it are held until released or until
/// the connection closes (non-persistent leases then go back to the pool).
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    version: u16,
    server: String,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to the socket at `path` and negotiates the protocol version.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref();
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
        rustix::net::connect(&sock, &addr).map_err(connect_err)?;
        let mut client = Client {
            sock,
            version: PROTOCOL_MIN,
            server: String::new(),
            buf: vec![0; MAX_MSG_SIZE + 1],
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
            client: format!("membroker-client {}", env!("CARGO_PKG_VERSION")),
        };
        match client.call(&hello)? {
            (Response::Hello { version, server }, _)
                if (PROTOCOL_MIN..=PROTOCOL_MAX).contains(&version) =>
            {
                client.version = version;
                client.server = server;
                Ok(client)
            }
            (other, _) => Err(unexpected(&other)),
        }
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

    /// Sends one request and waits for its reply and fds.
    pub fn call(&mut self, req: &Request) -> Result<(Response, Vec<OwnedFd>)> {
        let msg = codec::encode_request(self.version, req)?;
        transport::send(self.sock.as_fd(), &msg, &[])?;
        let received = transport::recv(&self.sock, &mut self.buf)?;
        let (_, resp) = codec::decode_response(&self.buf[..received.len])?;
        if received.fds.len() != resp.fd_count() {
            return Err(Error::Protocol(format!(
                "reply carries {} fds, expected {}",
                received.fds.len(),
                resp.fd_count()
            )));
        }
        if let Response::Error { code, message } = resp {
            return Err(Error::Broker { code, message });
        }
        Ok((resp, received.fds))
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

    fn ok_call(&mut self, req: &Request) -> Result<()> {
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

    /// Describes every visible lease under `prefix` (`""` for all), in name order.
    pub fn list(&mut self, prefix: &str) -> Result<Vec<LeaseInfo>> {
        let mut all: Vec<LeaseInfo> = Vec::new();
        loop {
            let after = all.last().map(|l| l.name.clone());
            match self.call(&Request::List {
                prefix: prefix.into(),
                after,
            })? {
                (Response::List { leases, more }, _) => {
                    if more && leases.is_empty() {
                        return Err(Error::Protocol("empty list page with more to come".into()));
                    }
                    all.extend(leases);
                    if !more {
                        return Ok(all);
                    }
                }
                (other, _) => return Err(unexpected(&other)),
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

fn unexpected(resp: &Response) -> Error {
    Error::Protocol(format!("unexpected reply kind {:#06x}", resp.kind()))
}
