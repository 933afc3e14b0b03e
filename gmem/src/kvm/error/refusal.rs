//! Memory that cannot back a KVM guest.

/// Memory that cannot back a KVM guest.
#[derive(Debug, thiserror::Error)]
pub enum MemoryRefusal {
    /// memfd_secret memory has no direct map, which KVM needs.
    #[error("{}", if *.kernel_offers_no_direct_map {
        "memfd_secret memory cannot back a KVM memslot; this kernel offers \
         GUEST_MEMFD_FLAG_NO_DIRECT_MAP: use the guest_memfd backend with that flag"
    } else {
        "memfd_secret memory has no kernel direct map, and KVM can only map guest memory it \
         can reach through the direct map; this kernel has no GUEST_MEMFD_FLAG_NO_DIRECT_MAP, \
         so use another backend"
    })]
    SecretMemory {
        /// Whether the kernel offers `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`.
        kernel_offers_no_direct_map: bool,
    },
    /// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` on a TDX VM.
    #[error(
        "GUEST_MEMFD_FLAG_NO_DIRECT_MAP with a TDX VM: TDX needs the direct map (the TDX \
         module's page conversions and cache flushes go through it)"
    )]
    NoDirectMapOnTdx,
}
