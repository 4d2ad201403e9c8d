//! `BPF_MAP_UPDATE_BATCH`, which aya 0.14 does not wrap: one system call puts many entries of a
//! hash map (the kernel's `generic_map_update_batch`), instead of one call each.
use std::{io, mem::size_of, os::fd::RawFd};

use aya::Pod;

/// `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Puts `keys[i]` → `values[i]` into the map `fd` (`BPF_ANY`). On failure, how many entries the
/// kernel put before it stopped, and why.
pub fn update<K: Pod, V: Pod>(
    fd: RawFd,
    keys: &[K],
    values: &[V],
) -> Result<usize, (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(0);
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(|e| (0, io::Error::other(e)))?,
        map_fd: u32::try_from(fd).map_err(|e| (0, io::Error::other(e)))?,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; `keys` and `values` are
    // arrays of `count` Pod elements of the map's key and value sizes, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err((attr.count as usize, io::Error::last_os_error()));
    }
    Ok(keys.len())
}
