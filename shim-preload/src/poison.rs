//! Memory-error reports built inside a signal handler.
//!
//! The block table keeps each redirected block's lease name; in the SIGBUS handler the
//! report is encoded into a stack buffer by the client's allocation-free
//! [`codec::encode_report_poison_into`], so the wire format stays in `membroker-client`.

use membroker_client::codec;

use crate::table::NAME_MAX;

/// Largest encoded report: one about a lease name of [`NAME_MAX`] bytes.
pub const REPORT_MAX: usize = codec::report_poison_max_len(NAME_MAX);

/// Encodes a report that `[offset, offset + len)` of lease `name` has a memory error into
/// `buf`, at the protocol `version` the connection agreed on; returns the message length.
/// Async-signal-safe: no allocation, no panic.
pub fn encode(
    buf: &mut [u8; REPORT_MAX],
    version: u16,
    name: &str,
    offset: u64,
    len: u64,
) -> Option<usize> {
    codec::encode_report_poison_into(buf, version, name, offset, len).ok()
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
    use membroker_client::proto::Request;

    #[test]
    fn a_report_about_the_longest_name_fits() {
        let name = "n".repeat(NAME_MAX);
        let mut buf = [0u8; REPORT_MAX];
        let n = encode(&mut buf, 2, &name, u64::MAX, u64::MAX).unwrap();
        let (_, req) = codec::decode_request(&buf[..n]).unwrap();
        assert_eq!(
            req,
            Request::ReportPoison {
                name,
                offset: u64::MAX,
                len: u64::MAX
            }
        );
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
