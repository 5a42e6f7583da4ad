//! A small seeded mutator for running the targets on stable Rust, without libFuzzer: no coverage
//! feedback, only stacked random mutations of the seed corpus, plus per-target fix-ups and
//! dictionaries that get the inputs past the cheap checks (message length, CRC is done by the
//! journal target's input format itself).

/// xorshift64*: small, seeded, reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that seeds 0, 1, 2 … start far apart (and never at 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Bytes that often matter: bincode varint markers (0xfb–0xfe), boundaries, newline.
const INTERESTING_U8: [u8; 12] = [
    0, 1, 2, 0x7f, 0x80, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff, b'\n',
];
const INTERESTING_U32: [u32; 8] = [
    0,
    1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0xfff0,
    0x1_0000,
    0x8001,
];

/// What the mutator knows about one target.
#[derive(Debug, Clone, Copy)]
pub struct Hints {
    pub max_len: usize,
    /// Tokens to insert or overwrite with.
    pub dict: &'static [&'static [u8]],
    /// Applied to most inputs after mutation (e.g. fix a length field).
    pub fixup: Option<fn(&mut [u8])>,
}

/// One new input from `seeds`.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], hints: &Hints) -> Vec<u8> {
    let mut data = if seeds.is_empty() || rng.chance(32) {
        (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect()
    } else {
        seeds[rng.below(seeds.len())].clone()
    };
    // Mostly few mutations: inputs are small, and each one is likely to break something.
    let most = 1 + rng.below(8);
    let rounds = 1 + rng.below(most);
    for _ in 0..rounds {
        mutate_once(rng, &mut data, seeds, hints);
    }
    data.truncate(hints.max_len);
    if let Some(fixup) = hints.fixup
        && !rng.chance(8)
    {
        fixup(&mut data);
    }
    data
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>], hints: &Hints) {
    let len = data.len();
    match rng.below(12) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = INTERESTING_U8[rng.below(INTERESTING_U8.len())];
        }
        3 if len >= 4 => {
            let i = rng.below(len - 3);
            let v = INTERESTING_U32[rng.below(INTERESTING_U32.len())];
            data[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        4 if len > 0 => {
            // Small arithmetic on a byte.
            let i = rng.below(len);
            data[i] = data[i].wrapping_add((rng.below(33) as u8).wrapping_sub(16));
        }
        5 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, bytes);
        }
        6 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(32));
            data.drain(i..i + n);
        }
        7 if len > 0 => {
            // Duplicate a chunk somewhere else.
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let chunk = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        8 if !seeds.is_empty() => {
            // Splice: our head, another seed's tail.
            let other = &seeds[rng.below(seeds.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        9 | 10 if !hints.dict.is_empty() => {
            let token = hints.dict[rng.below(hints.dict.len())];
            let i = rng.below(len + 1);
            if rng.chance(2) || i + token.len() > len {
                data.splice(i..i, token.iter().copied());
            } else {
                data[i..i + token.len()].copy_from_slice(token);
            }
        }
        11 if !hints.dict.is_empty() => replace_number(rng, data),
        _ => {
            if len > 0 {
                data.truncate(rng.below(len));
            }
        }
    }
}

/// Numbers at the edges of the integer types, as text.
const INTERESTING_NUMBERS: [&[u8]; 10] = [
    b"0",
    b"1",
    b"-1",
    b"255",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"18446744073709551614",
    b"18446744073709551615",
    b"18446744073709551616",
];

/// Replaces one run of ASCII digits (a JSON number) by an interesting number.
fn replace_number(rng: &mut Rng, data: &mut Vec<u8>) {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i].is_ascii_digit() {
            let start = i;
            while i < data.len() && data[i].is_ascii_digit() {
                i += 1;
            }
            runs.push(start..i);
        } else {
            i += 1;
        }
    }
    if runs.is_empty() {
        return;
    }
    let run = runs[rng.below(runs.len())].clone();
    let number = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
    data.splice(run, number.iter().copied());
}

/// Codec fix-up: a valid header (magic, version 1, length, reserved 0) around whatever kind and
/// payload the mutations made, so that decoding gets to the payload.
pub fn fix_codec_header(data: &mut [u8]) {
    use membroker_client::codec::{HEADER_LEN, MAGIC};
    if data.len() >= HEADER_LEN {
        let len = (data.len() - HEADER_LEN) as u32;
        data[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        data[4..6].copy_from_slice(&1u16.to_le_bytes());
        data[8..12].copy_from_slice(&len.to_le_bytes());
        data[12..16].copy_from_slice(&0u32.to_le_bytes());
    }
}

/// Tokens for the journal's JSON records.
pub const JOURNAL_DICT: &[&[u8]] = &[
    b"\n",
    b"!",
    b"\"op\":",
    b"\"lease\"",
    b"\"unnamed\"",
    b"\"poison\"",
    b"\"scrub\"",
    b"\"freed\"",
    b"\"quarantine\"",
    b"\"id\":",
    b"\"extents\":[]",
    b"\"device\":null",
    b"\"page_size\":\"1G\"",
    b"18446744073709551615",
    b"18446744073709551616",
    b"-1",
    b"0",
    b"1e3",
    b"null",
    b"true",
    b"{}",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b",",
];

/// Tokens for bincode payloads.
pub const CODEC_DICT: &[&[u8]] = &[
    b"MBRK",
    &[1, 0],
    &[0xfb, 0xff, 0xff],
    &[0xfc, 0xff, 0xff, 0xff, 0xff],
    &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xfe],
    &[0xc3, 0x28],
    &[0xf0, 0x9f, 0x98, 0x80],
];
