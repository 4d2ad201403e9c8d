//! The Cilium-style peer (nv-bench-ebpf) on the two-host bed: each host a VXLAN device in
//! `collect_md` mode (`external`, as Cilium's `cilium_vxlan`), the peer's programs on TC ingress of
//! the VM ports and of that device, and its maps filled as Cilium's agent fills its ipcache and
//! endpoint map. The VMs' neighbours are static, as Cilium's ARP responder would answer them.
use std::net::Ipv4Addr;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap},
    programs::{SchedClassifier, TcAttachType},
};

use crate::testbed::{RED_VSID, TwoHosts};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/peer"));

/// The MAC of every host's VXLAN device: the VMs' neighbours point at it, so the kernel
/// classifies a decapsulated frame as the device's own (`PACKET_HOST`) and the redirect into
/// the VM's namespace keeps it.
pub const TUNNEL_MAC: &str = "02:00:00:00:fe:01";

/// As nv-bench-ebpf's `Remote`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Remote {
    host: u32,
    vni: u32,
}

/// As nv-bench-ebpf's `Endpoint`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Endpoint {
    ifindex: u32,
    mac: [u8; 6],
    router_mac: [u8; 6],
}

// SAFETY: plain `repr(C)` data without padding (4 + 4 and 4 + 6 + 6 bytes).
unsafe impl aya::Pod for Remote {}
// SAFETY: as above.
unsafe impl aya::Pod for Endpoint {}

/// The peer's programs, loaded and attached on every host of a bed: detached (TCX links) when
/// dropped, and with the bed's namespaces in any case.
pub struct Peer {
    _hosts: Vec<Ebpf>,
}

/// Sets up the peer on `bed` (built bare): RED's VMs reach each other through it, BLUE's not at
/// all. `extra` more remote addresses (10.64.0.0 onwards, all on host 2) go into host 1's
/// ipcache, for lookups on a table of that size.
pub fn install(bed: &TwoHosts, extra: u32) -> anyhow::Result<Peer> {
    let mut hosts = Vec::new();
    for (i, h) in bed.hosts.iter().enumerate() {
        let remote = &bed.hosts[1 - i];
        h.ns.ip(&["addr", "add", &format!("{}/15", h.pa), "dev", "uplink0"])?;
        h.ns.ip(&[
            "link", "add", "vxpeer", "address", TUNNEL_MAC, "type", "vxlan", "external", "dstport",
            "4789",
        ])?;
        h.ns.ip(&["link", "set", "vxpeer", "up"])?;
        let (port, vm, other) = (
            format!("red{}", i + 1),
            bed.vm(&format!("RED-{}", i + 1)),
            bed.vm(&format!("RED-{}", 2 - i)),
        );
        vm.ns.ip(&[
            "neigh",
            "replace",
            &other.ca,
            "lladdr",
            TUNNEL_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        let endpoint = Endpoint {
            ifindex: h.ns.ifindex(&port)?,
            mac: vm.mac.parse::<nv_agent::model::Mac>()?.0,
            router_mac: h.ns.mac(&port)?,
        };
        let (own, tunnel_dev) = (vm.ca.parse::<Ipv4Addr>()?, h.ns.ifindex("vxpeer")?);
        let mut remotes = vec![(
            other.ca.parse::<Ipv4Addr>()?,
            remote.pa.parse::<Ipv4Addr>()?,
        )];
        if i == 0 {
            let far = remote.pa.parse::<Ipv4Addr>()?;
            remotes.extend((0..extra).map(|n| (Ipv4Addr::from(0x0a40_0000 + n), far)));
        }
        let ebpf = crate::netns::on_thread_in(h.ns.path(), move || {
            let mut ebpf = Ebpf::load(OBJECT).context("load the peer's object")?;
            let mut map: HashMap<_, u32, Remote> =
                HashMap::try_from(ebpf.map_mut("PEER_REMOTES").context("PEER_REMOTES")?)?;
            for (ca, host) in remotes {
                let value = Remote {
                    host: u32::from(host),
                    vni: RED_VSID,
                };
                map.insert(u32::from_ne_bytes(ca.octets()), value, 0)?;
            }
            let mut map: HashMap<_, u32, Endpoint> =
                HashMap::try_from(ebpf.map_mut("PEER_ENDPOINTS").context("PEER_ENDPOINTS")?)?;
            map.insert(u32::from_ne_bytes(own.octets()), endpoint, 0)?;
            let mut dev: Array<_, u32> =
                Array::try_from(ebpf.map_mut("PEER_TUNNEL_DEV").context("PEER_TUNNEL_DEV")?)?;
            dev.set(0, tunnel_dev, 0)?;
            for (name, iface) in [
                ("peer_from_vm", port.as_str()),
                ("peer_from_overlay", "vxpeer"),
            ] {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name}"))?
                    .try_into()?;
                prog.load().with_context(|| format!("load {name}"))?;
                prog.attach(iface, TcAttachType::Ingress)
                    .with_context(|| format!("attach {name} to {iface}"))?;
            }
            Ok(ebpf)
        })?;
        hosts.push(ebpf);
    }
    Ok(Peer { _hosts: hosts })
}
