//! SEAMCALL leaf numbers and TDX status codes, with their real encodings.

use std::fmt;

/// The SEAMCALL leaves the MMU side uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u64)]
pub enum Seamcall {
    /// TDH.MEM.PAGE.ADD: add a page to a TD before it is finalized.
    MemPageAdd = 2,
    /// TDH.MEM.SEPT.ADD: add a Secure-EPT page.
    MemSeptAdd = 3,
    /// TDH.MEM.PAGE.AUG: add a page to a finalized TD.
    MemPageAug = 6,
    /// TDH.MEM.RANGE.BLOCK: block a S-EPT entry.
    MemRangeBlock = 7,
    /// TDH.MEM.PAGE.DEMOTE: split a huge leaf into a new S-EPT page.
    MemPageDemote = 15,
    /// TDH.PHYMEM.PAGE.RECLAIM: take a page back from a torn-down TD.
    PhymemPageReclaim = 28,
    /// TDH.MEM.PAGE.REMOVE: remove a blocked, tracked leaf.
    MemPageRemove = 29,
    /// TDH.MEM.SEPT.REMOVE: remove an empty, blocked, tracked S-EPT page.
    MemSeptRemove = 30,
    /// TDH.MEM.TRACK: start a new TLB-tracking epoch.
    MemTrack = 38,
    /// TDH.PHYMEM.PAGE.WBINVD: write back and invalidate a removed page.
    PhymemPageWbinvd = 41,
    /// TDH.PHYMEM.PAMT.ADD: add the 4K PAMT of a 2 MiB region.
    PhymemPamtAdd = 58,
    /// TDH.PHYMEM.PAMT.REMOVE: remove the 4K PAMT of a 2 MiB region.
    PhymemPamtRemove = 59,
    /// TDH.MEM.RANGE.UNBLOCK: undo a BLOCK whose operation did not happen.
    MemRangeUnblock = 39,
}

impl Seamcall {
    /// Every leaf, in number order.
    pub const ALL: [Seamcall; 13] = [
        Self::MemPageAdd,
        Self::MemSeptAdd,
        Self::MemPageAug,
        Self::MemRangeBlock,
        Self::MemPageDemote,
        Self::PhymemPageReclaim,
        Self::MemPageRemove,
        Self::MemSeptRemove,
        Self::MemTrack,
        Self::MemRangeUnblock,
        Self::PhymemPageWbinvd,
        Self::PhymemPamtAdd,
        Self::PhymemPamtRemove,
    ];

    /// The leaf number.
    pub fn number(self) -> u64 {
        self as u64
    }

    /// The architectural name.
    pub fn name(self) -> &'static str {
        match self {
            Self::MemPageAdd => "TDH.MEM.PAGE.ADD",
            Self::MemSeptAdd => "TDH.MEM.SEPT.ADD",
            Self::MemPageAug => "TDH.MEM.PAGE.AUG",
            Self::MemRangeBlock => "TDH.MEM.RANGE.BLOCK",
            Self::MemPageDemote => "TDH.MEM.PAGE.DEMOTE",
            Self::PhymemPageReclaim => "TDH.PHYMEM.PAGE.RECLAIM",
            Self::MemPageRemove => "TDH.MEM.PAGE.REMOVE",
            Self::MemSeptRemove => "TDH.MEM.SEPT.REMOVE",
            Self::MemTrack => "TDH.MEM.TRACK",
            Self::MemRangeUnblock => "TDH.MEM.RANGE.UNBLOCK",
            Self::PhymemPageWbinvd => "TDH.PHYMEM.PAGE.WBINVD",
            Self::PhymemPamtAdd => "TDH.PHYMEM.PAMT.ADD",
            Self::PhymemPamtRemove => "TDH.PHYMEM.PAMT.REMOVE",
        }
    }
}

/// A SEAMCALL that did not succeed: the leaf, and the module's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {status}", call.name())]
pub struct SeamcallError {
    /// The leaf called.
    pub call: Seamcall,
    /// What the module answered.
    pub status: TdxStatus,
}

/// A SEAMCALL completion status (bits 63:32 of RAX; the operand id in the
/// low bits is not modelled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TdxStatus {
    /// TDX_SUCCESS.
    #[error("TDX_SUCCESS")]
    Success,
    /// TDX_OPERAND_BUSY: another caller holds a resource; retry.
    #[error("TDX_OPERAND_BUSY")]
    OperandBusy,
    /// TDX_OPERAND_INVALID.
    #[error("TDX_OPERAND_INVALID")]
    OperandInvalid,
    /// TDX_PAGE_METADATA_INCORRECT: the page's PAMT state does not allow it.
    #[error("TDX_PAGE_METADATA_INCORRECT")]
    PageMetadataIncorrect,
    /// TDX_PAGE_NOT_FREE: a page handed to the module (a PAMT page of
    /// PAMT.ADD or DEMOTE) is in use already.
    #[error("TDX_PAGE_NOT_FREE")]
    PageNotFree,
    /// TDX_HPA_RANGE_NOT_FREE: the 2 MiB range cannot take a 4K PAMT (it
    /// has one, or it is mapped as a 2 MiB page).
    #[error("TDX_HPA_RANGE_NOT_FREE")]
    HpaRangeNotFree,
    /// TDX_NO_PAMT_PAGE_PAIR: PAMT.REMOVE of a range without a 4K PAMT.
    #[error("TDX_NO_PAMT_PAGE_PAIR")]
    NoPamtPagePair,
    /// TDX_PAMT_PAGE_NOT_EMPTY: PAMT.REMOVE while a 4K page of the range is
    /// still the module's.
    #[error("TDX_PAMT_PAGE_NOT_EMPTY")]
    PamtPageNotEmpty,
    /// TDX_INTERRUPTED_PAMT: an import stopped at a page whose range has no
    /// 4K PAMT (Dynamic PAMT), as an interrupt would stop it; the VMM adds
    /// the pair and resumes. This module has no import, so only decodes it.
    #[error("TDX_INTERRUPTED_PAMT")]
    InterruptedPamt,
    /// TDX_MISSING_PAMT_PAGE_PAIR: a 4K page handed to the module lies in a
    /// range without a 4K PAMT (Dynamic PAMT); recoverable: add the pair
    /// and call again.
    #[error("TDX_MISSING_PAMT_PAGE_PAIR")]
    MissingPamtPagePair,
    /// TDX_LIFECYCLE_STATE_INCORRECT: wrong TD state (finalized or not, key).
    #[error("TDX_LIFECYCLE_STATE_INCORRECT")]
    LifecycleStateIncorrect,
    /// TDX_EPT_WALK_FAILED: a parent S-EPT page is missing.
    #[error("TDX_EPT_WALK_FAILED")]
    EptWalkFailed,
    /// TDX_EPT_ENTRY_NOT_FREE.
    #[error("TDX_EPT_ENTRY_NOT_FREE")]
    EptEntryNotFree,
    /// TDX_EPT_ENTRY_NOT_PRESENT.
    #[error("TDX_EPT_ENTRY_NOT_PRESENT")]
    EptEntryNotPresent,
    /// TDX_GPA_RANGE_NOT_BLOCKED.
    #[error("TDX_GPA_RANGE_NOT_BLOCKED")]
    GpaRangeNotBlocked,
    /// TDX_GPA_RANGE_ALREADY_BLOCKED (a warning, not an error).
    #[error("TDX_GPA_RANGE_ALREADY_BLOCKED")]
    GpaRangeAlreadyBlocked,
    /// TDX_TLB_TRACKING_NOT_DONE: no TRACK and kick since the BLOCK.
    #[error("TDX_TLB_TRACKING_NOT_DONE")]
    TlbTrackingNotDone,
    /// TDX_EPT_ENTRY_STATE_INCORRECT.
    #[error("TDX_EPT_ENTRY_STATE_INCORRECT")]
    EptEntryStateIncorrect,
    /// TDX_EPT_PAGE_NOT_FREE: the S-EPT page still maps something.
    #[error("TDX_EPT_PAGE_NOT_FREE")]
    EptPageNotFree,
    /// Any other status.
    #[error("TDX status {0:#018x}")]
    Other(u64),
}

/// The encodings, each the module's published value: the general ones from
/// `include/auto_gen/tdx_error_codes_defs.h`, those of Dynamic PAMT
/// (HPA_RANGE_NOT_FREE, NO_PAMT_PAGE_PAIR, PAMT_PAGE_NOT_EMPTY,
/// INTERRUPTED_PAMT, MISSING_PAMT_PAGE_PAIR) from
/// `include/auto_gen_2_0/tdx_error_codes_defs.h` of the TDX module source.
const TABLE: [(TdxStatus, u64); 20] = [
    (TdxStatus::Success, 0),
    (TdxStatus::OperandBusy, 0x8000_0200_0000_0000),
    (TdxStatus::OperandInvalid, 0xC000_0100_0000_0000),
    (TdxStatus::PageMetadataIncorrect, 0xC000_0300_0000_0000),
    (TdxStatus::PageNotFree, 0xC000_0303_0000_0000),
    (TdxStatus::HpaRangeNotFree, 0xC000_0304_0000_0000),
    (TdxStatus::NoPamtPagePair, 0xC000_0305_0000_0000),
    (TdxStatus::PamtPageNotEmpty, 0xC000_0306_0000_0000),
    (TdxStatus::InterruptedPamt, 0x8000_0307_0000_0000),
    (TdxStatus::MissingPamtPagePair, 0x8000_0308_0000_0000),
    (TdxStatus::LifecycleStateIncorrect, 0xC000_0607_0000_0000),
    (TdxStatus::EptWalkFailed, 0xC000_0B00_0000_0000),
    (TdxStatus::EptEntryNotFree, 0xC000_0B02_0000_0000),
    (TdxStatus::EptEntryNotPresent, 0xC000_0B03_0000_0000),
    (TdxStatus::GpaRangeNotBlocked, 0xC000_0B06_0000_0000),
    (TdxStatus::GpaRangeAlreadyBlocked, 0x0000_0B07_0000_0000),
    (TdxStatus::TlbTrackingNotDone, 0xC000_0B08_0000_0000),
    (TdxStatus::EptEntryStateIncorrect, 0xC000_0B0D_0000_0000),
    (TdxStatus::EptPageNotFree, 0xC000_0B0E_0000_0000),
    (TdxStatus::Other(0), 0),
];

/// Bits 63:32 hold the status class and code.
pub const STATUS_MASK: u64 = 0xFFFF_FFFF_0000_0000;

impl TdxStatus {
    /// The encoding in RAX.
    pub fn raw(self) -> u64 {
        match self {
            Self::Other(raw) => raw,
            known => TABLE
                .iter()
                .find(|(status, _)| *status == known)
                .map(|(_, raw)| *raw)
                .expect("every named status has an encoding"),
        }
    }

    /// Decodes RAX (the operand id in bits 31:0 is ignored).
    pub fn from_raw(raw: u64) -> Self {
        let status = raw & STATUS_MASK;
        TABLE[..TABLE.len() - 1]
            .iter()
            .find(|(_, code)| *code == status)
            .map_or(Self::Other(raw), |(status, _)| *status)
    }

    /// Whether the call succeeded.
    pub fn is_success(self) -> bool {
        self == Self::Success
    }

    /// Whether it is worth retrying (after kicking vCPUs).
    pub fn is_busy(self) -> bool {
        self == Self::OperandBusy
    }
}

impl fmt::LowerHex for TdxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.raw(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_ignore_the_operand_id() {
        for (status, raw) in &TABLE[..TABLE.len() - 1] {
            assert_eq!(status.raw(), *raw);
            assert_eq!(TdxStatus::from_raw(*raw), *status);
            assert_eq!(TdxStatus::from_raw(*raw | 0x92), *status);
        }
        assert_eq!(TdxStatus::OperandBusy.raw(), 0x8000020000000000);
        // Dynamic PAMT, as include/auto_gen_2_0/tdx_error_codes_defs.h of
        // the TDX module defines them.
        assert_eq!(TdxStatus::HpaRangeNotFree.raw(), 0xC000030400000000);
        assert_eq!(TdxStatus::NoPamtPagePair.raw(), 0xC000030500000000);
        assert_eq!(TdxStatus::PamtPageNotEmpty.raw(), 0xC000030600000000);
        assert_eq!(TdxStatus::InterruptedPamt.raw(), 0x8000030700000000);
        assert_eq!(TdxStatus::MissingPamtPagePair.raw(), 0x8000030800000000);
        assert_eq!(
            TdxStatus::from_raw(0x8000_0308_0000_0063),
            TdxStatus::MissingPamtPagePair
        );
        assert_eq!(TdxStatus::EptEntryStateIncorrect.raw(), 0xC0000B0D00000000);
        assert_eq!(
            TdxStatus::from_raw(0xC000_0999_0000_0000),
            TdxStatus::Other(0xC000_0999_0000_0000)
        );
    }

    #[test]
    fn leaf_numbers_are_the_architectural_ones() {
        let numbers: Vec<u64> = Seamcall::ALL.iter().map(|s| s.number()).collect();
        assert_eq!(numbers, [2, 3, 6, 7, 15, 28, 29, 30, 38, 39, 41, 58, 59]);
    }
}
