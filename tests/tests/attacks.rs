//! Attacks crafted with scapy (an independent packet builder) from a tenant VM and from a
//! stranger on the underlay: none is delivered to any VM, each is counted under its reason,
//! and the tenants' own traffic keeps flowing.

use anyhow::{Context as _, ensure};
use nv_tests::{
    capture::{self, Capture},
    sys::run,
    testbed::{TwoHosts, delta},
};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/attack.py");
/// Debian's Python, where Debian's python3-scapy imports (the first python3 on PATH may not be).
const PYTHON: &str = "/usr/bin/python3";

/// Frames carrying the attack marker in a capture.
fn marked(file: &std::path::Path) -> anyhow::Result<usize> {
    carrying(file, b"nv-attack")
}

/// Frames of a capture with `mark` anywhere in them, inside GRE too.
fn carrying(file: &std::path::Path, mark: &[u8]) -> anyhow::Result<usize> {
    Ok(capture::frames(file)?
        .iter()
        .filter(|f| f.windows(mark.len()).any(|w| w == mark))
        .count())
}

/// Plugs a stranger's interface (`evil`) into the underlay bridge and waits until it forwards.
fn plug_stranger(bed: &TwoHosts) -> anyhow::Result<()> {
    bed.underlay.ip(&[
        "link", "add", "evil", "type", "veth", "peer", "name", "evilp",
    ])?;
    bed.underlay
        .ip(&["link", "set", "evilp", "master", "br0", "up"])?;
    bed.underlay.ip(&["link", "set", "evil", "up"])?;
    // A new bridge port forwards only once the kernel has seen its carrier (asynchronously).
    let mut ready = false;
    for _ in 0..50 {
        let state = bed
            .underlay
            .exec("cat", &["/sys/class/net/evilp/operstate"])?;
        if state.trim() == "up" {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ensure!(ready, "the stranger's port never came up");
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(())
}

/// The captures of the attack test: what each VM and the underlay saw.
fn nothing_leaked(bed: &TwoHosts, watch: Vec<Capture>, underlay: Capture) -> anyhow::Result<()> {
    // Each capture also sees the legitimate marked packets it must (the positive controls):
    // RED-1's to RED-2 at RED-2, the stranger's valid-looking one at RED-1 (RED-1's capture
    // also sees its own attacks leave, so it is checked for the control only).
    for (vm, cap) in ["RED-2", "BLUE-2", "BLUE-1", "RED-1"].iter().zip(watch) {
        let file = cap.stop()?;
        let legit = carrying(&file, b"nv-legit")?;
        match *vm {
            "RED-2" => ensure!(
                legit >= 5,
                "RED-2 saw only {legit} of RED-1's legitimate frames"
            ),
            "RED-1" => {
                ensure!(
                    legit >= 5,
                    "RED-1 saw only {legit} of the underlay's legitimate frames"
                );
                continue;
            }
            _ => ensure!(legit == 0, "{vm} received {legit} frames of another tenant"),
        }
        let n = marked(&file)?;
        ensure!(n == 0, "{vm} received {n} attack frames");
    }
    // On the underlay, inside GRE too: nothing RED-1 aimed anywhere left its host. The
    // stranger's own forged NVGRE is there by design, told apart by its source MAC.
    let file = underlay.stop()?;
    let stranger = bed.underlay.mac("evil")?;
    let frames = capture::frames(&file)?;
    let from_hosts = || {
        frames
            .iter()
            .filter(|f| f.get(6..12) != Some(&stranger[..]))
    };
    let leaked = from_hosts()
        .filter(|f| f.windows(9).any(|w| w == b"nv-attack"))
        .count();
    ensure!(
        leaked == 0,
        "{leaked} attack frames from RED-1 reached the underlay"
    );
    let carried = from_hosts()
        .filter(|f| f.windows(8).any(|w| w == b"nv-legit"))
        .count();
    ensure!(
        carried >= 5,
        "the underlay carried only {carried} of RED-1's legitimate frames"
    );
    Ok(())
}

#[test]
fn attacks_from_a_vm_and_from_the_underlay_are_dropped_and_counted() -> anyhow::Result<()> {
    let bed = TwoHosts::build("x")?;
    bed.configure()?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "no traffic before the attacks"
    );
    let (h1, h2) = (&bed.hosts[0], &bed.hosts[1]);
    let watch: Vec<Capture> = ["RED-2", "BLUE-2", "BLUE-1", "RED-1"]
        .iter()
        .map(|vm| {
            Capture::start(
                &bed.vm(vm).ns,
                "eth0",
                &bed.tmp_dir().join(format!("{vm}.pcap")),
                60,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let underlay = Capture::start(
        &bed.underlay,
        "br0",
        &bed.tmp_dir().join("underlay.pcap"),
        60,
    )?;

    // From inside RED-1.
    let before = h1.counters()?;
    bed.vm("RED-1").ns.exec(PYTHON, &[SCRIPT, "vm", "eth0"])?;
    let after = h1.counters()?;
    for (reason, at_least) in [
        ("drop_vm_spoofed_ip", 5),
        ("drop_vm_spoofed_mac", 5),
        ("drop_vm_spoofed_arp", 10),
        ("drop_vm_unknown_dst", 15),
    ] {
        let d = delta(&before, &after, reason);
        ensure!(
            d >= at_least,
            "{reason}: counted {d}, expected at least {at_least}"
        );
    }

    // A stranger on the underlay bridge, forging NVGRE to host1.
    plug_stranger(&bed)?;
    let host1_mac = h1.ns.exec("cat", &["/sys/class/net/uplink0/address"])?;
    let before = h1.counters()?;
    run(
        "ip",
        &[
            "netns",
            "exec",
            &bed.underlay.name,
            PYTHON,
            SCRIPT,
            "underlay",
            "evil",
            host1_mac.trim(),
        ],
    )?;
    let after = h1.counters()?;
    ensure!(
        delta(&before, &after, "drop_uplink_spoofed_pa") >= 5,
        "forged PA not counted: {after:?}"
    );
    ensure!(
        delta(&before, &after, "drop_uplink_spoofed_mac") >= 5,
        "other tenant's VSID not counted: {after:?}"
    );
    ensure!(
        delta(&before, &after, "drop_uplink_vsid_not_hosted") >= 5,
        "VSID not hosted here not counted: {after:?}"
    );

    // Nothing reached a VM, and nothing a VM aimed at the host or the underlay left its host.
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "RED traffic broken by the attacks"
    );
    nothing_leaked(&bed, watch, underlay)?;
    let _ = h2.counters().context("host2 still answers")?;
    Ok(())
}

#[test]
fn vlan_tags_from_a_vm_never_leave_its_host() -> anyhow::Result<()> {
    let bed = TwoHosts::build("vl")?;
    bed.configure()?;
    let h1 = &bed.hosts[0];
    let red2 = Capture::start(
        &bed.vm("RED-2").ns,
        "eth0",
        &bed.tmp_dir().join("red2.pcap"),
        60,
    )?;
    let underlay = Capture::start(
        &bed.underlay,
        "br0",
        &bed.tmp_dir().join("underlay.pcap"),
        60,
    )?;
    let before = h1.counters()?;
    bed.vm("RED-1").ns.exec(PYTHON, &[SCRIPT, "vlan", "eth0"])?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "RED traffic broken by tagged frames"
    );
    let after = h1.counters()?;
    let (red2, underlay) = (red2.stop()?, underlay.stop()?);
    for (what, file) in [("the underlay", &underlay), ("RED-2", &red2)] {
        let leaked = carrying(file, b"nv-vlan")?;
        ensure!(leaked == 0, "{leaked} tagged frames reached {what}");
        // The positive control: the same packet untagged crossed (inside NVGRE on the
        // underlay) and arrived.
        let control = carrying(file, b"nv-ok")?;
        ensure!(
            control >= 5,
            "only {control} untagged frames reached {what}"
        );
    }
    // tshark agrees: no 802.1Q or 802.1ad layer on the underlay, inside GRE or out.
    let tagged = capture::decode(&underlay)?
        .iter()
        .filter(|p| p.protocols.contains("vlan") || p.protocols.contains("ieee8021ad"))
        .count();
    ensure!(
        tagged == 0,
        "tshark found {tagged} tagged packets on the underlay"
    );
    // Single, 802.1ad and stacked: five of each, all refused and counted.
    let refused = delta(&before, &after, "drop_vm_vlan");
    ensure!(refused >= 15, "drop_vm_vlan counted {refused} of 15");
    Ok(())
}
