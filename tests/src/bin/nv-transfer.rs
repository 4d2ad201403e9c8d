//! Bounded transfers with a content check, run inside VM namespaces by the tests and the demo.
//! Each side prints "COUNT SHA256" of what it sent or what arrived intact, so equal lines mean
//! everything arrived unchanged.
//!
//! ```text
//! nv-transfer tcp-serve ADDR [--timeout S]             one connection; COUNT is bytes
//! nv-transfer tcp-send ADDR --bytes N [--timeout S]
//! nv-transfer udp-serve ADDR --count N [--timeout S]   COUNT is datagrams arrived intact
//! nv-transfer udp-send ADDR --count N --size B [--timeout S]
//! nv-transfer frame-flood ADDR --seconds S --size B  UDP as raw frames, for S seconds: "sent N",
//!                                                   then "cpu_ns T" (this process's CPU time)
//!     [--rate PPS]                                   at most PPS frames a second
//!     [--spread N]                                   to N addresses from ADDR's on, in turns
//! nv-transfer udp-sink ADDR --seconds S             counts datagrams for S seconds: "received N"
//! nv-transfer udp-hold ADDR --seconds S             a bound socket nobody reads, for S seconds
//! nv-transfer tap-sink TAP --seconds S              reads frames from tap TAP as QEMU does:
//!                                                   "received N"
//! nv-transfer tcp-connect ADDR --count N            N connections, 1 s each:
//!                                                   "connected C refused R timedout T"
//! nv-transfer udp-spray ADDR --count N              one datagram from each of N sockets
//!                                                   (N flows): "sent N"
//! nv-transfer udp-from ADDR --from PORT --count N    N datagrams from local port PORT:
//!                                                   "sent N"
//! ```
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
type Digest = sha2::digest::Output<Sha256>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let number = |name: &str| -> Result<u64> {
        Ok(flag(name).ok_or(format!("{name} is required"))?.parse()?)
    };
    let timeout = Duration::from_secs(flag("--timeout").map_or(Ok(30), |s| s.parse())?);
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2)) else {
        return Err(
            "usage: nv-transfer tcp-serve|tcp-send|udp-serve|udp-send ADDR [...] (see the source)"
                .into(),
        );
    };
    match mode.as_str() {
        "frame-flood" => {
            let sent = frame_flood(
                addr,
                Duration::from_secs_f64(flag("--seconds").ok_or("--seconds is required")?.parse()?),
                usize::try_from(number("--size")?)?,
                Pace {
                    rate: flag("--rate").map(|r| r.parse()).transpose()?,
                    spread: flag("--spread").map_or(Ok(1), |n| n.parse())?,
                },
            )?;
            println!("sent {sent}");
            println!("cpu_ns {}", own_cpu_ns()?);
            return Ok(());
        }
        "tap-sink" => {
            let got = tap_sink(
                addr,
                Duration::from_secs_f64(flag("--seconds").ok_or("--seconds is required")?.parse()?),
            )?;
            println!("received {got}");
            return Ok(());
        }
        "udp-hold" => {
            // Datagrams queue until the socket's buffer is full, then the kernel drops them:
            // delivered, without a reader's wake-up per datagram.
            let _sock = UdpSocket::bind(addr)?;
            std::thread::sleep(Duration::from_secs_f64(
                flag("--seconds").ok_or("--seconds is required")?.parse()?,
            ));
            return Ok(());
        }
        "udp-sink" => {
            let got = udp_sink(
                addr,
                Duration::from_secs_f64(flag("--seconds").ok_or("--seconds is required")?.parse()?),
            )?;
            println!("received {got}");
            return Ok(());
        }
        "tcp-connect" => {
            let (c, r, t) = tcp_connect(addr, number("--count")?)?;
            println!("connected {c} refused {r} timedout {t}");
            return Ok(());
        }
        "udp-from" => {
            let port = u16::try_from(number("--from")?)?;
            let s = UdpSocket::bind(("0.0.0.0", port))?;
            let count = number("--count")?;
            for _ in 0..count {
                s.send_to(b"nv", addr)?;
            }
            println!("sent {count}");
            return Ok(());
        }
        "udp-spray" => {
            println!("sent {}", udp_spray(addr, number("--count")?)?);
            return Ok(());
        }
        _ => {}
    }
    let (count, digest) = match mode.as_str() {
        "tcp-serve" => tcp_serve(addr, timeout)?,
        "tcp-send" => tcp_send(addr, number("--bytes")?, timeout)?,
        "udp-serve" => udp_serve(addr, number("--count")?, timeout)?,
        "udp-send" => udp_send(
            addr,
            number("--count")?,
            usize::try_from(number("--size")?)?,
        )?,
        other => return Err(format!("unknown mode {other}").into()),
    };
    println!("{count} {digest:x}");
    Ok(())
}

/// Deterministic, incompressible bytes: xorshift64 from `seed`.
fn fill(buf: &mut [u8], seed: u64) {
    let mut state = seed | 1;
    for chunk in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

fn tcp_serve(addr: &str, timeout: Duration) -> Result<(u64, Digest)> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let (mut hash, mut total) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hash.finalize()))
}

fn tcp_send(addr: &str, bytes: u64, timeout: Duration) -> Result<(u64, Digest)> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_write_timeout(Some(timeout))?;
    let (mut hash, mut total) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 1 << 16];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while total < bytes {
        seed = seed.wrapping_add(1);
        fill(&mut buf, seed);
        let n = usize::try_from((bytes - total).min(buf.len() as u64))?;
        stream.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        total += n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    Ok((total, hash.finalize()))
}

/// A datagram: its sequence number, then bytes derived from it.
fn datagram(seq: u64, size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size.max(8)];
    d[..8].copy_from_slice(&seq.to_be_bytes());
    fill(&mut d[8..], seq.wrapping_mul(0x2545_f491_4f6c_dd1d));
    d
}

fn udp_send(addr: &str, count: u64, size: usize) -> Result<(u64, Digest)> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let mut hash = Sha256::new();
    for seq in 0..count {
        let d = datagram(seq, size);
        sock.send_to(&d, addr)?;
        hash.update(&d);
        // Paced, so a receiver on a busy machine keeps up: this checks content, not speed.
        if seq % 32 == 31 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok((count, hash.finalize()))
}

fn udp_serve(addr: &str, count: u64, timeout: Duration) -> Result<(u64, Digest)> {
    let sock = UdpSocket::bind(addr)?;
    let deadline = Instant::now() + timeout;
    let mut intact = BTreeMap::new();
    let mut buf = vec![0u8; 1 << 16];
    while (intact.len() as u64) < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // After the first datagram, 3 s of silence ends the run: the sender is done.
        let idle = if intact.is_empty() {
            left
        } else {
            left.min(Duration::from_secs(3))
        };
        sock.set_read_timeout(Some(idle))?;
        let Ok(n) = sock.recv(&mut buf) else { break };
        if n < 8 {
            continue;
        }
        let seq = u64::from_be_bytes(buf[..8].try_into()?);
        if buf[..n] == datagram(seq, n)[..] {
            intact.insert(seq, buf[..n].to_vec());
        }
    }
    let mut hash = Sha256::new();
    for d in intact.values() {
        hash.update(d);
    }
    Ok((intact.len() as u64, hash.finalize()))
}

/// This process's CPU time so far, user and system, ns. The kernel scales its tick samples to
/// the scheduler's exact run time, which includes the softirq work done in this process's
/// context: with veth, a sent frame's whole way to the receiving socket.
fn own_cpu_ns() -> Result<u64> {
    // SAFETY: zeroed rusage is valid; the call fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let us = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    Ok((us(usage.ru_utime) + us(usage.ru_stime)) * 1000)
}

/// How a flood sends: at most `rate` frames a second (as fast as it can without), to `spread`
/// consecutive addresses in turns.
#[derive(Clone, Copy)]
struct Pace {
    rate: Option<f64>,
    spread: u32,
}

/// Sends UDP datagrams of `size` payload bytes to `addr` as ready-made Ethernet frames in
/// batches of 64 (`sendmmsg` on an `AF_PACKET` socket that bypasses the qdisc) until `duration`
/// has passed. A UDP socket spends most of each packet in its own stack (route, socket, IP
/// output, neighbour), which would bound every configuration alike and hide the path under
/// test; a raw frame costs little more than the device's transmit. Every frame of a spread goes
/// to the MAC of `addr`'s neighbour (or gateway).
fn frame_flood(addr: &str, duration: Duration, size: usize, pace: Pace) -> Result<u64> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BATCH: u32 = 64;
    let dst: std::net::SocketAddrV4 = addr.parse()?;
    // The kernel's own choice of device and source address for this destination.
    let probe = UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(dst)?;
    let std::net::SocketAddr::V4(src) = probe.local_addr()? else {
        return Err("IPv4 only".into());
    };
    // Off-link: the frame goes to the gateway's MAC, as the kernel would send it.
    let (dev, dst_mac) = neighbour(*dst.ip()).or_else(|_| neighbour(gateway_for(*dst.ip())?))?;
    let src_mac = mac(&std::fs::read_to_string(format!(
        "/sys/class/net/{dev}/address"
    ))?)?;
    let first = u32::from(*dst.ip());
    let frames = (0..pace.spread.max(1))
        .map(|n| {
            let mut frame = Vec::new();
            let to = std::net::Ipv4Addr::from(first.wrapping_add(n));
            etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
                .ipv4(src.ip().octets(), to.octets(), 64)
                .udp(src.port(), dst.port())
                .write(&mut frame, &vec![0x5au8; size])?;
            Ok(frame)
        })
        .collect::<Result<Vec<Vec<u8>>>>()?;

    // SAFETY: plain socket call; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: an int option of the size given.
    if unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            4,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error().into());
    }
    let ifindex = std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))?
        .trim()
        .parse()?;
    // SAFETY: zeroed sockaddr_ll is valid; the fields that matter are set below.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = u16::try_from(libc::AF_PACKET)?;
    to.sll_ifindex = ifindex;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&dst_mac);
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr().cast_mut().cast(),
            iov_len: f.len(),
        })
        .collect();
    // Every frame of the spread once, then as many more as make whole batches.
    let per_round = iovs.len().div_ceil(BATCH as usize) * BATCH as usize;
    let base = iovs.as_mut_ptr();
    let count = iovs.len();
    // SAFETY: zeroed mmsghdr is valid; each points at an iovec and the address above, which
    // outlive the loop.
    let mut msgs: Vec<libc::mmsghdr> = (0..per_round)
        .map(|i| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            // SAFETY: `i % count` is within `iovs`.
            m.msg_hdr.msg_iov = unsafe { base.add(i % count) };
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&raw mut to).cast();
            #[expect(clippy::cast_possible_truncation, reason = "20 bytes")]
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            m.msg_hdr.msg_namelen = len;
            m
        })
        .collect();
    let start = Instant::now();
    let deadline = start + duration;
    let (mut sent, mut at) = (0u64, 0usize);
    while Instant::now() < deadline {
        if let Some(rate) = pace.rate {
            #[expect(clippy::cast_precision_loss, reason = "frame counts")]
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        // SAFETY: msgs holds `per_round` valid headers, and `at` + BATCH <= per_round.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr().add(at), BATCH, 0) };
        if let Ok(n) = u64::try_from(n) {
            sent += n;
            at = (at + BATCH as usize) % per_round;
        }
    }
    Ok(sent)
}

/// The gateway of the most specific route to `ip` in this namespace (`/proc/net/route`).
fn gateway_for(ip: std::net::Ipv4Addr) -> Result<std::net::Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route")?;
    let hex = |f: &str| u32::from_str_radix(f, 16);
    let addr = u32::from_le_bytes(ip.octets());
    let mut best: Option<(u32, u32)> = None;
    for line in table.lines().skip(1) {
        // Iface, Destination, Gateway, Flags, RefCnt, Use, Metric, Mask: little-endian hex.
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dest), Some(gw), Some(mask)) = (f.get(1), f.get(2), f.get(7)) else {
            continue;
        };
        let (dest, gw, mask) = (hex(dest)?, hex(gw)?, hex(mask)?);
        if gw != 0
            && addr & mask == dest
            && best.is_none_or(|(m, _)| mask.count_ones() > m.count_ones())
        {
            best = Some((mask, gw));
        }
    }
    let (_, gw) = best.ok_or_else(|| format!("no route with a gateway to {ip}"))?;
    Ok(std::net::Ipv4Addr::from(gw.to_le_bytes()))
}

/// The device and resolved MAC of `ip` in this namespace's ARP table.
fn neighbour(ip: std::net::Ipv4Addr) -> Result<(String, [u8; 6])> {
    let table = std::fs::read_to_string("/proc/net/arp")?;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // IP address, HW type, flags (0x2: complete, 0x4: permanent), HW address, mask, device.
        let complete = f
            .get(2)
            .and_then(|x| u32::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .is_some_and(|flags| flags & 0x2 != 0);
        if f.len() == 6 && f[0] == ip.to_string() && complete {
            return Ok((f[5].to_owned(), mac(f[3])?));
        }
    }
    Err(format!("no resolved neighbour for {ip}: ping it first").into())
}

fn mac(text: &str) -> Result<[u8; 6]> {
    Ok(text.trim().parse::<nv_agent::model::Mac>()?.0)
}

/// Counts datagrams arriving at `addr` for `duration`.
fn udp_sink(addr: &str, duration: Duration) -> Result<u64> {
    let sock = UdpSocket::bind(addr)?;
    let deadline = Instant::now() + duration;
    let mut buf = vec![0u8; 2048];
    let mut got = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left))?;
        if sock.recv(&mut buf).is_ok() {
            got += 1;
        }
    }
    Ok(got)
}

/// Attaches to the existing tap `name` (as QEMU's `-netdev tap` does: `TUNSETIFF` on
/// /dev/net/tun, no packet info) and counts the frames it reads for `duration`.
fn tap_sink(name: &str, duration: Duration) -> Result<u64> {
    use std::os::fd::AsRawFd as _;
    /// `TUNSETIFF`, `IFF_TAP` and `IFF_NO_PI` from `linux/if_tun.h`.
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: the name, then the flags; 40 bytes.
    let mut ifr = [0u8; 40];
    if name.len() >= 16 {
        return Err(format!("tap name {name} is too long").into());
    }
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq of this size.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } != 0 {
        return Err(format!("attach to tap {name}: {}", std::io::Error::last_os_error()).into());
    }
    let deadline = Instant::now() + duration;
    let mut buf = vec![0u8; 65_536];
    let mut got = 0u64;
    let mut fds = libc::pollfd {
        fd: tun.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&raw mut fds, 1, ms) } > 0 {
            // SAFETY: reading into our own buffer of the given length.
            let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                got += 1;
            }
        }
    }
    Ok(got)
}

/// Opens `count` TCP connections to `addr` one after another, each given 1 s: how many
/// connected, were refused (a reset: the packets reached the host) and timed out (nothing
/// came back).
fn tcp_connect(addr: &str, count: u64) -> Result<(u64, u64, u64)> {
    let to: std::net::SocketAddr = addr.parse()?;
    let (mut connected, mut refused, mut timedout) = (0, 0, 0);
    for _ in 0..count {
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(_) => connected += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(_) => timedout += 1,
        }
    }
    Ok((connected, refused, timedout))
}

/// Sends one datagram to `addr` from each of `count` sockets (each its own source port, so
/// its own flow).
fn udp_spray(addr: &str, count: u64) -> Result<u64> {
    let mut sent = 0;
    for _ in 0..count {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.send_to(b"nv", addr)?;
        sent += 1;
    }
    Ok(sent)
}
