//! `membroker exec`: create (or re-attach to) leases, then execute a program that holds them.
//!
//! The program inherits the lease fds and this process's connection to the broker (neither is
//! close-on-exec), so it holds the leases for as long as it runs without speaking the
//! protocol: when it exits the connection closes and its non-persistent leases go back to
//! their pools. `{fd:NAME}` in its arguments becomes the number of lease NAME's fd, e.g.
//! `mem-path=/proc/self/fd/{fd:vm/ram0}` for QEMU's `memory-backend-file`.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

use clap::Args;
use membroker_client::size::{format_size, parse_size};
use membroker_client::{Client, CreateLease, ErrorCode, Lease, PageSize};

use super::{connect, text};

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// A lease for COMMAND, repeatable: created, or re-attached (opened writable) when NAME
    /// exists, in which case its size (and PAGE, if given) must match. NAME may contain ':';
    /// SIZE and PAGE are the last fields.
    #[arg(long = "lease", value_name = "NAME:SIZE[:PAGE]", value_parser = parse_spec)]
    leases: Vec<LeaseSpec>,
    /// Create the leases persistent: they stay after COMMAND exits, until `membroker rm`.
    /// Without it they go back to their pools when COMMAND exits, but also after a broker
    /// restart or upgrade while it runs, since COMMAND cannot re-attach: use it for a VM that
    /// must live through one. Device-dax leases must be persistent.
    #[arg(long)]
    persistent: bool,
    /// Pool to create the leases in [default: the first pool serving their page size].
    #[arg(long)]
    pool: Option<String>,
    /// NUMA node: create the leases in a pool bound to this node (see `membroker df`).
    #[arg(long)]
    node: Option<u32>,
    /// Permission bits, in octal, of the leases created.
    #[arg(long, default_value = "0600", value_parser = super::parse_mode)]
    mode: u32,
    /// The program and its arguments; `{fd:NAME}` in an argument becomes the number of lease
    /// NAME's fd (e.g. mem-path=/proc/self/fd/{fd:vm/ram0}).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// One `--lease NAME:SIZE[:PAGE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSpec {
    name: String,
    size: u64,
    page: Option<PageSize>,
}

/// Parses `NAME:SIZE[:PAGE]`, taking SIZE and PAGE from the end since names may contain ':'.
/// A last field is PAGE only when it is a page size and the field before it is a size.
fn parse_spec(text: &str) -> Result<LeaseSpec, String> {
    let usage =
        || format!("lease {text:?}: use NAME:SIZE[:PAGE], e.g. vm/ram0:256M or vm/ram0:1G:2M");
    let (rest, last) = text.rsplit_once(':').ok_or_else(usage)?;
    let (name, size, page) = match (rest.rsplit_once(':'), last.parse::<PageSize>()) {
        (Some((name, size)), Ok(page)) if parse_size(size).is_ok() => (name, size, Some(page)),
        _ => (rest, last, None),
    };
    if name.is_empty() {
        return Err(usage());
    }
    let size = parse_size(size).map_err(|e| format!("lease {text:?}: {e}"))?;
    Ok(LeaseSpec {
        name: name.to_string(),
        size,
        page,
    })
}

/// The names `{fd:NAME}` refers to in `arg`, in order.
fn references(arg: &[u8]) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = arg;
    while let Some(at) = find(rest, b"{fd:") {
        let after = &rest[at + 4..];
        let end = after.iter().position(|&b| b == b'}').ok_or_else(|| {
            format!(
                "argument {:?}: `{{fd:` without a closing `}}`",
                String::from_utf8_lossy(arg)
            )
        })?;
        let name = std::str::from_utf8(&after[..end]).map_err(|_| {
            format!(
                "argument {:?}: {{fd:...}} names no lease",
                String::from_utf8_lossy(arg)
            )
        })?;
        names.push(name);
        rest = &after[end + 1..];
    }
    Ok(names)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `arg` with every `{fd:NAME}` replaced by `fds[NAME]`; a name not in `fds` is an error
/// that lists the names there are.
fn substitute(arg: &OsStr, fds: &BTreeMap<String, i32>) -> Result<OsString, String> {
    let bytes = arg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    for name in references(bytes)? {
        let pattern = format!("{{fd:{name}}}");
        let at = find(rest, pattern.as_bytes()).expect("references() found it");
        let fd = fds.get(name).ok_or_else(|| {
            let known: Vec<String> = fds.keys().map(|n| format!("{{fd:{n}}}")).collect();
            format!(
                "argument {:?}: {pattern} names no --lease ({})",
                arg.to_string_lossy(),
                if known.is_empty() {
                    "there is none: add --lease NAME:SIZE".to_string()
                } else {
                    format!("known: {}", known.join(", "))
                }
            )
        })?;
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(fd.to_string().as_bytes());
        rest = &rest[at + pattern.len()..];
    }
    out.extend_from_slice(rest);
    Ok(OsString::from_vec(out))
}

/// Creates the lease, or re-attaches to it (writable) when it exists and matches the spec.
fn attach(client: &mut Client, spec: &LeaseSpec, args: &ExecArgs) -> Result<Lease, String> {
    // Twice at most: a lease created by someone else between our Open and our Create is
    // re-attached to.
    for _ in 0..2 {
        match client.open(&spec.name, true) {
            Ok(lease) => return matching(lease, spec),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
            Err(e) => {
                return Err(format!(
                    "cannot re-attach to lease {}: {}",
                    spec.name,
                    text(&e)
                ));
            }
        }
        let mut req = CreateLease::new(spec.name.clone(), spec.size)
            .persistent(args.persistent)
            .mode(args.mode);
        req.page_size = spec.page;
        req.pool = args.pool.clone();
        req.node = args.node;
        match client.create(req) {
            Ok(lease) => return Ok(lease),
            Err(e) if e.code() == Some(ErrorCode::Exists) => {}
            Err(e) => return Err(text(&e)),
        }
    }
    Err(format!(
        "lease {}: appears and disappears under us; try again",
        spec.name
    ))
}

/// An existing lease must be what `--lease` asks for.
fn matching(lease: Lease, spec: &LeaseSpec) -> Result<Lease, String> {
    let mismatch = |what: &str, has: String, asked: String| {
        format!(
            "lease {} exists with {what} {has}, --lease asks {asked}: ask for {has}, or remove it \
             (membroker rm {}) to make a new one",
            spec.name, spec.name
        )
    };
    if lease.size() != spec.size {
        return Err(mismatch(
            "size",
            format_size(lease.size()),
            format_size(spec.size),
        ));
    }
    if let Some(page) = spec.page
        && page != lease.page_size()
    {
        return Err(mismatch(
            "page size",
            lease.page_size().to_string(),
            page.to_string(),
        ));
    }
    Ok(lease)
}

/// Lets `fd` survive `execve`.
fn inherit(fd: BorrowedFd<'_>, what: &str) -> Result<(), String> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
        .map_err(|e| format!("cannot pass {what} to the program (F_SETFD): {e}"))
}

/// `membroker exec`: returns only on failure (after a successful exec this process is
/// COMMAND).
pub fn run(socket: &Path, args: ExecArgs) -> Result<(), String> {
    let (program, program_args) = args.command.split_first().ok_or("no COMMAND after --")?;
    // Everything that can be checked without the broker is checked before any lease exists.
    let mut names = BTreeMap::new();
    for spec in &args.leases {
        if names.insert(spec.name.clone(), 0).is_some() {
            return Err(format!("--lease {} is given twice", spec.name));
        }
    }
    for arg in program_args {
        substitute(arg, &names)?;
    }

    let mut client = connect(socket)?;
    let mut fds = BTreeMap::new();
    let mut leases = Vec::new();
    for spec in &args.leases {
        let lease = attach(&mut client, spec, &args)?;
        if lease.info().device.is_some() && !lease.info().persistent {
            // COMMAND cannot re-attach after a broker restart: the broker would then release
            // the lease and scrub the device under the running program.
            return Err(format!(
                "lease {} is a device-dax lease and not persistent: after a broker restart or                  upgrade the program could not re-attach and the broker would scrub the device                  under it; use --persistent (and membroker rm it afterwards)",
                spec.name
            ));
        }
        inherit(lease.as_fd(), &format!("lease {}", spec.name))?;
        fds.insert(spec.name.clone(), lease.as_fd().as_raw_fd());
        leases.push(lease);
    }
    // The connection is what holds the leases: it goes with the program and closes when it
    // exits. The program may use it as it likes, without this command's deadline.
    client.set_timeout(None).map_err(|e| text(&e))?;
    inherit(client.as_fd(), "the broker connection")?;
    let argv = program_args
        .iter()
        .map(|a| substitute(a, &fds))
        .collect::<Result<Vec<_>, _>>()?;

    let err = std::process::Command::new(program).args(argv).exec();
    let kept = if args.persistent {
        " (persistent leases it made stay: membroker rm NAME)"
    } else {
        ""
    };
    Err(match err.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{}: command not found (give a path, or check PATH){kept}",
            program.to_string_lossy()
        ),
        _ => format!("cannot execute {}: {err}{kept}", program.to_string_lossy()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(pairs: &[(&str, i32)]) -> BTreeMap<String, i32> {
        pairs.iter().map(|(n, f)| (n.to_string(), *f)).collect()
    }

    fn sub(arg: &str, pairs: &[(&str, i32)]) -> Result<String, String> {
        substitute(OsStr::new(arg), &fds(pairs)).map(|s| s.into_string().unwrap())
    }

    #[test]
    fn fd_references_become_fd_numbers() {
        let map = [("vm/ram0", 5), ("vm/ram1", 17)];
        assert_eq!(
            sub(
                "memory-backend-file,id=m0,mem-path=/proc/self/fd/{fd:vm/ram0},share=on",
                &map
            )
            .unwrap(),
            "memory-backend-file,id=m0,mem-path=/proc/self/fd/5,share=on"
        );
        assert_eq!(
            sub("{fd:vm/ram0}+{fd:vm/ram1}+{fd:vm/ram0}", &map).unwrap(),
            "5+17+5"
        );
        assert_eq!(sub("-m", &map).unwrap(), "-m");
        assert_eq!(sub("{fd:a:b}", &[("a:b", 3)]).unwrap(), "3");
        assert_eq!(sub("{fd}{}fd:x", &map).unwrap(), "{fd}{}fd:x");
    }

    #[test]
    fn non_utf8_arguments_pass_through() {
        let arg = OsString::from_vec(b"\xff{fd:x}\xfe".to_vec());
        let out = substitute(&arg, &fds(&[("x", 9)])).unwrap();
        assert_eq!(out.as_bytes(), b"\xff9\xfe");
    }

    #[test]
    fn unknown_or_broken_references_are_errors() {
        let err = sub("path=/proc/self/fd/{fd:vm/ram9}", &[("vm/ram0", 5)]).unwrap_err();
        assert!(err.contains("{fd:vm/ram9} names no --lease"), "{err}");
        assert!(err.contains("known: {fd:vm/ram0}"), "{err}");
        let err = sub("{fd:x}", &[]).unwrap_err();
        assert!(err.contains("add --lease NAME:SIZE"), "{err}");
        let err = sub("/proc/self/fd/{fd:vm/ram0", &[("vm/ram0", 5)]).unwrap_err();
        assert!(err.contains("without a closing"), "{err}");
    }

    #[test]
    fn lease_specs_take_size_and_page_from_the_end() {
        let cases = [
            ("vm/ram0:256M", "vm/ram0", 256 << 20, None),
            ("vm/ram0:1G:2M", "vm/ram0", 1 << 30, Some(PageSize::Huge2M)),
            ("host:a:2M", "host:a", 2 << 20, None),
            ("host:a:4M:4K", "host:a", 4 << 20, Some(PageSize::Base4K)),
        ];
        for (text, name, size, page) in cases {
            let want = LeaseSpec {
                name: name.into(),
                size,
                page,
            };
            assert_eq!(parse_spec(text).unwrap(), want, "{text}");
        }
        for bad in ["vm/ram0", ":2M", "vm:lots", "vm:2M:3M:"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }
}
