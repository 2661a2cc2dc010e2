//! Returning freed memory to the OS after an update. glibc keeps what a download freed in its
//! per-thread arenas (measured: ~3.5 MiB of an idle agent's 11 MiB after a 256 MiB update), and
//! `malloc_trim` is its documented way to give it back. Called at a quiet point: after an
//! update attempt, not during one (it briefly locks every arena).

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "malloc_trim is a C function; the only unsafe call in fleetcast"
)]
pub(crate) fn release_freed() {
    // SAFETY: malloc_trim takes a padding size and has no caller-side invariants; it only
    // releases memory the allocator already considers free.
    let released = unsafe { libc::malloc_trim(0) } != 0;
    tracing::debug!(released, "freed memory returned to the OS");
}

/// Other allocators (musl, macOS) do not hold freed memory this way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release_freed() {}
