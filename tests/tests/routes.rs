//! Customer routes through nvctl: routing domains, subnets and next hops, with the rules
//! between them and the lookup records, stored, exported and imported all or none.

use anyhow::{Context as _, ensure};
use nv_tests::testbed::{BLUE_VSID, RED_VSID, TwoHosts};
use serde_json::Value;

/// `nvctl route add` with these flags.
fn add(rdid: &str, vsid: u32, prefix: &str, nexthop: &str, more: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "route",
        "add",
        "--rdid",
        rdid,
        "--vsid",
        &vsid.to_string(),
        "--prefix",
        prefix,
        "--nexthop",
        nexthop,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    args.extend(more.iter().map(ToString::to_string));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn listed(bed: &TwoHosts, rdid: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let mut args = vec!["route", "list"];
    if let Some(d) = rdid {
        args.extend(["--rdid", d]);
    }
    Ok(bed.hosts[0]
        .nvctl_json(&args)?
        .as_array()
        .context("route list is a JSON list")?
        .clone())
}

#[test]
fn routes_are_checked_stored_exported_and_imported_whole() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("rt")?;
    bed.configure()?;
    two_domains_with_the_same_prefixes(&bed)?;
    each_rule_refuses_in_one_line(&bed)?;
    exported_deleted_imported_and_restarted(&mut bed)?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "RED-1 -> RED-2 with routes configured"
    );
    Ok(())
}

/// contoso (RED and a second subnet) and fabrikam (BLUE) hold 10.0.0.0/24 each.
fn two_domains_with_the_same_prefixes(bed: &TwoHosts) -> anyhow::Result<()> {
    let h = &bed.hosts[0];
    let red = RED_VSID;
    let blue = BLUE_VSID;

    // RED-1 is 10.0.0.1: the first address cannot be the gateway of RED's subnet.
    h.expect_refused(
        &strs(&add("Contoso", red, "10.0.0.0/24", "0.0.0.0", &[])),
        "--gateway",
    )?;
    h.nvctl(&strs(&add(
        "Contoso",
        red,
        "10.0.0.0/24",
        "0.0.0.0",
        &["--gateway", "10.0.0.254"],
    )))?;
    h.nvctl(&strs(&add("contoso", 7002, "10.1.0.0/24", "0.0.0.0", &[])))?;
    // BLUE has the same prefix, in a domain of its own.
    h.nvctl(&strs(&add(
        "fabrikam",
        blue,
        "10.0.0.0/24",
        "0.0.0.0",
        &["--gateway", "10.0.0.254"],
    )))?;
    h.nvctl(&strs(&add("contoso", red, "0.0.0.0/0", "10.0.0.2", &[])))?;
    let all = listed(bed, None)?;
    ensure!(all.len() == 4, "listed {all:?}");
    let contoso = listed(bed, Some("CONTOSO"))?;
    ensure!(
        contoso.len() == 3 && contoso.iter().all(|r| r["rdid"] == "contoso"),
        "contoso's routes: {contoso:?}"
    );
    let table = h.nvctl(&["route", "list"])?;
    ensure!(
        table.contains("10.1.0.1") && table.contains("fabrikam"),
        "the table shows each subnet's gateway: {table}"
    );
    Ok(())
}

/// The rules between routes, and between routes and records: each refused in one line, the
/// store untouched.
fn each_rule_refuses_in_one_line(bed: &TwoHosts) -> anyhow::Result<()> {
    let h = &bed.hosts[0];
    let red = RED_VSID;
    for (args, says) in [
        (
            add("fabrikam", red, "10.9.0.0/24", "0.0.0.0", &[]),
            "belongs to routing domain contoso",
        ),
        (
            add("contoso", 7003, "10.1.0.128/25", "0.0.0.0", &[]),
            "overlaps 10.1.0.0/24",
        ),
        (
            add("contoso", red, "10.8.0.0/16", "10.7.0.9", &[]),
            "in no subnet of VSID 5001",
        ),
        (
            add("contoso", red, "0.0.0.0/0", "10.0.0.3", &[]),
            "with metric 0",
        ),
        (
            add("contoso", red, "10.0.0.1/24", "0.0.0.0", &[]),
            "did you mean 10.0.0.0/24",
        ),
        (
            add("a b", red, "10.0.0.0/24", "0.0.0.0", &[]),
            "invalid routing domain",
        ),
    ] {
        h.expect_refused(&strs(&args), says)?;
    }
    // A VM at a gateway's address is refused, naming --gateway.
    h.expect_refused(
        &[
            "lookup",
            "add",
            "--vsid",
            &red.to_string(),
            "--ca",
            "10.0.0.254",
            "--pa",
            "198.18.0.2",
            "--mac",
            "02:00:00:00:00:fe",
        ],
        "--gateway",
    )?;

    // The subnet that holds a next hop stays until the route through it goes.
    h.expect_refused(
        &[
            "route",
            "del",
            "--rdid",
            "contoso",
            "--prefix",
            "10.0.0.0/24",
        ],
        "holds the next hop",
    )
}

/// Export, delete, a refused import (all or none), the import, a restart: the same routes.
fn exported_deleted_imported_and_restarted(bed: &mut TwoHosts) -> anyhow::Result<()> {
    let h = &bed.hosts[0];
    let exported = h.nvctl(&["route", "export"])?;
    let file = bed.tmp_dir().join("routes.json");
    std::fs::write(&file, &exported)?;
    for (prefix, nexthop) in [
        ("0.0.0.0/0", Some("10.0.0.2")),
        ("10.0.0.0/24", None),
        ("10.1.0.0/24", None),
    ] {
        let mut args = vec!["route", "del", "--rdid", "contoso", "--prefix", prefix];
        if let Some(n) = nexthop {
            args.extend(["--nexthop", n]);
        }
        h.nvctl(&args)?;
    }
    ensure!(listed(bed, None)?.len() == 1, "fabrikam's route alone");
    h.nvctl(&[
        "route",
        "del",
        "--rdid",
        "fabrikam",
        "--prefix",
        "10.0.0.0/24",
    ])?;
    let mut bad: Vec<Value> = serde_json::from_str(&exported)?;
    bad.push(serde_json::json!({
        "rdid": "contoso", "vsid": 7009, "prefix": "10.1.0.0/25", "nexthop": "0.0.0.0"
    }));
    let bad_file = bed.tmp_dir().join("bad-routes.json");
    std::fs::write(&bad_file, serde_json::to_vec(&bad)?)?;
    h.expect_refused(
        &["route", "import", &bad_file.to_string_lossy()],
        "route 5 ",
    )?;
    ensure!(
        listed(bed, None)?.is_empty(),
        "a refused import added routes"
    );
    let imported = h.nvctl_json(&["route", "import", &file.to_string_lossy()])?;
    ensure!(imported["imported"] == 4, "import answered {imported}");
    ensure!(
        h.nvctl(&["route", "export"])? == exported,
        "export after import differs"
    );
    bed.hosts[0].stop_agent();
    bed.hosts[0].start_agent()?;
    ensure!(
        bed.hosts[0].nvctl(&["route", "export"])? == exported,
        "routes lost or changed across a restart"
    );
    Ok(())
}
