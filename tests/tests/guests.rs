//! Real Linux guests (Debian's kernel, virtio-net, QEMU) on tap ports, as libvirt, Nova and
//! Proxmox attach VMs: they ping, move megabytes by TCP with veth VMs and with each other,
//! stay isolated from another tenant's guest with the same address, find the path MTU through
//! nv, are reached by IP rewrite and NVGRE on either decapsulation hook, and are forwarded
//! again after a restart that re-creates their tap, with every state in between a counted drop.
use std::{thread, time::Duration};

use anyhow::{Context as _, ensure};
use nv_tests::{
    checks,
    guest::{self, Guest, Spec},
    testbed::{
        BLUE_VSID, Host, RED_VSID, TapVm, Translation, TwoHosts, delta, tcp_transfer_from,
        tcp_transfer_to,
    },
};

const RED_G1: TapVm = TapVm {
    name: "RED-G1",
    host: 0,
    vsid: RED_VSID,
    ca: "10.0.0.11",
    mac: "02:00:00:00:01:11",
    port: "gred1",
    rewrite_pa: None,
};
const BLUE_G1: TapVm = TapVm {
    name: "BLUE-G1",
    host: 0,
    vsid: BLUE_VSID,
    ca: "10.0.0.11",
    mac: "02:00:00:00:01:12",
    port: "gblue1",
    rewrite_pa: None,
};
const RED_G2: TapVm = TapVm {
    name: "RED-G2",
    host: 1,
    vsid: RED_VSID,
    ca: "10.0.0.12",
    mac: "02:00:00:00:02:11",
    port: "gred2",
    rewrite_pa: None,
};

const TWO_MB: u64 = 2 << 20;

/// Boots guests side by side (each takes seconds under TCG).
fn boot_all(specs: Vec<Spec>) -> anyhow::Result<Vec<Guest>> {
    let booted: Vec<anyhow::Result<Guest>> = thread::scope(|s| {
        let handles: Vec<_> = specs
            .into_iter()
            .map(|spec| s.spawn(move || Guest::boot(spec)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("boot thread"))
            .collect()
    });
    booted.into_iter().collect()
}

/// RED-2's pings to `dst` get no answer, and host1 counts every one under `reason`, none as
/// delivered.
fn unanswered_and_counted(bed: &TwoHosts, dst: &str, reason: &str) -> anyhow::Result<()> {
    let host1 = &bed.hosts[0];
    let before = host1.counters()?;
    ensure!(
        bed.ping("RED-2", dst, 3)? == 0,
        "{dst} answered ({reason} expected)"
    );
    let after = host1.counters()?;
    let (dropped, delivered) = (
        delta(&before, &after, reason),
        delta(&before, &after, "uplink_delivered"),
    );
    ensure!(
        dropped >= 3 && delivered == 0,
        "to {dst}: {reason} {dropped}, uplink_delivered {delivered}"
    );
    Ok(())
}

/// What `nvctl status` says of `port`: running, down, missing.
fn port_state(host: &Host, port: &str) -> anyhow::Result<String> {
    let status = host.nvctl_json(&["status"])?;
    let attached = status["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .find(|p| p["port"] == port)
        .map(|p| {
            if p["running"] == true {
                "running"
            } else {
                "down"
            }
        });
    let missing = status["ports_missing"]
        .as_array()
        .context("ports_missing")?
        .iter()
        .any(|p| p == port);
    Ok(attached
        .unwrap_or(if missing { "missing" } else { "?" })
        .to_owned())
}

/// Waits (5 s at most) until the agent says `port` is `want`.
fn wait_port(host: &Host, port: &str, want: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if port_state(host, port)? == want {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!(
        "{port} is {} after 5 s, not {want}",
        port_state(host, port)?
    )
}

#[test]
fn guests_on_tap_ports_talk_to_veth_vms_and_to_each_other_and_stay_isolated() -> anyhow::Result<()>
{
    let bed = TwoHosts::build("g")?;
    bed.configure()?;
    for g in [&RED_G1, &BLUE_G1, &RED_G2] {
        bed.plug_tap(g)?;
    }
    let mut guests = boot_all(vec![
        bed.guest_spec(&RED_G1, None),
        bed.guest_spec(&BLUE_G1, None),
        bed.guest_spec(&RED_G2, None),
    ])?;
    let status = bed.hosts[0].nvctl_json(&["status"])?;
    let ports = status["ports"].as_array().context("ports")?;
    ensure!(
        ports
            .iter()
            .any(|p| p["port"] == "gred1" && p["kind"] == "tap" && p["running"] == true),
        "host1 does not show gred1 as a running tap: {status}"
    );
    let [red_g1, blue_g1, red_g2] = &mut guests[..] else {
        unreachable!()
    };

    // A tap guest and a veth VM across hosts, and on one host; two tap guests across hosts.
    for (dst, what) in [
        ("10.0.0.2", "RED-2, a veth VM on host2"),
        ("10.0.0.1", "RED-1, a veth VM on host1"),
        ("10.0.0.12", "RED-G2, a guest on host2"),
    ] {
        let got = red_g1.ping(dst, 5)?;
        ensure!(got == 5, "RED-G1 -> {what}: {got} of 5 replies");
    }
    ensure!(
        bed.ping("RED-1", "10.0.0.11", 5)? == 5,
        "RED-1 (veth) -> RED-G1 (tap) on one host lost pings"
    );

    // 2 MB each way by TCP, content hashes compared, with the veth VM and with the guest.
    let red2 = bed.vm("RED-2");
    red_g1.listen(47001)?;
    let sent = tcp_transfer_to(red2, "10.0.0.11:47001", TWO_MB)?;
    let got = red_g1.received()?;
    ensure!(sent == got, "RED-2 -> RED-G1: sent {sent}, guest got {got}");
    let made = red_g1.make_file(TWO_MB)?;
    let got = tcp_transfer_from(red2, 47002, || red_g1.send_file("10.0.0.2", 47002))?;
    ensure!(
        made == got,
        "RED-G1 -> RED-2: guest sent {made}, RED-2 got {got}"
    );
    red_g2.listen(47003)?;
    let made = red_g1.make_file(TWO_MB)?;
    red_g1.send_file("10.0.0.12", 47003)?;
    let got = red_g2.received()?;
    ensure!(made == got, "RED-G1 -> RED-G2: sent {made}, got {got}");
    red_g1.listen(47004)?;
    let made = red_g2.make_file(TWO_MB)?;
    red_g2.send_file("10.0.0.11", 47004)?;
    let got = red_g1.received()?;
    ensure!(made == got, "RED-G2 -> RED-G1: sent {made}, got {got}");

    // Isolation: BLUE-G1 has RED-G1's address on the same host. Its tap sees BLUE-2's pings
    // (the positive control) and none of RED-2's; RED-G1's tap the other way round.
    for (watcher, tap, leaker, control) in [
        (&*blue_g1, "gblue1", "RED-2", "BLUE-2"),
        (&*red_g1, "gred1", "BLUE-2", "RED-2"),
    ] {
        let (leaked, seen) =
            checks::frames_from(&bed, &bed.hosts[0].ns, tap, "10.0.0.11", leaker, control)?;
        ensure!(
            leaked == 0,
            "{}'s tap saw {leaked} frames from {leaker}",
            watcher.spec.name
        );
        ensure!(
            seen >= 3,
            "{}'s tap saw only {seen} frames from {control}",
            watcher.spec.name
        );
    }

    // RED has no subnet (no routes): a DHCP client there gets no answer, and its discovers
    // are counted as such (RED-BG in the routes suite gets its lease from a routed VSID).
    let before = bed.hosts[0].counters()?;
    let (status, out) = red_g1.run(
        "udhcpc -i eth0 -f -q -n -t 2 -T 1 -s /bin/true",
        Duration::from_secs(30),
    )?;
    ensure!(
        status != 0,
        "RED-G1 got a DHCP lease without a subnet: {out}"
    );
    let after = bed.hosts[0].counters()?;
    let (unanswered, handed) = (
        delta(&before, &after, "drop_vm_dhcp_no_subnet"),
        delta(&before, &after, "vm_dhcp_to_agent"),
    );
    ensure!(
        unanswered >= 2 && handed == 0,
        "RED-G1's discovers: drop_vm_dhcp_no_subnet {unanswered}, vm_dhcp_to_agent {handed}"
    );
    Ok(())
}

#[test]
fn guests_with_mtu_1500_over_a_1500_underlay_find_the_path_mtu_through_nv() -> anyhow::Result<()> {
    let bed = TwoHosts::build_on("gm", &[], "1500")?;
    bed.configure()?;
    bed.plug_tap(&RED_G1)?;
    bed.plug_tap(&RED_G2)?;
    // The agents say what VMs must use, and give it to the taps they attach.
    let status = bed.hosts[0].nvctl_json(&["status"])?;
    ensure!(
        status["uplink_mtu"] == 1500 && status["vm_mtu"] == 1458,
        "status: {status}"
    );
    let tap_mtu = bed.hosts[0].ns.exec("cat", &["/sys/class/net/gred1/mtu"])?;
    ensure!(tap_mtu.trim() == "1458", "gred1 MTU is {tap_mtu}");
    // The guests keep 1500, as a guest nobody configured does.
    let mut guests = boot_all(vec![
        bed.guest_spec(&RED_G1, Some(1500)),
        bed.guest_spec(&RED_G2, Some(1500)),
    ])?;
    let [g1, g2] = &mut guests[..] else {
        unreachable!()
    };
    let before: Vec<_> = bed
        .hosts
        .iter()
        .map(nv_tests::testbed::Host::counters)
        .collect::<anyhow::Result<_>>()?;
    g2.listen(47011)?;
    let made = g1.make_file(TWO_MB)?;
    g1.send_file("10.0.0.12", 47011)?;
    let got = g2.received()?;
    ensure!(made == got, "RED-G1 -> RED-G2: sent {made}, got {got}");
    g1.listen(47012)?;
    let made = g2.make_file(TWO_MB)?;
    g2.send_file("10.0.0.11", 47012)?;
    let got = g1.received()?;
    ensure!(made == got, "RED-G2 -> RED-G1: sent {made}, got {got}");
    // RED-G1 learnt the path MTU from host1's answer; RED-G2 then got an MSS that fits from
    // RED-G1 (Linux advertises the MSS of its route, learnt MTU included).
    let answered = delta(&before[0], &bed.hosts[0].counters()?, "vm_icmp_frag_needed");
    ensure!(answered >= 1, "host1 sent no ICMP fragmentation needed");
    // Full-size pings from RED-G2 (DF set): host2 answers the first, the guest then fragments
    // to the MTU named, and the rest get through.
    let got = g2.ping_sized("10.0.0.11", 5, 1472)?;
    ensure!(got >= 3, "RED-G2's 1500-byte pings: {got} of 5 replies");
    let answered = delta(&before[1], &bed.hosts[1].counters()?, "vm_icmp_frag_needed");
    ensure!(answered >= 1, "host2 sent no ICMP fragmentation needed");
    // IPv6 has no fragmenting router: the guest learns the path MTU from "packet too big".
    bed.plug_tap_ipv6(&RED_G1, "fd00::11")?;
    bed.plug_tap_ipv6(&RED_G2, "fd00::12")?;
    for (g, ca) in [(&mut *g1, "fd00::11"), (&mut *g2, "fd00::12")] {
        g.ok(
            // busybox's ip has no `nodad`: duplicate address detection (unanswered: nv
            // answers no solicitation from ::) is over within its one second.
            &format!("ip -6 addr add {ca}/64 dev eth0 && sleep 2"),
            std::time::Duration::from_secs(10),
        )?;
    }
    let before = bed.hosts[0].counters()?;
    g2.listen(47013)?;
    let made = g1.make_file(TWO_MB)?;
    g1.send_file("fd00::12", 47013)?;
    let got = g2.received()?;
    ensure!(
        made == got,
        "RED-G1 -> RED-G2 by IPv6: sent {made}, got {got}"
    );
    let answered = delta(&before, &bed.hosts[0].counters()?, "vm_icmp_packet_too_big");
    ensure!(answered >= 1, "host1 sent no ICMPv6 packet too big");
    Ok(())
}

#[test]
fn a_restarted_guest_is_forwarded_again_and_every_state_between_is_a_counted_drop()
-> anyhow::Result<()> {
    let bed = TwoHosts::build("gr")?;
    bed.configure()?;
    bed.plug_tap(&RED_G1)?;
    let g = Guest::boot(bed.guest_spec(&RED_G1, None))?;
    ensure!(
        bed.ping("RED-2", "10.0.0.11", 3)? == 3,
        "RED-2 -> RED-G1 lost pings"
    );
    let host1 = &bed.hosts[0];
    let wait_state = |want: &str| wait_port(host1, "gred1", want);

    // QEMU exits: the tap stays without carrier. What is sent to the guest is a drop of its
    // own, not "delivered".
    g.stop();
    wait_state("down")?;
    unanswered_and_counted(&bed, "10.0.0.11", "drop_port_down")?;

    // The tap is deleted (libvirt does on shutdown): gone, counted as such.
    host1.ns.ip(&["link", "del", "gred1"])?;
    wait_state("missing")?;
    unanswered_and_counted(&bed, "10.0.0.11", "drop_port_gone")?;

    // The VM starts again on a new tap of the same name: forwarded again, no nvctl.
    guest::create_tap(&host1.ns.name, "gred1")?;
    let mut g = Guest::boot(bed.guest_spec(&RED_G1, None))?;
    wait_state("running")?;
    ensure!(
        bed.ping("RED-2", "10.0.0.11", 3)? == 3,
        "RED-2 -> restarted RED-G1 lost pings"
    );
    let got = g.ping("10.0.0.2", 3)?;
    ensure!(got == 3, "restarted RED-G1 -> RED-2: {got} of 3");

    // A veth VM whose end goes down: its host end loses carrier, the same drop of its own.
    bed.vm("RED-1").ns.ip(&["link", "set", "eth0", "down"])?;
    wait_port(host1, "red1", "down")?;
    unanswered_and_counted(&bed, "10.0.0.1", "drop_port_down")?;
    Ok(())
}

#[test]
fn guests_reached_by_ip_rewrite_and_nvgre_on_either_decap_hook() -> anyhow::Result<()> {
    const RED_R1: TapVm = TapVm {
        name: "RED-R1",
        host: 0,
        vsid: RED_VSID,
        ca: "10.0.0.21",
        mac: "02:00:00:00:01:21",
        port: "gredr1",
        rewrite_pa: Some("198.18.1.21"),
    };
    for hook in ["xdp", "tc"] {
        let bed = TwoHosts::build_with(&format!("gx{hook}"), &["--decap-hook", hook])?;
        // RED by IP rewrite (each VM its own PA), BLUE by NVGRE.
        bed.configure_with(Translation::Rewrite)?;
        bed.plug_tap(&RED_R1)?;
        bed.plug_tap(&BLUE_G1)?;
        let mut guests = boot_all(vec![
            bed.guest_spec(&RED_R1, None),
            bed.guest_spec(&BLUE_G1, None),
        ])?;
        let [red, blue] = &mut guests[..] else {
            unreachable!()
        };
        let before = bed.hosts[0].counters()?;
        let got = red.ping("10.0.0.2", 5)?;
        ensure!(got == 5, "{hook}: RED-R1 -> RED-2 by rewrite: {got} of 5");
        let got = blue.ping("10.0.0.2", 5)?;
        ensure!(got == 5, "{hook}: BLUE-G1 -> BLUE-2 by NVGRE: {got} of 5");
        red.listen(47021)?;
        let sent = tcp_transfer_to(bed.vm("RED-2"), "10.0.0.21:47021", TWO_MB)?;
        let got = red.received()?;
        ensure!(
            sent == got,
            "{hook}: RED-2 -> RED-R1: sent {sent}, got {got}"
        );
        let after = bed.hosts[0].counters()?;
        for counter in ["uplink_rewrite_delivered", "uplink_delivered"] {
            ensure!(
                delta(&before, &after, counter) >= 5,
                "{hook}: host1 {counter} went up by {} only",
                delta(&before, &after, counter)
            );
        }
    }
    Ok(())
}
