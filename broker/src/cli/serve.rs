//! `membroker serve`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::error::error_chain;
use crate::journal::Journal;
use crate::namespace::quota::{QuotaSpec, Quotas, SpecScope, Subject};
use crate::pool::{Pool, PoolSpec};
use crate::restore;
use crate::server::{self, Broker, ConnLimits, Listener};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A pool: memfd:NAME:SIZE[:PAGE][:node=N] (PAGE 4K, 2M or 1G; node=N: every page on NUMA
    /// node N, never elsewhere), e.g. memfd:default:4G:2M, or devdax:NAME:REGION[:ALIGN] (ALIGN
    /// 2M or 1G; default 1G where the region holds an aligned GiB, else 2M; the node is the
    /// region's), e.g. devdax:fast:region0:2M. Repeat for more pools; the first is the default.
    /// Without any: memfd:default:SIZE:4K, SIZE half of RAM.
    #[arg(long = "pool", value_name = "SPEC")]
    pools: Vec<PoolSpec>,
    /// Group (name or gid) whose members (primary or supplementary), like root, may manage
    /// every lease and directory.
    #[arg(long, value_name = "GROUP")]
    admin_group: Option<String>,
    /// Threads that zero released device-dax leases before their memory is reused.
    #[arg(long, value_name = "N", default_value_t = 2)]
    scrub_workers: usize,
    /// Mode of the lease namespace's root directory (owned by root). The default 1777 lets
    /// anyone make top-level names, which only their owner may remove; on a multi-tenant
    /// host use 0755 and hand out subtrees (`membroker mkdir --owner UID tenant`). Each uid
    /// may always make its own top-level `uid-UID`.
    #[arg(long, value_name = "MODE", default_value = "1777", value_parser = parse_root_mode)]
    root_mode: u32,
    /// Group (name or gid) that owns the socket (mode 0660): its members may connect.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Where the journal lives [default: /var/lib/membroker for root, else
    /// $XDG_STATE_HOME/membroker or ~/.local/state/membroker].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Do not fdatasync the journal before replies (benchmarks, throw-away brokers: a power
    /// loss may then lose the last changes).
    #[arg(long)]
    no_sync: bool,
    /// After a restart, how long a non-persistent lease waits for its holders to re-attach
    /// before it is released.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    reattach_grace: u64,
    /// A quota on what a uid or group may own: uid:UID:LIMITS, gid:GROUP:LIMITS (name or gid;
    /// shared by the group's leases) or default:LIMITS (each uid but root without a rule of
    /// its own), LIMITS being bytes=SIZE and/or leases=N, e.g. uid:1000:bytes=8G,leases=16.
    /// Repeat for more. A lease counts against its owner and its group.
    #[arg(long = "quota", value_name = "SPEC")]
    quotas: Vec<QuotaSpec>,
    /// Whether a new lease is bound to its creator's security label (AppArmor profile,
    /// SELinux context), so that only processes with that label, root and the admin group may
    /// open, see or change it: `auto` binds it whenever the creator has a label (unconfined
    /// processes have none), `off` never. Leases bound before keep their label.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    bind_labels: BindLabels,
    /// Connections served at once, everyone together.
    #[arg(long, value_name = "N", default_value_t = ConnLimits::default().max)]
    max_connections: usize,
    /// Connections served at once for one uid; root and the admin group are not limited.
    #[arg(long, value_name = "N", default_value_t = ConnLimits::default().per_uid)]
    max_connections_per_uid: usize,
    /// Of --max-connections, how many only root and the admin group may use.
    #[arg(long, value_name = "N", default_value_t = ConnLimits::default().reserve)]
    reserved_connections: usize,
    /// A connection that has not sent Hello within this many seconds is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = ConnLimits::default().hello_timeout.as_secs_f64())]
    hello_timeout: f64,
    /// Open files the broker may have (each connection and each lease takes one). By default
    /// the soft limit is raised to the hard one (LimitNOFILE); a lower N keeps it at N.
    #[arg(long, value_name = "N")]
    open_file_limit: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (anyone who can
    /// reach ADDR may read them: pool usage and request counts, no lease names).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Write the metrics to PATH (e.g. /var/lib/prometheus/node-exporter/membroker.prom) for
    /// node_exporter's textfile collector, every --metrics-interval seconds.
    #[arg(long, value_name = "PATH")]
    metrics_textfile: Option<PathBuf>,
    /// How often --metrics-textfile is rewritten.
    #[arg(long, value_name = "SECONDS", default_value_t = 15.0)]
    metrics_interval: f64,
}

/// `serve --bind-labels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BindLabels {
    Auto,
    Off,
}

/// The quota rules of `--quota` arguments, groups resolved.
fn quotas(specs: &[QuotaSpec]) -> Result<Quotas, String> {
    let mut rules = Vec::new();
    let mut names = std::collections::HashMap::new();
    for spec in specs {
        let subject = match &spec.scope {
            SpecScope::Uid(uid) => Subject::Uid(*uid),
            SpecScope::Default => Subject::Default,
            SpecScope::Group(group) => {
                let gid = group_id(group)?;
                if group.parse::<u32>().is_err() {
                    names.insert(gid, group.clone());
                }
                Subject::Gid(gid)
            }
        };
        rules.push((subject, spec.limit));
    }
    Ok(Quotas::new(rules, names))
}

/// The default state directory.
pub fn default_state_dir() -> PathBuf {
    if rustix::process::getuid().is_root() {
        return PathBuf::from("/var/lib/membroker");
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_STATE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("membroker")
}

fn parse_root_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o1777)
        .ok_or_else(|| format!("mode {s:?}: use octal bits such as 1777 or 0755"))
}

/// Resolves a group name or number.
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?;
    super::table::id_entries(&groups)
        .find_map(|(name, gid)| (name == group).then_some(gid))
        .ok_or_else(|| format!("no group named {group:?} in /etc/group"))
}

pub fn run(socket: &Path, args: ServeArgs) -> Result<(), String> {
    // First, before any thread exists: fds inherited from an upgrade or from systemd.
    let inherited = crate::handover::take();
    init_tracing();
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Before the journal and the leases are opened: each lease holds a file.
    server::set_nofile(args.open_file_limit);
    let admin_gid = args.admin_group.as_deref().map(group_id).transpose()?;
    let socket_gid = args.socket_group.as_deref().map(group_id).transpose()?;
    let quotas = quotas(&args.quotas)?;
    let started = Instant::now();
    let listener = match (inherited.listener, inherited.lock) {
        (Some(sock), Some(lock)) => Listener::adopt(sock, lock, socket, inherited.activated),
        (Some(sock), None) => Listener::activated(sock, socket).map_err(|e| error_chain(&e))?,
        _ => Listener::bind(socket, socket_gid).map_err(|e| error_chain(&e))?,
    };
    if !inherited.source.is_empty() {
        tracing::info!(
            from = inherited.source,
            leases = inherited.leases.len(),
            "took over inherited fds"
        );
    }
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let notifier = crate::notify::Notifier::from_env();
    if let Some(n) = &notifier {
        n.stored_before(inherited.leases.keys().copied());
        n.step("replaying the journal");
    }
    let (journal, replayed) =
        Journal::open(&state_dir, !args.no_sync).map_err(|e| error_chain(&e))?;
    let journal = Arc::new(journal);
    let specs = if args.pools.is_empty() {
        vec![Pool::default_spec()]
    } else {
        args.pools
    };
    let (pools, mut namespace) = restore::restore(
        &specs,
        &replayed,
        inherited.leases,
        &journal,
        args.scrub_workers,
        notifier.as_ref(),
    )?;
    namespace.set_root_mode(args.root_mode);
    namespace.set_bind_labels(args.bind_labels == BindLabels::Auto);
    namespace.set_quotas(quotas);
    let broker = Arc::new(Broker::new(
        pools,
        namespace,
        admin_gid,
        Some(journal),
        notifier,
    ));
    match listener.duplicate() {
        Ok((sock, lock)) => broker.set_handover(sock, lock, listener.is_activated()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot keep hand-over fds; `membroker upgrade` will fail")
        }
    }
    let leases = broker.lease_count();
    tracing::info!(
        leases,
        state_dir = %state_dir.display(),
        ms = started.elapsed().as_millis() as u64,
        "state restored"
    );
    if leases > 0 {
        let (broker, grace) = (broker.clone(), Duration::from_secs(args.reattach_grace));
        std::thread::Builder::new()
            .name("reattach-grace".into())
            .spawn(move || {
                std::thread::sleep(grace);
                broker.expire_orphans();
            })
            .map_err(|e| format!("cannot start the grace timer: {e}"))?;
    }
    start_metrics(
        &broker,
        &args.metrics,
        &args.metrics_textfile,
        args.metrics_interval,
    )?;
    if let Some(n) = broker.notifier() {
        n.ready(&format!("serving {leases} leases"));
    }
    let limits = ConnLimits {
        max: args.max_connections,
        per_uid: args.max_connections_per_uid,
        reserve: args.reserved_connections,
        hello_timeout: Duration::try_from_secs_f64(args.hello_timeout)
            .map_err(|e| format!("--hello-timeout {}: {e}", args.hello_timeout))?,
    };
    let result = server::run(broker.clone(), listener, limits).map_err(|e| error_chain(&e));
    if let Some(n) = broker.notifier() {
        n.stopping();
    }
    result
}

/// `--metrics` and `--metrics-textfile`: threads of their own that read the broker's state.
fn start_metrics(
    broker: &Arc<Broker>,
    addr: &Option<std::net::SocketAddr>,
    textfile: &Option<PathBuf>,
    interval: f64,
) -> Result<(), String> {
    let render = || {
        let broker = broker.clone();
        move || broker.metrics_text()
    };
    if let Some(addr) = addr {
        let bound = crate::metrics::serve_http(*addr, render())?;
        tracing::info!(%bound, "serving metrics at /metrics");
    }
    if let Some(path) = textfile {
        let every = Duration::try_from_secs_f64(interval)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("--metrics-interval {interval}: give a positive number"))?;
        crate::metrics::write_textfile(path.clone(), every, render())?;
        tracing::info!(path = %path.display(), "writing metrics");
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
