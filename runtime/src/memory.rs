//! How the process allocates: one malloc arena, so that what a file transfer frees is reused.
//!
//! Moving a file allocates and frees a buffer of about 1 MiB per chunk on several threads
//! (QUIC readers, blocking reads, the commit thread). glibc gives threads arenas of their own,
//! up to eight per core, and a buffer freed in one arena is of no use to a thread allocating
//! in another, so each arena kept its own high-water mark: on a 2-core VM a gateway moving
//! 1 GiB reached 150–170 MiB resident and a receiving device 130–150 MiB. With one arena the
//! same runs peak at about 72 and 83 MiB, at the same speed (small allocations mostly stay in
//! glibc's per-thread caches, which take no arena lock). See benches/README.md, "On the wire".
//! (mimalloc, tried as the global allocator instead, peaked higher still: 244 MiB.)

/// Limits the process to one malloc arena. Call first thing in `main`, before any thread
/// starts. Does nothing where the C library is not glibc.
#[allow(unsafe_code)]
pub fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before other threads
    // exist, and M_ARENA_MAX takes any positive value.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
