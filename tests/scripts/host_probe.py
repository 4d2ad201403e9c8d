"""Probes of a host's isolation for nv's tests: what a local user, a VM's kernel (its offload
metadata) or a guest's tap can make the host do. Plain sockets, no scapy: the bytes are built
here, independently of nv. Everything is bounded in count and time; nothing loops forever.

Usage: host_probe.py speak SRC DST PORT      as the caller (a local user): bind SRC and send a
                                             datagram to DST:PORT, then the same with
                                             IP_FREEBIND; prints one line per attempt
       host_probe.py listen PORT SECONDS     UDP: prints "from SRC: PAYLOAD" per datagram
       host_probe.py serve PORT SECONDS      TCP: accepts and closes connections
       host_probe.py connect DST PORT        TCP: prints "connected" or "failed: why" (2 s)
       host_probe.py vnet IFACE KIND SRC_MAC DST_MAC SRC DST
                                             one UDP frame with a virtio-net header
                                             (PACKET_VNET_HDR), checksum left to the host:
                                             KIND "own" points at the UDP checksum, "ip" into
                                             the IPv4 header (its destination address)
       host_probe.py tso TAP SRC_MAC DST_MAC SRC DST BYTES
                                             one TCP super-packet of BYTES payload written
                                             into the tap as a guest's virtio-net would
                                             (gso_size 1448, no segment count), then one
                                             small frame
       host_probe.py idle HOST PORT COUNT SECONDS
                                             opens COUNT TCP connections, sends nothing,
                                             holds them SECONDS; prints how many opened
"""
import resource
import socket
import struct
import sys
import time

IP_FREEBIND = 15
SOL_PACKET, PACKET_VNET_HDR = 263, 15
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4 = 0, 1


def mac(s):
    return bytes(int(x, 16) for x in s.split(":"))


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ipv4(src, dst, proto, payload_len, ident=1):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", 0xFFFF - csum(h)) + h[12:]


def speak(src, dst, port):
    for freebind in (False, True):
        what = "freebind" if freebind else "bind"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if freebind:
                s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            s.bind((src, 0))
            s.sendto(b"nv-local-user", (dst, port))
            print(what, "sent")
        except OSError as e:
            print(what, "refused:", e.strerror)
        finally:
            s.close()


def listen(port, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    end = time.time() + seconds
    print("listening", flush=True)
    while time.time() < end:
        try:
            data, (src, _) = s.recvfrom(65536)
        except socket.timeout:
            continue
        print("from %s: %s" % (src, data.decode(errors="replace")), flush=True)


def serve(port, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    s.settimeout(0.2)
    end = time.time() + seconds
    print("serving", flush=True)
    while time.time() < end:
        try:
            c, (src, _) = s.accept()
        except socket.timeout:
            continue
        print("accepted", src, flush=True)
        c.close()


def connect(dst, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((dst, port))
        print("connected")
    except OSError as e:
        print("failed:", e.strerror or e)


def vnet(iface, kind, src_mac, dst_mac, src, dst):
    payload = b"nv-vnet-" + kind.encode() + b"-" + bytes(range(64))
    udp_len = 8 + len(payload)
    ip = ipv4(src, dst, 17, udp_len)
    # The pseudo-header sum, as a stack leaves it for the device to complete.
    pseudo = struct.pack("!4s4sBBH", socket.inet_aton(src), socket.inet_aton(dst), 0, 17, udp_len)
    udp = struct.pack("!HHHH", 40000, 9, udp_len, csum(pseudo)) + payload
    frame = mac(dst_mac) + mac(src_mac) + b"\x08\x00" + ip + udp
    if kind == "own":
        start, offset = 14 + 20, 6
    else:
        # From the source address on; the result lands on the destination address's low half.
        start, offset = 14 + 12, 6
    hdr = struct.pack("<BBHHHH", VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0,
                      start, offset)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.bind((iface, 0))
    s.send(hdr + frame)
    print("sent", kind)


def tso(tap, src_mac, dst_mac, src, dst, size):
    import fcntl

    TUNSETIFF, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x400454CA, 0x0002, 0x1000, 0x4000
    fd = open("/dev/net/tun", "r+b", buffering=0)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    payload = bytes((i * 7) & 0xFF for i in range(size))
    tcp_len = 20 + len(payload)
    ip = ipv4(src, dst, 6, tcp_len)
    pseudo = struct.pack("!4s4sBBH", socket.inet_aton(src), socket.inet_aton(dst), 0, 6, tcp_len)
    tcp = struct.pack("!HHIIBBHHH", 40000, 9, 1, 0, 5 << 4, 0x18, 65535, csum(pseudo), 0) + payload
    frame = mac(dst_mac) + mac(src_mac) + b"\x08\x00" + ip + tcp
    hdr = struct.pack("<BBHHHH", VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 14 + 20 + 20,
                      1448, 14 + 20, 16)
    fd.write(hdr + frame)
    small = b"nv-small"
    ip = ipv4(src, dst, 17, 8 + len(small), ident=2)
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(small), 0) + small
    fd.write(struct.pack("<BBHHHH", 0, 0, 0, 0, 0, 0) + mac(dst_mac) + mac(src_mac) + b"\x08\x00" + ip + udp)
    print("written", len(frame))
    time.sleep(0.5)
    fd.close()


def idle(host, port, count, seconds):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 64), hard))
    conns = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect((host, port))
            conns.append(s)
        except OSError:
            s.close()
    print("opened", len(conns), flush=True)
    time.sleep(seconds)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "speak":
        speak(args[0], args[1], int(args[2]))
    elif cmd == "listen":
        listen(int(args[0]), float(args[1]))
    elif cmd == "serve":
        serve(int(args[0]), float(args[1]))
    elif cmd == "connect":
        connect(args[0], int(args[1]))
    elif cmd == "vnet":
        vnet(*args)
    elif cmd == "tso":
        tso(*args[:5], int(args[5]))
    elif cmd == "idle":
        idle(args[0], int(args[1]), int(args[2]), float(args[3]))
    else:
        sys.exit("unknown command " + cmd)


main()
