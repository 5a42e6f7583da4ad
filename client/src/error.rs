//! Errors of the client library.

use std::path::PathBuf;
use std::time::Duration;

use rustix::io::Errno;

use crate::codec::CodecError;
use crate::proto::ErrorCode;
use crate::transport::TransportError;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot connect to the broker at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("talking to the broker")]
    Transport(#[from] TransportError),
    #[error("bad message from the broker")]
    Codec(#[from] CodecError),
    /// The broker refused the request; `message` says why, for a person.
    #[error("{message}")]
    Broker { code: ErrorCode, message: String },
    #[error("broker broke the protocol: {0}")]
    Protocol(String),
    /// The connection to the broker broke and no broker answered at `path` again within the
    /// client's reconnect timeout; `last` is what the last attempt ran into.
    #[error(
        "the broker at {} has been unreachable for {:.1} s (gave up reconnecting)",
        path.display(),
        waited.as_secs_f64()
    )]
    Unavailable {
        path: PathBuf,
        waited: Duration,
        #[source]
        last: Option<Box<Error>>,
    },
    /// The broker accepted the connection or the request but did not answer within the
    /// client's deadline ([`Options::timeout`](crate::Options)): it is stopped, wedged or
    /// overloaded. The request may still be carried out. The connection is kept (it holds
    /// the client's leases); the next call reads and drops the late answer first.
    #[error(
        "broker at {} did not answer within {} s",
        path.display(),
        timeout.as_secs_f64()
    )]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("lease {name}: {problem}")]
    Lease { name: String, problem: String },
    #[error("lease {name}: {op} failed")]
    Sys {
        name: String,
        op: &'static str,
        #[source]
        source: Errno,
    },
    /// Mapping the lease as a rust-vmm guest memory region failed.
    #[cfg(feature = "vm-memory")]
    #[error("lease {name}: cannot map it as guest memory")]
    GuestMemory {
        name: String,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

impl Error {
    /// The broker's error code, if the broker refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the error means the connection to the broker is gone (the broker closed it,
    /// exited or restarted), so that a new connection may succeed.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            Error::Transport(
                TransportError::Closed
                    | TransportError::Io(
                        Errno::NOTCONN | Errno::CONNRESET | Errno::PIPE | Errno::CONNREFUSED
                    )
            )
        )
    }
}

/// An error and its causes on one line, `error: cause: cause`, for messages people read.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Result alias of the client library.
pub type Result<T> = std::result::Result<T, Error>;
