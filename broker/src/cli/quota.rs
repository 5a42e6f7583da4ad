//! `membroker quota` and `membroker quarantine`: limits and their usage, quarantined memory.

use std::path::Path;

use clap::Subcommand;
use membroker_client::proto::{QuarantineInfo, QuotaInfo};
use membroker_client::size::{format_size, parse_size};

use super::table::Table;
use super::{connect, json, text};

pub fn quota(socket: &Path, as_json: bool) -> Result<(), String> {
    let quotas: Vec<QuotaInfo> = connect(socket)?.quota().map_err(|e| text(&e))?;
    if as_json {
        return json(&quotas);
    }
    if quotas.is_empty() {
        println!("no quota limits you");
        return Ok(());
    }
    let mut t = Table::new(
        &[
            "QUOTA",
            "BYTES USED",
            "BYTES LIMIT",
            "LEASES",
            "LEASE LIMIT",
        ],
        &[false, true, true, true, true],
    );
    let limit = |l: Option<u64>, show: fn(u64) -> String| l.map_or("-".into(), show);
    for q in &quotas {
        let who = if q.default && q.scope == "uid" {
            format!("{} (default)", q.label)
        } else {
            q.label.clone()
        };
        t.row(vec![
            who,
            format_size(q.bytes_used),
            limit(q.bytes_limit, format_size),
            q.leases_used.to_string(),
            limit(q.leases_limit, |n| n.to_string()),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Return a quarantined physical range of a device-dax pool to its free memory, after a
    /// report turned out false (root or the admin group). START and LEN take sizes such as
    /// 0x140000000 or 2M; without LEN, one page of the pool.
    Clear {
        pool: String,
        /// START[+LEN], physical addresses as `membroker quarantine` shows them.
        range: String,
    },
}

fn parse_number(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).map_err(|e| format!("{s:?}: {e}")),
        None => parse_size(s).map_err(|e| e.to_string()),
    }
}

pub fn quarantine(
    socket: &Path,
    command: Option<QuarantineCommand>,
    as_json: bool,
) -> Result<(), String> {
    let mut client = connect(socket)?;
    if let Some(QuarantineCommand::Clear { pool, range }) = command {
        let (start, len) = match range.split_once('+') {
            Some((start, len)) => (parse_number(start)?, Some(parse_number(len)?)),
            None => (parse_number(&range)?, None),
        };
        let len = match len {
            Some(len) => len,
            None => {
                let pools = client.df().map_err(|e| text(&e))?;
                let info = pools
                    .iter()
                    .find(|p| p.name == pool)
                    .ok_or_else(|| format!("no pool named {pool:?}"))?;
                info.page_size.bytes()
            }
        };
        client
            .clear_quarantine(&pool, start, len)
            .map_err(|e| text(&e))?;
        println!(
            "pool {pool}: {start:#x}+{} is back in the free memory",
            format_size(len)
        );
        return Ok(());
    }
    let pools: Vec<QuarantineInfo> = client.quarantine().map_err(|e| text(&e))?;
    if as_json {
        return json(&pools);
    }
    let mut t = Table::new(
        &["POOL", "WHAT", "RANGE", "SIZE"],
        &[false, false, false, true],
    );
    for p in &pools {
        for r in &p.ranges {
            t.row(vec![
                p.pool.clone(),
                "quarantined".into(),
                format!("{:#x}+{:#x}", r.start, r.len),
                format_size(r.len),
            ]);
        }
        for l in &p.leases {
            for r in &l.poison {
                t.row(vec![
                    p.pool.clone(),
                    format!("lease {}", l.name),
                    format!("{:#x}+{:#x}", r.offset, r.len),
                    format_size(r.len),
                ]);
            }
        }
    }
    print!("{}", t.render());
    Ok(())
}
