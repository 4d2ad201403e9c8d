//! Port ACL rules: on one VM (by its lookup record) or every VM of a VSID, numbered by nv.
//! Stored as JSON in the CLI's fields. [`entries`] compiles them into what the datapath
//! holds for this host's VMs: each VM's rules of each direction, highest precedence first
//! (its own and its VSID's together), the meters, and the VM's flow sets when a stateful
//! rule applies to it.
use std::collections::{BTreeMap, HashMap, HashSet};

use nv_common::acl::{self as dp, AclFlowKey, AclMeterKey, AclSetKey, DIR_IN, DIR_OUT};

use super::Table;
use crate::{
    error::{NvError, Result},
    model::{
        LookupRecord, Subnet,
        acl::{AclRule, Action},
    },
};

pub struct Acls;

/// Where rules live in etcd, by id: `/nv/v1/acls/ID`.
pub const ETCD_PREFIX: &str = "/nv/v1/acls/";

/// A rule's key in etcd.
pub fn etcd_key(id: u32) -> String {
    format!("{ETCD_PREFIX}{id}")
}

/// The rule id of an etcd key under [`ETCD_PREFIX`].
pub fn parse_etcd_key(key: &[u8]) -> Option<u32> {
    let id = std::str::from_utf8(key).ok()?.strip_prefix(ETCD_PREFIX)?;
    // One spelling per id: no sign, no leading zero.
    id.parse::<u32>()
        .ok()
        .filter(|n| *n != 0 && n.to_string() == id)
}

impl Table for Acls {
    const NAME: &'static str = "acls";
    const STORE: &'static str = "acls_v1";
    const ETCD_PREFIX: Option<&'static str> = Some(ETCD_PREFIX);
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("ID", "id"),
        ("NAME", "name"),
        ("VSID", "vsid"),
        ("CA", "ca"),
        ("DIR", "direction"),
        ("ACTION", "action"),
        ("REMOTE", "remote"),
        ("LOCAL", "local"),
        ("PROTO", "protocol"),
        ("RPORT", "remote_port"),
        ("LPORT", "local_port"),
        ("WEIGHT", "weight"),
        ("STATEFUL", "stateful"),
        ("PACKETS", "packets"),
        ("BYTES", "bytes"),
    ];
    type Row = AclRule;
    type Key = u32;

    fn key(row: &AclRule) -> u32 {
        row.id
    }

    fn validate(row: &AclRule) -> Result<()> {
        row.validate()
    }

    fn store_key(key: &u32) -> Vec<u8> {
        key.to_be_bytes().to_vec()
    }

    fn encode(row: &AclRule) -> Vec<u8> {
        serde_json::to_vec(row).unwrap_or_default()
    }

    fn decode(_key: &[u8], value: &[u8]) -> std::result::Result<AclRule, String> {
        serde_json::from_slice(value).map_err(|e| {
            format!(
                "a value does not parse ({e}): {}",
                String::from_utf8_lossy(value)
            )
        })
    }
}

/// Every rule, by id, and the budget of tracked connections per VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclIndex {
    rules: BTreeMap<u32, AclRule>,
    /// Connections tracked per VM (`acl_max_flows`).
    pub max_flows: u32,
}

impl Default for AclIndex {
    fn default() -> Self {
        AclIndex {
            rules: BTreeMap::new(),
            max_flows: dp::DEFAULT_MAX_FLOWS,
        }
    }
}

impl AclIndex {
    pub fn from_rows(rows: Vec<AclRule>) -> Result<AclIndex> {
        let mut index = AclIndex::default();
        for r in rows {
            r.validate()
                .map_err(|e| NvError::store(format!("stored ACL rule {}: {e}", r.id)))?;
            index.rules.insert(r.id, r);
        }
        Ok(index)
    }

    /// The rules etcd holds, as the operator reads them: each that keeps its own rules.
    pub fn lenient(rows: Vec<AclRule>) -> AclIndex {
        let mut index = AclIndex::default();
        for r in rows.into_iter().filter(|r| r.validate().is_ok()) {
            index.rules.insert(r.id, r);
        }
        index
    }

    pub fn get(&self, id: u32) -> Option<&AclRule> {
        self.rules.get(&id)
    }

    pub fn insert(&mut self, r: AclRule) -> Option<AclRule> {
        self.rules.insert(r.id, r)
    }

    pub fn remove(&mut self, id: u32) -> Option<AclRule> {
        self.rules.remove(&id)
    }

    /// The rules, in id order, of one VSID or all.
    pub fn list(&self, vsid: Option<u32>) -> Vec<AclRule> {
        self.rules
            .values()
            .filter(|r| vsid.is_none_or(|v| r.vsid == v))
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The id the next rule gets.
    pub fn next_id(&self) -> u32 {
        self.rules.keys().next_back().map_or(1, |id| id + 1)
    }

    /// The rule named `name`, which must be the only one so named.
    pub fn by_name(&self, name: &str) -> Result<&AclRule> {
        let mut named = self
            .rules
            .values()
            .filter(|r| r.name.as_deref() == Some(name));
        match (named.next(), named.next()) {
            (Some(r), None) => Ok(r),
            (None, _) => Err(NvError::NotFound(format!("no ACL rule named '{name}'"))),
            (Some(_), Some(_)) => Err(crate::error::invalid(format!(
                "more than one ACL rule is named '{name}': delete it by --id"
            ))),
        }
    }

    /// The rules of the VM whose records are `vm` (its IPv4 and IPv6 ones): its own and its
    /// VSID's, that go `dir`, highest precedence first.
    fn of_vm(&self, vm: &[LookupRecord], dir: u32) -> Vec<&AclRule> {
        let Some(first) = vm.first() else {
            return Vec::new();
        };
        let mut rules: Vec<&AclRule> = self
            .rules
            .values()
            .filter(|r| {
                r.vsid == first.vsid
                    && r.direction.covers(dir)
                    && r.ca.is_none_or(|ca| vm.iter().any(|v| v.ca == ca))
            })
            .collect();
        rules.sort_by_key(|r| r.precedence());
        rules
    }

    /// Port flags ([`nv_common::PortInfo::ACL_IN`], `ACL_OUT`) of the VM whose records are
    /// `vm`.
    pub fn port_flags(&self, vm: &[LookupRecord]) -> u8 {
        if self.rules.is_empty() {
            return 0;
        }
        let mut flags = 0;
        if !self.of_vm(vm, DIR_IN).is_empty() {
            flags |= nv_common::PortInfo::ACL_IN;
        }
        if !self.of_vm(vm, DIR_OUT).is_empty() {
            flags |= nv_common::PortInfo::ACL_OUT;
        }
        flags
    }
}

/// A VM as the ACL maps name it: the VSID and address of its port entry.
pub type Vm = (u32, nv_common::Addr);

/// A VM of this host, as the ACL maps name it ([`Vm`]), with its port and records.
pub struct LocalVm {
    pub key: Vm,
    pub port: String,
    pub records: Vec<LookupRecord>,
}

/// The VMs of `vms` with a stateful rule, with their port's name.
pub fn vm_ports(acls: &AclIndex, vms: &[LocalVm]) -> Vec<(Vm, String)> {
    if acls.is_empty() {
        return Vec::new();
    }
    let flows = entries(acls, vms).flows;
    let mut out: Vec<(Vm, String)> = vms
        .iter()
        .filter(|vm| flows.contains_key(&vm.key))
        .map(|vm| (vm.key, vm.port.clone()))
        .collect();
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

/// What the datapath holds for the rules of this host's VMs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclEntries {
    pub sets: HashMap<AclSetKey, Box<dp::AclSet>>,
    /// Each VM's flow sets (those with a stateful rule).
    pub flows: HashMap<Vm, u32>,
    pub meters: HashSet<AclMeterKey>,
}

/// The rules of the VMs `vms` (this host's), compiled.
pub fn entries(acls: &AclIndex, vms: &[LocalVm]) -> AclEntries {
    let mut e = AclEntries::default();
    if acls.is_empty() {
        return e;
    }
    let ways = u32::try_from(dp::FLOW_WAYS).unwrap_or(1);
    let sets = (acls.max_flows / ways).max(1);
    for LocalVm { key, records, .. } in vms {
        let (key, vm) = (*key, records.as_slice());
        let by_dir = [DIR_IN, DIR_OUT].map(|dir| (dir, acls.of_vm(vm, dir)));
        let stateful = by_dir
            .iter()
            .any(|(_, rules)| rules.iter().any(|r| r.stateful));
        for (dir, rules) in by_dir {
            if rules.is_empty() {
                continue;
            }
            let mut set = empty_set();
            set.flow_sets = if stateful { sets } else { 0 };
            // More than a set holds (admission refuses it, but a dual-stack VM's two
            // addresses or etcd's rules may get there): what does not fit is denied.
            let fit = if rules.len() > dp::MAX_SET_RULES {
                tracing::error!(
                    vsid = key.0,
                    "a VM of VSID {} has {} rules for one direction, above {}: the rest is \
                     denied",
                    key.0,
                    rules.len(),
                    dp::MAX_SET_RULES
                );
                dp::MAX_SET_RULES - 1
            } else {
                rules.len()
            };
            for (slot, r) in set.rules.iter_mut().zip(&rules[..fit]) {
                *slot = compile(r);
                e.meters.insert(AclMeterKey { rule: r.id, dir });
            }
            if fit < rules.len() {
                let mut deny_rest = compile(rules[fit]);
                (deny_rest.family, deny_rest.proto, deny_rest.id) = (0, 0, 0);
                (deny_rest.remote_mask, deny_rest.local_mask) = ([0; 4], [0; 4]);
                (deny_rest.remote, deny_rest.local) = ([0; 4], [0; 4]);
                (deny_rest.remote_ports, deny_rest.local_ports) = ([0, u16::MAX], [0, u16::MAX]);
                (deny_rest.action, deny_rest.flags) = (dp::AclRule::DENY, 0);
                set.rules[fit] = deny_rest;
            }
            set.len = u32::try_from(fit + usize::from(fit < rules.len())).unwrap_or(0);
            e.sets.insert(
                AclSetKey {
                    vsid: key.0,
                    dir,
                    ca: key.1,
                },
                set,
            );
        }
        if stateful {
            e.flows.insert(key, sets);
        }
    }
    e
}

/// A rule set with no rule, made on the heap (it is 86 KB).
pub fn empty_set() -> Box<dp::AclSet> {
    // SAFETY: every field is an integer or an array of them: all-zero is a valid set.
    unsafe { Box::<dp::AclSet>::new_zeroed().assume_init() }
}

/// A prefix as the datapath matches it: masked address and mask, IPv4 mapped into IPv6.
fn prefix(s: Option<&Subnet>) -> ([u32; 4], [u32; 4]) {
    let Some(s) = s else {
        return ([0; 4], [0; 4]);
    };
    let (addr, len) = match s.addr {
        std::net::IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + u32::from(s.len)),
        std::net::IpAddr::V6(a) => (a.octets(), u32::from(s.len)),
    };
    let mask_bits = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    let mask = mask_bits.to_be_bytes();
    let word = |b: &[u8; 16], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut a = [0; 4];
    let mut m = [0; 4];
    for i in 0..4 {
        m[i] = word(&mask, i * 4);
        a[i] = word(&addr, i * 4) & m[i];
    }
    (a, m)
}

pub fn compile(r: &AclRule) -> dp::AclRule {
    let (remote, remote_mask) = prefix(r.remote.as_ref());
    let (local, local_mask) = prefix(r.local.as_ref());
    let ports = |p: Option<crate::model::acl::PortRange>| p.map_or([0, u16::MAX], |p| [p.0, p.1]);
    dp::AclRule {
        remote,
        remote_mask,
        local,
        local_mask,
        remote_ports: ports(r.remote_port),
        local_ports: ports(r.local_port),
        id: r.id,
        idle_timeout: r.idle_timeout,
        family: r.family(),
        proto: r.protocol.map_or(0, |p| p.0),
        action: match r.action {
            Action::Allow => dp::AclRule::ALLOW,
            Action::Deny => dp::AclRule::DENY,
        },
        flags: if r.stateful { dp::AclRule::STATEFUL } else { 0 },
    }
}

/// The flow keys of a VM's `sets` flow sets.
pub fn flow_keys((vsid, ca): Vm, sets: u32) -> impl Iterator<Item = AclFlowKey> {
    (0..sets).map(move |set| AclFlowKey { vsid, set, ca })
}

/// Whether the rules of `set` (a VM's, of the direction that opened `flow`) still admit the
/// connection `flow` as a stateful allow: the first rule that matches it, if that is one.
pub fn still_admits(set: &dp::AclSet, flow: &dp::AclFlow) -> Option<u32> {
    let t = dp::AclTuple {
        local: flow.local,
        remote: flow.remote,
        lport: flow.lport,
        rport: flow.rport,
        proto: flow.proto,
        family: if flow.local[..3] == [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])] {
            4
        } else {
            6
        },
        echo: 0,
        _pad: 0,
    };
    let n = (set.len as usize).min(dp::MAX_SET_RULES);
    let first = set.rules[..n].iter().find(|r| r.matches(&t))?;
    (first.allows() && first.is_stateful()).then_some(first.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_masked_and_mapped() {
        let s: Subnet = "10.1.0.0/16".parse().unwrap();
        let (a, m) = prefix(Some(&s));
        let mapped = std::net::Ipv4Addr::new(10, 1, 0, 0)
            .to_ipv6_mapped()
            .octets();
        let w = |i: usize| u32::from_ne_bytes(mapped[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(a, [w(0), w(1), w(2), w(3)]);
        assert_eq!(m[..3], [u32::MAX; 3]);
        assert_eq!(m[3], u32::from_ne_bytes([255, 255, 0, 0]));
        let any = prefix(None);
        assert_eq!(any, ([0; 4], [0; 4]));
    }
}
