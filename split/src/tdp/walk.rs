//! The walk from a root: tables borrowed as atomic entries, the two trees
//! of a TD, and the one walk that faults, accesses and splits share.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Gfn, Gpa, Pfn};
use crate::ept::{DIRTY, Entry, Level, WRITE};
use crate::hooks::{ExternalPageTable, NoExternal};
use crate::tdp::{TdpMmu, VmType};

/// Borrows the 512 entries of the table at `hpa`.
///
/// # Safety
///
/// `hpa` must be the address of a table page of this MMU that stays linked
/// (or owned by the caller) for `'a`; callers hold the MMU lock, and tables
/// are freed only under the write lock.
pub(super) unsafe fn entries<'a>(hpa: u64) -> &'a [AtomicU64; 512] {
    // SAFETY: guaranteed by the caller; a table page is 4 KiB, page aligned,
    // and only ever accessed atomically while linked.
    unsafe { &*(hpa as *const [AtomicU64; 512]) }
}

pub(super) fn load(table: &[AtomicU64; 512], index: usize) -> Entry {
    Entry::from_bits(table[index].load(Ordering::Acquire))
}

pub(super) fn cas(table: &[AtomicU64; 512], index: usize, old: Entry, new: Entry) -> bool {
    table[index]
        .compare_exchange(old.bits(), new.bits(), Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Makes the next write to a leaf's memory visible to dirty logging: clears
/// the dirty bit, and write-protects a huge leaf (whose dirty bit could not
/// say which 4K page was written). A compare-and-exchange loop, so that it
/// runs beside faults and accesses under the read lock; an entry that
/// stops being this leaf (zapped, frozen, split) is left to its new owner.
pub(super) fn protect_leaf(table: &[AtomicU64; 512], index: usize, level: Level, mut entry: Entry) {
    let clear = if level > Level::L4K {
        DIRTY | WRITE
    } else {
        DIRTY
    };
    loop {
        let protected = entry.without(clear);
        if protected == entry {
            return;
        }
        match table[index].compare_exchange(
            entry.bits(),
            protected.bits(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return,
            Err(now) => {
                entry = Entry::from_bits(now);
                if !entry.is_leaf(level) {
                    return;
                }
            }
        }
    }
}

/// Which tree of the MMU: the main one (mirrored by the hooks, if any; the
/// only one of a VM that is not a TD) or a TD's direct tree of shared
/// memory, which the hooks never see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tree {
    /// The main tree.
    Main,
    /// A TD's shared tree.
    Shared,
}

/// The hooks of a tree no external side mirrors.
static NO_EXTERNAL: NoExternal = NoExternal;

/// Where a fault's frame comes from.
#[derive(Clone, Copy, Debug)]
pub(super) enum FrameSource {
    /// The memslot's host frames.
    Slot,
    /// The slot's private memory: the frame of the faulting gfn and the
    /// largest leaf its page allows there.
    Private {
        /// The frame of the faulting gfn.
        pfn: Pfn,
        /// The largest leaf the page's order and alignment allow.
        max_level: Level,
    },
}

/// One step of a [`TdpMmu::walk`]: where the walk stands (the kernel's
/// `tdp_iter`): the entry for the walked frame in a table at `level`
/// (entries of `level` map `level.entry_pages()` frames) of `tree`.
#[derive(Clone, Copy)]
pub(super) struct WalkStep<'a> {
    /// The tree walked.
    pub(super) tree: Tree,
    /// The table.
    pub(super) table: &'a [AtomicU64; 512],
    /// The entry's index in it.
    pub(super) index: usize,
    /// The table's level.
    pub(super) level: Level,
    /// The entry, as loaded.
    pub(super) entry: Entry,
    /// The frame the walk goes to.
    pub(super) gfn: u64,
}

impl WalkStep<'_> {
    /// The first frame the entry maps.
    pub(super) fn base_gfn(&self) -> u64 {
        self.gfn & !(self.level.entry_pages() - 1)
    }
}

/// A table met by a recursive walk of a whole tree (zap, teardown): its
/// tree, its address, the level of its entries and the first frame it
/// maps.
#[derive(Clone, Copy, Debug)]
pub(super) struct TableAt {
    pub(super) tree: Tree,
    pub(super) hpa: u64,
    pub(super) level: Level,
    pub(super) gfn: u64,
}

impl TableAt {
    /// The root of `tree` of `mmu`.
    pub(super) fn root(mmu: &TdpMmu, tree: Tree) -> Self {
        Self {
            tree,
            hpa: mmu.tree_root(tree),
            level: mmu.top_level(),
            gfn: 0,
        }
    }

    /// The first frame entry `index` maps.
    pub(super) fn entry_gfn(&self, index: usize) -> u64 {
        self.gfn + index as u64 * self.level.entry_pages()
    }

    /// The table that `entry`, at `index`, links.
    pub(super) fn child(&self, index: usize, entry: Entry) -> Self {
        Self {
            tree: self.tree,
            hpa: entry.addr(self.level),
            level: self.level.below().expect("tables are above 4K"),
            gfn: self.entry_gfn(index),
        }
    }
}

/// What a walk does after a step.
pub(super) enum Next<T> {
    /// Go on into the table at this address, one level down.
    Descend(u64),
    /// Stop with this result.
    Stop(T),
}

impl TdpMmu {
    /// The root table's address as a number, for walks.
    pub(super) fn root_addr(&self) -> u64 {
        self.root.addr() as u64
    }

    /// The root of `tree`, as a number.
    pub(super) fn tree_root(&self, tree: Tree) -> u64 {
        match tree {
            Tree::Main => self.root_addr(),
            Tree::Shared => self
                .shared_root
                .as_ref()
                .expect("only a TD has a shared tree")
                .addr() as u64,
        }
    }

    /// The MMU's trees: the main one, and a TD's shared one.
    pub(super) fn trees(&self) -> impl Iterator<Item = Tree> + use<> {
        std::iter::once(Tree::Main).chain(self.shared_root.is_some().then_some(Tree::Shared))
    }

    /// The hooks that mirror `tree` (none for a TD's shared tree).
    pub(super) fn hooks_of(&self, tree: Tree) -> &dyn ExternalPageTable {
        match tree {
            Tree::Main => &*self.hooks,
            Tree::Shared => &NO_EXTERNAL,
        }
    }

    /// Whether tables of `tree` carry an external page.
    pub(super) fn external_of(&self, tree: Tree) -> bool {
        tree == Tree::Main && self.external_tables
    }

    /// The largest leaf of `tree`.
    pub(super) fn max_leaf_of(&self, tree: Tree) -> Level {
        match tree {
            Tree::Main => self.max_leaf,
            Tree::Shared => Level::L1G,
        }
    }

    /// Where an address, as the guest used it, is mapped: a TD's shared
    /// accesses in the shared tree, at the frame without the shared bit;
    /// everything else in the main tree.
    pub(super) fn place(&self, gpa: Gpa) -> (Tree, Gfn) {
        match self.config.vm_type {
            VmType::Td { shared_bit } if gpa.0 & (1 << shared_bit) != 0 => {
                (Tree::Shared, Gpa(gpa.0 & !(1 << shared_bit)).gfn())
            }
            _ => (Tree::Main, gpa.gfn()),
        }
    }

    pub(super) fn top_level(&self) -> Level {
        Level::new(self.config.levels).expect("validated at construction")
    }

    /// The one walk from the root towards `gfn`, which faults, accesses and
    /// splits share: `visit` sees the entry at each level and says whether
    /// to descend (into the entry's table, or a table it just linked) or to
    /// stop. Callers hold the lock, which keeps every table on the way
    /// linked.
    pub(super) fn walk<'a, T>(
        &'a self,
        tree: Tree,
        gfn: u64,
        mut visit: impl FnMut(WalkStep<'a>) -> Next<T>,
    ) -> T {
        let mut table_hpa = self.tree_root(tree);
        let mut level = self.top_level();
        loop {
            // SAFETY: the root, or a table the previous step found linked (or
            // linked itself) under the caller's lock, which keeps it alive.
            let table = unsafe { entries(table_hpa) };
            let index = level.index(gfn);
            let entry = load(table, index);
            match visit(WalkStep {
                tree,
                table,
                index,
                level,
                entry,
                gfn,
            }) {
                Next::Stop(result) => return result,
                Next::Descend(hpa) => {
                    table_hpa = hpa;
                    level = level.below().expect("tables are above 4K");
                }
            }
        }
    }
}
