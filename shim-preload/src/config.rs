//! Configuration from the environment (the table in the crate's README.md), read once when the
//! library loads.

use std::path::PathBuf;
use std::time::Duration;

use membroker_client::PageSize;
use membroker_client::size::parse_size;

/// Smallest anonymous RAM block redirected when `MEMBROKER_MIN_SIZE` is not set.
pub const DEFAULT_MIN_SIZE: u64 = 64 << 20;

/// What to do when a RAM block cannot be backed by a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The mmap fails (QEMU stops) after a one-line message on stderr.
    Fail,
    /// Plain anonymous memory, after a one-line warning on stderr.
    Anon,
}

/// Everything the shim reads from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Broker socket: `MEMBROKER_SOCKET`, else the client library's default.
    pub socket: PathBuf,
    /// `MEMBROKER_LEASE_PREFIX`: leases are `PREFIX/ram0`, `PREFIX/ram1`, … and re-attached.
    pub prefix: Option<String>,
    /// `MEMBROKER_PERSIST=1`: create persistent leases.
    pub persist: bool,
    /// `MEMBROKER_MIN_SIZE`: smallest RAM block to redirect.
    pub min_size: u64,
    /// `MEMBROKER_POOL`.
    pub pool: Option<String>,
    /// `MEMBROKER_PAGE_SIZE`.
    pub page_size: Option<PageSize>,
    /// `MEMBROKER_FALLBACK`.
    pub fallback: Fallback,
    /// `MEMBROKER_TIMEOUT`: how long a RAM block waits for the broker (`None`: for ever).
    pub timeout: Option<Duration>,
}

/// A variable that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|var| std::env::var(var).ok())
    }

    /// Builds the configuration from `lookup(VAR)`; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |var: &str| lookup(var).filter(|v| !v.trim().is_empty());
        let bad = |var: &'static str, value: &str, expected: &'static str| ConfigError {
            var,
            value: value.to_string(),
            expected,
        };
        let socket = match get("MEMBROKER_SOCKET") {
            Some(path) => PathBuf::from(path),
            None => membroker_client::default_socket_path(),
        };
        let prefix = match get("MEMBROKER_LEASE_PREFIX") {
            Some(p) => {
                let p = p.trim_end_matches('/').to_string();
                if p.is_empty()
                    || p.starts_with('/')
                    || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
                {
                    return Err(bad(
                        "MEMBROKER_LEASE_PREFIX",
                        &p,
                        "use a relative lease path like tenant/vm1",
                    ));
                }
                Some(p)
            }
            None => None,
        };
        let persist = match get("MEMBROKER_PERSIST").as_deref().map(str::trim) {
            None | Some("0" | "no" | "false") => false,
            Some("1" | "yes" | "true") => true,
            Some(v) => return Err(bad("MEMBROKER_PERSIST", v, "use 1 or 0")),
        };
        let min_size = match get("MEMBROKER_MIN_SIZE") {
            Some(v) => parse_size(&v)
                .map_err(|_| bad("MEMBROKER_MIN_SIZE", &v, "use a size like 64M or 1G"))?,
            None => DEFAULT_MIN_SIZE,
        };
        let page_size = match get("MEMBROKER_PAGE_SIZE") {
            Some(v) => Some(
                v.parse::<PageSize>()
                    .map_err(|_| bad("MEMBROKER_PAGE_SIZE", &v, "use 4K, 2M or 1G"))?,
            ),
            None => None,
        };
        let fallback = match get("MEMBROKER_FALLBACK").as_deref().map(str::trim) {
            None | Some("fail") => Fallback::Fail,
            Some("anon") => Fallback::Anon,
            Some(v) => return Err(bad("MEMBROKER_FALLBACK", v, "use fail or anon")),
        };
        let timeout = match get("MEMBROKER_TIMEOUT") {
            Some(v) => membroker_client::options::parse_timeout(&v)
                .map_err(|expected| bad("MEMBROKER_TIMEOUT", &v, expected))?,
            None => Some(membroker_client::DEFAULT_TIMEOUT),
        };
        Ok(Config {
            socket,
            timeout,
            prefix,
            persist,
            min_size,
            pool: get("MEMBROKER_POOL"),
            page_size,
            fallback,
        })
    }

    /// Name of the `index`-th redirected RAM block of process `pid` running as `uid`. The
    /// default prefix lies under `uid-UID`, which the broker lets no other uid make.
    pub fn lease_name(&self, index: u32, pid: u32, uid: u32) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}/ram{index}"),
            None => format!("uid-{uid}/qemu-{pid}/ram{index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let c = config(&[("MEMBROKER_SOCKET", "/tmp/b.sock")]).unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/b.sock"));
        assert_eq!(c.prefix, None);
        assert!(!c.persist);
        assert_eq!(c.min_size, DEFAULT_MIN_SIZE);
        assert_eq!(c.pool, None);
        assert_eq!(c.page_size, None);
        assert_eq!(c.fallback, Fallback::Fail);
        assert_eq!(c.timeout, Some(membroker_client::DEFAULT_TIMEOUT));
        assert_eq!(c.lease_name(2, 77, 1000), "uid-1000/qemu-77/ram2");
    }

    #[test]
    fn everything_set() {
        let c = config(&[
            ("MEMBROKER_SOCKET", "/run/x.sock"),
            ("MEMBROKER_LEASE_PREFIX", "tenant/vm1/"),
            ("MEMBROKER_PERSIST", "1"),
            ("MEMBROKER_MIN_SIZE", "1G"),
            ("MEMBROKER_POOL", "fast"),
            ("MEMBROKER_PAGE_SIZE", "2M"),
            ("MEMBROKER_FALLBACK", "anon"),
            ("MEMBROKER_TIMEOUT", "2.5"),
        ])
        .unwrap();
        assert_eq!(c.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(c.prefix.as_deref(), Some("tenant/vm1"));
        assert!(c.persist);
        assert_eq!(c.min_size, 1 << 30);
        assert_eq!(c.pool.as_deref(), Some("fast"));
        assert_eq!(c.page_size, Some(PageSize::Huge2M));
        assert_eq!(c.fallback, Fallback::Anon);
        assert_eq!(c.lease_name(0, 1, 1000), "tenant/vm1/ram0");
    }

    #[test]
    fn empty_values_are_unset() {
        let c = config(&[
            ("MEMBROKER_SOCKET", "/s"),
            ("MEMBROKER_FALLBACK", ""),
            ("MEMBROKER_MIN_SIZE", " "),
        ])
        .unwrap();
        assert_eq!(c.fallback, Fallback::Fail);
        assert_eq!(c.min_size, DEFAULT_MIN_SIZE);
    }

    #[test]
    fn refuses_bad_values() {
        for (var, value) in [
            ("MEMBROKER_FALLBACK", "maybe"),
            ("MEMBROKER_PERSIST", "2"),
            ("MEMBROKER_MIN_SIZE", "lots"),
            ("MEMBROKER_PAGE_SIZE", "8K"),
            ("MEMBROKER_TIMEOUT", "soon"),
            ("MEMBROKER_LEASE_PREFIX", "/abs"),
            ("MEMBROKER_LEASE_PREFIX", "a/../b"),
        ] {
            let err = config(&[("MEMBROKER_SOCKET", "/s"), (var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }
}
