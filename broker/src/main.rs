//! `membroker`: the broker daemon (`serve`) and its admin CLI.
#![deny(unsafe_code)]

use membroker::cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A memory broker for virtualization hosts: sells sealed, fixed-size memory leases to VMMs as
/// file descriptors over a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "membroker", version, about, max_term_width = 100)]
struct Args {
    /// Broker socket [default: $MEMBROKER_SOCKET, else /run/membroker/broker.sock for root,
    /// else $XDG_RUNTIME_DIR/membroker/broker.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker daemon.
    Serve(cli::serve::ServeArgs),
    /// List leases, like ls.
    Ls {
        /// Long listing: mode, owner, size, page size, pool, state, holders.
        #[arg(short = 'l')]
        long: bool,
        /// Machine-readable output (a JSON array of leases).
        #[arg(long)]
        json: bool,
        /// Only leases at or under this name.
        prefix: Option<String>,
    },
    /// Describe one lease.
    Stat {
        name: String,
        /// Machine-readable output (a JSON object).
        #[arg(long)]
        json: bool,
    },
    /// Create a lease. From the CLI nobody holds it afterwards, so it is always persistent:
    /// it stays until `membroker rm`.
    Create(cli::CreateArgs),
    /// Remove a lease; its memory returns to the pool once no holder has it open.
    Rm { name: String },
    /// Re-execute the running broker (the binary now on disk) in place, keeping every lease;
    /// clients see at most a reconnect.
    Upgrade,
    /// Show pools: size, used, free, scrubbing, quarantined.
    Df {
        /// Machine-readable output (a JSON array of pools).
        #[arg(long)]
        json: bool,
    },
    /// Show quotas: each limit and what counts against it (yours; an admin sees all).
    Quota {
        /// Machine-readable output (a JSON array of quotas).
        #[arg(long)]
        json: bool,
    },
    /// Show quarantined memory per pool and the leases with reported poison; `clear` returns
    /// a quarantined range to its pool.
    Quarantine {
        /// Machine-readable output (a JSON array of pools).
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<cli::QuarantineCommand>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let socket = args
        .socket
        .unwrap_or_else(membroker_client::default_socket_path);
    let result = match args.command {
        Command::Serve(serve) => cli::serve::run(&socket, serve),
        Command::Ls { long, json, prefix } => {
            cli::ls(&socket, prefix.as_deref().unwrap_or(""), long, json)
        }
        Command::Stat { name, json } => cli::stat(&socket, &name, json),
        Command::Create(create) => cli::create(&socket, create),
        Command::Rm { name } => cli::rm(&socket, &name),
        Command::Df { json } => cli::df(&socket, json),
        Command::Upgrade => cli::upgrade(&socket),
        Command::Quota { json } => cli::quota(&socket, json),
        Command::Quarantine { json, command } => cli::quarantine(&socket, command, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("membroker: {message}");
            ExitCode::FAILURE
        }
    }
}
