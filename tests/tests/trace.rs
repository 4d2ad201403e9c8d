//! `nvctl trace`: a described or captured packet run through a copy of the loaded programs on
//! the live maps; its verdict, records and output checked, the output frame read by tshark,
//! and nothing that forwards or counts changed by it.
use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};
use nv_tests::testbed::{Host, TwoHosts};

/// `nvctl -o json trace ARGS` on `h`.
fn trace(h: &Host, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut all = vec!["trace"];
    all.extend_from_slice(args);
    h.nvctl_json(&all)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[test]
fn nvctl_trace_tells_where_a_packet_goes_and_why() -> anyhow::Result<()> {
    let bed = TwoHosts::build("tr")?;
    bed.configure()?;
    let h1 = &bed.hosts[0];
    let before = h1.counters()?;
    from_a_vm(&bed)?;
    from_the_uplink(h1)?;
    a_captured_frame(&bed)?;
    // Tracing changed nothing that is counted: only the real ping moved the counters.
    let after = h1.counters()?;
    for (name, n) in &after {
        let was = before.get(name).copied().unwrap_or(0);
        let real = matches!(
            name.as_str(),
            "vm_tx_encap"
                | "uplink_decap"
                | "uplink_delivered"
                | "vm_arp_replied"
                | "drop_vm_not_ip"
                | "drop_vm_nd_unanswered"
        );
        ensure!(
            real || *n == was,
            "{name} moved from {was} to {n} while tracing"
        );
    }
    ensure!(
        nv_tests::testbed::delta(&before, &after, "vm_tx_encap") == 1,
        "vm_tx_encap moved by more than the one real echo"
    );
    Ok(())
}

/// RED-1 to RED-2 (host 2): encapsulated out of the uplink, the output read by tshark; to an
/// unknown destination or from a spoofed source: drops with their reasons.
fn from_a_vm(bed: &TwoHosts) -> anyhow::Result<()> {
    let h1 = &bed.hosts[0];
    let t = trace(
        h1,
        &[
            "--port", "red1", "--dst", "10.0.0.2", "--proto", "udp", "--dport", "53",
        ],
    )?;
    ensure!(t["verdict"] == "redirect", "{t}");
    ensure!(
        t["counter"] == "vm_tx_encap" && t["out_port"] == "uplink0",
        "{t}"
    );
    ensure!(
        t["lookups"]
            .to_string()
            .contains("VSID 5001 CA 10.0.0.2: PA 198.18.0.2 encap, on another host"),
        "{t}"
    );
    let file = bed.tmp_dir().join("trace-out.pcap");
    nv_tests::capture::write_pcap(
        &file,
        &[unhex(t["output_frame"].as_str().context("output frame")?)],
    )?;
    let decoded = nv_tests::capture::decode(&file)?;
    let p = decoded.first().context("tshark read nothing")?;
    ensure!(
        p.ip_src == ["198.18.0.1", "10.0.0.1"] && p.ip_dst == ["198.18.0.2", "10.0.0.2"],
        "tshark: {p:?}"
    );
    ensure!(
        p.gre_key.map(|k| k >> 8) == Some(5001) && p.gre_proto == Some(0x6558),
        "tshark: {p:?}"
    );
    // As an operator reads it.
    let text = h1.nvctl(&["trace", "--port", "red1", "--dst", "10.0.0.2"])?;
    println!("{text}");
    ensure!(
        text.contains("verdict   redirect (vm_tx_encap)") && text.contains("leaves    by uplink0"),
        "{text}"
    );
    let t = trace(h1, &["--port", "red1", "--dst", "10.0.0.99"])?;
    ensure!(
        t["verdict"] == "drop" && t["counter"] == "drop_vm_unknown_dst",
        "{t}"
    );
    ensure!(
        t["why"].as_str().unwrap_or("").contains("no lookup record"),
        "{t}"
    );
    let t = trace(
        h1,
        &["--port", "red1", "--src", "10.0.0.9", "--dst", "10.0.0.2"],
    )?;
    ensure!(t["counter"] == "drop_vm_spoofed_ip", "{t}");
    Ok(())
}

/// NVGRE from host 2 for RED-1: into RED-1's namespace; for BLUE's VSID: into BLUE-1's.
fn from_the_uplink(h1: &Host) -> anyhow::Result<()> {
    let t = trace(
        h1,
        &[
            "--from-uplink",
            "--vsid",
            "5001",
            "--src",
            "10.0.0.2",
            "--dst",
            "10.0.0.1",
        ],
    )?;
    ensure!(t["verdict"] == "redirect" && t["out_port"] == "red1", "{t}");
    ensure!(
        t["output"][1]
            .as_str()
            .unwrap_or("")
            .starts_with("IPv4 10.0.0.2 > 10.0.0.1"),
        "{t}"
    );
    let t = trace(
        h1,
        &[
            "--from-uplink",
            "--vsid",
            "6001",
            "--src",
            "10.0.0.2",
            "--dst",
            "10.0.0.1",
        ],
    )?;
    ensure!(t["out_port"] == "blue1", "{t}");
    Ok(())
}

/// A frame RED-1 really sent, captured with tcpdump on its port, traced as it is.
fn a_captured_frame(bed: &TwoHosts) -> anyhow::Result<()> {
    let h1 = &bed.hosts[0];
    let pcap = bed.tmp_dir().join("red1.pcap");
    let mut dump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h1.ns.name,
            "timeout",
            "10",
            "tcpdump",
            "-i",
            "red1",
            "-c",
            "1",
        ])
        .args(["-U", "--immediate-mode", "-w"])
        .arg(&pcap)
        .arg("icmp")
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    ensure!(bed.ping("RED-1", "10.0.0.2", 1)? == 1, "RED-1's ping");
    dump.wait()?;
    let t = trace(
        h1,
        &["--port", "red1", "--pcap", pcap.to_str().context("utf-8")?],
    )?;
    ensure!(t["counter"] == "vm_tx_encap", "the captured echo: {t}");
    ensure!(
        t["input"].to_string().contains("ICMP echo request"),
        "the captured frame: {t}"
    );
    Ok(())
}
