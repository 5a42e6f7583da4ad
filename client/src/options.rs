//! How long a client waits for the broker.

use std::time::Duration;

/// Environment variable with the deadline, in seconds, that the CLI and the shim give every
/// wait for the broker (`0` waits for ever).
pub const TIMEOUT_ENV: &str = "MEMBROKER_TIMEOUT";

/// How long connecting and each call wait for the broker's answer unless told otherwise. Long
/// enough for a slow broker (a create backs the whole lease up front, which for a large lease
/// under memory pressure takes seconds), short enough that a stopped broker is noticed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a new [`Client`](crate::Client) (see [`Client::connect_with`](crate::Client::connect_with)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// The deadline of connecting, of the handshake and of every later call: a broker that
    /// does not answer within it (stopped, wedged) fails the call with
    /// [`Error::Timeout`](crate::Error::Timeout). `None` waits for ever.
    pub timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timeout: Some(DEFAULT_TIMEOUT),
        }
    }
}

impl Options {
    /// These options with `timeout` as the deadline (`None`: none).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Options {
        self.timeout = timeout;
        self
    }

    /// The defaults, with the deadline from [`TIMEOUT_ENV`] when it is set.
    pub fn from_env() -> Result<Options, String> {
        match std::env::var(TIMEOUT_ENV) {
            Ok(v) if !v.trim().is_empty() => Ok(Options::default()
                .timeout(parse_timeout(&v).map_err(|e| format!("{TIMEOUT_ENV}={v:?}: {e}"))?)),
            _ => Ok(Options::default()),
        }
    }
}

/// Parses a deadline in seconds (`2`, `0.5`); `0` means none.
pub fn parse_timeout(text: &str) -> Result<Option<Duration>, &'static str> {
    const EXPECTED: &str = "use seconds, like 10 or 0.5 (0: wait for ever)";
    let secs: f64 = text.trim().parse().map_err(|_| EXPECTED)?;
    if !(0.0..=1e9).contains(&secs) {
        return Err(EXPECTED);
    }
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds() {
        assert_eq!(parse_timeout("2"), Ok(Some(Duration::from_secs(2))));
        assert_eq!(parse_timeout(" 0.5 "), Ok(Some(Duration::from_millis(500))));
        assert_eq!(parse_timeout("0"), Ok(None));
        for bad in ["", "x", "-1", "inf", "NaN", "1e12"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
