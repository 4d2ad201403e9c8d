//! DHCP (IPv4) for VMs in a VSID with a subnet: the datapath hands each request to the agent (the
//! slow path), which answers from the VM's lookup record, as OVN's controller does. Nothing is
//! leased from a pool: a VM's address is its record's CA, so every host gives the same answer
//! and a VM that moves keeps its address. This file is the protocol, pure; the server that
//! reads the datapath's ring and writes into ports is [`server`].
use std::net::Ipv4Addr;

use dhcproto::{
    Decodable as _, Decoder, Encodable as _, Encoder,
    v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode},
};
use etherparse::{LaxNetSlice, LaxSlicedPacket, PacketBuilder, TransportSlice};
use ipnet::Ipv4Net;
use nv_common::wire::{DHCP_CLIENT_PORT, DHCP_SERVER_PORT};

use crate::model::Subnet;

pub mod counts;
pub mod server;
pub mod v6;

/// Seconds a lease lasts. Records change rarely, and a VM renews at half of it.
pub const LEASE_SECS: u32 = 3600;

/// Routes that fit in a reply of RFC 2131's minimum size beside the other options; a domain
/// with more is given the gateway as its default router instead.
pub const MAX_CLASSLESS_ROUTES: usize = 24;

/// What nv tells one VM: its record and its subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub mac: [u8; 6],
    pub ca: Ipv4Addr,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    pub router_mac: [u8; 6],
    /// The MTU the VM must use (option 26).
    pub mtu: u16,
    /// The domain's prefixes outside the subnet, each through the gateway (option 121), when
    /// a default route would say more than the domain routes; `None` when it has one.
    pub routes: Option<Vec<Subnet>>,
}

/// A request as the server needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The frame's source MAC.
    pub src_mac: [u8; 6],
    pub msg: Message,
    pub kind: MessageType,
}

/// Why a frame got no answer: a Prometheus label (`nv_dhcp_unanswered_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unanswered {
    /// Not a DHCP request nv can read.
    Malformed,
    /// The port has no IPv4 record (or went since).
    NoRecord,
    /// The client's hardware address is not its port's.
    MacMismatch,
    /// The record's CA lies in no subnet of its VSID.
    NoSubnet,
    /// A release or decline: nothing to answer.
    Release,
    /// A request for another server's offer.
    OtherServer,
    /// The answer could not be written into the port.
    SendFailed,
}

impl Unanswered {
    pub const ALL: [Unanswered; 7] = [
        Unanswered::Malformed,
        Unanswered::NoRecord,
        Unanswered::MacMismatch,
        Unanswered::NoSubnet,
        Unanswered::Release,
        Unanswered::OtherServer,
        Unanswered::SendFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Unanswered::Malformed => "malformed",
            Unanswered::NoRecord => "no_record",
            Unanswered::MacMismatch => "mac_mismatch",
            Unanswered::NoSubnet => "no_subnet",
            Unanswered::Release => "release",
            Unanswered::OtherServer => "other_server",
            Unanswered::SendFailed => "send_failed",
        }
    }
}

/// The kinds of answer: a Prometheus label (`nv_dhcp_replies_total{type}`).
pub const REPLY_KINDS: [&str; 3] = ["offer", "ack", "nak"];

/// The DHCP request in an Ethernet frame from a VM (as the datapath handed it over).
pub fn request_of(frame: &[u8]) -> Result<Request, Unanswered> {
    // Lax: the datapath hands over at most `SLOW_FRAME_BYTES` of a longer frame; its
    // options are read as far as they go.
    let packet = LaxSlicedPacket::from_ethernet(frame).map_err(|_| Unanswered::Malformed)?;
    let src_mac = match &packet.link {
        Some(etherparse::LinkSlice::Ethernet2(eth)) => eth.source(),
        _ => return Err(Unanswered::Malformed),
    };
    if !matches!(packet.net, Some(LaxNetSlice::Ipv4(_))) {
        return Err(Unanswered::Malformed);
    }
    let Some(TransportSlice::Udp(udp)) = &packet.transport else {
        return Err(Unanswered::Malformed);
    };
    if udp.source_port() != DHCP_CLIENT_PORT || udp.destination_port() != DHCP_SERVER_PORT {
        return Err(Unanswered::Malformed);
    }
    // A VM's bytes: should the decoder ever panic on them, the request is malformed.
    let payload = udp.payload();
    let msg = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(payload)))
        .map_err(|_| Unanswered::Malformed)?
        .map_err(|_| Unanswered::Malformed)?;
    if msg.opcode() != Opcode::BootRequest || msg.htype() != HType::Eth || msg.hlen() != 6 {
        return Err(Unanswered::Malformed);
    }
    let kind = msg.opts().msg_type().ok_or(Unanswered::Malformed)?;
    Ok(Request { src_mac, msg, kind })
}

/// The client's hardware address.
pub fn chaddr(req: &Request) -> [u8; 6] {
    let mut mac = [0; 6];
    mac.copy_from_slice(&req.msg.chaddr()[..6]);
    mac
}

/// The answer to `req` from `lease`: the Ethernet frame to write into the VM's port and its
/// kind, or why there is none.
pub fn answer(req: &Request, lease: &Lease) -> Result<(Vec<u8>, &'static str), Unanswered> {
    if req.src_mac != lease.mac || chaddr(req) != lease.mac {
        return Err(Unanswered::MacMismatch);
    }
    let server = |m: &Message| match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(id)) => Some(*id),
        _ => None,
    };
    let requested = match req.msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let (kind, name) = match req.kind {
        MessageType::Discover => (MessageType::Offer, "offer"),
        MessageType::Request => {
            if server(&req.msg).is_some_and(|s| s != lease.gateway) {
                return Err(Unanswered::OtherServer);
            }
            // SELECTING and INIT-REBOOT name the address; RENEWING and REBINDING use it.
            let asked = requested.unwrap_or(req.msg.ciaddr());
            if asked == lease.ca {
                (MessageType::Ack, "ack")
            } else {
                (MessageType::Nak, "nak")
            }
        }
        MessageType::Inform => (MessageType::Ack, "ack"),
        MessageType::Release | MessageType::Decline => return Err(Unanswered::Release),
        _ => return Err(Unanswered::Malformed),
    };
    let mut m = Message::new_with_id(
        req.msg.xid(),
        req.msg.ciaddr(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        req.msg.giaddr(),
        &lease.mac,
    );
    m.set_opcode(Opcode::BootReply).set_flags(req.msg.flags());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(lease.gateway));
    if kind != MessageType::Nak {
        if req.kind != MessageType::Inform {
            opts.insert(DhcpOption::AddressLeaseTime(LEASE_SECS));
        }
        let mask = lease.subnet.v4_mask().unwrap_or(Ipv4Addr::BROADCAST);
        opts.insert(DhcpOption::SubnetMask(mask));
        opts.insert(DhcpOption::Router(vec![lease.gateway]));
        opts.insert(DhcpOption::InterfaceMtu(lease.mtu));
        if let Some(routes) = &lease.routes {
            opts.insert(DhcpOption::ClasslessStaticRoute(
                routes
                    .iter()
                    .filter_map(|s| Ipv4Net::new(s.v4()?, s.len).ok())
                    .map(|net| (net, lease.gateway))
                    .collect(),
            ));
        }
    }
    let yiaddr = match (kind, req.kind) {
        (MessageType::Nak, _) | (_, MessageType::Inform) => Ipv4Addr::UNSPECIFIED,
        _ => lease.ca,
    };
    m.set_yiaddr(yiaddr);
    let mut payload = Vec::with_capacity(548);
    m.encode(&mut Encoder::new(&mut payload))
        .map_err(|_| Unanswered::Malformed)?;
    // RFC 2131 4.1: to the client's address when it has one, by broadcast when it asked
    // (or for a NAK), else to the address offered, at its hardware address.
    let ip_dst = if kind == MessageType::Nak || req.msg.flags().broadcast() {
        Ipv4Addr::BROADCAST
    } else if req.msg.ciaddr() != Ipv4Addr::UNSPECIFIED {
        req.msg.ciaddr()
    } else {
        yiaddr
    };
    let eth_dst = if ip_dst == Ipv4Addr::BROADCAST {
        [0xff; 6]
    } else {
        lease.mac
    };
    let builder = PacketBuilder::ethernet2(lease.router_mac, eth_dst)
        .ipv4(lease.gateway.octets(), ip_dst.octets(), 64)
        .udp(DHCP_SERVER_PORT, DHCP_CLIENT_PORT);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, &payload)
        .map_err(|_| Unanswered::Malformed)?;
    Ok((frame, name))
}

#[cfg(test)]
mod tests;
