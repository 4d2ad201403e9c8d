//! Token buckets per VM port and CPU: what a VM may make the datapath do for it (ICMP
//! answers, frames for the agent) at most, so one VM asking as fast as it can spends its own
//! budget, never another VM's.
use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::LruPerCpuHashMap};
use nv_common::IcmpBucket;

/// Takes one token from the bucket of `ifindex` on this CPU, which earns `per_sec` tokens a
/// second up to `burst`; false when it has none.
#[inline(always)]
pub fn take(
    buckets: &LruPerCpuHashMap<u32, IcmpBucket>,
    ifindex: u32,
    per_sec: u64,
    burst: u64,
) -> bool {
    if buckets.get_ptr_mut(ifindex).is_none() {
        let full = IcmpBucket {
            // SAFETY: plain helper call.
            last_ns: unsafe { bpf_ktime_get_ns() },
            tokens: burst,
        };
        // An LRU map: a port long quiet makes room for a new one.
        if buckets.insert(ifindex, full, 0).is_err() {
            return false;
        }
    }
    let Some(b) = buckets.get_ptr_mut(ifindex) else {
        return false;
    };
    // SAFETY: this CPU's bucket; only this CPU writes it, and not while we run.
    let b = unsafe { &mut *b };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let earned = (now - b.last_ns) / (1_000_000_000 / per_sec);
    if earned > 0 {
        b.tokens = if b.tokens + earned > burst {
            burst
        } else {
            b.tokens + earned
        };
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}
