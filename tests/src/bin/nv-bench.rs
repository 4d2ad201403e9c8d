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
    let configs = arg("--configs");
    let options = e2e::Options {
        configs: configs.as_deref().map(|c| c.split(',').collect()),
        profile: std::env::args()
            .any(|a| a == "--profile")
            .then(|| out.join("perf")),
    };
    if let Some(wanted) = &options.configs {
        e2e::check_configs(wanted)?;
    }
    let (r, failed) = measure(scale, &options, &wanted);
    print!("{}", report::table(&r));
    report::write(&r, &out)?;
    println!(
        "\nwrote {} and {}",
        out.join("results.json").display(),
        out.join("e2e.svg").display()
    );
    anyhow::ensure!(
        failed.is_empty(),
        "{} part(s) failed, their figures are missing above:\n{}",
        failed.len(),
        failed.join("\n")
    );
    Ok(())
}

/// Every wanted part (control and cluster at least as a smoke check, quick at that scale):
/// the report, and what failed. A part that fails (an etcd that stops answering under a
/// million records) does not stop the others, whose figures are still printed and written.
fn measure(
    scale: Scale,
    options: &e2e::Options,
    wanted: &dyn Fn(&str) -> bool,
) -> (report::Report, Vec<String>) {
    let mut failed = Vec::new();
    let (programs, overheads) = part(&mut failed, wanted("programs"), "program cost", || {
        programs::run(scale)
    });
    let e2e = part(&mut failed, wanted("e2e"), "end to end", || {
        e2e::run_all(scale, options)
    });
    let pressure = part(
        &mut failed,
        wanted("pressure"),
        "a million records, traffic to 100k of them",
        || pressure::run(scale),
    );
    let routing = part(
        &mut failed,
        wanted("routing"),
        "the distributed router",
        || routing::run(scale),
    );
    let acls = part(&mut failed, wanted("acls"), "port ACLs", || {
        acls::run(scale)
    });
    let at = |name: &str| {
        if wanted(name) {
            scale
        } else {
            Scale { smoke: true }
        }
    };
    let control = part(&mut failed, true, "control plane", || {
        control::run(at("control"))
    });
    let cluster = part(&mut failed, true, "cluster mode", || {
        cluster::run(at("cluster"))
    });
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
    (r, failed)
}

/// A part's figures when `wanted`; none when not, or when it failed (its failure added to
/// `failed`).
fn part<T: Default>(
    failed: &mut Vec<String>,
    wanted: bool,
    name: &str,
    run: impl FnOnce() -> anyhow::Result<T>,
) -> T {
    if !wanted {
        return T::default();
    }
    eprintln!("bench: {name} ...");
    run().unwrap_or_else(|e| {
        eprintln!("bench: {name} failed: {e:#}");
        failed.push(format!("{name}: {e:#}"));
        T::default()
    })
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
