//! The admin CLI: ls, stat, create, rm, mkdir, chmod, chown, df, exec. Each talks to a
//! running broker.

pub mod dirs;
pub mod exec;
pub mod libvirt;
mod quota;
pub mod serve;
mod table;

use std::path::Path;

use clap::Args;
use membroker_client::proto::{LeaseInfo, LeaseTotals, MAX_LISTED, PoolInfo};
use membroker_client::size::{format_size, parse_size};
use membroker_client::{BindLabel, Client, CreateLease, Error, Options, PageSize, TIMEOUT_ENV};

pub use quota::{QuarantineCommand, quarantine, quota};
use table::{Names, Table, mode_string};

/// Connects with the deadline of `MEMBROKER_TIMEOUT` (default 10 s) on every wait.
fn connect(socket: &Path) -> Result<Client, String> {
    let options = Options::from_env()?;
    Client::connect_with(socket, options).map_err(|e| match &e {
        Error::Connect { source, .. } => format!(
            "cannot connect to the broker at {}: {source}; is `membroker serve` running? \
             (--socket or MEMBROKER_SOCKET name another socket)",
            socket.display()
        ),
        _ => text(&e),
    })
}

fn text(e: &Error) -> String {
    let text = crate::error::error_chain(e);
    if let Error::Timeout { .. } = e {
        return format!(
            "{text} (is it stopped or overloaded? {TIMEOUT_ENV} sets the deadline in seconds)"
        );
    }
    text
}

fn json<T: serde::Serialize>(value: &T) -> Result<(), String> {
    let out =
        serde_json::to_string_pretty(value).map_err(|e| format!("cannot format JSON: {e}"))?;
    println!("{out}");
    Ok(())
}

fn state(lease: &LeaseInfo) -> String {
    format!("{:?}", lease.state).to_lowercase()
}

pub fn ls(
    socket: &Path,
    prefix: &str,
    long: bool,
    as_json: bool,
    with_dirs: bool,
) -> Result<(), String> {
    let mut client = connect(socket)?;
    let leases = client.list(prefix).map_err(|e| text(&e))?;
    if as_json {
        return json(&leases);
    }
    let dirs = if with_dirs {
        client.dirs(prefix).map_err(|e| text(&e))?
    } else {
        Vec::new()
    };
    if !long {
        let mut names: Vec<String> = leases.iter().map(|l| l.name.clone()).collect();
        names.extend(dirs.iter().map(|d| format!("{}/", d.path)));
        names.sort();
        for name in names {
            println!("{name}");
        }
        return Ok(());
    }
    let names = Names::load();
    let mut t = Table::new(
        &[
            "MODE", "OWNER", "GROUP", "SIZE", "PAGE", "POOL", "PERSIST", "STATE", "HOLDERS", "NAME",
        ],
        &[
            false, false, false, true, true, false, false, false, true, false,
        ],
    );
    let mut rows: Vec<(String, Vec<String>)> = dirs
        .iter()
        .map(|d| (format!("{}/", d.path), dirs::long_row(d, &names)))
        .collect();
    for l in &leases {
        rows.push((
            l.name.clone(),
            vec![
                mode_string(l.mode),
                names.user(l.uid),
                names.group(l.gid),
                format_size(l.size),
                l.page_size.to_string(),
                l.pool.clone(),
                if l.persistent { "yes" } else { "no" }.into(),
                state(l),
                // The broker lists at most MAX_LISTED (`stat` counts them all).
                match l.holders.len() {
                    n if n >= MAX_LISTED => format!("{n}+"),
                    n => n.to_string(),
                },
                l.name.clone(),
            ],
        ));
    }
    rows.sort();
    for (_, row) in rows {
        t.row(row);
    }
    print!("{}", t.render());
    Ok(())
}

/// The `owner:` and `mode:` lines of `stat`.
fn print_owner(names: &Names, uid: u32, gid: u32, mode: u32, bits: &str) {
    println!(
        "owner:      {} ({uid}), group {} ({gid})",
        names.user(uid),
        names.group(gid),
    );
    println!("mode:       {mode:04o} ({bits})");
}

/// A listing the broker cut short ends with how many it left out.
fn more(items: &mut Vec<String>, total: u64) {
    let left_out = total.saturating_sub(items.len() as u64);
    if left_out > 0 {
        items.push(format!("... and {left_out} more"));
    }
}

/// A lease's description; `totals` counts what it lists (zeros: as many as it lists).
fn print_lease(l: &LeaseInfo, totals: &LeaseTotals) {
    let names = Names::load();
    println!("name:       {}", l.name);
    println!("size:       {} ({} bytes)", format_size(l.size), l.size);
    println!("page size:  {}", l.page_size);
    println!("pool:       {}", l.pool);
    print_owner(&names, l.uid, l.gid, l.mode, &mode_string(l.mode));
    println!("persistent: {}", if l.persistent { "yes" } else { "no" });
    println!("state:      {}", state(l));
    println!("created:    {} (unix time)", l.created);
    let mut extents: Vec<String> = l
        .extents
        .iter()
        .map(|e| format!("{:#x}+{}", e.start, format_size(e.len)))
        .collect();
    more(&mut extents, totals.extents);
    println!("extents:    {}", extents.join(", "));
    if let Some(device) = &l.device {
        println!("device:     /dev/{device}");
    }
    if let Some(label) = &l.label {
        println!("label:      {label} (only processes with this label may open it)");
    }
    let mut holders: Vec<String> = l
        .holders
        .iter()
        .map(|h| format!("pid {} (uid {})", h.pid, h.uid))
        .collect();
    more(&mut holders, totals.holders);
    println!(
        "holders:    {}",
        if holders.is_empty() {
            "none".into()
        } else {
            holders.join(", ")
        }
    );
    if !l.poison.is_empty() {
        let mut poison: Vec<String> = l
            .poison
            .iter()
            .map(|p| format!("{:#x}+{}", p.offset, format_size(p.len)))
            .collect();
        more(&mut poison, totals.poison);
        println!("poison:     {}", poison.join(", "));
    }
}

pub fn stat(socket: &Path, name: &str, as_json: bool) -> Result<(), String> {
    let mut client = connect(socket)?;
    let described = match client.describe(name) {
        // A broker from before `Describe` closes the connection: ask it the old way.
        Err(e) if e.code() == Some(membroker_client::ErrorCode::Protocol) => {
            client = connect(socket)?;
            client.stat(name).map(|l| (l, LeaseTotals::default()))
        }
        described => described,
    };
    let (lease, totals) = match described {
        Ok(described) => described,
        Err(e) if e.code() == Some(membroker_client::ErrorCode::NotFound) => {
            let path = name.trim_end_matches('/');
            let dirs = client.dirs(path).map_err(|e| text(&e))?;
            let Some(dir) = dirs.iter().find(|d| d.path == path) else {
                return Err(text(&e));
            };
            if as_json {
                return json(dir);
            }
            dirs::print_dir(dir);
            return Ok(());
        }
        Err(e) => return Err(text(&e)),
    };
    if as_json {
        return json(&lease);
    }
    print_lease(&lease, &totals);
    Ok(())
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Lease name, a path such as tenant/vm1/ram0.
    name: String,
    /// Size: bytes or 4K, 2M, 1G, 1.5G; a multiple of the page size.
    #[arg(long, value_parser = parse_size_arg)]
    size: u64,
    /// Page size: 4K, 2M or 1G [default: the pool's].
    #[arg(long)]
    page_size: Option<PageSize>,
    /// Pool to take the memory from [default: the first pool serving the page size (and the
    /// node)].
    #[arg(long)]
    pool: Option<String>,
    /// NUMA node: take the memory from a pool bound to this node (see `membroker df`).
    #[arg(long)]
    node: Option<u32>,
    /// Keep the lease until `membroker rm` (always the case from the CLI; accepted for clarity).
    #[arg(long)]
    persistent: bool,
    /// Permission bits in octal, like a file's.
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    mode: u32,
    /// Owner uid (root or the admin group only) [default: yours].
    #[arg(long)]
    owner: Option<u32>,
    /// Bind the lease to this security label (an AppArmor profile) instead of yours, for a
    /// confined process that starts later (root or the admin group only).
    #[arg(long, conflicts_with = "no_label")]
    label: Option<String>,
    /// Bind the lease to no security label: owner and mode alone protect it (root or the
    /// admin group only).
    #[arg(long)]
    no_label: bool,
    /// Machine-readable output (a JSON object).
    #[arg(long)]
    json: bool,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("mode {s:?}: use octal permission bits such as 0600 or 0640"))
}

pub fn create(socket: &Path, args: CreateArgs) -> Result<(), String> {
    let mut req = CreateLease::new(args.name, args.size)
        .persistent(true)
        .mode(args.mode);
    req.page_size = args.page_size;
    req.pool = args.pool;
    req.owner = args.owner;
    req.node = args.node;
    req.label = match (args.label, args.no_label) {
        (Some(label), _) => BindLabel::Named(label),
        (None, true) => BindLabel::Unbound,
        (None, false) => BindLabel::Creator,
    };
    let lease = connect(socket)?.create(req).map_err(|e| text(&e))?;
    if args.json {
        return json(lease.info());
    }
    print_lease(lease.info(), &LeaseTotals::default());
    Ok(())
}

pub fn rm(socket: &Path, name: &str) -> Result<(), String> {
    connect(socket)?.remove(name).map_err(|e| text(&e))
}

pub fn df(socket: &Path, as_json: bool) -> Result<(), String> {
    let pools: Vec<PoolInfo> = connect(socket)?.df().map_err(|e| text(&e))?;
    if as_json {
        return json(&pools);
    }
    let mut t = Table::new(
        &[
            "POOL",
            "KIND",
            "PAGE",
            "SIZE",
            "USED",
            "FREE",
            "SCRUBBING",
            "QUARANTINED",
            "LEASES",
            "NODE",
            "KERNEL",
            "BROKER",
        ],
        &[
            false, false, true, true, true, true, true, true, true, true, true, true,
        ],
    );
    for p in &pools {
        let name = if p.default {
            format!("{} (default)", p.name)
        } else {
            p.name.clone()
        };
        t.row(vec![
            name,
            format!("{:?}", p.kind).to_lowercase(),
            p.page_size.to_string(),
            format_size(p.size),
            format_size(p.used),
            format_size(p.free),
            format_size(p.scrubbing),
            format_size(p.quarantined),
            p.leases.to_string(),
            p.node.map_or_else(|| "-".to_string(), |n| n.to_string()),
            format_size(p.kernel_overhead),
            format_size(p.broker_metadata),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// `membroker upgrade`: ask for the re-exec, then wait for the new broker to answer.
pub fn upgrade(socket: &Path) -> Result<(), String> {
    use membroker_client::proto::{Request, Response};
    let started = std::time::Instant::now();
    let mut client = connect(socket)?;
    let before = client.server().to_string();
    match client.call(&Request::Upgrade).map_err(|e| text(&e))? {
        (Response::Ok, _) => {}
        (other, _) => return Err(format!("unexpected reply to Upgrade: {other:?}")),
    }
    // The broker now either closes this connection (exec'd) or reports why it could not.
    let mut buf = vec![0u8; membroker_client::codec::MAX_MSG_SIZE + 1];
    if let Ok(got) = membroker_client::transport::recv(std::os::fd::AsFd::as_fd(&client), &mut buf)
        && let Ok((_, Response::Error { message, .. })) =
            membroker_client::codec::decode_response(&buf[..got.len])
    {
        return Err(message);
    }
    let deadline = started + std::time::Duration::from_secs(30);
    loop {
        if let Ok(mut again) = connect(socket)
            && again.server() != before
        {
            let leases = again.list("").map_err(|e| text(&e))?.len();
            println!(
                "upgraded in {} ms: {} (was {before}); leases kept: {leases}",
                started.elapsed().as_millis(),
                again.server()
            );
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the broker at {} did not come back within 30 s after the upgrade",
                socket.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
