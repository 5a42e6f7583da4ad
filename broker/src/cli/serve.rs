//! `membroker serve`.

use std::path::Path;
use std::sync::Arc;

use clap::Args;

use crate::pool::{Pool, PoolSpec};
use crate::server::{self, Broker, Listener, error_chain};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A pool: memfd:NAME:SIZE[:PAGE] (PAGE 4K, 2M or 1G), e.g. memfd:default:4G:2M, or
    /// devdax:NAME:REGION[:ALIGN] (ALIGN 2M or 1G), e.g. devdax:fast:region0:2M. Repeat for more
    /// pools; the first is the default. Without any: memfd:default:<half of RAM>:4K.
    #[arg(long = "pool", value_name = "SPEC")]
    pools: Vec<PoolSpec>,
    /// Group (name or gid) whose members, like root, may manage every lease.
    #[arg(long, value_name = "GROUP")]
    admin_group: Option<String>,
    /// Threads that zero released device-dax leases before their memory is reused.
    #[arg(long, value_name = "N", default_value_t = 2)]
    scrub_workers: usize,
    /// Group (name or gid) that owns the socket (mode 0660): its members may connect.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
}

/// Resolves a group name or number.
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("no group named {group:?} in /etc/group"))
}

pub fn run(socket: &Path, args: ServeArgs) -> Result<(), String> {
    init_tracing();
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let admin_gid = args.admin_group.as_deref().map(group_id).transpose()?;
    let socket_gid = args.socket_group.as_deref().map(group_id).transpose()?;
    let listener = Listener::bind(socket, socket_gid).map_err(|e| error_chain(&e))?;
    let specs = if args.pools.is_empty() {
        vec![Pool::default_spec()]
    } else {
        args.pools
    };
    let mut pools: Vec<Pool> = Vec::new();
    for spec in &specs {
        let pool = Pool::open(spec, args.scrub_workers).map_err(|e| error_chain(&e))?;
        if pools.iter().any(|p| p.name == pool.name) {
            return Err(format!("pool {} is configured twice", pool.name));
        }
        tracing::info!(pool = %pool.describe(), "pool ready");
        pools.push(pool);
    }
    let broker = Arc::new(Broker::new(pools, admin_gid));
    server::run(broker, listener).map_err(|e| error_chain(&e))
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
