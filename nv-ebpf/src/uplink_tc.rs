//! TC ingress on the uplink. With XDP decapsulation (the default), frames `uplink_xdp` prepared
//! carry metadata naming their VM port: NVGRE frames arrive decapsulated and go straight into the
//! VM's namespace; IP-rewrite packets get their customer addresses and Ethernet header back first
//! (checksum helpers live here, not in XDP). With TC decapsulation (`decap_hook = "tc"`), this
//! program classifies and decapsulates itself: no XDP program on the uplink means a veth uplink
//! keeps GSO super-packets whole. `XDP_REDIRECT` into a veth whose peer has no XDP program loses
//! frames (DESIGN.md); delivery from here (`deliver`) does not. Other frames pass untouched.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use nv_common::{
    Counter, DatapathConfig, DeliverMeta, DeliverMeta6, RestoreMeta, RewritePa,
    VsidStatsKey as Stats,
    wire::{ETH_HLEN, ETH_P_ARP, IPPROTO_UDP},
};

use crate::{
    counters::count,
    deliver,
    maps::CONFIG,
    monitor,
    packet::{Ipv4Hdr, pull, read_at, view_at, write_at},
    rewrite,
    uplink_rx::{Verdict, classify},
};

/// Linear bytes needed to classify: outer Ethernet with two VLAN tags, IPv4 with options, GRE,
/// inner Ethernet, an inner IPv6 header and the first word after it.
const PULL_LEN: u32 = (ETH_HLEN + 8 + 60 + 8 + ETH_HLEN + 40 + 4) as u32;

pub fn run(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let meta_start = unsafe { (*ctx.skb.skb).data_meta } as usize;
    // SAFETY: as above.
    let tagged = unsafe { (*ctx.skb.skb).vlan_present } != 0;
    let mut classify_again = false;
    if let Some(head) = read_at::<DeliverMeta>(meta_start, ctx.data(), 0) {
        // XDP classified the frame without the tag the NIC took out of it.
        if tagged
            && (head.magic == DeliverMeta::MAGIC
                || head.magic == DeliverMeta6::MAGIC
                || head.magic == DeliverMeta::CLASSIFY
                || head.magic == RestoreMeta::MAGIC)
        {
            return drop(ctx, Counter::DropUplinkVlan);
        }
        match head.magic {
            DeliverMeta::MAGIC => return deliver(ctx, &head, Counter::UplinkDelivered),
            DeliverMeta6::MAGIC => {
                return match read_at::<DeliverMeta6>(meta_start, ctx.data(), 0) {
                    Some(meta) => deliver6(ctx, &meta),
                    None => drop(ctx, Counter::DropUplinkDecapFailed),
                };
            }
            RestoreMeta::MAGIC => {
                return match read_at::<RestoreMeta>(meta_start, ctx.data(), 0) {
                    Some(meta) => restore_and_deliver(ctx, &meta),
                    None => TC_ACT_OK,
                };
            }
            DeliverMeta::CLASSIFY => classify_again = true,
            _ => {}
        }
    }
    let Some(config) = CONFIG.get(0) else {
        return TC_ACT_OK;
    };
    // With XDP decapsulation, XDP classified every frame but those whose tag the kernel (or
    // the NIC) moved out of it, and left ARP to be answered here.
    if config.flags & DatapathConfig::TC_DECAP == 0
        && !tagged
        && !classify_again
        && read_at::<[u8; 2]>(ctx.data(), ctx.data_end(), 12) != Some(ETH_P_ARP.to_be_bytes())
    {
        return TC_ACT_OK;
    }
    pull(ctx, PULL_LEN);
    match classify(config, ctx.data(), ctx.data_end(), tagged) {
        Ok(Verdict::Pass) => TC_ACT_OK,
        Ok(Verdict::ArpRequest) => {
            if !crate::uplink_arp::make_reply(ctx.data(), ctx.data_end(), config.uplink_mac) {
                return TC_ACT_OK;
            }
            count(Counter::UplinkArpReplied);
            crate::redirect::egress(config.uplink_ifindex)
        }
        Ok(Verdict::Nvgre {
            strip,
            port,
            vsid,
            ca,
            mac,
            v6,
            ..
        }) => match decap(ctx, strip, v6) {
            Ok(()) if v6 => {
                count(Counter::UplinkDecap);
                let to = DeliverMeta6 {
                    magic: DeliverMeta6::MAGIC,
                    ifindex: port,
                    vsid,
                    mac,
                    _pad: [0; 2],
                };
                deliver6(ctx, &to)
            }
            Ok(()) => {
                count(Counter::UplinkDecap);
                let to = DeliverMeta {
                    magic: DeliverMeta::MAGIC,
                    ifindex: port,
                    vsid,
                    ca,
                };
                deliver(ctx, &to, Counter::UplinkDelivered)
            }
            Err(()) => drop(ctx, Counter::DropUplinkDecapFailed),
        },
        Ok(Verdict::Rewrite(meta)) => restore_and_deliver(ctx, &meta),
        Ok(Verdict::Rewrite6 { from, to }) => restore6_and_deliver(ctx, from, to),
        Ok(Verdict::NdRequest) => match answer_solicitation(ctx, config.uplink_mac) {
            ANSWERED => {
                count(Counter::UplinkNdReplied);
                // From an owned PA: the uplink's egress lets it by its mark alone.
                ctx.set_mark(crate::uplink_egress::SENT_MARK);
                crate::redirect::egress(config.uplink_ifindex)
            }
            reason => drop(
                ctx,
                crate::counters::numbered(reason, Counter::DropUplinkMalformed),
            ),
        },
        Err(reason) => drop(ctx, reason),
    }
}

fn drop(ctx: &TcContext, reason: Counter) -> i32 {
    monitor::drop_on_uplink(ctx, reason, 0)
}

/// Removes the outer Ethernet, IPv4 and GRE headers: the bytes after the first 14 go (outer
/// IPv4, GRE and the inner Ethernet header), then the inner Ethernet header is written where
/// the outer one was. GSO super-packets stay whole; their segment size grows back by the 42
/// bytes the encapsulator took.
fn decap(ctx: &TcContext, strip: usize, v6: bool) -> Result<(), ()> {
    let inner_eth: [u8; ETH_HLEN] = read_at(ctx.data(), ctx.data_end(), strip).ok_or(())?;
    // The protocol field of the inner IPv4 header, or the next header of the inner IPv6 one.
    let proto_at = strip + ETH_HLEN + if v6 { 6 } else { 9 };
    let inner_proto: u8 = read_at(ctx.data(), ctx.data_end(), proto_at).ok_or(())?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "< 100"
    )]
    let shrink = -(strip as i32);
    // A UDP GSO packet's gso_size is its datagrams' size: kept as it is (the kernel refuses to
    // shrink the packet otherwise). A TCP one's segments grow back by what encapsulation took.
    // SAFETY: the context pointer is valid for the whole program run.
    let udp_gso = unsafe { (*ctx.skb.skb).gso_size } != 0 && inner_proto == IPPROTO_UDP;
    let mut flags = if udp_gso {
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO)
    } else {
        0
    };
    // The skb still names the outer header's family; a redirect to a veth peer does not look
    // again, so the VM's input of that family would get the inner packet and discard it.
    flags |= u64::from(if v6 {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6
    } else {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4
    });
    ctx.adjust_room(shrink, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| ())?;
    if write_at(ctx.data(), ctx.data_end(), 0, inner_eth) {
        Ok(())
    } else {
        Err(())
    }
}

/// Restores an IPv6 rewrite packet from the VM of `from` and hands it to the VM of `to`.
// Out of line: its own stack frame, apart from the classifier's.
#[inline(never)]
fn restore6_and_deliver(ctx: &TcContext, from: &RewritePa, to: &RewritePa) -> i32 {
    if crate::rewrite6::restore(ctx, from, to).is_err() {
        return drop(ctx, Counter::DropUplinkRewriteFailed);
    }
    let delivered = deliver::to_vm6(ctx, to.ifindex, to.vsid, to.mac);
    finish(
        ctx,
        delivered,
        to.ifindex,
        to.vsid,
        Counter::UplinkRewriteDelivered,
    )
}

/// What [`answer_solicitation`] says of a solicitation it turned into its answer; otherwise
/// the number of the counter it is dropped under.
const ANSWERED: u32 = u32::MAX;

/// Turns a neighbour solicitation for an owned IPv6 PA into its advertisement from `mac`.
// Out of line, returning a scalar: its own stack frame, apart from the drop path's.
#[inline(never)]
fn answer_solicitation(ctx: &TcContext, mac: [u8; 6]) -> u32 {
    match crate::uplink_nd::answer(ctx, mac) {
        Ok(()) => ANSWERED,
        Err(reason) => reason as u32,
    }
}

fn restore_and_deliver(ctx: &TcContext, meta: &RestoreMeta) -> i32 {
    if restore(ctx, meta).is_err() {
        return drop(ctx, Counter::DropUplinkRewriteFailed);
    }
    let to = DeliverMeta {
        magic: DeliverMeta::MAGIC,
        ifindex: meta.ifindex,
        vsid: meta.vsid,
        ca: meta.dst_ca,
    };
    deliver(ctx, &to, Counter::UplinkRewriteDelivered)
}

/// Puts the customer's addresses and Ethernet header back on an IP-rewrite packet.
fn restore(ctx: &TcContext, meta: &RestoreMeta) -> Result<(), ()> {
    pull(ctx, (ETH_HLEN + 60) as u32);
    let ip: &Ipv4Hdr = view_at(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(())?;
    let ip = rewrite::Ipv4Fields::of(ip);
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&meta.dst_mac);
    macs[6..].copy_from_slice(&meta.src_mac);
    if !write_at(ctx.data(), ctx.data_end(), 0, macs) {
        return Err(());
    }
    rewrite::replace_addresses(ctx, &ip, meta.src_ca, meta.dst_ca)
}

fn deliver(ctx: &TcContext, to: &DeliverMeta, ok: Counter) -> i32 {
    let delivered = deliver::to_vm(ctx, to.ifindex, to.vsid, to.ca);
    finish(ctx, delivered, to.ifindex, to.vsid, ok)
}

fn deliver6(ctx: &TcContext, to: &DeliverMeta6) -> i32 {
    let delivered = deliver::to_vm6(ctx, to.ifindex, to.vsid, to.mac);
    finish(
        ctx,
        delivered,
        to.ifindex,
        to.vsid,
        Counter::UplinkDelivered,
    )
}

/// Counts and reports what delivery into `ifindex` made of the frame.
#[inline(always)]
fn finish(
    ctx: &TcContext,
    delivered: Result<i32, Counter>,
    ifindex: u32,
    vsid: u32,
    ok: Counter,
) -> i32 {
    match delivered {
        Ok(action) => {
            count(ok);
            let method = if ok == Counter::UplinkRewriteDelivered {
                Stats::REWRITE
            } else {
                Stats::ENCAP
            };
            let len = ctx.len();
            monitor::traffic(vsid, method, false, true, len);
            monitor::forwarded(ctx.data(), ctx.data_end(), ok, ifindex, vsid, len);
            action
        }
        Err(reason) => monitor::drop_on_uplink(ctx, reason, vsid),
    }
}
