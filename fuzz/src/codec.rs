//! `codec_request` and `codec_response`: the wire decoder on arbitrary bytes.
//!
//! Anything may be refused, nothing may panic. What decodes must re-encode, and the re-encoding
//! must decode to the same header and value (bincode accepts some non-minimal varints, so the
//! bytes may differ from the input; a second encoding must equal the first byte for byte).

use membroker_client::codec::{
    self, HEADER_LEN, Header, MAX_MSG_SIZE, decode_request, decode_response, encode_request,
    encode_response, encoded_len,
};
use membroker_client::proto::PROTOCOL_MAX;

/// Checks one decoded message: `re` is `encode(header.version, value)`.
fn check_round_trip<T: PartialEq + std::fmt::Debug>(
    msg: &[u8],
    header: Header,
    value: &T,
    kind: u16,
    payload_len: usize,
    encode: impl Fn(u16, &T) -> codec::Result<Vec<u8>>,
    decode: impl Fn(&[u8]) -> codec::Result<(Header, T)>,
) {
    assert_ne!(header.kind, 0, "kind 0 accepted");
    assert_eq!(header.kind, kind, "header kind differs from the value's");
    assert_eq!(header.len as usize + HEADER_LEN, msg.len());
    assert!(msg.len() <= MAX_MSG_SIZE);
    let re = encode(header.version, value)
        .unwrap_or_else(|e| panic!("decoded {value:?} does not re-encode: {e}"));
    // A canonical encoding is never longer than what was decoded.
    assert!(
        re.len() <= msg.len(),
        "re-encoding grew: {} > {}",
        re.len(),
        msg.len()
    );
    // encoded_len measures the newest layout; an older version's may be shorter (version 1
    // has no node fields).
    if header.version == PROTOCOL_MAX {
        assert_eq!(
            re.len(),
            HEADER_LEN + payload_len,
            "encoded_len disagrees with encode"
        );
    } else {
        assert!(
            re.len() <= HEADER_LEN + payload_len,
            "an older layout is longer than encoded_len"
        );
    }
    let (header2, value2) =
        decode(&re).unwrap_or_else(|e| panic!("re-encoding of {value:?} does not decode: {e}"));
    assert_eq!(
        header2,
        Header {
            len: (re.len() - HEADER_LEN) as u32,
            ..header
        }
    );
    assert_eq!(&value2, value, "round trip changed the value");
    let re2 = encode(header2.version, &value2).expect("encoded once, encodes again");
    assert_eq!(re2, re, "encoding is not stable");
}

/// Fuzz target `codec_request`. Returns whether `data` decoded.
pub fn request(data: &[u8]) -> bool {
    let decoded = decode_request(data);
    let ok = decoded.is_ok();
    if let Ok((header, req)) = decoded {
        check_round_trip(
            data,
            header,
            &req,
            req.kind(),
            encoded_len(&req),
            encode_request,
            decode_request,
        );
    }
    // The same bytes are never both a valid request and a valid response: kinds differ.
    assert!(!ok || decode_response(data).is_err());
    ok
}

/// Fuzz target `codec_response`. Returns whether `data` decoded.
pub fn response(data: &[u8]) -> bool {
    let decoded = decode_response(data);
    let ok = decoded.is_ok();
    if let Ok((header, resp)) = decoded {
        assert!(resp.fd_count() <= 1);
        check_round_trip(
            data,
            header,
            &resp,
            resp.kind(),
            encoded_len(&resp),
            encode_response,
            decode_response,
        );
    }
    ok
}
