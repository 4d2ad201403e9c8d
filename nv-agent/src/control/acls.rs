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

/// Numbers `rules` after `held`'s and checks each: its own rules, and that the record a VM's
/// rule names exists (`has_record`). All or none; an import's errors name the rule.
pub fn admit_add(
    held: &AclIndex,
    has_record: impl Fn(u32, std::net::IpAddr) -> bool,
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
            && !has_record(r.vsid, ca)
        {
            return Err(numbered(NvError::NotFound(format!(
                "no lookup record {ca} in VSID {}: a VM's rules name its record",
                r.vsid
            ))));
        }
        r.id = id;
        added.push(r);
    }
    Ok(added)
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
