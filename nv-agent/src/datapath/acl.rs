//! The ACL maps as the agent keeps them: rule sets (written whole), flow sets (made empty
//! where missing, so the connections a restarted agent finds stay), meters (made at zero
//! where missing, so counts survive), and what observation reads back: each rule's packets
//! and bytes, each VM's live flows.
use std::collections::{HashMap, HashSet};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap, PerCpuValues},
    util::nr_cpus,
};
use nv_common::{
    acl::{AclFlowKey, AclFlowSet, AclMeter, AclMeterKey, AclSet, AclSetKey, DIR_IN, DIR_OUT},
    map_names,
};

use super::{Datapath, Repair, dp_err, map};
use crate::{
    error::Result,
    tables::acls::{self, Vm},
};

/// `BPF_NOEXIST`: make only what is missing.
const NOEXIST: u64 = 1;

fn flows(ebpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, AclFlowKey, AclFlowSet>> {
    map(ebpf, map_names::ACL_FLOWS)
}

/// Makes the VM's flow sets `0..n` where missing and removes those above; `None` removes
/// all it could have.
pub fn set_flows(ebpf: &mut Ebpf, vm: Vm, n: Option<u32>) -> Result<()> {
    let mut m = flows(ebpf)?;
    let keep = n.unwrap_or(0);
    let empty = AclFlowSet::default();
    for k in acls::flow_keys(vm, keep) {
        match m.insert(k, empty, NOEXIST) {
            Ok(()) => {}
            // Already there: its flows stay.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            // The host's flow table is full: this VM's stateful rules track what fits (the
            // rest counts as acl_flow_untracked), and nothing else stops.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                tracing::error!(
                    vsid = vm.0,
                    "the host's ACL flow table ({} sets) is full: VSID {}'s VM tracks {} of its \
                     {keep} flow sets; lower acl_max_flows or move VMs with stateful rules",
                    nv_common::acl::MAX_FLOW_SETS,
                    vm.0,
                    k.set
                );
                break;
            }
            Err(e) => return Err(dp_err("make a flow set", e)),
        }
    }
    let stale: Vec<AclFlowKey> = m
        .keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| (k.vsid, k.ca) == vm && k.set >= keep)
        .collect();
    for k in stale {
        match m.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(dp_err("remove a flow set", e)),
        }
    }
    Ok(())
}

fn meters(ebpf: &mut Ebpf) -> Result<PerCpuHashMap<&mut MapData, AclMeterKey, AclMeter>> {
    map(ebpf, map_names::ACL_METERS)
}

/// Makes a rule's meter at zero where missing (`on`), or removes it.
pub fn set_meter(ebpf: &mut Ebpf, k: AclMeterKey, on: bool) -> Result<()> {
    let mut m = meters(ebpf)?;
    if on {
        let cpus = nr_cpus().map_err(|(_, e)| dp_err("count the CPUs", e))?;
        let zero = PerCpuValues::try_from(vec![AclMeter::default(); cpus])
            .map_err(|e| dp_err("a meter's values", e))?;
        match m.insert(k, zero, NOEXIST) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(e) => Err(dp_err("make a meter", e)),
        }
    } else {
        match m.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(dp_err("remove a meter", e)),
        }
    }
}

/// Makes the rule-set map hold exactly `desired`.
pub fn sync_sets(ebpf: &mut Ebpf, desired: &HashMap<AclSetKey, Box<AclSet>>) -> Result<Repair> {
    let mut m: BpfHashMap<&mut MapData, AclSetKey, AclSet> = map(ebpf, map_names::ACL_SETS)?;
    let present: Vec<AclSetKey> = m.keys().filter_map(std::result::Result::ok).collect();
    let mut repair = Repair::default();
    for (k, v) in desired {
        if m.get(k, 0).ok().as_ref() != Some(&**v) {
            m.insert(k, **v, 0)
                .map_err(|e| dp_err("update NV_ACL_SETS", e))?;
            repair.written += 1;
        }
    }
    for k in present {
        if !desired.contains_key(&k) {
            let _ = m.remove(&k);
            repair.removed += 1;
        }
    }
    Ok(repair)
}

/// Makes every VM's flow sets of `desired` (keeping their flows) and no others.
pub fn sync_flows(ebpf: &mut Ebpf, desired: &HashMap<Vm, u32>) -> Result<Repair> {
    let present: Vec<AclFlowKey> = flows(ebpf)?
        .keys()
        .filter_map(std::result::Result::ok)
        .collect();
    let have: HashSet<(Vm, u32)> = present.iter().map(|k| ((k.vsid, k.ca), k.set)).collect();
    let mut repair = Repair::default();
    for (vm, n) in desired {
        if (0..*n).any(|s| !have.contains(&(*vm, s)))
            || present.iter().any(|k| (k.vsid, k.ca) == *vm && k.set >= *n)
        {
            set_flows(ebpf, *vm, Some(*n))?;
            repair.written += 1;
        }
    }
    let mut m = flows(ebpf)?;
    for k in present {
        if !desired.contains_key(&(k.vsid, k.ca)) {
            let _ = m.remove(&k);
            repair.removed += 1;
        }
    }
    Ok(repair)
}

/// Makes the meters of `desired` (keeping their counts) and no others.
pub fn sync_meters(ebpf: &mut Ebpf, desired: &HashSet<AclMeterKey>) -> Result<Repair> {
    let present: HashSet<AclMeterKey> = meters(ebpf)?
        .keys()
        .filter_map(std::result::Result::ok)
        .collect();
    let mut repair = Repair::default();
    for k in desired.difference(&present) {
        set_meter(ebpf, *k, true)?;
        repair.written += 1;
    }
    for k in present.difference(desired) {
        set_meter(ebpf, *k, false)?;
        repair.removed += 1;
    }
    Ok(repair)
}

/// Each rule's packets and bytes by direction in `m`, summed over all CPUs.
pub fn read_meters<T: std::borrow::Borrow<MapData>>(
    m: &PerCpuHashMap<T, AclMeterKey, AclMeter>,
) -> Result<HashMap<AclMeterKey, AclMeter>> {
    let mut out = HashMap::new();
    for entry in m {
        let (k, per_cpu) = entry.map_err(|e| dp_err("read NV_ACL_METERS", e))?;
        let sum = per_cpu.iter().fold(AclMeter::default(), |a, v| AclMeter {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
        });
        out.insert(k, sum);
    }
    Ok(out)
}

/// Live tracked connections per VM in `m`.
pub fn read_flows<T: std::borrow::Borrow<MapData>>(
    m: &BpfHashMap<T, AclFlowKey, AclFlowSet>,
) -> Result<HashMap<Vm, u64>> {
    let now = super::clock_ns(libc::CLOCK_MONOTONIC_COARSE);
    let mut out: HashMap<Vm, u64> = HashMap::new();
    for entry in m {
        let (k, set) = entry.map_err(|e| dp_err("read NV_ACL_FLOWS", e))?;
        let live = set
            .ways
            .iter()
            .filter(|f| f.valid != 0 && !f.expired(now))
            .count();
        *out.entry((k.vsid, k.ca)).or_default() += live as u64;
    }
    Ok(out)
}

impl Datapath {
    /// Each rule's packets and bytes by direction, summed over all CPUs.
    pub fn acl_meters(&mut self) -> Result<HashMap<AclMeterKey, AclMeter>> {
        read_meters(&meters(&mut self.ebpf)?)
    }

    /// The ACL rule behind this copy's last deny (0: none since [`Datapath::clear_acl_denied`]).
    pub fn acl_denied(&self) -> Result<u32> {
        Ok(self
            .acl_denied_map()?
            .get(&0, 0)
            .map_err(|e| dp_err("read NV_ACL_DENIED", e))?
            .iter()
            .copied()
            .max()
            .unwrap_or(0))
    }

    /// Forgets this copy's last deny (a trace's copy, before its run).
    pub fn clear_acl_denied(&mut self) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| dp_err("count the CPUs", e))?;
        let zero = PerCpuValues::try_from(vec![0u32; cpus])
            .map_err(|e| dp_err("NV_ACL_DENIED's values", e))?;
        let mut m: aya::maps::PerCpuArray<&mut MapData, u32> =
            map(&mut self.ebpf, map_names::ACL_DENIED)?;
        m.set(0, zero, 0)
            .map_err(|e| dp_err("clear NV_ACL_DENIED", e))
    }

    fn acl_denied_map(&self) -> Result<aya::maps::PerCpuArray<&MapData, u32>> {
        let m = self
            .ebpf
            .map(map_names::ACL_DENIED)
            .ok_or_else(|| crate::error::NvError::datapath("NV_ACL_DENIED missing"))?;
        aya::maps::PerCpuArray::try_from(m).map_err(|e| dp_err("NV_ACL_DENIED", e))
    }

    /// Takes out the tracked connections the rules now in the maps no longer admit (a deny
    /// added, a stateful allow taken away), and names the rule that admits the others.
    /// Returns how many went.
    pub fn cut_flows(&mut self) -> Result<usize> {
        let sets: HashMap<AclSetKey, AclSet> = {
            let m: BpfHashMap<&mut MapData, AclSetKey, AclSet> =
                map(&mut self.ebpf, map_names::ACL_SETS)?;
            m.iter().filter_map(std::result::Result::ok).collect()
        };
        let mut m = flows(&mut self.ebpf)?;
        let all: Vec<(AclFlowKey, AclFlowSet)> =
            m.iter().filter_map(std::result::Result::ok).collect();
        let mut cut = 0;
        for (k, mut set) in all {
            let mut changed = false;
            for f in set.ways.iter_mut().filter(|f| f.valid != 0) {
                let dir = if u32::from(f.dir) == DIR_OUT {
                    DIR_OUT
                } else {
                    DIR_IN
                };
                let rules = sets.get(&AclSetKey {
                    vsid: k.vsid,
                    dir,
                    ca: k.ca,
                });
                match rules.and_then(|r| acls::still_admits(r, f)) {
                    Some(rule) if rule == f.rule => {}
                    Some(rule) => {
                        f.rule = rule;
                        changed = true;
                    }
                    None => {
                        f.valid = 0;
                        changed = true;
                        cut += 1;
                    }
                }
            }
            if changed {
                m.insert(k, set, 0)
                    .map_err(|e| dp_err("update NV_ACL_FLOWS", e))?;
            }
        }
        Ok(cut)
    }
}
