//! Port ACLs on a live bed: a VM that may only connect out (stateful), on NVGRE across hosts
//! and VM to VM on one host; weights; meters against the bytes sent (and in Prometheus); denies
//! counted and monitored with their rule; rules cut connections they no longer admit; export
//! and import; rewrite restored on XDP and on TC; IPv6, statefully; a flooding VM spends its
//! own flow budget only, and tracked connections outlive a restart and an upgrade.

use anyhow::{Context as _, ensure};
use nv_tests::{
    sys::bin,
    testbed::{
        BLUE_VSID, RED_VSID, Translation, TwoHosts, Vm, delta, ipv6_of, monitor_events,
        tcp_transfer, udp_transfer,
    },
};
use serde_json::Value;

/// `nvctl acl add` on host `h` with the flags in `spec`; returns the rule's id.
fn add(bed: &TwoHosts, h: usize, spec: &str) -> anyhow::Result<u64> {
    let mut args = vec!["acl", "add"];
    args.extend(spec.split_whitespace());
    let rule = bed.hosts[h].nvctl_json(&args)?;
    rule["id"].as_u64().context("a rule has an id")
}

fn rules(bed: &TwoHosts, h: usize) -> anyhow::Result<Vec<Value>> {
    Ok(bed.hosts[h]
        .nvctl_json(&["acl", "list"])?
        .as_array()
        .context("acl list is a JSON list")?
        .clone())
}

fn rule(bed: &TwoHosts, h: usize, id: u64) -> anyhow::Result<Value> {
    rules(bed, h)?
        .into_iter()
        .find(|r| r["id"].as_u64() == Some(id))
        .with_context(|| format!("rule {id} listed"))
}

/// `nv-transfer tcp-connect` from `vm` to `to`: (connected, refused, timed out).
fn connect(vm: &Vm, to: &str, count: u32) -> anyhow::Result<(u64, u64, u64)> {
    let tool = bin("nv-transfer")?;
    let line = vm.ns.exec(
        tool.to_str().context("utf-8 path")?,
        &["tcp-connect", to, "--count", &count.to_string()],
    )?;
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    ensure!(n.len() == 3, "tcp-connect said {line:?}");
    Ok((n[0], n[1], n[2]))
}

/// RED's VM at `ca`, as `nvctl acl add` names it.
fn red(ca: &str) -> String {
    format!("--vsid {RED_VSID} --ca {ca}")
}

/// The bed (agents with `args`) with RED-3 (10.0.0.3) beside RED-1 on host 1, configured.
fn with_red3(tag: &str, args: &[&str]) -> anyhow::Result<TwoHosts> {
    let mut bed = TwoHosts::build_with(tag, args)?;
    bed.add_vm(
        "RED-3",
        RED_VSID,
        "10.0.0.3",
        "02:00:00:00:01:03",
        "red3",
        0,
    )?;
    bed.configure()?;
    Ok(bed)
}

#[test]
fn a_vm_that_may_only_connect_out() -> anyhow::Result<()> {
    // RED-3 beside RED-1 on host 1: VM to VM on one host, and the neighbour that keeps working.
    let mut bed = with_red3("acl", &[])?;
    let h0 = &bed.hosts[0];

    // Before any rule: RED-2 reaches RED-1's stack (refused: nothing listens), and pings.
    ensure!(
        connect(bed.vm("RED-2"), "10.0.0.1:47009", 2)? == (0, 2, 0),
        "without rules RED-2's connections reach RED-1 (and are refused)"
    );
    ensure!(
        bed.ping("RED-2", "10.0.0.1", 2)? == 2,
        "pings without rules"
    );

    let r1 = red("10.0.0.1");
    let deny_in = add(
        &bed,
        0,
        &format!("{r1} --direction in --action deny --weight 1 --name deny-in"),
    )?;
    let out_tcp = add(
        &bed,
        0,
        &format!(
            "{r1} --direction out --action allow --protocol tcp --stateful --weight 10 --name out-tcp"
        ),
    )?;

    // It opens connections out and gets its answers: across hosts and on its own host.
    let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "10.0.0.2", 1 << 20)?;
    ensure!(sent == got, "RED-1 -> RED-2 by TCP: sent {sent}, got {got}");
    let (sent, got) = tcp_transfer(bed.vm("RED-3"), bed.vm("RED-1"), "10.0.0.3", 1 << 20)?;
    ensure!(sent == got, "RED-1 -> RED-3 by TCP: sent {sent}, got {got}");
    let tcp = rule(&bed, 0, out_tcp)?;
    ensure!(
        // Packets as the VM sent or got them: a GSO super-packet is one.
        tcp["packets"].as_u64() > Some(20) && tcp["bytes"].as_u64() > Some(2 << 20),
        "the stateful allow metered both connections both ways: {tcp}"
    );

    // Nobody connects in, and ping is denied: each counted, with its rule in the monitor.
    let monitor = h0.monitor(&["--reason", "acl_in_denied", "--count", "2"])?;
    h0.monitors_become(1)?;
    let before = h0.counters()?;
    ensure!(
        connect(bed.vm("RED-2"), "10.0.0.1:47009", 1)? == (0, 0, 1),
        "RED-2 -> RED-1 connects in"
    );
    ensure!(
        connect(bed.vm("RED-3"), "10.0.0.1:47009", 1)? == (0, 0, 1),
        "RED-3 -> RED-1 connects in (same host)"
    );
    let after = h0.counters()?;
    ensure!(
        delta(&before, &after, "drop_acl_in_denied") >= 2,
        "the denied SYNs are counted"
    );
    let events = monitor_events(monitor)?;
    ensure!(
        events.len() == 2
            && events
                .iter()
                .all(|e| e["rule"].as_u64() == Some(deny_in) && e["dst"] == "10.0.0.1"),
        "the monitor names rule {deny_in}: {events:?}"
    );
    // `nvctl trace` names the rule too.
    let t = h0.nvctl_json(&[
        "trace", "--port", "red3", "--dst", "10.0.0.1", "--proto", "tcp", "--dport", "22",
    ])?;
    ensure!(
        t["verdict"] == "drop"
            && t["counter"] == "drop_acl_in_denied"
            && t["rule"].as_u64() == Some(deny_in),
        "trace: {t}"
    );
    ensure!(bed.ping("RED-2", "10.0.0.1", 2)? == 0, "ping in is denied");
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 0,
        "ping's answers are denied"
    );
    // A second VM of the VSID keeps working (the control for the denies above).
    ensure!(bed.ping("RED-2", "10.0.0.3", 3)? == 3, "RED-2 -> RED-3");
    ensure!(bed.ping("RED-3", "10.0.0.2", 3)? == 3, "RED-3 -> RED-2");
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 2, "BLUE is untouched");

    bad_rules_are_refused_in_one_line(&bed)?;
    weights_decide(&bed)?;
    the_meter_counts_what_was_sent(&bed)?;
    a_deny_added_later_cuts_connections(&bed)?;
    deleted_by_name_and_restarted(&mut bed, deny_in)?;
    Ok(())
}

/// Each rule a rule keeps on its own, refused with what to do, and nothing added.
fn bad_rules_are_refused_in_one_line(bed: &TwoHosts) -> anyhow::Result<()> {
    let h = &bed.hosts[0];
    let before = rules(bed, 0)?.len();
    let r1 = red("10.0.0.1");
    for (spec, says) in [
        (
            format!("{r1} --direction in --action deny --weight 0"),
            "weight",
        ),
        (
            format!("{r1} --direction in --action deny --weight 5 --remote-port 80"),
            "--protocol tcp or udp",
        ),
        (
            format!("{r1} --direction in --action deny --weight 5 --stateful"),
            "--action allow",
        ),
        (
            format!(
                "{r1} --direction in --action deny --weight 5 --remote 10.0.0.0/8 --local fd00::/64"
            ),
            "families",
        ),
        (
            format!(
                "{r1} --direction in --action deny --weight 5 --protocol icmpv6 --remote 10.0.0.0/8"
            ),
            "IPv4",
        ),
        (
            format!("--vsid {RED_VSID} --ca 10.0.0.77 --direction in --action deny --weight 5"),
            "no lookup record",
        ),
        (
            format!(
                "{r1} --direction in --action deny --weight 5 --remote-port 9-1 --protocol tcp"
            ),
            "range",
        ),
    ] {
        let mut args = vec!["acl", "add"];
        args.extend(spec.split_whitespace());
        h.expect_refused(&args, says)?;
    }
    h.expect_refused(&["acl", "del", "--id", "999"], "no ACL rule 999")?;
    ensure!(rules(bed, 0)?.len() == before, "nothing was added");
    Ok(())
}

/// RED-3's pings in from RED-2 (which has no rule of its own): a deny and an allow of equal
/// weight deny; a heavier allow then admits them.
fn weights_decide(bed: &TwoHosts) -> anyhow::Result<()> {
    let r3 = red("10.0.0.3");
    let icmp_in = "--direction in --protocol icmp";
    let from2 = "--remote 10.0.0.2/32";
    add(
        bed,
        0,
        &format!("{r3} {icmp_in} --action deny --weight 100"),
    )?;
    add(
        bed,
        0,
        &format!("{r3} {icmp_in} --action allow --weight 100 {from2}"),
    )?;
    let before = bed.hosts[0].counters()?;
    ensure!(
        bed.ping("RED-2", "10.0.0.3", 2)? == 0,
        "deny wins at equal weight"
    );
    let after = bed.hosts[0].counters()?;
    ensure!(
        delta(&before, &after, "drop_acl_in_denied") >= 2,
        "RED-3's deny counted"
    );
    add(
        bed,
        0,
        &format!("{r3} {icmp_in} --action allow --weight 200 {from2}"),
    )?;
    ensure!(
        bed.ping("RED-2", "10.0.0.3", 3)? == 3,
        "the heavier allow wins"
    );
    Ok(())
}

/// A stateless allow of UDP to one port on RED-3 meters exactly the frames sent.
fn the_meter_counts_what_was_sent(bed: &TwoHosts) -> anyhow::Result<()> {
    let r3 = red("10.0.0.3");
    let udp = add(
        bed,
        0,
        &format!(
            "{r3} --direction out --action allow --protocol udp --remote-port 47000-47099 --weight 5"
        ),
    )?;
    let (sent, got) = udp_transfer(bed.vm("RED-2"), bed.vm("RED-3"), "10.0.0.2", 40, 1000)?;
    ensure!(sent == got, "UDP RED-3 -> RED-2: sent {sent}, got {got}");
    let m = rule(bed, 0, udp)?;
    // `-o json`: every field of a rule, a range as "N-M".
    let fields = [
        "id",
        "name",
        "vsid",
        "ca",
        "direction",
        "action",
        "remote",
        "local",
        "protocol",
        "remote_port",
        "local_port",
        "weight",
        "stateful",
        "idle_timeout",
        "packets",
        "bytes",
    ];
    ensure!(
        fields.iter().all(|f| m.get(f).is_some())
            && m["remote_port"] == "47000-47099"
            && m["protocol"] == "udp"
            && m["ca"] == "10.0.0.3",
        "the rule as JSON: {m}"
    );
    // 40 frames of 1000 bytes of payload, UDP (8), IPv4 (20) and Ethernet (14) headers.
    ensure!(
        m["packets"].as_u64() == Some(40) && m["bytes"].as_u64() == Some(40 * 1042),
        "the meter: {m}"
    );
    // The same meter in Prometheus, by rule, VSID and direction.
    let (rule_label, vsid_label) = (format!("rule=\"{udp}\""), format!("vsid=\"{RED_VSID}\""));
    let labels = [
        rule_label.as_str(),
        vsid_label.as_str(),
        "direction=\"out\"",
    ];
    let (packets, bytes) = (
        metric(bed, 0, "nv_acl_packets_total", &labels)?,
        metric(bed, 0, "nv_acl_bytes_total", &labels)?,
    );
    ensure!(
        packets == 40 && bytes == 40 * 1042,
        "Prometheus: {packets} packets, {bytes} bytes for rule {udp}"
    );
    ensure!(
        metric(
            bed,
            0,
            "nv_acl_packets_total",
            &[rule_label.as_str(), "direction=\"in\""]
        )
        .is_err(),
        "rule {udp} is an outbound rule: nothing metered in"
    );
    Ok(())
}

/// The value of the series of `name` whose labels include every one of `labels` in host `h`'s
/// `/metrics`.
fn metric(bed: &TwoHosts, h: usize, name: &str, labels: &[&str]) -> anyhow::Result<u64> {
    let text = bed.hosts[h]
        .ns
        .exec("curl", &["-sf", "http://127.0.0.1:9469/metrics"])?;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .with_context(|| format!("{name} with {labels:?} in the metrics"))
}

/// RED-1's tracked connections to RED-2 go once a deny of higher weight covers them, and
/// its connections elsewhere stay admitted.
fn a_deny_added_later_cuts_connections(bed: &TwoHosts) -> anyhow::Result<()> {
    let port = "port=\"red1\"";
    let tracked = metric(bed, 0, "nv_acl_flows", &[port])?;
    ensure!(
        tracked >= 2,
        "RED-1's connections to RED-2 and RED-3 are tracked ({tracked})"
    );
    let r1 = red("10.0.0.1");
    add(
        bed,
        0,
        &format!(
            "{r1} --direction out --action deny --protocol tcp --remote 10.0.0.2/32 --weight 50"
        ),
    )?;
    let left = metric(bed, 0, "nv_acl_flows", &[port])?;
    ensure!(
        left >= 1 && left < tracked,
        "the connection to RED-2 is cut, RED-3's stays: {tracked} -> {left}"
    );
    ensure!(
        connect(bed.vm("RED-1"), "10.0.0.2:47009", 1)? == (0, 0, 1),
        "RED-1 -> RED-2 by TCP after the deny"
    );
    let (sent, got) = tcp_transfer(bed.vm("RED-3"), bed.vm("RED-1"), "10.0.0.3", 1 << 16)?;
    ensure!(
        sent == got,
        "RED-1 -> RED-3 still: the deny covers RED-2 only"
    );
    Ok(())
}

/// Rules go by name, stay over a restart of the agent, and the counts stay with the pins.
fn deleted_by_name_and_restarted(bed: &mut TwoHosts, deny_in: u64) -> anyhow::Result<()> {
    let before = rules(bed, 0)?;
    bed.hosts[0].stop_agent();
    bed.hosts[0].start_agent()?;
    let after = rules(bed, 0)?;
    ensure!(before.len() == after.len(), "rules kept over a restart");
    let kept = rule(bed, 0, deny_in)?;
    ensure!(
        kept["packets"].as_u64() >= Some(4),
        "the meter kept its count over a restart: {kept}"
    );
    ensure!(
        bed.ping("RED-2", "10.0.0.1", 1)? == 0,
        "still denied after the restart"
    );
    bed.hosts[0].nvctl(&["acl", "del", "--name", "deny-in"])?;
    ensure!(
        bed.ping("RED-2", "10.0.0.1", 2)? == 2,
        "pings in again once the deny is gone"
    );
    bed.hosts[0].expect_refused(&["acl", "del", "--name", "deny-in"], "no ACL rule")?;
    exported_and_imported(bed)
}

/// The fields of a rule that say what it does (not its id or meters).
fn what_it_does(rule: &Value) -> Value {
    let mut r = rule.clone();
    if let Some(o) = r.as_object_mut() {
        for f in ["id", "packets", "bytes"] {
            o.remove(f);
        }
    }
    r
}

/// `acl export`, every rule deleted, an import with one bad rule among them refused whole,
/// then the export imported: the same rules (numbered anew) doing the same again.
fn exported_and_imported(bed: &TwoHosts) -> anyhow::Result<()> {
    let h = &bed.hosts[0];
    let listed: Vec<Value> = rules(bed, 0)?.iter().map(what_it_does).collect();
    ensure!(listed.len() >= 3, "rules to export: {listed:?}");
    let exported = h.nvctl(&["acl", "export"])?;
    let file = bed.tmp_dir().join("acls.json");
    std::fs::write(&file, &exported)?;
    for r in rules(bed, 0)? {
        let id = r["id"].as_u64().context("id")?.to_string();
        h.nvctl(&["acl", "del", "--id", &id])?;
    }
    ensure!(rules(bed, 0)?.is_empty(), "every rule deleted");
    ensure!(
        connect(bed.vm("RED-1"), "10.0.0.2:47009", 1)? == (0, 1, 0),
        "without rules RED-1 reaches RED-2 (refused: nothing listens)"
    );
    let mut bad: Vec<Value> = serde_json::from_str(&exported)?;
    let mut weightless = bad[0].clone();
    weightless["weight"] = 0.into();
    bad.push(weightless);
    let bad_file = bed.tmp_dir().join("acls-bad.json");
    std::fs::write(&bad_file, serde_json::to_string(&bad)?)?;
    let bad_path = bad_file.to_str().context("utf-8")?;
    h.expect_refused(&["acl", "import", bad_path], "weight")?;
    ensure!(rules(bed, 0)?.is_empty(), "a refused import adds nothing");
    let out = h.nvctl_json(&["acl", "import", file.to_str().context("utf-8")?])?;
    ensure!(
        out["imported"].as_u64() == u64::try_from(listed.len()).ok(),
        "import said {out}"
    );
    let again: Vec<Value> = rules(bed, 0)?.iter().map(what_it_does).collect();
    ensure!(again == listed, "imported {again:?}, exported {listed:?}");
    // They act again: the outbound TCP deny to RED-2 of `a_deny_added_later_cuts_connections`.
    ensure!(
        connect(bed.vm("RED-1"), "10.0.0.2:47009", 1)? == (0, 0, 1),
        "RED-1 -> RED-2 by TCP denied again after the import"
    );
    Ok(())
}

/// BLUE's IPv6 records (`fd00::1`, `fd00::2`) on both hosts, and the addresses in its VMs.
fn blue_ipv6(bed: &TwoHosts) -> anyhow::Result<()> {
    for (i, h) in bed.hosts.iter().enumerate() {
        for vm in bed.vms.iter().filter(|v| v.vsid == BLUE_VSID) {
            let ca = ipv6_of(&vm.ca);
            let vsid = vm.vsid.to_string();
            let pa = &bed.hosts[vm.host].pa;
            let mut args = vec![
                "lookup", "add", "--vsid", &vsid, "--ca", &ca, "--pa", pa, "--mac", &vm.mac,
            ];
            if vm.host == i {
                args.extend(["--port", &vm.port]);
            }
            h.nvctl(&args)?;
        }
    }
    for vm in bed.vms.iter().filter(|v| v.vsid == BLUE_VSID) {
        vm.add_ipv6(&ipv6_of(&vm.ca))?;
    }
    Ok(())
}

#[test]
fn rules_hold_by_rewrite_on_xdp_for_ipv6_and_for_a_whole_vsid() -> anyhow::Result<()> {
    let bed = TwoHosts::build_with("acx", &["--decap-hook", "xdp"])?;
    bed.configure_with(Translation::Rewrite)?;
    blue_ipv6(&bed)?;
    // Positive controls before any rule: each path below carries traffic.
    ensure!(bed.ping("RED-1", "10.0.0.2", 2)? == 2, "RED by rewrite");
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 2, "BLUE over IPv4");
    ensure!(bed.ping("BLUE-1", "fd00::2", 2)? == 2, "BLUE over IPv6");

    // RED-2 (by rewrite, restored by XDP then delivered): only TCP to port 47001 comes in.
    let r2 = red("10.0.0.2");
    add(
        &bed,
        1,
        &format!("{r2} --direction in --action deny --weight 1"),
    )?;
    add(
        &bed,
        1,
        &format!(
            "{r2} --direction in --action allow --protocol tcp --local-port 47001 --weight 10"
        ),
    )?;
    let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "10.0.0.2", 1 << 20)?;
    ensure!(
        sent == got,
        "TCP to RED-2's port 47001 by rewrite: {sent} / {got}"
    );
    let h1 = &bed.hosts[1];
    let before = h1.counters()?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 0,
        "ping to RED-2 denied"
    );
    let after = h1.counters()?;
    ensure!(
        delta(&before, &after, "drop_acl_in_denied") >= 2
            && delta(&before, &after, "uplink_rewrite_delivered") == 0,
        "the restored echoes are denied at delivery"
    );

    // BLUE as a whole: ICMP (IPv4's) denied in, TCP over IPv6 denied in; the rest passes.
    let blue = format!("--vsid {BLUE_VSID} --direction in --action deny --weight 10");
    add(&bed, 1, &format!("{blue} --protocol icmp"))?;
    add(&bed, 1, &format!("{blue} --protocol tcp --remote ::/0"))?;
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 0, "IPv4 ping denied");
    ensure!(bed.ping("BLUE-1", "fd00::2", 2)? == 2, "ICMPv6 is not ICMP");
    let (sent, got) = tcp_transfer(bed.vm("BLUE-2"), bed.vm("BLUE-1"), "10.0.0.2", 1 << 16)?;
    ensure!(sent == got, "TCP over IPv4 to BLUE-2");
    ensure!(
        connect(bed.vm("BLUE-1"), "[fd00::2]:47009", 1)? == (0, 0, 1),
        "TCP over IPv6 to BLUE-2 denied"
    );
    Ok(())
}

/// IP rewrite restored on TC: an outbound deny acts before the rewrite and an inbound one at
/// delivery; BLUE-2, by a rule on its IPv4 record, may only connect out, over IPv6 as over IPv4
/// (stateful: TCP and ping (`ICMPv6` echo) answers come back, nothing comes in).
#[test]
fn rules_hold_by_rewrite_on_tc_and_statefully_over_ipv6() -> anyhow::Result<()> {
    let bed = TwoHosts::build_with("act", &["--decap-hook", "tc"])?;
    bed.configure_with(Translation::Rewrite)?;
    blue_ipv6(&bed)?;
    ensure!(bed.ping("RED-1", "10.0.0.2", 2)? == 2, "RED by rewrite");
    ensure!(bed.ping("BLUE-1", "fd00::2", 2)? == 2, "BLUE over IPv6");
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 2, "BLUE over IPv4");

    // RED-1's pings go no further than its port: denied before the rewrite.
    let r1 = red("10.0.0.1");
    let deny_out = add(
        &bed,
        0,
        &format!("{r1} --direction out --action deny --protocol icmp --weight 5"),
    )?;
    let h0 = &bed.hosts[0];
    let before = h0.counters()?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 0,
        "RED-1's pings denied out"
    );
    let after = h0.counters()?;
    ensure!(
        delta(&before, &after, "drop_vm_acl_denied") >= 2
            && delta(&before, &after, "vm_tx_rewrite") == 0,
        "denied before the rewrite, and counted"
    );
    ensure!(
        rule(&bed, 0, deny_out)?["packets"].as_u64() >= Some(2),
        "the deny metered its drops"
    );
    let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "10.0.0.2", 1 << 20)?;
    ensure!(sent == got, "TCP by rewrite passes the ICMP deny");

    // RED-2: TCP to port 47009 denied in, after the restore on TC; port 47001 still comes in.
    let r2 = red("10.0.0.2");
    add(
        &bed,
        1,
        &format!("{r2} --direction in --action deny --protocol tcp --local-port 47009 --weight 5"),
    )?;
    let h1 = &bed.hosts[1];
    let before = h1.counters()?;
    ensure!(
        connect(bed.vm("RED-1"), "10.0.0.2:47009", 1)? == (0, 0, 1),
        "RED-1 -> RED-2:47009 denied in"
    );
    let after = h1.counters()?;
    ensure!(
        delta(&before, &after, "drop_acl_in_denied") >= 1,
        "the restored SYNs are denied at delivery"
    );
    let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "10.0.0.2", 1 << 16)?;
    ensure!(sent == got, "TCP to RED-2's port 47001 still by rewrite");

    both_directions_and_a_vsids_rule_at_equal_weight(&bed)?;

    // BLUE-2, named by its IPv4 record: nothing in, anything out statefully.
    let b2 = format!("--vsid {BLUE_VSID} --ca 10.0.0.2");
    add(
        &bed,
        1,
        &format!("{b2} --direction in --action deny --weight 1"),
    )?;
    add(
        &bed,
        1,
        &format!("{b2} --direction out --action allow --stateful --weight 10"),
    )?;
    let (sent, got) = tcp_transfer(bed.vm("BLUE-1"), bed.vm("BLUE-2"), "fd00::1", 1 << 20)?;
    ensure!(sent == got, "BLUE-2 -> BLUE-1 over IPv6 by TCP");
    ensure!(
        bed.ping("BLUE-2", "fd00::1", 2)? == 2,
        "BLUE-2's own pings out over IPv6 are answered"
    );
    ensure!(
        bed.ping("BLUE-2", "10.0.0.1", 2)? == 2,
        "BLUE-2's own pings out over IPv4 are answered"
    );
    ensure!(
        connect(bed.vm("BLUE-1"), "[fd00::2]:47009", 1)? == (0, 0, 1),
        "BLUE-1 -> BLUE-2 over IPv6 by TCP denied in"
    );
    ensure!(bed.ping("BLUE-1", "fd00::2", 2)? == 0, "ping6 in denied");
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 0, "ping in denied");
    Ok(())
}

/// A rule `--direction both` holds each way; a VSID's deny and a VM's allow of equal weight
/// deny (deny wins a tie, whoever's rule it is), and a heavier VM allow admits. Each rule is
/// deleted again, by name.
fn both_directions_and_a_vsids_rule_at_equal_weight(bed: &TwoHosts) -> anyhow::Result<()> {
    let b1 = format!("--vsid {BLUE_VSID} --ca 10.0.0.1");
    add(
        bed,
        0,
        &format!("{b1} --direction both --action deny --protocol icmp --weight 5 --name both"),
    )?;
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 0, "BLUE-1's ping out");
    ensure!(bed.ping("BLUE-2", "10.0.0.1", 2)? == 0, "ping in to BLUE-1");
    ensure!(
        bed.ping("BLUE-1", "fd00::2", 2)? == 2,
        "ICMPv6 is not ICMP (the control)"
    );
    bed.hosts[0].nvctl(&["acl", "del", "--name", "both"])?;
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 2, "the rule is gone");

    let b2 = format!("--vsid {BLUE_VSID} --ca 10.0.0.2");
    let port = "--protocol tcp --local-port 47009";
    add(
        bed,
        1,
        &format!(
            "--vsid {BLUE_VSID} --direction in --action deny {port} --weight 7 --name vsid-deny"
        ),
    )?;
    add(
        bed,
        1,
        &format!("{b2} --direction in --action allow {port} --weight 7 --name vm-allow"),
    )?;
    ensure!(
        connect(bed.vm("BLUE-1"), "10.0.0.2:47009", 1)? == (0, 0, 1),
        "the VSID's deny wins a tie with the VM's allow"
    );
    add(
        bed,
        1,
        &format!("{b2} --direction in --action allow {port} --weight 8 --name vm-allow-8"),
    )?;
    ensure!(
        connect(bed.vm("BLUE-1"), "10.0.0.2:47009", 1)? == (0, 1, 0),
        "the heavier VM allow reaches BLUE-2's stack (refused: nothing listens)"
    );
    for name in ["vsid-deny", "vm-allow", "vm-allow-8"] {
        bed.hosts[1].nvctl(&["acl", "del", "--name", name])?;
    }
    Ok(())
}

#[test]
fn a_vm_flooding_connections_spends_its_own_budget() -> anyhow::Result<()> {
    let mut bed = with_red3("acf", &["--acl-max-flows", "64"])?;
    // RED-1 and RED-3 (host 1): anything out, statefully; nothing in but answers.
    for ca in ["10.0.0.1", "10.0.0.3"] {
        let vm = red(ca);
        add(
            &bed,
            0,
            &format!("{vm} --direction in --action deny --weight 1"),
        )?;
        add(
            &bed,
            0,
            &format!("{vm} --direction out --action allow --stateful --weight 10"),
        )?;
    }
    ensure!(
        metric(&bed, 0, "nv_acl_flow_budget", &["port=\"red1\""])? == 64,
        "the budget is the flag's"
    );
    // RED-1 opens 2000 UDP flows as fast as it can.
    let tool = bin("nv-transfer")?;
    let line = bed.vm("RED-1").ns.exec(
        tool.to_str().context("utf-8 path")?,
        &["udp-spray", "10.0.0.2:47003", "--count", "2000"],
    )?;
    ensure!(line.trim() == "sent 2000", "udp-spray: {line}");
    let red1 = metric(&bed, 0, "nv_acl_flows", &["port=\"red1\""])?;
    ensure!(
        (48..=64).contains(&red1),
        "RED-1 fills its own budget and no more: {red1} of 64"
    );
    // RED-3's new connections still succeed, tracked in its own budget.
    for _ in 0..3 {
        let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-3"), "10.0.0.2", 1 << 16)?;
        ensure!(sent == got, "RED-3 -> RED-2 by TCP while RED-1 floods");
    }
    let red3 = metric(&bed, 0, "nv_acl_flows", &["port=\"red3\""])?;
    ensure!(red3 >= 1, "RED-3's connections are tracked: {red3}");
    // RED-1's own newest flows evicted its oldest: a connection it opens now works too.
    let (sent, got) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), "10.0.0.2", 1 << 16)?;
    ensure!(sent == got, "RED-1 -> RED-2 after its flood");
    // Established connections survive an agent restart (the flows live in the pins): RED-3
    // opens a UDP flow, the agent restarts, and only then does RED-2 answer on it.
    udp_from(bed.vm("RED-3"), "10.0.0.2:47010", 47011, 1)?;
    let before = metric(&bed, 0, "nv_acl_flows", &["port=\"red3\""])?;
    bed.hosts[0].stop_agent();
    bed.hosts[0].start_agent()?;
    let after = metric(&bed, 0, "nv_acl_flows", &["port=\"red3\""])?;
    ensure!(
        after == before,
        "RED-3's tracked connections over a restart: {before} -> {after}"
    );
    ensure!(
        answered(&bed, 47010)? == 5,
        "RED-2's answers on RED-3's flow opened before the restart"
    );
    ensure!(
        answered(&bed, 47012)? == 0,
        "the same from another port (no flow): denied in"
    );
    // And over an upgrade: to another build (whose local-PA map has another layout, migrated
    // while the old programs forward) and back; the flow table keeps its layout and its pin.
    let probe = nv_tests::sys::probe_agent()?;
    for build in [Some(probe), None] {
        let h = &mut bed.hosts[0];
        h.stop_agent();
        h.agent_bin.clone_from(&build);
        h.start_agent()?;
        let which = if build.is_some() { "to" } else { "back from" };
        ensure!(
            h.counters()?.contains_key("layout_probe") == build.is_some(),
            "the upgrade {which} the probe build did not happen"
        );
        ensure!(
            answered(&bed, 47010)? == 5 && answered(&bed, 47012)? == 0,
            "RED-3's flow over the upgrade {which} another build"
        );
    }
    Ok(())
}

/// RED-2 sends 5 datagrams from its port `from` to RED-3's port 47011: how many RED-3 got.
fn answered(bed: &TwoHosts, from: u16) -> anyhow::Result<u64> {
    let tool = bin("nv-transfer")?;
    let tool = tool.to_str().context("utf-8 path")?.to_owned();
    let ns = bed.vm("RED-3").ns.name.clone();
    let sink = std::thread::spawn(move || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns, &tool, "udp-sink", "0.0.0.0:47011"])
            .args(["--seconds", "2"])
            .output()
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    udp_from(bed.vm("RED-2"), "10.0.0.3:47011", from, 5)?;
    let out = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("received ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("udp-sink said {text:?}"))
}

/// `nv-transfer udp-from` in `vm`: `count` datagrams to `to` from local port `from`.
fn udp_from(vm: &Vm, to: &str, from: u16, count: u32) -> anyhow::Result<()> {
    let tool = bin("nv-transfer")?;
    let line = vm.ns.exec(
        tool.to_str().context("utf-8 path")?,
        &[
            "udp-from",
            to,
            "--from",
            &from.to_string(),
            "--count",
            &count.to_string(),
        ],
    )?;
    ensure!(line.trim() == format!("sent {count}"), "udp-from: {line}");
    Ok(())
}
