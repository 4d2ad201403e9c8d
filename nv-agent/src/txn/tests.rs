//! The transaction path without root: maps in memory that fail the write they are told to, a
//! journal that fails when told to, and a real store in a temporary directory.
use std::collections::{BTreeSet, HashMap};

use nv_common::{DatapathConfig, LocalPa, LookupKey, LookupValue, PortInfo, RewritePa, V4};

use super::{Journal, Links, Maps, Pending, Stopped, Tables, Write};
use crate::{
    catalog::Catalog,
    error::{NvError, Result},
    model::{LookupRecord, Mac, Method, Prefixed, ProviderState},
    translate::{self, Attached},
    {store::Store, tables::Change},
};

/// The datapath's maps and filters, in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MemMaps {
    filters: BTreeSet<String>,
    ports: HashMap<u32, PortInfo>,
    hosted: HashMap<u32, u32>,
    rewrite: HashMap<nv_common::Addr, RewritePa>,
    lookups: HashMap<LookupKey, LookupValue>,
    lookups6: HashMap<nv_common::LookupKey6, LookupValue>,
    local_pas: HashMap<V4, LocalPa>,
    local_pas6: HashMap<nv_common::Addr, LocalPa>,
    routing: crate::tables::routes::RouteEntries,
    acls: crate::tables::acls::AclEntries,
    config: DatapathConfig,
}

/// [`MemMaps`] that refuse their `fail_at`-th write (counting from 0 over every call).
struct Faulty {
    maps: MemMaps,
    writes: usize,
    fail_at: Option<usize>,
}

fn set<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>, k: K, v: Option<V>) {
    match v {
        Some(v) => {
            m.insert(k, v);
        }
        None => {
            m.remove(&k);
        }
    }
}

impl Maps for Faulty {
    fn write_all(&mut self, writes: &[Write]) -> std::result::Result<(), Stopped> {
        for (done, w) in writes.iter().enumerate() {
            if self.fail_at == Some(self.writes) {
                self.writes += 1;
                return Err(Stopped {
                    done,
                    error: NvError::datapath(format!("injected failure of {w:?}")),
                });
            }
            self.writes += 1;
            let m = &mut self.maps;
            match w.clone() {
                Write::Filter(p) => {
                    m.filters.insert(p);
                }
                Write::Port(k, v) => set(&mut m.ports, k, v),
                Write::Hosted(k, v) => set(&mut m.hosted, k, v),
                Write::Rewrite(k, v) => set(&mut m.rewrite, k, v),
                Write::Lookup(k, v) => set(&mut m.lookups, k, v),
                Write::Lookup6(k, v) => set(&mut m.lookups6, k, v),
                Write::LocalPa(k, v) => set(&mut m.local_pas, k, v),
                Write::LocalPa6(k, v) => set(&mut m.local_pas6, k, v),
                Write::VsidRouting(k, v) => set(&mut m.routing.vsids, k, v),
                Write::Route(k, v) => set(&mut m.routing.routes, k, v),
                Write::Gateway(k, v) => set(&mut m.routing.gateways, k, v),
                Write::Route6(k, v) => set(&mut m.routing.routes6, k, v),
                Write::Gateway6(k, v) => set(&mut m.routing.gateways6, k, v),
                Write::Config(c) => m.config = *c,
                Write::AclSet(k, v) => set(&mut m.acls.sets, k, v),
                Write::AclFlows(k, v) => set(&mut m.acls.flows, k, v),
                Write::AclMeter(k, on) => {
                    if on {
                        m.acls.meters.insert(k);
                    } else {
                        m.acls.meters.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct MemJournal {
    committed: std::sync::Mutex<Vec<Change>>,
    fail: bool,
}

struct MemPending<'a> {
    journal: &'a MemJournal,
    changes: Vec<Change>,
}

impl Journal for MemJournal {
    fn prepare(
        &self,
        changes: &[Change],
        _stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Box<dyn Pending + '_>> {
        Ok(Box::new(MemPending {
            journal: self,
            changes: changes.to_vec(),
        }))
    }
}

impl Pending for MemPending<'_> {
    fn commit(self: Box<Self>) -> Result<()> {
        if self.journal.fail {
            return Err(NvError::store("injected failure"));
        }
        self.journal.committed.lock().unwrap().extend(self.changes);
        Ok(())
    }
}

impl MemJournal {
    fn committed(&self) -> Vec<Change> {
        self.committed.lock().unwrap().clone()
    }
}

const UPLINK: u32 = 2;

fn record(vsid: u32, ca: &str, pa: &str, mac: u8, port: Option<&str>) -> LookupRecord {
    LookupRecord {
        vsid,
        ca: ca.parse().unwrap(),
        pa: pa.parse().unwrap(),
        mac: Mac([2, 0, 0, 0, (vsid % 251) as u8, mac]),
        method: Method::Encap,
        port: port.map(str::to_owned),
        name: Some(format!("vm-{mac}")),
        host: None,
    }
}

fn rewrite(mut r: LookupRecord) -> LookupRecord {
    r.method = Method::Rewrite;
    r
}

fn provider(pa: &str) -> ProviderState {
    ProviderState {
        pa: format!("{pa}/15").parse::<Prefixed>().unwrap(),
        dev: "uplink0".into(),
        added_address: true,
        rewrite: false,
    }
}

/// What a start would put in the maps for `tables`, with its ports where its tracker says.
fn mapped(tables: &Tables) -> MemMaps {
    let d = translate::desired(&tables.catalog, |p| tables.ports.get(p), &tables.base);
    MemMaps {
        filters: tables
            .ports
            .attached()
            .map(|(p, _)| p.clone())
            .chain(tables.ports.orphans().map(|(p, _)| p.clone()))
            .collect(),
        ports: d.ports,
        hosted: d.hosted_vsids,
        rewrite: d.rewrite_pas,
        lookups: d.lookups,
        lookups6: d.lookups6,
        local_pas: d.local_pas,
        local_pas6: d.local_pas6,
        routing: d.routing,
        acls: d.acls,
        config: d.config,
    }
}

fn at(ifindex: u32) -> Attached {
    Attached { ifindex, flags: 0 }
}

/// A host with providers, remote records of two VSIDs, a local encap VM on `red1` and a local
/// rewrite VM on `blue1`, as a start leaves it.
fn host() -> (Tables, Faulty, Links) {
    let mut catalog = Catalog::default();
    for pa in ["198.18.0.1", "198.18.1.1", "198.18.1.3"] {
        catalog.providers_mut().push(provider(pa));
    }
    let records = [
        record(5001, "10.0.0.1", "198.18.0.1", 1, Some("red1")),
        // RED-7 is dual-stack; RED-6 is IPv6-only.
        record(5001, "10.0.0.7", "198.18.0.1", 7, Some("red7")),
        record(5001, "fd00::7", "198.18.0.1", 7, Some("red7")),
        record(5001, "fd00::6", "198.18.0.1", 6, Some("red6")),
        record(5001, "10.0.0.2", "198.18.0.2", 2, None),
        record(5001, "10.0.0.3", "198.18.0.2", 3, None),
        rewrite(record(6001, "10.0.0.1", "198.18.1.1", 1, Some("blue1"))),
        rewrite(record(6001, "10.0.0.2", "198.18.1.2", 2, None)),
    ];
    for r in records {
        catalog.check(&r, None).unwrap();
        catalog.insert(r);
    }
    let base = DatapathConfig {
        uplink_ifindex: UPLINK,
        uplink_mtu: 9000,
        ..DatapathConfig::default()
    };
    let mut tables = Tables::new(catalog, base);
    tables.ports.attach("red1", at(11));
    tables.ports.attach("blue1", at(12));
    tables.ports.attach("red6", at(16));
    tables.ports.attach("red7", at(17));
    tables.config = tables.wanted_config();
    let maps = Faulty {
        maps: mapped(&tables),
        writes: 0,
        fail_at: None,
    };
    let links: Links = [
        ("red1", at(11)),
        ("blue1", at(12)),
        ("red6", at(16)),
        ("red7", at(17)),
        ("red2", at(21)),
        ("blue3", at(23)),
    ]
    .into_iter()
    .map(|(p, a)| (p.to_owned(), a))
    .collect();
    (tables, maps, links)
}

/// Change sets of every kind the agent makes.
fn change_sets() -> Vec<(&'static str, Vec<Change>)> {
    let put = |record| Change::PutLookup { record };
    let mut import: Vec<Change> = (0..40u8)
        .map(|i| put(record(7001, &format!("10.1.0.{i}"), "198.18.0.2", i, None)))
        .collect();
    import.push(put(record(5001, "10.0.0.9", "198.18.0.1", 9, Some("red2"))));
    import.push(put(rewrite(record(
        6001,
        "10.0.0.3",
        "198.18.1.3",
        3,
        Some("blue3"),
    ))));
    import.push(put(rewrite(record(
        6001,
        "10.0.0.4",
        "198.18.1.4",
        4,
        None,
    ))));
    vec![
        ("an import of remote and local records", import),
        (
            "a local VM moved to another port",
            vec![put(record(5001, "10.0.0.1", "198.18.0.1", 1, Some("red2")))],
        ),
        (
            "a remote VM moved here",
            vec![put(record(5001, "10.0.0.2", "198.18.0.1", 2, Some("red2")))],
        ),
        (
            "a local VM moved away",
            vec![put(record(5001, "10.0.0.1", "198.18.0.7", 1, None))],
        ),
        (
            "a local rewrite VM deleted",
            vec![Change::DelLookup {
                vsid: 6001,
                ca: "10.0.0.1".parse().unwrap(),
            }],
        ),
        (
            // As the etcd watch takes it: no rule keeps it while the IPv6 record stands.
            "a dual-stack VM's IPv4 record deleted",
            vec![Change::DelLookup {
                vsid: 5001,
                ca: "10.0.0.7".parse().unwrap(),
            }],
        ),
        (
            "an IPv6-only VM takes an IPv4 address",
            vec![put(record(5001, "10.0.0.6", "198.18.0.1", 6, Some("red6")))],
        ),
        (
            "an IPv6-only VM deleted",
            vec![Change::DelLookup {
                vsid: 5001,
                ca: "fd00::6".parse().unwrap(),
            }],
        ),
        (
            "a provider added",
            vec![Change::PutProvider {
                provider: provider("198.18.1.9"),
            }],
        ),
        (
            "a subnet and a record in it",
            vec![
                Change::PutRoute {
                    route: serde_json::from_str(
                        r#"{"rdid":"red","vsid":7001,"prefix":"10.1.0.0/24","nexthop":"0.0.0.0"}"#,
                    )
                    .unwrap(),
                },
                put(record(7001, "10.1.0.9", "198.18.0.2", 9, None)),
            ],
        ),
    ]
}

fn apply(
    tables: &mut Tables,
    journal: &dyn Journal,
    maps: &mut Faulty,
    links: &Links,
    changes: &[Change],
) -> Result<super::Applied> {
    tables.apply(journal, maps, links, changes, |c, change| match change {
        Change::PutLookup { record } => {
            c.check(record, c.get(&record.key()).map(|_| record.key()).as_ref())
        }
        _ => Ok(()),
    })
}

#[test]
fn an_applied_change_leaves_the_maps_as_a_start_from_its_catalog_would() {
    for (what, changes) in change_sets() {
        let (mut tables, mut maps, links) = host();
        let journal = MemJournal::default();
        apply(&mut tables, &journal, &mut maps, &links, &changes)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(journal.committed(), changes, "{what}: journal");
        assert_eq!(maps.maps, mapped(&tables), "{what}: maps");
    }
}

#[test]
fn failing_any_write_of_a_change_leaves_catalog_maps_and_journal_as_they_were() {
    for (what, changes) in change_sets() {
        let (tables, maps, links) = host();
        // How many writes the change makes.
        let mut probe = (
            tables.clone(),
            Faulty {
                writes: 0,
                ..maps_clone(&maps)
            },
        );
        apply(
            &mut probe.0,
            &MemJournal::default(),
            &mut probe.1,
            &links,
            &changes,
        )
        .unwrap();
        let writes = probe.1.writes;
        assert!(writes > 0, "{what}: no writes");
        for fail_at in 0..writes {
            let mut t = tables.clone();
            let mut m = Faulty {
                fail_at: Some(fail_at),
                ..maps_clone(&maps)
            };
            let journal = MemJournal::default();
            let err = apply(&mut t, &journal, &mut m, &links, &changes)
                .expect_err("the injected failure is reported");
            assert!(err.to_string().contains("injected"), "{what}: {err}");
            assert_unchanged(what, fail_at, &tables, &maps.maps, &t, &m.maps);
            assert!(journal.committed().is_empty(), "{what}: journal written");
        }
        // The journal refuses last: everything written is undone.
        let mut t = tables.clone();
        let mut m = maps_clone(&maps);
        let journal = MemJournal {
            fail: true,
            ..MemJournal::default()
        };
        apply(&mut t, &journal, &mut m, &links, &changes).unwrap_err();
        assert_unchanged(what, writes, &tables, &maps.maps, &t, &m.maps);
    }
}

fn maps_clone(f: &Faulty) -> Faulty {
    Faulty {
        maps: f.maps.clone(),
        writes: 0,
        fail_at: None,
    }
}

/// Catalog and maps as before; a port filtered before the failure keeps its filter, as a
/// port without a record (taking it off would hand its VM's frames to the host).
fn assert_unchanged(
    what: &str,
    fail_at: usize,
    before: &Tables,
    maps_before: &MemMaps,
    after: &Tables,
    maps_after: &MemMaps,
) {
    let ctx = format!("{what}, write {fail_at} failed");
    assert_eq!(
        after.catalog.lookups(None),
        before.catalog.lookups(None),
        "{ctx}: catalog"
    );
    assert_eq!(
        after.catalog.providers(),
        before.catalog.providers(),
        "{ctx}: providers"
    );
    assert_eq!(
        after.catalog.routes(),
        before.catalog.routes(),
        "{ctx}: routes"
    );
    assert_eq!(after.config, before.config, "{ctx}: config");
    let mut expected = maps_before.clone();
    for port in maps_after.filters.difference(&maps_before.filters) {
        assert!(
            after.ports.orphans().any(|(p, _)| p == port),
            "{ctx}: {port} filtered but not kept as a port without a record"
        );
        expected.filters.insert(port.clone());
    }
    assert_eq!(*maps_after, expected, "{ctx}: maps");
    let attached = |t: &Tables| {
        let mut v: Vec<_> = t.ports.attached().map(|(p, a)| (p.clone(), *a)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(attached(after), attached(before), "{ctx}: ports");
}

#[test]
fn a_refused_record_in_an_import_changes_nothing() {
    let (mut tables, mut maps, links) = host();
    let before = maps.maps.clone();
    let changes = vec![
        Change::PutLookup {
            record: record(7001, "10.1.0.1", "198.18.0.2", 1, None),
        },
        // The same MAC in the same VSID.
        Change::PutLookup {
            record: record(7001, "10.1.0.2", "198.18.0.2", 1, None),
        },
    ];
    let err = apply(
        &mut tables,
        &MemJournal::default(),
        &mut maps,
        &links,
        &changes,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("MAC"), "{err}");
    assert_eq!(maps.writes, 0);
    assert_eq!(maps.maps, before);
    assert_eq!(tables.catalog.len(), 8);
}

#[test]
fn a_port_follows_its_device_and_a_failure_puts_it_back() {
    let (tables, maps, _) = host();
    // Re-created (new ifindex), down, gone.
    for link in [
        Some(at(31)),
        Some(Attached {
            ifindex: 11,
            flags: PortInfo::DOWN,
        }),
        None,
    ] {
        let mut t = tables.clone();
        let mut m = maps_clone(&maps);
        assert!(t.relink(&mut m, "red1", link).unwrap());
        assert_eq!(t.ports.get("red1"), link);
        // A device that is gone took its filter along; the pin goes at the next start.
        let want = mapped(&t);
        assert!(want.filters.is_subset(&m.maps.filters), "{link:?}: filters");
        assert_eq!(
            m.maps,
            MemMaps {
                filters: m.maps.filters.clone(),
                ..want
            },
            "{link:?}"
        );
        for fail_at in 0..m.writes {
            let mut t = tables.clone();
            let mut f = Faulty {
                fail_at: Some(fail_at),
                ..maps_clone(&maps)
            };
            t.relink(&mut f, "red1", link).unwrap_err();
            assert_unchanged("relink", fail_at, &tables, &maps.maps, &t, &f.maps);
        }
    }
}

/// A big import, written into the store alongside its mapping.
fn big_import(count: u32) -> Vec<Change> {
    (0..count)
        .map(|i| {
            let [_, x, y, z] = i.to_be_bytes();
            let mut r = record(8001, &format!("10.{x}.{y}.{z}"), "198.18.0.2", 0, None);
            r.mac = Mac([2, 8, x, y, z, 1]);
            Change::PutLookup { record: r }
        })
        .collect()
}

#[test]
fn the_store_holds_a_change_only_once_the_maps_do() {
    for changes in [change_sets().swap_remove(0).1, big_import(5000)] {
        let n = changes.len();
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = Store::open(dir.path()).unwrap();
        let (mut tables, mut m, links) = host();
        for fail_at in [0, 7, n / 2, n - 1] {
            m.writes = 0;
            m.fail_at = Some(fail_at);
            let before = (tables.clone(), m.maps.clone());
            apply(&mut tables, &store, &mut m, &links, &changes).unwrap_err();
            assert_unchanged("an import", fail_at, &before.0, &before.1, &tables, &m.maps);
        }
        drop(store);
        let (store, state, _) = Store::open(dir.path()).unwrap();
        assert!(
            state.lookups.is_empty(),
            "{n}: a failed change reached the store"
        );
        m.fail_at = None;
        apply(&mut tables, &store, &mut m, &links, &changes).unwrap();
        assert_eq!(m.maps, mapped(&tables), "{n}: maps");
        drop(store);
        let (_, state, _) = Store::open(dir.path()).unwrap();
        assert_eq!(state.lookups.len(), n);
    }
}

#[test]
fn a_big_import_refused_half_way_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = Store::open(dir.path()).unwrap();
    let (mut tables, mut maps, links) = host();
    let mut changes = big_import(20_000);
    // The same MAC as the first, half-way: refused by its check.
    if let Change::PutLookup { record } = &mut changes[10_000] {
        record.mac = Mac([2, 8, 0, 0, 0, 1]);
    }
    let err = apply(&mut tables, &store, &mut maps, &links, &changes).unwrap_err();
    assert!(err.to_string().contains("MAC"), "{err}");
    assert_eq!(maps.writes, 0);
    assert_eq!(tables.catalog.len(), 8);
    drop(store);
    let (_, state, _) = Store::open(dir.path()).unwrap();
    assert!(state.lookups.is_empty());
}
