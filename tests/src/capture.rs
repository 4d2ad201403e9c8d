//! Underlay captures with tcpdump, decoded by tshark: an independent decoder, not our parser.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{netns::Netns, sys::run};

/// A running tcpdump, stopped (by its pid) on drop.
pub struct Capture {
    child: Child,
    pub file: PathBuf,
    /// What tcpdump said on stderr.
    log: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    /// Captures on `iface` inside `ns` into `file`, at most `max_seconds`.
    pub fn start(
        ns: &Netns,
        iface: &str,
        file: &Path,
        max_seconds: u32,
    ) -> anyhow::Result<Capture> {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "timeout",
                &max_seconds.to_string(),
                "tcpdump",
                "-i",
                iface,
                "-U",
                "--immediate-mode",
                "-n",
                "-s",
                "0",
                // Immediate mode rings one snaplen-sized slot a packet: with the default 2 MiB,
                // a burst of a super-packet's segments overran it.
                "-B",
                "65536",
                "-w",
            ])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start tcpdump")?;
        let mut cap = Capture {
            child,
            file: file.to_owned(),
            log: Arc::default(),
        };
        // tcpdump says "listening on" once its socket is open; packets before that are lost.
        let stderr = cap.child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = mpsc::channel();
        let log = cap.log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                log.lock().expect("log lock").push(line);
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .context("tcpdump did not start listening within 10 s")?;
        Ok(cap)
    }

    /// Stops the capture and returns the file.
    pub fn stop(mut self) -> anyhow::Result<PathBuf> {
        thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling the child we spawned, by its pid (`timeout` passes it on).
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
        let _ = self.child.wait();
        if !self.file.exists() {
            bail!(
                "tcpdump wrote no capture file: {:?}",
                self.log.lock().expect("log lock")
            );
        }

        Ok(self.file.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The frames of a classic pcap file, as captured (the container only; packets are for tshark
/// to decode).
pub fn frames(file: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(file)?;
    if bytes.len() < 24 || bytes[..4] != [0xd4, 0xc3, 0xb2, 0xa1] {
        bail!(
            "{} is not a little-endian classic pcap file",
            file.display()
        );
    }
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?) as usize;
        let start = at + 16;
        let frame = bytes
            .get(start..start + len)
            .context("truncated pcap record")?;
        out.push(frame.to_vec());
        at = start + len;
    }
    Ok(out)
}

/// One IPv4 packet as tshark decoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// `ip.src`/`ip.dst` of every IPv4 layer, outermost first.
    pub ip_src: Vec<String>,
    pub ip_dst: Vec<String>,
    /// GRE key, when there is a GRE layer.
    pub gre_key: Option<u32>,
    pub gre_proto: Option<u16>,
    /// Whether tshark verified each IPv4 header checksum as good (`ip.checksum.status` 1; 0 is
    /// bad, 2 unverified).
    pub ip_checksum_ok: Vec<bool>,
    pub protocols: String,
    /// TCP or UDP checksum status per tshark (1 good, 0 bad, 2 unverified), when present.
    pub l4_checksum_status: Option<u32>,
}

/// Decodes every IPv4 packet of a capture with tshark.
pub fn decode(file: &Path) -> anyhow::Result<Vec<Decoded>> {
    let fields = [
        "ip.src",
        "ip.dst",
        "gre.key",
        "gre.proto",
        "ip.checksum.status",
        "frame.protocols",
        "tcp.checksum.status",
        "udp.checksum.status",
    ];
    tshark_fields(file, "ip", &["ip.check_checksum:TRUE"], &fields)?
        .iter()
        .map(|f| {
            Ok(Decoded {
                ip_src: list(&f[0]),
                ip_dst: list(&f[1]),
                gre_key: num(&f[2])?,
                gre_proto: num(&f[3])?.map(|p| u16::try_from(p).unwrap_or(0)),
                ip_checksum_ok: list(&f[4]).iter().map(|s| s == "1").collect(),
                protocols: f[5].clone(),
                l4_checksum_status: num(&f[6])?.or(num(&f[7])?),
            })
        })
        .collect()
}

/// The fields of every packet of `file` that `filter` selects, as tshark prints them (every
/// occurrence, comma-joined), with TCP and UDP checksums verified and `options` set too.
fn tshark_fields(
    file: &Path,
    filter: &str,
    options: &[&str],
    fields: &[&str],
) -> anyhow::Result<Vec<Vec<String>>> {
    let file = file.to_str().context("utf-8 path")?;
    let mut args = vec!["-r", file];
    for o in ["tcp.check_checksum:TRUE", "udp.check_checksum:TRUE"]
        .iter()
        .chain(options)
    {
        args.extend(["-o", o]);
    }
    args.extend(["-Y", filter, "-T", "fields"]);
    args.extend([
        "-E",
        "separator=|",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ]);
    for f in fields {
        args.extend(["-e", f]);
    }
    let out = run("tshark", &args)?;
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<String> = line.split('|').map(str::to_owned).collect();
            if f.len() < fields.len() {
                bail!("unexpected tshark line: {line}");
            }
            Ok(f)
        })
        .collect()
}

/// One packet with an IPv6 layer as tshark decoded it: NVGRE over an IPv6 underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded6 {
    /// `ipv6.src`/`ipv6.dst` of every IPv6 layer, outermost first.
    pub ipv6_src: Vec<String>,
    pub ipv6_dst: Vec<String>,
    /// The outer header's flow label.
    pub flow_label: Option<u32>,
    /// `ip.src`/`ip.dst` of every IPv4 layer (inside GRE).
    pub ip_src: Vec<String>,
    pub ip_dst: Vec<String>,
    pub gre_key: Option<u32>,
    pub gre_proto: Option<u16>,
    pub protocols: String,
    /// TCP, UDP or `ICMPv6` checksum status per tshark (1 good, 0 bad, 2 unverified).
    pub l4_checksum_status: Option<u32>,
}

/// Decodes every packet with an IPv6 layer of a capture with tshark.
pub fn decode6(file: &Path) -> anyhow::Result<Vec<Decoded6>> {
    let fields = [
        "ipv6.src",
        "ipv6.dst",
        "ipv6.flow",
        "ip.src",
        "ip.dst",
        "gre.key",
        "gre.proto",
        "frame.protocols",
        "tcp.checksum.status",
        "udp.checksum.status",
        "icmpv6.checksum.status",
    ];
    tshark_fields(file, "ipv6", &[], &fields)?
        .iter()
        .map(|f| {
            Ok(Decoded6 {
                ipv6_src: list(&f[0]),
                ipv6_dst: list(&f[1]),
                flow_label: num(&f[2])?,
                ip_src: list(&f[3]),
                ip_dst: list(&f[4]),
                gre_key: num(&f[5])?,
                gre_proto: num(&f[6])?.map(|p| u16::try_from(p).unwrap_or(0)),
                protocols: f[7].clone(),
                l4_checksum_status: num(&f[8])?.or(num(&f[9])?).or(num(&f[10])?),
            })
        })
        .collect()
}

/// A tshark field of every occurrence (`aggregator=,`), as strings.
fn list(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The first occurrence of a numeric tshark field (decimal or 0x hex), if any.
fn num(s: &str) -> anyhow::Result<Option<u32>> {
    let s = s.split(',').next().unwrap_or("");
    if s.is_empty() {
        return Ok(None);
    }
    let v = s
        .strip_prefix("0x")
        .map_or_else(|| s.parse(), |h| u32::from_str_radix(h, 16))?;
    Ok(Some(v))
}

/// Writes `frames` as a classic pcap file (Ethernet), for tshark.
pub fn write_pcap(file: &Path, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    for word in [0u32, 0, 65_535, 1] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    for frame in frames {
        let len = u32::try_from(frame.len())?;
        for word in [0u32, 0, len, len] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(frame);
    }
    Ok(std::fs::write(file, out)?)
}

/// Whether `frame` holds `len` bytes of `byte` in a row: a payload pattern a test sent (ping's
/// `-p`), found wherever the frame carries it (bare, or inside a tunnel).
pub fn has_run(frame: &[u8], byte: u8, len: usize) -> bool {
    frame.windows(len).any(|w| w.iter().all(|x| *x == byte))
}

/// How many of `frames` carry 16 bytes of `byte` in a row ([`has_run`]).
pub fn with_pattern(frames: &[Vec<u8>], byte: u8) -> usize {
    frames.iter().filter(|f| has_run(f, byte, 16)).count()
}
