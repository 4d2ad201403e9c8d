//! Another revision's control plane beside this tree's (`cargo xtask bench --baseline REV`):
//! the control-plane measurement with each one's agent and nvctl, in turns (baseline, tree,
//! baseline, ...), so both see the machine's noise alike; each figure is the median of its
//! rounds, compared as tree over baseline.
use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use super::{Scale, control, quantile};

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: &'static str,
    pub unit: &'static str,
    pub baseline: f64,
    pub tree: f64,
    /// Tree over baseline: below 1 is better for every figure here.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub baseline: String,
    pub rounds: u32,
    pub figures: Vec<Figure>,
}

/// The figures compared: a name, a unit, and how to read it from a measurement.
type Read = fn(&control::Result) -> f64;
const FIGURES: &[(&str, &str, Read)] = &[
    ("import of the big table", "s", |r| r.import_seconds),
    ("agent memory per record", "B", |r| r.agent_bytes_per_record),
    ("nvctl lookup add to datapath p50", "ms", |r| {
        r.add_to_datapath_p50_ms
    }),
    ("nvctl lookup add to datapath p99", "ms", |r| {
        r.add_to_datapath_p99_ms
    }),
    ("the same on the big table p50", "ms", |r| {
        r.add_on_big_table_p50_ms
    }),
    ("the same on the big table p99", "ms", |r| {
        r.add_on_big_table_p99_ms
    }),
];

pub fn run(
    scale: Scale,
    baseline_bin: &Path,
    baseline: &str,
    rounds: u32,
) -> anyhow::Result<Comparison> {
    let tree_bin = crate::sys::bin_dir();
    let mut runs: [Vec<control::Result>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (i, (label, dir)) in [("baseline", baseline_bin), ("tree", tree_bin.as_path())]
            .into_iter()
            .enumerate()
        {
            eprintln!(
                "bench: control plane, round {round} of {rounds}, {label} ({}) ...",
                dir.display()
            );
            crate::sys::use_bin_dir(Some(dir.to_owned()));
            let measured = control::run(scale);
            crate::sys::use_bin_dir(None);
            runs[i].push(measured?);
        }
    }
    let median = |runs: &[control::Result], read: Read| {
        let mut v: Vec<f64> = runs.iter().map(read).collect();
        quantile(&mut v, 0.5)
    };
    let figures = FIGURES
        .iter()
        .map(|(name, unit, read)| {
            let (b, t) = (median(&runs[0], *read), median(&runs[1], *read));
            Figure {
                name,
                unit,
                baseline: b,
                tree: t,
                ratio: if b > 0.0 { t / b } else { f64::NAN },
            }
        })
        .collect();
    Ok(Comparison {
        baseline: baseline.to_owned(),
        rounds,
        figures,
    })
}

pub fn table(c: &Comparison) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ncontrol plane, this tree against {} (median of {} rounds each, in turns):",
        c.baseline, c.rounds
    );
    let _ = writeln!(
        s,
        "{:<36} {:>12} {:>12} {:>8}",
        "", "baseline", "tree", "ratio"
    );
    for f in &c.figures {
        let _ = writeln!(
            s,
            "{:<36} {:>10.2} {:<2}{:>10.2} {:<2}{:>7.3}",
            f.name, f.baseline, f.unit, f.tree, f.unit, f.ratio
        );
    }
    s
}

/// The eBPF object the baseline's agent was built with, found beside its release binaries in
/// `bin` (aya-build's output in the agent's build directory; the newest if several).
pub fn object(bin: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let build = bin.join("build");
    let mut found: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(&build)
        .with_context(|| format!("read {}", build.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("nv-agent-"))
        .map(|e| {
            e.path()
                .join("out/aya-build/target/nv-ebpf/bpfel-unknown-none/release/nv")
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    let (_, newest) = found
        .pop()
        .with_context(|| format!("no eBPF object under {}", build.display()))?;
    std::fs::read(&newest).with_context(|| format!("read {}", newest.display()))
}
