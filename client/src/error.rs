//! Errors of the client library.

use std::path::PathBuf;

use rustix::io::Errno;

use crate::codec::CodecError;
use crate::proto::ErrorCode;
use crate::transport::TransportError;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
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
    #[error("lease {name}: {problem}")]
    Lease { name: String, problem: String },
    #[error("lease {name}: {op} failed")]
    Sys {
        name: String,
        op: &'static str,
        #[source]
        source: Errno,
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
}

/// Result alias of the client library.
pub type Result<T> = std::result::Result<T, Error>;
