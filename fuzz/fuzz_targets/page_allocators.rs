//! Every allocator: gets, frees, foreign frees, double frees and misaligned
//! frees; misuse is detected without touching memory, counts stay right.
#![no_main]

use std::ptr::NonNull;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmu_cache::alloc::{AllocError, ChunkAllocator, HeapAllocator, PageAllocator};

#[derive(Arbitrary, Debug)]
enum Op {
    Get,
    Free { index: u8 },
    DoubleFree { index: u8 },
    Foreign { offset: u16 },
    Misaligned { index: u8, offset: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    heap: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let allocator: Box<dyn PageAllocator> = if input.heap {
        Box::new(HeapAllocator::new())
    } else {
        Box::new(ChunkAllocator::anonymous())
    };
    let other = HeapAllocator::new();
    let foreign = other.page_get().expect("a foreign page");
    let mut live: Vec<NonNull<u8>> = Vec::new();
    let mut freed: Vec<NonNull<u8>> = Vec::new();
    for op in input.ops.into_iter().take(128) {
        match op {
            Op::Get => {
                let page = allocator.page_get().expect("memory is plentiful here");
                assert_eq!(page.as_ptr() as usize % 4096, 0);
                assert!(!live.contains(&page), "a page handed out twice");
                freed.retain(|&p| p != page);
                live.push(page);
            }
            Op::Free { index } => {
                if !live.is_empty() {
                    let page = live.swap_remove(usize::from(index) % live.len());
                    // SAFETY: a live page of this allocator, not used again.
                    unsafe { allocator.page_free(page) }.expect("a live page frees");
                    freed.push(page);
                }
            }
            Op::DoubleFree { index } => {
                if !freed.is_empty() {
                    let page = freed[usize::from(index) % freed.len()];
                    // SAFETY: the allocator must refuse without touching it.
                    let result = unsafe { allocator.page_free(page) };
                    assert!(
                        matches!(
                            result,
                            Err(AllocError::DoubleFree { .. } | AllocError::NotOwned { .. })
                        ),
                        "{result:?}"
                    );
                }
            }
            Op::Foreign { offset } => {
                // SAFETY: a page of another allocator: refused untouched.
                let result = unsafe { allocator.page_free(foreign) };
                assert!(result.is_err());
                let wild = 0x1000_0000_0000usize + usize::from(offset) * 4096;
                // SAFETY: never handed out: refused untouched.
                let result = unsafe { allocator.page_free(NonNull::new(wild as *mut u8).unwrap()) };
                assert!(result.is_err());
            }
            Op::Misaligned { index, offset } => {
                if !live.is_empty() {
                    let page = live[usize::from(index) % live.len()];
                    let off = usize::from(offset % 4095) + 1;
                    // SAFETY: not a page address: refused untouched.
                    let result = unsafe {
                        allocator.page_free(NonNull::new(page.as_ptr().wrapping_add(off)).unwrap())
                    };
                    assert!(result.is_err());
                }
            }
        }
        assert_eq!(allocator.pages_outstanding(), live.len());
    }
    for page in live {
        // SAFETY: live pages of this allocator.
        unsafe { allocator.page_free(page) }.unwrap();
    }
    // SAFETY: the foreign page goes back to its own allocator.
    unsafe { other.page_free(foreign) }.unwrap();
});
