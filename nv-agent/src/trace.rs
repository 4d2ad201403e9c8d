//! `nvctl trace`: where one packet goes and why, as ovn-trace tells it for OVN. The packet is
//! described (or taken from a capture), built here, run through a tracing copy of the loaded
//! programs on the live maps with `BPF_PROG_TEST_RUN` (`Datapath::load_tracer`: its counters
//! and caches are its own, so a trace changes nothing that forwards or is counted), and the
//! verdict, the records that matched, the output port and the output frame decoded come back.
use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, Icmpv6Header, IpNumber, Ipv4Header,
    Ipv6Header, PacketBuilder, TcpHeader, UdpHeader,
};
use serde::{Deserialize, Serialize};

use std::{collections::HashMap, net::IpAddr};

use crate::{
    catalog::describe,
    datapath::TestRunOutcome,
    error::{NvError, Result, invalid},
    model::Method,
    txn::Tables,
};

/// The transport of a described packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Icmp,
    Tcp,
    Udp,
}

/// What to trace (`POST /v1/trace`): a packet a VM sends on its port, or one that arrives on
/// the uplink; described by its addresses, or given whole (`frame`, hex: from a capture).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The VM port the packet leaves the VM by.
    #[serde(default)]
    pub port: Option<String>,
    /// The packet arrives on the uplink (NVGRE, or IP rewrite if the destination's record
    /// says so).
    #[serde(default)]
    pub from_uplink: bool,
    /// From the uplink: the virtual subnet.
    #[serde(default)]
    pub vsid: Option<u32>,
    #[serde(default)]
    pub src: Option<IpAddr>,
    #[serde(default)]
    pub dst: Option<IpAddr>,
    #[serde(default)]
    pub proto: Option<Proto>,
    #[serde(default)]
    pub sport: Option<u16>,
    #[serde(default)]
    pub dport: Option<u16>,
    /// A whole Ethernet frame, hex: run as it is.
    #[serde(default)]
    pub frame: Option<String>,
}

/// What happened to the packet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The programs it ran through, and where.
    pub program: String,
    /// The packet as built, layer by layer.
    pub input: Vec<String>,
    /// The records and port entries that decided, in the order the datapath used them.
    pub lookups: Vec<String>,
    /// `redirect`, `drop`, `pass` (to the host's stack, or on to the uplink's TC program).
    pub verdict: String,
    /// The counter the datapath counted it under: for a drop, its reason.
    pub counter: Option<String>,
    /// Why, in words.
    pub why: String,
    /// Where it was redirected: the device and how.
    pub out_port: Option<String>,
    pub out_how: Option<String>,
    /// The frame the program left, layer by layer (none for a drop).
    pub output: Vec<String>,
    /// And its bytes, hex, for another decoder.
    #[serde(default)]
    pub output_frame: Option<String>,
    /// For an ACL's deny: the rule's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
}

/// What a trace needs of the host.
pub struct Host<'a> {
    pub tables: &'a Tables,
    pub uplink: &'a str,
    pub uplink_ifindex: u32,
    pub uplink_mac: [u8; 6],
    /// NVGRE is taken off on the uplink's XDP hook (else on its TC hook).
    pub xdp: bool,
}

/// A packet to trace, built: the program it enters and where, and the records that decide.
pub struct Built {
    pub frame: Vec<u8>,
    pub lookups: Vec<String>,
    pub program: &'static str,
    /// The skb's device for a TC program.
    pub ifindex: Option<u32>,
    /// Where it enters, by name.
    pub at: String,
}

/// Builds the packet `req` describes (or takes the one it gives).
pub fn build(host: &Host, req: &Request) -> Result<Built> {
    match (&req.port, req.from_uplink) {
        (Some(port), false) => from_port(host, port, req),
        (None, true) => from_uplink(host, req),
        _ => Err(invalid(
            "trace a packet a VM sends (--port P) or one that arrives on the uplink \
             (--from-uplink), one of the two",
        )),
    }
}

/// Where a record of VSID `vsid` for `ca` says the VM is, in words.
fn record_line(host: &Host, vsid: u32, ca: impl Into<IpAddr>, what: &str) -> String {
    let ca = ca.into();
    match host.tables.catalog.get(&(vsid, ca)) {
        Some(d) => format!(
            "VSID {vsid} CA {ca}{what}: PA {} {}, {}",
            d.pa,
            d.method,
            d.port.as_ref().map_or_else(
                || "on another host".to_owned(),
                |p| format!("here, port {p}")
            )
        ),
        None => format!("VSID {vsid} CA {ca}{what}: no record"),
    }
}

/// A frame the VM behind `port` sends, as described or given.
fn from_port(host: &Host, port: &str, req: &Request) -> Result<Built> {
    let catalog = &host.tables.catalog;
    // The VM's record of the destination's family (IPv6 to an IPv6 destination).
    let v6 = req.dst.is_some_and(|d| d.is_ipv6());
    let record = catalog
        .on_port(port)
        .into_iter()
        .find(|r| r.ca.is_ipv6() == v6)
        .or_else(|| catalog.by_port(port));
    let ports = &host.tables.ports;
    let ifindex = ports
        .get(port)
        .map(|a| a.ifindex)
        .or_else(|| ports.orphans().find(|(p, _)| *p == port).map(|(_, i)| *i))
        .ok_or_else(|| {
            NvError::NotFound(format!("port '{port}' is not a VM port nv filters here"))
        })?;
    let mut lookups = vec![match &record {
        Some(r) => format!(
            "port {port} (ifindex {ifindex}): {} MAC {} {}",
            describe(r),
            r.mac,
            r.method
        ),
        None => format!("port {port} (ifindex {ifindex}): no record (still filtered)"),
    }];
    let frame = if let Some(hex) = &req.frame {
        from_hex(hex)?
    } else {
        let r = record.as_ref().ok_or_else(|| {
            invalid(format!(
                "port '{port}' has no record: give the frame whole (--pcap) to trace it"
            ))
        })?;
        let dst = req
            .dst
            .ok_or_else(|| invalid("--dst is needed: the destination CA"))?;
        if r.ca.is_ipv6() != v6 {
            return Err(invalid(format!(
                "port '{port}' has no {} record: it cannot send to {dst}",
                if v6 { "IPv6" } else { "IPv4" }
            )));
        }
        let src = req.src.unwrap_or(r.ca);
        let dst_mac = if let Some(router_mac) = routed(host, r.vsid, r.ca, dst, &mut lookups) {
            router_mac
        } else {
            lookups.push(record_line(host, r.vsid, dst, ""));
            let to = catalog.get(&(r.vsid, dst));
            to.map_or([2, 0, 0, 0, 0, 0], |d| d.mac.0)
        };
        customer_frame(
            (r.mac.0, dst_mac),
            src,
            dst,
            req.proto.unwrap_or_default(),
            (req.sport.unwrap_or(40_000), req.dport.unwrap_or(7)),
        )?
    };
    Ok(Built {
        frame,
        lookups,
        program: nv_common::program_names::FROM_VM,
        ifindex: Some(ifindex),
        at: port.to_owned(),
    })
}

/// For a VM of `vsid` at `own` sending to `dst` outside its subnet in a routed VSID: the
/// lines of the router's decision (the route that matched, the record it leads to, the hop's
/// rewrites), and the router's MAC to send to. `None`: not routed (same subnet, or no domain).
fn routed(
    host: &Host,
    vsid: u32,
    own: IpAddr,
    dst: IpAddr,
    lookups: &mut Vec<String>,
) -> Option<[u8; 6]> {
    let routes = host.tables.catalog.routes();
    let rdid = routes.domain_of(vsid)?;
    let subnet = routes.subnet_of(vsid, own);
    if subnet.is_some_and(|s| s.prefix.contains(dst) && s.gateway_addr() != Some(dst)) {
        return None;
    }
    let router_mac = *crate::datapath::router_mac();
    if let Some(gw) = routes.gateway_at(vsid, dst) {
        lookups.push(format!(
            "{dst} is the gateway of {} in routing domain {rdid}: the router answers (MAC {})",
            gw.route.prefix,
            crate::model::Mac(router_mac)
        ));
        return Some(router_mac);
    }
    let Some(route) = routes.best(rdid, dst) else {
        lookups.push(format!(
            "routing domain {rdid}: no route to {dst}: answered with ICMP net unreachable \
             from the gateway (drop_vm_no_route once the port's budget of answers is spent)"
        ));
        return Some(router_mac);
    };
    let target = if route.on_link() { dst } else { route.nexthop };
    lookups.push(format!(
        "routing domain {rdid}: route {} matched {dst}",
        crate::tables::routes::show(route)
    ));
    lookups.push(record_line(
        host,
        route.vsid,
        target,
        if route.on_link() { "" } else { " (next hop)" },
    ));
    let to = host.tables.catalog.get(&(route.vsid, target));
    lookups.push(format!(
        "hop: {} - 1, source MAC {} (the router), destination MAC {}, sent in VSID {}",
        if dst.is_ipv6() { "hop limit" } else { "TTL" },
        crate::model::Mac(router_mac),
        to.map_or_else(|| "unknown".to_owned(), |d| d.mac.to_string()),
        route.vsid
    ));
    Some(router_mac)
}

/// A frame arriving on the uplink from the host of `--src` for the VM `--dst` of `--vsid`:
/// NVGRE, or IP rewrite when the destination's record says so.
fn from_uplink(host: &Host, req: &Request) -> Result<Built> {
    let (program, ifindex) = if host.xdp {
        (nv_common::program_names::UPLINK_XDP, None)
    } else {
        (
            nv_common::program_names::UPLINK_TC,
            Some(host.uplink_ifindex),
        )
    };
    let built = |frame, lookups| Built {
        frame,
        lookups,
        program,
        ifindex,
        at: host.uplink.to_owned(),
    };
    if let Some(hex) = &req.frame {
        return Ok(built(from_hex(hex)?, Vec::new()));
    }
    let (Some(vsid), Some(src), Some(dst)) = (req.vsid, req.src, req.dst) else {
        return Err(invalid(
            "from the uplink, give --vsid, --src (a CA with a record: its PA and MAC make the \
             outer header) and --dst (a CA of a VM here)",
        ));
    };
    let catalog = &host.tables.catalog;
    let from = catalog
        .get(&(vsid, src))
        .ok_or_else(|| NvError::NotFound(format!("no lookup record for VSID {vsid} CA {src}")))?;
    let to = catalog.get(&(vsid, dst));
    let lookups = vec![
        record_line(host, vsid, src, " (source)"),
        record_line(host, vsid, dst, ""),
    ];
    // The destination's PA; with no record, a PA of this host of the source's family.
    let local_pa = match &to {
        Some(d) => d.pa,
        None => {
            catalog
                .providers()
                .iter()
                .find(|p| p.pa.addr.is_ipv4() == from.pa.is_ipv4())
                .ok_or_else(|| {
                    invalid(format!(
                        "this host has no provider address of {}'s family",
                        from.pa
                    ))
                })?
                .pa
                .addr
        }
    };
    let router = [2, 0, 0, 0, 0xfe, 0xfe];
    let proto = req.proto.unwrap_or_default();
    let ports = (req.sport.unwrap_or(40_000), req.dport.unwrap_or(7));
    let frame = if to.as_ref().is_some_and(|d| d.method == Method::Rewrite) {
        // IP rewrite: provider addresses on the wire, no header added.
        customer_frame((router, host.uplink_mac), from.pa, local_pa, proto, ports)?
    } else {
        let inner = customer_frame(
            (
                from.mac.0,
                to.as_ref().map_or([2, 0, 0, 0, 0, 0], |d| d.mac.0),
            ),
            src,
            dst,
            proto,
            ports,
        )?;
        nvgre_frame((router, host.uplink_mac), from.pa, local_pa, vsid, &inner)?
    };
    Ok(built(frame, lookups))
}

const XDP_PASS: u32 = 2;

/// A program's return code in words.
fn verdict(ret: u32, xdp: bool) -> &'static str {
    match (xdp, ret) {
        (false, 0) | (true, XDP_PASS) => "pass",
        (false, 2) | (true, 1) => "drop",
        (false, 7) | (true, 4) => "redirect",
        (true, 3) => "sent back (XDP_TX)",
        _ => "unexpected",
    }
}

fn port_name<S: std::hash::BuildHasher>(names: &HashMap<u32, String, S>, ifindex: u32) -> String {
    names
        .get(&ifindex)
        .cloned()
        .unwrap_or_else(|| format!("ifindex {ifindex}"))
}

/// What the run of `built` did (`counted`: the counters it moved; `names`: ports by ifindex).
pub fn outcome<S: std::hash::BuildHasher>(
    built: Built,
    run: &TestRunOutcome,
    counted: &[&str],
    names: &HashMap<u32, String, S>,
    req: &Request,
) -> Outcome {
    let xdp = built.program == nv_common::program_names::UPLINK_XDP;
    let mut out = Outcome {
        program: format!("{} on {}", built.program, built.at),
        input: decode(&built.frame),
        lookups: built.lookups,
        verdict: verdict(run.ret, xdp).into(),
        counter: (!counted.is_empty()).then(|| counted.join(", ")),
        ..Outcome::default()
    };
    let mut data = run.data.as_slice();
    if xdp
        && run.ret == XDP_PASS
        && let Some(head) = data.get(..16)
    {
        // XDP hands what it took to the uplink's TC program, with metadata in front naming
        // the VM port.
        let word = |i: usize| u32::from_ne_bytes(head[i..i + 4].try_into().unwrap_or_default());
        let meta = match word(0) {
            nv_common::DeliverMeta::MAGIC => 16,
            nv_common::DeliverMeta6::MAGIC => 20,
            nv_common::RestoreMeta::MAGIC => 32,
            _ => 0,
        };
        if meta > 0 {
            out.out_port = Some(port_name(names, word(4)));
            out.out_how = Some("delivered by nv_uplink_tc".into());
            data = data.get(meta..).unwrap_or_default();
        }
    }
    if let Some(r) = run.redirect {
        out.out_port = Some(port_name(names, r.ifindex));
        out.out_how = Some(
            match r.how {
                nv_common::RedirectTrace::PEER => "into the VM (redirect to the veth's peer)",
                nv_common::RedirectTrace::NEIGH => {
                    "to the underlay's next hop (redirect_neigh: the kernel writes the outer \
                     Ethernet addresses)"
                }
                _ => "out of the device (redirect to its egress)",
            }
            .into(),
        );
    }
    if out.verdict != "drop" {
        out.output = decode(data);
        out.output_frame = Some(to_hex(data));
    }
    out.why = why(&out, req);
    out
}

/// Why the trace ended as it did, in words.
fn why(out: &Outcome, req: &Request) -> String {
    let counter = out.counter.as_deref().unwrap_or_default();
    let reason = counter
        .split(", ")
        .find_map(|c| c.strip_prefix("drop_"))
        .unwrap_or_default();
    match out.verdict.as_str() {
        "drop" => {
            let detail = match reason {
                "vm_unknown_dst" => format!(
                    "no lookup record for the destination {} in the port's VSID",
                    req.dst.map_or_else(|| "?".into(), |d| d.to_string())
                ),
                "vm_unknown_port" => {
                    "the port has no record: every frame it sends is dropped".into()
                }
                "vm_spoofed_ip" => "the source address is not the port's customer address".into(),
                "vm_spoofed_mac" => "the source MAC is not the port's".into(),
                "uplink_spoofed_pa" => {
                    "the outer source is not the PA recorded for the inner source".into()
                }
                "uplink_vsid_not_hosted" => "no VM of this VSID runs here".into(),
                "uplink_unknown_dst" | "uplink_not_local" => {
                    "the destination is not a VM here".into()
                }
                "port_gone" => "the destination's port is gone (or being re-created)".into(),
                "port_down" => "the destination's port is down".into(),
                "vm_acl_denied" => "a rule of the sender's port ACL denies what it sends".into(),
                "acl_in_denied" => {
                    "a rule of the destination's port ACL denies what it receives".into()
                }
                _ => "see `nvctl stats` for the counter".into(),
            };
            format!("dropped as {reason}: {detail}")
        }
        "redirect" => format!(
            "forwarded ({counter}) to {}",
            out.out_port.as_deref().unwrap_or("?")
        ),
        _ if out.out_port.is_some() => format!(
            "taken by nv ({counter}) for {}",
            out.out_port.as_deref().unwrap_or("?")
        ),
        _ => "passed to the host's own stack: not tenant traffic".into(),
    }
}

/// A customer frame from `src` to `dst` (one family: an IPv4 source with an IPv6 destination
/// is refused).
pub fn customer_frame(
    macs: ([u8; 6], [u8; 6]),
    src: IpAddr,
    dst: IpAddr,
    proto: Proto,
    ports: (u16, u16),
) -> Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => {
            return Err(invalid(format!(
                "--src {src} and --dst {dst} are of different address families"
            )));
        }
    };
    let payload = [0u8; 32];
    let mut out = Vec::new();
    let written = match proto {
        Proto::Udp => {
            let b = ip.udp(ports.0, ports.1);
            out.reserve(b.size(payload.len()));
            b.write(&mut out, &payload)
        }
        Proto::Tcp => {
            let b = ip.tcp(ports.0, ports.1, 1, 64_240).syn();
            out.reserve(b.size(0));
            b.write(&mut out, &[])
        }
        Proto::Icmp if dst.is_ipv6() => {
            let b = ip.icmpv6_echo_request(ports.0, 1);
            out.reserve(b.size(payload.len()));
            b.write(&mut out, &payload)
        }
        Proto::Icmp => {
            let b = ip.icmpv4_echo_request(ports.0, 1);
            out.reserve(b.size(payload.len()));
            b.write(&mut out, &payload)
        }
    };
    written.map_err(|e| invalid(format!("cannot build the frame: {e}")))?;
    Ok(out)
}

/// `inner` in NVGRE from `src` to `dst` (provider addresses, IPv4 or IPv6 both), VSID `vsid`.
pub fn nvgre_frame(
    macs: ([u8; 6], [u8; 6]),
    src: IpAddr,
    dst: IpAddr,
    vsid: u32,
    inner: &[u8],
) -> Result<Vec<u8>> {
    let len = u16::try_from(8 + inner.len()).map_err(|_| invalid("the frame is too big"))?;
    let (ether_type, outer) = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut ip = Ipv4Header::new(len, 64, IpNumber::GRE, src.octets(), dst.octets())
                .map_err(|e| invalid(format!("cannot build the outer header: {e}")))?;
            ip.dont_fragment = true;
            ip.header_checksum = ip.calc_header_checksum();
            (EtherType::IPV4, ip.to_bytes().to_vec())
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let ip = Ipv6Header {
                payload_length: len,
                next_header: IpNumber::GRE,
                hop_limit: 64,
                source: src.octets(),
                destination: dst.octets(),
                ..Ipv6Header::default()
            };
            (EtherType::IPV6, ip.to_bytes().to_vec())
        }
        _ => {
            return Err(invalid(format!(
                "{src} and {dst} are of different families: no NVGRE header carries that"
            )));
        }
    };
    let mut out = Vec::with_capacity(62 + inner.len());
    out.extend_from_slice(
        &Ethernet2Header {
            source: macs.0,
            destination: macs.1,
            ether_type,
        }
        .to_bytes(),
    );
    out.extend_from_slice(&outer);
    out.extend_from_slice(&[0x20, 0x00, 0x65, 0x58]);
    out.extend_from_slice(&(vsid << 8).to_be_bytes());
    out.extend_from_slice(inner);
    Ok(out)
}

/// Parses a frame given as hex (spaces and colons allowed).
pub fn from_hex(text: &str) -> Result<Vec<u8>> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b':')
        .collect();
    if !digits.len().is_multiple_of(2) || digits.is_empty() {
        return Err(invalid("the frame is not whole bytes of hex"));
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| invalid("the frame is not hex"))
        })
        .collect()
}

/// The first frame of a classic pcap file (Ethernet link type), as `tcpdump -w` writes it.
pub fn first_pcap_frame(file: &[u8]) -> Result<Vec<u8>> {
    let word = |at: usize, swap: bool| -> Option<u32> {
        let b: [u8; 4] = file.get(at..at + 4)?.try_into().ok()?;
        Some(if swap {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let swap = match word(0, false) {
        Some(0xa1b2_c3d4 | 0xa1b2_3c4d) => false,
        Some(0xd4c3_b2a1 | 0x4d3c_b2a1) => true,
        Some(0x0a0d_0d0a) => {
            return Err(invalid(
                "the file is pcapng: save it as pcap (`tshark -r FILE -F pcap -w OUT`)",
            ));
        }
        _ => return Err(invalid("the file is not a pcap capture")),
    };
    if word(20, swap) != Some(1) {
        return Err(invalid(
            "the capture is not of Ethernet frames (link type 1)",
        ));
    }
    let len = word(24 + 8, swap).ok_or_else(|| invalid("the capture holds no packet"))?;
    let start = 24 + 16;
    file.get(start..start + len as usize)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| invalid("the capture's first packet is cut short"))
}

/// Hex of `bytes`, for `Request::frame`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
        s
    })
}

fn mac(m: [u8; 6]) -> String {
    crate::model::Mac(m).to_string()
}

/// A frame, layer by layer, as an independent reader (etherparse) sees it; NVGRE's inner frame
/// is decoded too.
pub fn decode(frame: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    decode_into(frame, &mut out, 0);
    out
}

fn decode_into(frame: &[u8], out: &mut Vec<String>, depth: u8) {
    let Ok((eth, rest)) = Ethernet2Header::from_slice(frame) else {
        out.push(format!("{} bytes, not an Ethernet frame", frame.len()));
        return;
    };
    out.push(format!(
        "Ethernet {} > {} type {:#06x}",
        mac(eth.source),
        mac(eth.destination),
        eth.ether_type.0
    ));
    if eth.ether_type == EtherType::ARP {
        if rest.len() >= 28 {
            let ip = |at: usize| Ipv4Addr::new(rest[at], rest[at + 1], rest[at + 2], rest[at + 3]);
            let op = if rest[7] == 1 { "request" } else { "reply" };
            out.push(format!(
                "ARP {op}: who has {} tell {} ({})",
                ip(24),
                ip(14),
                mac(rest[8..14].try_into().unwrap_or_default())
            ));
        }
        return;
    }
    if eth.ether_type == EtherType::IPV6 {
        decode_ipv6(rest, out, depth);
        return;
    }
    if eth.ether_type != EtherType::IPV4 {
        return;
    }
    let Ok((ip, payload)) = Ipv4Header::from_slice(rest) else {
        out.push("IPv4, malformed".into());
        return;
    };
    out.push(format!(
        "IPv4 {} > {} proto {} ttl {} dscp {} ecn {}{} len {}",
        Ipv4Addr::from(ip.source),
        Ipv4Addr::from(ip.destination),
        ip.protocol.0,
        ip.time_to_live,
        ip.dscp.value(),
        ip.ecn.value(),
        if ip.dont_fragment { " DF" } else { "" },
        ip.total_len
    ));
    match ip.protocol {
        IpNumber::UDP | IpNumber::TCP => transport(ip.protocol, payload, out),
        IpNumber::ICMP => {
            if let Ok((icmp, _)) = Icmpv4Header::from_slice(payload) {
                out.push(match icmp.icmp_type {
                    Icmpv4Type::EchoRequest(e) => format!("ICMP echo request id {}", e.id),
                    Icmpv4Type::EchoReply(e) => format!("ICMP echo reply id {}", e.id),
                    Icmpv4Type::DestinationUnreachable(d) => {
                        format!("ICMP destination unreachable: {d:?}")
                    }
                    other => format!("ICMP {other:?}"),
                });
            }
        }
        IpNumber::GRE => gre(payload, out, depth),
        _ => {}
    }
}

/// GRE after an outer IPv4 or IPv6 header: NVGRE's VSID and flow ID, and (once) the customer's
/// frame inside.
fn gre(payload: &[u8], out: &mut Vec<String>, depth: u8) {
    if payload.len() < 8 {
        return;
    }
    let flags = u16::from_be_bytes([payload[0], payload[1]]);
    let proto = u16::from_be_bytes([payload[2], payload[3]]);
    let key = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    if flags == 0x2000 && proto == 0x6558 {
        out.push(format!("NVGRE VSID {} flow {:#04x}", key >> 8, key & 0xff));
        if depth == 0 {
            decode_into(&payload[8..], out, depth + 1);
        }
    } else {
        out.push(format!("GRE flags {flags:#06x} proto {proto:#06x}"));
    }
}

/// UDP's or TCP's header, IPv4's and IPv6's alike.
fn transport(proto: IpNumber, payload: &[u8], out: &mut Vec<String>) {
    if proto == IpNumber::UDP {
        if let Ok((udp, _)) = UdpHeader::from_slice(payload) {
            out.push(format!(
                "UDP {} > {} len {}",
                udp.source_port, udp.destination_port, udp.length
            ));
        }
    } else if let Ok((tcp, _)) = TcpHeader::from_slice(payload) {
        let flags = [
            (tcp.syn, "S"),
            (tcp.ack, "A"),
            (tcp.fin, "F"),
            (tcp.rst, "R"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| *f)
        .collect::<String>();
        out.push(format!(
            "TCP {} > {} flags {flags}",
            tcp.source_port, tcp.destination_port
        ));
    }
}

/// An IPv6 packet: its header and what it carries (extension headers are named, not walked).
fn decode_ipv6(packet: &[u8], out: &mut Vec<String>, depth: u8) {
    let Ok((ip, payload)) = Ipv6Header::from_slice(packet) else {
        out.push("IPv6, malformed".into());
        return;
    };
    out.push(format!(
        "IPv6 {} > {} next {} hop limit {} len {}",
        Ipv6Addr::from(ip.source),
        Ipv6Addr::from(ip.destination),
        ip.next_header.0,
        ip.hop_limit,
        ip.payload_length
    ));
    match ip.next_header {
        IpNumber::UDP | IpNumber::TCP => transport(ip.next_header, payload, out),
        IpNumber::IPV6_ICMP => {
            if let Ok((icmp, _)) = Icmpv6Header::from_slice(payload) {
                out.push(format!("ICMPv6 {:?}", icmp.icmp_type));
            }
        }
        IpNumber::GRE => gre(payload, out, depth),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_built_here_decode_layer_by_layer() {
        let inner = customer_frame(
            ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            Proto::Udp,
            (40_000, 53),
        )
        .unwrap();
        let outer = nvgre_frame(
            ([2, 0, 0, 0, 9, 9], [2, 0, 0, 0, 8, 8]),
            IpAddr::from([198, 18, 0, 2]),
            IpAddr::from([198, 18, 0, 1]),
            5001,
            &inner,
        )
        .unwrap();
        // Over an IPv6 underlay, the same inside.
        let (a, b): (IpAddr, IpAddr) = ("2001:2::2".parse().unwrap(), "2001:2::1".parse().unwrap());
        let over6 = nvgre_frame(([2; 6], [4; 6]), a, b, 5001, &inner).unwrap();
        let layers6 = decode(&over6);
        assert!(
            layers6[1].starts_with("IPv6 2001:2::2 > 2001:2::1 next 47"),
            "{layers6:?}"
        );
        assert_eq!(layers6[2], "NVGRE VSID 5001 flow 0x00");
        assert!(layers6[4].starts_with("IPv4 10.0.0.1 > 10.0.0.2 proto 17"));
        assert!(
            nvgre_frame(
                ([2; 6], [4; 6]),
                a,
                IpAddr::from([198, 18, 0, 1]),
                5001,
                &inner
            )
            .is_err()
        );
        let layers = decode(&outer);
        assert_eq!(layers.len(), 6, "{layers:?}");
        assert!(layers[1].starts_with("IPv4 198.18.0.2 > 198.18.0.1 proto 47"));
        assert_eq!(layers[2], "NVGRE VSID 5001 flow 0x00");
        assert!(layers[4].starts_with("IPv4 10.0.0.1 > 10.0.0.2 proto 17"));
        assert_eq!(layers[5], "UDP 40000 > 53 len 40");
        assert_eq!(from_hex(&to_hex(&outer)).unwrap(), outer);
        assert!(from_hex("0g").is_err());
        let tcp = customer_frame(
            ([2; 6], [4; 6]),
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            Proto::Tcp,
            (1, 80),
        )
        .unwrap();
        assert_eq!(decode(&tcp)[2], "TCP 1 > 80 flags S");
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let ping6 = customer_frame(
            ([2; 6], [4; 6]),
            v6,
            "fd00::2".parse().unwrap(),
            Proto::Icmp,
            (7, 0),
        )
        .unwrap();
        let layers = decode(&ping6);
        assert!(
            layers[1].starts_with("IPv6 fd00::1 > fd00::2 next 58 hop limit 64"),
            "{layers:?}"
        );
        assert!(layers[2].starts_with("ICMPv6 EchoRequest"), "{layers:?}");
        let mixed = customer_frame(
            ([2; 6], [4; 6]),
            v6,
            IpAddr::from([10, 0, 0, 2]),
            Proto::Udp,
            (1, 2),
        );
        assert!(
            mixed
                .unwrap_err()
                .to_string()
                .contains("different address families")
        );
    }
}
