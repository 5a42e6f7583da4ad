//! Wire format: a fixed 16-byte header, then a bincode 2 payload.
//!
//! ```text
//! 0      4        6     8        12         16
//! | magic | version | kind | length | reserved | payload (length bytes) |
//! ```
//! All integers little-endian. `kind` is never 0, `reserved` must be 0, and the whole message
//! is at most [`MAX_MSG_SIZE`] bytes. bincode is pinned (`=2.0.1`, unmaintained upstream) and
//! used only here, so swapping the payload encoding touches this module alone.

use crate::proto::{
    BindLabel, CreateLease, PROTOCOL_MAX, PROTOCOL_MIN, PageSize, PoolInfo, PoolKind, Request,
    Response,
};

/// `MBRK` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MBRK");
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 16;
/// Hard limit on a whole message (header + payload).
pub const MAX_MSG_SIZE: usize = 64 << 10;
/// Largest payload.
pub const MAX_PAYLOAD: usize = MAX_MSG_SIZE - HEADER_LEN;

/// What decoding one message may allocate. bincode counts decoded (in-memory) sizes, which
/// run a few times larger than the wire bytes (a `LeaseInfo` is ~3×): 16× the largest payload
/// still stops a small message from claiming a huge allocation (e.g. a 2^60-byte string).
pub const MAX_DECODED: usize = 16 * MAX_PAYLOAD;

const CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DECODED>,
> = bincode::config::standard().with_limit::<MAX_DECODED>();

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated(usize),
    #[error("bad magic {0:#010x}: not a membroker peer")]
    BadMagic(u32),
    #[error("protocol version {0} is not spoken here ({PROTOCOL_MIN}..={PROTOCOL_MAX})")]
    Version(u16),
    #[error("reserved header field is {0:#x}, must be 0")]
    Reserved(u32),
    #[error("header says {header} payload bytes, message has {actual}")]
    Length { header: usize, actual: usize },
    #[error("message of {0} bytes exceeds the {MAX_MSG_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("message kind {0:#06x} is unknown here")]
    Kind(u16),
    #[error("payload does not decode")]
    Decode(#[source] bincode::error::DecodeError),
    #[error("payload has {0} trailing bytes")]
    Trailing(usize),
    #[error("payload does not encode")]
    Encode(#[source] bincode::error::EncodeError),
    #[error(
        "{what} needs protocol version {since}, and the peer speaks {version} (upgrade the broker)"
    )]
    Unsupported {
        what: &'static str,
        version: u16,
        since: u16,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, CodecError>;

/// The fixed message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub kind: u16,
    pub len: u32,
}

impl Header {
    fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&0u32.to_le_bytes());
    }

    /// Parses and checks the header of a whole message `msg`.
    pub fn parse(msg: &[u8]) -> Result<Header> {
        let Some(head) = msg.first_chunk::<HEADER_LEN>() else {
            return Err(CodecError::Truncated(msg.len()));
        };
        let u32_at =
            |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
        let header = Header {
            version: u16_at(4),
            kind: u16_at(6),
            len: u32_at(8),
        };
        if !(PROTOCOL_MIN..=PROTOCOL_MAX).contains(&header.version) {
            return Err(CodecError::Version(header.version));
        }
        let reserved = u32_at(12);
        if reserved != 0 {
            return Err(CodecError::Reserved(reserved));
        }
        if msg.len() > MAX_MSG_SIZE {
            return Err(CodecError::TooLarge(msg.len()));
        }
        let actual = msg.len() - HEADER_LEN;
        if header.len as usize != actual {
            return Err(CodecError::Length {
                header: header.len as usize,
                actual,
            });
        }
        if header.kind == 0 {
            return Err(CodecError::Kind(0));
        }
        Ok(header)
    }
}

fn encode<T: bincode::Encode>(version: u16, kind: u16, value: &T) -> Result<Vec<u8>> {
    let mut msg = vec![0u8; HEADER_LEN];
    let len =
        bincode::encode_into_std_write(value, &mut msg, CONFIG).map_err(CodecError::Encode)?;
    if msg.len() > MAX_MSG_SIZE {
        return Err(CodecError::TooLarge(msg.len()));
    }
    let head: &mut [u8; HEADER_LEN] = msg.first_chunk_mut().expect("header space reserved");
    Header {
        version,
        kind,
        len: len as u32,
    }
    .write(head);
    Ok(msg)
}

fn decode<T: bincode::Decode<()>>(msg: &[u8]) -> Result<(Header, T)> {
    let header = Header::parse(msg)?;
    let payload = &msg[HEADER_LEN..];
    let (value, used) = bincode::decode_from_slice(payload, CONFIG).map_err(CodecError::Decode)?;
    if used != payload.len() {
        return Err(CodecError::Trailing(payload.len() - used));
    }
    Ok((header, value))
}

/// Bytes `value` takes as (part of) a payload.
pub fn encoded_len<T: bincode::Encode>(value: &T) -> usize {
    let mut counter = bincode::enc::write::SizeWriter::default();
    match bincode::encode_into_writer(value, &mut counter, CONFIG) {
        Ok(()) => counter.bytes_written,
        Err(_) => usize::MAX,
    }
}

/// The protocol version that added `node` (and `label`) to [`CreateLease`] and `node` to
/// [`PoolInfo`]. Version 1
/// peers send and expect both without it, so at version 1 this module writes and reads that
/// older layout: the variant index, then the fields before `node`, exactly as the derive
/// made them (a tuple encodes as its fields in order).
const NODE_VERSION: u16 = 2;
/// `Request::Create`'s bincode variant index and header kind (checked by the tests).
const CREATE_VARIANT: u32 = 1;
const CREATE_KIND: u16 = 2;
/// `Response::Df`'s bincode variant index and header kind (checked by the tests).
const DF_VARIANT: u32 = 5;
const DF_KIND: u16 = 0x8006;

/// The protocol version that added the paged admin listings (`QuotaPage`,
/// `QuarantinePage`): this module neither writes nor reads them at version 1.
pub const PAGED_ADMIN_VERSION: u16 = 2;

/// Refuses a message that version `version` does not have.
fn check_since(version: u16, newer: bool) -> Result<()> {
    if newer && version < PAGED_ADMIN_VERSION {
        return Err(CodecError::Unsupported {
            what: "a paged quota or quarantine listing",
            version,
            since: PAGED_ADMIN_VERSION,
        });
    }
    Ok(())
}

fn paged_admin_request(req: &Request) -> bool {
    matches!(
        req,
        Request::QuotaPage { .. } | Request::QuarantinePage { .. }
    )
}

fn paged_admin_response(resp: &Response) -> bool {
    matches!(
        resp,
        Response::QuotaPage { .. } | Response::QuarantinePage { .. }
    )
}

/// A version-1 `Create` payload.
type CreateV1 = (
    u32,
    String,
    u64,
    Option<PageSize>,
    Option<String>,
    bool,
    u32,
    Option<u32>,
);
/// A version-1 `PoolInfo`.
type PoolInfoV1 = (
    String,
    PoolKind,
    PageSize,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    bool,
);

/// Encodes a request at protocol `version`.
pub fn encode_request(version: u16, req: &Request) -> Result<Vec<u8>> {
    check_since(version, paged_admin_request(req))?;
    match req {
        Request::Create(c) if version < NODE_VERSION => {
            if c.node.is_some() {
                return Err(CodecError::Unsupported {
                    what: "a NUMA node in Create",
                    version,
                    since: NODE_VERSION,
                });
            }
            if c.label != BindLabel::Creator {
                return Err(CodecError::Unsupported {
                    what: "a security label in Create",
                    version,
                    since: NODE_VERSION,
                });
            }
            let fields = (
                CREATE_VARIANT,
                &c.name,
                c.size,
                c.page_size,
                &c.pool,
                c.persistent,
                c.mode,
                c.owner,
            );
            encode(version, CREATE_KIND, &fields)
        }
        _ => encode(version, req.kind(), req),
    }
}

/// Encodes a response at protocol `version`.
pub fn encode_response(version: u16, resp: &Response) -> Result<Vec<u8>> {
    check_since(version, paged_admin_response(resp))?;
    match resp {
        Response::Df(pools) if version < NODE_VERSION => {
            let pools: Vec<_> = pools
                .iter()
                .map(|p| {
                    (
                        &p.name,
                        p.kind,
                        p.page_size,
                        p.size,
                        p.used,
                        p.free,
                        p.scrubbing,
                        p.quarantined,
                        p.leases,
                        p.default,
                    )
                })
                .collect();
            encode(version, DF_KIND, &(DF_VARIANT, pools))
        }
        _ => encode(version, resp.kind(), resp),
    }
}

/// `Request::ReportPoison`'s bincode variant index: the derive numbers variants from 0 in
/// declaration order. The `report_poison_*` tests check it and [`REPORT_POISON_KIND`]
/// against the real enum.
const REPORT_POISON_VARIANT: u32 = 8;
/// Header `kind` of `Request::ReportPoison` (what [`Request::kind`] returns for it).
const REPORT_POISON_KIND: u16 = 9;

/// Most bytes a `ReportPoison` request about a `name_len`-byte lease name takes: the header,
/// the variant index (one byte), then the name and the two `u64`s, each length or number a
/// varint of at most 9 bytes.
pub const fn report_poison_max_len(name_len: usize) -> usize {
    HEADER_LEN + 1 + 9 + name_len + 9 + 9
}

/// Encodes `Request::ReportPoison { name, offset, len }` at protocol `version` into `buf`,
/// byte for byte what [`encode_request`] makes of it; returns the message length.
///
/// For signal handlers: it allocates nothing and does not panic. The payload goes through
/// `bincode::encode_into_slice` (same configuration as every other message), whose slice
/// writer copies into `buf` and answers a full buffer with `EncodeError::UnexpectedEnd`;
/// varints are built in stack arrays. A `buf` of [`report_poison_max_len`]`(name.len())`
/// bytes always suffices.
pub fn encode_report_poison_into(
    buf: &mut [u8],
    version: u16,
    name: &str,
    offset: u64,
    len: u64,
) -> Result<usize> {
    let Some((head, payload)) = buf.split_first_chunk_mut::<HEADER_LEN>() else {
        return Err(CodecError::Encode(
            bincode::error::EncodeError::UnexpectedEnd,
        ));
    };
    // A tuple encodes as its fields in order, exactly like the enum variant it mirrors.
    let fields = (REPORT_POISON_VARIANT, name, offset, len);
    let written =
        bincode::encode_into_slice(fields, payload, CONFIG).map_err(CodecError::Encode)?;
    let total = HEADER_LEN + written;
    if total > MAX_MSG_SIZE {
        return Err(CodecError::TooLarge(total));
    }
    Header {
        version,
        kind: REPORT_POISON_KIND,
        len: written as u32,
    }
    .write(head);
    Ok(total)
}

/// Whether `msg` is a version-1 message whose payload is enum variant `variant` (a varint
/// below 251 is that one byte).
fn is_v1_variant(msg: &[u8], variant: u32) -> Result<bool> {
    let header = Header::parse(msg)?;
    Ok(header.version < NODE_VERSION && msg.get(HEADER_LEN) == Some(&(variant as u8)))
}

/// Decodes and validates a whole request message.
pub fn decode_request(msg: &[u8]) -> Result<(Header, Request)> {
    if is_v1_variant(msg, CREATE_VARIANT)? {
        let (header, v1): (Header, CreateV1) = decode(msg)?;
        let (_, name, size, page_size, pool, persistent, mode, owner) = v1;
        if header.kind != CREATE_KIND {
            return Err(CodecError::Kind(header.kind));
        }
        let create = CreateLease {
            name,
            size,
            page_size,
            pool,
            persistent,
            mode,
            owner,
            node: None,
            label: BindLabel::Creator,
        };
        return Ok((header, Request::Create(create)));
    }
    let (header, req): (Header, Request) = decode(msg)?;
    if req.kind() != header.kind {
        return Err(CodecError::Kind(header.kind));
    }
    check_since(header.version, paged_admin_request(&req))?;
    Ok((header, req))
}

/// Decodes and validates a whole response message.
pub fn decode_response(msg: &[u8]) -> Result<(Header, Response)> {
    if is_v1_variant(msg, DF_VARIANT)? {
        let (header, (_, pools)): (Header, (u32, Vec<PoolInfoV1>)) = decode(msg)?;
        if header.kind != DF_KIND {
            return Err(CodecError::Kind(header.kind));
        }
        let pools = pools
            .into_iter()
            .map(|p| PoolInfo {
                name: p.0,
                kind: p.1,
                page_size: p.2,
                size: p.3,
                used: p.4,
                free: p.5,
                scrubbing: p.6,
                quarantined: p.7,
                leases: p.8,
                default: p.9,
                node: None,
                // A version-1 broker does not estimate them.
                kernel_overhead: 0,
                broker_metadata: 0,
            })
            .collect();
        return Ok((header, Response::Df(pools)));
    }
    let (header, resp): (Header, Response) = decode(msg)?;
    if resp.kind() != header.kind {
        return Err(CodecError::Kind(header.kind));
    }
    check_since(header.version, paged_admin_response(&resp))?;
    Ok((header, resp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CreateLease, PageSize};
    use proptest::prelude::*;

    fn create() -> Request {
        Request::Create(CreateLease {
            name: "tenant/vm1/ram0".into(),
            size: 1 << 30,
            page_size: Some(PageSize::Huge2M),
            pool: None,
            persistent: true,
            mode: 0o600,
            owner: None,
            node: None,
            label: BindLabel::Creator,
        })
    }

    #[test]
    fn round_trip() {
        let msg = encode_request(1, &create()).unwrap();
        let (header, req) = decode_request(&msg).unwrap();
        assert_eq!(header.kind, 2);
        assert_eq!(req, create());
    }

    fn pools() -> Vec<PoolInfo> {
        let pool = |name: &str, node: Option<u32>| PoolInfo {
            name: name.into(),
            kind: PoolKind::Memfd,
            page_size: PageSize::Huge2M,
            size: 1 << 30,
            used: 2 << 20,
            free: (1 << 30) - (2 << 20),
            scrubbing: 0,
            quarantined: 0,
            leases: 1,
            default: node.is_none(),
            node,
            kernel_overhead: 4 << 20,
            broker_metadata: 4096,
        };
        vec![pool("any", None), pool("near", Some(1))]
    }

    #[test]
    fn node_fields_travel_at_version_2() {
        let Request::Create(mut c) = create() else {
            unreachable!()
        };
        c.node = Some(1);
        let req = Request::Create(c);
        let (header, back) = decode_request(&encode_request(2, &req).unwrap()).unwrap();
        assert_eq!((header.version, header.kind), (2, CREATE_KIND));
        assert_eq!(back, req);
        let resp = Response::Df(pools());
        let (header, back) = decode_response(&encode_response(2, &resp).unwrap()).unwrap();
        assert_eq!((header.version, header.kind), (2, DF_KIND));
        assert_eq!(back, resp);
        assert_eq!(
            Request::Create(CreateLease::new("x", 1)).kind(),
            CREATE_KIND
        );
        assert_eq!(Response::Df(Vec::new()).kind(), DF_KIND);
    }

    #[test]
    fn version_1_peers_get_the_layout_without_nodes() {
        // A version-1 Create is the version-2 one without its last two fields (node None:
        // one 0 byte; label Creator: variant 0, one 0 byte).
        let v1 = encode_request(1, &create()).unwrap();
        let v2 = encode_request(2, &create()).unwrap();
        assert_eq!(v1[HEADER_LEN..], v2[HEADER_LEN..v2.len() - 2]);
        assert_eq!(v2[v2.len() - 2..], [0, 0]);
        assert_eq!(v2[HEADER_LEN], CREATE_VARIANT as u8);
        let Request::Create(c) = create() else {
            unreachable!()
        };
        let with_node = CreateLease {
            node: Some(1),
            ..c.clone()
        };
        let with_label = CreateLease {
            label: BindLabel::Unbound,
            ..c
        };
        for newer in [with_node, with_label] {
            assert!(matches!(
                encode_request(1, &Request::Create(newer)),
                Err(CodecError::Unsupported {
                    version: 1,
                    since: 2,
                    ..
                })
            ));
        }
        // Df: each pool without its version-2 fields, which a version-1 reader gets back as
        // None and 0.
        let msg = encode_response(1, &Response::Df(pools())).unwrap();
        assert_eq!(msg[HEADER_LEN], DF_VARIANT as u8);
        let v2 = encode_response(2, &Response::Df(pools())).unwrap();
        // Per pool: the node (None: 1 byte, Some(1): 2), kernel_overhead (4 MiB: a varint of
        // 5 bytes), broker_metadata (4096: 3 bytes).
        assert_eq!(msg.len(), v2.len() - (1 + 5 + 3) - (2 + 5 + 3));
        let (_, Response::Df(back)) = decode_response(&msg).unwrap() else {
            panic!("not a Df")
        };
        let want: Vec<PoolInfo> = pools()
            .into_iter()
            .map(|p| PoolInfo {
                node: None,
                kernel_overhead: 0,
                broker_metadata: 0,
                ..p
            })
            .collect();
        assert_eq!(back, want);
    }

    #[test]
    fn header_checks() {
        let msg = encode_request(1, &create()).unwrap();
        assert!(matches!(
            decode_request(&msg[..10]),
            Err(CodecError::Truncated(10))
        ));
        let mut bad = msg.clone();
        bad[0] ^= 1;
        assert!(matches!(decode_request(&bad), Err(CodecError::BadMagic(_))));
        let mut bad = msg.clone();
        bad[4] = 9;
        assert!(matches!(decode_request(&bad), Err(CodecError::Version(9))));
        let mut bad = msg.clone();
        bad[13] = 1;
        assert!(matches!(decode_request(&bad), Err(CodecError::Reserved(_))));
        let mut bad = msg.clone();
        bad[6] = 3;
        assert!(matches!(decode_request(&bad), Err(CodecError::Kind(3))));
        let mut bad = msg.clone();
        bad.push(0);
        assert!(matches!(
            decode_request(&bad),
            Err(CodecError::Length { .. })
        ));
        let mut big = vec![0u8; MAX_MSG_SIZE + 1];
        big[..HEADER_LEN].copy_from_slice(&msg[..HEADER_LEN]);
        assert!(
            matches!(decode_request(&big), Err(CodecError::TooLarge(n)) if n == MAX_MSG_SIZE + 1)
        );
    }

    #[test]
    fn huge_string_length_is_refused_without_allocating() {
        // Hello with a string whose varint length claims 2^60 bytes.
        let mut msg = vec![0u8; HEADER_LEN];
        msg.extend_from_slice(&[0, 1, 1, 0xff]);
        msg.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let len = (msg.len() - HEADER_LEN) as u32;
        Header {
            version: 1,
            kind: 1,
            len,
        }
        .write(msg.first_chunk_mut().unwrap());
        assert!(matches!(decode_request(&msg), Err(CodecError::Decode(_))));
    }

    #[test]
    fn a_full_list_page_decodes() {
        use crate::proto::{Extent, HolderInfo, LeaseInfo, LeaseState};
        let lease = |i: usize| LeaseInfo {
            name: format!("tenant-{i:04}/vm-{i:04}/ram0"),
            size: 1 << 30,
            page_size: PageSize::Huge2M,
            pool: "default".into(),
            uid: 1000,
            gid: 1000,
            mode: 0o600,
            persistent: true,
            state: LeaseState::Held,
            created: 1_795_000_000,
            extents: vec![Extent {
                start: 0x1_0000_0000 + (i as u64) * (1 << 30),
                len: 1 << 30,
            }],
            holders: vec![HolderInfo {
                pid: 4242,
                uid: 1000,
            }],
            poison: vec![],
            writable: false,
            device: Some(format!("dax0.{i}")),
            label: None,
        };
        // As many as fit the wire budget, like the broker's pages.
        let mut leases = Vec::new();
        while encoded_len(&Response::List {
            leases: leases.clone(),
            more: true,
        }) < MAX_PAYLOAD - 1024
        {
            leases.push(lease(leases.len()));
        }
        leases.pop();
        let msg = encode_response(
            1,
            &Response::List {
                leases: leases.clone(),
                more: true,
            },
        )
        .unwrap();
        let (_, back) = decode_response(&msg).unwrap();
        assert_eq!(back, Response::List { leases, more: true });
    }

    #[test]
    fn oversize_encode_is_refused() {
        let req = Request::Stat {
            name: "x".repeat(MAX_MSG_SIZE),
        };
        assert!(encode_request(1, &req).is_err());
    }

    fn report_poison(name: &str, offset: u64, len: u64) -> Request {
        Request::ReportPoison {
            name: name.into(),
            offset,
            len,
        }
    }

    #[test]
    fn report_poison_into_a_slice_matches_encode_request() {
        // Varint boundaries for the numbers and for the name's length.
        let numbers = [
            0,
            250,
            251,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            1 << 32,
            u64::MAX,
        ];
        for name_len in [0, 1, 15, 250, 251, 255] {
            let name = "n".repeat(name_len);
            for (offset, len) in numbers.iter().zip(numbers.iter().rev()) {
                let want =
                    encode_request(PROTOCOL_MIN, &report_poison(&name, *offset, *len)).unwrap();
                let mut buf = [0xaau8; report_poison_max_len(255)];
                let n = encode_report_poison_into(&mut buf, PROTOCOL_MIN, &name, *offset, *len)
                    .unwrap();
                assert_eq!(
                    &buf[..n],
                    &want[..],
                    "name {name_len} bytes, {offset}, {len}"
                );
                assert!(n <= report_poison_max_len(name_len));
            }
        }
        assert_eq!(
            report_poison("x", 0, 0).kind(),
            REPORT_POISON_KIND,
            "header kind"
        );
    }

    #[test]
    fn report_poison_max_len_bounds_the_largest_report() {
        // A name that fits a message has a 3-byte length varint, 6 bytes under the bound.
        let name = "x".repeat(0x1_0000 - 64);
        let bound = report_poison_max_len(name.len()) - 6;
        let mut buf = vec![0u8; MAX_MSG_SIZE + 64];
        let n = encode_report_poison_into(&mut buf, 1, &name, u64::MAX, u64::MAX).unwrap();
        assert_eq!(n, bound, "three-byte name length, two nine-byte numbers");
    }

    #[test]
    fn report_poison_into_small_or_oversize_buffers_is_refused() {
        let mut small = [0u8; HEADER_LEN + 3];
        assert!(matches!(
            encode_report_poison_into(&mut small, 1, "tenant/vm1/ram0", 0, 0),
            Err(CodecError::Encode(_))
        ));
        assert!(matches!(
            encode_report_poison_into(&mut small[..HEADER_LEN - 1], 1, "", 0, 0),
            Err(CodecError::Encode(_))
        ));
        let name = "x".repeat(MAX_MSG_SIZE);
        let mut big = vec![0u8; 2 * MAX_MSG_SIZE];
        assert!(matches!(
            encode_report_poison_into(&mut big, 1, &name, 0, 0),
            Err(CodecError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn report_poison_into_matches_for_any_fields(
            name in "\\PC{0,80}", offset in any::<u64>(), len in any::<u64>()
        ) {
            let want = encode_request(PROTOCOL_MIN, &report_poison(&name, offset, len)).unwrap();
            let mut buf = vec![0u8; report_poison_max_len(name.len())];
            let n = encode_report_poison_into(&mut buf, PROTOCOL_MIN, &name, offset, len).unwrap();
            prop_assert_eq!(&buf[..n], &want[..]);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        #[test]
        fn garbage_payload_behind_valid_header_never_panics(
            kind in 0u16..12, payload in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            let mut msg = vec![0u8; HEADER_LEN];
            msg.extend_from_slice(&payload);
            Header { version: 1, kind, len: payload.len() as u32 }.write(msg.first_chunk_mut().unwrap());
            let _ = decode_request(&msg);
        }
    }

    fn paged_admin_messages() -> (Vec<Request>, Vec<Response>) {
        use crate::proto::{
            Extent, PoisonInfo, PoisonedLease, QuarantineAfter, QuarantineInfo, QuotaInfo,
        };
        let quota = QuotaInfo {
            scope: "uid".into(),
            id: 100_000,
            label: "uid 100000".into(),
            default: false,
            bytes_limit: Some(1 << 30),
            leases_limit: Some(8),
            bytes_used: 4096,
            leases_used: 1,
        };
        let pool = QuarantineInfo {
            pool: "dax".into(),
            kind: PoolKind::Devdax,
            ranges: vec![Extent {
                start: 0x1_4000_0000,
                len: 2 << 20,
            }],
            leases: vec![PoisonedLease {
                name: "tenant/vm1/ram0".into(),
                poison: vec![PoisonInfo {
                    offset: 4 << 20,
                    len: 2 << 20,
                }],
            }],
        };
        let requests = vec![
            Request::QuotaPage { after: None },
            Request::QuotaPage {
                after: Some(("uid".into(), 1000)),
            },
            Request::QuarantinePage { after: None },
            Request::QuarantinePage {
                after: Some(QuarantineAfter::after(&pool)),
            },
        ];
        let responses = vec![
            Response::QuotaPage {
                quotas: vec![quota],
                more: true,
            },
            Response::QuarantinePage {
                pools: vec![pool],
                more: false,
            },
        ];
        (requests, responses)
    }

    #[test]
    fn paged_admin_listings_round_trip_at_version_2() {
        let (requests, responses) = paged_admin_messages();
        for req in requests {
            let (header, back) = decode_request(&encode_request(2, &req).unwrap()).unwrap();
            assert_eq!((header.version, header.kind), (2, req.kind()));
            assert_eq!(back, req);
        }
        for resp in responses {
            let (header, back) = decode_response(&encode_response(2, &resp).unwrap()).unwrap();
            assert_eq!((header.version, header.kind), (2, resp.kind()));
            assert_eq!(back, resp);
        }
        assert_eq!(Request::QuotaPage { after: None }.kind(), 19);
        assert_eq!(Request::QuarantinePage { after: None }.kind(), 20);
        let page = Response::QuotaPage {
            quotas: Vec::new(),
            more: false,
        };
        assert_eq!(page.kind(), 0x800c);
        let page = Response::QuarantinePage {
            pools: Vec::new(),
            more: false,
        };
        assert_eq!(page.kind(), 0x800d);
    }

    #[test]
    fn version_1_peers_never_see_paged_admin_listings() {
        let unsupported = |r: Result<Vec<u8>>| {
            matches!(
                r,
                Err(CodecError::Unsupported {
                    version: 1,
                    since: 2,
                    ..
                })
            )
        };
        let at_version_1 = |mut msg: Vec<u8>| {
            msg[4..6].copy_from_slice(&1u16.to_le_bytes());
            msg
        };
        let (requests, responses) = paged_admin_messages();
        for req in requests {
            assert!(unsupported(encode_request(1, &req)), "{req:?}");
            let msg = at_version_1(encode_request(2, &req).unwrap());
            assert!(matches!(
                decode_request(&msg),
                Err(CodecError::Unsupported { version: 1, .. })
            ));
        }
        for resp in responses {
            assert!(unsupported(encode_response(1, &resp)), "{resp:?}");
            let msg = at_version_1(encode_response(2, &resp).unwrap());
            assert!(matches!(
                decode_response(&msg),
                Err(CodecError::Unsupported { version: 1, .. })
            ));
        }
        // The one-reply listings stay as they were.
        for req in [Request::Quota, Request::Quarantine] {
            let (_, back) = decode_request(&encode_request(1, &req).unwrap()).unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn a_quarantine_listing_goes_on_after_its_last_range_or_lease() {
        use crate::proto::{Extent, PoisonInfo, PoisonedLease, QuarantineAfter, QuarantineInfo};
        let lease = |name: &str| PoisonedLease {
            name: name.into(),
            poison: vec![PoisonInfo {
                offset: 0,
                len: 4096,
            }],
        };
        let mut pool = QuarantineInfo {
            pool: "dax".into(),
            kind: PoolKind::Devdax,
            ranges: Vec::new(),
            leases: Vec::new(),
        };
        let after = |pool: &QuarantineInfo| QuarantineAfter::after(pool);
        assert_eq!((after(&pool).range, after(&pool).lease), (None, None));
        pool.ranges.push(Extent {
            start: 0x2000,
            len: 0x1000,
        });
        assert_eq!(after(&pool).range, Some(0x2000));
        pool.leases.extend([lease("a"), lease("b"), lease("b")]);
        let next = after(&pool);
        assert_eq!(next.pool, "dax");
        assert_eq!((next.range, next.lease), (None, Some(("b".into(), 2))));
    }
}
