//! The admin's listings: quotas and quarantined memory, fetched page by page, and clearing
//! quarantine.

use crate::client::{Client, unexpected};
use crate::codec::PAGED_ADMIN_VERSION;
use crate::error::Result;
use crate::proto::{
    ErrorCode, QuarantineAfter, QuarantineInfo, QuotaInfo, Request, Response, extend_quarantine,
};

impl Client {
    /// The quotas that limit this client's uid and group (an admin: every quota), in
    /// `(scope, id)` order: uids by uid, then groups by gid, then the default rule. Asked page
    /// by page; a broker from before the paged listings is asked for all in one reply (it
    /// closes the connection on the paged request, so that needs the client to reconnect,
    /// which it does unless [`Client::set_reconnect_timeout`] made it zero).
    pub fn quota(&mut self) -> Result<Vec<QuotaInfo>> {
        if self.version() < PAGED_ADMIN_VERSION {
            return self.quota_in_one_reply();
        }
        let paged = self.all_pages(
            |after| Request::QuotaPage { after },
            |resp| match resp {
                Response::QuotaPage { quotas, more } => Ok((quotas, more)),
                other => Err(unexpected(&other)),
            },
            |q| (q.scope.clone(), q.id),
        );
        match paged {
            Err(e) if e.code() == Some(ErrorCode::Protocol) => self.quota_in_one_reply(),
            paged => paged,
        }
    }

    fn quota_in_one_reply(&mut self) -> Result<Vec<QuotaInfo>> {
        match self.call(&Request::Quota)? {
            (Response::Quota(quotas), _) => Ok(quotas),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Quarantined memory per pool, and the leases with reported poison (in name order). Asked
    /// page by page, like [`Client::quota`] (and from an older broker in one reply, alike).
    pub fn quarantine(&mut self) -> Result<Vec<QuarantineInfo>> {
        if self.version() < PAGED_ADMIN_VERSION {
            return self.quarantine_in_one_reply();
        }
        let mut all: Vec<QuarantineInfo> = Vec::new();
        loop {
            let after = all.last().map(QuarantineAfter::after);
            let (pools, more) = match self.call(&Request::QuarantinePage { after }) {
                Ok((Response::QuarantinePage { pools, more }, _)) => (pools, more),
                Ok((other, _)) => return Err(unexpected(&other)),
                Err(e) if all.is_empty() && e.code() == Some(ErrorCode::Protocol) => {
                    return self.quarantine_in_one_reply();
                }
                Err(e) => return Err(e),
            };
            if more && pools.is_empty() {
                return Err(crate::Error::Protocol(
                    "empty page with more to come".into(),
                ));
            }
            extend_quarantine(&mut all, pools);
            if !more {
                return Ok(all);
            }
        }
    }

    fn quarantine_in_one_reply(&mut self) -> Result<Vec<QuarantineInfo>> {
        match self.call(&Request::Quarantine)? {
            (Response::Quarantine(pools), _) => Ok(pools),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Returns a quarantined physical range of a device-dax pool to its free memory (root or
    /// the admin group).
    pub fn clear_quarantine(&mut self, pool: &str, start: u64, len: u64) -> Result<()> {
        self.ok_call(&Request::ClearQuarantine {
            pool: pool.into(),
            start,
            len,
        })
    }
}
