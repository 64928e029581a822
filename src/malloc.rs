//! The process's allocator settings: glibc's malloc, tuned for a process that allocates
//! batch-sized buffers on several threads (see [`tune`]). The `payslip-stream` binary calls it
//! first thing in `main`, and so does the throughput harness (benches/throughput.rs), which runs
//! the infer stage in its own process: its figures are then those of the binary's settings.
//!
//! Invariant: called before any other thread exists (`mallopt` is not synchronised with
//! allocations on other threads); an operator's own glibc variables always win.

/// glibc, tuned for a process that allocates batch-sized buffers (decoded rasters, input tensors,
/// ONNX Runtime's intermediate values: 0.1-8 MB each) on several threads. Measured with
/// benches/memory.rs (BENCHMARKS.md, "Memory while draining a backlog"):
/// - glibc gives each thread that allocates its own arena (up to 8 per core) and keeps what each one
///   freed; two arenas keep contention low on these few threads.
/// - glibc raises its mmap threshold every time a mapped block is freed (up to 32 MB); after the
///   first batches, every batch buffer came from the heap and stayed there, fragmented (a 20,000
///   document backlog peaked at 278 MB, the heaviest documents at 418 MB). A fixed threshold of
///   128 KiB turns that off: large buffers are mapped and given back when freed (115 and 129 MB,
///   at the same throughput), and the heap is trimmed once 1 MiB is free at its top.
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
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") && !tunables.contains("glibc.malloc.trim_threshold") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
            }
        }
    }
}
