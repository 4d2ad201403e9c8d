//! Fuzzing the datapath with `BPF_PROG_TEST_RUN`: random and mutated frames (valid NVGRE, ARP,
//! IPv4 TCP/UDP and IP-rewrite packets as seeds) through every program, against the maps of
//! `fixture::host`, with two properties checked on every frame:
//! - no verdict outside the program's contract (never `XDP_ABORTED`), and every drop counted
//!   under a reason (the drop counters grow by exactly the number of drops);
//! - every frame that comes out goes to the port of the VSID and CA it belongs to, and to no
//!   other: NVGRE only to the VM whose (VSID, CA) the key and inner destination name, a VM's frame
//!   only inside its own VSID. On TC paths the port is the one the program redirected to, as
//!   the tracing copy of the programs records it ([`RedirectTrace`]), and how it was redirected
//!   (into a veth's peer, out of the uplink, back out of the sending VM's own port).
use std::{collections::HashMap, mem::size_of};

use anyhow::{bail, ensure};
use nv_common::{
    DatapathConfig, DeliverMeta, LookupKey, RedirectTrace, RestoreMeta,
    program_names::{FROM_BOUNCE, FROM_VM, UPLINK_TC, UPLINK_XDP},
};

use crate::fixture::{
    BLUE1_MAC, BLUE2_MAC, CA1, CA2, CA3, GATEWAY_MAC, GREEN_GATEWAY_MAC, GREEN1_MAC, GREEN1_PA,
    GREEN2_MAC, GREEN2_PA, Host, LOCAL_PA, RED, RED1_MAC, RED2_MAC, RED3_MAC, REMOTE_PA, arp_frame,
    green_packets, host, nvgre, udp_frame,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// xorshift64*: deterministic, so a failure names the seed that reproduces it.
struct Rng(u64);

impl Rng {
    /// splitmix64 of the seed: every seed its own stream, never the all-zero state.
    fn of_seed(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        #[expect(clippy::cast_possible_truncation, reason = "modulo a usize")]
        let r = (self.next() % n as u64) as usize;
        r
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

fn seeds(h: &Host) -> Vec<Vec<u8>> {
    let to_red1 = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"seed payload");
    let mut seeds = vec![
        udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"seed payload"),
        // Too big for the uplink once encapsulated: answered with ICMP fragmentation needed.
        udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[0x5a; 1472]),
        udp_frame(RED1_MAC, RED3_MAC, CA1, CA3, b"seed"),
        udp_frame(BLUE1_MAC, BLUE2_MAC, CA1, CA2, b"seed"),
        nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            (RED << 8) | 3,
            0,
            &to_red1,
        ),
        nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            6001 << 8,
            0,
            &udp_frame(BLUE2_MAC, BLUE1_MAC, CA2, CA1, b"s"),
        ),
        udp_frame(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            b"host traffic",
        ),
    ];
    seeds.push(arp_frame(RED1_MAC, 1, RED1_MAC, CA1, CA2));
    // The underlay asking for a rewrite PA the datapath owns, and for the host's own.
    seeds.push(arp_frame(GATEWAY_MAC, 1, GATEWAY_MAC, REMOTE_PA, GREEN1_PA));
    seeds.push(arp_frame(GATEWAY_MAC, 1, GATEWAY_MAC, REMOTE_PA, LOCAL_PA));
    seeds.extend(
        green_packets(GREEN1_MAC, GREEN2_MAC, CA1, CA2)
            .into_iter()
            .map(|(_, f)| f),
    );
    seeds.extend(
        green_packets(GREEN_GATEWAY_MAC, h.uplink_mac, GREEN2_PA, GREEN1_PA)
            .into_iter()
            .map(|(_, f)| f),
    );
    seeds
}

/// Header offsets worth aiming at: Ethernet type, IPv4 version/IHL, protocol, addresses, GRE
/// flags, protocol and key, inner Ethernet type and addresses.
const HOT: [usize; 14] = [
    12,
    13,
    14,
    23,
    26,
    30,
    34,
    35,
    36,
    38,
    41,
    54,
    56 + 12,
    56 + 16,
];

/// `BPF_PROG_TEST_RUN` itself refuses frames shorter than Ethernet, or than the IPv4/IPv6
/// header their type announces; such frames are padded with random bytes (the programs still
/// meet every truncation beyond those headers).
fn runnable(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    while f.len() < 14 {
        f.push(rng.byte());
    }
    let need = match f.get(12..14) {
        Some([0x08, 0x00]) => 34,
        Some([0x86, 0xdd]) => 54,
        _ => 14,
    };
    while f.len() < need {
        f.push(rng.byte());
    }
    f
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut f = seed.to_vec();
    match rng.below(6) {
        0 => {
            // Entirely random.
            let len = 14 + rng.below(200);
            f = (0..len).map(|_| rng.byte()).collect();
        }
        1 => {
            let cut = rng.below(f.len().max(1));
            f.truncate(cut.max(1));
        }
        2 => {
            let extra = rng.below(64);
            f.extend((0..extra).map(|_| rng.byte()));
        }
        _ => {
            for _ in 0..=rng.below(4) {
                let at = if rng.below(2) == 0 {
                    HOT[rng.below(HOT.len())]
                } else {
                    rng.below(f.len().max(1))
                };
                if at < f.len() {
                    f[at] = rng.byte();
                }
            }
        }
    }
    f
}

/// Where each (VSID, CA) of the fixture lives: its port ifindex (0 when remote).
/// The PA and MAC each record says its CA sends from: what NVGRE delivered for it must carry.
fn sources_by_record(h: &Host) -> HashMap<LookupKey, ([u8; 4], [u8; 6])> {
    h.desired
        .lookups
        .iter()
        .map(|(k, v)| (*k, (nv_common::mapped_v4(&v.pa).unwrap_or_default(), v.mac)))
        .collect()
}

/// A delivered NVGRE frame speaks for its inner source only as its record allows: from the
/// PA and with the MAC recorded for (VSID, inner source CA).
fn check_nvgre_source(
    sources: &HashMap<LookupKey, ([u8; 4], [u8; 6])>,
    input: &[u8],
    vsid: u32,
    inner: &[u8],
) -> anyhow::Result<()> {
    let (outer_src, _) = ipv4(input, 14).ok_or_else(|| anyhow::anyhow!("no outer IPv4"))?;
    let (inner_src, _) = ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("no inner IPv4"))?;
    let recorded = sources.get(&LookupKey {
        vsid,
        ca: inner_src,
    });
    ensure!(
        recorded.is_some_and(|(pa, mac)| *pa == outer_src && inner.get(6..12) == Some(&mac[..])),
        "delivered VSID {vsid} from {inner_src:?} via {outer_src:?}, its record says {recorded:?}"
    );
    Ok(())
}

fn ports_by_record(h: &Host) -> HashMap<LookupKey, u32> {
    h.desired
        .lookups
        .iter()
        .map(|(k, v)| (*k, v.ifindex))
        .collect()
}

fn ipv4(frame: &[u8], at: usize) -> Option<([u8; 4], [u8; 4])> {
    let ip = frame.get(at..at + 20)?;
    Some((ip[12..16].try_into().ok()?, ip[16..20].try_into().ok()?))
}

/// The VSID and inner frame of an NVGRE input, as the fuzzer's own reading of RFC 7637.
fn nvgre_parts(frame: &[u8]) -> Option<(u32, &[u8])> {
    let ihl = usize::from(*frame.get(14)? & 0x0f) * 4;
    let gre = 14 + ihl;
    let key = u32::from_be_bytes(frame.get(gre + 4..gre + 8)?.try_into().ok()?);
    Some((key >> 8, frame.get(gre + 8..)?))
}

fn drops(h: &Host) -> anyhow::Result<u64> {
    Ok(h.dp
        .counters()?
        .iter()
        .filter(|(c, _)| c.name().starts_with("drop_"))
        .map(|(_, n)| n)
        .sum())
}

/// Checks the properties of one uplink run; `input` went in, `out`/`ret` came out.
/// What the records say: the port of each CA here, and where each CA sends from.
struct Known {
    ports: HashMap<LookupKey, u32>,
    sources: HashMap<LookupKey, ([u8; 4], [u8; 6])>,
    uplink: u32,
    uplink_mac: [u8; 6],
    /// The provider addresses the datapath owns (answers ARP for).
    owned: Vec<[u8; 4]>,
}

impl Known {
    fn of(h: &Host) -> anyhow::Result<Known> {
        Ok(Known {
            ports: ports_by_record(h),
            sources: sources_by_record(h),
            uplink: h.ns.ifindex("uplink0")?,
            uplink_mac: h.uplink_mac,
            owned: h
                .desired
                .local_pas
                .iter()
                .filter(|(_, v)| v.is_owned())
                .map(|(pa, _)| *pa)
                .collect(),
        })
    }
}

/// The fixture's VM ports are veths: delivery into one is a redirect to its peer.
fn into_vm(port: u32) -> RedirectTrace {
    RedirectTrace {
        ifindex: port,
        how: RedirectTrace::PEER,
    }
}

/// Back out of the port a frame came in on: the VM's receive.
fn back_to(port: u32) -> RedirectTrace {
    RedirectTrace {
        ifindex: port,
        how: RedirectTrace::EGRESS,
    }
}

fn ensure_to_uplink(known: &Known, redirect: Option<RedirectTrace>) -> anyhow::Result<()> {
    ensure!(
        redirect.is_some_and(|r| r.ifindex == known.uplink
            && [RedirectTrace::EGRESS, RedirectTrace::NEIGH].contains(&r.how)),
        "underlay frame redirected as {redirect:?}, not out of the uplink {}",
        known.uplink
    );
    Ok(())
}

#[expect(
    clippy::too_many_arguments,
    reason = "one run's input, verdict and output"
)]
fn check_uplink(
    known: &Known,
    hook: &str,
    input: &[u8],
    ret: u32,
    out: &[u8],
    redirect: Option<RedirectTrace>,
    drop: u32,
    pass: u32,
) -> anyhow::Result<()> {
    if ret == drop {
        return Ok(());
    }
    let (records, sources) = (&known.ports, &known.sources);
    if hook == UPLINK_TC && ret == TC_ACT_REDIRECT && input.get(12..14) == Some(&[8, 6][..]) {
        return check_arp_answer(known, input, out, redirect);
    }
    let redirected = hook == UPLINK_TC && ret == TC_ACT_REDIRECT;
    ensure!(ret == pass || redirected, "{hook}: verdict {ret}");
    let meta_len = size_of::<DeliverMeta>();
    if hook == UPLINK_XDP
        && out.len() >= meta_len
        && u32::from_ne_bytes(out[..4].try_into()?) == DeliverMeta::MAGIC
    {
        let port = u32::from_ne_bytes(out[4..8].try_into()?);
        let (vsid, inner) = nvgre_parts(input)
            .ok_or_else(|| anyhow::anyhow!("delivered a frame that is not NVGRE"))?;
        ensure!(
            out[meta_len..] == *inner,
            "decapsulated frame differs from the inner frame"
        );
        let (_, meta_dst) =
            ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("delivered a frame without IPv4"))?;
        ensure!(
            u32::from_ne_bytes(out[8..12].try_into()?) == vsid && out[12..16] == meta_dst,
            "delivery metadata names another VM than the inner frame's"
        );
        let (_, dst) =
            ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("delivered a frame without IPv4"))?;
        let owner = records.get(&LookupKey { vsid, ca: dst });
        ensure!(
            owner == Some(&port) && port != 0,
            "VSID {vsid} {dst:?} delivered to port {port}, its record says {owner:?}"
        );
        return check_nvgre_source(sources, input, vsid, inner);
    }
    if hook == UPLINK_XDP
        && out.len() >= 28
        && u32::from_ne_bytes(out[..4].try_into()?) == RestoreMeta::MAGIC
    {
        let port = u32::from_ne_bytes(out[4..8].try_into()?);
        let (_, dst_pa) = ipv4(input, 14).ok_or_else(|| anyhow::anyhow!("restore without IPv4"))?;
        ensure!(
            dst_pa == GREEN1_PA && port != 0,
            "rewrite delivered for {dst_pa:?} to {port}"
        );
        return Ok(());
    }
    if redirected {
        // TC decapsulated or restored it: what remains is a customer frame for a VM here.
        if input.get(23) == Some(&47)
            && let Some((vsid, inner)) = nvgre_parts(input)
            && out == inner
        {
            let (_, dst) =
                ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("delivered a frame without IPv4"))?;
            let owner = records.get(&LookupKey { vsid, ca: dst }).copied();
            ensure!(
                owner.is_some_and(|p| p != 0),
                "TC delivered VSID {vsid} {dst:?}, which is no VM here"
            );
            ensure!(
                redirect == owner.map(into_vm),
                "TC delivered VSID {vsid} {dst:?} as {redirect:?}, its record says port {owner:?}"
            );
            check_nvgre_source(sources, input, vsid, inner)?;
        } else {
            // A restored IP-rewrite packet: GREEN-1 is the only rewrite VM here.
            let (_, dst) =
                ipv4(out, 14).ok_or_else(|| anyhow::anyhow!("redirected a frame without IPv4"))?;
            ensure!(
                dst == CA1 && out.get(0..6) == Some(&GREEN1_MAC[..]),
                "restored packet for {dst:?} to {:02x?}",
                out.get(0..6)
            );
            let green1 = records
                .get(&LookupKey {
                    vsid: 7001,
                    ca: CA1,
                })
                .copied();
            ensure!(
                redirect == green1.map(into_vm),
                "restored packet for GREEN-1 (port {green1:?}) redirected as {redirect:?}"
            );
        }
        return Ok(());
    }
    // Passed: untouched, and nowhere else.
    ensure!(out == input, "{hook} passed a modified frame");
    ensure!(
        redirect.is_none(),
        "{hook} passed a frame it redirected: {redirect:?}"
    );
    Ok(())
}

/// What the uplink sent back: only the answer to an ARP request for a rewrite PA the datapath
/// owns, from the uplink's MAC, out of the uplink.
fn check_arp_answer(
    known: &Known,
    input: &[u8],
    out: &[u8],
    redirect: Option<RedirectTrace>,
) -> anyhow::Result<()> {
    ensure!(
        input.len() >= 42 && input[12..14] == [8, 6] && input[20..22] == [0, 1],
        "sent back a frame that is no ARP request: {input:02x?}"
    );
    let asked: [u8; 4] = input[38..42].try_into()?;
    ensure!(
        known.owned.contains(&asked),
        "answered ARP for {asked:?}, no PA the datapath owns"
    );
    // To the sender hardware address, as Linux answers.
    let mut reply = input[22..28].to_vec();
    reply.extend_from_slice(&known.uplink_mac);
    reply.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&known.uplink_mac);
    reply.extend_from_slice(&asked);
    reply.extend_from_slice(&input[22..28]);
    reply.extend_from_slice(&input[28..32]);
    ensure!(
        out.get(..42) == Some(&reply[..]) && out.get(42..) == input.get(42..),
        "answered ARP with {out:02x?}"
    );
    ensure_to_uplink(known, redirect)
}

/// One run of a program that takes what a VM sends: on `port`, the port of (`vsid`, `mac`),
/// `input` in, verdict `ret`, `out` out, redirected as `redirect`.
#[derive(Clone, Copy)]
struct VmRun<'a> {
    port: u32,
    vsid: u32,
    mac: [u8; 6],
    input: &'a [u8],
    ret: u32,
    out: &'a [u8],
    redirect: Option<RedirectTrace>,
}

/// What left for the underlay as NVGRE: exactly the VM's frame of VSID `vsid`, to a CA of that
/// VSID, out of the uplink.
fn check_nvgre_out(
    known: &Known,
    vsid: u32,
    input: &[u8],
    out: &[u8],
    redirect: Option<RedirectTrace>,
) -> anyhow::Result<()> {
    let (key_vsid, inner) = nvgre_parts(out).ok_or_else(|| anyhow::anyhow!("bad NVGRE out"))?;
    ensure!(
        key_vsid == vsid,
        "port of VSID {vsid} encapsulated into VSID {key_vsid}"
    );
    ensure!(inner == input, "inner frame differs from what the VM sent");
    let (_, dst) = ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("no inner IPv4"))?;
    ensure!(
        known.ports.contains_key(&LookupKey { vsid, ca: dst }),
        "sent to {dst:?}, no CA of VSID {vsid}"
    );
    ensure_to_uplink(known, redirect)
}

/// Checks a from-VM run on `port`, the port of (`vsid`, `mac`).
fn check_from_vm(known: &Known, run: &VmRun) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        mac,
        input,
        ret,
        out,
        redirect,
    } = *run;
    let records = &known.ports;
    match ret {
        TC_ACT_SHOT => return Ok(()),
        TC_ACT_REDIRECT => {}
        other => bail!("from-VM verdict {other}"),
    }
    ensure!(
        input.get(6..12) == Some(&mac[..]),
        "a frame with another source MAC got through"
    );
    if out.get(12..14) == Some(&[0x08, 0x06]) {
        // An ARP reply back to the VM, about an address of its own VSID.
        ensure!(
            out.get(0..6) == Some(&mac[..]),
            "ARP reply not addressed to the asking VM"
        );
        let spa: [u8; 4] = out
            .get(28..32)
            .ok_or_else(|| anyhow::anyhow!("short ARP"))?
            .try_into()?;
        ensure!(
            records.contains_key(&LookupKey { vsid, ca: spa }),
            "ARP answered for {spa:?} outside VSID {vsid}"
        );
        ensure!(
            redirect == Some(back_to(port)),
            "ARP reply to port {port} redirected as {redirect:?}"
        );
        return Ok(());
    }
    // NVGRE grows the frame by exactly its 42 bytes (a rewritten frame keeps its size, even
    // when the customer's own protocol is GRE).
    if out.len() == input.len() + 42 && out.get(23) == Some(&47) {
        return check_nvgre_out(known, vsid, input, out, redirect);
    }
    let (src, dst) =
        ipv4(out, 14).ok_or_else(|| anyhow::anyhow!("redirected a frame without IPv4"))?;
    // ICMP "fragmentation needed" back to the VM: from an address of its VSID, to the address
    // it sent from, quoting what it sent.
    if out.get(23) == Some(&1) && out.get(34..36) == Some(&[3, 4]) && out.len() == 14 + 96 {
        let (sent_from, sent_to) =
            ipv4(input, 14).ok_or_else(|| anyhow::anyhow!("answered a frame without IPv4"))?;
        ensure!(
            out.get(0..6) == Some(&mac[..]),
            "ICMP answer not addressed to the sending VM"
        );
        ensure!(
            src == sent_to && dst == sent_from,
            "ICMP answer {src:?} -> {dst:?} for {sent_from:?} -> {sent_to:?}"
        );
        ensure!(
            records.contains_key(&LookupKey { vsid, ca: src }),
            "ICMP answer from {src:?}, no CA of VSID {vsid}"
        );
        ensure!(
            out.get(42..) == input.get(14..14 + 68),
            "ICMP answer does not quote what the VM sent"
        );
        ensure!(
            redirect == Some(back_to(port)),
            "ICMP answer to port {port} redirected as {redirect:?}"
        );
        return Ok(());
    }
    if out == input {
        let owner = records.get(&LookupKey { vsid, ca: dst }).copied();
        ensure!(
            owner.is_some_and(|p| p != 0),
            "delivered locally to {dst:?}, no VM of VSID {vsid} here"
        );
        ensure!(
            redirect == owner.map(into_vm),
            "delivered locally to {dst:?} as {redirect:?}, its record says port {owner:?}"
        );
        Ok(())
    } else {
        // IP rewrite: only GREEN's dedicated PAs may appear.
        ensure!(
            src == GREEN1_PA && dst == GREEN2_PA && vsid == 7001,
            "rewrite from VSID {vsid}: {src:?} -> {dst:?}"
        );
        ensure_to_uplink(known, redirect)
    }
}

/// Checks a run of the bounce program on a segment marked with `port`, the port of (`vsid`,
/// `mac`) (`port` 0: unmarked, as the host's own frames on the bounce pair are): it may only
/// drop, or send NVGRE of that VSID out of the uplink; never answer, deliver or rewrite.
fn check_bounced(known: &Known, run: &VmRun) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        mac,
        input,
        ret,
        out,
        redirect,
    } = *run;
    match ret {
        TC_ACT_SHOT => return Ok(()),
        TC_ACT_REDIRECT => {}
        other => bail!("bounce verdict {other}"),
    }
    ensure!(port != 0, "an unmarked frame left the bounce program");
    ensure!(
        input.get(6..12) == Some(&mac[..]),
        "a bounced frame with another source MAC got through"
    );
    ensure!(
        out.len() == input.len() + 42 && out.get(23) == Some(&47),
        "the bounce program sent something other than NVGRE"
    );
    check_nvgre_out(known, vsid, input, out, redirect)
}

/// What a fuzzing run saw: every category must be non-empty for the properties to mean much.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub runs: u64,
    pub dropped: u64,
    /// Segments the bounce program encapsulated.
    pub bounced: u64,
    /// Redirected by TC, or passed up by XDP with metadata for a VM.
    pub delivered: u64,
    /// Passed to the host untouched.
    pub passed: u64,
}

/// Runs `frames` random and mutated frames from `seed` through every program.
pub fn run(frames: u64, seed: u64) -> anyhow::Result<Stats> {
    std::thread::spawn(move || fuzz(frames, seed))
        .join()
        .map_err(|_| anyhow::anyhow!("fuzzer panicked"))?
}

fn fuzz(frames: u64, seed: u64) -> anyhow::Result<Stats> {
    let mut h = host(true)?;
    let known = Known::of(&h)?;
    let ports = [
        (h.red1, RED, RED1_MAC),
        (h.blue1, 6001, BLUE1_MAC),
        (h.green1, 7001, GREEN1_MAC),
    ];
    let seeds = seeds(&h);
    let mut rng = Rng::of_seed(seed);
    let mut stats = Stats::default();
    for (phase, flags) in [0, DatapathConfig::TC_DECAP].into_iter().enumerate() {
        h.set_flags(flags)?;
        let before = drops(&h)?;
        let mut dropped = 0u64;
        for i in 0..frames / 2 {
            let pick = rng.below(seeds.len());
            let mutated = mutate(&mut rng, &seeds[pick]);
            let frame = runnable(&mut rng, mutated);
            let why = |e: anyhow::Error| {
                e.context(format!(
                    "seed {seed}, phase {phase}, frame {i}: {frame:02x?}"
                ))
            };
            let (port, vsid, mac) = ports[rng.below(ports.len())];
            let out =
                h.dp.test_run(FROM_VM, &frame, Some(port), 1)
                    .map_err(|e| why(e.into()))?;
            let run = VmRun {
                port,
                vsid,
                mac,
                input: &frame,
                ret: out.ret,
                out: &out.data,
                redirect: out.redirect,
            };
            check_from_vm(&known, &run).map_err(why)?;
            dropped += u64::from(out.ret == TC_ACT_SHOT);
            stats.delivered += u64::from(out.ret == TC_ACT_REDIRECT);
            // The same frame as a segment back from the bounce pair: marked with its port, or
            // (one in eight) unmarked.
            let mark = if rng.below(8) == 0 { 0 } else { port };
            let out =
                h.dp.test_run_marked(FROM_BOUNCE, &frame, Some(known.uplink), mark, 1)
                    .map_err(|e| why(e.into()))?;
            let run = VmRun {
                port: mark,
                vsid,
                mac,
                input: &frame,
                ret: out.ret,
                out: &out.data,
                redirect: out.redirect,
            };
            check_bounced(&known, &run).map_err(why)?;
            dropped += u64::from(out.ret == TC_ACT_SHOT);
            stats.bounced += u64::from(out.ret == TC_ACT_REDIRECT);
            let (hook, drop, pass) = if phase == 0 {
                (UPLINK_XDP, XDP_DROP, XDP_PASS)
            } else {
                (UPLINK_TC, TC_ACT_SHOT, TC_ACT_OK)
            };
            let out =
                h.dp.test_run(hook, &frame, None, 1)
                    .map_err(|e| why(e.into()))?;
            check_uplink(
                &known,
                hook,
                &frame,
                out.ret,
                &out.data,
                out.redirect,
                drop,
                pass,
            )
            .map_err(why)?;
            dropped += u64::from(out.ret == drop);
            let meta = out.data.len() >= 4
                && [DeliverMeta::MAGIC, RestoreMeta::MAGIC]
                    .contains(&u32::from_ne_bytes(out.data[..4].try_into()?));
            if out.ret == TC_ACT_REDIRECT || (out.ret == XDP_PASS && hook == UPLINK_XDP && meta) {
                stats.delivered += 1;
            } else if out.ret == pass {
                stats.passed += 1;
            }
            stats.runs += 3;
        }
        let counted = drops(&h)? - before;
        ensure!(
            counted == dropped,
            "phase {phase}: {dropped} drops but {counted} counted under a reason"
        );
        stats.dropped += dropped;
    }
    Ok(stats)
}
