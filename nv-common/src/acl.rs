//! Port ACLs as the datapath holds them: each VM port's rules of one direction in one map
//! value ([`AclSet`], replaced whole, so a packet never sees half a change), the packets and
//! bytes each rule decided ([`AclMeter`]), and the connections stateful rules admitted
//! ([`AclFlowSet`]): a set-associative table per port, whose sets the agent makes when the
//! port gets a stateful rule, so a VM's flows only ever evict its own.
//!
//! Addresses are 16 bytes as four network-order words (IPv4 mapped into IPv6), so a prefix is
//! matched with four masked compares and no byte loads.

/// A port's rules of one direction, at most.
pub const MAX_SET_RULES: usize = 1024;
/// Ways of a flow set: a new flow evicts the oldest of the four when all are taken.
pub const FLOW_WAYS: usize = 4;
/// Entries of the rule-set map: two per port with rules.
pub const MAX_ACL_SETS: u32 = 8_192;
/// Entries of the meter map: a rule counted in each direction.
pub const MAX_ACL_METERS: u32 = 131_072;
/// Flow sets on a host, all ports together (4 flows each, 224 bytes): made as VMs get
/// stateful rules, so only the hash's buckets are taken up front.
pub const MAX_FLOW_SETS: u32 = 1 << 20;
/// The default budget of tracked connections per VM port (115 KB of flow sets).
pub const DEFAULT_MAX_FLOWS: u32 = 2_048;

/// Into the VM (delivered to its port).
pub const DIR_IN: u32 = 0;
/// From the VM (what it sends).
pub const DIR_OUT: u32 = 1;

/// Key of the rule-set map: the VM as its port entry names it (VSID and address: its IPv4
/// one, or its IPv6 one when it has no other), so a port re-created under another ifindex
/// keeps its rules and flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclSetKey {
    pub vsid: u32,
    /// [`DIR_IN`] or [`DIR_OUT`].
    pub dir: u32,
    pub ca: crate::Addr,
}

/// One rule as the datapath matches it. Prefixes are stored masked, with their mask.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclRule {
    pub remote: [u32; 4],
    pub remote_mask: [u32; 4],
    pub local: [u32; 4],
    pub local_mask: [u32; 4],
    /// Inclusive ranges, host order; `[0, 65535]` is any port.
    pub remote_ports: [u16; 2],
    pub local_ports: [u16; 2],
    /// The rule's id: its meter's key, and what a monitor reports for a deny.
    pub id: u32,
    /// Seconds a connection it admitted stays without a packet.
    pub idle_timeout: u32,
    /// 0 (any), 4 or 6.
    pub family: u8,
    /// IP protocol, 0 for any.
    pub proto: u8,
    /// [`AclRule::ALLOW`] or [`AclRule::DENY`].
    pub action: u8,
    /// [`AclRule::STATEFUL`].
    pub flags: u8,
}

impl AclRule {
    pub const DENY: u8 = 0;
    pub const ALLOW: u8 = 1;
    pub const STATEFUL: u8 = 1;

    /// Whether the rule covers the packet `t`. Without a branch but the last: a rule set is
    /// a loop of up to [`MAX_SET_RULES`] of these, and the verifier follows at most 8192
    /// jumps down one path.
    #[inline(always)]
    #[must_use]
    pub fn matches(&self, t: &AclTuple) -> bool {
        // Each term is 0 where the rule agrees with the packet.
        let any_or = |want: u8, got: u8| u64::from(want) * u64::from(want ^ got);
        // Bit 63 of a difference of two 16-bit numbers is set when the first is smaller.
        let below = |a: u16, b: u16| (u64::from(a).wrapping_sub(u64::from(b))) >> 63;
        let addrs = masked_diff(&t.remote, &self.remote_mask, &self.remote)
            | masked_diff(&t.local, &self.local_mask, &self.local);
        let ports = below(t.rport, self.remote_ports[0])
            | below(self.remote_ports[1], t.rport)
            | below(t.lport, self.local_ports[0])
            | below(self.local_ports[1], t.lport);
        (any_or(self.family, t.family) | any_or(self.proto, t.proto) | u64::from(addrs) | ports)
            == 0
    }

    #[inline(always)]
    #[must_use]
    pub const fn allows(&self) -> bool {
        self.action == Self::ALLOW
    }

    #[inline(always)]
    #[must_use]
    pub const fn is_stateful(&self) -> bool {
        self.flags & Self::STATEFUL != 0
    }
}

/// 0 where `a` lies in the prefix (`prefix`, `mask`).
#[inline(always)]
fn masked_diff(a: &[u32; 4], mask: &[u32; 4], prefix: &[u32; 4]) -> u32 {
    (a[0] & mask[0] ^ prefix[0])
        | (a[1] & mask[1] ^ prefix[1])
        | (a[2] & mask[2] ^ prefix[2])
        | (a[3] & mask[3] ^ prefix[3])
}

/// Value of the rule-set map: a port's rules of one direction, highest weight first and, at
/// equal weight, deny first: the first that matches decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclSet {
    pub len: u32,
    /// Flow sets of the port's connection table ([`AclFlowKey::set`] is below it); 0 when the
    /// port has no stateful rule.
    pub flow_sets: u32,
    pub rules: [AclRule; MAX_SET_RULES],
}

/// A packet as the ACLs see it: from the VM's side, whichever way it goes, so a connection's
/// packets in both directions have one tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclTuple {
    /// The VM's address (the source of what it sends, the destination of what it gets).
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// TCP and UDP ports; for ICMP echo, the identifier as `lport` and 0 as `rport`.
    pub lport: u16,
    pub rport: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// [`AclTuple::ECHO_REQUEST`], [`AclTuple::ECHO_REPLY`], or 0 (not an echo).
    pub echo: u8,
    pub _pad: u8,
}

impl AclTuple {
    pub const ECHO_REQUEST: u8 = 1;
    pub const ECHO_REPLY: u8 = 2;

    /// Whether a stateful rule may track it: TCP, UDP, or an echo request.
    #[inline(always)]
    #[must_use]
    pub const fn trackable(&self) -> bool {
        self.proto == crate::wire::IPPROTO_TCP
            || self.proto == crate::wire::IPPROTO_UDP
            || self.echo == Self::ECHO_REQUEST
    }

    /// The flow set of this tuple among `sets`.
    #[inline(always)]
    #[must_use]
    pub fn flow_set(&self, sets: u32) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for w in [
            self.local[3],
            self.remote[0],
            self.remote[1],
            self.remote[2],
            self.remote[3],
            u32::from(self.lport) << 16 | u32::from(self.rport),
            u32::from(self.proto),
        ] {
            h = (h ^ w).wrapping_mul(0x0100_0193);
            h ^= h >> 15;
        }
        if sets == 0 { 0 } else { h % sets }
    }
}

/// Key of the flow table: one flow set of a VM (named as in [`AclSetKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclFlowKey {
    pub vsid: u32,
    pub set: u32,
    pub ca: crate::Addr,
}

/// A connection a stateful allow admitted, from the VM's side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclFlow {
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub lport: u16,
    pub rport: u16,
    pub proto: u8,
    /// The direction of the packet that opened it ([`DIR_IN`], [`DIR_OUT`]).
    pub dir: u8,
    /// 1 while the way holds a flow.
    pub valid: u8,
    pub _pad: u8,
    /// The rule that admitted it (its packets are metered there).
    pub rule: u32,
    pub idle_timeout: u32,
    /// `bpf_ktime_get_coarse_ns` of its last packet (refreshed at most once a second).
    pub seen_ns: u64,
}

impl AclFlow {
    /// Whether this way holds the connection of `t`.
    #[inline(always)]
    #[must_use]
    pub fn is(&self, t: &AclTuple) -> bool {
        let words = |a: &[u32; 4], b: &[u32; 4]| {
            (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])
        };
        let ports = (u32::from(self.lport) << 16 | u32::from(self.rport))
            ^ (u32::from(t.lport) << 16 | u32::from(t.rport));
        self.valid != 0
            && (words(&self.remote, &t.remote)
                | words(&self.local, &t.local)
                | ports
                | u32::from(self.proto ^ t.proto))
                == 0
    }

    /// Whether it has been idle longer than its timeout at `now_ns`.
    #[inline(always)]
    #[must_use]
    pub const fn expired(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.seen_ns) > self.idle_timeout as u64 * 1_000_000_000
    }
}

/// Value of the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclFlowSet {
    pub ways: [AclFlow; FLOW_WAYS],
}

/// Key of the meter map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclMeterKey {
    pub rule: u32,
    pub dir: u32,
}

/// Value of the meter map (per CPU): what a rule decided, Ethernet header included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclMeter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = {
    assert!(core::mem::size_of::<AclRule>() == 84);
    assert!(core::mem::size_of::<AclSet>() == 8 + 84 * MAX_SET_RULES);
    assert!(core::mem::size_of::<AclTuple>() == 40);
    assert!(core::mem::size_of::<AclFlow>() == 56);
    assert!(core::mem::size_of::<AclFlowSet>() == 224);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and arrays of them only, no implicit padding (sizes asserted).
    unsafe impl aya::Pod for super::AclSetKey {}
    unsafe impl aya::Pod for super::AclRule {}
    unsafe impl aya::Pod for super::AclSet {}
    unsafe impl aya::Pod for super::AclFlowKey {}
    unsafe impl aya::Pod for super::AclFlow {}
    unsafe impl aya::Pod for super::AclFlowSet {}
    unsafe impl aya::Pod for super::AclMeterKey {}
    unsafe impl aya::Pod for super::AclMeter {}
}
