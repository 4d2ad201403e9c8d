//! The foundation scenario end to end: two hosts, RED and BLUE with the same customer
//! addresses, NVGRE on the underlay decoded by tshark, isolation, delete, migration, restart.

use anyhow::{Context as _, ensure};
use nv_tests::{
    checks,
    testbed::{
        BLUE_VSID, RED_VSID, Translation, TwoHosts, delta, dumped_bytes, tcp_transfer, udp_transfer,
    },
};

#[test]
fn red_and_blue_share_addresses_across_hosts_and_stay_isolated() -> anyhow::Result<()> {
    foundation_scenario("tc")
}

/// The same with decapsulation on XDP (`--decap-hook xdp`), DESIGN.md's other delivery path.
#[test]
fn red_and_blue_share_addresses_across_hosts_and_stay_isolated_with_xdp_decap() -> anyhow::Result<()>
{
    foundation_scenario("xdp")
}

fn foundation_scenario(hook: &str) -> anyhow::Result<()> {
    let mut bed = TwoHosts::build_with("f", &["--decap-hook", hook])?;
    bed.configure()?;
    tenants_ride_nvgre_with_their_vsid(&bed)?;
    inner_checksums_survive_encapsulation(&bed)?;
    red_never_reaches_blue(&bed)?;
    deleting_a_record_stops_its_flow(&bed)?;
    migration_keeps_the_address(&mut bed)
}

/// With checksum offload off in the VMs (so every packet carries its real checksums), tshark
/// finds every inner IPv4, TCP and UDP checksum of the NVGRE on the underlay valid.
fn inner_checksums_survive_encapsulation(bed: &TwoHosts) -> anyhow::Result<()> {
    for vm in ["RED-1", "RED-2"] {
        bed.vm(vm)
            .ns
            .exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    }
    let packets = checks::underlay_during(bed, "inner-checksums", || {
        let (sent, got) = udp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "10.0.0.2", 50, 500)?;
        ensure!(sent == got, "UDP: sent {sent}, intact {got}");
        let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "10.0.0.2", 256 << 10)?;
        ensure!(sent == got, "TCP: sent {sent}, received {got}");
        Ok(())
    })?;
    let mut checked = 0;
    for p in packets.iter().filter(|p| p.gre_key.is_some()) {
        ensure!(
            p.ip_checksum_ok == [true, true],
            "outer or inner IPv4 checksum bad: {p:?}"
        );
        if let Some(status) = p.l4_checksum_status {
            ensure!(
                status == 1,
                "inner TCP/UDP checksum not valid per tshark: {p:?}"
            );
            checked += 1;
        }
    }
    ensure!(
        checked >= 100,
        "only {checked} inner TCP/UDP checksums checked"
    );
    for vm in ["RED-1", "RED-2"] {
        bed.vm(vm).ns.exec("ethtool", &["-K", "eth0", "tx", "on"])?;
    }
    Ok(())
}

fn tenants_ride_nvgre_with_their_vsid(bed: &TwoHosts) -> anyhow::Result<()> {
    // RED and BLUE both ping 10.0.0.2 from 10.0.0.1, over the underlay as NVGRE with their VSID.
    checks::pings_over_nvgre(bed, "RED-1", RED_VSID)?;
    checks::pings_over_nvgre(bed, "BLUE-1", BLUE_VSID)?;

    // TCP with content check, both tenants, also seen only as NVGRE of the right VSID.
    for (tenant, vsid, src, dst) in [
        ("red", RED_VSID, "RED-1", "RED-2"),
        ("blue", BLUE_VSID, "BLUE-1", "BLUE-2"),
    ] {
        let mut digests = None;
        checks::underlay_is_nvgre(bed, &format!("{tenant}-tcp"), vsid, || {
            digests = Some(tcp_transfer(bed.vm(dst), bed.vm(src), "10.0.0.2", 8 << 20)?);
            Ok(())
        })?;
        let (sent, received) = digests.context("transfer ran")?;
        ensure!(
            sent.starts_with(&format!("{} ", 8 << 20)),
            "{tenant}: sender reports {sent}"
        );
        ensure!(
            sent == received,
            "{tenant}: content differs: sent {sent}, received {received}"
        );
    }

    Ok(())
}

fn red_never_reaches_blue(bed: &TwoHosts) -> anyhow::Result<()> {
    // Isolation: RED-1's traffic to 10.0.0.2 reaches RED-2 and never BLUE-2, and the other
    // way round; each capture also sees its own tenant's ping, so it is known to work.
    let red2_rx_before = bed.hosts[1].counters()?;
    for (watcher, from, control) in [("BLUE-2", "RED-1", "BLUE-1"), ("RED-2", "BLUE-1", "RED-1")] {
        let (leaked, seen) = checks::frames_seen_by(bed, watcher, from, control)?;
        ensure!(leaked == 0, "{watcher} saw {leaked} frames from {from}");
        ensure!(
            seen >= 3,
            "{watcher}'s capture saw only {seen} frames from {control}"
        );
    }
    let d = delta(
        &red2_rx_before,
        &bed.hosts[1].counters()?,
        "uplink_delivered",
    );
    ensure!(
        d >= 12,
        "host2 delivered {d} frames, expected the 12 requests"
    );
    Ok(())
}

fn deleting_a_record_stops_its_flow(bed: &TwoHosts) -> anyhow::Result<()> {
    // Deleting RED-2's record on host1 stops the flow, counted as unknown destination; BLUE is
    // untouched; re-adding restores it.
    let h1 = &bed.hosts[0];
    let before = h1.counters()?;
    h1.nvctl(&["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.2"])?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 3)? == 0,
        "RED-1 still reaches RED-2 after its record was deleted"
    );
    ensure!(
        bed.ping("BLUE-1", "10.0.0.2", 3)? == 3,
        "BLUE lost traffic when a RED record was deleted"
    );
    let dropped = delta(&before, &h1.counters()?, "drop_vm_unknown_dst");
    ensure!(
        dropped >= 3,
        "expected >= 3 drops for unknown destination, counted {dropped}"
    );
    h1.nvctl(&[
        "lookup",
        "add",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.2",
        "--pa",
        "198.18.0.2",
        "--mac",
        "02:00:00:00:02:01",
        "--name",
        "RED-2",
    ])?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 3)? == 3,
        "RED-1 -> RED-2 did not come back after re-adding"
    );

    Ok(())
}

fn migration_keeps_the_address(bed: &mut TwoHosts) -> anyhow::Result<()> {
    // Migration: RED-2 moves to host1, keeping 10.0.0.2 and its MAC; records change through
    // nvctl on both hosts; traffic flows again, now local on host1; BLUE is untouched.
    bed.rehome("RED-2", 0)?;
    bed.hosts[0].nvctl(&[
        "lookup",
        "move",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.2",
        "--pa",
        "198.18.0.1",
        "--port",
        "red2",
    ])?;
    bed.hosts[1].nvctl(&[
        "lookup",
        "move",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.2",
        "--pa",
        "198.18.0.1",
    ])?;
    let before = bed.hosts[0].counters()?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 5)? == 5,
        "RED-1 cannot reach RED-2 after it moved to host1"
    );
    let local = delta(&before, &bed.hosts[0].counters()?, "vm_tx_local");
    ensure!(
        local >= 10,
        "expected RED-1 <-> RED-2 to be delivered locally on host1, counted {local}"
    );
    ensure!(
        bed.ping("BLUE-1", "10.0.0.2", 3)? == 3,
        "BLUE lost traffic during RED's migration"
    );
    let list = bed.hosts[0].nvctl_json(&["lookup", "list"])?;
    let red2 = list
        .as_array()
        .context("list")?
        .iter()
        .find(|r| r["vsid"] == 5001 && r["ca"] == "10.0.0.2")
        .context("RED-2 listed")?;
    ensure!(
        red2["pa"] == "198.18.0.1" && red2["port"] == "red2",
        "RED-2 record after the move: {red2}"
    );
    Ok(())
}

#[test]
fn agent_restart_keeps_records_and_forwarding() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("r")?;
    bed.configure()?;
    let records = bed.hosts[0].nvctl_json(&["lookup", "list"])?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "no traffic before the restart"
    );

    // With host1's agent stopped, the pinned programs and maps keep forwarding.
    bed.hosts[0].stop_agent();
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 3)? == 3,
        "forwarding stopped with the agent"
    );
    bed.hosts[0].start_agent()?;
    ensure!(
        bed.hosts[0].nvctl_json(&["lookup", "list"])? == records,
        "records changed across the restart"
    );
    ensure!(
        bed.ping("BLUE-1", "10.0.0.2", 3)? == 3,
        "forwarding broken after the restart"
    );
    let log = bed.hosts[0].agent_log();
    ensure!(
        log.contains("reconciled: 1 providers, 4 lookup records, 2 ports"),
        "agent log: {log}"
    );
    Ok(())
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn nvctl_refuses_bad_input_with_one_line_and_changes_nothing() -> anyhow::Result<()> {
    let bed = TwoHosts::build("v")?;
    bed.configure()?;
    let h = &bed.hosts[0];
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "100",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.2",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "invalid VSID 100",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "16777215",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.2",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "reserved",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "4095",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.2",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "reserved",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "fd00::9",
                "--pa",
                "fe80::2",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "link-local",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "::ffff:198.18.0.2",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "IPv4-mapped",
        ),
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
                "02:00:00:00:09",
            ],
            "invalid MAC",
        ),
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
                "01:00:5e:00:00:01",
            ],
            "not a unicast",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.1",
                "--mac",
                "02:00:00:00:09:01",
                "--port",
                "nosuch0",
            ],
            "unknown port",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.2",
                "--pa",
                "198.18.0.2",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "already exists",
        ),
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
                "02:00:00:00:02:01",
            ],
            "already used",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.1",
                "--mac",
                "02:00:00:00:09:01",
            ],
            "give --port",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.50",
                "--mac",
                "02:00:00:00:09:01",
                "--method",
                "rewrite",
            ],
            "one method",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.7",
                "--mac",
                "02:00:00:00:09:01",
                "--port",
                "blue1",
            ],
            "not a provider address",
        ),
        (
            &[
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                "10.0.0.9",
                "--pa",
                "198.18.0.1",
                "--mac",
                "02:00:00:00:09:01",
                "--port",
                "blue1",
            ],
            "already belongs",
        ),
        (
            &["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.99"],
            "no lookup record",
        ),
        (&["provider", "add", "--pa", "198.18.0.1"], "ADDRESS/PREFIX"),
        (
            &["provider", "add", "--pa", "198.18.0.1/15"],
            "already exists",
        ),
        (
            &[
                "provider",
                "add",
                "--pa",
                "198.18.0.9/15",
                "--dev",
                "nosuch0",
            ],
            "go on the uplink",
        ),
        (&["provider", "del", "--pa", "198.18.0.1"], "used by"),
        (
            &["provider", "del", "--pa", "198.18.0.99"],
            "no provider address",
        ),
    ];
    for (args, expect) in cases {
        h.expect_refused(args, expect)?;
    }
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "the agent stopped forwarding after bad input"
    );
    Ok(())
}

/// Polls with single pings (bounded: `tries` of them) until one is answered.
#[test]
fn ports_other_than_veth_and_tap_are_refused_with_one_line() -> anyhow::Result<()> {
    let bed = TwoHosts::build("k")?;
    bed.configure()?;
    let h = &bed.hosts[0];
    h.ns.ip(&["link", "add", "br9", "type", "bridge"])?;
    h.ns.ip(&["tuntap", "add", "dev", "tun9", "mode", "tun"])?;
    // The same local record each time, on another port.
    let add_on = |port: &'static str| {
        [
            "lookup",
            "add",
            "--vsid",
            "5001",
            "--ca",
            "10.0.0.9",
            "--pa",
            "198.18.0.1",
            "--mac",
            "02:00:00:00:09:01",
            "--port",
            port,
        ]
    };
    for (port, kind) in [("lo", "plain"), ("br9", "bridge"), ("tun9", "tun")] {
        h.expect_refused(
            &add_on(port),
            &format!("port '{port}' is a {kind} device, not a veth or tap"),
        )?;
    }
    // A veth the host talks through (it carries an address) is no VM's port either, even with
    // its other end in another namespace.
    let elsewhere = &bed.vm("RED-1").ns.name;
    h.ns.ip(&[
        "link", "add", "hv9", "type", "veth", "peer", "name", "hv9p", "netns", elsewhere,
    ])?;
    h.ns.ip(&["addr", "add", "192.0.2.9/24", "dev", "hv9"])?;
    h.expect_refused(
        &add_on("hv9"),
        "port 'hv9' carries the host address 192.0.2.9",
    )?;
    // Provider addresses go on the uplink only: not on a VM's port, not on loopback.
    for dev in ["red1", "lo"] {
        h.expect_refused(
            &["provider", "add", "--pa", "198.18.0.9/15", "--dev", dev],
            &format!("provider addresses go on the uplink (uplink0), not on '{dev}'"),
        )?;
    }
    let red1_addrs = h.ns.ip(&["-4", "addr", "show", "dev", "red1"])?;
    ensure!(
        !red1_addrs.contains("inet "),
        "a refused provider address landed on red1: {red1_addrs}"
    );
    // The positive control: a tap is a VM port, and so is a veth (RED-1's, configured above).
    h.ns.ip(&["tuntap", "add", "dev", "tap9", "mode", "tap"])?;
    h.nvctl(&add_on("tap9"))?;
    let status = h.nvctl_json(&["status"])?;
    let kinds: Vec<(String, String)> = status["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .map(|p| {
            (
                p["port"].as_str().unwrap_or("").to_owned(),
                p["kind"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    ensure!(
        kinds.contains(&("tap9".into(), "tap".into()))
            && kinds.contains(&("red1".into(), "veth".into())),
        "status ports: {kinds:?}"
    );
    Ok(())
}

fn ping_within(bed: &TwoHosts, from: &str, dst: &str, tries: u32) -> anyhow::Result<bool> {
    for _ in 0..tries {
        if bed.ping(from, dst, 1)? == 1 {
            return Ok(true);
        }
    }
    Ok(false)
}

#[test]
fn vm_ports_that_vanish_or_are_recreated_are_followed_without_nvctl() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("p")?;
    bed.configure()?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "no traffic at the start"
    );

    // RED-2 restarts: its port is deleted and created again (new ifindex), same name.
    bed.rehome("RED-2", 1)?;
    ensure!(
        ping_within(&bed, "RED-1", "10.0.0.2", 15)?,
        "traffic to RED-2 did not resume after its port was re-created"
    );

    // Host2's agent starts while RED-2's port is missing: it starts anyway and picks the port
    // up when it appears.
    bed.hosts[1].stop_agent();
    bed.hosts[1].ns.ip(&["link", "del", "red2"])?;
    bed.hosts[1].start_agent()?;
    ensure!(
        bed.ping("BLUE-1", "10.0.0.2", 2)? == 2,
        "BLUE broken while RED-2's port is missing"
    );
    let log = bed.hosts[1].agent_log();
    ensure!(
        log.contains("port red2 of VSID 5001 CA 10.0.0.2 (RED-2) is missing"),
        "agent log: {log}"
    );
    bed.rehome("RED-2", 1)?;
    ensure!(
        ping_within(&bed, "RED-1", "10.0.0.2", 15)?,
        "traffic to RED-2 did not resume after its port appeared"
    );
    Ok(())
}

fn import_file(bed: &TwoHosts, name: &str, rows: &[String]) -> anyhow::Result<String> {
    let path = bed.tmp_dir().join(name);
    let mut text = String::from("vsid,ca,pa,mac,method,port,name\n");
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

#[test]
fn import_is_all_or_nothing_and_survives_restart() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("i")?;
    bed.configure()?;
    let row = |i: u32| {
        let [_, _, a, b] = i.to_be_bytes();
        format!("7001,10.2.{a}.{b},198.18.0.2,02:07:00:00:{a:02x}:{b:02x},encap,,VM-{i}")
    };
    // A bad record anywhere refuses the whole file, naming it; nothing changes.
    let before = bed.hosts[0].store_files()?;
    let mut rows: Vec<String> = (0..2000).map(row).collect();
    rows[1500] = "7001,10.9.9.9,198.18.0.2,02:00:00:00:01:01,rewrite,,BAD".into();
    let bad = import_file(&bed, "bad.csv", &rows)?;
    let err = bed.hosts[0]
        .nvctl(&["lookup", "import", &bad])
        .err()
        .context("bad import succeeded")?;
    ensure!(
        err.to_string().contains("record 1501"),
        "error does not name the record: {err}"
    );
    ensure!(
        bed.hosts[0].store_files()? == before,
        "a refused import changed the store"
    );
    // A duplicate inside the file is refused too.
    let mut dup: Vec<String> = (0..10).map(row).collect();
    dup.push(row(3));
    let dup = import_file(&bed, "dup.csv", &dup)?;
    ensure!(
        bed.hosts[0].nvctl(&["lookup", "import", &dup]).is_err(),
        "duplicate import succeeded"
    );

    // 2000 records (written as a snapshot) and then 10 more (journalled) arrive whole.
    let good = import_file(&bed, "good.csv", &(0..2000).map(row).collect::<Vec<_>>())?;
    let out = bed.hosts[0].nvctl_json(&["lookup", "import", &good])?;
    ensure!(out["imported"] == 2000, "import answered {out}");
    let more = import_file(&bed, "more.csv", &(2000..2010).map(row).collect::<Vec<_>>())?;
    ensure!(
        bed.hosts[0].nvctl_json(&["lookup", "import", &more])?["imported"] == 10,
        "second import"
    );
    let count = |bed: &TwoHosts| -> anyhow::Result<usize> {
        Ok(bed.hosts[0]
            .nvctl_json(&["lookup", "list"])?
            .as_array()
            .context("list")?
            .len())
    };
    ensure!(
        count(&bed)? == 4 + 2010,
        "list after import: {}",
        count(&bed)?
    );
    let view = nv_agent::datapath::LookupView::open(&bed.hosts[0].pin_path)?;
    for i in [0u32, 1999, 2009] {
        let [_, _, a, b] = i.to_be_bytes();
        let key = nv_common::LookupKey {
            vsid: 7001,
            ca: [10, 2, a, b],
        };
        ensure!(
            view.get(&key).is_some(),
            "imported record {i} is not in the datapath"
        );
    }
    bed.hosts[0].stop_agent();
    bed.hosts[0].start_agent()?;
    ensure!(count(&bed)? == 4 + 2010, "records lost across the restart");
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "forwarding broken after the import"
    );
    Ok(())
}

#[test]
fn udp_gso_crosses_by_nvgre_and_by_rewrite_on_both_decap_hooks() -> anyhow::Result<()> {
    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/udp_gso.py");
    for hook in ["tc", "xdp"] {
        for method in [Translation::Encap, Translation::Rewrite] {
            let bed = TwoHosts::build_with("u", &["--decap-hook", hook])?;
            bed.configure_with(method)?;
            let recv = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &bed.vm("RED-2").ns.name,
                    "/usr/bin/python3",
                ])
                .args([SCRIPT, "recv", "47100", "3"])
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            std::thread::sleep(std::time::Duration::from_millis(300));
            let sent = bed
                .vm("RED-1")
                .ns
                .exec("/usr/bin/python3", &[SCRIPT, "send", "10.0.0.2", "47100"])?;
            let out = recv.wait_with_output()?;
            let got = String::from_utf8_lossy(&out.stdout);
            ensure!(
                sent.trim() == "sent 50" && got.trim() == "intact 50",
                "{hook}, {method:?}: {} but {}",
                sent.trim(),
                got.trim()
            );
        }
    }
    Ok(())
}

/// The segmentation offloads of tunnels, off on a device: the kernel then segments such
/// super-packets in software before the device sends them.
const TUNNEL_GSO: [&str; 5] = [
    "tx-udp_tnl-segmentation",
    "tx-udp_tnl-csum-segmentation",
    "tx-gre-segmentation",
    "tx-gre-csum-segmentation",
    "tx-ipxip4-segmentation",
];

fn tunnel_gso(ns: &nv_tests::netns::Netns, dev: &str, on: bool) -> anyhow::Result<()> {
    let mut args = vec!["-K", dev];
    for f in TUNNEL_GSO {
        args.extend([f, if on { "on" } else { "off" }]);
    }
    ns.exec("ethtool", &args)?;
    Ok(())
}

/// A VM that runs tunnels of its own (VXLAN over its customer addresses, as a Kubernetes
/// node inside a VM does), with their offloads on, reaches its peer through them by NVGRE and
/// by rewrite, on both decap hooks, byte-exact; the underlay segments in software, so any wrong
/// offset would show. Linux offloads one tunnel per packet: by rewrite the VM's super-packets
/// cross as they are; by NVGRE they go through the bounce pair, where the kernel segments them
/// (`vm_tx_segmented`), and each segment is encapsulated. A bounce pair deleted behind the
/// agent's back is made again.
#[test]
fn a_vms_own_tunnels_cross_by_nvgre_and_by_rewrite() -> anyhow::Result<()> {
    // This machine's kernel has VXLAN but neither GRE nor IPIP tunnels: VXLAN without and
    // with its outer UDP checksum (SKB_GSO_UDP_TUNNEL and SKB_GSO_UDP_TUNNEL_CSUM).
    let tunnels: [(&str, &[&str]); 2] = [
        (
            "vxlan",
            &["type", "vxlan", "id", "42", "dstport", "4789", "noudpcsum"],
        ),
        (
            "vxcsum",
            &["type", "vxlan", "id", "43", "dstport", "4790", "udpcsum"],
        ),
    ];
    for hook in ["tc", "xdp"] {
        for method in [Translation::Encap, Translation::Rewrite] {
            let bed = TwoHosts::build_with("vt", &["--decap-hook", hook])?;
            bed.configure_with(method)?;
            for h in &bed.hosts {
                tunnel_gso(&h.ns, "uplink0", false)?;
            }
            for vm in ["RED-1", "RED-2"] {
                tunnel_gso(&bed.vm(vm).ns, "eth0", true)?;
            }
            for (n, (kind, args)) in (1u8..).zip(tunnels) {
                for (vm, local, remote, inner) in [
                    ("RED-1", "10.0.0.1", "10.0.0.2", 1u8),
                    ("RED-2", "10.0.0.2", "10.0.0.1", 2u8),
                ] {
                    let ns = &bed.vm(vm).ns;
                    let dev = format!("t{kind}");
                    let mut add = vec!["link", "add", &dev];
                    add.extend_from_slice(args);
                    add.extend(["local", local, "remote", remote]);
                    ns.ip(&add)?;
                    ns.ip(&[
                        "addr",
                        "add",
                        &format!("192.168.{n}.{inner}/24"),
                        "dev",
                        &dev,
                    ])?;
                    ns.ip(&["link", "set", &dev, "up"])?;
                }
                let before = bed.hosts[0].counters()?;
                let (sent, got) = tcp_transfer(
                    bed.vm("RED-2"),
                    bed.vm("RED-1"),
                    &format!("192.168.{n}.2"),
                    4 << 20,
                )?;
                ensure!(
                    sent == got,
                    "{hook}, {method:?}, {kind} inside the VM: sent {sent}, received {got}"
                );
                let after = bed.hosts[0].counters()?;
                let segmented = delta(&before, &after, "vm_tx_segmented");
                ensure!(
                    (method == Translation::Encap) == (segmented > 0)
                        && delta(&before, &after, "drop_vm_nested_gso") == 0,
                    "{hook}, {method:?}, {kind}: {segmented} super-packets segmented, {} dropped",
                    delta(&before, &after, "drop_vm_nested_gso")
                );
            }
            if hook == "tc" && method == Translation::Encap {
                bounce_pair_comes_back(bed)?;
            }
        }
    }
    Ok(())
}

/// The bounce pair deleted behind the agent's back is made again, and an impostor under its
/// name is replaced at start; the VM's tunnel carries bulk each time.
fn bounce_pair_comes_back(mut bed: TwoHosts) -> anyhow::Result<()> {
    // The bounce pair deleted behind the agent's back: it is made again, and the
    // VM's tunnel carries bulk again.
    bed.hosts[0].ns.ip(&["link", "del", "nv-seg0"])?;
    let mut back = false;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if bed.hosts[0].ns.ip(&["link", "show", "nv-seg1"]).is_ok() {
            back = true;
            break;
        }
    }
    ensure!(back, "the bounce pair was not made again");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "192.168.1.2", 4 << 20)?;
    ensure!(
        sent == got,
        "after the bounce pair came back: {sent} vs {got}"
    );
    // An impostor under its name (a veth whose peer is some other device, where
    // segments would reach the host's stack): replaced when the agent starts.
    bed.hosts[0].stop_agent();
    let ns = &bed.hosts[0].ns;
    ns.ip(&["link", "del", "nv-seg0"])?;
    ns.ip(&[
        "link",
        "add",
        "nv-seg0",
        "type",
        "veth",
        "peer",
        "name",
        "nvx-other",
    ])?;
    bed.hosts[0].start_agent()?;
    let ns = &bed.hosts[0].ns;
    ensure!(
        ns.ip(&["link", "show", "nvx-other"]).is_err()
            && ns.ip(&["link", "show", "nv-seg1"]).is_ok(),
        "the impostor bounce pair was kept"
    );
    let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "192.168.1.2", 4 << 20)?;
    ensure!(
        sent == got,
        "after the impostor was replaced: {sent} vs {got}"
    );
    Ok(())
}

/// Host 1's entry for `pa` in its pinned map of the agent's underlay hops: the neighbour's
/// MAC, from the raw bytes (the MAC, two of padding) as bpftool dumps them.
fn underlay_hop(bed: &TwoHosts, pa: [u8; 4]) -> anyhow::Result<Option<[u8; 6]>> {
    let dump = bed.hosts[0].map_dump("NV_UNDERLAY_HOPS")?;
    for entry in dump.as_array().context("a JSON list")? {
        if dumped_bytes(&entry["key"])? == pa {
            let value = dumped_bytes(&entry["value"])?;
            return Ok(Some(value.get(..6).context("8-byte value")?.try_into()?));
        }
    }
    Ok(None)
}

/// Waits (up to 10 s) until host 1's hop for `pa` is `want`.
fn underlay_hop_becomes(bed: &TwoHosts, pa: [u8; 4], want: Option<[u8; 6]>) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..100 {
        last = underlay_hop(bed, pa)?;
        if last == want {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("host 1's underlay hop for {pa:?} is {last:02x?}, not {want:02x?}")
}

/// A MAC as `ip` and tshark write it.
fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// On the wire (tshark, outer Ethernet header): host 1's NVGRE to host 2 leaves host 1's
/// uplink for `dmac`.
fn nvgre_leaves_for(bed: &TwoHosts, dmac: [u8; 6]) -> anyhow::Result<()> {
    let h1 = &bed.hosts[0];
    let file = bed.tmp_dir().join("hops.pcap");
    let cap = nv_tests::capture::Capture::start(&bed.underlay, "ul1", &file, 20)?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 5)? == 5,
        "pings while captured"
    );
    let file = cap.stop()?;
    let macs = nv_tests::sys::run(
        "tshark",
        &[
            "-r",
            file.to_str().context("utf-8")?,
            "-Y",
            "gre && ip.dst == 198.18.0.2",
            "-T",
            "fields",
            // The outer Ethernet header's (the inner frame's is the second occurrence).
            "-E",
            "occurrence=f",
            "-e",
            "eth.src",
            "-e",
            "eth.dst",
        ],
    )?;
    let line = format!("{}\t{}", mac_text(h1.ns.mac("uplink0")?), mac_text(dmac));
    let lines: Vec<&str> = macs.lines().collect();
    ensure!(
        lines.len() >= 5 && lines.iter().all(|l| *l == line),
        "NVGRE to host 2 on the wire: {lines:?}, not all {line:?}"
    );

    Ok(())
}

/// The bed's hosts do not forward on the uplink, so the FIB helper refuses them: the agent
/// resolves the next hop of host 2's PA from host 1's routes and neighbours, the NVGRE frames
/// leave for that neighbour (tshark), and the hop follows the neighbour when it changes and when
/// it goes (the kernel's hop then, which resolves it anew); a neighbour gone stale is probed.
#[test]
fn a_host_that_does_not_forward_sends_to_the_neighbours_the_agent_resolved() -> anyhow::Result<()> {
    let bed = TwoHosts::build("uh")?;
    bed.configure()?;
    let h1 = &bed.hosts[0];
    let forwarding = h1
        .ns
        .exec("sysctl", &["-n", "net.ipv4.conf.uplink0.forwarding"])?;
    ensure!(forwarding.trim() == "0", "host 1 forwards on its uplink");
    let pa2 = [198, 18, 0, 2];
    let host2 = bed.hosts[1].ns.mac("uplink0")?;
    ensure!(bed.ping("RED-1", "10.0.0.2", 2)? == 2, "RED-1 -> RED-2");
    underlay_hop_becomes(&bed, pa2, Some(host2))?;

    nvgre_leaves_for(&bed, host2)?;

    // A PA behind a gateway (host 2, by a route of host 1's): its hop is the gateway's MAC.
    let far = [198, 19, 0, 9];
    h1.ns.ip(&[
        "route",
        "add",
        "198.19.0.9/32",
        "via",
        "198.18.0.2",
        "dev",
        "uplink0",
    ])?;
    h1.nvctl(&[
        "lookup",
        "add",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.77",
        "--pa",
        "198.19.0.9",
        "--mac",
        "02:00:00:00:07:77",
    ])?;
    underlay_hop_becomes(&bed, far, Some(host2))?;

    // The neighbour changes (host 2's NIC replaced, say): the hop follows.
    let moved = [0x02, 0, 0, 0, 0x99, 0x02];
    h1.ns.ip(&[
        "neigh",
        "replace",
        "198.18.0.2",
        "lladdr",
        "02:00:00:00:99:02",
        "dev",
        "uplink0",
        "nud",
        "permanent",
    ])?;
    underlay_hop_becomes(&bed, pa2, Some(moved))?;
    // It goes: no hop, and the kernel's hop resolves host 2 again at the next packet.
    h1.ns
        .ip(&["neigh", "del", "198.18.0.2", "dev", "uplink0"])?;
    underlay_hop_becomes(&bed, pa2, None)?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 3)? >= 2,
        "RED-1 -> RED-2 through the kernel's hop"
    );
    underlay_hop_becomes(&bed, pa2, Some(host2))?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 3)? == 3,
        "RED-1 -> RED-2 again"
    );
    // Gone stale (unconfirmed for a while; the datapath's packets do not confirm it): the
    // agent has the kernel probe it, without a packet of the kernel's own, and the hop stays.
    h1.ns.ip(&[
        "neigh",
        "change",
        "198.18.0.2",
        "lladdr",
        &mac_text(host2),
        "dev",
        "uplink0",
        "nud",
        "stale",
    ])?;
    let state = || h1.ns.ip(&["neigh", "show", "198.18.0.2", "dev", "uplink0"]);
    let mut confirmed = false;
    for _ in 0..100 {
        if state()?.contains("REACHABLE") {
            confirmed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ensure!(
        confirmed,
        "the stale neighbour was not confirmed: {}",
        state()?
    );
    ensure!(
        underlay_hop(&bed, pa2)? == Some(host2),
        "the hop stayed host 2's"
    );
    Ok(())
}
