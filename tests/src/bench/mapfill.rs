//! The floor of an import: the same lookup entries written straight into a fresh BPF hash map
//! of the same size, by raw system calls, one call per entry and batched
//! (`BPF_MAP_UPDATE_BATCH`, what the agent uses). An import costs this plus reading, checking
//! and storing the records.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nv_common::{LookupKey, LookupValue};

/// `enum bpf_cmd` and `BPF_MAP_TYPE_HASH` (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_HASH: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for `cmd`, of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn lookup_map(max_entries: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = CreateAttr {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: u32::try_from(size_of::<LookupKey>())?,
        value_size: u32::try_from(size_of::<LookupValue>())?,
        max_entries,
        ..CreateAttr::default()
    };
    let fd = i32::try_from(bpf(BPF_MAP_CREATE, &mut attr)?)?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How long `keys` → `values` take into a fresh lookup map of `max_entries`: one call an entry,
/// and batched.
pub fn fill(
    keys: &[LookupKey],
    values: &[LookupValue],
    max_entries: u32,
) -> anyhow::Result<(Duration, Duration)> {
    let one = lookup_map(max_entries)?;
    let start = Instant::now();
    for (k, v) in keys.iter().zip(values) {
        let mut attr = ElemAttr {
            map_fd: u32::try_from(one.as_raw_fd())?,
            key: std::ptr::from_ref(k) as u64,
            value: std::ptr::from_ref(v) as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    }
    let single = start.elapsed();
    drop(one);
    let batched = lookup_map(max_entries)?;
    let start = Instant::now();
    for (k, v) in keys.chunks(16_384).zip(values.chunks(16_384)) {
        nv_agent::datapath::batch::update(batched.as_raw_fd(), k, v)
            .map_err(|(_, e)| anyhow::anyhow!("batch update: {e}"))?;
    }
    Ok((single, start.elapsed()))
}
