//! The datapath's per-CPU counters: what it forwarded and, for every drop, why.

/// Index into the per-CPU counter array. Every `TC_ACT_SHOT`/`XDP_DROP` in the datapath counts
/// exactly one of the `Drop*` variants first.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// From a VM: encapsulated and sent to the underlay.
    VmTxEncap = 0,
    /// From a VM: delivered to a VM on this host.
    VmTxLocal,
    /// From a VM: ARP request answered from the lookup records.
    VmArpReplied,
    /// From a VM on a port that has no port record.
    DropVmUnknownPort,
    /// From a VM: no lookup record for (VSID, destination).
    DropVmUnknownDst,
    /// From a VM: ARP that is not a request for a known customer address.
    DropVmArp,
    /// From a VM: neither IPv4 nor ARP.
    DropVmNotIp,
    /// From a VM: headers shorter than they claim.
    DropVmMalformed,
    /// From a VM: no underlay route or neighbour for the destination's provider address.
    DropVmNoUnderlayRoute,
    /// From a VM: too big for the uplink once translated, and not answered (the ICMP budget
    /// was spent, or the answer could not be built). Answered ones are `VmIcmpFragNeeded`.
    DropVmTooBig,
    /// From a VM: the kernel refused to grow the packet or rewrite its addresses.
    DropVmTranslateFailed,
    /// From a VM: the destination's translation method is not supported by this datapath.
    DropVmMethod,
    /// From a VM: sent by IP rewrite (addresses replaced by PAs).
    VmTxRewrite,
    /// From a VM: the destination wants IP rewrite but the VM has no rewrite PA of its own.
    DropVmNoRewritePa,
    /// Uplink: NVGRE decapsulated for a VM on this host.
    UplinkDecap,
    /// Uplink: NVGRE to a local PA whose headers are truncated or inconsistent.
    DropUplinkMalformed,
    /// Uplink: GRE with the checksum or sequence bit, without the key bit, or a non-zero version.
    DropUplinkGreFlags,
    /// Uplink: an outer IPv4 fragment (the encapsulator never fragments).
    DropUplinkFragment,
    /// Uplink: inner frame carries an 802.1Q tag.
    DropUplinkInnerVlan,
    /// Uplink: inner frame is not IPv4.
    DropUplinkInnerNotIp,
    /// Uplink: no lookup record for (VSID, inner destination).
    DropUplinkUnknownDst,
    /// Uplink: the inner destination is not a VM on this host.
    DropUplinkNotLocal,
    /// Uplink: the kernel refused to strip the outer headers.
    DropUplinkDecapFailed,
    /// Uplink TC: decapsulated frame handed to its VM port.
    UplinkDelivered,
    /// Retired (its discriminant stays reserved): the redirect helper's answer it counted says
    /// nothing of delivery. `DropPortGone` and `DropPortDown` say what it meant to.
    DropUplinkDeliver,
    /// Uplink: IP-rewrite packet to a local rewrite PA whose source PA is unknown, or belongs
    /// to another VSID.
    DropUplinkRewriteUnknownSrc,
    /// Uplink TC: IP-rewrite packet restored and handed to its VM port.
    UplinkRewriteDelivered,
    /// Uplink TC: the kernel refused to restore the addresses or checksums.
    DropUplinkRewriteFailed,
    /// From a VM: source MAC is not the one bound to its port.
    DropVmSpoofedMac,
    /// From a VM: IPv4 source is not the customer address bound to its port.
    DropVmSpoofedIp,
    /// From a VM: ARP whose sender fields are not the port's own (poisoning attempt).
    DropVmSpoofedArp,
    /// Uplink: NVGRE whose outer source is not the PA recorded for (VSID, inner source CA),
    /// or whose inner source is no CA of that VSID.
    DropUplinkSpoofedPa,
    /// Uplink: NVGRE whose inner source MAC is not the one recorded for its CA.
    DropUplinkSpoofedMac,
    /// Uplink: NVGRE for a VSID that has no VM on this host.
    DropUplinkVsidNotHosted,
    /// Delivery to a VM here (from the uplink or another VM): its port is gone or being
    /// re-created (no port entry, or the device now belongs to another VM).
    DropPortGone,
    /// Delivery to a VM here: its port is down (admin down, a tap no QEMU holds, a veth whose
    /// VM end is down).
    DropPortDown,
    /// From a VM: too big for the uplink once translated; answered with ICMP "fragmentation
    /// needed" naming the MTU to use, so path MTU discovery works through nv.
    VmIcmpFragNeeded,
    /// From a VM: a VLAN tag (802.1Q or 802.1ad, single or stacked): a tenant must not pick
    /// underlay treatment, and the inner frame of NVGRE carries none (RFC 7637).
    DropVmVlan,
    /// From a VM: IPv4 options on a packet to be sent by IP rewrite, where they would cross
    /// the underlay as the tenant wrote them (NVGRE carries them inside, untouched).
    DropVmIpOptions,
    /// Uplink: NVGRE for a local PA not addressed to the uplink's own MAC (flooded, multicast,
    /// or seen in promiscuous mode).
    DropUplinkNotOurMac,
    /// Uplink: NVGRE whose inner IPv4 header is not one a VM would take (version, header
    /// length, total length, checksum).
    DropUplinkInnerMalformed,
    /// Uplink: an ICMP error from the underlay (a router's "fragmentation needed" or "time
    /// exceeded") addressed to a local VM's rewrite PA: not the tenant's traffic, never
    /// passed up.
    DropUplinkRewriteIcmp,
    /// From a VM: a segmentation-offloaded super-packet of a tunnel the VM runs itself (VXLAN,
    /// GRE, IPIP with TSO) to be sent by NVGRE, when there is no bounce pair to segment it
    /// (see [`Counter::VmTxSegmented`]; the agent logs why). Linux offloads one tunnel per
    /// packet, not a tunnel inside a tunnel, and a BPF program cannot segment.
    DropVmNestedGso,
    /// From a VM: a super-packet of a tunnel the VM runs itself, handed to the kernel to be
    /// segmented (the bounce device) and encapsulated segment by segment.
    VmTxSegmented,
    /// Uplink: a VLAN-tagged frame (the tag in the skb's metadata or in the frame, priority
    /// tags of VID 0 included) to or from a provider address of this host or a rewrite PA:
    /// nv's underlay is untagged, and the kernel would strip a VID-0 tag after the hook and
    /// hand the packet to the host's stack.
    DropUplinkVlan,
    /// Uplink: to a rewrite PA the datapath owns whose VM is not on this host (its record was
    /// deleted or moved away while the address stays a provider), or to a remote VM's rewrite
    /// PA: never the host's.
    DropUplinkRewriteNoVm,
    /// Uplink: from a rewrite PA (any this host knows, local or remote) to anything but a
    /// local VM's rewrite PA: a tenant's address never speaks to the host.
    DropUplinkFromRewritePa,
    /// Uplink: NVGRE to a provider address of this host that is not the one the inner
    /// destination's record names.
    DropUplinkWrongPa,
    /// Uplink: NVGRE or IP rewrite whose inner source is a VM of this host (its outer source
    /// is this host's own PA): nothing of a local VM comes back from the underlay.
    DropUplinkOwnSource,
    /// From a VM, by IP rewrite: checksum offload state (CHECKSUM_PARTIAL) that does not point
    /// at the packet's own TCP or UDP checksum; completed after the rewrite, it would write 16
    /// bits of the tenant's choosing into headers nv built.
    DropVmCsumOffload,
    /// Uplink: an ARP request for a rewrite PA the datapath owns, answered with the uplink's
    /// MAC (the address is never the host's).
    UplinkArpReplied,
    /// From a VM, to the router's MAC: routed to a VM of another subnet of its domain (or its
    /// own), TTL decremented.
    VmRouted,
    /// From a VM: an ARP request for its subnet's gateway, or an echo request to a gateway of
    /// its domain, answered with the router's MAC.
    VmGatewayReplied,
    /// From a VM, to the router's MAC: its VSID has no routing domain, no route covers the
    /// destination, or the route's destination (or next hop) has no lookup record.
    DropVmNoRoute,
    /// From a VM, to the router's MAC: TTL 1 or 0, expired at the router.
    DropVmTtlExceeded,
    /// From a VM: a packet to a destination whose record uses IP rewrite that rewrite cannot
    /// carry: routed from a VM with no rewrite PA of its own (its VSID uses NVGRE), or a next
    /// hop's answer from the world behind it (rewrite restores only a VM's own address).
    DropVmRoutedRewrite,
    /// From a VM, to the router's MAC: answered by the router with ICMP time exceeded (TTL
    /// expired) or destination unreachable (no route, or no record at its end), from the
    /// gateway of the VM's subnet. Unanswered ones (an error about an error, the port's
    /// budget spent) count under their drop reason.
    VmIcmpFromRouter,
    /// From a VM: a DHCP request (client port 68 to server port 67) in a VSID with a subnet,
    /// handed to the agent, which answers from the VM's record.
    VmDhcpToAgent,
    /// From a VM: a DHCP request from no address (0.0.0.0) in a VSID without a subnet: no
    /// one answers it.
    DropVmDhcpNoSubnet,
    /// From a VM: a DHCP request beyond its port's budget, or with the agent's ring full.
    DropVmDhcpOverBudget,
    /// From a VM: a neighbour solicitation for an IPv6 CA of its VSID, answered from the
    /// records.
    VmNdReplied,
    /// From a VM: neighbour discovery nv does not answer (a solicitation for an address
    /// without a record, duplicate address detection, router solicitations, unsolicited
    /// advertisements, multicast listener reports): nothing is flooded.
    DropVmNdUnanswered,
    /// From a VM: a router advertisement, a redirect or a DHCPv6 server's message, or (in a
    /// VSID with a subnet, where nv serves DHCP) a DHCP server's message: only nv speaks as
    /// the router.
    DropVmRouterGuard,
    /// From a VM: IPv6 extension headers nv does not walk (more than four, or of an unknown
    /// kind), so it cannot tell what the packet carries.
    DropVmIpv6Ext,
    /// From a VM: a DHCP request within its port's budget, with the agent's ring full (other
    /// VMs asking at once, or the agent not reading).
    DropVmDhcpRingFull,
    /// On the uplink: NVGRE carrying neighbour discovery or router messages (ICMPv6 133-137) or
    /// a DHCPv6 server's message, which no host sends another: hosts answer their VMs
    /// themselves.
    DropUplinkRouterGuard,
    /// From a VM: an IPv6 packet too big for the uplink once encapsulated, answered with
    /// ICMPv6 "packet too big" naming the MTU the VM must use (RFC 8201). Unanswered ones
    /// count under `DropVmTooBig`.
    VmIcmpPacketTooBig,
    /// From a VM: its provider address and its destination's are of different families (one
    /// IPv4, one IPv6): no NVGRE header can carry it. Give both hosts a PA of the family the
    /// VSID's records use.
    DropVmUnderlayFamily,
    /// From a VM: an IPv6 packet to a VM reached by IP rewrite that rewrite cannot restore
    /// exactly: extension headers, or neither TCP, UDP nor ICMPv6 (NVGRE carries anything).
    DropVmRewriteIpv6,
    /// On the uplink: a neighbour solicitation for an IPv6 rewrite PA the datapath owns,
    /// answered with the uplink's MAC.
    UplinkNdReplied,
    /// Leaving by the uplink: a host process's packet from an IPv6 PA the datapath owns (an
    /// IP rewrite PA, which only the datapath sends from; `IPV6_FREEBIND` lets any user try).
    DropHostFromRewritePa,
    /// From a VM: denied by a rule of its port's ACL for what it sends (`nvctl monitor`
    /// names the rule).
    DropVmAclDenied,
    /// To a VM: denied by a rule of its port's ACL for what it receives, after
    /// decapsulation, rewrite restore, or from a VM on this host.
    DropAclInDenied,
    /// A packet a stateful ACL rule allowed whose connection could not be tracked: the port's
    /// flow table is not there (being made or taken away). It went through; its answers meet
    /// the rules alone.
    AclFlowUntracked,
    /// Only in the layout-probe build (a counter this version does not have).
    #[cfg(feature = "layout-probe")]
    LayoutProbe,
}

impl Counter {
    #[cfg(not(feature = "layout-probe"))]
    pub const COUNT: u32 = Counter::AclFlowUntracked as u32 + 1;
    #[cfg(feature = "layout-probe")]
    pub const COUNT: u32 = Counter::LayoutProbe as u32 + 1;
    /// Entries of the counter map: room for counters yet to come, so a new one does not
    /// change the pinned map's layout. Discriminants are stable: new counters go at the end.
    pub const SLOTS: u32 = 256;

    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::VmTxEncap,
        Counter::VmTxLocal,
        Counter::VmArpReplied,
        Counter::DropVmUnknownPort,
        Counter::DropVmUnknownDst,
        Counter::DropVmArp,
        Counter::DropVmNotIp,
        Counter::DropVmMalformed,
        Counter::DropVmNoUnderlayRoute,
        Counter::DropVmTooBig,
        Counter::DropVmTranslateFailed,
        Counter::DropVmMethod,
        Counter::VmTxRewrite,
        Counter::DropVmNoRewritePa,
        Counter::UplinkDecap,
        Counter::DropUplinkMalformed,
        Counter::DropUplinkGreFlags,
        Counter::DropUplinkFragment,
        Counter::DropUplinkInnerVlan,
        Counter::DropUplinkInnerNotIp,
        Counter::DropUplinkUnknownDst,
        Counter::DropUplinkNotLocal,
        Counter::DropUplinkDecapFailed,
        Counter::UplinkDelivered,
        Counter::DropUplinkDeliver,
        Counter::DropUplinkRewriteUnknownSrc,
        Counter::UplinkRewriteDelivered,
        Counter::DropUplinkRewriteFailed,
        Counter::DropVmSpoofedMac,
        Counter::DropVmSpoofedIp,
        Counter::DropVmSpoofedArp,
        Counter::DropUplinkSpoofedPa,
        Counter::DropUplinkSpoofedMac,
        Counter::DropUplinkVsidNotHosted,
        Counter::DropPortGone,
        Counter::DropPortDown,
        Counter::VmIcmpFragNeeded,
        Counter::DropVmVlan,
        Counter::DropVmIpOptions,
        Counter::DropUplinkNotOurMac,
        Counter::DropUplinkInnerMalformed,
        Counter::DropUplinkRewriteIcmp,
        Counter::DropVmNestedGso,
        Counter::VmTxSegmented,
        Counter::DropUplinkVlan,
        Counter::DropUplinkRewriteNoVm,
        Counter::DropUplinkFromRewritePa,
        Counter::DropUplinkWrongPa,
        Counter::DropUplinkOwnSource,
        Counter::DropVmCsumOffload,
        Counter::UplinkArpReplied,
        Counter::VmRouted,
        Counter::VmGatewayReplied,
        Counter::DropVmNoRoute,
        Counter::DropVmTtlExceeded,
        Counter::DropVmRoutedRewrite,
        Counter::VmIcmpFromRouter,
        Counter::VmDhcpToAgent,
        Counter::DropVmDhcpNoSubnet,
        Counter::DropVmDhcpOverBudget,
        Counter::VmNdReplied,
        Counter::DropVmNdUnanswered,
        Counter::DropVmRouterGuard,
        Counter::DropVmIpv6Ext,
        Counter::DropVmDhcpRingFull,
        Counter::DropUplinkRouterGuard,
        Counter::VmIcmpPacketTooBig,
        Counter::DropVmUnderlayFamily,
        Counter::DropVmRewriteIpv6,
        Counter::UplinkNdReplied,
        Counter::DropHostFromRewritePa,
        Counter::DropVmAclDenied,
        Counter::DropAclInDenied,
        Counter::AclFlowUntracked,
        #[cfg(feature = "layout-probe")]
        Counter::LayoutProbe,
    ];

    /// Stable snake_case name, used by `nvctl stats` and as the metrics label.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::VmTxEncap => "vm_tx_encap",
            Counter::VmTxLocal => "vm_tx_local",
            Counter::VmArpReplied => "vm_arp_replied",
            Counter::DropVmUnknownPort => "drop_vm_unknown_port",
            Counter::DropVmUnknownDst => "drop_vm_unknown_dst",
            Counter::DropVmArp => "drop_vm_arp",
            Counter::DropVmNotIp => "drop_vm_not_ip",
            Counter::DropVmMalformed => "drop_vm_malformed",
            Counter::DropVmNoUnderlayRoute => "drop_vm_no_underlay_route",
            Counter::DropVmTooBig => "drop_vm_too_big",
            Counter::DropVmTranslateFailed => "drop_vm_translate_failed",
            Counter::DropVmMethod => "drop_vm_method",
            Counter::UplinkDecap => "uplink_decap",
            Counter::DropUplinkMalformed => "drop_uplink_malformed",
            Counter::DropUplinkGreFlags => "drop_uplink_gre_flags",
            Counter::DropUplinkFragment => "drop_uplink_fragment",
            Counter::DropUplinkInnerVlan => "drop_uplink_inner_vlan",
            Counter::DropUplinkInnerNotIp => "drop_uplink_inner_not_ip",
            Counter::DropUplinkUnknownDst => "drop_uplink_unknown_dst",
            Counter::DropUplinkNotLocal => "drop_uplink_not_local",
            Counter::DropUplinkDecapFailed => "drop_uplink_decap_failed",
            Counter::UplinkDelivered => "uplink_delivered",
            Counter::DropUplinkDeliver => "drop_uplink_deliver",
            Counter::VmTxRewrite => "vm_tx_rewrite",
            Counter::DropVmNoRewritePa => "drop_vm_no_rewrite_pa",
            Counter::DropUplinkRewriteUnknownSrc => "drop_uplink_rewrite_unknown_src",
            Counter::UplinkRewriteDelivered => "uplink_rewrite_delivered",
            Counter::DropUplinkRewriteFailed => "drop_uplink_rewrite_failed",
            Counter::DropVmSpoofedMac => "drop_vm_spoofed_mac",
            Counter::DropVmSpoofedIp => "drop_vm_spoofed_ip",
            Counter::DropVmSpoofedArp => "drop_vm_spoofed_arp",
            Counter::DropUplinkSpoofedPa => "drop_uplink_spoofed_pa",
            Counter::DropUplinkSpoofedMac => "drop_uplink_spoofed_mac",
            Counter::DropUplinkVsidNotHosted => "drop_uplink_vsid_not_hosted",
            Counter::DropPortGone => "drop_port_gone",
            Counter::DropPortDown => "drop_port_down",
            Counter::VmIcmpFragNeeded => "vm_icmp_frag_needed",
            Counter::DropVmVlan => "drop_vm_vlan",
            Counter::DropVmIpOptions => "drop_vm_ip_options",
            Counter::DropUplinkNotOurMac => "drop_uplink_not_our_mac",
            Counter::DropUplinkInnerMalformed => "drop_uplink_inner_malformed",
            Counter::DropUplinkRewriteIcmp => "drop_uplink_rewrite_icmp",
            Counter::DropVmNestedGso => "drop_vm_nested_gso",
            Counter::VmTxSegmented => "vm_tx_segmented",
            Counter::DropUplinkVlan => "drop_uplink_vlan",
            Counter::DropUplinkRewriteNoVm => "drop_uplink_rewrite_no_vm",
            Counter::DropUplinkFromRewritePa => "drop_uplink_from_rewrite_pa",
            Counter::DropUplinkWrongPa => "drop_uplink_wrong_pa",
            Counter::DropUplinkOwnSource => "drop_uplink_own_source",
            Counter::DropVmCsumOffload => "drop_vm_csum_offload",
            Counter::UplinkArpReplied => "uplink_arp_replied",
            Counter::VmRouted => "vm_routed",
            Counter::VmGatewayReplied => "vm_gateway_replied",
            Counter::DropVmNoRoute => "drop_vm_no_route",
            Counter::DropVmTtlExceeded => "drop_vm_ttl_exceeded",
            Counter::DropVmRoutedRewrite => "drop_vm_routed_rewrite",
            Counter::VmIcmpFromRouter => "vm_icmp_from_router",
            Counter::VmDhcpToAgent => "vm_dhcp_to_agent",
            Counter::DropVmDhcpNoSubnet => "drop_vm_dhcp_no_subnet",
            Counter::DropVmDhcpOverBudget => "drop_vm_dhcp_over_budget",
            Counter::VmNdReplied => "vm_nd_replied",
            Counter::DropVmNdUnanswered => "drop_vm_nd_unanswered",
            Counter::DropVmRouterGuard => "drop_vm_router_guard",
            Counter::DropVmIpv6Ext => "drop_vm_ipv6_ext",
            Counter::DropVmDhcpRingFull => "drop_vm_dhcp_ring_full",
            Counter::DropUplinkRouterGuard => "drop_uplink_router_guard",
            Counter::VmIcmpPacketTooBig => "vm_icmp_packet_too_big",
            Counter::DropVmUnderlayFamily => "drop_vm_underlay_family",
            Counter::DropVmRewriteIpv6 => "drop_vm_rewrite_ipv6",
            Counter::UplinkNdReplied => "uplink_nd_replied",
            Counter::DropHostFromRewritePa => "drop_host_from_rewrite_pa",
            Counter::DropVmAclDenied => "drop_vm_acl_denied",
            Counter::DropAclInDenied => "drop_acl_in_denied",
            Counter::AclFlowUntracked => "acl_flow_untracked",
            #[cfg(feature = "layout-probe")]
            Counter::LayoutProbe => "layout_probe",
        }
    }
}

const _: () = {
    assert!(Counter::COUNT <= Counter::SLOTS);
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
};
