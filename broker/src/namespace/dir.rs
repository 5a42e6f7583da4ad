//! Directories of the lease namespace: who may make names where.
//!
//! A directory is an object with an owner, a group and a mode, like one in a file system:
//!
//! - making an entry (a lease or a directory) needs write permission on the deepest existing
//!   directory above it; the root (`/`, owned by root) is `01777` unless `serve --root-mode`
//!   says otherwise;
//! - missing directories on the way to a new lease are made *automatically*, owned by the
//!   lease's owner, with the lease's read bits (and the matching search bits), and removed
//!   again with their last entry; `mkdir` makes explicit ones, which stay until `rm`;
//! - a top-level `uid-N` (the shim's default prefix) is reserved: only uid N, root and the
//!   admin group may make it, whatever the root's mode;
//! - in a sticky directory only an entry's owner, the directory's owner, root and the admin
//!   group may remove the entry; elsewhere also whoever may write the directory or the lease;
//! - the read and search bits of a directory decide whether `membroker ls` shows it; a lease
//!   is shown to whoever may read the lease itself.

use std::collections::BTreeMap;

use membroker_client::proto::{DirInfo, Mkdir};

use super::access::{self, Access, Peer};
use super::name::{self, check_name};
use super::{Namespace, NsError, REMOVED_PREFIX, Result};
use crate::journal::{DirRecord, Record as JournalRecord};

/// The sticky bit of a directory's mode.
pub const STICKY: u32 = 0o1000;

/// The root's mode by default: everyone may make top-level names, only their owner may
/// remove them.
pub const DEFAULT_ROOT_MODE: u32 = 0o1777;

/// How the root directory is shown in messages.
const ROOT: &str = "/";

/// A directory's owner and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirMeta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub auto: bool,
}

/// Every directory; the root is owned by root with a configured mode.
#[derive(Debug)]
pub struct Dirs {
    root: DirMeta,
    map: BTreeMap<String, DirMeta>,
}

impl Dirs {
    pub fn new(root_mode: u32) -> Dirs {
        Dirs {
            root: DirMeta {
                uid: 0,
                gid: 0,
                mode: root_mode,
                auto: false,
            },
            map: BTreeMap::new(),
        }
    }

    pub fn set_root_mode(&mut self, mode: u32) {
        self.root.mode = mode;
    }

    pub fn get(&self, path: &str) -> Option<&DirMeta> {
        self.map.get(path)
    }

    /// The deepest existing directory above `name`: its path (`""` for the root) and meta.
    fn parent_of<'a>(&self, name: &'a str) -> (&'a str, DirMeta) {
        name::ancestors(name)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find_map(|a| self.map.get(a).map(|m| (a, *m)))
            .unwrap_or(("", self.root))
    }

    /// Whether anything but `name` itself lies under it among directories.
    fn has_children(&self, name: &str) -> bool {
        let dir = format!("{name}/");
        self.map
            .range(dir.clone()..)
            .next()
            .is_some_and(|(p, _)| p.starts_with(&dir))
    }
}

/// The uid a top-level `uid-N` is reserved for.
fn reserved_for(name: &str) -> Option<u32> {
    let top = name.split('/').next()?;
    let digits = top.strip_prefix("uid-")?;
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse().ok()
}

/// The owner of directory `path` made on the way to something of `uid`: a top-level `uid-N`
/// is always N's.
fn owner_on_the_way(path: &str, uid: u32) -> u32 {
    match reserved_for(path) {
        Some(reserved) if !path.contains('/') => reserved,
        _ => uid,
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() { ROOT } else { path }
}

fn record(path: &str, m: &DirMeta) -> JournalRecord {
    JournalRecord::Dir(DirRecord {
        path: path.to_string(),
        uid: m.uid,
        gid: m.gid,
        mode: m.mode,
        auto: m.auto,
    })
}

/// The mode of an automatic directory above a lease of `lease_mode`: the owner's rwx, and
/// read and search for whoever may read the lease.
pub fn auto_mode(lease_mode: u32) -> u32 {
    let read = lease_mode & 0o044;
    0o700 | read | (read >> 2)
}

impl Namespace {
    fn dir_denied(path: &str, m: &DirMeta, op: String) -> NsError {
        NsError::DirDenied {
            dir: shown(path).to_string(),
            op,
            uid: m.uid,
            mode: m.mode,
        }
    }

    /// Whether `peer` may make `name` (a lease or a directory): write permission on the
    /// deepest existing directory above it, or the top-level `uid-N` reserved for the peer.
    pub(super) fn may_create(&self, peer: &Peer, name: &str) -> Result<()> {
        if let Some(uid) = reserved_for(name) {
            let top = name.split('/').next().unwrap_or(name);
            if self.dirs.get(top).is_none() {
                if peer.uid == uid || peer.admin {
                    return Ok(());
                }
                return Err(NsError::Reserved {
                    name: name.to_string(),
                    top: top.to_string(),
                    uid,
                });
            }
        }
        let (path, parent) = self.parent_of_name(name);
        if access::allowed(peer, parent.uid, parent.gid, parent.mode, Access::Write) {
            Ok(())
        } else {
            Err(Self::dir_denied(
                path,
                &parent,
                format!("create {name} in it"),
            ))
        }
    }

    fn parent_of_name<'a>(&self, name: &'a str) -> (&'a str, DirMeta) {
        self.dirs.parent_of(name)
    }

    /// Whether `peer` may remove the entry `name` owned by `uid` (lease or directory):
    /// `writable` says whether the peer may write the entry itself.
    pub(super) fn may_remove(&self, peer: &Peer, name: &str, uid: u32, writable: bool) -> bool {
        let (_, parent) = self.dirs.parent_of(name);
        let dir_writable =
            access::allowed(peer, parent.uid, parent.gid, parent.mode, Access::Write);
        peer.sees_all_of(uid)
            || peer.uid == parent.uid
            || (parent.mode & STICKY == 0 && (dir_writable || writable))
    }

    /// The journal records of the directories missing above a new lease `name` of `uid:gid`
    /// and `mode`, made automatically; [`Namespace::add_dirs`] adds them once journaled.
    pub(super) fn missing_dirs(
        &self,
        name: &str,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Vec<JournalRecord> {
        if name::is_under(name, REMOVED_PREFIX) {
            return Vec::new();
        }
        name::ancestors(name)
            .filter(|a| self.dirs.get(a).is_none())
            .map(|a| {
                let meta = DirMeta {
                    uid: owner_on_the_way(a, uid),
                    gid,
                    mode: auto_mode(mode),
                    auto: true,
                };
                record(a, &meta)
            })
            .collect()
    }

    /// Adds directories from their journal records (made, restored, changed).
    pub(super) fn add_dirs(&mut self, records: &[JournalRecord]) {
        for r in records {
            if let JournalRecord::Dir(d) = r {
                self.dirs.map.insert(
                    d.path.clone(),
                    DirMeta {
                        uid: d.uid,
                        gid: d.gid,
                        mode: d.mode,
                        auto: d.auto,
                    },
                );
            }
        }
    }

    /// Puts back a directory from the journal.
    pub fn restore_dir(&mut self, d: &DirRecord) {
        self.add_dirs(&[JournalRecord::Dir(d.clone())]);
    }

    /// Whether nothing (lease, lease being made, directory) lies under directory `path`.
    fn dir_is_empty(&self, path: &str) -> bool {
        let dir = format!("{path}/");
        let under = |n: Option<&String>| n.is_some_and(|n| n.starts_with(&dir));
        !under(self.names.range(dir.clone()..).next().map(|(n, _)| n))
            && !under(self.pending.range(dir.clone()..).next())
            && !self.dirs.has_children(path)
    }

    /// After the name `name` went away: removes the automatic directories above it that are
    /// now empty, deepest first.
    pub(super) fn prune_dirs(&mut self, name: &str) {
        let ancestors: Vec<String> = name::ancestors(name).map(str::to_string).collect();
        for dir in ancestors.iter().rev() {
            match self.dirs.get(dir) {
                Some(m) if m.auto && self.dir_is_empty(dir) => {
                    self.dirs.map.remove(dir);
                    self.unjournaled
                        .push(JournalRecord::Rmdir { path: dir.clone() });
                }
                _ => return,
            }
        }
    }

    /// After a restart: removes the automatic directories left empty by leases that did not
    /// survive it.
    pub fn prune_empty_dirs(&mut self) {
        let autos: Vec<String> = self
            .dirs
            .map
            .iter()
            .rev()
            .filter(|(_, m)| m.auto)
            .map(|(p, _)| p.clone())
            .collect();
        // Reverse path order visits a directory's children before it.
        for path in autos {
            if self.dir_is_empty(&path) {
                self.dirs.map.remove(&path);
                self.unjournaled.push(JournalRecord::Rmdir { path });
            }
        }
    }

    /// `mkdir [-p]`.
    pub fn mkdir(&mut self, peer: &Peer, req: &Mkdir) -> Result<()> {
        let path = req.path.trim_end_matches('/');
        check_name(path).map_err(NsError::Invalid)?;
        if name::is_under(path, REMOVED_PREFIX) {
            return Err(NsError::Invalid(format!(
                "directory {path}: names under {REMOVED_PREFIX} are reserved for leases removed while held"
            )));
        }
        if req.mode & !0o1777 != 0 {
            return Err(NsError::Invalid(format!(
                "directory {path}: mode {:o} has bits beyond 01777",
                req.mode
            )));
        }
        // A top-level `uid-N` is N's unless said otherwise.
        let uid = req
            .owner
            .unwrap_or_else(|| owner_on_the_way(path, peer.uid));
        let gid = req.group.unwrap_or(peer.gid);
        self.may_give(peer, path, uid, gid)?;
        if self.dirs.get(path).is_some() {
            return if req.parents {
                Ok(())
            } else {
                Err(NsError::Exists(format!("{path}/")))
            };
        }
        self.check_name_free(path)?;
        let missing: Vec<&str> = name::ancestors(path)
            .filter(|a| self.dirs.get(a).is_none())
            .collect();
        if let Some(first) = missing.first()
            && !req.parents
        {
            return Err(NsError::Invalid(format!(
                "directory {path}: {first}/ does not exist (use mkdir -p)"
            )));
        }
        self.may_create(peer, path)?;
        let mut records: Vec<JournalRecord> = missing
            .iter()
            .map(|a| {
                let meta = DirMeta {
                    uid: owner_on_the_way(a, uid),
                    gid,
                    mode: 0o755,
                    auto: false,
                };
                record(a, &meta)
            })
            .collect();
        let meta = DirMeta {
            uid,
            gid,
            mode: req.mode,
            auto: false,
        };
        records.push(record(path, &meta));
        self.add_dirs(&records);
        self.unjournaled.extend(records);
        Ok(())
    }

    /// Whether `peer` may make `what` owned by `uid:gid`: another owner takes root or the
    /// admin group, another group one the peer is in.
    pub(super) fn may_give(&self, peer: &Peer, what: &str, uid: u32, gid: u32) -> Result<()> {
        if peer.admin || (uid == peer.uid && peer.in_group(gid)) {
            return Ok(());
        }
        let op = if uid != peer.uid {
            format!("give it to uid {uid} (only root and the admin group may)")
        } else {
            format!("give it to group {gid}, which you are not in")
        };
        Err(NsError::NotYours(format!(
            "{what}: permission denied to {op}"
        )))
    }

    /// `chmod MODE NAME`, of a lease or a directory.
    pub fn chmod(&mut self, peer: &Peer, name: &str, mode: u32) -> Result<()> {
        let name = name.trim_end_matches('/');
        if let Some(&id) = self.names.get(name) {
            let l = &self.leases[&id].lease;
            if mode & !0o777 != 0 {
                return Err(NsError::Invalid(format!(
                    "lease {name}: mode {mode:o} has bits beyond 0777"
                )));
            }
            Self::check_label(peer, &self.leases[&id], "chmod it")?;
            if !peer.sees_all_of(l.uid) {
                return Err(NsError::NotYours(format!(
                    "lease {name}: permission denied to chmod it (owner uid {}); ask the owner or an admin",
                    l.uid
                )));
            }
            let (uid, gid) = (l.uid, l.gid);
            self.set_lease_meta(id, uid, gid, mode);
            return Ok(());
        }
        let m = *self.dir_or_not_found(name)?;
        if mode & !0o1777 != 0 {
            return Err(NsError::Invalid(format!(
                "directory {name}: mode {mode:o} has bits beyond 01777"
            )));
        }
        if !peer.sees_all_of(m.uid) {
            return Err(Self::dir_denied(name, &m, "chmod it".into()));
        }
        self.set_dir_meta(name, DirMeta { mode, ..m });
        Ok(())
    }

    /// `chown UID[:GID] NAME`, of a lease or a directory.
    pub fn chown(
        &mut self,
        peer: &Peer,
        name: &str,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        let name = name.trim_end_matches('/');
        if let Some(&id) = self.names.get(name) {
            let l = &self.leases[&id].lease;
            let (new_uid, new_gid, mode, owner) =
                (uid.unwrap_or(l.uid), gid.unwrap_or(l.gid), l.mode, l.uid);
            Self::check_label(peer, &self.leases[&id], "chown it")?;
            if !peer.sees_all_of(owner) {
                return Err(NsError::NotYours(format!(
                    "lease {name}: permission denied to chown it (owner uid {owner}); ask the owner or an admin"
                )));
            }
            self.may_give(peer, &format!("lease {name}"), new_uid, new_gid)?;
            self.set_lease_meta(id, new_uid, new_gid, mode);
            return Ok(());
        }
        let m = *self.dir_or_not_found(name)?;
        if !peer.sees_all_of(m.uid) {
            return Err(Self::dir_denied(name, &m, "chown it".into()));
        }
        let (new_uid, new_gid) = (uid.unwrap_or(m.uid), gid.unwrap_or(m.gid));
        self.may_give(peer, &format!("directory {name}"), new_uid, new_gid)?;
        self.set_dir_meta(
            name,
            DirMeta {
                uid: new_uid,
                gid: new_gid,
                ..m
            },
        );
        Ok(())
    }

    fn dir_or_not_found(&self, name: &str) -> Result<&DirMeta> {
        self.dirs
            .get(name)
            .ok_or_else(|| NsError::NotFound(name.to_string()))
    }

    fn set_lease_meta(&mut self, id: u64, uid: u32, gid: u32, mode: u32) {
        let l = &mut self.leases.get_mut(&id).expect("named lease exists").lease;
        (l.uid, l.gid, l.mode) = (uid, gid, mode);
        self.unjournaled
            .push(JournalRecord::Meta { id, uid, gid, mode });
    }

    /// A changed directory is explicit from then on: it stays when its last entry goes.
    fn set_dir_meta(&mut self, path: &str, meta: DirMeta) {
        let meta = DirMeta {
            auto: false,
            ..meta
        };
        self.dirs.map.insert(path.to_string(), meta);
        self.unjournaled.push(record(path, &meta));
    }

    /// `rm` of a directory: it must be empty.
    pub(super) fn rmdir(&mut self, peer: &Peer, path: &str) -> Result<()> {
        let m = *self.dir_or_not_found(path)?;
        let writable = access::allowed(peer, m.uid, m.gid, m.mode, Access::Write);
        if !self.may_remove(peer, path, m.uid, writable) {
            let (parent_path, parent) = self.dirs.parent_of(path);
            return Err(Self::dir_denied(
                parent_path,
                &parent,
                format!("remove {path}/ from it"),
            ));
        }
        if !self.dir_is_empty(path) {
            return Err(NsError::Invalid(format!(
                "directory {path}/ is not empty; remove what is in it first"
            )));
        }
        self.dirs.map.remove(path);
        self.unjournaled.push(JournalRecord::Rmdir {
            path: path.to_string(),
        });
        self.prune_dirs(path);
        Ok(())
    }

    /// Directories at or under `prefix` after `after`, in path order, that `peer` may see
    /// (read permission), while `fits` accepts them; says whether more remain.
    pub fn dirs(
        &self,
        peer: &Peer,
        prefix: &str,
        after: Option<&str>,
        fits: impl FnMut(&DirInfo) -> bool,
    ) -> (Vec<DirInfo>, bool) {
        let visible = name::range_under(&self.dirs.map, prefix, after)
            .filter(|(_, m)| {
                peer.sees_all_of(m.uid) || access::allowed(peer, m.uid, m.gid, m.mode, Access::Read)
            })
            .map(|(path, m)| DirInfo {
                path: path.clone(),
                uid: m.uid,
                gid: m.gid,
                mode: m.mode,
                auto: m.auto,
            });
        name::page(visible, fits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names() {
        assert_eq!(reserved_for("uid-1000/qemu-1/ram0"), Some(1000));
        assert_eq!(reserved_for("uid-0"), Some(0));
        assert_eq!(reserved_for("uid-01/x"), None);
        assert_eq!(reserved_for("uid-/x"), None);
        assert_eq!(reserved_for("tenant/uid-5"), None);
        assert_eq!(reserved_for("uid-5x"), None);
    }

    #[test]
    fn auto_modes_follow_the_lease() {
        assert_eq!(auto_mode(0o600), 0o700);
        assert_eq!(auto_mode(0o640), 0o750);
        assert_eq!(auto_mode(0o644), 0o755);
    }
}
