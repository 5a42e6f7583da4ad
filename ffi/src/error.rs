//! Failures as C sees them: a `-1` or `NULL` return, `errno`, and a message per thread.

use std::cell::{Cell, RefCell};
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use membroker_client::ErrorCode;
use membroker_client::transport::TransportError;
use rustix::io::Errno;

/// Why a call into the library failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The caller passed something unusable (NULL, not UTF-8, an unknown page size).
    #[error("{0}")]
    Argument(String),
    #[error(transparent)]
    Client(#[from] membroker_client::Error),
    /// An answer of the broker does not fit the caller's fixed-size buffer.
    #[error("{0}")]
    TooLong(String),
    /// A bug in this library, caught before it could unwind into C.
    #[error("internal error in libmembroker_ffi (please report): {0}")]
    Panic(String),
}

/// Result alias of the C ABI layer.
pub(crate) type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The `errno` a C caller sees for this failure.
    pub(crate) fn errno(&self) -> Errno {
        use membroker_client::Error as E;
        match self {
            Error::Argument(_) => Errno::INVAL,
            Error::TooLong(_) => Errno::RANGE,
            Error::Panic(_) => Errno::IO,
            Error::Client(err) => match err {
                E::Connect { source, .. } | E::Sys { source, .. } => *source,
                E::Transport(TransportError::Io(errno)) => *errno,
                E::Transport(TransportError::Closed) => Errno::CONNRESET,
                E::Transport(_) | E::Codec(_) | E::Protocol(_) | E::Lease { .. } => Errno::PROTO,
                E::Unavailable { .. } | E::Timeout { .. } => Errno::TIMEDOUT,
                E::Broker { code, .. } => broker_errno(*code),
                _ => Errno::IO,
            },
        }
    }

    /// The message with its causes, `outer: inner: …`.
    fn message(&self) -> String {
        match self {
            // `Client` is transparent: the client error carries the whole chain.
            Error::Client(err) => membroker_client::error_chain(err),
            _ => membroker_client::error_chain(self),
        }
    }
}

/// The errno closest to a broker refusal.
fn broker_errno(code: ErrorCode) -> Errno {
    match code {
        ErrorCode::NotFound => Errno::NOENT,
        ErrorCode::Exists => Errno::EXIST,
        ErrorCode::PermissionDenied => Errno::ACCESS,
        ErrorCode::InvalidArgument => Errno::INVAL,
        ErrorCode::NoSpace => Errno::NOSPC,
        ErrorCode::OutOfMemory => Errno::NOMEM,
        ErrorCode::Protocol => Errno::PROTO,
        ErrorCode::Version => Errno::PROTONOSUPPORT,
        ErrorCode::Internal => Errno::IO,
    }
}

thread_local! {
    static LAST_MESSAGE: RefCell<Option<CString>> = const { RefCell::new(None) };
    static LAST_ERRNO: Cell<i32> = const { Cell::new(0) };
}

/// Remembers `err` as this thread's last error and sets `errno`.
fn record(err: &Error) {
    let errno = err.errno().raw_os_error();
    let message = CString::new(err.message().replace('\0', "\\0")).unwrap_or_default();
    // During thread exit the slots may be gone; errno is then all the caller gets.
    let _ = LAST_MESSAGE.try_with(|last| *last.borrow_mut() = Some(message));
    let _ = LAST_ERRNO.try_with(|last| last.set(errno));
    errno::set_errno(errno::Errno(errno));
}

/// This thread's last error message, or NULL before the first failure. The string stays
/// valid until the next failing call on this thread.
pub(crate) fn last_message() -> *const c_char {
    LAST_MESSAGE
        .try_with(|last| {
            last.borrow()
                .as_ref()
                .map_or(std::ptr::null(), |m| m.as_ptr())
        })
        .unwrap_or(std::ptr::null())
}

/// This thread's last errno from this library, 0 before the first failure.
pub(crate) fn last_errno() -> i32 {
    LAST_ERRNO.try_with(Cell::get).unwrap_or(0)
}

/// Runs the body of an exported function: its value on success; on failure (or a panic, which
/// must not unwind into C) records the error and returns `failed`.
pub(crate) fn guard<T>(failed: T, body: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => value,
        Ok(Err(err)) => {
            record(&err);
            failed
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            record(&Error::Panic(what));
            failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's last message, read without the C pointer.
    fn last_text() -> String {
        LAST_MESSAGE.with(|last| {
            let last = last.borrow();
            last.as_ref()
                .expect("a message")
                .to_str()
                .unwrap()
                .to_owned()
        })
    }

    #[test]
    fn failures_set_errno_and_the_message() {
        let got = guard(-1, || Err(Error::Argument("name is NULL".into())));
        assert_eq!(got, -1);
        assert_eq!(last_errno(), Errno::INVAL.raw_os_error());
        assert_eq!(errno::errno().0, Errno::INVAL.raw_os_error());
        assert!(!last_message().is_null());
        assert_eq!(last_text(), "name is NULL");
    }

    #[test]
    fn a_panic_becomes_an_error() {
        let got: i32 = guard(-1, || panic!("boom"));
        assert_eq!(got, -1);
        assert_eq!(last_errno(), Errno::IO.raw_os_error());
        let msg = last_text();
        assert!(msg.ends_with(": boom"), "{msg:?}");
    }

    #[test]
    fn causes_are_chained() {
        let err = Error::Client(membroker_client::Error::Connect {
            path: "/nowhere/broker.sock".into(),
            source: Errno::NOENT,
        });
        assert_eq!(err.errno(), Errno::NOENT);
        let msg = err.message();
        assert!(
            msg.starts_with("cannot connect to the broker at /nowhere/broker.sock: "),
            "{msg}"
        );
        assert!(msg.contains("No such file"), "{msg}");
    }
}
