//! Lease names: slash-separated paths such as `tenant/vm42/ram0`.

/// Longest lease name in bytes.
pub const MAX_NAME: usize = 255;

/// Checks a lease name: 1-255 bytes of components made of `A-Z a-z 0-9 . _ - + @ :`, separated
/// by single slashes, no empty, `.` or `..` component, no leading or trailing slash.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "lease name must be 1-{MAX_NAME} bytes, got {}",
            name.len()
        ));
    }
    for component in name.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(format!(
                "lease name {name:?}: empty, '.' or '..' path component"
            ));
        }
        if let Some(c) = component.chars().find(|c| {
            !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@' | ':'))
        }) {
            return Err(format!(
                "lease name {name:?}: character {c:?} is not allowed (use A-Z a-z 0-9 . _ - + @ : and /)"
            ));
        }
    }
    Ok(())
}

/// Whether `name` is `prefix` itself or lies under it (`a/b` is under `a`, `ab` is not).
/// The empty prefix matches everything; a trailing slash on the prefix is ignored.
pub fn is_under(name: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match name.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The entries of a map keyed by name that lie at or under `prefix`, after `after`, in name
/// order.
pub fn range_under<'a, V>(
    map: &'a std::collections::BTreeMap<String, V>,
    prefix: &'a str,
    after: Option<&str>,
) -> impl Iterator<Item = (&'a String, &'a V)> {
    use std::ops::Bound;
    let base = prefix.trim_end_matches('/');
    let start = match after {
        Some(a) if a >= base => Bound::Excluded(a.to_string()),
        _ => Bound::Included(base.to_string()),
    };
    map.range((start, Bound::Unbounded))
        // sorted: nothing further can be under the prefix
        .take_while(move |(name, _)| name.starts_with(base))
        // e.g. `a-b` sorts between `a` and `a/b`
        .filter(move |(name, _)| is_under(name, prefix))
}

/// One page of `items`: as many as `fits` accepts, and whether more remain. Never an empty
/// page with more to come: the first item always goes.
pub fn page<T>(items: impl Iterator<Item = T>, mut fits: impl FnMut(&T) -> bool) -> (Vec<T>, bool) {
    let mut out = Vec::new();
    for item in items {
        if !fits(&item) {
            if out.is_empty() {
                out.push(item);
            }
            return (out, true);
        }
        out.push(item);
    }
    (out, false)
}

/// The proper ancestors of a name: `a/b/c` → `a`, `a/b`.
pub fn ancestors(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('/').map(move |(i, _)| &name[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "tenant/vm42/ram0", "x.y_z-1+2@h:3"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/./b",
            "..",
            "a b",
            "é",
            &"x".repeat(256),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(is_under("a/b", "a"));
        assert!(is_under("a/b", "a/"));
        assert!(is_under("a", "a"));
        assert!(is_under("a", ""));
        assert!(!is_under("ab", "a"));
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a", "a/b"]);
    }
}
