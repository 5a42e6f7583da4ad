//! QEMU's NUMA binding of a redirected RAM block (`host-nodes=N,policy=bind`, libvirt's
//! `<memnode>`): QEMU `mbind`s the block after mapping it and before anything touches it, with
//! `MPOL_MF_STRICT|MPOL_MF_MOVE`. The block is a lease already placed by the broker's
//! fallocate, which such an `mbind` cannot move, so the shim puts the block on a lease from a
//! pool on the asked node instead (see the crate's README.md for each policy).

use crate::broker::{self, Acquired, ShimError};
use crate::table::{Block, Overlaps, TABLE};

/// linux/mempolicy.h policy modes.
const MPOL_DEFAULT: i32 = 0;
const MPOL_PREFERRED: i32 = 1;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;
const MPOL_LOCAL: i32 = 4;
const MPOL_PREFERRED_MANY: i32 = 5;
/// Mode flags that may be or'ed into the mode (`MPOL_F_STATIC_NODES`, `MPOL_F_RELATIVE_NODES`,
/// `MPOL_F_NUMA_BALANCING`); they change how a node set follows cpusets, never where a lease is.
const MPOL_MODE_FLAGS: i32 = (1 << 15) | (1 << 14) | (1 << 13);

/// What an `mbind` on (part of) a redirected block comes to.
#[derive(Debug)]
pub enum Outcome {
    /// Not about a redirected block: the kernel's business.
    Kernel,
    /// The block already is where the policy wants it (or the policy does not move memory):
    /// succeed without a system call.
    Done,
    /// Map this lease over the block in place of the old one, then [`broker::replace`].
    Map(Block, Acquired),
}

/// The policy's name, for messages.
fn policy_name(mode: i32) -> String {
    match mode {
        MPOL_DEFAULT => "default".into(),
        MPOL_PREFERRED => "preferred".into(),
        MPOL_BIND => "bind".into(),
        MPOL_INTERLEAVE => "interleave".into(),
        MPOL_LOCAL => "local".into(),
        MPOL_PREFERRED_MANY => "preferred-many".into(),
        other => format!("mode {other}"),
    }
}

/// Decides what `mbind([start, start + len), mode, nodes)` does to redirected blocks, and gets
/// the replacement lease when the block must move. The error comes with the lease's name.
pub fn follow(start: usize, len: usize, mode: i32, nodes: &[u32]) -> Result<Outcome, ShimError> {
    let overlaps = Overlaps::of(&TABLE, start, len);
    let mut blocks = overlaps.iter();
    let Some(block) = blocks.next() else {
        return Ok(Outcome::Kernel);
    };
    let mode = mode & !MPOL_MODE_FLAGS;
    if mode == MPOL_DEFAULT {
        // The lease is where its pool put it, and an mbind(MPOL_DEFAULT) on a shmem mapping
        // would drop the policy the broker gave the lease's file: leave it be.
        return Ok(Outcome::Done);
    }
    let whole = block.start == start && block.len == len.next_multiple_of(4096);
    if !whole || blocks.next().is_some() {
        return Err(broker::policy_error(
            &block,
            format!(
                "mbind({}) of {start:#x}+{len:#x} covers only part of the block at {:#x}+{:#x}; \
                 the shim places whole blocks (as QEMU binds them)",
                policy_name(mode),
                block.start,
                block.len
            ),
        ));
    }
    let (strict, nodes) = match mode {
        MPOL_BIND => (true, nodes),
        MPOL_INTERLEAVE if nodes.len() == 1 => (true, nodes),
        // "preferred" without nodes is local allocation: anywhere will do.
        MPOL_PREFERRED | MPOL_PREFERRED_MANY if nodes.is_empty() => return Ok(Outcome::Done),
        MPOL_PREFERRED | MPOL_PREFERRED_MANY => (false, nodes),
        MPOL_INTERLEAVE => {
            return Err(broker::policy_error(
                &block,
                format!(
                    "policy interleave over nodes {nodes:?} cannot be followed: a lease comes \
                     from one pool, on one node (give each guest node its own memory backend \
                     with policy=bind, or interleave over one node)"
                ),
            ));
        }
        other => {
            return Err(broker::policy_error(
                &block,
                format!(
                    "policy {} is not supported for guest RAM on a lease (use bind or \
                     preferred with host-nodes)",
                    policy_name(other)
                ),
            ));
        }
    };
    if nodes.is_empty() {
        return Err(broker::policy_error(
            &block,
            format!("policy {} without nodes", policy_name(mode)),
        ));
    }
    match broker::place(&block, nodes, strict)? {
        Some(acquired) => Ok(Outcome::Map(block, acquired)),
        None => Ok(Outcome::Done),
    }
}

/// The node numbers set in the first `bits` bits of a node mask.
pub fn mask_nodes(words: &[u64], bits: usize) -> Vec<u32> {
    (0..bits.min(words.len() * 64))
        .filter(|&b| words[b / 64] & (1 << (b % 64)) != 0)
        .filter_map(|b| u32::try_from(b).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_become_node_lists() {
        assert_eq!(mask_nodes(&[0b10], 2), [1]);
        assert_eq!(
            mask_nodes(&[0b10], 1),
            Vec::<u32>::new(),
            "bit 1 beyond maxnode - 1"
        );
        assert_eq!(mask_nodes(&[0b11, 1], 65), [0, 1, 64]);
        assert_eq!(mask_nodes(&[], 8), Vec::<u32>::new());
    }

    #[test]
    fn unredirected_ranges_go_to_the_kernel() {
        assert!(matches!(
            follow(0x1000, 0x1000, MPOL_BIND, &[1]),
            Ok(Outcome::Kernel)
        ));
    }
}
