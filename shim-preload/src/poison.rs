//! Memory-error reports built inside a signal handler.
//!
//! A `ReportPoison { name, offset, len }` request is encoded with the real codec when a block
//! is redirected, with offset and length 0, and the two trailing zero varints are cut off: that
//! *prefix* is stored in the block table. In the SIGBUS handler the offset and length are
//! appended as bincode varints and the header's length field is patched: no allocation, no
//! locks, only stack buffers.

use membroker_client::codec::{self, HEADER_LEN};
use membroker_client::proto::{PROTOCOL_MIN, Request};

use crate::table::MSG_MAX;

/// Largest encoded report: prefix plus two varints of at most 9 bytes.
pub const REPORT_MAX: usize = MSG_MAX + 18;

/// Encodes the prefix of a report about lease `name`.
pub fn prefix(name: &str) -> Result<Vec<u8>, codec::CodecError> {
    let req = Request::ReportPoison {
        name: name.to_string(),
        offset: 0,
        len: 0,
    };
    let mut msg = codec::encode_request(PROTOCOL_MIN, &req)?;
    // bincode encodes 0 as the single byte 0; the two varints are the last two bytes.
    debug_assert_eq!(&msg[msg.len() - 2..], &[0, 0]);
    msg.truncate(msg.len() - 2);
    Ok(msg)
}

/// Appends `value` as a bincode 2 varint (little-endian) at `out[at..]`; returns the new end.
fn put_varint(out: &mut [u8], at: usize, value: u64) -> Option<usize> {
    let bytes: &[u8] = &match value {
        0..=250 => [value as u8, 0, 0, 0, 0, 0, 0, 0, 0],
        251..=0xffff => {
            let v = (value as u16).to_le_bytes();
            [251, v[0], v[1], 0, 0, 0, 0, 0, 0]
        }
        0x1_0000..=0xffff_ffff => {
            let v = (value as u32).to_le_bytes();
            [252, v[0], v[1], v[2], v[3], 0, 0, 0, 0]
        }
        _ => {
            let v = value.to_le_bytes();
            [253, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]
        }
    };
    let n = match value {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    };
    let dst = out.get_mut(at..at + n)?;
    dst.copy_from_slice(&bytes[..n]);
    Some(at + n)
}

/// Completes a report whose prefix (`prefix_len` bytes) is already in `buf`; returns the
/// message length. Async-signal-safe.
pub fn finish(buf: &mut [u8], prefix_len: usize, offset: u64, len: u64) -> Option<usize> {
    if prefix_len < HEADER_LEN {
        return None;
    }
    let end = put_varint(buf, prefix_len, offset)?;
    let end = put_varint(buf, end, len)?;
    let payload = u32::try_from(end - HEADER_LEN).ok()?;
    buf.get_mut(8..12)?.copy_from_slice(&payload.to_le_bytes());
    Some(end)
}

/// The page-aligned range a memory error at `addr` covers within a block starting at
/// `start` of `block_len` bytes: `si_addr_lsb` gives the size (2^lsb), 4 KiB when absent.
pub fn error_range(start: usize, block_len: usize, addr: usize, lsb: i16) -> (u64, u64) {
    let size: usize = if (12..=30).contains(&lsb) {
        1 << lsb
    } else {
        4096
    };
    let offset = (addr - start) & !(size - 1);
    let len = size.min(block_len - offset);
    (offset as u64, len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_report_matches_the_codec() {
        for (offset, len) in [
            (0u64, 0u64),
            (250, 251),
            (0x20000, 4096),
            (0xffff_ffff, 1 << 21),
            (1 << 40, 1 << 30),
            (u64::MAX, 1),
        ] {
            let name = "tenant/vm1/ram0";
            let p = prefix(name).unwrap();
            let mut buf = [0u8; REPORT_MAX];
            buf[..p.len()].copy_from_slice(&p);
            let n = finish(&mut buf, p.len(), offset, len).unwrap();
            let want = codec::encode_request(
                PROTOCOL_MIN,
                &Request::ReportPoison {
                    name: name.into(),
                    offset,
                    len,
                },
            )
            .unwrap();
            assert_eq!(&buf[..n], &want[..], "offset {offset} len {len}");
            let (_, req) = codec::decode_request(&buf[..n]).unwrap();
            assert_eq!(
                req,
                Request::ReportPoison {
                    name: name.into(),
                    offset,
                    len
                }
            );
        }
    }

    #[test]
    fn finish_refuses_small_buffers() {
        let p = prefix("x").unwrap();
        let mut buf = vec![0u8; p.len() + 1];
        buf[..p.len()].copy_from_slice(&p);
        assert!(finish(&mut buf, p.len(), 1 << 40, 1).is_none());
        assert!(finish(&mut buf, 3, 0, 0).is_none());
    }

    #[test]
    fn error_ranges() {
        assert_eq!(
            error_range(0x1000_0000, 1 << 30, 0x1002_0123, 12),
            (0x20000, 4096)
        );
        assert_eq!(
            error_range(0x1000_0000, 1 << 30, 0x1002_0123, 0),
            (0x20000, 4096)
        );
        assert_eq!(
            error_range(0x1000_0000, 1 << 30, 0x1032_0123, 21),
            (0x20_0000, 2 << 20)
        );
        assert_eq!(error_range(0, 0x3000, 0x2fff, 21), (0, 0x3000));
    }
}
