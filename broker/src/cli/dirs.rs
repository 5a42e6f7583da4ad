//! `mkdir`, `chmod`, `chown`, and directories in `ls` and `stat`.

use std::path::Path;

use clap::Args;
use membroker_client::{DirInfo, Mkdir};

use super::table::Names;
use super::{connect, text};

#[derive(Debug, Args)]
pub struct MkdirArgs {
    /// Directory, a path such as tenant or tenant/vm1.
    dir: String,
    /// Make missing parents too, and succeed if it exists.
    #[arg(short = 'p', long)]
    parents: bool,
    /// Permission bits in octal, with the sticky bit (1000) if wanted.
    #[arg(long, default_value = "0755", value_parser = parse_dir_mode)]
    mode: u32,
    /// Owner uid (root or the admin group only) [default: yours].
    #[arg(long)]
    owner: Option<u32>,
    /// Owner gid: one of your groups, or any for root and the admin group [default: yours].
    #[arg(long)]
    group: Option<u32>,
}

fn parse_dir_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o1777)
        .ok_or_else(|| format!("mode {s:?}: use octal bits such as 0755, 0750 or 1777"))
}

pub fn mkdir(socket: &Path, args: MkdirArgs) -> Result<(), String> {
    let req = Mkdir {
        path: args.dir,
        mode: args.mode,
        owner: args.owner,
        group: args.group,
        parents: args.parents,
    };
    connect(socket)?.mkdir(req).map_err(|e| text(&e))
}

pub fn chmod(socket: &Path, mode: &str, name: &str) -> Result<(), String> {
    let mode = parse_dir_mode(mode)?;
    connect(socket)?.chmod(name, mode).map_err(|e| text(&e))
}

/// `UID`, `UID:GID` or `:GID`.
fn parse_owner(spec: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let bad = || format!("owner {spec:?}: use UID, UID:GID or :GID (numbers)");
    let number = |s: &str| -> Result<Option<u32>, String> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|_| bad())
        }
    };
    let (uid, gid) = match spec.split_once(':') {
        Some((u, g)) => (number(u)?, number(g)?),
        None => (number(spec)?, None),
    };
    if uid.is_none() && gid.is_none() {
        return Err(bad());
    }
    Ok((uid, gid))
}

pub fn chown(socket: &Path, owner: &str, name: &str) -> Result<(), String> {
    let (uid, gid) = parse_owner(owner)?;
    connect(socket)?.chown(name, uid, gid).map_err(|e| text(&e))
}

/// `drwxr-xr-x`, `drwxrwxrwt`.
pub fn dir_mode_string(mode: u32) -> String {
    let mut s = format!("d{}", &super::table::mode_string(mode)[1..]);
    if mode & 0o1000 != 0 {
        let last = if mode & 1 != 0 { "t" } else { "T" };
        s.replace_range(9..10, last);
    }
    s
}

/// The columns of `ls -l` for a directory.
pub(crate) fn long_row(d: &DirInfo, names: &Names) -> Vec<String> {
    vec![
        dir_mode_string(d.mode),
        names.user(d.uid),
        names.group(d.gid),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        if d.auto { "dir (auto)" } else { "dir" }.into(),
        "-".into(),
        format!("{}/", d.path),
    ]
}

/// `stat` of a directory.
pub fn print_dir(d: &DirInfo) {
    let names = Names::load();
    println!("directory:  {}/", d.path);
    super::print_owner(&names, d.uid, d.gid, d.mode, &dir_mode_string(d.mode));
    println!(
        "made:       {}",
        if d.auto {
            "automatically, for a lease; removed with its last entry"
        } else {
            "by mkdir; stays until rm"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_modes() {
        assert_eq!(parse_owner("1000"), Ok((Some(1000), None)));
        assert_eq!(parse_owner("1000:50"), Ok((Some(1000), Some(50))));
        assert_eq!(parse_owner(":50"), Ok((None, Some(50))));
        assert!(parse_owner(":").is_err() && parse_owner("bob").is_err());
        assert_eq!(dir_mode_string(0o1777), "drwxrwxrwt");
        assert_eq!(dir_mode_string(0o1750), "drwxr-x--T");
        assert_eq!(dir_mode_string(0o755), "drwxr-xr-x");
    }
}
