//! Isolation through transitions: the states between the steady ones. A port whose record is
//! deleted while its VM runs stays filtered (its frames never reach the host's stack), through an
//! agent restart too, until its device goes; a rewrite VM whose port vanishes while its record
//! stays does not hand its provider address's traffic to the host.
use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use nv_tests::{
    sys::bin,
    testbed::{Translation, TwoHosts, Vm, delta},
};

/// The host end's IPv6 link-local address on `port`, once duplicate address detection is done.
fn host_link_local(bed: &TwoHosts, port: &str) -> anyhow::Result<String> {
    for _ in 0..100 {
        let out = bed.hosts[0]
            .ns
            .ip(&["-6", "-o", "addr", "show", "dev", port, "scope", "link"])?;
        if let Some(line) = out.lines().find(|l| !l.contains("tentative")) {
            let addr = line
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .context("inet6 address")?;
            return Ok(addr.split('/').next().unwrap_or(addr).to_owned());
        }
        thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{port} has no usable link-local address after 10 s")
}

/// Echo replies RED-1 gets from the host's own stack over its bare port: IPv6 to the host
/// end's link-local address, which needs no route or address on the host's side.
fn host_answers(bed: &TwoHosts, link_local: &str) -> anyhow::Result<u32> {
    let red1 = &bed.vm("RED-1").ns;
    let count = |out: std::process::Output| -> u32 {
        String::from_utf8_lossy(&out.stdout)
            .split(',')
            .find_map(|p| p.trim().strip_suffix(" received"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let v6 = count(red1.exec_output(
        "ping",
        &[
            "-6",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            &format!("{link_local}%eth0"),
        ],
    )?);
    Ok(v6)
}

#[test]
fn a_port_whose_record_is_deleted_stays_filtered_until_its_device_goes() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("t")?;
    // The positive control: over a bare port (before nv attached it), the host's stack answers
    // RED-1 at the host end's IPv6 link-local address.
    let ll = host_link_local(&bed, "red1")?;
    // (The first may go to neighbour discovery, and RED-1's own link-local address may still
    // be tentative: a few tries, bounded.)
    let mut replies = 0;
    for _ in 0..10 {
        replies = host_answers(&bed, &ll)?;
        if replies > 0 {
            break;
        }
        thread::sleep(Duration::from_millis(300));
    }
    ensure!(
        replies >= 1,
        "the bare port did not reach the host in 10 tries of 3: the probe proves nothing"
    );
    bed.configure()?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "RED-1 -> RED-2 before the delete"
    );

    // The record goes, the VM keeps running: every frame it sends is dropped and counted.
    bed.hosts[0].nvctl(&["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.1"])?;
    for when in ["after the delete", "after an agent restart"] {
        if when == "after an agent restart" {
            bed.hosts[0].stop_agent();
            bed.hosts[0].start_agent()?;
        }
        let before = bed.hosts[0].counters()?;
        let replies = host_answers(&bed, &ll)?;
        ensure!(
            replies == 0,
            "{when}: RED-1 reached the host's stack ({replies} replies)"
        );
        let dropped = delta(&before, &bed.hosts[0].counters()?, "drop_vm_unknown_port");
        ensure!(
            dropped >= 3,
            "{when}: drop_vm_unknown_port counted {dropped}"
        );
    }

    // nvctl says so.
    let status = bed.hosts[0].nvctl_json(&["status"])?;
    ensure!(
        status["ports_without_record"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "red1")),
        "status does not show red1 as filtered without a record: {status}"
    );

    // The device goes: nv lets go of it, leaving no pin behind.
    let h1 = &bed.hosts[0];
    h1.ns.ip(&["link", "del", "red1"])?;
    let pin = h1.pin_path.join("links/port-red1");
    for _ in 0..100 {
        if !pin.exists() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        !pin.exists(),
        "{} is still pinned after its device went",
        pin.display()
    );
    Ok(())
}

/// Listens on `port` in `ns` for `seconds`; the child exits 0 only if something connected.
fn listen_in(ns: &str, port: u16, seconds: u32) -> anyhow::Result<std::process::Child> {
    let tool = bin("nv-transfer")?;
    Ok(Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(tool)
        .args(["tcp-serve", &format!("0.0.0.0:{port}")])
        .args(["--timeout", &seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn connect(vm: &Vm, dst: &str) -> anyhow::Result<bool> {
    let tool = bin("nv-transfer")?;
    let tool = tool.to_str().context("utf-8 path")?;
    Ok(vm
        .ns
        .exec_output(
            tool,
            &["tcp-send", dst, "--bytes", "1000", "--timeout", "3"],
        )?
        .status
        .success())
}

#[test]
fn a_rewrite_vm_whose_port_vanishes_never_hands_its_pa_to_the_host() -> anyhow::Result<()> {
    let bed = TwoHosts::build("tr")?;
    bed.configure_with(Translation::Rewrite)?;
    let (h1, red2) = (&bed.hosts[0], bed.vm("RED-2"));
    // The positive control: RED-2 reaches a listener in RED-1 through its rewrite PA.
    let server = listen_in(&bed.vm("RED-1").ns.name, 47099, 10)?;
    ensure!(connect(red2, "10.0.0.1:47099")?, "RED-2 cannot reach RED-1");
    ensure!(
        server.wait_with_output()?.status.success(),
        "RED-1's listener saw no connection"
    );

    // RED-1 stops: its port goes, its record stays. A listener on the host itself, on every
    // address (RED-1's PA 198.18.1.1 is one of the host's), must see nothing.
    h1.ns.ip(&["link", "del", "red1"])?;
    for _ in 0..100 {
        let status = h1.nvctl_json(&["status"])?;
        if status["ports_missing"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "red1"))
        {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let before = h1.counters()?;
    let host = listen_in(&h1.ns.name, 47099, 5)?;
    ensure!(
        !connect(red2, "10.0.0.1:47099")?,
        "RED-2 connected to something behind RED-1's vanished port"
    );
    let out = host.wait_with_output()?;
    ensure!(
        !out.status.success(),
        "the host's own listener accepted RED-2's connection: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let gone = delta(&before, &h1.counters()?, "drop_port_gone");
    ensure!(gone >= 1, "drop_port_gone counted {gone}");
    Ok(())
}
