//! How the process asks glibc's allocator to behave, so a 100,000-credential daemon holds what it
//! uses and not what start-up once needed.
//!
//! Start-up parses the whole configuration (about 130 MB of transient memory at 100,000
//! credentials) and reads the whole store, then keeps about 50 MB. With glibc's defaults much of
//! the difference stays resident: each thread that parsed a piece of the configuration leaves
//! its own arena behind, whose top glibc never trims, and the mmap threshold rises after
//! start-up frees its big buffers, so later tables come out of the heap and leave holes in it.
//! Measured with `tokend run` at 100,000 credentials, RSS at READY (same build, the settings
//! given through glibc's environment variables): defaults 77 MB, one arena 69 MB, a fixed
//! threshold 75 MB, both 64 MB. The price is start-up: the parsing threads share one arena's
//! lock (READY about 0.1 s later).

/// Arenas for the whole process. The refresh path's threads mostly wait on the network and the
/// disk; contention on one arena's lock costs less than the memory of an arena per thread.
const ARENAS: i32 = 1;
/// Allocations at least this large get their own mapping, returned whole when freed. glibc's
/// default (128 KiB), but fixed: glibc raises it on its own as big blocks are freed.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Call first thing in `main`, before any thread exists.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Hands freed heap pages back to the OS (after start-up or a reload).
#[allow(unsafe_code)]
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the OS; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
