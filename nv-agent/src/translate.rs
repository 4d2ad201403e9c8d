//! Translation: what the maps hold for the catalog's records, as pure functions (no map, no
//! netlink), so the transaction path and start-up compute the same entries and tests need no
//! root.
use std::{collections::HashMap, net::IpAddr};

use nv_common::{DatapathConfig, LocalPa, PortInfo, V4, v4_mapped};

use crate::{
    catalog::Catalog,
    datapath::Desired,
    model::Method,
    netlink::{LinkInfo, LinkKind},
    tables::{acls, providers},
};

/// A VM port as the agent found it: where the datapath delivers to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub ifindex: u32,
    /// `PortInfo::flags` as written.
    pub flags: u8,
}

impl Attached {
    pub fn of(link: &LinkInfo) -> Attached {
        let mut flags = 0;
        if link.kind == LinkKind::Tap {
            flags |= PortInfo::TAP;
        }
        if !link.running {
            flags |= PortInfo::DOWN;
        }
        Attached {
            ifindex: link.index,
            flags,
        }
    }
}

pub fn addr16(ip: IpAddr) -> nv_common::Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The IPv4 form of an address in an IPv4 map's key (IPv6 keys go to the IPv6 maps: callers
/// pick the map by family first).
pub fn key_v4(ip: IpAddr) -> V4 {
    match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or([0; 4], |v4| v4.octets()),
    }
}

pub use crate::tables::lookups::{Entries, MapKey, entries, lookup_key};

/// VSIDs with a VM on this host (whether its port exists now or not), and how many.
pub fn hosted_vsids(catalog: &Catalog) -> HashMap<u32, u32> {
    let mut hosted = HashMap::new();
    for r in catalog.local() {
        *hosted.entry(r.vsid).or_default() += 1;
    }
    hosted
}

/// The config map: `base` (uplink, MTU, hook, bounce pair) with this host's rewrite PAs in
/// the uplink's filter: its VMs', whether their port exists now or not, and every provider
/// the datapath owns (traffic to them is a local VM's, or dropped: never the host's).
pub fn config(base: &DatapathConfig, catalog: &Catalog) -> DatapathConfig {
    let mut config = *base;
    let filter_key = |pa: IpAddr| match pa {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => DatapathConfig::filter_key6(&a.octets()),
    };
    for r in catalog.local() {
        if r.method == Method::Rewrite {
            config.add_rewrite_pa(filter_key(r.pa));
        }
    }
    for p in catalog.providers() {
        if p.rewrite {
            config.add_rewrite_pa(filter_key(p.pa.addr));
        }
    }
    config
}

/// The local provider addresses: IPv4's and IPv6's.
pub fn local_pas(
    catalog: &Catalog,
    uplink_ifindex: u32,
) -> (HashMap<V4, LocalPa>, HashMap<nv_common::Addr, LocalPa>) {
    let (mut v4, mut v6) = (HashMap::new(), HashMap::new());
    for p in catalog.providers() {
        let entry = providers::local_pa(p, uplink_ifindex);
        match p.pa.addr {
            IpAddr::V4(a) => v4.insert(a.octets(), entry),
            IpAddr::V6(a) => v6.insert(a.octets(), entry),
        };
    }
    (v4, v6)
}

/// Everything the maps must hold for `catalog`, with each port where `at` says it is.
pub fn desired(
    catalog: &Catalog,
    at: impl Fn(&str) -> Option<Attached>,
    base: &DatapathConfig,
) -> Desired {
    let (local_pas, local_pas6) = local_pas(catalog, base.uplink_ifindex);
    let mut d = Desired {
        local_pas,
        local_pas6,
        hosted_vsids: hosted_vsids(catalog),
        config: config(base, catalog),
        routing: crate::tables::routes::entries(catalog.routes()),
        acls: acl_entries(catalog),
        ..Desired::default()
    };
    for r in catalog.iter() {
        let e = entries(
            &r,
            r.port.as_deref().and_then(&at),
            catalog.port_flags_of(&r),
        );
        e.put_lookup(&mut d);
        if let Some(p) = e.port {
            d.ports.insert(e.value.ifindex, p);
        }
        if let Some((pa, v)) = e.rewrite {
            d.rewrite_pas.insert(pa, v);
        }
    }
    d
}

/// This host's VMs, as the ACL maps name them (the VSID and address of their port entry),
/// with their ports and records; none while there is no rule.
pub fn local_vms(catalog: &Catalog) -> Vec<acls::LocalVm> {
    if catalog.acls().is_empty() {
        return Vec::new();
    }
    catalog
        .ports()
        .filter_map(|port| {
            let records = catalog.on_port(port);
            let entry = records.iter().find(|r| catalog.port_entry_of(r))?;
            Some(acls::LocalVm {
                key: (entry.vsid, addr16(entry.ca)),
                port: port.to_owned(),
                records,
            })
        })
        .collect()
}

/// The ACL maps' entries for `catalog`'s rules and this host's VMs.
pub fn acl_entries(catalog: &Catalog) -> acls::AclEntries {
    acls::entries(catalog.acls(), &local_vms(catalog))
}
