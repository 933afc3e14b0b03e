//! Cache sets: the caches one operation needs, topped up together.

/// Expands to a capacity: the given one, or [`crate::DEFAULT_CAPACITY`].
#[doc(hidden)]
#[macro_export]
macro_rules! __cache_set_capacity {
    () => {
        $crate::DEFAULT_CAPACITY
    };
    ($capacity:expr) => {
        $capacity
    };
}

/// Declares a struct grouping the caches one operation needs, with a
/// minimum (and optionally a capacity) per cache, and `topup` / `free_all`
/// methods that handle them together.
///
/// `topup` tops the members up in declaration order and stops at the first
/// failure, naming the member; members keep what they obtained.
///
/// ```
/// use mmu_cache::{cache_set, ObjectCache, PageCache, PagePool, Slab, alloc::HeapAllocator};
///
/// #[derive(Default)]
/// struct Header { gfn: u64 }
///
/// cache_set! {
///     /// What one fault needs.
///     struct FaultCaches {
///         /// Page-table pages.
///         tables: PageCache => [min 5],
///         /// Table headers.
///         headers: ObjectCache<Header> => [min 5, capacity 10],
///     }
/// }
///
/// let pool = PagePool::new(HeapAllocator::new());
/// let mut caches = FaultCaches {
///     tables: PageCache::new(pool.clone()).with_init_value(1 << 63),
///     headers: ObjectCache::new(Slab::new(pool.for_kind(), None)?),
/// };
/// caches.topup()?;
/// assert_eq!((caches.tables.nr_free(), caches.headers.nr_free()), (40, 10));
/// assert_eq!(caches.free_all(), 50);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[macro_export]
macro_rules! cache_set {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $field_vis:vis $field:ident : $ty:ty => [min $min:expr $(, capacity $capacity:expr)?]
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $(
                $(#[$field_meta])*
                $field_vis $field: $ty,
            )+
        }

        impl $name {
            /// Each member with its minimum and capacity.
            #[allow(dead_code, reason = "a cache set may leave any generated method unused")]
            pub const MEMBERS: &'static [(&'static str, usize, usize)] = &[
                $((stringify!($field), $min, $crate::__cache_set_capacity!($($capacity)?)),)+
            ];

            /// Tops every member up to its minimum, in declaration order.
            #[allow(dead_code, reason = "a cache set may leave any generated method unused")]
            pub fn topup(&mut self) -> ::core::result::Result<(), $crate::CacheError> {
                $(
                    self.$field
                        .topup_with_capacity($crate::__cache_set_capacity!($($capacity)?), $min)
                        .map_err(|err| $crate::CacheError::in_set(stringify!($field), err))?;
                )+
                Ok(())
            }

            /// Returns every member's cached objects; returns how many.
            #[allow(dead_code, reason = "a cache set may leave any generated method unused")]
            pub fn free_all(&mut self) -> usize {
                0 $(+ self.$field.free_all())+
            }
        }
    };
}
