//! Cluster mode: three hosts whose agents follow a real etcd (three members, started and
//! stopped by the tests), tenant traffic across them.
use std::{
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nv_agent::datapath::LookupView;
use nv_common::LookupKey;
use nv_tests::{
    etcd::{Etcd, Proxies},
    testbed::{Host, PingStream, TwoHosts},
};

/// What `h`'s datapath holds for RED's (VSID 5001) `ca`: its PA's last byte and whether the
/// port is here.
fn red_entry(h: &Host, last: u8) -> anyhow::Result<Option<(u8, bool)>> {
    let view = LookupView::open(&h.pin_path)?;
    Ok(view
        .get(&LookupKey {
            vsid: 5001,
            ca: [10, 0, 0, last],
        })
        .map(|v| (v.pa[15], v.ifindex != 0)))
}

/// Waits (up to 10 s) until `ok` holds on every host.
fn converge(
    bed: &TwoHosts,
    what: &str,
    ok: impl Fn(usize, &Host) -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    converge_within(bed, what, 10, ok)
}

/// Waits (up to `secs`) until `ok` holds on every host.
fn converge_within(
    bed: &TwoHosts,
    what: &str,
    secs: u64,
    ok: impl Fn(usize, &Host) -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let mut all = true;
        for (i, h) in bed.hosts.iter().enumerate() {
            all &= ok(i, h)?;
        }
        if all {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(secs) {
            bail!("not converged in {secs} s: {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn cluster_status(h: &Host) -> anyhow::Result<serde_json::Value> {
    Ok(h.nvctl_json(&["status"])?["cluster"].clone())
}

/// Three hosts and etcd over TLS under nv's roles, RED and BLUE configured by the operator.
fn bed() -> anyhow::Result<(TwoHosts, Etcd)> {
    bed_with(true)
}

/// As [`bed`]; `secure` false: plain HTTP, and records written through the hosts' agents.
fn bed_with(secure: bool) -> anyhow::Result<(TwoHosts, Etcd)> {
    let (bed, etcd) = TwoHosts::build_cluster_with("cl", 3, 3, secure)?;
    bed.configure_cluster()?;
    // Every host holds every record, its own VMs' with their port.
    converge(&bed, "the records configured on host 1", |i, h| {
        Ok(red_entry(h, 1)?.map(|(_, here)| here) == Some(i == 0)
            && red_entry(h, 2)?.map(|(_, here)| here) == Some(i == 1))
    })?;
    Ok((bed, etcd))
}

/// RED's VSID as contoso's subnet 10.0.0.0/24, its gateway at 10.0.0.254.
const CONTOSO_SUBNET: [&str; 12] = [
    "route",
    "add",
    "--rdid",
    "contoso",
    "--vsid",
    "5001",
    "--prefix",
    "10.0.0.0/24",
    "--nexthop",
    "0.0.0.0",
    "--gateway",
    "10.0.0.254",
];

#[test]
fn records_written_on_one_host_reach_every_host_and_a_vm_migrates() -> anyhow::Result<()> {
    let (mut bed, _etcd) = bed()?;
    ensure!(bed.ping("RED-1", "10.0.0.2", 3)? == 3, "RED-1 -> RED-2");
    ensure!(bed.ping("BLUE-2", "10.0.0.1", 3)? == 3, "BLUE-2 -> BLUE-1");
    ipv6_records_are_distributed_too(&bed)?;
    // nvctl on every host lists the same records, with the hosts of their ports.
    for h in &bed.hosts {
        let listed = h.nvctl_json(&["lookup", "list", "--vsid", "5001"])?;
        ensure!(
            listed[1]["host"] == "host2" && listed[1]["port"] == "red2",
            "{}: {listed}",
            h.name
        );
        let s = cluster_status(h)?;
        ensure!(
            s["connected"] == true && s["bad_records"] == 0,
            "{}: {s}",
            h.name
        );
    }

    // RED-2 migrates from host 2 to host 3 while RED-1 pings it every 10 ms; the move is
    // typed on host 1.
    let stream = PingStream::start(&bed, "RED-1", "10.0.0.2", 500, "0.01")?;
    thread::sleep(Duration::from_millis(1500));
    let moved_at = Instant::now();
    bed.rehome("RED-2", 2)?;
    bed.hosts[0].nvctl(&[
        "lookup",
        "move",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.2",
        "--pa",
        "198.18.0.3",
        "--port",
        "red2",
        "--host",
        "host3",
    ])?;
    let after_nvctl = converge(&bed, "RED-2 on host 3", |i, h| {
        Ok(red_entry(h, 2)? == Some((3, i == 2)))
    })?;
    println!(
        "every host followed the move {} ms after its port was re-created, {} ms after nvctl \
         returned",
        moved_at.elapsed().as_millis(),
        after_nvctl.as_millis()
    );
    let (sent, received) = stream.finish()?;
    println!("{received} of {sent} pings answered across the migration");
    ensure!(
        sent == 500 && received >= 450,
        "{received} of {sent} answered across the migration"
    );
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 3)? == 3,
        "RED-1 -> RED-2 on host 3"
    );
    // Host 2 keeps nothing of RED-2 but the record.
    let status = bed.hosts[1].nvctl_json(&["status"])?;
    ensure!(
        status["ports"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["port"] != "red2")),
        "host 2 still has red2: {status}"
    );
    Ok(())
}

/// RED-1's and RED-2's IPv6 records, both typed on host 3: every host applies them, RED-1
/// reaches RED-2 by IPv6 across hosts, and no host deletes RED-2's IPv4 record while its IPv6
/// record stands (its port's entry is the IPv4 record's). Then they go, as they came.
fn ipv6_records_are_distributed_too(bed: &TwoHosts) -> anyhow::Result<()> {
    let typed = &bed.hosts[2];
    for (vm, ca, host) in [("RED-1", "fd00::1", 0), ("RED-2", "fd00::2", 1)] {
        let v = bed.vm(vm);
        typed.nvctl(&[
            "lookup",
            "add",
            "--vsid",
            "5001",
            "--ca",
            ca,
            "--pa",
            &bed.hosts[host].pa,
            "--mac",
            &v.mac,
            "--port",
            &v.port,
            "--host",
            &bed.hosts[host].name,
        ])?;
        v.add_ipv6(ca)?;
    }
    for h in &bed.hosts {
        let listed = h.nvctl_json(&["lookup", "list", "--vsid", "5001"])?;
        let v6 = listed.as_array().map_or(0, |l| {
            l.iter()
                .filter(|r| r["ca"].as_str().is_some_and(|c| c.contains(':')))
                .count()
        });
        ensure!(v6 == 2, "{}: {v6} IPv6 records of 2: {listed}", h.name);
    }
    ensure!(
        bed.ping("RED-1", "fd00::2", 3)? == 3,
        "RED-1 -> RED-2 by IPv6"
    );
    for h in &bed.hosts {
        let refused = h
            .nvctl(&["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.2"])
            .map_or_else(|e| e.to_string(), |out| format!("done: {out}"));
        ensure!(
            refused.contains("delete that first"),
            "{}: deleting RED-2's IPv4 record under its IPv6 one: {refused}",
            h.name
        );
    }
    for ca in ["fd00::1", "fd00::2"] {
        typed.nvctl(&["lookup", "del", "--vsid", "5001", "--ca", ca])?;
    }
    Ok(())
}

/// Whether `h`'s datapath has the record of VSID `vsid` for `ca`.
fn has(h: &Host, vsid: u32, ca: [u8; 4]) -> anyhow::Result<bool> {
    Ok(LookupView::open(&h.pin_path)?
        .get(&LookupKey { vsid, ca })
        .is_some())
}

/// `nvctl lookup add` of a remote record of VSID 7001 (a tenant with no VM here).
fn add_remote(h: &Host, last: u8) -> anyhow::Result<String> {
    h.nvctl(&[
        "lookup",
        "add",
        "--vsid",
        "7001",
        "--ca",
        &format!("10.7.0.{last}"),
        "--pa",
        "198.18.0.9",
        "--mac",
        &format!("02:07:00:00:00:{last:02x}"),
    ])
}

#[test]
fn losing_an_etcd_member_or_all_of_etcd_never_stops_forwarding() -> anyhow::Result<()> {
    let (mut bed, mut etcd) = bed()?;
    // One member of three gone: nothing stops.
    etcd.kill_member(0);
    add_remote(&bed.hosts[1], 1)?;
    converge(&bed, "a record written with a member down", |_, h| {
        has(h, 7001, [10, 7, 0, 1])
    })?;
    // A subnet, whose gateway every host answers: an agent restarted while etcd is away
    // must bring it back from what it applied last.
    bed.hosts[0].nvctl(&CONTOSO_SUBNET)?;
    converge(&bed, "a route written with a member down", |_, h| {
        Ok(h.nvctl_json(&["status"])?["routes"] == 1)
    })?;

    // All of etcd gone: forwarding goes on, even across an agent's restart; changes are
    // refused with the reason, and nothing is half done.
    let stream = PingStream::start(&bed, "RED-1", "10.0.0.2", 1000, "0.01")?;
    etcd.kill_member(1);
    etcd.kill_member(2);
    // An idle watch finds its member gone by its keep-alive (seconds).
    converge_within(&bed, "every agent knows etcd is away", 30, |_, h| {
        Ok(cluster_status(h)?["connected"] == false)
    })?;
    let err = add_remote(&bed.hosts[0], 2).expect_err("a change while etcd is away");
    ensure!(
        err.to_string().contains("etcd is unreachable"),
        "the refusal does not say why: {err}"
    );
    let metrics = bed.hosts[0]
        .ns
        .exec("curl", &["-sf", "http://127.0.0.1:9469/metrics"])?;
    ensure!(
        metrics.lines().any(|l| l == "nv_cluster_connected 0"),
        "the metric does not say etcd is away: {}",
        metrics
            .lines()
            .filter(|l| l.contains("cluster"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    bed.hosts[1].stop_agent();
    bed.hosts[1].start_agent()?;
    ensure!(
        bed.hosts[1].nvctl_json(&["status"])?["routes"] == 1
            && bed.ping("RED-2", "10.0.0.254", 2)? == 2,
        "host 2's agent, restarted while etcd was away, lost its route"
    );
    let (sent, received) = stream.finish()?;
    ensure!(
        sent == received,
        "{received} of {sent} answered while etcd was away and host 2's agent restarted"
    );

    // etcd back: every agent follows again, and a change reaches all.
    for i in 0..3 {
        etcd.start_member(i)?;
    }
    etcd.wait_healthy()?;
    converge(&bed, "every agent follows etcd again", |_, h| {
        Ok(cluster_status(h)?["connected"] == true)
    })?;
    add_remote(&bed.hosts[2], 3)?;
    converge(&bed, "a record written after the outage", |_, h| {
        has(h, 7001, [10, 7, 0, 3])
    })?;
    ensure!(
        bed.hosts
            .iter()
            .all(|h| !has(h, 7001, [10, 7, 0, 2]).unwrap_or(true)),
        "the refused record is somewhere"
    );
    Ok(())
}

#[test]
fn restarted_agents_catch_up_even_past_a_compaction_and_bad_values_are_left_out()
-> anyhow::Result<()> {
    let (mut bed, etcd) = bed()?;
    // Host 2's agent misses changes; it catches up from the revision it applied.
    bed.hosts[1].stop_agent();
    add_remote(&bed.hosts[0], 1)?;
    add_remote(&bed.hosts[0], 2)?;
    bed.hosts[0].nvctl(&["lookup", "del", "--vsid", "7001", "--ca", "10.7.0.1"])?;
    bed.hosts[1].start_agent()?;
    // The API answers once the agent is ready: caught up.
    bed.hosts[1].nvctl(&["status"])?;
    ensure!(
        has(&bed.hosts[1], 7001, [10, 7, 0, 2])? && !has(&bed.hosts[1], 7001, [10, 7, 0, 1])?,
        "host 2 did not catch up before saying it was ready: {}",
        bed.hosts[1].agent_log()
    );

    // Host 3's agent misses changes that etcd then compacts away: a full resync, nothing
    // stale left.
    bed.hosts[2].stop_agent();
    add_remote(&bed.hosts[0], 3)?;
    bed.hosts[0].nvctl(&["lookup", "del", "--vsid", "7001", "--ca", "10.7.0.2"])?;
    let rev = etcd.revision()?;
    etcd.ctl(&["compact", &rev.to_string()])?;
    bed.hosts[2].start_agent()?;
    bed.hosts[2].nvctl(&["status"])?;
    ensure!(
        has(&bed.hosts[2], 7001, [10, 7, 0, 3])? && !has(&bed.hosts[2], 7001, [10, 7, 0, 2])?,
        "host 3 did not resynchronise past the compaction"
    );
    ensure!(
        bed.hosts[2].agent_log().contains("compacted"),
        "host 3 did not say it resynchronised: {}",
        bed.hosts[2].agent_log()
    );

    // Bad values in etcd: one that does not parse, one that takes another record's MAC, one
    // under another record's key. Left out and reported everywhere; nothing else affected.
    etcd.ctl(&["put", "/nv/v1/lookups/7001/10.7.0.50", "not json"])?;
    etcd.ctl(&[
        "put",
        "/nv/v1/lookups/5001/10.0.0.60",
        r#"{"vsid":5001,"ca":"10.0.0.60","pa":"198.18.0.9","mac":"02:00:00:00:01:01"}"#,
    ])?;
    etcd.ctl(&[
        "put",
        "/nv/v1/lookups/5001/10.0.0.61",
        r#"{"vsid":5001,"ca":"10.0.0.62","pa":"198.18.0.9","mac":"02:00:00:00:09:62"}"#,
    ])?;
    add_remote(&bed.hosts[1], 4)?;
    converge(
        &bed,
        "three bad values left out, the good record applied",
        |_, h| Ok(cluster_status(h)?["bad_records"] == 3 && has(h, 7001, [10, 7, 0, 4])?),
    )?;
    for h in &bed.hosts {
        ensure!(
            !has(h, 5001, [10, 0, 0, 60])? && !has(h, 5001, [10, 0, 0, 61])?,
            "{}: a bad value reached the datapath",
            h.name
        );
    }
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "RED after the bad values"
    );
    // Mended, it is applied.
    etcd.ctl(&[
        "put",
        "/nv/v1/lookups/7001/10.7.0.50",
        r#"{"vsid":7001,"ca":"10.7.0.50","pa":"198.18.0.9","mac":"02:07:00:00:00:50"}"#,
    ])?;
    converge(&bed, "the mended record applied", |_, h| {
        Ok(cluster_status(h)?["bad_records"] == 2 && has(h, 7001, [10, 7, 0, 50])?)
    })?;
    Ok(())
}

#[test]
fn concurrent_changes_of_one_record_are_refused_never_lost() -> anyhow::Result<()> {
    let (bed, etcd) = bed()?;
    for i in 1..=5u8 {
        let ca = format!("10.8.0.{i}");
        // The same new record, with two MACs, typed on two hosts at once.
        let children: Vec<(String, Child)> = [(0usize, 1u8), (1, 2)]
            .iter()
            .map(|(h, m)| {
                let mac = format!("02:08:00:00:{m:02x}:{i:02x}");
                let child = bed.hosts[*h]
                    .nvctl_command()?
                    .args([
                        "lookup",
                        "add",
                        "--vsid",
                        "7002",
                        "--ca",
                        &ca,
                        "--pa",
                        "198.18.0.9",
                    ])
                    .args(["--mac", &mac])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()?;
                Ok((mac, child))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut won = Vec::new();
        for (mac, child) in children {
            let out = child.wait_with_output()?;
            if out.status.success() {
                won.push(mac);
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                ensure!(
                    err.contains("meanwhile") || err.contains("already exists"),
                    "the losing change does not say why: {err}"
                );
            }
        }
        ensure!(
            won.len() == 1,
            "{ca}: {} of 2 concurrent adds succeeded",
            won.len()
        );
        let stored = etcd.ctl(&[
            "get",
            &format!("/nv/v1/lookups/7002/{ca}"),
            "--print-value-only",
        ])?;
        ensure!(
            stored.contains(&won[0]),
            "{ca}: etcd holds {stored}, the winner was {}",
            won[0]
        );
    }
    Ok(())
}

/// How many times etcd's key has been written since it was created (0: absent).
fn version(etcd: &Etcd, key: &str) -> anyhow::Result<i64> {
    let out = etcd.ctl(&["get", key, "-w", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["kvs"][0]["version"].as_i64().unwrap_or(0))
}

#[test]
fn a_write_whose_answer_is_lost_is_retried_on_the_next_member_and_made_once() -> anyhow::Result<()>
{
    // Plain HTTP: the proxies read the requests to lose the answer of one write. The agent
    // writes (a test cluster without roles), as etcd_writer does for nvctl too.
    let (mut bed, etcd) = bed_with(false)?;
    // Host 1 reaches each member through a proxy that can lose one answer.
    let proxies = Proxies::start(&bed.underlay, "198.18.255.254", 22_500, &etcd.members)?;
    let h1 = &mut bed.hosts[0];
    h1.stop_agent();
    h1.agent_args[1] = proxies.urls.join(",");
    h1.start_agent()?;
    add_remote(&bed.hosts[0], 1)?;

    let key = "/nv/v1/lookups/7001/10.7.0.2";
    // An add: etcd applies it, its answer is lost; the retry on the next member finds the key
    // holding exactly what was written.
    proxies.lose_answer_to(key, 2);
    add_remote(&bed.hosts[0], 2)?;
    ensure!(
        proxies.fired(),
        "no answer was lost: the test tested nothing"
    );
    ensure!(
        version(&etcd, key)? == 1,
        "the add was not made exactly once"
    );
    // A move and a delete, each answer lost likewise.
    proxies.lose_answer_to(key, 2);
    bed.hosts[0].nvctl(&[
        "lookup",
        "move",
        "--vsid",
        "7001",
        "--ca",
        "10.7.0.2",
        "--pa",
        "198.18.0.8",
    ])?;
    ensure!(proxies.fired(), "no answer to the move was lost");
    let moved = etcd.ctl(&["get", key, "--print-value-only"])?;
    ensure!(
        version(&etcd, key)? == 2 && moved.contains("198.18.0.8"),
        "the move was not made exactly once: {moved}"
    );
    converge(&bed, "the move everywhere", |_, h| {
        Ok(LookupView::open(&h.pin_path)?
            .get(&LookupKey {
                vsid: 7001,
                ca: [10, 7, 0, 2],
            })
            .is_some_and(|v| v.pa[15] == 8))
    })?;
    proxies.lose_answer_to(key, 2);
    bed.hosts[0].nvctl(&["lookup", "del", "--vsid", "7001", "--ca", "10.7.0.2"])?;
    ensure!(proxies.fired(), "no answer to the delete was lost");
    ensure!(version(&etcd, key)? == 0, "the delete was not made");
    converge(&bed, "the delete everywhere", |_, h| {
        Ok(!has(h, 7001, [10, 7, 0, 2])?)
    })?;
    let said = bed.hosts[0]
        .agent_log()
        .matches("found etcd holding what it wrote")
        .count();
    ensure!(
        said == 3,
        "the agent did not say 3 times that a retry found its write made: {}",
        bed.hosts[0].agent_log()
    );
    Ok(())
}

/// nvctl on host `h` with `env` in place of the operator's settings; (success, stderr).
fn nvctl_as(h: &Host, env: &[(String, String)], args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut cmd = h.nvctl_command()?;
    for (k, _) in &h.nvctl_env {
        cmd.env_remove(k);
    }
    let out = cmd
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    ))
}

#[test]
fn a_cluster_trusts_no_single_host() -> anyhow::Result<()> {
    // Agents reach etcd over TLS with their own certificates, under etcd's roles for nv, and
    // converge (`bed` waits for every host to hold RED's records with their ports).
    let (bed, etcd) = bed()?;
    ensure!(bed.ping("RED-1", "10.0.0.2", 2)? == 2, "RED-1 -> RED-2");
    for h in &bed.hosts {
        let s = cluster_status(h)?;
        ensure!(s["connected"] == true, "{}: {s}", h.name);
        // Each wrote its own key, the one key its identity may write.
        let own = etcd.ctl(&[
            "get",
            &format!("/nv/v1/hosts/{}", h.name),
            "--print-value-only",
        ])?;
        ensure!(
            own.contains(&format!(r#""host":"{}""#, h.name)),
            "{}: {own}",
            h.name
        );
    }

    the_operator_adds_moves_and_deletes(&bed)?;
    routes_reach_every_hosts_router(&bed, &etcd)?;
    acls_reach_every_host(&bed, &etcd)?;
    a_host_identity_cannot_change_a_record(&bed, &etcd)?;
    clients_etcd_does_not_know_are_refused(&bed, &etcd)?;
    // The operator's listing (positive control) shows RED and BLUE's records, unchanged.
    let listed = bed.hosts[1].nvctl_json(&["lookup", "list"])?;
    ensure!(
        listed.as_array().map(Vec::len) == Some(bed.vms.len()),
        "the operator lists {listed}"
    );
    Ok(())
}

/// Routes are a table etcd shares: the operator's route reaches every host's router (the
/// gateway answers on each), a host's identity cannot write one, and its deletion reaches all.
fn routes_reach_every_hosts_router(bed: &TwoHosts, etcd: &Etcd) -> anyhow::Result<()> {
    let routes = |h: &Host| -> anyhow::Result<u64> {
        h.nvctl_json(&["status"])?["routes"]
            .as_u64()
            .context("status names its routes")
    };
    let subnet = CONTOSO_SUBNET;
    // Through the agent, a host's identity is refused in one line saying what to do.
    let (ok, err) = nvctl_as(&bed.hosts[0], &[], &subnet)?;
    ensure!(
        !ok && err.lines().count() == 1 && err.contains("to this host's identity"),
        "a route through host 1's agent: {ok} {err}"
    );
    let route = r#"{"rdid":"contoso","vsid":5001,"prefix":"10.0.0.0/24","nexthop":"0.0.0.0"}"#;
    let e = etcd
        .ctl_as(
            Some("host1"),
            &["put", "/nv/v1/routes/contoso/10.0.0.0_24/0.0.0.0", route],
        )
        .expect_err("etcd lets host 1 write a route");
    ensure!(e.to_string().contains("permission denied"), "{e}");
    // The operator's, from host 3.
    bed.hosts[2].nvctl(&subnet)?;
    converge(bed, "the operator's route", |_, h| Ok(routes(h)? == 1))?;
    for vm in ["RED-1", "RED-2"] {
        ensure!(
            bed.ping(vm, "10.0.0.254", 2)? == 2,
            "{vm} -> its gateway, answered by its own host"
        );
    }
    let listed = bed.hosts[0].nvctl_json(&["route", "list"])?;
    ensure!(
        listed.as_array().map(Vec::len) == Some(1),
        "the operator lists {listed}"
    );
    bed.hosts[2].nvctl(&[
        "route",
        "del",
        "--rdid",
        "contoso",
        "--prefix",
        "10.0.0.0/24",
    ])?;
    converge(bed, "the route's deletion", |_, h| Ok(routes(h)? == 0))?;
    ensure!(
        bed.ping("RED-1", "10.0.0.254", 1)? == 0,
        "the gateway answers after its subnet went"
    );
    Ok(())
}

/// ACL rules are a table etcd shares: the operator's deny reaches the hosts of RED's VMs
/// (RED's pings stop, BLUE's go on), a host's identity cannot write one, and its deletion
/// reaches all.
fn acls_reach_every_host(bed: &TwoHosts, etcd: &Etcd) -> anyhow::Result<()> {
    let rules = |h: &Host| -> anyhow::Result<usize> {
        Ok(h.nvctl_json(&["acl", "list"])?
            .as_array()
            .context("acl list is a list")?
            .len())
    };
    let deny = [
        "acl",
        "add",
        "--vsid",
        "5001",
        "--direction",
        "in",
        "--action",
        "deny",
        "--protocol",
        "icmp",
        "--weight",
        "10",
    ];
    let (ok, err) = nvctl_as(&bed.hosts[0], &[], &deny)?;
    ensure!(
        !ok && err.lines().count() == 1 && err.contains("written by the operator"),
        "a rule through host 1's agent: {ok} {err}"
    );
    let rule = r#"{"id":1,"vsid":5001,"direction":"in","action":"deny","weight":10}"#;
    let e = etcd
        .ctl_as(Some("host1"), &["put", "/nv/v1/acls/1", rule])
        .expect_err("etcd lets host 1 write an ACL rule");
    ensure!(e.to_string().contains("permission denied"), "{e}");
    let added = bed.hosts[2].nvctl_json(&deny)?;
    let id = added["id"].as_u64().context("the rule's id")?;
    converge(bed, "the operator's ACL rule", |_, h| Ok(rules(h)? == 1))?;
    ensure!(bed.ping("RED-1", "10.0.0.2", 2)? == 0, "RED's pings denied");
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 2, "BLUE's pass");
    bed.hosts[2].nvctl(&["acl", "del", "--id", &id.to_string()])?;
    converge(bed, "the rule's deletion", |_, h| Ok(rules(h)? == 0))?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "RED's pings once the rule went"
    );
    Ok(())
}

/// From host 3; every host follows.
fn the_operator_adds_moves_and_deletes(bed: &TwoHosts) -> anyhow::Result<()> {
    add_remote(&bed.hosts[2], 1)?;
    converge(bed, "the operator's add", |_, h| {
        has(h, 7001, [10, 7, 0, 1])
    })?;
    bed.hosts[2].nvctl(&[
        "lookup",
        "move",
        "--vsid",
        "7001",
        "--ca",
        "10.7.0.1",
        "--pa",
        "198.18.0.8",
    ])?;
    converge(bed, "the operator's move", |_, h| {
        Ok(LookupView::open(&h.pin_path)?
            .get(&LookupKey {
                vsid: 7001,
                ca: [10, 7, 0, 1],
            })
            .is_some_and(|v| v.pa[15] == 8))
    })?;
    bed.hosts[2].nvctl(&["lookup", "del", "--vsid", "7001", "--ca", "10.7.0.1"])?;
    converge(bed, "the operator's delete", |_, h| {
        Ok(!has(h, 7001, [10, 7, 0, 1])?)
    })?;
    Ok(())
}

fn a_host_identity_cannot_change_a_record(bed: &TwoHosts, etcd: &Etcd) -> anyhow::Result<()> {
    // A host's identity cannot change a record: through its agent (nvctl without the
    // operator's settings), refused in one line that says what to do...
    let add = [
        "lookup",
        "add",
        "--vsid",
        "7001",
        "--ca",
        "10.7.0.2",
        "--pa",
        "198.18.0.9",
        "--mac",
        "02:07:00:00:00:02",
    ];
    let (ok, err) = nvctl_as(&bed.hosts[0], &[], &add)?;
    ensure!(
        !ok && err.lines().count() == 1
            && err.contains("to this host's identity")
            && err.contains("NV_ETCD_CERT_FILE"),
        "a write through host 1's agent: {ok} {err}"
    );
    let pki = etcd.pki.as_ref().context("a TLS cluster")?;
    // ...with nvctl and the host's certificate...
    let (ok, err) = nvctl_as(
        &bed.hosts[0],
        &pki.env(&etcd.endpoints(), Some("host1")),
        &add,
    )?;
    ensure!(
        !ok && err.contains("identity of --etcd-cert-file") && err.contains("nv-admin"),
        "nvctl with host 1's certificate: {ok} {err}"
    );
    // ...or straight to etcd: no record, and no other host's key (host10's neither: a
    // host's key is one key, not a prefix).
    let record = r#"{"vsid":5001,"ca":"10.0.0.2","pa":"198.18.0.1","mac":"02:00:00:00:00:02"}"#;
    for args in [
        &["put", "/nv/v1/lookups/5001/10.0.0.2", record][..],
        &["del", "/nv/v1/lookups/5001/10.0.0.2"],
        &["put", "/nv/v1/hosts/host2", "{}"],
        &["put", "/nv/v1/hosts/host10", "{}"],
    ] {
        let e = etcd
            .ctl_as(Some("host1"), args)
            .expect_err("etcd lets host 1 write");
        ensure!(e.to_string().contains("permission denied"), "{args:?}: {e}");
    }
    // Reading is what a host needs, and may.
    let keys = etcd.ctl_as(
        Some("host1"),
        &["get", "/nv/v1/lookups/", "--prefix", "--keys-only"],
    )?;
    ensure!(
        keys.contains("/nv/v1/lookups/5001/10.0.0.2"),
        "host 1 reads: {keys}"
    );
    ensure!(
        !has(&bed.hosts[0], 7001, [10, 7, 0, 2])?
            && version(etcd, "/nv/v1/lookups/7001/10.7.0.2")? == 0,
        "a refused write was made"
    );
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "RED-1 -> RED-2 after the refusals"
    );
    Ok(())
}

/// A certificate of the CA that etcd knows no user for, and a client without one.
fn clients_etcd_does_not_know_are_refused(bed: &TwoHosts, etcd: &Etcd) -> anyhow::Result<()> {
    let pki = etcd.pki.as_ref().context("a TLS cluster")?;
    let e = etcd
        .ctl_as(
            Some("stranger"),
            &["get", "/nv/v1/", "--prefix", "--keys-only"],
        )
        .expect_err("etcd answers a stranger");
    ensure!(!e.to_string().contains("/nv/v1/lookups"), "{e}");
    let (ok, err) = nvctl_as(
        &bed.hosts[0],
        &pki.env(&etcd.endpoints(), None),
        &["lookup", "list"],
    )?;
    ensure!(
        !ok && err.contains("etcd is unreachable") && err.contains("client certificate"),
        "nvctl without a certificate: {ok} {err}"
    );
    etcd.ctl_as(None, &["get", "/nv/v1/", "--prefix", "--keys-only"])
        .expect_err("etcd answers a client without a certificate");
    Ok(())
}
