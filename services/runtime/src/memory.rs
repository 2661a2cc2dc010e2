//! Returning freed memory to the OS after a large piece of work: an agent's update, a signer's
//! or a distributor's release. glibc keeps what was freed in its per-thread arenas (measured:
//! ~3.5 MiB of an idle agent's 11 MiB after a 256 MiB update; a distributor's peak for a second
//! 200,000-file release 361 MiB instead of 217, the first one's memory held in other arenas),
//! and `malloc_trim` is its documented way to give it back. Called at a quiet point: after the
//! work, not during it (it briefly locks every arena).
//!
//! A trim walks the whole process's heap, so updates that end together (several apps, or the
//! fleet benchmark's thousand agents in one process) share one: [`release_freed_soon`] trims
//! once, a moment after the first request, for every request made meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A trim is scheduled and has not run yet.
static PENDING: AtomicBool = AtomicBool::new(false);

/// How long requests gather before the one trim that serves them.
const GATHER: Duration = Duration::from_secs(1);

/// Returns freed memory to the OS shortly (within [`GATHER`]), once for every request made
/// until then. Needs a tokio runtime.
pub fn release_freed_soon() {
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(GATHER).await;
        // Cleared first: a request arriving during the trim schedules another, so the memory
        // it freed is returned too.
        PENDING.store(false, Ordering::Release);
        release_freed();
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "malloc_trim is a C function; fleetcast's only other unsafe code is the capability calls in the agent's isolation.rs"
)]
fn release_freed() {
    // SAFETY: malloc_trim takes a padding size and has no caller-side invariants; it only
    // releases memory the allocator already considers free.
    let released = unsafe { libc::malloc_trim(0) } != 0;
    tracing::debug!(released, "freed memory returned to the OS");
}

/// Other allocators (musl, macOS) do not hold freed memory this way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed() {}

/// At most `per_core` glibc arenas per core. By default glibc gives busy threads arenas of
/// their own, up to 8 per core; a distributor's chunking threads, gone after each release,
/// leave their memory behind in arenas the next release's threads may not reuse, so
/// consecutive large releases add up. Measured with `ops/bench many` (two 200,000-file
/// releases): the distributor's peak 250 MiB with 2 per core, 277–361 without; the signer's
/// peak rose from ~210 to 394 MiB with the same limit (its tree threads then share arenas
/// with longer-lived data), so only the distributor sets it. Called first thing in `main`,
/// before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "mallopt is a C function; fleetcast's only other unsafe code is the capability calls in the agent's isolation.rs and the launcher's descriptor hand-over (fd.rs)"
)]
pub fn limit_arenas(per_core: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = i32::try_from(per_core * cores).unwrap_or(i32::MAX);
    // SAFETY: mallopt sets an allocator tunable; M_ARENA_MAX is valid at any time and is
    // called here before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, max);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas(_per_core: usize) {}

/// Blocks of 256 KiB and more always in memory maps of their own, returned to the OS when
/// freed. glibc starts at 128 KiB but raises that threshold to the size of each mapped block
/// freed (up to 32 MiB), so after one large release the next one's big lists come from the heap,
/// where they stay after they are freed, between blocks still in use. Measured with
/// `ops/bench many` (two 200,000-file releases): the distributor held 24 MiB after the first
/// release instead of 48–50, and its peak over both was 188–204 MiB in 4 runs of 5 instead of
/// 233–268. The runs that still reached 394–2,423 MiB were heap fragmentation by the
/// distributor's chunking threads, fixed there (`produce` in services/distributor/src/ingest.rs).
/// Called first thing in `main`, before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "mallopt is a C function; fleetcast's only other unsafe code is the capability calls in the agent's isolation.rs and the launcher's descriptor hand-over (fd.rs)"
)]
pub fn map_large_blocks() {
    // SAFETY: mallopt sets an allocator tunable; M_MMAP_THRESHOLD is valid at any time and is
    // called here before other threads exist. A fixed threshold also turns off the raising.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn map_large_blocks() {}
