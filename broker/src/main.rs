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
        /// Directories too (`NAME/`), in name order with the leases.
        #[arg(short = 'd', long)]
        dirs: bool,
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
    /// Remove a lease (its memory returns to the pool once no holder has it open), or an
    /// empty directory.
    Rm { name: String },
    /// Make a directory of the lease namespace: who may make names under it is decided by
    /// its owner, group and mode, like a file system's.
    Mkdir(cli::dirs::MkdirArgs),
    /// Change the mode of a lease (0777 bits) or a directory (01777: with the sticky bit).
    Chmod {
        /// Octal bits, e.g. 0640 or 1777.
        mode: String,
        name: String,
    },
    /// Change the owner (root and the admin group) and/or group of a lease or a directory.
    Chown {
        /// UID, UID:GID or :GID (numbers).
        owner: String,
        name: String,
    },
    /// Re-execute the running broker (the binary now on disk) in place, keeping every lease;
    /// clients see at most a reconnect.
    Upgrade,
    /// Show pools: size, used, free, scrubbing, quarantined.
    Df {
        /// Machine-readable output (a JSON array of pools).
        #[arg(long)]
        json: bool,
    },
    /// Create (or re-attach to) leases, then execute COMMAND, which holds them while it runs:
    /// it inherits their fds and this connection, and `{fd:NAME}` in its arguments becomes
    /// the number of lease NAME's fd.
    Exec(cli::exec::ExecArgs),
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
    /// libvirt's qemu hook (/etc/libvirt/hooks/qemu execs it): makes a domain's leases
    /// before QEMU starts, sized from the domain XML on stdin, and removes them after it
    /// stops. See contrib/libvirt/.
    LibvirtHook(cli::libvirt::HookArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let socket = args
        .socket
        .unwrap_or_else(membroker_client::default_socket_path);
    let result = match args.command {
        Command::Serve(serve) => cli::serve::run(&socket, serve),
        Command::Ls {
            long,
            json,
            dirs,
            prefix,
        } => cli::ls(&socket, prefix.as_deref().unwrap_or(""), long, json, dirs),
        Command::Stat { name, json } => cli::stat(&socket, &name, json),
        Command::Create(create) => cli::create(&socket, create),
        Command::Rm { name } => cli::rm(&socket, &name),
        Command::Mkdir(args) => cli::dirs::mkdir(&socket, args),
        Command::Chmod { mode, name } => cli::dirs::chmod(&socket, &mode, &name),
        Command::Chown { owner, name } => cli::dirs::chown(&socket, &owner, &name),
        Command::Df { json } => cli::df(&socket, json),
        Command::Upgrade => cli::upgrade(&socket),
        Command::Exec(exec) => cli::exec::run(&socket, exec),
        Command::Quota { json } => cli::quota(&socket, json),
        Command::Quarantine { json, command } => cli::quarantine(&socket, command, json),
        Command::LibvirtHook(hook) => cli::libvirt::run(&socket, hook),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("membroker: {message}");
            ExitCode::FAILURE
        }
    }
}
