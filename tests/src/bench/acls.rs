//! What port ACLs cost: a VM's path with its rules against the same path without them, in
//! one run. Program cost with `BPF_PROG_TEST_RUN` on VM to VM (RED-1 to RED-3, both ports'
//! rules checked: RED-1's outbound, RED-3's inbound), the ports' ACL flag set and cleared in
//! turns; end to end on the two-host bed (RED-1's outbound and RED-2's inbound rules), each
//! configuration beside a run without rules. Rules are the worst case for the scan: every
//! rule but the last (the allow) is a deny for other traffic, of higher weight.
use nv_agent::{
    model::acl::{AclRule, Action, Direction, PortRange, Protocol},
    tables::acls::{compile, empty_set},
};
use nv_common::{
    PortInfo,
    acl::{AclSet, AclSetKey, DIR_IN, DIR_OUT},
    program_names::FROM_VM,
    v4_mapped,
};
use serde::Serialize;

use super::{Scale, e2e::tcp, quantile};
use crate::{
    fixture::{CA1, CA3, Host, Programs, RED, RED1_MAC, RED3_MAC, host_with, udp_frame},
    testbed::{RED_VSID, TwoHosts},
};

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Rules per port and direction (0: the ports have none).
    pub rules: u32,
    pub stateful: bool,
    /// Median of single runs of the VM-side program, 64-byte frame, ns: with the rules, and
    /// the same path, same run, without.
    pub program_ns: f64,
    pub program_without_ns: f64,
    /// End to end, with the rules and without (same bed, measured back to back); 0 when not
    /// measured for this row.
    pub pps: f64,
    pub pps_without: f64,
    pub tcp_gbps: f64,
    pub tcp_without_gbps: f64,
}

/// (rules, stateful), each measured by program cost and end to end.
const CONFIGS: [(u32, bool); 5] = [
    (0, false),
    (10, false),
    (10, true),
    (1000, false),
    (1000, true),
];

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let programs = std::thread::spawn(move || program_costs(scale))
        .join()
        .map_err(|_| anyhow::anyhow!("ACL program benchmark panicked"))??;
    let e2e = end_to_end(scale)?;
    Ok(CONFIGS
        .iter()
        .zip(programs)
        .map(|(&(rules, stateful), (with, without))| {
            let e = e2e
                .iter()
                .find(|(r, s, _)| *r == rules && *s == stateful)
                .map_or([0.0; 4], |(_, _, e)| *e);
            Row {
                rules,
                stateful,
                program_ns: with,
                program_without_ns: without,
                pps: e[0],
                pps_without: e[1],
                tcp_gbps: e[2],
                tcp_without_gbps: e[3],
            }
        })
        .collect())
}

/// `n` rules for `dir`: `n - 1` denies of TCP to other ports at weight 100, then an allow of
/// anything (stateful or not) at weight 1.
fn rules(n: u32, dir: Direction, stateful: bool) -> Vec<AclRule> {
    let rule = |id: u32, action, protocol, port: Option<u16>, weight| AclRule {
        id,
        name: None,
        vsid: RED_VSID,
        ca: None,
        direction: dir,
        action,
        remote: None,
        local: None,
        protocol,
        remote_port: None,
        local_port: port.map(|p| PortRange(p, p)),
        weight,
        stateful,
        idle_timeout: 300,
    };
    let mut out: Vec<AclRule> = (1..n)
        .map(|i| {
            let port = u16::try_from(1000 + i).unwrap_or(u16::MAX);
            let mut r = rule(i, Action::Deny, Some(Protocol::TCP), Some(port), 100);
            r.stateful = false;
            r
        })
        .collect();
    if n > 0 {
        out.push(rule(n, Action::Allow, None, None, 1));
    }
    out
}

fn set_of(rules: &[AclRule], flow_sets: u32) -> Box<AclSet> {
    let mut set = empty_set();
    set.len = u32::try_from(rules.len()).unwrap_or(0);
    set.flow_sets = flow_sets;
    for (slot, r) in set.rules.iter_mut().zip(rules) {
        *slot = compile(r);
    }
    set
}

/// Per configuration: (with the rules, without), ns.
fn program_costs(scale: Scale) -> anyhow::Result<Vec<(f64, f64)>> {
    let rounds = 20;
    let per_round = scale.pick(2_500, 25);
    let mut h = host_with(true, 1_000, Programs::Forwarding)?;
    let red3 = h.ns.ifindex("red3")?;
    let frame = udp_frame(RED1_MAC, RED3_MAC, CA1, CA3, &[0u8; 22]);
    let mut out = Vec::new();
    for &(n, stateful) in &CONFIGS {
        let sets = if stateful { 1024 } else { 0 };
        h.desired.acls.sets.clear();
        h.desired.acls.flows.clear();
        for (dir, ca) in [(DIR_OUT, CA1), (DIR_IN, CA3)] {
            let d = if dir == DIR_OUT {
                Direction::Out
            } else {
                Direction::In
            };
            let key = AclSetKey {
                vsid: RED,
                dir,
                ca: v4_mapped(ca),
            };
            h.desired
                .acls
                .sets
                .insert(key, set_of(&rules(n, d, stateful), sets));
            if stateful {
                h.desired.acls.flows.insert((RED, v4_mapped(ca)), sets);
            }
        }
        h.dp.sync(&h.desired)?;
        let ports = [(h.red1, PortInfo::ACL_OUT), (red3, PortInfo::ACL_IN)];
        let flagged = |h: &mut Host, on: bool| -> anyhow::Result<()> {
            for (port, flag) in ports {
                if let Some(mut p) = h.desired.ports.get(&port).copied() {
                    // A VM without rules: its port entry says so, whatever the maps hold.
                    if on && n > 0 {
                        p.flags |= flag;
                    } else {
                        p.flags &= !flag;
                    }
                    h.dp.put_port(port, &p)?;
                }
            }
            Ok(())
        };
        for on in [true, false] {
            flagged(&mut h, on)?;
            h.expect(
                FROM_VM,
                &frame,
                Some(h.red1),
                crate::fixture::TC_ACT_REDIRECT,
                "vm_tx_local",
            )?;
        }
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for (on, samples) in [(true, &mut with), (false, &mut without)] {
                flagged(&mut h, on)?;
                for _ in 0..per_round {
                    let run = h.dp.test_run(FROM_VM, &frame, Some(h.red1), 1)?;
                    #[expect(clippy::cast_precision_loss, reason = "nanoseconds of one run")]
                    samples.push(run.duration.as_nanos() as f64);
                }
            }
        }
        flagged(&mut h, false)?;
        out.push((quantile(&mut with, 0.5), quantile(&mut without, 0.5)));
    }
    Ok(out)
}

/// The configurations end to end: (rules, stateful, [pps, pps without, TCP, TCP without]).
fn end_to_end(scale: Scale) -> anyhow::Result<Vec<(u32, bool, [f64; 4])>> {
    let bed = TwoHosts::build("ab")?;
    bed.configure()?;
    let seconds = scale.pick(4.0, 0.5);
    let tcp_seconds = scale.pick(4, 1);
    let (red1, red2) = (bed.vm("RED-1"), bed.vm("RED-2"));
    let measure = || -> anyhow::Result<(f64, f64)> {
        // The flood sends to RED-2's MAC as RED-1's neighbour table has it: warm it.
        anyhow::ensure!(
            (0..10).any(|_| bed.ping("RED-1", "10.0.0.2", 1).unwrap_or(0) == 1),
            "RED-1 cannot reach RED-2"
        );
        Ok((
            super::load::delivered_pps(red1, red2, "10.0.0.2", seconds, &[0])?,
            tcp(red1, red2, "10.0.0.2", tcp_seconds)?,
        ))
    };
    let mut out = Vec::new();
    for &(n, stateful) in &CONFIGS {
        // The smoke run keeps to the small configurations: a thousand rules are added and
        // deleted one change each.
        if scale.smoke && n > 10 {
            continue;
        }
        let without = measure()?;
        let ids = add_rules(
            &bed,
            n,
            stateful,
            &[
                (0, RED_VSID, "10.0.0.1", Direction::Out),
                (1, RED_VSID, "10.0.0.2", Direction::In),
            ],
        )?;
        let with = measure()?;
        for (h, id) in ids {
            bed.hosts[h].nvctl(&["acl", "del", "--id", &id.to_string()])?;
        }
        out.push((n, stateful, [with.0, without.0, with.1, without.1]));
    }
    Ok(out)
}

/// `n` rules (as [`rules`]) on each VM given as (host, VSID, CA, direction), imported on its
/// host: the ids of every rule on those hosts, as (host, id).
pub(super) fn add_rules(
    bed: &TwoHosts,
    n: u32,
    stateful: bool,
    vms: &[(usize, u32, &str, Direction)],
) -> anyhow::Result<Vec<(usize, u64)>> {
    let mut ids = Vec::new();
    for &(h, vsid, ca, dir) in vms {
        let mut rs = rules(n, dir, stateful);
        for r in &mut rs {
            (r.vsid, r.ca) = (vsid, Some(ca.parse()?));
        }
        let file = bed.tmp_dir().join(format!("bench-acls-{h}.json"));
        std::fs::write(&file, serde_json::to_vec(&rs)?)?;
        bed.hosts[h].nvctl(&["acl", "import", &file.to_string_lossy()])?;
        for r in bed.hosts[h]
            .nvctl_json(&["acl", "list"])?
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(id) = r["id"].as_u64() {
                ids.push((h, id));
            }
        }
    }
    Ok(ids)
}
