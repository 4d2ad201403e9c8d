//! The command path of port ACL rules, for a host alone and for many: new rules are numbered
//! after the highest id held and checked on their own and against the records
//! ([`admit_add`]); a rule to delete is named by id or by a name only it has ([`pick`]).
//! Alone, the agent applies them through the transaction path; in cluster mode, the operator's
//! nvctl writes them to etcd (each id's key must be absent: a writer that took an id meanwhile
//! makes it a conflict), whence every host's watch brings them to the same path.
use crate::{
    error::{NvError, Result, invalid},
    model::acl::AclRule,
    tables::acls::AclIndex,
};

/// How `nvctl acl del` names a rule.
pub enum AclName {
    Id(u32),
    Name(String),
}

/// Numbers `rules` after `held`'s and checks each: its own rules, that the record a VM's
/// rule names exists (`vm_of`: the addresses of the VM whose record it is, its IPv4 and IPv6
/// ones; `None` without a record), and that every VM's rules still fit the datapath. All or
/// none; an import's errors name the rule.
pub fn admit_add(
    held: &AclIndex,
    vm_of: impl Fn(u32, std::net::IpAddr) -> Option<Vec<std::net::IpAddr>>,
    rules: Vec<AclRule>,
) -> Result<Vec<AclRule>> {
    let many = rules.len() > 1;
    let first = held.next_id();
    let mut added = Vec::with_capacity(rules.len());
    for (id, (i, mut r)) in (first..).zip(rules.into_iter().enumerate()) {
        let numbered = |e: NvError| {
            if many {
                invalid(format!("rule {}: {e}", i + 1))
            } else {
                e
            }
        };
        r.validate().map_err(numbered)?;
        if let Some(ca) = r.ca
            && vm_of(r.vsid, ca).is_none()
        {
            return Err(numbered(NvError::NotFound(format!(
                "no lookup record {ca} in VSID {}: a VM's rules name its record",
                r.vsid
            ))));
        }
        r.id = id;
        added.push(r);
    }
    fits(held, &added, &vm_of)?;
    Ok(added)
}

/// Whether every VM's rules of each direction, its own (on any of its addresses) and its
/// VSID's, still fit the datapath's rule set ([`nv_common::acl::MAX_SET_RULES`]) with
/// `added`.
fn fits(
    held: &AclIndex,
    added: &[AclRule],
    vm_of: &impl Fn(u32, std::net::IpAddr) -> Option<Vec<std::net::IpAddr>>,
) -> Result<()> {
    use nv_common::acl::{DIR_IN, DIR_OUT, MAX_SET_RULES};
    use std::collections::HashMap;
    // Per (VSID, direction): rules on the whole VSID, and on each CA.
    let mut wide: HashMap<(u32, u32), usize> = HashMap::new();
    let mut own: HashMap<(u32, u32, std::net::IpAddr), usize> = HashMap::new();
    for r in held.list(None).iter().chain(added) {
        for dir in [DIR_IN, DIR_OUT] {
            if !r.direction.covers(dir) {
                continue;
            }
            match r.ca {
                Some(ca) => *own.entry((r.vsid, dir, ca)).or_default() += 1,
                None => *wide.entry((r.vsid, dir)).or_default() += 1,
            }
        }
    }
    // A VM's own rules: those on each of its addresses.
    let vm_rules = |vsid: u32, dir: u32, ca: std::net::IpAddr| -> usize {
        vm_of(vsid, ca)
            .unwrap_or_else(|| vec![ca])
            .iter()
            .map(|a| own.get(&(vsid, dir, *a)).copied().unwrap_or(0))
            .sum()
    };
    for r in added {
        for dir in [DIR_IN, DIR_OUT] {
            let vsid_rules = wide.get(&(r.vsid, dir)).copied().unwrap_or(0);
            let most = match r.ca {
                Some(ca) => vm_rules(r.vsid, dir, ca),
                None => own
                    .keys()
                    .filter(|(v, d, _)| *v == r.vsid && *d == dir)
                    .map(|(_, _, ca)| vm_rules(r.vsid, dir, *ca))
                    .max()
                    .unwrap_or(0),
            };
            if vsid_rules + most > MAX_SET_RULES {
                return Err(invalid(format!(
                    "{} would have {} rules for what it {}: a VM's own and its VSID's rules \
                     of a direction are {MAX_SET_RULES} at most",
                    r.target(),
                    vsid_rules + most,
                    if dir == DIR_IN { "receives" } else { "sends" }
                )));
            }
        }
    }
    Ok(())
}

/// The rule `name` names in `held`.
pub fn pick(held: &AclIndex, name: &AclName) -> Result<AclRule> {
    match name {
        AclName::Id(id) => held
            .get(*id)
            .cloned()
            .ok_or_else(|| NvError::NotFound(format!("no ACL rule {id}"))),
        AclName::Name(n) => held.by_name(n).cloned(),
    }
}
