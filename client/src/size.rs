//! Human sizes: `4096`, `4K`, `2M`, `1G`, `1.5G`, `1T` (binary units; an optional `B`/`iB`).

/// A size that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("size {0:?}: use bytes or a number with K, M, G or T (e.g. 4096, 2M, 1.5G)")]
pub struct SizeError(pub String);

/// Parses a size in bytes. Fractions are allowed with a unit and must give whole bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = || SizeError(text.to_string());
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (number, shift) = match t.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&t[..t.len() - 1], 10),
        Some(b'M') => (&t[..t.len() - 1], 20),
        Some(b'G') => (&t[..t.len() - 1], 30),
        Some(b'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit())
        || (number.contains('.') && (frac.is_empty() || shift == 0))
    {
        return Err(err());
    }
    let whole: u64 = whole.parse().map_err(|_| err())?;
    let mut bytes = whole
        .checked_shl(shift)
        .filter(|b| b >> shift == whole)
        .ok_or_else(err)?;
    if !frac.is_empty() {
        if frac.len() > 9 {
            return Err(err());
        }
        let digits: u64 = frac.parse().map_err(|_| err())?;
        let denom = 10u64.pow(frac.len() as u32);
        let scaled = u128::from(digits) << shift;
        if scaled % u128::from(denom) != 0 {
            return Err(err());
        }
        let extra = u64::try_from(scaled / u128::from(denom)).map_err(|_| err())?;
        bytes = bytes.checked_add(extra).ok_or_else(err)?;
    }
    Ok(bytes)
}

/// Formats bytes for people: `512 B`, `4 KiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5M"), Ok(512 << 10));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
    }

    #[test]
    fn refuses() {
        for bad in [
            "",
            "G",
            "1.5",
            "1.G",
            "-1G",
            "1X",
            "1.0000001K",
            "99999999999999999999",
            "16777216T",
            "1..5G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }
}
