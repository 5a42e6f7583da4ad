//! Prometheus metrics: pool usage, leases by state, connections, requests and their latency,
//! journal syncs. `serve --metrics ADDR` serves them at `/metrics` from a thread of its own
//! (a scrape takes the namespace lock as briefly as a `df` does, never the event loop; the
//! server bounds what its clients take, see `metrics/http.rs`), and
//! `--metrics-textfile PATH` writes the same text for node_exporter's textfile collector.
//!
//! Requests are counted in one place, `Broker::handle`, into fixed per-operation slots (no
//! map lookup, no lock but the latency histogram's own); gauges are read at scrape time. No
//! metric has a per-lease label, so the number of series does not grow with the leases.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use membroker_client::proto::{ErrorCode, PoolInfo, PoolKind, Request, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::namespace::LeaseStates;

mod http;

/// The `op` label of each request kind, by its wire discriminant ([`Request::kind`]) less one.
const OPS: [&str; 17] = [
    "hello",
    "create",
    "open",
    "release",
    "remove",
    "stat",
    "list",
    "df",
    "report_poison",
    "upgrade",
    "mkdir",
    "chmod",
    "chown",
    "dirs",
    "quota",
    "quarantine",
    "clear_quarantine",
];

/// The `result` label: `ok`, or the error code of the reply, indexed by [`result`].
const RESULTS: [&str; 10] = [
    "ok",
    "protocol",
    "version",
    "not_found",
    "exists",
    "permission_denied",
    "invalid_argument",
    "no_space",
    "out_of_memory",
    "internal",
];

/// A request's kind: its slot among the `op` labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op(usize);

impl Op {
    pub fn of(request: &Request) -> Op {
        Op(usize::from(request.kind()).saturating_sub(1))
    }
}

/// A reply's slot in [`RESULTS`].
fn result(response: &Response) -> usize {
    match response {
        Response::Error { code, .. } => match code {
            ErrorCode::Protocol => 1,
            ErrorCode::Version => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::Exists => 4,
            ErrorCode::PermissionDenied => 5,
            ErrorCode::InvalidArgument => 6,
            ErrorCode::NoSpace => 7,
            ErrorCode::OutOfMemory => 8,
            ErrorCode::Internal => 9,
        },
        _ => 0,
    }
}

/// Upper bounds (seconds) of the request latency buckets: a `stat` takes microseconds, a
/// `create` waits for a journal sync, a device-dax `create` makes a device.
const REQUEST_BUCKETS: [f64; 14] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1.0,
    10.0,
];

/// Upper bounds (seconds) of the journal `fdatasync` buckets.
const SYNC_BUCKETS: [f64; 12] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1.0, 10.0,
];

/// What the broker counts as it serves; shared with the scrapers.
#[derive(Debug)]
pub struct Metrics {
    /// By op, then result.
    requests: Vec<[Counter; RESULTS.len()]>,
    /// By op.
    durations: Vec<Histogram>,
    journal_sync: Histogram,
    connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: OPS.iter().map(|_| Default::default()).collect(),
            durations: OPS
                .iter()
                .map(|_| Histogram::new(REQUEST_BUCKETS))
                .collect(),
            journal_sync: Histogram::new(SYNC_BUCKETS),
            connections: Gauge::default(),
        }
    }
}

/// What a scrape reads from the broker: per pool, its usage and its leases by state.
#[derive(Debug, Clone)]
pub struct State {
    pub pools: Vec<(PoolInfo, LeaseStates)>,
}

impl Metrics {
    /// Counts one answered request and how long it took.
    pub fn request(&self, Op(op): Op, response: &Response, took: Duration) {
        // A request kind newer than [`OPS`] is not counted (a unit test keeps them in step).
        if let (Some(counters), Some(duration)) = (self.requests.get(op), self.durations.get(op)) {
            counters[result(response)].inc();
            duration.observe(took.as_secs_f64());
        }
    }

    /// A connection was admitted.
    pub fn connected(&self) {
        self.connections.inc();
    }

    /// An admitted connection ended.
    pub fn disconnected(&self) {
        self.connections.dec();
    }

    /// The histogram the journal records its syncs in.
    pub fn journal_sync(&self) -> Histogram {
        self.journal_sync.clone()
    }

    /// The Prometheus text exposition (format 0.0.4) of everything, `state` included.
    pub fn encode(self: &Arc<Self>, state: State) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape {
            metrics: self.clone(),
            state,
        }));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("writing to a String does not fail");
        text
    }
}

/// A per-pool gauge: name, help, and its value read from the pool's `df` line.
type PoolGauge = (&'static str, &'static str, fn(&PoolInfo) -> u64);

/// One scrape: the counters so far and the state read for it.
#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    state: State,
}

fn kind_name(kind: PoolKind) -> &'static str {
    match kind {
        PoolKind::Memfd => "memfd",
        PoolKind::Devdax => "devdax",
    }
}

/// Writes one gauge family: its descriptor, then one sample per label set.
fn gauges<L, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.metrics;
        let pools = &self.state.pools;
        let pool_labels = |p: &PoolInfo| {
            [
                ("pool", p.name.clone()),
                ("kind", kind_name(p.kind).to_string()),
                ("page_size", p.page_size.to_string()),
            ]
        };
        let by_pool: [PoolGauge; 5] = [
            (
                "membroker_pool_size_bytes",
                "Bytes the pool manages.",
                |p| p.size,
            ),
            (
                "membroker_pool_used_bytes",
                "Bytes of the pool given to leases.",
                |p| p.used,
            ),
            (
                "membroker_pool_free_bytes",
                "Bytes of the pool a new lease may get (device-dax: free aligned space).",
                |p| p.free,
            ),
            (
                "membroker_pool_scrubbing_bytes",
                "Bytes of released device-dax leases being zeroed before reuse.",
                |p| p.scrubbing,
            ),
            (
                "membroker_pool_quarantined_bytes",
                "Bytes kept out of use after memory errors.",
                |p| p.quarantined,
            ),
        ];
        for (name, help, value) in by_pool {
            let samples = pools.iter().map(|(p, _)| (pool_labels(p), value(p)));
            gauges(&mut encoder, name, help, samples)?;
        }
        let states = pools.iter().flat_map(|(p, s)| {
            [
                ("held", s.held),
                ("idle", s.idle),
                ("removed", s.removed),
                ("orphaned", s.orphaned),
            ]
            .map(|(state, n)| ([("pool", p.name.clone()), ("state", state.into())], n))
        });
        gauges(
            &mut encoder,
            "membroker_leases",
            "Leases by pool and state: held, idle (persistent, unheld), removed (memory kept \
             until the last holder goes), orphaned (not persistent, restored after a restart, holders \
             not back yet).",
            states,
        )?;
        gauges(
            &mut encoder,
            "membroker_connections",
            "Client connections open.",
            [([] as [(&str, &str); 0], m.connections.get())],
        )?;
        let mut family = encoder.encode_descriptor(
            "membroker_requests",
            "Requests answered, by operation and result (ok or the error code).",
            None,
            MetricType::Counter,
        )?;
        for (op, counters) in OPS.iter().zip(&m.requests) {
            for (result, counter) in RESULTS.iter().zip(counters) {
                if counter.get() > 0 {
                    let labels = [("op", *op), ("result", *result)];
                    counter.encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "membroker_request_duration_seconds",
            "Time to answer a request, journal sync included, by operation.",
            None,
            MetricType::Histogram,
        )?;
        for ((op, histogram), counters) in OPS.iter().zip(&m.durations).zip(&m.requests) {
            if counters.iter().any(|c| c.get() > 0) {
                histogram.encode(family.encode_family(&[("op", *op)])?)?;
            }
        }
        m.journal_sync.encode(encoder.encode_descriptor(
            "membroker_journal_sync_duration_seconds",
            "Time of each fdatasync of the journal (one serves every change written before it).",
            None,
            MetricType::Histogram,
        )?)?;
        gauges(
            &mut encoder,
            "membroker_build_info",
            "The broker's version; always 1.",
            [([("version", env!("CARGO_PKG_VERSION"))], 1)],
        )
    }
}

/// `Content-Type` of the exposition.
const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Serves `GET /metrics` on `addr` from a thread of its own (`metrics/http.rs`: one thread whatever
/// the clients do, a bounded number of connections, each with a deadline); `render` makes the
/// text. Anything else is answered 404, 405 or 400.
pub fn serve_http(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> Result<SocketAddr, String> {
    let server = http::Server::bind(addr, http::LIMITS, render)
        .map_err(|e| format!("--metrics {addr}: cannot listen: {e}"))?;
    let bound = server
        .local_addr()
        .map_err(|e| format!("--metrics {addr}: cannot read the bound address: {e}"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || server.run())
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok(bound)
}

/// Writes the text to `path` now and then every `every`, from a thread of its own: to a
/// temporary file beside it, renamed over it, so a reader never sees half of it.
pub fn write_textfile(
    path: PathBuf,
    every: Duration,
    render: impl Fn() -> String + Send + 'static,
) -> Result<(), String> {
    write_atomically(&path, &render())?;
    std::thread::Builder::new()
        .name("metrics-textfile".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                if let Err(e) = write_atomically(&path, &render()) {
                    tracing::warn!(error = e, "metrics text file not written");
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok(())
}

fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    // node_exporter reads only `*.prom`: the temporary name is not one.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let failed = |what: &str, e: std::io::Error| format!("{what} {}: {e}", tmp.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| failed("cannot create", e))?;
    // The broker's umask (077) would keep node_exporter, another user, out.
    let readable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644);
    file.set_permissions(readable)
        .map_err(|e| failed("cannot chmod", e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| failed("cannot write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| failed("cannot rename", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_and_error_code_has_its_own_slot() {
        let last = Request::ClearQuarantine {
            pool: String::new(),
            start: 0,
            len: 0,
        };
        assert_eq!(Op::of(&last), Op(OPS.len() - 1), "the newest request kind");
        assert_eq!(OPS[Op::of(&Request::Df).0], "df");
        assert_eq!(OPS[Op::of(&Request::Upgrade).0], "upgrade");
        let codes = [
            ErrorCode::Protocol,
            ErrorCode::Version,
            ErrorCode::NotFound,
            ErrorCode::Exists,
            ErrorCode::PermissionDenied,
            ErrorCode::InvalidArgument,
            ErrorCode::NoSpace,
            ErrorCode::OutOfMemory,
            ErrorCode::Internal,
        ];
        for code in codes {
            let response = Response::Error {
                code,
                message: String::new(),
            };
            // The label is the code's own wire name.
            let name = serde_json::to_value(code).expect("serialize");
            assert_eq!(Some(RESULTS[result(&response)]), name.as_str());
        }
    }

    #[test]
    fn a_scrape_counts_requests_and_leaves_out_unused_ones() {
        let metrics = Arc::new(Metrics::default());
        metrics.request(
            Op::of(&Request::Df),
            &Response::Ok,
            Duration::from_micros(30),
        );
        metrics.connected();
        let text = metrics.encode(State { pools: Vec::new() });
        assert!(text.contains("membroker_requests_total{op=\"df\",result=\"ok\"} 1\n"));
        assert!(!text.contains("op=\"create\""));
        assert!(text.contains("membroker_request_duration_seconds_count{op=\"df\"} 1\n"));
        assert!(text.contains("membroker_connections 1\n"));
        assert!(text.contains("membroker_build_info{version="));
    }
}
