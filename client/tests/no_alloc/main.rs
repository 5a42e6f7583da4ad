//! The poison-report encoder runs in a SIGBUS handler, where allocating is not allowed:
//! a counting global allocator shows it never allocates, whatever it is asked to encode.
#![deny(unsafe_code)]

mod sys;

use membroker_client::codec::{self, CodecError, report_poison_max_len};
use membroker_client::proto::{PROTOCOL_MIN, Request};

#[global_allocator]
static ALLOCATOR: sys::Counting = sys::Counting;

#[test]
fn encoding_a_poison_report_into_a_slice_does_not_allocate() {
    let name = "tenant/vm1/ram0";
    let long = "n".repeat(255);
    let mut buf = [0u8; report_poison_max_len(255)];

    // The counter works: the owned encoder allocates.
    let before = sys::allocations();
    let owned = codec::encode_request(
        PROTOCOL_MIN,
        &Request::ReportPoison {
            name: name.into(),
            offset: 1 << 40,
            len: 1 << 21,
        },
    )
    .unwrap();
    assert!(sys::allocations() > before);

    let before = sys::allocations();
    let n = codec::encode_report_poison_into(&mut buf, PROTOCOL_MIN, name, 1 << 40, 1 << 21);
    let mut long_buf = [0u8; report_poison_max_len(255)];
    let long_n = codec::encode_report_poison_into(&mut long_buf, PROTOCOL_MIN, &long, u64::MAX, 7);
    // Errors too: a buffer that is too small, and one shorter than the header.
    let mut small = [0u8; 20];
    let short = codec::encode_report_poison_into(&mut small, PROTOCOL_MIN, &long, 0, 0);
    let tiny = codec::encode_report_poison_into(&mut small[..3], PROTOCOL_MIN, name, 0, 0);
    let allocated = sys::allocations() - before;

    assert_eq!(allocated, 0);
    assert_eq!(&buf[..n.unwrap()], &owned[..]);
    assert!(long_n.is_ok());
    assert!(matches!(short, Err(CodecError::Encode(_))));
    assert!(matches!(tiny, Err(CodecError::Encode(_))));
}
