//! Fixed-size typed objects carved from pages: the `kmem_cache` side of the
//! memory caches.

use std::alloc::Layout;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::account::Account;
use crate::alloc::PAGE_SIZE;
use crate::page::{Page, PageError, PageKind, PagePool};

/// Errors of slabs.
#[derive(Debug, thiserror::Error)]
pub enum SlabError {
    /// The object type does not fit in a page.
    #[error(
        "{type_name}: {size} bytes with alignment {align} does not fit in a {PAGE_SIZE}-byte page"
    )]
    TooLarge {
        /// The object type.
        type_name: &'static str,
        /// Its size.
        size: usize,
        /// Its alignment.
        align: usize,
    },
    /// A page for new slots could not be had, or the account refused the object.
    #[error(transparent)]
    Page(#[from] PageError),
}

/// Pages that back slab slots.
#[derive(Debug)]
pub enum SlabPage {}
impl PageKind for SlabPage {}

struct SlabState {
    pages: Vec<Page<SlabPage>>,
    free: Vec<NonNull<u8>>,
    live: usize,
}

/// A slab of `T` slots over pages from a [`PagePool`].
///
/// Objects are charged to the slab's account (their size each) while they
/// live. Slab pages go back to the pool when the slab is dropped, which is
/// after the last object, since every [`SlabBox`] holds the slab.
///
/// ```
/// use mmu_cache::{PagePool, Slab, alloc::HeapAllocator};
///
/// let slab = Slab::<[u64; 4]>::new(PagePool::new(HeapAllocator::new()), None)?;
/// let mut object = slab.alloc([0; 4])?;
/// object[0] = 7;
/// assert_eq!(slab.live(), 1);
/// drop(object);
/// assert_eq!(slab.live(), 0);
/// # Ok::<(), mmu_cache::SlabError>(())
/// ```
pub struct Slab<T> {
    pool: Arc<PagePool<SlabPage>>,
    account: Option<Arc<Account>>,
    slot_size: usize,
    state: Mutex<SlabState>,
    marker: PhantomData<fn() -> T>,
}

// SAFETY: the raw slot pointers in the state are only handed out as SlabBox
// values, and the state itself is behind a mutex.
unsafe impl<T> Send for Slab<T> {}
// SAFETY: as above; `&Slab` only allows allocation through the mutex.
unsafe impl<T> Sync for Slab<T> {}

impl<T> fmt::Debug for Slab<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slab")
            .field("type", &std::any::type_name::<T>())
            .field("slot_size", &self.slot_size)
            .field("live", &self.live())
            .finish()
    }
}

impl<T> Slab<T> {
    /// A slab of `T` over `pool`, charging `account` for every live object.
    pub fn new(
        pool: Arc<PagePool<SlabPage>>,
        account: Option<Arc<Account>>,
    ) -> Result<Arc<Self>, SlabError> {
        let layout = Layout::new::<T>().pad_to_align();
        let slot_size = layout.size().max(layout.align());
        if slot_size > PAGE_SIZE {
            return Err(SlabError::TooLarge {
                type_name: std::any::type_name::<T>(),
                size: layout.size(),
                align: layout.align(),
            });
        }
        Ok(Arc::new(Self {
            pool,
            account,
            slot_size,
            state: Mutex::new(SlabState {
                pages: Vec::new(),
                free: Vec::new(),
                live: 0,
            }),
            marker: PhantomData,
        }))
    }

    /// Bytes charged per object.
    pub fn object_bytes(&self) -> u64 {
        std::mem::size_of::<T>() as u64
    }

    /// Objects per slab page.
    pub fn objects_per_page(&self) -> usize {
        PAGE_SIZE / self.slot_size
    }

    /// The account charged for objects.
    pub fn account(&self) -> Option<&Arc<Account>> {
        self.account.as_ref()
    }

    /// Objects alive now.
    pub fn live(&self) -> usize {
        self.lock().live
    }

    /// Pages the slab holds.
    pub fn pages(&self) -> usize {
        self.lock().pages.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlabState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Places `value` in a free slot, taking a new page when none is free.
    pub fn alloc(self: &Arc<Self>, value: T) -> Result<SlabBox<T>, SlabError> {
        if let Some(account) = &self.account {
            account
                .try_charge(self.object_bytes())
                .map_err(PageError::from)?;
        }
        match self.take_slot() {
            Ok(slot) => {
                let ptr = slot.cast::<T>();
                // SAFETY: the slot is `slot_size >= size_of::<T>()` bytes,
                // aligned for T (slots are multiples of the alignment from a
                // page-aligned base), and free, so writing a T is sound.
                unsafe { ptr.as_ptr().write(value) };
                Ok(SlabBox {
                    ptr,
                    slab: Arc::clone(self),
                })
            }
            Err(err) => {
                if let Some(account) = &self.account {
                    account.uncharge(self.object_bytes());
                }
                Err(err)
            }
        }
    }

    fn take_slot(&self) -> Result<NonNull<u8>, SlabError> {
        let mut state = self.lock();
        if state.free.is_empty() {
            let page: Page<SlabPage> = self.pool.get()?;
            let base = page.as_ptr();
            let count = self.objects_per_page();
            state.free.extend((0..count).rev().map(|i| {
                // SAFETY: `i * slot_size < PAGE_SIZE`, inside the page.
                NonNull::new(unsafe { base.add(i * self.slot_size) })
                    .expect("page addresses are non-null")
            }));
            state.pages.push(page);
        }
        let slot = state.free.pop().expect("a page was just added");
        state.live += 1;
        Ok(slot)
    }

    fn release(&self, slot: NonNull<u8>) {
        let mut state = self.lock();
        state.live -= 1;
        state.free.push(slot);
        drop(state);
        if let Some(account) = &self.account {
            account.uncharge(self.object_bytes());
        }
    }
}

/// An object in a [`Slab`] slot; dropping it drops the object and frees the slot.
pub struct SlabBox<T> {
    ptr: NonNull<T>,
    slab: Arc<Slab<T>>,
}

// SAFETY: a SlabBox owns its object exclusively, like a Box.
unsafe impl<T: Send> Send for SlabBox<T> {}
// SAFETY: shared access to a SlabBox only gives `&T`.
unsafe impl<T: Sync> Sync for SlabBox<T> {}

impl<T> SlabBox<T> {
    /// The slab the object lives in.
    pub fn slab(&self) -> &Arc<Slab<T>> {
        &self.slab
    }
}

impl<T> Deref for SlabBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the slot holds a T written by `alloc`, owned by this box.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for SlabBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: fmt::Debug> fmt::Debug for SlabBox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T> Drop for SlabBox<T> {
    fn drop(&mut self) {
        // SAFETY: the slot holds a live T owned by this box; it is dropped
        // exactly once, here, before the slot is released.
        unsafe { self.ptr.as_ptr().drop_in_place() };
        self.slab.release(self.ptr.cast());
    }
}
