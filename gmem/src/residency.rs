//! What the kernel says backs a range of this process's memory: how much of
//! it is resident, and how much of that is in huge pages (transparent or
//! HugeTLB), read from `/proc/self/smaps`.

/// The pages behind a range, as the kernel reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Residency {
    /// Bytes resident (in memory), HugeTLB included.
    pub resident: u64,
    /// Of those, bytes in huge pages: transparent huge pages of anonymous
    /// memory (`AnonHugePages`), of shmem and files mapped with a PMD
    /// (`ShmemPmdMapped`, `FilePmdMapped`), and HugeTLB pages.
    pub huge: u64,
}

impl Residency {
    /// The share of resident bytes in huge pages, 0 to 1 (0 when nothing is
    /// resident).
    pub fn huge_share(&self) -> f64 {
        if self.resident == 0 {
            0.0
        } else {
            self.huge as f64 / self.resident as f64
        }
    }

    /// Reads what backs `[start, start + len)` of this process: the sum
    /// over the mappings that overlap it (whole mappings: smaps does not
    /// split them). `None` where `/proc/self/smaps` cannot be read.
    pub fn of_range(start: usize, len: usize) -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
        Some(Self::parse(&text, start, start.saturating_add(len)))
    }

    /// Sums the smaps entries of `text` whose mappings overlap `[start, end)`.
    fn parse(text: &str, start: usize, end: usize) -> Self {
        let mut total = Self::default();
        let mut inside = false;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else {
                continue;
            };
            if let Some((low, high)) = mapping_range(first) {
                inside = low < end && start < high;
                continue;
            }
            if !inside {
                continue;
            }
            let Some(kib) = words.next().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let bytes = kib << 10;
            match first {
                "Rss:" => total.resident += bytes,
                "AnonHugePages:" | "ShmemPmdMapped:" | "FilePmdMapped:" => total.huge += bytes,
                // HugeTLB pages are not in Rss.
                "Shared_Hugetlb:" | "Private_Hugetlb:" => {
                    total.resident += bytes;
                    total.huge += bytes;
                }
                _ => {}
            }
        }
        total
    }
}

/// The range of an smaps header line's first word (`7f00-7f80`).
fn mapping_range(word: &str) -> Option<(usize, usize)> {
    let (low, high) = word.split_once('-')?;
    Some((
        usize::from_str_radix(low, 16).ok()?,
        usize::from_str_radix(high, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
Size:            1048576 kB
Rss:              409600 kB
AnonHugePages:    204800 kB
ShmemPmdMapped:        0 kB
VmFlags: rd wr mr mw me ac hg
7f0040000000-7f0040200000 rw-s 00000000 00:0f 1234   /anon_hugepage (deleted)
Rss:                   0 kB
Shared_Hugetlb:     2048 kB
Private_Hugetlb:       0 kB
7f0050000000-7f0050001000 r--p 00000000 00:00 0
Rss:                   4 kB
";

    #[test]
    fn sums_the_mappings_that_overlap_the_range_and_counts_hugetlb_as_resident_and_huge() {
        let all = Residency::parse(SMAPS, 0x7f00_0000_0000, 0x7f00_4020_0000);
        assert_eq!(all.resident, (409_600 + 2048) << 10);
        assert_eq!(all.huge, (204_800 + 2048) << 10);
        let first = Residency::parse(SMAPS, 0x7f00_0000_1000, 0x7f00_0000_2000);
        assert_eq!(first.resident, 409_600 << 10);
        assert_eq!(first.huge, 204_800 << 10);
        assert!((first.huge_share() - 0.5).abs() < 1e-9);
        let none = Residency::parse(SMAPS, 0x1000, 0x2000);
        assert_eq!(none, Residency::default());
        assert_eq!(none.huge_share(), 0.0);
    }

    #[test]
    fn reads_this_process() {
        let memory = vec![1u8; 1 << 20];
        let seen = Residency::of_range(memory.as_ptr() as usize, memory.len())
            .expect("/proc/self/smaps is readable");
        assert!(seen.resident >= 1 << 20, "{seen:?}");
    }
}
