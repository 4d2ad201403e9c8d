"""UDP segmentation offload (UDP_SEGMENT, as QUIC stacks use it), for nv's GSO tests.

Usage: udp_gso.py send DST PORT      5 sends of 14000 bytes, 1400 a datagram: 50 datagrams
       udp_gso.py recv PORT SECONDS  counts the datagrams that arrive intact, for SECONDS
Bounded: a fixed number of sends; the receiver stops after SECONDS.
"""
import socket
import sys
import time

UDP_SEGMENT = 103
SEG, TOTAL, SENDS = 1400, 14000, 5
PAYLOAD = bytes((i * 7 + i // 251) & 0xFF for i in range(TOTAL))
SEGMENTS = {PAYLOAD[i:i + SEG] for i in range(0, TOTAL, SEG)}


def send(dst, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, SEG)
    for _ in range(SENDS):
        s.sendto(PAYLOAD, (dst, port))
    print("sent", SENDS * (TOTAL // SEG))


def recv(port, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Room for the whole burst: 50 datagrams arriving one skb each must not overflow it.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    intact, other = 0, []
    end = time.time() + seconds
    while time.time() < end:
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        if d in SEGMENTS:
            intact += 1
        else:
            other.append(len(d))
    print("intact", intact)
    if other:
        print("changed", other, file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]))
    else:
        recv(int(sys.argv[2]), float(sys.argv[3]))
