//! The process's allocator settings: glibc's malloc, tuned for a process that allocates
//! batch-sized buffers on several threads (see [`tune`]). The `payslip-stream` binary calls it
//! first thing in `main`, and so does the throughput harness (benches/throughput.rs), which runs
//! the infer stage in its own process: its figures are then those of the binary's settings.
//!
//! Invariant: called before any other thread exists (`mallopt` is not synchronised with
//! allocations on other threads); an operator's own glibc variables always win.

/// glibc's mmap threshold as the binary sets it: 32 MB, the largest glibc takes (see [`tune`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 * 1024 * 1024;

/// glibc, tuned for a process that allocates batch-sized buffers (decoded rasters, input tensors,
/// librdkafka's fetch responses and decompressed record batches: 0.1-16 MB each) on several
/// threads. Measured with benches/memory.rs and a backlog drain (BENCHMARKS.md, "Memory while
/// draining a backlog" and "The mmap threshold at 32 MB"):
/// - glibc gives each thread that allocates its own arena (up to 8 per core) and keeps what each one
///   freed; two arenas keep contention low on these few threads.
/// - glibc raises its mmap threshold every time a mapped block is freed (up to 32 MB). While ONNX
///   Runtime's arena was off and the text model ran whole batches, that kept every batch-sized
///   buffer on the heap, fragmented (a 20,000 document backlog peaked at 278 MB), so a fixed
///   threshold of 128 KiB was set. With those buffers gone (ONNX Runtime's CPU arena, the text
///   model in runs of 64 lines, pooled input buffers), what a 128 KiB threshold still mapped and
///   unmapped was mostly librdkafka's: every fetch response (up to `fetch.max.bytes`, 16 MB) and
///   every decompressed batch, about 12 page faults per document, 9 % of the stage's CPU. A fixed
///   threshold of 32 MB (glibc's largest) keeps them on the heap: 2.6 faults per document, about
///   7 % less CPU per ordinary document (median of 13 alternating pairs of drains) and 14-20 %
///   less for the heaviest, at 6-14 MB more peak RSS (101-103 MB for the backlog, 105-111 MB for
///   the heaviest documents).
/// - The heap is trimmed once 1 MiB is free at its top.
///
/// An operator's `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or
/// `GLIBC_TUNABLES` wins. Called before any thread exists.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |name: &str| std::env::var_os(name).is_some();
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        // SAFETY: mallopt only sets parameters of the allocator; no other thread runs yet.
        unsafe {
            if !set("MALLOC_ARENA_MAX") && !tunables.contains("glibc.malloc.arena_max") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if !set("MALLOC_MMAP_THRESHOLD_") && !tunables.contains("glibc.malloc.mmap_threshold") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") && !tunables.contains("glibc.malloc.trim_threshold") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
            }
        }
    }
}
