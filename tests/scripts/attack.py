"""Crafted attacks for nv's isolation tests, sent with scapy (an independent packet builder).

Usage: attack.py vm IFACE          attacks from inside a tenant VM (RED-1)
       attack.py vlan IFACE        VLAN-tagged frames from RED-1 (marked b"nv-vlan"), and the
                                   same frame untagged (marked b"nv-ok": the positive control)
       attack.py underlay IFACE     NVGRE forged by a stranger on the underlay
Every packet carries the marker b"nv-attack" so captures can look for it. Each kind is sent
COUNT times, bounded; nothing loops.
"""
import sys

from scapy.all import ARP, GRE, IP, UDP, Dot1Q, Ether, Raw, get_if_hwaddr, sendp

COUNT = 5
MARK = Raw(b"nv-attack")
RED1_MAC, RED2_MAC, BLUE2_MAC = "02:00:00:00:01:01", "02:00:00:00:02:01", "02:00:00:00:02:02"


def vm(iface):
    frames = [
        # Spoofed source CA (RED-3's address does not belong to this port).
        Ether(src=RED1_MAC, dst=RED2_MAC) / IP(src="10.0.0.3", dst="10.0.0.2") / UDP(sport=1, dport=9) / MARK,
        # Spoofed source MAC (BLUE-2's).
        Ether(src=BLUE2_MAC, dst=RED2_MAC) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=9) / MARK,
        # ARP poisoning: RED-1 claims 10.0.0.2, by gratuitous reply and by request (marked in
        # the frame's padding, after the ARP payload).
        Ether(src=RED1_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=RED1_MAC, psrc="10.0.0.2", hwdst="ff:ff:ff:ff:ff:ff", pdst="10.0.0.2") / MARK,
        Ether(src=RED1_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=RED1_MAC, psrc="10.0.0.2", pdst="10.0.0.1") / MARK,
        # Aiming at the host's provider address, the other host's, and the underlay.
        Ether(src=RED1_MAC, dst=RED2_MAC) / IP(src="10.0.0.1", dst="198.18.0.1") / UDP(sport=1, dport=9) / MARK,
        Ether(src=RED1_MAC, dst=RED2_MAC) / IP(src="10.0.0.1", dst="198.18.0.2") / UDP(sport=1, dport=9) / MARK,
        Ether(src=RED1_MAC, dst=RED2_MAC) / IP(src="10.0.0.1", dst="198.18.255.255") / UDP(sport=1, dport=9) / MARK,
    ]
    # The positive control: a legitimate packet, marked too, that must arrive at RED-2.
    frames.append(Ether(src=RED1_MAC, dst=RED2_MAC) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=9) / Raw(b"nv-legit"))
    for f in frames:
        sendp(f, iface=iface, count=COUNT, verbose=False)


def vlan(iface):
    def to_red2(mark):
        return IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=9) / Raw(mark)
    frames = [
        # One 802.1Q tag (the kernel moves it out of the frame on receive).
        Ether(src=RED1_MAC, dst=RED2_MAC) / Dot1Q(vlan=100) / to_red2(b"nv-vlan"),
        # 802.1ad outer, 802.1Q inner: QinQ, the outer one picking the underlay's service VLAN.
        Ether(src=RED1_MAC, dst=RED2_MAC, type=0x88A8) / Dot1Q(vlan=200, type=0x8100) / Dot1Q(vlan=100) / to_red2(b"nv-vlan"),
        # Two 802.1Q tags stacked.
        Ether(src=RED1_MAC, dst=RED2_MAC) / Dot1Q(vlan=300) / Dot1Q(vlan=100) / to_red2(b"nv-vlan"),
        # The same packet untagged: must arrive.
        Ether(src=RED1_MAC, dst=RED2_MAC) / to_red2(b"nv-ok"),
    ]
    for f in frames:
        sendp(f, iface=iface, count=COUNT, verbose=False)


def underlay(iface, host1_mac):
    # The stranger's own MAC: scapy would otherwise pick 00:00:00:00:00:00 for an interface
    # without a route, and bridges drop that before anyone could.
    me = get_if_hwaddr(iface)
    inner_red = Ether(src=RED2_MAC, dst=RED1_MAC) / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=1, dport=9) / MARK
    frames = [
        # A valid VSID (RED's) and inner frame, from a PA no record names.
        Ether(src=me, dst=host1_mac) / IP(src="198.18.0.66", dst="198.18.0.1", flags="DF") / GRE(key_present=1, key=5001 << 8, proto=0x6558) / inner_red,
        # RED-2's PA forged as the source, under BLUE's VSID, carrying RED-2's frame.
        Ether(src=me, dst=host1_mac) / IP(src="198.18.0.2", dst="198.18.0.1", flags="DF") / GRE(key_present=1, key=6001 << 8, proto=0x6558) / inner_red,
        # A VSID no VM on host1 belongs to.
        Ether(src=me, dst=host1_mac) / IP(src="198.18.0.2", dst="198.18.0.1", flags="DF") / GRE(key_present=1, key=7777 << 8, proto=0x6558) / inner_red,
        # The positive control: what RED-2's host would send, from RED-2's PA (forged, which
        # the underlay must prevent: see the README), must arrive at RED-1.
        Ether(src=me, dst=host1_mac) / IP(src="198.18.0.2", dst="198.18.0.1", flags="DF") / GRE(key_present=1, key=5001 << 8, proto=0x6558)
        / Ether(src=RED2_MAC, dst=RED1_MAC) / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=1, dport=9) / Raw(b"nv-legit"),
    ]
    for f in frames:
        sendp(f, iface=iface, count=COUNT, verbose=False)


if __name__ == "__main__":
    if sys.argv[1] == "vm":
        vm(sys.argv[2])
    elif sys.argv[1] == "vlan":
        vlan(sys.argv[2])
    else:
        underlay(sys.argv[2], sys.argv[3])
