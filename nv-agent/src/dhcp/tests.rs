use std::net::Ipv4Addr;

use dhcproto::{
    Decodable as _, Decoder, Encodable as _, Encoder,
    v4::{DhcpOption, Flags, Message, MessageType, OptionCode},
};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

use super::*;

const VM: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const ROUTER: [u8; 6] = [0x02, 0x6e, 0x76, 0, 0, 1];

fn lease(routes: Option<Vec<Subnet>>) -> Lease {
    Lease {
        mac: VM,
        ca: Ipv4Addr::new(10, 1, 0, 11),
        subnet: "10.1.0.0/24".parse().unwrap(),
        gateway: Ipv4Addr::new(10, 1, 0, 1),
        router_mac: ROUTER,
        mtu: 1458,
        routes,
    }
}

/// A client's frame, as busybox udhcpc sends it.
fn frame(kind: MessageType, chaddr: [u8; 6], opts: Vec<DhcpOption>, broadcast: bool) -> Vec<u8> {
    let mut m = Message::new_with_id(
        0x1234_5678,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &chaddr,
    );
    if broadcast {
        m.set_flags(Flags::default().set_broadcast());
    }
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o);
    }
    let mut payload = Vec::new();
    m.encode(&mut Encoder::new(&mut payload)).unwrap();
    let b = PacketBuilder::ethernet2(VM, [0xff; 6])
        .ipv4([0; 4], [255; 4], 64)
        .udp(68, 67);
    let mut out = Vec::new();
    b.write(&mut out, &payload).unwrap();
    out
}

/// The answer's frame, checked as a receiver would, and its DHCP message.
fn decoded(frame: &[u8]) -> (etherparse::Ethernet2Header, etherparse::Ipv4Header, Message) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = p.link else {
        panic!("no Ethernet")
    };
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("no IPv4")
    };
    let Some(TransportSlice::Udp(udp)) = p.transport else {
        panic!("no UDP")
    };
    let ip_header = ip.header().to_header();
    assert_eq!(
        udp.to_header()
            .calc_checksum_ipv4(&ip_header, udp.payload())
            .unwrap(),
        udp.checksum(),
        "UDP checksum"
    );
    assert_eq!(ip_header.header_checksum, ip_header.calc_header_checksum());
    assert_eq!((udp.source_port(), udp.destination_port()), (67, 68));
    let m = Message::decode(&mut Decoder::new(udp.payload())).unwrap();
    (eth.to_header(), ip_header, m)
}

#[test]
fn a_discover_gets_an_offer_of_the_record_s_address_with_mask_router_and_mtu() {
    let req = request_of(&frame(MessageType::Discover, VM, vec![], false)).unwrap();
    let (reply, kind) = answer(&req, &lease(None)).unwrap();
    assert_eq!(kind, "offer");
    let (eth, ip, m) = decoded(&reply);
    assert_eq!((eth.source, eth.destination), (ROUTER, VM));
    assert_eq!(ip.source, [10, 1, 0, 1]);
    assert_eq!(
        ip.destination,
        [10, 1, 0, 11],
        "unicast to the address offered"
    );
    assert_eq!(m.xid(), 0x1234_5678);
    assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 1, 0, 11));
    assert_eq!(m.chaddr()[..6], VM);
    let o = m.opts();
    assert_eq!(o.msg_type(), Some(MessageType::Offer));
    assert_eq!(
        o.get(OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        o.get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 1, 0, 1)]))
    );
    assert_eq!(
        o.get(OptionCode::InterfaceMtu),
        Some(&DhcpOption::InterfaceMtu(1458))
    );
    assert_eq!(
        o.get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 1, 0, 1)))
    );
    assert_eq!(
        o.get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(LEASE_SECS))
    );
    assert!(o.get(OptionCode::ClasslessStaticRoute).is_none());
}

#[test]
fn a_request_for_the_record_s_address_is_acked_and_another_is_naked_by_broadcast() {
    let ours = vec![
        DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 0, 11)),
        DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 1, 0, 1)),
    ];
    let req = request_of(&frame(MessageType::Request, VM, ours, true)).unwrap();
    let (reply, kind) = answer(&req, &lease(None)).unwrap();
    assert_eq!(kind, "ack");
    let (eth, ip, m) = decoded(&reply);
    assert_eq!(eth.destination, [0xff; 6], "the client asked for broadcast");
    assert_eq!(ip.destination, [255; 4]);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 1, 0, 11));

    let other = vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 0, 99))];
    let req = request_of(&frame(MessageType::Request, VM, other, false)).unwrap();
    let (reply, kind) = answer(&req, &lease(None)).unwrap();
    assert_eq!(kind, "nak");
    let (eth, _, m) = decoded(&reply);
    assert_eq!(eth.destination, [0xff; 6]);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(m.opts().get(OptionCode::Router).is_none());
}

#[test]
fn a_domain_without_a_default_route_is_given_its_prefixes_through_the_gateway() {
    let routes: Vec<Subnet> = vec![
        "10.2.0.0/24".parse().unwrap(),
        "192.0.2.0/24".parse().unwrap(),
    ];
    let req = request_of(&frame(MessageType::Discover, VM, vec![], false)).unwrap();
    let (reply, _) = answer(&req, &lease(Some(routes))).unwrap();
    let (_, _, m) = decoded(&reply);
    let gw = Ipv4Addr::new(10, 1, 0, 1);
    assert_eq!(
        m.opts().get(OptionCode::ClasslessStaticRoute),
        Some(&DhcpOption::ClasslessStaticRoute(vec![
            ("10.2.0.0/24".parse().unwrap(), gw),
            ("192.0.2.0/24".parse().unwrap(), gw),
        ]))
    );
}

#[test]
fn requests_nv_must_not_answer_say_why() {
    // Another VM's hardware address in the request.
    let req = request_of(&frame(
        MessageType::Discover,
        [2, 0, 0, 0, 0, 0x99],
        vec![],
        false,
    ))
    .unwrap();
    assert_eq!(answer(&req, &lease(None)), Err(Unanswered::MacMismatch));
    // A request for another server's offer.
    let other = vec![DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 1, 0, 254))];
    let req = request_of(&frame(MessageType::Request, VM, other, false)).unwrap();
    assert_eq!(answer(&req, &lease(None)), Err(Unanswered::OtherServer));
    let req = request_of(&frame(MessageType::Release, VM, vec![], false)).unwrap();
    assert_eq!(answer(&req, &lease(None)), Err(Unanswered::Release));
    // Not DHCP, cut short, or not a client's.
    let good = frame(MessageType::Discover, VM, vec![], false);
    for bad in [&good[..50], &good[..14], &[0u8; 3][..]] {
        assert_eq!(request_of(bad), Err(Unanswered::Malformed));
    }
    let mut reply = good.clone();
    reply[42] = 2; // BOOTREPLY
    assert_eq!(request_of(&reply), Err(Unanswered::Malformed));
}

#[test]
fn mutated_requests_are_answered_or_refused_never_a_panic() {
    let good = frame(
        MessageType::Request,
        VM,
        vec![
            DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 0, 11)),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 1, 0, 1)),
        ],
        false,
    );
    let routes = Some(vec!["10.2.0.0/24".parse().unwrap()]);
    // xorshift: the same frames every run.
    let mut x: u64 = 0x6e76_d4c9;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut decoded, mut answered) = (0u32, 0u32);
    for _ in 0..20_000 {
        let mut f = good.clone();
        #[expect(clippy::cast_possible_truncation, reason = "small values")]
        for _ in 0..=next() % 8 {
            // Only the DHCP message and its options: the headers before it are etherparse's.
            let at = 42 + (next() as usize) % (f.len() - 42);
            f[at] = next() as u8;
        }
        if next() % 4 == 0 {
            #[expect(clippy::cast_possible_truncation, reason = "small values")]
            f.truncate(42 + (next() as usize) % (f.len() - 41));
        }
        if let Ok(req) = request_of(&f) {
            decoded += 1;
            answered += u32::from(answer(&req, &lease(routes.clone())).is_ok());
        }
    }
    // Both kinds of outcome happened, so the loop exercised the answer too.
    assert!(
        decoded > 1000 && answered > 100,
        "{decoded} decoded, {answered} answered"
    );
}
