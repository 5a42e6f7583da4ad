//! Who may do what to a lease or a directory: file-like mode bits on the owner uid/gid, matched
//! against the peer's uid and groups from `SO_PEERCRED` and `SO_PEERGROUPS`; and, for a lease
//! bound to its creator's security label (AppArmor profile, SELinux context), that label.

use std::sync::Arc;

/// The identity of a connected client, from `SO_PEERCRED` and `SO_PEERGROUPS` at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Connection number, unique for the broker's lifetime.
    pub conn: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Arc<[u32]>,
    /// Root, or a member (primary or supplementary) of the configured admin group.
    pub admin: bool,
    /// Its security label (see [`parse_label`]); None when unconfined or no LSM labels it.
    pub label: Option<Arc<str>>,
}

impl Peer {
    /// Whether the peer is in group `gid`, as its primary group or a supplementary one.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether the peer may see everything about an object owned by `uid`: holders,
    /// physical extents, devices. Its owner, root and the admin group may.
    pub fn sees_all_of(&self, uid: u32) -> bool {
        self.admin || self.uid == uid
    }

    /// Whether the peer's label lets it at a lease bound to `bound`: any peer if the lease is
    /// bound to no label; otherwise root, the admin group and peers with exactly that label.
    pub fn label_fits(&self, bound: Option<&str>) -> bool {
        self.admin || bound.is_none_or(|b| self.label.as_deref() == Some(b))
    }
}

/// The longest security label kept; a longer one is refused with its connection.
pub const MAX_LABEL: usize = 4096;

/// The label in a peer's security context as the kernel reports it (`SO_PEERSEC`, or
/// `/proc/PID/attr/current`), or None for an unconfined peer. The text may end in NUL or a
/// newline; AppArmor appends the profile's mode (`libvirt-UUID (enforce)`), which is not part
/// of the label, so a profile switched between enforce and complain keeps its leases.
pub fn parse_label(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches(['\0', '\n']).trim();
    let label = match text.rsplit_once(" (") {
        Some((label, mode))
            if mode.strip_suffix(')').is_some_and(|m| {
                !m.is_empty() && m.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            }) =>
        {
            label
        }
        _ => text,
    };
    (!label.is_empty() && label != "unconfined").then(|| label.to_string())
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Whether `peer` may `access` an object owned by `uid:gid` with `mode`. Root and the admin
/// group may do anything; otherwise the owner, group or other bits decide, like a file.
pub fn allowed(peer: &Peer, uid: u32, gid: u32, mode: u32, access: Access) -> bool {
    if peer.admin {
        return true;
    }
    let bits = if peer.uid == uid {
        mode >> 6
    } else if peer.in_group(gid) {
        mode >> 3
    } else {
        mode
    };
    let want = match access {
        Access::Read => 0o4,
        Access::Write => 0o2,
    };
    bits & want != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            conn: 1,
            pid: 1,
            uid,
            gid,
            groups: groups.into(),
            admin: false,
            label: None,
        }
    }

    #[test]
    fn mode_bits() {
        let owner = peer(1000, 1000, &[]);
        let group = peer(1001, 1000, &[]);
        let other = peer(65534, 65534, &[]);
        assert!(allowed(&owner, 1000, 1000, 0o600, Access::Write));
        assert!(!allowed(&group, 1000, 1000, 0o600, Access::Read));
        assert!(allowed(&group, 1000, 1000, 0o640, Access::Read));
        assert!(!allowed(&group, 1000, 1000, 0o640, Access::Write));
        assert!(!allowed(&other, 1000, 1000, 0o640, Access::Read));
        assert!(allowed(&other, 1000, 1000, 0o666, Access::Write));
        assert!(
            !allowed(&owner, 1000, 1000, 0o066, Access::Read),
            "owner bits win, like files"
        );
        assert!(allowed(
            &Peer {
                admin: true,
                ..other
            },
            1000,
            1000,
            0o000,
            Access::Write
        ));
    }

    #[test]
    fn supplementary_groups_count() {
        let member = peer(1001, 1001, &[50, 4242]);
        assert!(allowed(&member, 0, 4242, 0o640, Access::Read));
        assert!(!allowed(&member, 0, 4243, 0o640, Access::Read));
        assert!(member.in_group(1001) && member.in_group(50) && !member.in_group(0));
    }

    #[test]
    fn labels_are_parsed_without_the_apparmor_mode() {
        let uuid = "libvirt-6f1c0a7e-1b2d-4c3e-9f00-0123456789ab";
        assert_eq!(
            parse_label(format!("{uuid} (enforce)\0").as_bytes()).as_deref(),
            Some(uuid)
        );
        assert_eq!(
            parse_label(format!("{uuid} (complain)\n").as_bytes()).as_deref(),
            Some(uuid)
        );
        assert_eq!(parse_label(b"unconfined\0"), None);
        assert_eq!(parse_label(b"unconfined\n"), None);
        assert_eq!(parse_label(b""), None);
        assert_eq!(parse_label(b"\0"), None);
        let selinux = "system_u:system_r:svirt_t:s0:c87,c520";
        assert_eq!(
            parse_label(format!("{selinux}\0").as_bytes()).as_deref(),
            Some(selinux)
        );
        assert_eq!(
            parse_label(b"a//&b (enforce)").as_deref(),
            Some("a//&b"),
            "a stacked AppArmor label"
        );
        assert_eq!(
            parse_label(b"odd (Label)").as_deref(),
            Some("odd (Label)"),
            "only a mode word is a mode"
        );
    }

    #[test]
    fn a_bound_lease_needs_its_label() {
        let labelled = |label: Option<&str>| Peer {
            label: label.map(Into::into),
            ..peer(1000, 1000, &[])
        };
        let a = labelled(Some("membroker-test-a"));
        let b = labelled(Some("membroker-test-b"));
        let none = labelled(None);
        assert!(a.label_fits(Some("membroker-test-a")));
        assert!(!a.label_fits(Some("membroker-test-b")));
        assert!(!b.label_fits(Some("membroker-test-a")));
        assert!(
            !none.label_fits(Some("membroker-test-a")),
            "an unconfined peer of the same uid is not the label"
        );
        assert!(
            a.label_fits(None) && none.label_fits(None),
            "unbound leases"
        );
        let admin = Peer { admin: true, ..b };
        assert!(admin.label_fits(Some("membroker-test-a")));
    }
}
