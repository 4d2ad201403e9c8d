//! `DHCPv6` (RFC 8415) for VMs whose IPv6 record is not the address SLAAC would give them: the
//! router's advertisement sets the managed flag, and the VM asks here. As for `DHCPv4`, nothing
//! is leased from a pool: the answer is the record's address, the same on every host. Only
//! what a client on the link sends is answered (no relays), from the router's link-local
//! address and MAC. This file is the protocol, pure.
use std::net::Ipv6Addr;

use dhcproto::{
    Decodable as _, Decoder, Encodable as _, Encoder,
    v6::{DhcpOption, IAAddr, IANA, Message, MessageType, OptionCode, Status, StatusCode},
};
use etherparse::{LaxNetSlice, LaxSlicedPacket, PacketBuilder, TransportSlice};
use nv_common::{
    routing::router_link_local,
    wire::{DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT},
};

use super::Unanswered;

/// Seconds the address is valid and preferred; the client renews at T1 and rebinds at T2.
const VALID_SECS: u32 = 7200;
const PREFERRED_SECS: u32 = 3600;
const T1_SECS: u32 = 1800;
const T2_SECS: u32 = 2880;

/// What nv tells one VM: its record's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease6 {
    pub mac: [u8; 6],
    pub ca: Ipv6Addr,
    pub router_mac: [u8; 6],
}

/// A client's message as the server needs it.
#[derive(Clone, Debug)]
pub struct Request6 {
    pub src_mac: [u8; 6],
    /// The client's link-local address: the answer goes back to it.
    pub src: Ipv6Addr,
    pub msg: Message,
}

/// The server's DUID: DUID-LL (type 3, Ethernet) of the router's MAC, the same on every host.
fn server_id(router_mac: [u8; 6]) -> Vec<u8> {
    let mut id = vec![0, 3, 0, 1];
    id.extend_from_slice(&router_mac);
    id
}

/// Whether `frame` is a `DHCPv6` client's message (UDP 546 to 547), to be read by [`request_of`].
pub fn is_request(frame: &[u8]) -> bool {
    let Ok(p) = LaxSlicedPacket::from_ethernet(frame) else {
        return false;
    };
    matches!(
        (&p.net, &p.transport),
        (Some(LaxNetSlice::Ipv6(_)), Some(TransportSlice::Udp(u)))
            if u.source_port() == DHCPV6_CLIENT_PORT && u.destination_port() == DHCPV6_SERVER_PORT
    )
}

/// The client's message in an Ethernet frame from a VM (as the datapath handed it over).
pub fn request_of(frame: &[u8]) -> Result<Request6, Unanswered> {
    let p = LaxSlicedPacket::from_ethernet(frame).map_err(|_| Unanswered::Malformed)?;
    let src_mac = match &p.link {
        Some(etherparse::LinkSlice::Ethernet2(eth)) => eth.source(),
        _ => return Err(Unanswered::Malformed),
    };
    let (Some(LaxNetSlice::Ipv6(ip)), Some(TransportSlice::Udp(udp))) = (&p.net, &p.transport)
    else {
        return Err(Unanswered::Malformed);
    };
    let src = ip.header().source_addr();
    // On the link only: a client speaks from its link-local address (RFC 8415 13).
    if !src.is_unicast_link_local() {
        return Err(Unanswered::Malformed);
    }
    let payload = udp.payload();
    // A VM's bytes: should the decoder ever panic on them, the message is malformed.
    let msg = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(payload)))
        .map_err(|_| Unanswered::Malformed)?
        .map_err(|_| Unanswered::Malformed)?;
    Ok(Request6 { src_mac, src, msg })
}

/// Message kinds as Prometheus labels (`nv_dhcp6_requests_total{type}`).
pub const REQUEST_KINDS: [&str; 9] = [
    "solicit",
    "request",
    "renew",
    "rebind",
    "confirm",
    "information_request",
    "release",
    "decline",
    "other",
];

/// Answer kinds as labels (`nv_dhcp6_replies_total{type}`).
pub const REPLY_KINDS: [&str; 2] = ["advertise", "reply"];

/// The message's kind: an index into [`REQUEST_KINDS`].
pub fn kind_of(req: &Request6) -> usize {
    match req.msg.msg_type() {
        MessageType::Solicit => 0,
        MessageType::Request => 1,
        MessageType::Renew => 2,
        MessageType::Rebind => 3,
        MessageType::Confirm => 4,
        MessageType::InformationRequest => 5,
        MessageType::Release => 6,
        MessageType::Decline => 7,
        _ => 8,
    }
}

/// The answer to `req` from `lease`: the Ethernet frame to write into the VM's port and its
/// kind, or why there is none.
pub fn answer(req: &Request6, lease: &Lease6) -> Result<(Vec<u8>, &'static str), Unanswered> {
    if req.src_mac != lease.mac {
        return Err(Unanswered::MacMismatch);
    }
    let ours = server_id(lease.router_mac);
    let opts = req.msg.opts();
    let client = match opts.get(OptionCode::ClientId) {
        Some(DhcpOption::ClientId(id)) => id.clone(),
        _ => return Err(Unanswered::Malformed),
    };
    let named = match opts.get(OptionCode::ServerId) {
        Some(DhcpOption::ServerId(id)) => Some(id.clone()),
        _ => None,
    };
    let kind = req.msg.msg_type();
    let for_us = named.as_ref().is_none_or(|id| *id == ours);
    let (reply, name) = match kind {
        MessageType::Solicit => (MessageType::Advertise, "advertise"),
        MessageType::Request | MessageType::Renew | MessageType::InformationRequest if !for_us => {
            return Err(Unanswered::OtherServer);
        }
        MessageType::Request
        | MessageType::Renew
        | MessageType::Rebind
        | MessageType::Confirm
        | MessageType::InformationRequest => (MessageType::Reply, "reply"),
        MessageType::Release | MessageType::Decline => return Err(Unanswered::Release),
        _ => return Err(Unanswered::Malformed),
    };
    let mut m = Message::new_with_id(reply, req.msg.xid());
    let out = m.opts_mut();
    out.insert(DhcpOption::ClientId(client));
    out.insert(DhcpOption::ServerId(ours));
    match kind {
        MessageType::InformationRequest => {}
        // The link's addresses are the records': the client's are on it.
        MessageType::Confirm => out.insert(DhcpOption::StatusCode(StatusCode {
            status: Status::Success,
            msg: String::new(),
        })),
        _ => {
            // The client's IA_NA (its identity kept), holding the record's address.
            let id = match opts.get(OptionCode::IANA) {
                Some(DhcpOption::IANA(ia)) => ia.id,
                _ => 1,
            };
            let mut ia = IANA {
                id,
                t1: T1_SECS,
                t2: T2_SECS,
                opts: dhcproto::v6::DhcpOptions::new(),
            };
            ia.opts.insert(DhcpOption::IAAddr(IAAddr {
                addr: lease.ca,
                preferred_life: PREFERRED_SECS,
                valid_life: VALID_SECS,
                opts: dhcproto::v6::DhcpOptions::new(),
            }));
            out.insert(DhcpOption::IANA(ia));
        }
    }
    let mut payload = Vec::new();
    m.encode(&mut Encoder::new(&mut payload))
        .map_err(|_| Unanswered::Malformed)?;
    let b = PacketBuilder::ethernet2(lease.router_mac, lease.mac)
        .ipv6(router_link_local(lease.router_mac), req.src.octets(), 255)
        .udp(DHCPV6_SERVER_PORT, DHCPV6_CLIENT_PORT);
    let mut frame = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut frame, &payload)
        .map_err(|_| Unanswered::Malformed)?;
    Ok((frame, name))
}

#[cfg(test)]
mod tests {
    use etherparse::SlicedPacket;

    use super::*;

    const VM: [u8; 6] = [2, 0, 0, 0, 7, 5];
    const ROUTER: [u8; 6] = nv_common::routing::DEFAULT_ROUTER_MAC;

    fn client_frame(kind: MessageType, server: Option<Vec<u8>>) -> Vec<u8> {
        let mut m = Message::new_with_id(kind, [1, 2, 3]);
        m.opts_mut()
            .insert(DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 7, 5]));
        m.opts_mut().insert(DhcpOption::IANA(IANA {
            id: 77,
            t1: 0,
            t2: 0,
            opts: dhcproto::v6::DhcpOptions::new(),
        }));
        if let Some(id) = server {
            m.opts_mut().insert(DhcpOption::ServerId(id));
        }
        let mut payload = Vec::new();
        m.encode(&mut Encoder::new(&mut payload)).unwrap();
        let ll: Ipv6Addr = "fe80::ff:fe00:705".parse().unwrap();
        let all: Ipv6Addr = "ff02::1:2".parse().unwrap();
        let b = PacketBuilder::ethernet2(VM, [0x33, 0x33, 0, 1, 0, 2])
            .ipv6(ll.octets(), all.octets(), 1)
            .udp(546, 547);
        let mut f = Vec::new();
        b.write(&mut f, &payload).unwrap();
        f
    }

    fn lease() -> Lease6 {
        Lease6 {
            mac: VM,
            ca: "fd00:1::5".parse().unwrap(),
            router_mac: ROUTER,
        }
    }

    #[test]
    fn a_client_is_given_its_record_s_address() {
        for (kind, want, name) in [
            (MessageType::Solicit, MessageType::Advertise, "advertise"),
            (MessageType::Request, MessageType::Reply, "reply"),
            (MessageType::Renew, MessageType::Reply, "reply"),
        ] {
            let f = client_frame(
                kind,
                (kind != MessageType::Solicit).then(|| server_id(ROUTER)),
            );
            assert!(is_request(&f));
            let req = request_of(&f).unwrap();
            let (out, got) = answer(&req, &lease()).unwrap();
            assert_eq!(got, name);
            // etherparse checks the UDP checksum and lengths independently.
            let p = SlicedPacket::from_ethernet(&out).unwrap();
            let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
                panic!("not IPv6")
            };
            assert_eq!(
                ip.header().source_addr().to_string(),
                "fe80::6e:76ff:fe00:1"
            );
            assert_eq!(ip.header().destination_addr(), req.src);
            let Some(TransportSlice::Udp(udp)) = &p.transport else {
                panic!("not UDP")
            };
            let m = Message::decode(&mut Decoder::new(udp.payload())).unwrap();
            assert_eq!((m.msg_type(), m.xid()), (want, [1, 2, 3]));
            let Some(DhcpOption::IANA(ia)) = m.opts().get(OptionCode::IANA) else {
                panic!("no IA_NA")
            };
            assert_eq!(ia.id, 77);
            let Some(DhcpOption::IAAddr(a)) = ia.opts.get(OptionCode::IAAddr) else {
                panic!("no address")
            };
            assert_eq!(a.addr.to_string(), "fd00:1::5");
        }
    }

    #[test]
    fn others_messages_are_not_answered() {
        let theirs = client_frame(
            MessageType::Request,
            Some(vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9]),
        );
        let req = request_of(&theirs).unwrap();
        assert_eq!(answer(&req, &lease()), Err(Unanswered::OtherServer));
        let release = request_of(&client_frame(MessageType::Release, None)).unwrap();
        assert_eq!(answer(&release, &lease()), Err(Unanswered::Release));
        let mut other_mac = lease();
        other_mac.mac = [2, 0, 0, 0, 7, 6];
        let req = request_of(&client_frame(MessageType::Solicit, None)).unwrap();
        assert_eq!(answer(&req, &other_mac), Err(Unanswered::MacMismatch));
        assert!(request_of(&[0u8; 60]).is_err());
        // Mutated messages: never a panic.
        let f = client_frame(MessageType::Solicit, None);
        for i in 62..f.len() {
            for b in [0u8, 0xff, 0x7f] {
                let mut g = f.clone();
                g[i] = b;
                if let Ok(req) = request_of(&g) {
                    let _ = answer(&req, &lease());
                }
            }
        }
    }
}
