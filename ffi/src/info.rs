//! The fixed-size structs the library fills for C, and how broker answers fit into them.

use std::ffi::c_char;

use membroker_client::{LeaseInfo, LeaseState, LostLease, proto::PoisonInfo};

use crate::error::{Error, Result};

/// Size of a buffer that holds any lease name and its NUL (names are 1-255 bytes).
pub const MEMBROKER_NAME_SIZE: usize = 256;
/// Size of a buffer that holds any pool name and its NUL (pool names are 1-64 bytes).
pub const MEMBROKER_POOL_NAME_SIZE: usize = 65;
/// Size of the buffer for a device-dax device name (`dax0.3`) and its NUL.
pub const MEMBROKER_DEVICE_NAME_SIZE: usize = 64;
/// Size of the buffer for the reason a lease was lost (longer reasons are cut).
pub const MEMBROKER_REASON_SIZE: usize = 256;

/// `state` of a lease with at least one holder.
pub const MEMBROKER_STATE_HELD: u32 = 1;
/// `state` of a persistent lease that nobody holds now.
pub const MEMBROKER_STATE_IDLE: u32 = 2;
/// `state` of a removed lease whose memory returns to the pool when the last holder goes.
pub const MEMBROKER_STATE_REMOVED: u32 = 3;

/// What the broker says about a lease (`membroker_create_ex`, `membroker_open_ex`,
/// `membroker_stat`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CLeaseInfo {
    /// Size in bytes.
    pub size: u64,
    /// Page size in bytes: 4096, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Permission bits, like a file's.
    pub mode: u32,
    /// Owner's uid.
    pub uid: u32,
    /// Owner's gid.
    pub gid: u32,
    /// One of `MEMBROKER_STATE_*`.
    pub state: u32,
    /// How many connections hold the lease.
    pub holders: u32,
    /// How many poisoned ranges were reported (`membroker_poison_ranges` lists them).
    pub poison_ranges: u32,
    /// Whether the lease outlives its holders.
    pub persistent: bool,
    /// Whether the fd that came with it allows writable mappings (false from `membroker_stat`).
    pub writable: bool,
    /// The pool it came from, NUL-terminated.
    pub pool: [c_char; MEMBROKER_POOL_NAME_SIZE],
    /// The device-dax device behind it (`dax0.3`), NUL-terminated; empty for memfd leases.
    pub device: [c_char; MEMBROKER_DEVICE_NAME_SIZE],
}

/// A byte range of a lease: `[offset, offset + len)`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CRange {
    pub offset: u64,
    pub len: u64,
}

/// A lease this connection held but could not re-attach to after the broker restarted. Its fd
/// and mappings stay valid, but the broker no longer counts this connection as a holder.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CLostLease {
    /// The lease name, NUL-terminated.
    pub name: [c_char; MEMBROKER_NAME_SIZE],
    /// Whether it was held writable.
    pub writable: bool,
    /// Why, as an errno: `ENOENT` when the lease was removed meanwhile.
    pub error: i32,
    /// Why, for a person, NUL-terminated (cut at `MEMBROKER_REASON_SIZE - 1` bytes).
    pub reason: [c_char; MEMBROKER_REASON_SIZE],
}

/// Copies `text` and a NUL into `dst`, zeroing the rest; with `cut`, a text too long is cut at
/// a character boundary, else it fails with `None`.
fn c_string<const N: usize>(text: &str, cut: bool) -> Option<[c_char; N]> {
    let mut len = text.len();
    if len >= N {
        if !cut {
            return None;
        }
        len = N - 1;
        while !text.is_char_boundary(len) {
            len -= 1;
        }
    }
    let mut dst = [0 as c_char; N];
    for (d, &s) in dst.iter_mut().zip(&text.as_bytes()[..len]) {
        *d = s as c_char;
    }
    Some(dst)
}

fn too_long(lease: &str, what: &str, value: &str) -> Error {
    Error::TooLong(format!(
        "lease {lease}: {what} {value:?} does not fit the C struct"
    ))
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl CLeaseInfo {
    pub(crate) fn new(info: &LeaseInfo) -> Result<CLeaseInfo> {
        let device = info.device.as_deref().unwrap_or("");
        Ok(CLeaseInfo {
            size: info.size,
            page_size: info.page_size.bytes(),
            created: info.created,
            mode: info.mode,
            uid: info.uid,
            gid: info.gid,
            state: match info.state {
                LeaseState::Held => MEMBROKER_STATE_HELD,
                LeaseState::Idle => MEMBROKER_STATE_IDLE,
                LeaseState::Removed => MEMBROKER_STATE_REMOVED,
            },
            holders: count(info.holders.len()),
            poison_ranges: count(info.poison.len()),
            persistent: info.persistent,
            writable: info.writable,
            pool: c_string(&info.pool, false)
                .ok_or_else(|| too_long(&info.name, "pool name", &info.pool))?,
            device: c_string(device, false)
                .ok_or_else(|| too_long(&info.name, "device name", device))?,
        })
    }
}

impl From<&PoisonInfo> for CRange {
    fn from(poison: &PoisonInfo) -> CRange {
        CRange {
            offset: poison.offset,
            len: poison.len,
        }
    }
}

impl CLostLease {
    pub(crate) fn new(lost: &LostLease) -> Result<CLostLease> {
        let code = Error::from(membroker_client::Error::Broker {
            code: lost.code,
            message: String::new(),
        });
        Ok(CLostLease {
            name: c_string(&lost.name, false)
                .ok_or_else(|| too_long(&lost.name, "name", &lost.name))?,
            writable: lost.writable,
            error: code.errno().raw_os_error(),
            reason: c_string(&lost.reason, true).unwrap_or([0; MEMBROKER_REASON_SIZE]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text<const N: usize>(buf: &[c_char; N]) -> String {
        let bytes: Vec<u8> = buf
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn strings_fit_with_their_nul_or_fail() {
        let fits: [c_char; 4] = c_string("abc", false).unwrap();
        assert_eq!(text(&fits), "abc");
        assert_eq!(fits[3], 0);
        assert!(c_string::<3>("abc", false).is_none(), "no room for the NUL");
    }

    #[test]
    fn cut_strings_end_on_a_character() {
        // "é" is two bytes: cutting "aé" to 2 bytes keeps only "a".
        let cut: [c_char; 3] = c_string("aéb", true).unwrap();
        assert_eq!(text(&cut), "a");
        assert_eq!(cut[2], 0);
    }
}
