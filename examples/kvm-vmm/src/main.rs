//! `membroker-kvm-vmm`: a tiny VMM on KVM whose guest RAM is a membroker lease.
//!
//! It creates the persistent lease NAME (or re-attaches to it), turns it into rust-vmm guest
//! memory with [`Lease::guest_region`], and runs a real-mode guest that increments a counter
//! kept in that memory and writes `MEMBROKER-KVM <counter>` at guest-physical 0x1000. The VMM
//! prints the line: `MEMBROKER-KVM 1` on a new lease, one more on each later run, across
//! broker restarts and upgrades too.
#![deny(unsafe_code)]

mod guest;
mod sys;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use membroker_client::size::{format_size, parse_size};
use membroker_client::{Client, CreateLease, ErrorCode, Lease, error_chain};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Runs a tiny real-mode guest on /dev/kvm in the memory of a membroker lease.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Broker socket (default: $MEMBROKER_SOCKET, else the broker's default path).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Lease to create (persistent) or re-attach to; it is the guest's RAM.
    #[arg(long)]
    lease: String,
    /// Guest RAM size, e.g. 2M; an existing lease must have this size.
    #[arg(long, value_parser = parse_size_arg)]
    size: u64,
    /// Pool to create the lease from (default: the broker's default pool); its page size is
    /// the guest RAM's.
    #[arg(long)]
    pool: Option<String>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// What can go wrong, for the message the VMM exits with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Broker(#[from] membroker_client::Error),
    #[error("{op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("guest memory layout")]
    Layout(#[from] vm_memory::GuestRegionCollectionError),
    #[error("{0}")]
    Usage(String),
    #[error("guest: {0}")]
    Guest(String),
}

impl Error {
    fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}

/// Re-attaches to the lease writable, or creates it persistent when it does not exist yet.
fn attach(client: &mut Client, args: &Args) -> Result<Lease, Error> {
    let (name, size) = (args.lease.as_str(), args.size);
    let lease = match client.open(name, true) {
        Err(e) if e.code() == Some(ErrorCode::NotFound) => {
            let mut req = CreateLease::new(name, size).persistent(true);
            if let Some(pool) = &args.pool {
                req = req.pool(pool.as_str());
            }
            client.create(req)?
        }
        other => other?,
    };
    if lease.size() != size {
        return Err(Error::Usage(format!(
            "lease {name} is {}, --size asks for {}",
            format_size(lease.size()),
            format_size(size)
        )));
    }
    Ok(lease)
}

fn run(args: &Args) -> Result<(), Error> {
    if args.size < guest::MIN_RAM {
        return Err(Error::Usage(format!(
            "--size {} is too small: the guest needs {}",
            format_size(args.size),
            format_size(guest::MIN_RAM)
        )));
    }
    let mut client = match &args.socket {
        Some(path) => Client::connect(path)?,
        None => Client::connect_default()?,
    };
    let lease = attach(&mut client, args)?;
    // The few lines a rust-vmm VMM needs: the lease as a region at guest-physical 0.
    let ram = lease.guest_region(GuestAddress(0))?;
    let memory = GuestMemoryMmap::from_regions(vec![ram])?;

    let line = vm::run(memory)?;
    println!("{line}");
    client.release(&args.lease)?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    // A guest that never halts: say so and exit; the vCPU thread goes with the process.
    std::thread::spawn(|| {
        std::thread::sleep(vm::TIMEOUT);
        eprintln!(
            "membroker-kvm-vmm: guest: did not halt within {} s",
            vm::TIMEOUT.as_secs()
        );
        std::process::exit(2);
    });
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("membroker-kvm-vmm: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
