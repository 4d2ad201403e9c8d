//! The one admission function: every change to lookup records, whoever asks for it (nvctl
//! through a host's API, nvctl straight to etcd as the operator, or etcd's watch on every
//! host), passes the same rules in the same order:
//!
//! 1. placement: alone, a record's port is this host's (no other host may be named); in
//!    cluster mode a port's host is the writer's unless named, and a host needs a port;
//! 2. the record's own rules ([`LookupRecord::validate`]);
//! 3. room in the table (`max_lookups`);
//! 4. the rules between records ([`Catalog::check`]), each record against the table with the
//!    records before it in the same change.
//!
//! Checks that need a host's own devices (a VM port is a veth or tap of no bridge...) are not
//! here: the host that runs the port makes them when it applies the record, and leaves a
//! record out if its port is not a VM's.
use std::net::IpAddr;

use crate::{
    catalog::{Catalog, Key, describe},
    error::{NvError, Result, invalid},
    model::LookupRecord,
    tables::lookups::{local_view, placed},
};

/// What a change is checked against.
pub struct View<'a> {
    /// The records as this host applies them.
    pub catalog: &'a Catalog,
    /// The host that admits (its name; a record's port is this host's unless named).
    pub host: &'a str,
    /// Records are shared through etcd: they may name other hosts.
    pub cluster: bool,
    pub max_lookups: u32,
}

/// A change asked for.
pub enum Proposal {
    /// New records, all or none (an add is an import of one).
    Add(Vec<LookupRecord>),
    /// A record that replaces the one under its key (a move).
    Replace(LookupRecord),
}

/// A proposal that passed the rules a record keeps on its own: the records as they are
/// recorded (with their host in cluster mode), and what remains to check against the table.
pub struct Admitted {
    pub records: Vec<LookupRecord>,
    /// More than one record: errors say which.
    many: bool,
    /// They replace the records of their keys (a move).
    replacing: bool,
    /// This host's name, to see the records as it applies them (in cluster mode; alone,
    /// every port is this host's).
    host: Option<String>,
}

/// Steps 1 to 3, for every record of `proposal`; step 4 follows ([`Admitted::check`] for
/// each record as the transaction path applies it, or [`Admitted::check_all`]).
pub fn admit(proposal: Proposal, view: &View) -> Result<Admitted> {
    let (records, replacing) = match proposal {
        Proposal::Add(records) => (records, false),
        Proposal::Replace(record) => (vec![record], true),
    };
    let many = records.len() > 1;
    let records = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            // The record is described only when it is refused: an import of a million would
            // spend a tenth of a second on words nobody reads.
            let key = r.key();
            place(r, view)
                .and_then(|r| r.validate().map(|()| r))
                .map_err(|e| numbered(many, i, &describe_key(key), e))
        })
        .collect::<Result<Vec<_>>>()?;
    if !replacing {
        capacity(view, records.len())?;
    }
    Ok(Admitted {
        records,
        many,
        replacing,
        host: view.cluster.then(|| view.host.to_owned()),
    })
}

impl Admitted {
    /// They replace the records of their keys (a move).
    pub fn replaces(&self) -> bool {
        self.replacing
    }

    /// The record as this host applies it (its port only if it is this host's VM).
    pub fn local_view(&self, r: &LookupRecord) -> LookupRecord {
        match &self.host {
            Some(me) => local_view(r, me),
            None => r.clone(),
        }
    }

    /// Step 4 for the `i`th record, against `catalog` with the records before it applied.
    pub fn check(&self, catalog: &Catalog, i: usize, view: &LookupRecord) -> Result<()> {
        let key = view.key();
        rules(catalog, view, self.replacing.then_some(&key))
            .map_err(|e| numbered(self.many, i, &describe(view), e))
    }

    /// Step 4 for every record, against `catalog` with the ones before it (a copy, when there
    /// are several).
    pub fn check_all(&self, catalog: &Catalog) -> Result<()> {
        let mut scratch = (self.records.len() > 1).then(|| catalog.clone());
        for (i, r) in self.records.iter().enumerate() {
            let view = self.local_view(r);
            self.check(scratch.as_ref().unwrap_or(catalog), i, &view)?;
            if let Some(c) = scratch.as_mut() {
                c.insert(view);
            }
        }
        Ok(())
    }
}

/// What etcd's watch brings (cluster mode): one record on its own, as this host applies it;
/// refused, it is left out and reported, and the others go on.
pub fn admit_watched(catalog: &Catalog, view: &LookupRecord) -> Result<()> {
    view.validate()?;
    let key = view.key();
    rules(catalog, view, catalog.contains(&key).then_some(&key))
}

/// Step 1.
fn place(r: LookupRecord, view: &View) -> Result<LookupRecord> {
    if view.cluster {
        return placed(r, view.host);
    }
    let mut r = r;
    match r.host.take() {
        Some(h) if h != view.host => Err(invalid(format!(
            "host '{h}' is not this host ({}): records name other hosts in cluster mode only \
             (etcd_endpoints)",
            view.host
        ))),
        _ => Ok(r),
    }
}

/// Step 3.
fn capacity(view: &View, adding: usize) -> Result<()> {
    let len = view.catalog.len();
    if len + adding > usize::try_from(view.max_lookups).unwrap_or(usize::MAX) {
        return Err(NvError::Conflict(format!(
            "lookup table full: {len} entries of {}, {adding} more asked for; raise max_lookups",
            view.max_lookups
        )));
    }
    Ok(())
}

/// Step 4 for one record.
fn rules(catalog: &Catalog, view: &LookupRecord, replacing: Option<&Key>) -> Result<()> {
    catalog.check(view, replacing)
}

/// A record that could not be placed or broke its own rules, as errors name it.
fn describe_key((vsid, ca): (u32, IpAddr)) -> String {
    format!("VSID {vsid} CA {ca}")
}

/// An error about the `i`th of several records says which.
fn numbered(many: bool, i: usize, shown: &str, e: NvError) -> NvError {
    if many {
        invalid(format!("record {} ({shown}): {e}", i + 1))
    } else {
        e
    }
}

/// Whether (`vsid`, `ca`) names a record of `catalog`, or the error that says it does not.
pub fn existing(catalog: &Catalog, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
    catalog
        .get(&(vsid, ca))
        .ok_or_else(|| NvError::NotFound(format!("no lookup record for VSID {vsid} CA {ca}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Mac, Method, ProviderState},
        tables::State,
    };

    fn record(ca: &str, mac: u8) -> LookupRecord {
        LookupRecord {
            vsid: 5001,
            ca: ca.parse().unwrap(),
            pa: "198.18.0.2".parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 9, mac]),
            method: Method::Encap,
            port: None,
            name: None,
            host: None,
        }
    }

    fn catalog() -> Catalog {
        let provider: ProviderState =
            serde_json::from_str(r#"{"pa":"198.18.0.1/15","dev":"uplink0","added_address":true}"#)
                .unwrap();
        let mut c = Catalog::from_state(State {
            providers: vec![provider],
            ..State::default()
        })
        .unwrap();
        c.insert(record("10.0.0.2", 2));
        c
    }

    fn view(c: &Catalog, cluster: bool) -> View<'_> {
        View {
            catalog: c,
            host: "h1",
            cluster,
            max_lookups: 4,
        }
    }

    #[test]
    fn alone_a_record_names_no_other_host() {
        let c = catalog();
        let mut r = record("10.0.0.3", 3);
        r.host = Some("h2".into());
        let e = admit(Proposal::Add(vec![r.clone()]), &view(&c, false)).err();
        assert!(e.unwrap().to_string().contains("cluster mode only"));
        // In cluster mode, a host needs a port; with one, any host goes.
        let e = admit(Proposal::Add(vec![r.clone()]), &view(&c, true)).err();
        assert!(e.unwrap().to_string().contains("give --port"));
        r.port = Some("red3".into());
        let a = admit(Proposal::Add(vec![r]), &view(&c, true)).unwrap();
        assert_eq!(a.records[0].host.as_deref(), Some("h2"));
        // Seen from h1, h2's VM has no port here; alone, every port is this host's.
        assert_eq!(a.local_view(&a.records[0]).port, None);
        let mut r = record("10.0.0.4", 4);
        r.port = Some("red4".into());
        let a = admit(Proposal::Add(vec![r]), &view(&c, false)).unwrap();
        assert_eq!(a.local_view(&a.records[0]).port.as_deref(), Some("red4"));
    }

    #[test]
    fn the_same_rules_in_the_same_order_for_every_source() {
        let c = catalog();
        // A record that breaks its own rules fails before the table is full.
        let mut bad = record("10.0.0.3", 3);
        bad.vsid = 1;
        let many = vec![record("10.0.0.4", 4); 5];
        let e = admit(Proposal::Add(vec![bad]), &view(&c, false)).err();
        assert!(e.unwrap().to_string().contains("VSID"));
        let e = admit(Proposal::Add(many), &view(&c, false)).err();
        assert!(e.unwrap().to_string().contains("lookup table full"));
        // The rules between records, against the table and the records before: the second
        // takes the first's MAC, and says which it is.
        let a = admit(
            Proposal::Add(vec![record("10.0.0.5", 5), record("10.0.0.6", 5)]),
            &view(&c, true),
        )
        .unwrap();
        let e = a.check_all(&c).unwrap_err().to_string();
        assert!(e.starts_with("record 2 (VSID 5001 CA 10.0.0.6)"), "{e}");
        assert!(e.contains("MAC"), "{e}");
        // A move replaces its own record; an add of an existing key is refused.
        let a = admit(Proposal::Replace(record("10.0.0.2", 2)), &view(&c, false)).unwrap();
        a.check_all(&c).unwrap();
        let a = admit(Proposal::Add(vec![record("10.0.0.2", 2)]), &view(&c, false)).unwrap();
        assert!(
            a.check_all(&c)
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
        // What the watch brings passes the same rules, one record at a time.
        assert!(admit_watched(&c, &record("10.0.0.7", 2)).is_err());
        admit_watched(&c, &record("10.0.0.7", 7)).unwrap();
        admit_watched(&c, &record("10.0.0.2", 2)).unwrap();
    }
}
