//! IP rewrite end to end: RED by rewrite and BLUE by NVGRE on the same two hosts with the same
//! customer addresses. The underlay, decoded by tshark, carries RED as plain IPv4 between its
//! dedicated PAs and BLUE as NVGRE; RED-2 receives byte for byte what RED-1 sent.
use anyhow::{Context as _, ensure};
use nv_common::DatapathConfig;
use nv_tests::{
    capture::{self, Capture},
    checks,
    testbed::{
        BLUE_VSID, Host, Translation, TwoHosts, Vm, dumped_bytes, tcp_transfer, udp_transfer,
    },
};

const RED_PAS: [&str; 2] = ["198.18.1.1", "198.18.1.2"];

/// The IPv4 frames from RED-1 to RED-2 in a capture (not, say, an IGMP report the VM's kernel
/// sends on its own).
fn red1_to_red2(file: &std::path::Path) -> anyhow::Result<Vec<Vec<u8>>> {
    Ok(capture::frames(file)?
        .into_iter()
        .filter(|f| {
            f.len() >= 34
                && f[6..12] == [2, 0, 0, 0, 1, 1]
                && f[12..14] == [8, 0]
                && f[30..34] == [10, 0, 0, 2]
        })
        .collect())
}

fn set_tx_checksum_offload(vm: &Vm, on: bool) -> anyhow::Result<()> {
    vm.ns.exec(
        "ethtool",
        &["-K", "eth0", "tx", if on { "on" } else { "off" }],
    )?;
    Ok(())
}

#[test]
fn red_by_rewrite_and_blue_by_nvgre_share_addresses_and_stay_isolated() -> anyhow::Result<()> {
    rewrite_scenario("tc")
}

/// The same with decapsulation and restore split between XDP and TC (`--decap-hook xdp`).
#[test]
fn red_by_rewrite_and_blue_by_nvgre_with_xdp_decap() -> anyhow::Result<()> {
    rewrite_scenario("xdp")
}

fn rewrite_scenario(hook: &str) -> anyhow::Result<()> {
    let bed = TwoHosts::build_with("w", &["--decap-hook", hook])?;
    bed.configure_with(Translation::Rewrite)?;
    let (red1, red2) = (bed.vm("RED-1"), bed.vm("RED-2"));

    // Plain IPv4 between RED's PAs for ping, UDP and TCP, with valid checksums per tshark
    // (the VMs compute full checksums here, so the rewritten ones can be checked too).
    for vm in [red1, red2] {
        set_tx_checksum_offload(vm, false)?;
    }
    let seen = checks::underlay_is_rewrite(&bed, "red-rewrite", RED_PAS, true, || {
        ensure!(
            bed.ping("RED-1", "10.0.0.2", 5)? == 5,
            "RED-1 -> RED-2 ping lost packets"
        );
        let (sent, got) = udp_transfer(red2, red1, "10.0.0.2", 200, 1000)?;
        ensure!(sent == got, "UDP: sent {sent}, intact {got}");
        let (sent, got) = tcp_transfer(red2, red1, "10.0.0.2", 1 << 20)?;
        ensure!(sent == got, "TCP: sent {sent}, received {got}");
        Ok(())
    })?;
    ensure!(
        seen >= 210,
        "expected the pings, 200 datagrams and a TCP flow on the underlay, saw {seen}"
    );

    // BLUE, same addresses, same hosts: NVGRE with its VSID.
    checks::pings_over_nvgre(&bed, "BLUE-1", BLUE_VSID)?;

    // RED-2 receives exactly what RED-1 sent: every frame RED-1 put on its eth0 arrives on
    // RED-2's eth0 with the same bytes (addresses restored, checksums intact).
    let (a, b) = (
        bed.tmp_dir().join("red1.pcap"),
        bed.tmp_dir().join("red2.pcap"),
    );
    let (cap_a, cap_b) = (
        Capture::start(&red1.ns, "eth0", &a, 60)?,
        Capture::start(&red2.ns, "eth0", &b, 60)?,
    );
    ensure!(bed.ping("RED-1", "10.0.0.2", 3)? == 3, "ping lost packets");
    let (sent, got) = udp_transfer(red2, red1, "10.0.0.2", 20, 300)?;
    ensure!(sent == got, "UDP: sent {sent}, intact {got}");
    let (a, b) = (cap_a.stop()?, cap_b.stop()?);
    let (sent, received) = (red1_to_red2(&a)?, red1_to_red2(&b)?);
    ensure!(
        sent.len() >= 23,
        "captured only {} IPv4 frames from RED-1",
        sent.len()
    );
    ensure!(
        sent == received,
        "RED-2 did not receive RED-1's frames unchanged ({} sent, {} received)",
        sent.len(),
        received.len()
    );
    for p in capture::decode(&b)? {
        ensure!(
            p.l4_checksum_status.is_none_or(|s| s == 1),
            "checksum bad at RED-2: {p:?}"
        );
        ensure!(
            p.ip_checksum_ok == [true],
            "IPv4 checksum bad at RED-2: {p:?}"
        );
    }

    // With offloads on (TSO/GSO super-packets through the rewrite): 100 MB with content hash.
    for vm in [red1, red2] {
        set_tx_checksum_offload(vm, true)?;
    }
    let (sent, got) = tcp_transfer(red2, red1, "10.0.0.2", 100 << 20)?;
    ensure!(
        sent.starts_with(&format!("{} ", 100 << 20)),
        "sender reports {sent}"
    );
    ensure!(sent == got, "TCP 100 MB: sent {sent}, received {got}");
    let (sent, got) = udp_transfer(red2, red1, "10.0.0.2", 1000, 1400)?;
    ensure!(sent == got, "UDP with offloads: sent {sent}, intact {got}");

    // Isolation holds as before: RED-1's packets to 10.0.0.2 never reach BLUE-2.
    let (leaked, control) = checks::frames_seen_by(&bed, "BLUE-2", "RED-1", "BLUE-1")?;
    ensure!(leaked == 0, "BLUE-2 saw {leaked} frames from RED-1");
    ensure!(
        control >= 3,
        "BLUE-2's capture saw only {control} of BLUE-1's frames"
    );
    let counters = bed.hosts[1].counters()?;
    let delivered = counters
        .get("uplink_rewrite_delivered")
        .copied()
        .context("counter")?;
    ensure!(delivered > 0, "host2 counted no rewrite deliveries");
    Ok(())
}

#[test]
fn rewrite_pas_are_dedicated_and_vsids_use_one_method() -> anyhow::Result<()> {
    let bed = TwoHosts::build("x")?;
    bed.configure_with(Translation::Rewrite)?;
    let h = &bed.hosts[0];
    let cases: &[(&[&str], &str)] = &[
        // RED-1's dedicated PA, reused by another CA.
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.1.2",
                "--mac",
                "02:00:00:00:09:01",
                "--method",
                "rewrite",
            ],
            "a PA of its own",
        ),
        // A shared encap PA taken as a rewrite PA.
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.2",
                "--mac",
                "02:00:00:00:09:01",
                "--method",
                "rewrite",
            ],
            "a PA of its own",
        ),
        // An encap record on a PA dedicated to RED-2.
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "6001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.1.2",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "a PA of its own",
        ),
        // Mixing methods in one VSID.
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.2",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "one method",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "6001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.3.9",
                "--mac",
                "02:00:00:00:09:01",
                "--method",
                "rewrite",
            ],
            "one method",
        ),
    ];
    for (args, expect) in cases {
        h.expect_refused(args, expect)?;
    }

    filter_follows_red1(h)
}

/// The uplink's rewrite-PA filter, read back with bpftool: it holds RED-1's PA while RED-1
/// is here and, the datapath's, while its provider stays after RED-1's record is gone; nothing
/// once the provider is deleted too.
fn filter_follows_red1(h: &Host) -> anyhow::Result<()> {
    let red1_pa = [198, 18, 1, 1];
    let (word, bit) = DatapathConfig::rewrite_filter_slot(red1_pa);
    let filter = filter_words(h)?;
    ensure!(
        filter[word] & bit != 0,
        "RED-1's PA is not in the filter: {filter:x?}"
    );
    h.nvctl(&["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.1"])?;
    let filter = filter_words(h)?;
    ensure!(
        filter[word] & bit != 0,
        "RED-1's PA left the filter while it is still a provider: {filter:x?}"
    );
    h.nvctl(&["provider", "del", "--pa", "198.18.1.1"])?;
    let filter = filter_words(h)?;
    ensure!(
        filter.iter().all(|w| *w == 0),
        "filter not cleared: {filter:x?}"
    );
    Ok(())
}

/// The rewrite-PA filter words of a host's datapath config, as bpftool dumps the pinned map.
fn filter_words(h: &Host) -> anyhow::Result<Vec<u32>> {
    let json = h.map_dump("NV_CONFIG")?;
    let bytes = dumped_bytes(&json[0]["value"]).context("no value in the config dump")?;
    ensure!(
        bytes.len() == std::mem::size_of::<DatapathConfig>(),
        "config value of {} bytes",
        bytes.len()
    );
    // After uplink_ifindex and flags.
    Ok(bytes[8..8 + 4 * DatapathConfig::REWRITE_FILTER_WORDS]
        .chunks(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
