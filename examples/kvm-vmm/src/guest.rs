//! The guest: a few bytes of 16-bit real-mode code, its memory layout, and the line it leaves.
//!
//! Guest-physical addresses are offsets in the lease (the lease is mapped at 0). The counter
//! is the only state that matters across runs; the VMM loads the code and clears the line
//! before every run, the way a VMM loads firmware into guest RAM.

use std::fmt;

/// The run counter, a little-endian u32 that only the guest writes.
pub const COUNTER: u64 = 0x0500;
/// One past the scratch bytes where the guest builds the decimal digits backwards.
pub const DIGITS_END: u64 = 0x0610;
/// Where the guest writes `MEMBROKER-KVM <counter>`, NUL-terminated.
pub const LINE: u64 = 0x1000;
/// Room for the line: the prefix, ten digits of a u32 and the NUL, rounded up.
pub const LINE_MAX: usize = 32;
/// Where the code is loaded and the vCPU starts (CS = 0, IP = `CODE`).
pub const CODE: u64 = 0x2000;
/// Where the prefix text is loaded.
pub const TEXT: u64 = 0x2100;
/// Guest RAM the layout needs.
pub const MIN_RAM: u64 = 0x3000;

/// What the guest writes before the digits.
pub const PREFIX: &[u8] = b"MEMBROKER-KVM ";

/// The program, assembled by hand (the addresses are the constants above, little-endian).
/// It runs with DS = ES = 0 and uses no stack, interrupts or I/O.
#[rustfmt::skip]
pub const PROGRAM: [u8; 65] = [
    0x31, 0xc0,                         // 2000  xor  ax, ax
    0x8e, 0xd8,                         // 2002  mov  ds, ax
    0x8e, 0xc0,                         // 2004  mov  es, ax
    0x66, 0xa1, 0x00, 0x05,             // 2006  mov  eax, [COUNTER]
    0x66, 0x40,                         // 200a  inc  eax
    0x66, 0xa3, 0x00, 0x05,             // 200c  mov  [COUNTER], eax
    0xbe, 0x00, 0x21,                   // 2010  mov  si, TEXT
    0xbf, 0x00, 0x10,                   // 2013  mov  di, LINE
    0xb9, 0x0e, 0x00,                   // 2016  mov  cx, 14          ; PREFIX.len()
    0xfc,                               // 2019  cld
    0xf3, 0xa4,                         // 201a  rep movsb            ; di = LINE + 14
    0x66, 0xbb, 0x0a, 0x00, 0x00, 0x00, // 201c  mov  ebx, 10
    0xbe, 0x10, 0x06,                   // 2022  mov  si, DIGITS_END
                                        //     digit:
    0x66, 0x31, 0xd2,                   // 2025  xor  edx, edx
    0x66, 0xf7, 0xf3,                   // 2028  div  ebx             ; eax /= 10, edx = rest
    0x80, 0xc2, 0x30,                   // 202b  add  dl, '0'
    0x4e,                               // 202e  dec  si
    0x88, 0x14,                         // 202f  mov  [si], dl
    0x66, 0x85, 0xc0,                   // 2031  test eax, eax
    0x75, 0xef,                         // 2034  jnz  digit           ; -17
    0xb9, 0x10, 0x06,                   // 2036  mov  cx, DIGITS_END
    0x29, 0xf1,                         // 2039  sub  cx, si          ; number of digits
    0xf3, 0xa4,                         // 203b  rep movsb            ; digits after the prefix
    0xb0, 0x00,                         // 203d  mov  al, 0
    0xaa,                               // 203f  stosb                ; NUL
    0xf4,                               // 2040  hlt
];

// The regions of the layout do not overlap and fit in `MIN_RAM`; the digits of a u32 fit
// between the counter and `DIGITS_END`, and the whole line in `LINE_MAX` with its NUL.
const _: () = assert!(
    COUNTER + 4 <= DIGITS_END - 10
        && DIGITS_END <= LINE
        && LINE + LINE_MAX as u64 <= CODE
        && CODE + PROGRAM.len() as u64 <= TEXT
        && TEXT + PREFIX.len() as u64 <= MIN_RAM
        && PREFIX.len() + 10 < LINE_MAX
);

/// The line the guest left, checked against the counter it stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub counter: u32,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", String::from_utf8_lossy(PREFIX), self.counter)
    }
}

/// Reads the guest's line from the `LINE_MAX` bytes at [`LINE`]: the prefix, decimal digits
/// without leading zeros, a NUL. Returns what is wrong with it otherwise.
pub fn parse_line(bytes: &[u8]) -> Result<Line, String> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or("no NUL-terminated line (did the guest run?)")?;
    let text = &bytes[..end];
    let shown = || String::from_utf8_lossy(text).into_owned();
    let digits = text
        .strip_prefix(PREFIX)
        .ok_or_else(|| format!("line {:?} does not start with {PREFIX:?}", shown()))?;
    let counter = std::str::from_utf8(digits)
        .ok()
        .filter(|d| d.bytes().all(|b| b.is_ascii_digit()) && (*d == "0" || !d.starts_with('0')))
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| format!("line {:?} does not end in a counter", shown()))?;
    Ok(Line { counter })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le16(at: usize) -> u64 {
        u64::from(u16::from_le_bytes([PROGRAM[at], PROGRAM[at + 1]]))
    }

    #[test]
    fn program_agrees_with_the_layout() {
        assert_eq!(le16(8), COUNTER);
        assert_eq!(le16(14), COUNTER);
        assert_eq!(le16(17), TEXT);
        assert_eq!(le16(20), LINE);
        assert_eq!(le16(23), PREFIX.len() as u64);
        assert_eq!(le16(35), DIGITS_END);
        assert_eq!(le16(55), DIGITS_END);
        assert_eq!(*PROGRAM.last().unwrap(), 0xf4, "ends in hlt");
    }

    #[test]
    fn parses_the_line() {
        let mut bytes = [0u8; LINE_MAX];
        bytes[..16].copy_from_slice(b"MEMBROKER-KVM 42");
        let line = parse_line(&bytes).unwrap();
        assert_eq!(line, Line { counter: 42 });
        assert_eq!(line.to_string(), "MEMBROKER-KVM 42");
    }

    #[test]
    fn refuses_bad_lines() {
        for bad in [
            &b"MEMBROKER-KVM "[..],
            b"MEMBROKER-KVM 01",
            b"MEMBROKER-KVM 1x",
            b"MEMBROKER-KVM 99999999999",
            b"HELLO 1",
        ] {
            let mut bytes = [0u8; LINE_MAX];
            bytes[..bad.len()].copy_from_slice(bad);
            assert!(parse_line(&bytes).is_err(), "{bad:?}");
        }
        assert!(parse_line(&[b'M'; LINE_MAX]).is_err());
    }
}
