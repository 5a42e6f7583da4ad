//! The namespace's directories, owners and modes: `mkdir`, `chmod`, `chown`, listing
//! directories.

use crate::client::{Client, unexpected};
use crate::error::Result;
use crate::proto::{DirInfo, Mkdir, Request, Response};

impl Client {
    /// Makes a directory of the lease namespace.
    pub fn mkdir(&mut self, req: Mkdir) -> Result<()> {
        self.ok_call(&Request::Mkdir(req))
    }

    /// Changes the permission bits of a lease (`0o777`) or a directory (`0o1777`).
    pub fn chmod(&mut self, name: &str, mode: u32) -> Result<()> {
        self.ok_call(&Request::Chmod {
            name: name.into(),
            mode,
        })
    }

    /// Changes the owner and/or group of a lease or a directory.
    pub fn chown(&mut self, name: &str, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        self.ok_call(&Request::Chown {
            name: name.into(),
            uid,
            gid,
        })
    }

    /// Describes every directory under `prefix` (`""` for all) this client may read, in path
    /// order.
    pub fn dirs(&mut self, prefix: &str) -> Result<Vec<DirInfo>> {
        self.all_pages(
            |after| Request::Dirs {
                prefix: prefix.into(),
                after,
            },
            |resp| match resp {
                Response::Dirs { dirs, more } => Ok((dirs, more)),
                other => Err(unexpected(&other)),
            },
            |d| d.path.clone(),
        )
    }
}
