//! What a pool's memory costs besides itself: the kernel's per-page metadata for it and the
//! broker's own records. The one estimate model; `df` shows it (`kernel_overhead`,
//! `broker_metadata`) and the README explains it against the measured figures
//! (`tests/benches/accounting.rs`).
//!
//! The kernel keeps a 64-byte `struct page` per 4 KiB page, in a virtual array (`vmemmap`): 16
//! MiB per GiB, mapped with 2 MiB pages. Two mechanisms map many of those entries onto one
//! physical page when the memory comes in larger units:
//! - hugetlb pages with `vm.hugetlb_optimize_vmemmap` set: each huge page keeps one 4 KiB page
//!   of its `struct page`s (2M: 1 of 8; 1G: 1 of 4096);
//! - device-dax devices bound at 2M or 1G: compound pages, each keeping two 4 KiB pages of
//!   `struct page`s (head and first tails; the other tails share the second).
//!
//! Either way the array is then mapped with 4 KiB entries: one page table per 2 MiB of it (per
//! 128 MiB of memory), 32 KiB per GiB. A device-dax region costs this only for memory in bound
//! devices (leases, and leases being scrubbed); its free memory has no `struct page`s. A memfd
//! pool's memory is RAM, which has its `struct page`s whether or not the broker uses it: the
//! estimate counts the pool's whole size, so that pools compare. 4K memfd leases add the page
//! cache's index of their pages (a 576-byte node per 64 pages, 2.25 MiB per GiB).

use membroker_client::PageSize;
use membroker_client::proto::PoolKind;

use crate::journal::LeaseRecord;

const KIB: u64 = 1 << 10;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4 * KIB;
/// `struct page` for every 4 KiB page.
const MEMMAP_PER_GIB: u64 = 16 << 20;
/// Page tables of a `struct page` array mapped with 4 KiB entries.
const TABLES_PER_GIB: u64 = 32 * KIB;
/// Page cache index (xarray nodes) of 4K memfd pages.
const PAGE_CACHE_PER_GIB: u64 = (GIB / PAGE / 64) * 576;

/// The inputs of the estimate, from `df`.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    pub kind: PoolKind,
    pub page_size: PageSize,
    /// Pool capacity in bytes.
    pub size: u64,
    /// Bytes in leases (device-dax: in bound devices, leases being scrubbed included).
    pub leased: u64,
    pub leases: u64,
    /// Ranges the pool's allocator tracks (device-dax), none for memfd pools.
    pub ranges: u64,
    /// `vm.hugetlb_optimize_vmemmap` was on when the pool started (hugetlb memfd pools).
    pub vmemmap_optimized: bool,
}

/// Kernel memory spent on `bytes` of memory in units of `page` (4K: none shared).
fn per_unit(bytes: u64, unit: PageSize, kept_pages: u64) -> u64 {
    let units = bytes.div_ceil(unit.bytes());
    units * kept_pages * PAGE + bytes.div_ceil(GIB / 8) * (TABLES_PER_GIB / 8)
}

fn memmap(bytes: u64) -> u64 {
    ((bytes as u128 * MEMMAP_PER_GIB as u128) / GIB as u128) as u64
}

/// Estimated kernel memory (bytes) spent on the pool's memory.
pub fn kernel_overhead(f: &Footprint) -> u64 {
    match (f.kind, f.page_size) {
        (PoolKind::Memfd, PageSize::Base4K) => {
            memmap(f.size) + ((f.leased as u128 * PAGE_CACHE_PER_GIB as u128) / GIB as u128) as u64
        }
        (PoolKind::Memfd, page) if f.vmemmap_optimized => per_unit(f.size, page, 1),
        (PoolKind::Memfd, _) => memmap(f.size),
        (PoolKind::Devdax, PageSize::Base4K) => memmap(f.leased),
        (PoolKind::Devdax, align) => per_unit(f.leased, align, 2),
    }
}

/// The broker's own records per lease: the namespace's and the journal's live model's copies
/// of its record, with its name, pool name and map entries.
const LEASE_BYTES: u64 = 2 * (size_of::<LeaseRecord>() as u64 + 128);
/// Per range: the extent in both records, or an entry of the region's allocator.
const RANGE_BYTES: u64 = 48;

/// Estimated memory (bytes) the broker keeps for the pool: O(leases + ranges), never O(pages).
pub fn broker_metadata(f: &Footprint) -> u64 {
    let ranges = match f.kind {
        PoolKind::Memfd => f.leases,
        PoolKind::Devdax => f.ranges,
    };
    f.leases * LEASE_BYTES + ranges * RANGE_BYTES
}

/// Whether the kernel frees most of huge pages' `struct page`s (`vm.hugetlb_optimize_vmemmap`);
/// says so in the log when it does not, for a hugetlb pool.
pub fn hugetlb_vmemmap_optimized(pool: &str, page: PageSize) -> bool {
    const SYSCTL: &str = "/proc/sys/vm/hugetlb_optimize_vmemmap";
    let on = std::fs::read_to_string(SYSCTL).map(|v| v.trim() == "1");
    match on {
        Ok(true) => true,
        Ok(false) => {
            let per_gib = memmap(GIB) - per_unit(GIB, page, 1);
            tracing::warn!(
                pool,
                "the kernel keeps all struct pages of {page} huge pages ({:.1} MiB per GiB more than \
                 it needs): set vm.hugetlb_optimize_vmemmap=1 (sysctl, or hugetlb_free_vmemmap=on \
                 at boot) before the huge pages are reserved",
                per_gib as f64 / (1 << 20) as f64
            );
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                pool,
                "this kernel cannot free huge pages' struct pages (no {SYSCTL}): {page} pages \
                 cost the kernel 16 MiB per GiB like ordinary RAM"
            );
            false
        }
        Err(e) => {
            tracing::warn!(pool, error = %e, "cannot read {SYSCTL}; estimating as if it were off");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(kind: PoolKind, page_size: PageSize, size: u64, leased: u64, hvo: bool) -> Footprint {
        Footprint {
            kind,
            page_size,
            size,
            leased,
            leases: 0,
            ranges: 0,
            vmemmap_optimized: hvo,
        }
    }

    fn mib_per_gib(f: Footprint, gib: u64) -> f64 {
        kernel_overhead(&f) as f64 / (1 << 20) as f64 / gib as f64
    }

    #[test]
    fn kernel_overhead_per_gib() {
        use PageSize::*;
        use PoolKind::*;
        let g = GIB;
        assert_eq!(mib_per_gib(f(Memfd, Base4K, 4 * g, 0, false), 4), 16.0);
        assert_eq!(
            mib_per_gib(f(Memfd, Base4K, 4 * g, 4 * g, false), 4),
            16.0 + 2.25
        );
        assert_eq!(mib_per_gib(f(Memfd, Huge2M, 4 * g, 0, false), 4), 16.0);
        assert_eq!(
            mib_per_gib(f(Memfd, Huge2M, 4 * g, 0, true), 4),
            2.0 + 1.0 / 32.0
        );
        assert_eq!(
            mib_per_gib(f(Memfd, Huge1G, 4 * g, 0, true), 4),
            36.0 / 1024.0
        );
        assert_eq!(
            mib_per_gib(f(Devdax, Huge2M, 8 * g, 2 * g, false), 2),
            4.0 + 1.0 / 32.0
        );
        assert_eq!(
            mib_per_gib(f(Devdax, Huge1G, 8 * g, 2 * g, false), 2),
            40.0 / 1024.0
        );
        // Free device-dax memory has no struct pages.
        assert_eq!(kernel_overhead(&f(Devdax, Huge1G, 8 * g, 0, false)), 0);
    }

    #[test]
    fn broker_metadata_is_per_lease_and_range() {
        let mut fp = f(PoolKind::Devdax, PageSize::Huge2M, 1 << 46, 0, false);
        assert_eq!(broker_metadata(&fp), 0);
        fp.leases = 10;
        fp.ranges = 21;
        assert_eq!(broker_metadata(&fp), 10 * LEASE_BYTES + 21 * RANGE_BYTES);
    }
}
