//! Shards' bytes, in a mimalloc heap of their own. A shard is written
//! anew at each change, in sizes that vary, so the freed copies leave
//! holes in the allocator's pages; among the process's other long-lived
//! blocks those holes kept whole pages resident even after `compact`
//! moved the live shards out (measured: about 600 KiB at 1,200 objects).
//! In their own heap, the pages hold only shards, and once the shards
//! are packed those pages are empty and go back to the system.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

// mimalloc's first-class heaps (libmimalloc-sys binds them only with its
// `extended` feature). Any thread may allocate from a heap and free its
// blocks.
unsafe extern "C" {
    fn mi_heap_new() -> *mut c_void;
    fn mi_heap_zalloc(heap: *mut c_void, size: usize) -> *mut c_void;
    fn mi_heap_collect(heap: *mut c_void, force: bool);
    fn mi_free(p: *mut c_void);
}

/// The shards' heap, made on first use and kept for the process's life.
struct Heap(NonNull<c_void>);

// SAFETY: a mimalloc heap may be used from any thread (see above); the
// pointer is never freed.
unsafe impl Send for Heap {}
// SAFETY: as for Send.
unsafe impl Sync for Heap {}

fn heap() -> Option<&'static Heap> {
    static HEAP: OnceLock<Option<Heap>> = OnceLock::new();
    HEAP.get_or_init(|| {
        // SAFETY: no preconditions; null when out of memory.
        NonNull::new(unsafe { mi_heap_new() }).map(Heap)
    })
    .as_ref()
}

/// Bytes the live shards hold, for measuring the zone in a process whose
/// global allocator counts the rest.
static LIVE: AtomicUsize = AtomicUsize::new(0);

pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Returns the shards' heap's free pages to the system: readers free old
/// snapshots' shards on their own threads, which only a collection of
/// the heap takes back.
pub fn collect() {
    if let Some(heap) = heap() {
        // SAFETY: the heap is live; mimalloc collects it for the calling
        // thread.
        unsafe { mi_heap_collect(heap.0.as_ptr(), true) }
    }
}

/// An immutable byte string in the shards' heap.
pub struct Bytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the bytes are written only before `build` returns and are
// read-only after; mimalloc frees from any thread.
unsafe impl Send for Bytes {}
// SAFETY: as for Send.
unsafe impl Sync for Bytes {}

impl Bytes {
    /// `len` bytes that `fill` writes (they start zeroed).
    pub fn build(len: usize, fill: impl FnOnce(&mut [u8])) -> Bytes {
        let size = len.max(1);
        let ptr = match heap() {
            // SAFETY: the heap is live; the block is zeroed, so all of it
            // is initialised.
            Some(heap) => unsafe { mi_heap_zalloc(heap.0.as_ptr(), size) },
            None => std::ptr::null_mut(),
        };
        let Some(ptr) = NonNull::new(ptr.cast::<u8>()) else {
            let layout = std::alloc::Layout::array::<u8>(size)
                .unwrap_or_else(|_| std::alloc::Layout::new::<u8>());
            std::alloc::handle_alloc_error(layout);
        };
        // SAFETY: `ptr` points to `size >= len` zeroed bytes that nothing
        // else refers to yet.
        fill(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) });
        LIVE.fetch_add(len, Ordering::Relaxed);
        Bytes { ptr, len }
    }

    pub fn copy_of(bytes: &[u8]) -> Bytes {
        Bytes::build(bytes.len(), |dst| dst.copy_from_slice(bytes))
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialised bytes for as long as
        // `self` lives, and nothing writes them after `build`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        LIVE.fetch_sub(self.len, Ordering::Relaxed);
        // SAFETY: `ptr` came from mi_heap_zalloc and is freed only here.
        unsafe { mi_free(self.ptr.as_ptr().cast()) }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({})", self.len)
    }
}
