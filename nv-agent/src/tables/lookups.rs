//! Lookup records (HNV's lookup records): (VSID, CA) to PA, MAC and method, with the VM's port
//! on the host that runs it. Shared by every host: in cluster mode they live in etcd under
//! [`ETCD_PREFIX`], as JSON in the CLI's field names with `host`, the host whose VM port a
//! record binds. The store keeps them in a compact binary form (an import of a million spent a
//! third of its time writing them as JSON). Their map entries: the lookup map's, a local VM's
//! port entry, and a rewrite PA's.
use std::net::IpAddr;

use nv_common::{IFINDEX_GONE, LookupKey, LookupValue, PortInfo, RewritePa};

use super::Table;
use crate::{
    catalog::Key,
    error::{Result, invalid},
    model::{LookupRecord, Mac, Method},
    translate::{Attached, addr16, key_v4},
};

pub struct Lookups;

/// Where lookup records live in etcd.
pub const ETCD_PREFIX: &str = "/nv/v1/lookups/";

impl Table for Lookups {
    const NAME: &'static str = "lookups";
    const STORE: &'static str = "lookups_v2";
    const ETCD_PREFIX: Option<&'static str> = Some(ETCD_PREFIX);
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("VSID", "vsid"),
        ("CA", "ca"),
        ("PA", "pa"),
        ("MAC", "mac"),
        ("METHOD", "method"),
        ("PORT", "port"),
        ("NAME", "name"),
        ("HOST", "host"),
    ];
    type Row = LookupRecord;
    type Key = (u32, IpAddr);

    fn key(row: &LookupRecord) -> (u32, IpAddr) {
        row.key()
    }

    fn validate(row: &LookupRecord) -> Result<()> {
        row.validate()
    }

    fn store_key(key: &(u32, IpAddr)) -> Vec<u8> {
        store_key(key.0, key.1)
    }

    fn encode(row: &LookupRecord) -> Vec<u8> {
        encode(row)
    }

    fn decode(key: &[u8], value: &[u8]) -> std::result::Result<LookupRecord, String> {
        decode(key, value)
    }
}

/// A record's key in etcd.
pub fn etcd_key(vsid: u32, ca: IpAddr) -> String {
    format!("{ETCD_PREFIX}{vsid}/{ca}")
}

/// The (VSID, CA) of an etcd key under [`ETCD_PREFIX`].
pub fn parse_etcd_key(key: &[u8]) -> Option<(u32, IpAddr)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(ETCD_PREFIX)?;
    let (vsid, ca) = rest.split_once('/')?;
    Some((vsid.parse().ok()?, ca.parse().ok()?))
}

/// The record as host `me` applies it: its port only if it is `me`'s VM.
pub fn local_view(r: &LookupRecord, me: &str) -> LookupRecord {
    let mut view = r.clone();
    if r.host.as_deref() != Some(me) {
        view.port = None;
    }
    view.host = None;
    view
}

/// A record placed on a host, as it is written to etcd: a port's host is `me` unless named,
/// and a host needs a port.
pub fn placed(mut r: LookupRecord, me: &str) -> Result<LookupRecord> {
    match (&r.port, &r.host) {
        (Some(_), None) => r.host = Some(me.to_owned()),
        (None, Some(h)) => {
            return Err(invalid(format!(
                "--host {h} names the host of a VM port: give --port too (a record without \
                 one is a VM no nv host attaches)"
            )));
        }
        _ => {}
    }
    Ok(r)
}

// The table's map entries: what the datapath holds for one record.

fn datapath_method(m: Method) -> nv_common::Method {
    match m {
        Method::Encap => nv_common::Method::Encap,
        Method::Rewrite => nv_common::Method::Rewrite,
    }
}

/// A record's key in its map: the IPv4 lookup map, or the IPv6 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapKey {
    V4(LookupKey),
    V6(nv_common::LookupKey6),
}

pub fn lookup_key(key: &Key) -> MapKey {
    match key.1 {
        std::net::IpAddr::V6(ca) => MapKey::V6(nv_common::LookupKey6 {
            vsid: key.0,
            ca: ca.octets(),
        }),
        std::net::IpAddr::V4(_) => MapKey::V4(LookupKey {
            vsid: key.0,
            ca: key_v4(key.1),
        }),
    }
}

/// The map entries of one record whose port (if any) is `at`; a record whose port is missing
/// points at `IFINDEX_GONE`. An IPv6 record has no port entry: its VM's is its IPv4 record's.
pub struct Entries {
    pub key: MapKey,
    pub value: LookupValue,
    pub port: Option<PortInfo>,
    /// The rewrite PA's entry (16-byte form: IPv4 mapped, or IPv6).
    pub rewrite: Option<(nv_common::Addr, RewritePa)>,
}

impl Entries {
    /// Puts the lookup entry into the map of its address family in `d`.
    pub fn put_lookup(&self, d: &mut crate::datapath::Desired) {
        match self.key {
            MapKey::V4(k) => d.lookups.insert(k, self.value),
            MapKey::V6(k) => d.lookups6.insert(k, self.value),
        };
    }
}

/// The map entries of `r` with its port `at`; `port_entry`: the port's entry is this record's
/// (a VM's IPv4 record's, or its IPv6 record's when it has no IPv4 one: [`Catalog::port_entry_of`]).
///
/// [`Catalog::port_entry_of`]: crate::catalog::Catalog::port_entry_of
pub fn entries(r: &LookupRecord, at: Option<Attached>, port_entry: Option<u8>) -> Entries {
    let method = datapath_method(r.method) as u8;
    let ifindex = match (&r.port, at) {
        (Some(_), Some(a)) => a.ifindex,
        (Some(_), None) => IFINDEX_GONE,
        (None, _) => 0,
    };
    Entries {
        key: lookup_key(&r.key()),
        value: LookupValue {
            pa: addr16(r.pa),
            mac: r.mac.0,
            method,
            _pad: 0,
            ifindex,
        },
        port: at
            .filter(|_| r.port.is_some())
            .zip(port_entry)
            .map(|(a, acl)| PortInfo {
                vsid: r.vsid,
                ca: addr16(r.ca),
                pa: addr16(r.pa),
                mac: r.mac.0,
                method,
                flags: a.flags | acl,
            }),
        rewrite: (r.method == Method::Rewrite).then(|| {
            (
                addr16(r.pa),
                RewritePa {
                    vsid: r.vsid,
                    ca: addr16(r.ca),
                    mac: r.mac.0,
                    _pad: [0; 2],
                    ifindex,
                },
            )
        }),
    }
}

/// (VSID, CA) as bytes that sort as the catalog does: VSID big-endian, then the address
/// family and its bytes.
fn store_key(vsid: u32, ca: IpAddr) -> Vec<u8> {
    let mut k = vsid.to_be_bytes().to_vec();
    put_addr(&mut k, ca);
    k
}

/// The form of [`encode`]'s values: a first byte that changes with it.
const LOOKUP_FORM: u8 = 1;

/// An address as its family (4 or 6) and its bytes.
fn put_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend(a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend(a.octets());
        }
    }
}

/// A lookup record's value (its key holds VSID and CA): form, PA (family and bytes), MAC,
/// method, port (length and bytes, 0: none), name (16-bit length plus one, 0: none).
fn encode(r: &LookupRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.push(LOOKUP_FORM);
    put_addr(&mut v, r.pa);
    v.extend(r.mac.0);
    v.push(match r.method {
        Method::Encap => 0,
        Method::Rewrite => 1,
    });
    let port = r.port.as_deref().unwrap_or_default().as_bytes();
    v.push(u8::try_from(port.len()).unwrap_or(u8::MAX));
    v.extend(&port[..port.len().min(255)]);
    match &r.name {
        None => v.extend(0u16.to_be_bytes()),
        Some(n) => {
            let n = &n.as_bytes()[..n.len().min(usize::from(u16::MAX) - 1)];
            v.extend(u16::try_from(n.len() + 1).unwrap_or(u16::MAX).to_be_bytes());
            v.extend(n);
        }
    }
    v
}

/// Reads what [`store_key`] and [`encode`] wrote.
fn decode(key: &[u8], value: &[u8]) -> std::result::Result<LookupRecord, String> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("value cut short".into());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn addr(&mut self) -> std::result::Result<IpAddr, String> {
            match self.take(1)?[0] {
                4 => Ok(IpAddr::from(
                    <[u8; 4]>::try_from(self.take(4)?).unwrap_or_default(),
                )),
                6 => Ok(IpAddr::from(
                    <[u8; 16]>::try_from(self.take(16)?).unwrap_or_default(),
                )),
                f => Err(format!("address family {f}")),
            }
        }
        fn text(&mut self, n: usize) -> std::result::Result<String, String> {
            String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
        }
    }
    let mut k = Reader(key);
    let vsid = u32::from_be_bytes(k.take(4)?.try_into().unwrap_or_default());
    let ca = k.addr()?;
    let mut v = Reader(value);
    let form = v.take(1)?[0];
    if form != LOOKUP_FORM {
        return Err(format!("form {form}, this agent reads {LOOKUP_FORM}"));
    }
    let pa = v.addr()?;
    let mac = Mac(v.take(6)?.try_into().unwrap_or_default());
    let method = match v.take(1)?[0] {
        0 => Method::Encap,
        1 => Method::Rewrite,
        m => return Err(format!("method {m}")),
    };
    let port = match usize::from(v.take(1)?[0]) {
        0 => None,
        n => Some(v.text(n)?),
    };
    let name = match u16::from_be_bytes(v.take(2)?.try_into().unwrap_or_default()) {
        0 => None,
        n => Some(v.text(usize::from(n) - 1)?),
    };
    if !v.0.is_empty() || !k.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(LookupRecord {
        vsid,
        ca,
        pa,
        mac,
        method,
        port,
        name,
        host: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ca: &str) -> LookupRecord {
        LookupRecord {
            vsid: 5001,
            ca: ca.parse().unwrap(),
            pa: "198.18.0.2".parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 9, 9]),
            method: Method::Encap,
            port: None,
            name: Some("X".into()),
            host: None,
        }
    }

    #[test]
    fn records_round_trip_through_the_compact_form() {
        let mut all = vec![record("10.0.0.1")];
        let mut r = record("10.0.0.2");
        r.port = Some("red1".into());
        r.name = Some("RED-2 \u{e9}".into());
        r.method = Method::Rewrite;
        all.push(r);
        let mut r = record("10.0.0.3");
        r.name = Some(String::new());
        all.push(r);
        for r in all {
            let back = decode(&store_key(r.vsid, r.ca), &encode(&r)).unwrap();
            assert_eq!(back, r);
        }
        let v = encode(&record("10.0.0.1"));
        let k = store_key(5001, "10.0.0.1".parse().unwrap());
        assert!(decode(&k, &v[..v.len() - 1]).is_err());
        let mut other = v.clone();
        other[0] = 9;
        assert!(decode(&k, &other).unwrap_err().contains("form 9"));
    }

    #[test]
    fn keys_and_local_views() {
        let k = etcd_key(5001, "10.0.0.2".parse().unwrap());
        assert_eq!(k, "/nv/v1/lookups/5001/10.0.0.2");
        assert_eq!(
            parse_etcd_key(k.as_bytes()),
            Some((5001, "10.0.0.2".parse().unwrap()))
        );
        assert_eq!(parse_etcd_key(b"/nv/v1/lookups/x/10.0.0.2"), None);
        let r: LookupRecord = serde_json::from_str(
            r#"{"vsid":5001,"ca":"10.0.0.2","pa":"198.18.0.2","mac":"02:00:00:00:02:01","port":"red2","host":"h2"}"#,
        )
        .unwrap();
        assert_eq!(local_view(&r, "h2").port.as_deref(), Some("red2"));
        assert_eq!(local_view(&r, "h1").port, None);
        assert!(local_view(&r, "h2").host.is_none());
        let mut remote = r.clone();
        remote.port = None;
        assert!(
            placed(remote, "h1")
                .unwrap_err()
                .to_string()
                .contains("give --port")
        );
        let mut unplaced = r;
        unplaced.host = None;
        assert_eq!(placed(unplaced, "h1").unwrap().host.as_deref(), Some("h1"));
    }
}
