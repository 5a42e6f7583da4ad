//! Who may do what to a lease or a directory: file-like mode bits on the owner uid/gid, matched
//! against the peer's uid and groups from `SO_PEERCRED` and `SO_PEERGROUPS`.

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
}
