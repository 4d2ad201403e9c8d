use nv_common::Counter;

use crate::maps::COUNTERS;

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// The counter numbered `n`, as an out-of-line function returns one in a scalar (a BPF
/// subprogram cannot hand back an aggregate), or `fallback` for a number that names none.
/// Masked behind a barrier: the compiler may check the bound on one register and index with
/// another, and the verifier then sees the read unbounded; masked, it stays within the table's
/// read-only section whatever the check.
#[inline(always)]
pub fn numbered(n: u32, fallback: Counter) -> Counter {
    const _: () = assert!(
        Counter::COUNT <= 0x80,
        "the mask below must cover every counter"
    );
    Counter::ALL
        .get((core::hint::black_box(n) & 0x7f) as usize)
        .copied()
        .unwrap_or(fallback)
}
