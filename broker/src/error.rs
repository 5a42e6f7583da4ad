//! Error plumbing shared by every layer: the one-line cause chain for logs and replies, and
//! the mapping of an error to its wire [`ErrorCode`].
//!
//! This module sits at the bottom of the crate: it imports nothing from it, so the journal,
//! the namespace and the pools can use it without reaching up into the server.

use membroker_client::proto::ErrorCode;

/// `error: cause: cause` on one line (the client library's, so that every crate words a
/// cause chain alike).
pub use membroker_client::error_chain;

/// An error a client can be told about: its [`ErrorCode`] is decided next to the error's own
/// definition, and the message is its whole [`error_chain`].
pub trait WireError: std::error::Error {
    /// The code a client sees for this error.
    fn code(&self) -> ErrorCode;
}
