//! Who may do what to a lease: file-like mode bits on the owner uid/gid from `SO_PEERCRED`.

/// The identity of a connected client, from `SO_PEERCRED` at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Connection number, unique for the broker's lifetime.
    pub conn: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Root, or primary group is the configured admin group.
    pub admin: bool,
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Whether `peer` may `access` a lease owned by `uid:gid` with `mode`. Root and the admin
/// group may do anything; otherwise the owner, group or other bits decide, like a file.
pub fn allowed(peer: &Peer, uid: u32, gid: u32, mode: u32, access: Access) -> bool {
    if peer.admin {
        return true;
    }
    let bits = if peer.uid == uid {
        mode >> 6
    } else if peer.gid == gid {
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

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            conn: 1,
            pid: 1,
            uid,
            gid,
            admin: false,
        }
    }

    #[test]
    fn mode_bits() {
        let owner = peer(1000, 1000);
        let group = peer(1001, 1000);
        let other = peer(65534, 65534);
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
}
