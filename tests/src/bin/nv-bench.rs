//! `cargo xtask bench [--smoke]`: see `nv_tests::bench`. Prints a table and writes
//! target/bench/results.json and target/bench/e2e.svg.
use std::path::PathBuf;

use nv_tests::bench::{
    Scale, acls, baseline, cluster, control, e2e, pressure, programs, report, routing,
};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let scale = Scale {
        smoke: std::env::args().any(|a| a == "--smoke"),
    };
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
            PathBuf::from,
        );
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    if let Some(bin) = arg("--baseline-bin") {
        return against_baseline(scale, &out, &bin, arg("--baseline-rev"), arg("--rounds"));
    }
    // `--only control` (or programs, e2e) measures one part, for working on it.
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    let wanted = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if let Some(part) = &only
        && ![
            "programs", "e2e", "pressure", "routing", "acls", "control", "cluster",
        ]
        .contains(&part.as_str())
    {
        anyhow::bail!(
            "--only takes programs, e2e, pressure, routing, acls, control or cluster, not '{part}'"
        );
    }
    let (programs, overheads) = if wanted("programs") {
        eprintln!("bench: program cost ...");
        programs::run(scale)?
    } else {
        (Vec::new(), Vec::new())
    };
    let e2e = if wanted("e2e") {
        eprintln!("bench: end to end ...");
        let configs = arg("--configs");
        e2e::run_all(
            scale,
            &e2e::Options {
                configs: configs.as_deref().map(|c| c.split(',').collect()),
                profile: std::env::args()
                    .any(|a| a == "--profile")
                    .then(|| out.join("perf")),
            },
        )?
    } else {
        Vec::new()
    };
    let pressure = if wanted("pressure") {
        eprintln!("bench: a million records, traffic to 100k of them ...");
        pressure::run(scale)?
    } else {
        Vec::new()
    };
    let routing = if wanted("routing") {
        eprintln!("bench: the distributed router ...");
        routing::run(scale)?
    } else {
        Vec::new()
    };
    let acls = if wanted("acls") {
        eprintln!("bench: port ACLs ...");
        acls::run(scale)?
    } else {
        Vec::new()
    };
    eprintln!("bench: control plane ...");
    let control = control::run(if wanted("control") {
        scale
    } else {
        Scale { smoke: true }
    })?;
    eprintln!("bench: cluster mode ...");
    let cluster = cluster::run(if wanted("cluster") {
        scale
    } else {
        Scale { smoke: true }
    })?;
    let goals = report::goals(&e2e, &control, &cluster);
    let r = report::Report {
        smoke: scale.smoke,
        programs,
        overheads,
        e2e,
        pressure,
        routing,
        acls,
        control,
        cluster,
        goals,
    };
    print!("{}", report::table(&r));
    report::write(&r, &out)?;
    println!(
        "\nwrote {} and {}",
        out.join("results.json").display(),
        out.join("e2e.svg").display()
    );
    Ok(())
}

/// Another revision's programs and control plane beside this tree's, and nothing else.
fn against_baseline(
    scale: Scale,
    out: &std::path::Path,
    bin: &str,
    rev: Option<String>,
    rounds: Option<String>,
) -> anyhow::Result<()> {
    let rev = rev.unwrap_or_else(|| bin.to_owned());
    let rounds = rounds.map_or(Ok(3), |r| r.parse())?;
    std::fs::create_dir_all(out)?;
    // Its datapath programs beside this tree's, on the IPv4 paths.
    let object = baseline::object(std::path::Path::new(bin))?;
    let rows = programs::against(scale, object, rev.clone())?;
    print!("{}", report::against_table(&rows));
    let file = out.join("baseline-programs.json");
    std::fs::write(&file, serde_json::to_string_pretty(&rows)?)?;
    println!("\nwrote {}", file.display());
    let c = baseline::run(scale, std::path::Path::new(bin), &rev, rounds)?;
    print!("{}", baseline::table(&c));
    let file = out.join("baseline.json");
    std::fs::write(&file, serde_json::to_string_pretty(&c)?)?;
    println!("\nwrote {}", file.display());
    Ok(())
}
