//! The TDX module interface: the SEAMCALLs that S-EPT and PAMT management
//! need, plus the TD lifecycle steps and the vCPU kick they depend on.

use split::{Gpa, Hpa, Level};

use crate::status::TdxStatus;

/// Result of a SEAMCALL: `Ok` for TDX_SUCCESS, the decoded status otherwise.
pub type SeamcallResult<T = ()> = Result<T, TdxStatus>;

/// The SEAMCALLs the MMU side of a TDX host makes, on one TD.
///
/// Addresses are guest physical (`gpa`, aligned to the level) or host
/// physical (`hpa`, 4 KiB pages; a 2 MiB region for PAMT calls). `level`
/// is the level of the entry: 1 = 4K, 2 = 2M, 3 = 1G; for S-EPT pages, the
/// level of the page's own entries.
pub trait TdxModule: Send + Sync {
    /// TDH.MEM.SEPT.ADD: link S-EPT page `page` as the table of `level`
    /// entries that covers `gpa`.
    fn sept_add(&self, gpa: Gpa, level: Level, page: Hpa) -> SeamcallResult;

    /// TDH.MEM.PAGE.AUG: map `page` at `gpa` with a leaf of `level` (4K or
    /// 2M; 1G is TDX_OPERAND_INVALID) in a finalized TD.
    fn page_aug(&self, gpa: Gpa, level: Level, page: Hpa) -> SeamcallResult;

    /// TDH.MEM.PAGE.ADD: add `page` at `gpa` (4K) before the TD is finalized.
    fn page_add(&self, gpa: Gpa, page: Hpa) -> SeamcallResult;

    /// TDH.MEM.RANGE.BLOCK: block the entry of `level` at `gpa`.
    fn range_block(&self, gpa: Gpa, level: Level) -> SeamcallResult;

    /// TDH.MEM.TRACK: start a new TLB epoch.
    fn track(&self) -> SeamcallResult;

    /// TDH.MEM.PAGE.REMOVE: remove the blocked, tracked leaf; returns its page.
    fn page_remove(&self, gpa: Gpa, level: Level) -> SeamcallResult<Hpa>;

    /// TDH.MEM.SEPT.REMOVE: remove the empty S-EPT page of `level` entries
    /// at `gpa` whose parent entry is blocked and tracked; returns the page.
    fn sept_remove(&self, gpa: Gpa, level: Level) -> SeamcallResult<Hpa>;

    /// TDH.MEM.PAGE.DEMOTE: split the blocked, tracked leaf of `level` at
    /// `gpa` into `new_sept_page` holding its children. Under Dynamic PAMT
    /// a 2 MiB leaf's 4K children need the 4K PAMT of its range, and the
    /// call takes that page pair as `pamt_pair` (TDX_MISSING_PAMT_PAGE_PAIR
    /// without it); a 1 GiB leaf takes none.
    fn page_demote(
        &self,
        gpa: Gpa,
        level: Level,
        new_sept_page: Hpa,
        pamt_pair: Option<[Hpa; 2]>,
    ) -> SeamcallResult;

    /// TDH.MEM.RANGE.UNBLOCK: unblock the entry of `level` at `gpa`, blocked
    /// and tracked, when the operation the BLOCK was for did not happen.
    fn range_unblock(&self, gpa: Gpa, level: Level) -> SeamcallResult;

    /// TDH.PHYMEM.PAGE.RECLAIM: take back a page of a TD whose key is
    /// released.
    fn page_reclaim(&self, page: Hpa) -> SeamcallResult;

    /// TDH.PHYMEM.PAGE.WBINVD: flush a removed page; afterwards it is the
    /// host's again.
    fn page_wbinvd(&self, page: Hpa) -> SeamcallResult;

    /// TDH.PHYMEM.PAMT.ADD: give the module the pair of pages that hold the
    /// 4K PAMT of the 2 MiB `region`.
    fn pamt_add(&self, region: Hpa, pages: [Hpa; 2]) -> SeamcallResult;

    /// TDH.PHYMEM.PAMT.REMOVE: take the pair back; returns it.
    fn pamt_remove(&self, region: Hpa) -> SeamcallResult<[Hpa; 2]>;

    /// Not a SEAMCALL: the host kicks every vCPU of the TD out and back in,
    /// which completes the latest TRACK epoch.
    fn kick_vcpus(&self);

    /// TD lifecycle (TDH.MR.FINALIZE): from now on pages come by AUG.
    fn finalize(&self) -> SeamcallResult;

    /// Whether the TD is finalized.
    fn is_finalized(&self) -> bool;

    /// TD teardown (the key is freed): from now on pages come back only by
    /// RECLAIM.
    fn release_key(&self) -> SeamcallResult;
}
