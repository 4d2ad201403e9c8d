//! `cargo xtask bench [--smoke]`: see `nv_tests::bench`. Prints a table and writes
//! target/bench/results.json and target/bench/e2e.svg.
use std::path::PathBuf;

use nv_tests::bench::{Scale, control, e2e, programs, report};

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
    eprintln!("bench: program cost ...");
    let programs = programs::run(scale)?;
    eprintln!("bench: end to end ...");
    let e2e = e2e::run_all(scale)?;
    eprintln!("bench: control plane ...");
    let control = control::run(scale)?;
    let goals = report::goals(&programs, &e2e);
    let r = report::Report {
        smoke: scale.smoke,
        programs,
        e2e,
        control,
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
