//! What a `membroker *` points to: one client connection, behind a lock so that C threads may
//! share the handle, and the lost leases not yet handed to C.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use membroker_client::{Client, LostLease};

use crate::error::Result;

/// One connection to the broker (`membroker` in C).
#[derive(Debug)]
pub struct Membroker {
    inner: Mutex<Connection>,
}

#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) client: Client,
    lost: VecDeque<LostLease>,
}

impl Membroker {
    /// Connects to `path`, or to the client's default socket.
    pub(crate) fn connect(path: Option<&Path>) -> Result<Membroker> {
        let client = match path {
            Some(path) => Client::connect(path)?,
            None => Client::connect_default()?,
        };
        Ok(Membroker {
            inner: Mutex::new(Connection {
                client,
                lost: VecDeque::new(),
            }),
        })
    }

    /// The connection, for one call. A panic caught in an earlier call poisons the lock; the
    /// client stays usable (its state is updated only after a reply), so go on.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Connection {
    /// The oldest lost lease not yet handed out.
    pub(crate) fn next_lost(&mut self) -> Option<LostLease> {
        let newly = self.client.take_lost_leases();
        self.lost.extend(newly);
        self.lost.pop_front()
    }
}
