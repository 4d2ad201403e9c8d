//! A simulated host for program tests and benchmarks: a namespace with an uplink and VM ports,
//! the datapath loaded with maps filled as the agent fills them, and frames built with
//! etherparse (headers and checksums computed independently of the datapath).
use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use etherparse::{IpNumber, Ipv4Header, Ipv4HeaderSlice, PacketBuilder};
pub use nv_agent::datapath::Programs;
use nv_agent::datapath::{Datapath, Desired};
use nv_common::{
    DatapathConfig, LocalPa, LookupKey, LookupKey6, LookupValue, Method, PortInfo, RewritePa,
    flow::flow_id_v4, v4_mapped,
};

use crate::{
    netns::Netns,
    sys::{require_root, unique_prefix},
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub const RED: u32 = 5001;
pub const BLUE: u32 = 6001;
pub const LOCAL_PA: [u8; 4] = [198, 18, 0, 1];
pub const REMOTE_PA: [u8; 4] = [198, 18, 0, 2];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
pub const RED1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
pub const BLUE1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
pub const RED3_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];
pub const RED2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
pub const BLUE2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
pub const CA1: [u8; 4] = [10, 0, 0, 1];
pub const CA2: [u8; 4] = [10, 0, 0, 2];
pub const CA3: [u8; 4] = [10, 0, 0, 3];
/// IPv6 customer addresses (`Host::add_ipv6`): `fd00::1`, `fd00::2`, `fd00::3`.
pub const CA6_1: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const CA6_2: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const CA6_3: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
/// RED-B's and BLUE-B's IPv6 address (`fd00:1::5`) and the RED subnet's IPv6 gateway
/// (`fd00::fe`): [`Host::add_ipv6_routes`].
pub const CA6_B: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
pub const GATEWAY6_A: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe];
pub const GREEN: u32 = 7001;
pub const GREEN1_PA: [u8; 4] = [198, 18, 1, 1];
pub const GREEN2_PA: [u8; 4] = [198, 18, 1, 2];
pub const OTHER_PA: [u8; 4] = [198, 18, 1, 9];
/// A provider address of this host no record uses.
pub const SPARE_PA: [u8; 4] = [198, 18, 0, 11];
/// A rewrite PA of this host whose VM's record went: still the datapath's.
pub const IDLE_REWRITE_PA: [u8; 4] = [198, 18, 1, 5];
pub const GREEN_GATEWAY_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];
pub const GREEN1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 7];
pub const GREEN2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 7];

/// The router's MAC, as the loader sets it by default.
pub const ROUTER_MAC: [u8; 6] = nv_common::routing::DEFAULT_ROUTER_MAC;
/// contoso: RED (5001, 10.0.0.0/24, gateway 10.0.0.254), RED-B (7003, 10.1.0.0/24) and RED-C
/// (7004, 10.2.0.0/24); fabrikam: BLUE (6001, 10.0.0.0/24, gateway 10.0.0.254) and BLUE-B
/// (8003, 10.1.0.0/24). Their VMs at 10.1.0.5 and 10.2.0.7 are remote.
pub const RED_B: u32 = 7003;
pub const BLUE_B: u32 = 8003;
pub const RED_C: u32 = 7004;
pub const CA_B: [u8; 4] = [10, 1, 0, 5];
pub const CA_C: [u8; 4] = [10, 2, 0, 7];
pub const RED_B_MAC: [u8; 6] = [2, 0, 0, 0, 7, 5];
pub const BLUE_B_MAC: [u8; 6] = [2, 0, 0, 0, 8, 5];
pub const RED_C_MAC: [u8; 6] = [2, 0, 0, 0, 7, 7];
pub const GATEWAY_A: [u8; 4] = [10, 0, 0, 254];
/// greenland: GREEN (7001, 10.0.0.0/24, gateway 10.0.0.254, IP rewrite) and GREEN-B (7005,
/// 10.3.0.0/24), whose VM 10.3.0.5 is remote, by rewrite on its own PA.
pub const GREEN_B: u32 = 7005;
pub const CA_GB: [u8; 4] = [10, 3, 0, 5];
pub const GREEN_B_PA: [u8; 4] = [198, 18, 1, 7];
pub const GREEN_B_MAC: [u8; 6] = [2, 0, 0, 0, 7, 11];
/// AMBER rides the IPv6 underlay ([`Host::add_ipv6_underlay`]): AMBER-1 here (`10.0.0.1`,
/// `fd00::1`) behind `LOCAL_PA6`, AMBER-2 remote (`10.0.0.2`, `fd00::2`) behind `REMOTE_PA6`,
/// and AMBER-3 (`10.0.0.3`) remote behind the IPv4 `REMOTE_PA`: out of AMBER-1's reach.
pub const AMBER: u32 = 7101;
pub const LOCAL_PA6: [u8; 16] = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const REMOTE_PA6: [u8; 16] = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const AMBER1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x0a];
pub const AMBER2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x0a];
pub const AMBER3_MAC: [u8; 6] = [2, 0, 0, 0, 3, 0x0a];
/// TEAL uses IP rewrite over IPv6 ([`Host::add_ipv6_rewrite`]): TEAL-1 here (`fd00::1` only,
/// its own PA `LOCAL_RW6`), TEAL-2 remote (`fd00::2`, `REMOTE_RW6`); `OTHER_RW6` is a rewrite
/// PA of another VSID (7202).
pub const TEAL: u32 = 7201;
pub const LOCAL_RW6: [u8; 16] = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
pub const REMOTE_RW6: [u8; 16] = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];
pub const OTHER_RW6: [u8; 16] = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 9];
pub const TEAL1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x0b];
pub const TEAL2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x0b];

/// A VM port `name` (a veth whose peer is `{name}p`), up.
fn vm_port(ns: &Netns, name: &str) -> anyhow::Result<()> {
    let peer = format!("{name}p");
    ns.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer])?;
    ns.ip(&["link", "set", name, "up"])?;
    ns.ip(&["link", "set", &peer, "up"])?;
    Ok(())
}

/// The remote host's IPv6 address `addr` is at its MAC, for good (the FIB helper then finds
/// it without asking).
fn remote_neighbour(ns: &Netns, addr: &str) -> anyhow::Result<()> {
    ns.ip(&[
        "-6",
        "neigh",
        "replace",
        addr,
        "lladdr",
        "02:aa:00:00:00:02",
        "dev",
        "uplink0",
        "nud",
        "permanent",
    ])?;
    Ok(())
}

/// A pin directory, purged on drop (also when loading into it failed half way).
pub struct PinDir(PathBuf);

impl PinDir {
    /// Takes charge of `path`: purged when dropped.
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self(path)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = nv_agent::datapath::purge(&self.0);
    }
}

/// A host in a namespace with an uplink (PA 198.18.0.1, the remote PA's neighbour known) and
/// three VM ports: RED-1 (10.0.0.1), BLUE-1 (10.0.0.1) and RED-3 (10.0.0.3). RED-2 and BLUE-2
/// (10.0.0.2) are remote. The test thread runs inside the namespace. Fields drop in order:
/// the datapath, then its pins, then the namespace.
pub struct Host {
    pub dp: Datapath,
    pin: PinDir,
    /// The lookup map's size, as loaded.
    max_lookups: u32,
    pub ns: Netns,
    pub uplink_mac: [u8; 6],
    pub red1: u32,
    pub blue1: u32,
    pub green1: u32,
    pub desired: Desired,
}

/// The host's namespace: uplink with both local PAs and the remote PAs' neighbours known,
/// and the VM ports.
pub fn host_namespace(forwarding: bool) -> anyhow::Result<Netns> {
    require_root()?;
    let ns = Netns::new(&unique_prefix("p"))?;
    ns.ip(&[
        "link", "add", "uplink0", "type", "veth", "peer", "name", "peer0",
    ])?;
    ns.ip(&["link", "set", "uplink0", "up"])?;
    ns.ip(&["link", "set", "peer0", "up"])?;
    for port in ["red1", "blue1", "red3", "green1"] {
        let peer = format!("{port}p");
        ns.ip(&["link", "add", port, "type", "veth", "peer", "name", &peer])?;
        ns.ip(&["link", "set", port, "up"])?;
        ns.ip(&["link", "set", &peer, "up"])?;
    }
    for (local, remote, mac) in [
        ("198.18.0.1/15", "198.18.0.2", "02:aa:00:00:00:02"),
        ("198.18.1.1/15", "198.18.1.2", "02:aa:00:00:00:03"),
    ] {
        ns.ip(&["addr", "add", local, "dev", "uplink0"])?;
        ns.ip(&[
            "neigh",
            "replace",
            remote,
            "lladdr",
            mac,
            "dev",
            "uplink0",
            "nud",
            "permanent",
        ])?;
    }
    // GREEN-B's PA (a routed rewrite destination) is behind GREEN-2's next hop.
    ns.ip(&[
        "neigh",
        "replace",
        "198.18.1.7",
        "lladdr",
        "02:aa:00:00:00:03",
        "dev",
        "uplink0",
        "nud",
        "permanent",
    ])?;
    if forwarding {
        ns.exec("sysctl", &["-qw", "net.ipv4.conf.uplink0.forwarding=1"])?;
    }
    Ok(ns)
}

/// The maps as the agent would fill them for the VMs of `host_namespace`.
pub fn host_maps(ns: &Netns) -> anyhow::Result<Desired> {
    let (uplink, red1, blue1, red3, green1) = (
        ns.ifindex("uplink0")?,
        ns.ifindex("red1")?,
        ns.ifindex("blue1")?,
        ns.ifindex("red3")?,
        ns.ifindex("green1")?,
    );
    let port = |vsid, ca, mac| PortInfo {
        vsid,
        ca: v4_mapped(ca),
        pa: v4_mapped(LOCAL_PA),
        mac,
        method: 0,
        flags: 0,
    };
    let lookup = |pa, mac, ifindex| LookupValue {
        pa: v4_mapped(pa),
        mac,
        method: 0,
        _pad: 0,
        ifindex,
    };
    let rewrite = |pa, mac, ifindex| LookupValue {
        method: Method::Rewrite as u8,
        ..lookup(pa, mac, ifindex)
    };
    let dedicated = |vsid, ca, mac, ifindex| RewritePa {
        vsid,
        ca: v4_mapped(ca),
        mac,
        _pad: [0; 2],
        ifindex,
    };
    let key = |vsid, ca| LookupKey { vsid, ca };
    let mut d = Desired {
        config: DatapathConfig {
            uplink_ifindex: uplink,
            uplink_mac: ns.mac("uplink0")?,
            ..DatapathConfig::default()
        },
        ..Desired::default()
    };
    // GREEN-1's PA is the one rewrite PA of a VM here; another rewrite PA has no VM any more.
    // Both are the datapath's, as the agent makes them.
    d.config.add_rewrite_pa(GREEN1_PA);
    d.config.add_rewrite_pa(IDLE_REWRITE_PA);
    for pa in [LOCAL_PA, SPARE_PA] {
        d.local_pas.insert(pa, LocalPa::new(uplink, 0));
    }
    for pa in [GREEN1_PA, IDLE_REWRITE_PA] {
        d.local_pas.insert(pa, LocalPa::new(uplink, LocalPa::OWNED));
    }
    d.ports.insert(red1, port(RED, CA1, RED1_MAC));
    d.ports.insert(blue1, port(BLUE, CA1, BLUE1_MAC));
    d.ports.insert(red3, port(RED, CA3, RED3_MAC));
    d.lookups
        .insert(key(RED, CA1), lookup(LOCAL_PA, RED1_MAC, red1));
    d.lookups
        .insert(key(BLUE, CA1), lookup(LOCAL_PA, BLUE1_MAC, blue1));
    d.lookups
        .insert(key(RED, CA3), lookup(LOCAL_PA, RED3_MAC, red3));
    d.lookups
        .insert(key(RED, CA2), lookup(REMOTE_PA, RED2_MAC, 0));
    d.lookups
        .insert(key(BLUE, CA2), lookup(REMOTE_PA, BLUE2_MAC, 0));
    // GREEN uses IP rewrite: GREEN-1 (10.0.0.1, here, PA 198.18.1.1) and GREEN-2 (10.0.0.2,
    // remote, PA 198.18.1.2).
    let green_port = PortInfo {
        pa: v4_mapped(GREEN1_PA),
        method: Method::Rewrite as u8,
        ..port(GREEN, CA1, GREEN1_MAC)
    };
    d.ports.insert(green1, green_port);
    d.lookups
        .insert(key(GREEN, CA1), rewrite(GREEN1_PA, GREEN1_MAC, green1));
    d.lookups
        .insert(key(GREEN, CA2), rewrite(GREEN2_PA, GREEN2_MAC, 0));
    d.rewrite_pas.insert(
        v4_mapped(GREEN1_PA),
        dedicated(GREEN, CA1, GREEN1_MAC, green1),
    );
    d.rewrite_pas
        .insert(v4_mapped(GREEN2_PA), dedicated(GREEN, CA2, GREEN2_MAC, 0));
    // A rewrite PA of another VSID, to prove sources are checked within the VSID.
    d.rewrite_pas
        .insert(v4_mapped(OTHER_PA), dedicated(7002, CA2, GREEN2_MAC, 0));
    // RED (RED-1, RED-3), BLUE (BLUE-1) and GREEN (GREEN-1) have VMs here.
    d.hosted_vsids.extend([(RED, 2), (BLUE, 1), (GREEN, 1)]);
    Ok(d)
}

/// A host whose programs record where they redirect ([`Programs::Tracing`]).
pub fn host(forwarding: bool) -> anyhow::Result<Host> {
    host_with(forwarding, 0, Programs::Tracing)
}

/// As `host`, with `extra` more remote lookup records (VSID 9001, 10.x.y.z) in the map, so
/// lookups run against a table of realistic size, and the copy of the programs to load (a
/// benchmark measures the forwarding copy).
pub fn host_with(forwarding: bool, extra: u32, programs: Programs) -> anyhow::Result<Host> {
    let ns = host_namespace(forwarding)?;
    ns.enter_current_thread()?;
    let pin = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", ns.name)));
    let max_lookups = 1024 + extra;
    let mut dp = Datapath::load_programs(&pin.0, max_lookups, programs)?;
    dp.load_floors()?;
    let mut desired = host_maps(&ns)?;
    for i in 0..extra {
        let [_, a, b, c] = i.to_be_bytes();
        desired.lookups.insert(
            LookupKey {
                vsid: 9001,
                ca: [10, a, b, c],
            },
            LookupValue {
                pa: v4_mapped(REMOTE_PA),
                mac: [2, 9, 0, a, b, c],
                method: 0,
                _pad: 0,
                ifindex: 0,
            },
        );
    }
    dp.sync(&desired)?;
    let (uplink_mac, red1, blue1, green1) = (
        ns.mac("uplink0")?,
        ns.ifindex("red1")?,
        ns.ifindex("blue1")?,
        ns.ifindex("green1")?,
    );
    Ok(Host {
        dp,
        pin,
        max_lookups,
        ns,
        uplink_mac,
        red1,
        blue1,
        green1,
        desired,
    })
}

impl Host {
    /// Gives the host the two routing domains above (routes and remote VMs), as the agent
    /// would map them.
    pub fn add_domains(&mut self) -> anyhow::Result<()> {
        self.add_domains_with(0)
    }

    /// [`Host::add_domains`], with `extra` more routes in contoso (100.64.0.0/24 on, one
    /// /24 each, through RED-B's 10.1.0.5): a domain of many routes, for the benchmark.
    pub fn add_domains_with(&mut self, extra: u32) -> anyhow::Result<()> {
        let route = |rdid: &str, vsid: u32, prefix: &str, gateway: Option<&str>| {
            serde_json::from_value::<nv_agent::model::RouteRecord>(serde_json::json!({
                "rdid": rdid, "vsid": vsid, "prefix": prefix, "nexthop": "0.0.0.0",
                "gateway": gateway,
            }))
        };
        let rows = vec![
            route("contoso", RED, "10.0.0.0/24", Some("10.0.0.254"))?,
            route("contoso", RED_B, "10.1.0.0/24", None)?,
            route("contoso", RED_C, "10.2.0.0/24", None)?,
            route("fabrikam", BLUE, "10.0.0.0/24", Some("10.0.0.254"))?,
            route("fabrikam", BLUE_B, "10.1.0.0/24", None)?,
            route("greenland", GREEN, "10.0.0.0/24", Some("10.0.0.254"))?,
            route("greenland", GREEN_B, "10.3.0.0/24", None)?,
        ];
        // contoso's appliances: RED-B (remote) for 192.0.2.0/24, RED-3 (here) for
        // 198.51.100.0/24.
        let via = |vsid: u32, prefix: &str, nexthop: &str| {
            serde_json::from_value::<nv_agent::model::RouteRecord>(serde_json::json!({
                "rdid": "contoso", "vsid": vsid, "prefix": prefix, "nexthop": nexthop,
            }))
        };
        let mut rows = rows;
        rows.push(via(RED_B, "192.0.2.0/24", "10.1.0.5")?);
        rows.push(via(RED, "198.51.100.0/24", "10.0.0.3")?);
        rows.push(serde_json::from_value(serde_json::json!({
            "rdid": "greenland", "vsid": GREEN_B, "prefix": "203.0.113.0/24",
            "nexthop": "10.3.0.5",
        }))?);
        for i in 0..extra {
            let prefix = std::net::Ipv4Addr::from(0x6440_0000u32 + (i << 8));
            rows.push(via(RED_B, &format!("{prefix}/24"), "10.1.0.5")?);
        }
        let index = nv_agent::tables::routes::RouteIndex::from_rows(rows)?;
        self.desired.routing = nv_agent::tables::routes::entries(&index);
        for (vsid, ca, mac) in [
            (RED_B, CA_B, RED_B_MAC),
            (BLUE_B, CA_B, BLUE_B_MAC),
            (RED_C, CA_C, RED_C_MAC),
        ] {
            self.desired.lookups.insert(
                LookupKey { vsid, ca },
                LookupValue {
                    pa: v4_mapped(REMOTE_PA),
                    mac,
                    method: 0,
                    _pad: 0,
                    ifindex: 0,
                },
            );
        }
        self.desired.lookups.insert(
            LookupKey {
                vsid: GREEN_B,
                ca: CA_GB,
            },
            LookupValue {
                pa: v4_mapped(GREEN_B_PA),
                mac: GREEN_B_MAC,
                method: Method::Rewrite as u8,
                _pad: 0,
                ifindex: 0,
            },
        );
        self.desired.rewrite_pas.insert(
            v4_mapped(GREEN_B_PA),
            RewritePa {
                vsid: GREEN_B,
                ca: v4_mapped(CA_GB),
                mac: GREEN_B_MAC,
                _pad: [0; 2],
                ifindex: 0,
            },
        );
        self.dp.sync(&self.desired)?;
        Ok(())
    }

    /// IPv6 records: RED-1 (`CA6_1`) and RED-3 (`CA6_3`)
    /// here, RED-2 (`CA6_2`) and BLUE-2 (`CA6_2` too, in BLUE) behind the remote PA.
    pub fn add_ipv6(&mut self) -> anyhow::Result<()> {
        self.desired.lookups6 = self.ipv6_records()?.into_iter().collect();
        self.dp.sync(&self.desired)?;
        Ok(())
    }

    /// IPv6 subnets in two domains, beside the IPv4 ones of [`Host::add_domains`] (called
    /// first): contoso's RED `fd00::/64` (gateway `GATEWAY6_A`) and RED-B `fd00:1::/64`
    /// (gateway `fd00:1::1`), with RED-B's VM `CA6_B` remote; fabrikam's BLUE `fd00::/64` and
    /// BLUE-B `fd00:1::/64`, with BLUE-B's VM `CA6_B` too.
    pub fn add_ipv6_routes(&mut self) -> anyhow::Result<()> {
        let route = |rdid: &str, vsid: u32, prefix: &str, gateway: Option<&str>| {
            serde_json::from_value::<nv_agent::model::RouteRecord>(serde_json::json!({
                "rdid": rdid, "vsid": vsid, "prefix": prefix, "nexthop": "::",
                "gateway": gateway,
            }))
        };
        let rows = vec![
            route("contoso", RED, "fd00::/64", Some("fd00::fe"))?,
            route("contoso", RED_B, "fd00:1::/64", None)?,
            route("fabrikam", BLUE, "fd00::/64", Some("fd00::fe"))?,
            route("fabrikam", BLUE_B, "fd00:1::/64", None)?,
        ];
        let index = nv_agent::tables::routes::RouteIndex::from_rows(rows)?;
        let e = nv_agent::tables::routes::entries(&index);
        let routing = &mut self.desired.routing;
        routing.routes6 = e.routes6;
        routing.gateways6 = e.gateways6;
        routing.vsids.extend(e.vsids);
        for (vsid, mac) in [(RED_B, RED_B_MAC), (BLUE_B, BLUE_B_MAC)] {
            let value = LookupValue {
                pa: v4_mapped(REMOTE_PA),
                mac,
                method: 0,
                _pad: 0,
                ifindex: 0,
            };
            self.desired
                .lookups6
                .insert(LookupKey6 { vsid, ca: CA6_B }, value);
        }
        self.dp.sync(&self.desired)?;
        Ok(())
    }

    /// An IPv6 PA beside the IPv4 ones (`LOCAL_PA6` on the uplink, `REMOTE_PA6`'s neighbour
    /// known) and AMBER's VMs over it (AMBER-1 on a new port `amber1`); returns its ifindex.
    pub fn add_ipv6_underlay(&mut self) -> anyhow::Result<u32> {
        let ns = &self.ns;
        vm_port(ns, "amber1")?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            "2001:2::1/64",
            "dev",
            "uplink0",
            "nodad",
        ])?;
        remote_neighbour(ns, "2001:2::2")?;
        let amber1 = ns.ifindex("amber1")?;
        let value = |pa: [u8; 16], mac, ifindex| LookupValue {
            pa,
            mac,
            method: 0,
            _pad: 0,
            ifindex,
        };
        let d = &mut self.desired;
        d.local_pas6
            .insert(LOCAL_PA6, LocalPa::new(self.ns.ifindex("uplink0")?, 0));
        d.ports.insert(
            amber1,
            PortInfo {
                vsid: AMBER,
                ca: v4_mapped(CA1),
                pa: LOCAL_PA6,
                mac: AMBER1_MAC,
                method: 0,
                flags: 0,
            },
        );
        for (ca, pa, mac, ifindex) in [
            (CA1, LOCAL_PA6, AMBER1_MAC, amber1),
            (CA2, REMOTE_PA6, AMBER2_MAC, 0),
            (CA3, v4_mapped(REMOTE_PA), AMBER3_MAC, 0),
        ] {
            d.lookups
                .insert(LookupKey { vsid: AMBER, ca }, value(pa, mac, ifindex));
        }
        for (ca, pa, mac, ifindex) in [
            (CA6_1, LOCAL_PA6, AMBER1_MAC, amber1),
            (CA6_2, REMOTE_PA6, AMBER2_MAC, 0),
        ] {
            d.lookups6
                .insert(LookupKey6 { vsid: AMBER, ca }, value(pa, mac, ifindex));
        }
        d.hosted_vsids.insert(AMBER, 1);
        self.dp.sync(&self.desired)?;
        Ok(amber1)
    }

    /// TEAL over IPv6 rewrite, beside [`Host::add_ipv6_underlay`] (called first): TEAL-1 on a
    /// new port `teal1`, IPv6 only, its rewrite PA owned by the datapath (in the uplink's
    /// filter); returns its ifindex.
    pub fn add_ipv6_rewrite(&mut self) -> anyhow::Result<u32> {
        let ns = &self.ns;
        vm_port(ns, "teal1")?;
        remote_neighbour(ns, "2001:2::1:2")?;
        let (teal1, uplink) = (ns.ifindex("teal1")?, ns.ifindex("uplink0")?);
        let rewrite = |pa: [u8; 16], mac, ifindex| LookupValue {
            pa,
            mac,
            method: Method::Rewrite as u8,
            _pad: 0,
            ifindex,
        };
        let dedicated = |vsid, ca, mac, ifindex| RewritePa {
            vsid,
            ca,
            mac,
            _pad: [0; 2],
            ifindex,
        };
        let d = &mut self.desired;
        d.ports.insert(
            teal1,
            PortInfo {
                vsid: TEAL,
                ca: CA6_1,
                pa: LOCAL_RW6,
                mac: TEAL1_MAC,
                method: Method::Rewrite as u8,
                flags: 0,
            },
        );
        d.lookups6.insert(
            LookupKey6 {
                vsid: TEAL,
                ca: CA6_1,
            },
            rewrite(LOCAL_RW6, TEAL1_MAC, teal1),
        );
        d.lookups6.insert(
            LookupKey6 {
                vsid: TEAL,
                ca: CA6_2,
            },
            rewrite(REMOTE_RW6, TEAL2_MAC, 0),
        );
        d.rewrite_pas
            .insert(LOCAL_RW6, dedicated(TEAL, CA6_1, TEAL1_MAC, teal1));
        d.rewrite_pas
            .insert(REMOTE_RW6, dedicated(TEAL, CA6_2, TEAL2_MAC, 0));
        d.rewrite_pas
            .insert(OTHER_RW6, dedicated(7202, CA6_2, TEAL2_MAC, 0));
        d.local_pas6
            .insert(LOCAL_RW6, LocalPa::new(uplink, LocalPa::OWNED));
        d.config
            .add_rewrite_pa(DatapathConfig::filter_key6(&LOCAL_RW6));
        d.hosted_vsids.insert(TEAL, 1);
        self.dp.sync(&self.desired)?;
        Ok(teal1)
    }

    /// The entries [`Host::add_ipv6`] writes.
    pub fn ipv6_records(&self) -> anyhow::Result<Vec<(LookupKey6, LookupValue)>> {
        let red3 = self.ns.ifindex("red3")?;
        Ok([
            (RED, CA6_1, LOCAL_PA, RED1_MAC, self.red1),
            (RED, CA6_3, LOCAL_PA, RED3_MAC, red3),
            (RED, CA6_2, REMOTE_PA, RED2_MAC, 0),
            (BLUE, CA6_2, REMOTE_PA, BLUE2_MAC, 0),
        ]
        .into_iter()
        .map(|(vsid, ca, pa, mac, ifindex)| {
            let value = LookupValue {
                pa: v4_mapped(pa),
                mac,
                method: 0,
                _pad: 0,
                ifindex,
            };
            (LookupKey6 { vsid, ca }, value)
        })
        .collect())
    }

    /// Another copy of the programs on this host's maps (a benchmark's baseline). Loaded
    /// with the same layout, so it shares every map, and checked to.
    pub fn load_copy(&self, programs: Programs) -> anyhow::Result<Datapath> {
        let copy = Datapath::load_programs(&self.pin.0, self.max_lookups, programs)?;
        ensure!(
            copy.fresh_maps().is_empty(),
            "a copy of the programs made maps of its own: {:?}",
            copy.fresh_maps()
        );
        Ok(copy)
    }

    /// Another build's programs (`object`: its eBPF ELF) on this host's maps, for the
    /// benchmark's parent-tree rows. Loaded with this build's layout of the maps it shares.
    pub fn load_foreign(&self, object: &[u8]) -> anyhow::Result<Datapath> {
        Ok(Datapath::load_object(
            &self.pin.0,
            self.max_lookups,
            Programs::Forwarding,
            object,
        )?)
    }

    /// Replaces the datapath flags (`DatapathConfig::*`).
    pub fn set_flags(&mut self, flags: u32) -> anyhow::Result<()> {
        self.desired.config.flags = flags;
        self.dp.sync(&self.desired)?;
        Ok(())
    }

    /// Points RED's record for 10.0.0.2 at another method, as a disagreeing host might.
    pub fn set_red2_method(&mut self, method: Method) -> anyhow::Result<()> {
        let key = LookupKey { vsid: RED, ca: CA2 };
        self.desired
            .lookups
            .get_mut(&key)
            .context("RED-2 record")?
            .method = method as u8;
        self.dp.sync(&self.desired)?;
        Ok(())
    }

    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self
            .dp
            .counters()?
            .into_iter()
            .find(|(c, _)| c.name() == name)
            .with_context(|| format!("counter {name}"))?
            .1)
    }

    /// Runs `prog`, and checks it returned `ret` and counted one `counter`.
    pub fn expect(
        &self,
        prog: &str,
        frame: &[u8],
        ifindex: Option<u32>,
        ret: u32,
        counter: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let before = self.counter(counter)?;
        let out = self.dp.test_run(prog, frame, ifindex, 1)?;
        ensure!(
            out.ret == ret,
            "{prog}: returned {}, expected {ret}",
            out.ret
        );
        let after = self.counter(counter)?;
        ensure!(
            after == before + 1,
            "{prog}: counter {counter} went {before} -> {after}, expected +1"
        );
        Ok(out.data)
    }
}

/// A DHCP discover from `mac` (client port 68 to server port 67), as a client sends it from
/// `src` (0.0.0.0 before it has an address) to `dst`.
pub fn dhcp_discover(mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(mac, [0xff; 6])
        .ipv4(src, dst, 64)
        .udp(68, 67);
    // BOOTREQUEST, Ethernet, 6-byte address; chaddr; the magic cookie; message type 1.
    let mut bootp = vec![0u8; 240];
    bootp[..4].copy_from_slice(&[1, 1, 6, 0]);
    bootp[28..34].copy_from_slice(&mac);
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    bootp.extend([53, 1, 1, 255]);
    let mut out = Vec::with_capacity(b.size(bootp.len()));
    b.write(&mut out, &bootp).expect("build discover");
    out
}

/// An IPv6 neighbour solicitation from `mac` at `src` for `target` (hop limit 255).
pub fn solicitation(mac: [u8; 6], src: [u8; 16], target: [u8; 16]) -> Vec<u8> {
    let mut snm = [0xffu8, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
    snm[13..].copy_from_slice(&target[13..]);
    let b = PacketBuilder::ethernet2(mac, [0x33, 0x33, 0xff, target[13], target[14], target[15]])
        .ipv6(src, snm, 255)
        .icmpv6(etherparse::Icmpv6Type::NeighborSolicitation);
    // etherparse's ICMPv6 header holds the reserved word; the target follows it.
    let mut payload = target.to_vec();
    payload.extend_from_slice(&[1, 1]);
    payload.extend_from_slice(&mac);
    let mut out = Vec::new();
    b.write(&mut out, &payload).expect("build NS");
    out
}

pub fn udp6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    ports: (u16, u16),
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, 64)
        .udp(ports.0, ports.1);
    let mut out = Vec::new();
    b.write(&mut out, b"ipv6 payload").expect("build UDP");
    out
}

pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(40000, 7001);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build frame");
    out
}

/// An Ethernet ARP frame from `src_mac` (broadcast): `op` 1 is a request, 2 a reply; the
/// target hardware address is left zero.
pub fn arp_frame(src_mac: [u8; 6], op: u8, sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, op]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

/// Sets the IPv4 TOS byte of a frame and fixes its header checksum (etherparse computes it).
pub fn with_tos(mut frame: Vec<u8>, tos: u8) -> Vec<u8> {
    let mut h = Ipv4HeaderSlice::from_slice(&frame[14..])
        .expect("ipv4")
        .to_header();
    h.dscp = etherparse::IpDscp::try_new(tos >> 2).expect("dscp");
    h.ecn = etherparse::IpEcn::try_new(tos & 3).expect("ecn");
    h.header_checksum = h.calc_header_checksum();
    frame[14..34].copy_from_slice(&h.to_bytes());
    frame
}

/// The NVGRE frame RFC 7637 specifies around `inner`, built with etherparse.
pub fn nvgre(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    key: u32,
    dscp: u8,
    inner: &[u8],
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(
        u16::try_from(8 + inner.len()).expect("fits"),
        64,
        IpNumber(47),
        src,
        dst,
    )
    .expect("ipv4");
    ip.dont_fragment = true;
    ip.dscp = etherparse::IpDscp::try_new(dscp).expect("dscp");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&0x2000u16.to_be_bytes());
    out.extend_from_slice(&0x6558u16.to_be_bytes());
    out.extend_from_slice(&key.to_be_bytes());
    out.extend_from_slice(inner);
    out
}

/// [`nvgre`] over IPv6: NVGRE from `src` to `dst` (IPv6 PAs), hop limit 64.
pub fn nvgre6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    key: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&0x86ddu16.to_be_bytes());
    let ip = etherparse::Ipv6Header {
        payload_length: u16::try_from(8 + inner.len()).expect("fits"),
        next_header: IpNumber(47),
        hop_limit: 64,
        source: src,
        destination: dst,
        ..etherparse::Ipv6Header::default()
    };
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&0x2000u16.to_be_bytes());
    out.extend_from_slice(&0x6558u16.to_be_bytes());
    out.extend_from_slice(&key.to_be_bytes());
    out.extend_from_slice(inner);
    out
}

pub fn udp_flow_id(src: [u8; 4], dst: [u8; 4]) -> u8 {
    flow_id_v4(src, dst, 17, (40000u32 << 16) | 0x1b59)
}

/// One packet of each kind a VM sends, built by etherparse with correct checksums.
pub fn green_packets(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let eth = || PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 61);
    let mut tcp = Vec::new();
    eth()
        .tcp(40000, 80, 0x0102_0304, 4096)
        .ack(77)
        .write(&mut tcp, b"tcp payload")
        .expect("tcp");
    out.push(("tcp", tcp));
    let mut udp = Vec::new();
    eth()
        .udp(40000, 7001)
        .write(&mut udp, b"udp payload")
        .expect("udp");
    out.push(("udp", udp.clone()));
    // UDP without a checksum (0): it must stay 0.
    let mut udp0 = udp;
    udp0[40..42].copy_from_slice(&[0, 0]);
    out.push(("udp-zero-checksum", udp0));
    let mut icmp = Vec::new();
    eth()
        .icmpv4_echo_request(9, 1)
        .write(&mut icmp, b"ping payload")
        .expect("icmp");
    out.push(("icmp", icmp));
    out
}
