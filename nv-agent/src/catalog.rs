//! The agent's records in memory, with the indexes that keep every placement rule O(1) per
//! record, so a million records load, validate and change without scanning the table.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use crate::{
    error::{NvError, Result, invalid},
    model::{LookupRecord, Method, ProviderState},
    store::State,
};

/// (VSID, CA): a lookup record's identity.
pub type Key = (u32, IpAddr);

/// Who uses a provider address.
#[derive(Clone, Debug, Default)]
struct PaUse {
    records: u32,
    /// The rewrite record it is dedicated to, if any.
    rewrite: Option<Key>,
    /// One record using it, to name in errors.
    example: Option<Key>,
}

/// The method a VSID uses and how many records it has.
#[derive(Clone, Debug)]
struct VsidUse {
    method: Method,
    records: u32,
    example: Key,
}

#[derive(Default)]
pub struct Catalog {
    providers: Vec<ProviderState>,
    lookups: BTreeMap<Key, LookupRecord>,
    by_port: HashMap<String, Key>,
    by_mac: HashMap<(u32, [u8; 6]), Key>,
    by_pa: HashMap<IpAddr, PaUse>,
    by_vsid: HashMap<u32, VsidUse>,
}

pub fn describe(r: &LookupRecord) -> String {
    match &r.name {
        Some(n) => format!("VSID {} CA {} ({n})", r.vsid, r.ca),
        None => format!("VSID {} CA {}", r.vsid, r.ca),
    }
}

impl Catalog {
    /// Builds the catalog from stored state; a store that breaks a rule is reported, not
    /// silently repaired.
    pub fn from_state(state: State) -> Result<Catalog> {
        let mut c = Catalog {
            providers: state.providers,
            ..Catalog::default()
        };
        for r in state.lookups {
            c.check(&r, None).map_err(|e| {
                NvError::Store(format!(
                    "stored record {} is inconsistent: {e}",
                    describe(&r)
                ))
            })?;
            c.insert(r);
        }
        Ok(c)
    }

    pub fn to_state(&self) -> State {
        State {
            providers: self.providers.clone(),
            lookups: self.lookups.values().cloned().collect(),
        }
    }

    pub fn providers(&self) -> &[ProviderState] {
        &self.providers
    }

    pub fn providers_mut(&mut self) -> &mut Vec<ProviderState> {
        &mut self.providers
    }

    pub fn is_local_pa(&self, pa: IpAddr) -> bool {
        self.providers.iter().any(|p| p.pa.addr == pa)
    }

    pub fn lookups(&self) -> impl Iterator<Item = &LookupRecord> {
        self.lookups.values()
    }

    pub fn len(&self) -> usize {
        self.lookups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lookups.is_empty()
    }

    pub fn get(&self, key: &Key) -> Option<&LookupRecord> {
        self.lookups.get(key)
    }

    /// The record whose VM is behind `port`.
    pub fn by_port(&self, port: &str) -> Option<&LookupRecord> {
        self.by_port.get(port).and_then(|k| self.lookups.get(k))
    }

    pub fn ports(&self) -> impl Iterator<Item = &String> {
        self.by_port.keys()
    }

    /// How many records use `pa` (local records make a provider address busy).
    pub fn local_users_of(&self, pa: IpAddr) -> usize {
        self.lookups
            .values()
            .filter(|r| r.pa == pa && r.port.is_some())
            .count()
    }

    /// Checks the rules that involve other records. `replacing` is the key of a record `r`
    /// replaces (a move), which does not count against it.
    pub fn check(&self, r: &LookupRecord, replacing: Option<&Key>) -> Result<()> {
        let own = |k: &Key| replacing == Some(k);
        let key = r.key();
        if replacing.is_none()
            && let Some(existing) = self.lookups.get(&key)
        {
            return Err(NvError::Conflict(format!(
                "a lookup record for {} already exists; delete it first, or use `nvctl lookup move` to change its PA and port",
                describe(existing)
            )));
        }
        let local_pa = self.is_local_pa(r.pa);
        match &r.port {
            Some(port) => {
                if !local_pa {
                    return Err(invalid(format!(
                        "PA {} is not a provider address of this host; a record with --port needs one (add it with `nvctl provider add`)",
                        r.pa
                    )));
                }
                if let Some(k) = self.by_port.get(port)
                    && !own(k)
                {
                    return Err(NvError::Conflict(format!(
                        "port '{port}' already belongs to {}",
                        self.name(k)
                    )));
                }
            }
            None if local_pa => {
                return Err(invalid(format!(
                    "PA {} is a provider address of this host: give --port, the VM's port here",
                    r.pa
                )));
            }
            None => {}
        }
        // IP rewrite dedicates a PA to one CA: no other record, of either method, may share it.
        if let Some(u) = self.by_pa.get(&r.pa) {
            let others = u.records
                - u32::from(
                    replacing.is_some_and(|k| self.lookups.get(k).is_some_and(|o| o.pa == r.pa)),
                );
            let rewrite_other = u.rewrite.filter(|k| !own(k));
            if (r.method == Method::Rewrite && others > 0) || rewrite_other.is_some() {
                let other = rewrite_other
                    .or(u.example.filter(|k| !own(k)))
                    .map_or_else(|| "another record".to_owned(), |k| self.name(&k));
                return Err(NvError::Conflict(format!(
                    "PA {} is already used by {other}; a rewrite record needs a PA of its own",
                    r.pa
                )));
            }
        }
        // One method per VSID: a sender can only rewrite if it has a rewrite PA itself, so mixing
        // methods in a VSID would leave some pairs unable to talk.
        if let Some(v) = self.by_vsid.get(&r.vsid)
            && v.method != r.method
            && !(v.records == 1 && own(&v.example))
        {
            return Err(NvError::Conflict(format!(
                "VSID {} uses method {} ({}); all records of a VSID use one method",
                r.vsid,
                v.method,
                self.name(&v.example)
            )));
        }
        if let Some(k) = self.by_mac.get(&(r.vsid, r.mac.0))
            && !own(k)
        {
            return Err(NvError::Conflict(format!(
                "MAC {} is already used by {}",
                r.mac,
                self.name(k)
            )));
        }
        Ok(())
    }

    fn name(&self, k: &Key) -> String {
        self.lookups
            .get(k)
            .map_or_else(|| format!("VSID {} CA {}", k.0, k.1), describe)
    }

    /// Adds or replaces a record (its checks already passed) and returns the one it replaced.
    pub fn insert(&mut self, r: LookupRecord) -> Option<LookupRecord> {
        let old = self.remove(&r.key());
        let key = r.key();
        if let Some(port) = &r.port {
            self.by_port.insert(port.clone(), key);
        }
        self.by_mac.insert((r.vsid, r.mac.0), key);
        let u = self.by_pa.entry(r.pa).or_default();
        u.records += 1;
        u.example = Some(key);
        if r.method == Method::Rewrite {
            u.rewrite = Some(key);
        }
        let v = self.by_vsid.entry(r.vsid).or_insert(VsidUse {
            method: r.method,
            records: 0,
            example: key,
        });
        v.records += 1;
        self.lookups.insert(key, r);
        old
    }

    pub fn remove(&mut self, key: &Key) -> Option<LookupRecord> {
        let r = self.lookups.remove(key)?;
        if let Some(port) = &r.port {
            self.by_port.remove(port);
        }
        self.by_mac.remove(&(r.vsid, r.mac.0));
        if let Some(u) = self.by_pa.get_mut(&r.pa) {
            u.records -= 1;
            if u.rewrite == Some(*key) {
                u.rewrite = None;
            }
            if u.records == 0 {
                self.by_pa.remove(&r.pa);
            } else if u.example == Some(*key) {
                // Any other user will do for error messages; find one only when needed.
                u.example = None;
            }
        }
        if let Some(v) = self.by_vsid.get_mut(&r.vsid) {
            v.records -= 1;
            if v.records == 0 {
                self.by_vsid.remove(&r.vsid);
            } else if v.example == *key {
                let first = (r.vsid, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                if let Some((k, _)) = self
                    .lookups
                    .range(first..)
                    .next()
                    .filter(|(k, _)| k.0 == r.vsid)
                {
                    v.example = *k;
                }
            }
        }
        Some(r)
    }
}
