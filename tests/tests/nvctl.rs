//! nvctl as a client: what it links, and how it takes its cluster-mode flags (no agent, no
//! root needed).
use std::process::Command;

use anyhow::{Context as _, ensure};
use nv_tests::sys::bin;

/// The crates' symbols in a binary (`nm --demangle`), counted by crate path.
fn symbols_of(binary: &str, crates: &[&str]) -> anyhow::Result<Vec<usize>> {
    let out = Command::new("nm")
        .args(["--demangle"])
        .arg(bin(binary)?)
        .output()
        .context("run nm (binutils; `cargo xtask setup` installs it)")?;
    ensure!(
        out.status.success(),
        "nm {binary}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(crates
        .iter()
        .map(|c| {
            text.lines()
                .filter(|l| l.contains(&format!(" {c}::")) || l.contains(&format!("<{c}::")))
                .count()
        })
        .collect())
}

#[test]
fn nvctl_links_neither_aya_nor_redb() -> anyhow::Result<()> {
    // The agent links both: the count sees them where they are.
    let agent = symbols_of("nv-agent", &["aya", "redb"])?;
    ensure!(
        agent.iter().all(|n| *n > 100),
        "nv-agent's aya and redb symbols: {agent:?}"
    );
    let nvctl = symbols_of("nvctl", &["aya", "redb"])?;
    ensure!(nvctl == [0, 0], "nvctl's aya and redb symbols: {nvctl:?}");
    Ok(())
}

/// nvctl's exit status and standard error.
fn nvctl(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(bin("nvctl")?)
        .args(["--socket", "/nonexistent/nv.sock"])
        .args(args)
        .env_remove("NV_ETCD_ENDPOINTS")
        .env_remove("NV_ETCD_CA_FILE")
        .env_remove("NV_ETCD_CERT_FILE")
        .env_remove("NV_ETCD_KEY_FILE")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn nvctl_says_what_is_wrong_with_its_etcd_flags() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("nv-nvctl-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let not_pem = dir.join("ca.pem");
    std::fs::write(&not_pem, "not a certificate")?;
    let not_pem = not_pem.to_str().context("path")?;
    let cases: &[(&[&str], &str)] = &[
        (
            &["--etcd-ca-file", not_pem, "lookup", "list"],
            "give --etcd-endpoints too",
        ),
        (
            &[
                "--etcd-endpoints",
                "https://198.18.255.254:2379",
                "lookup",
                "list",
            ],
            "--etcd-ca-file is needed with https:// endpoints",
        ),
        (
            &[
                "--etcd-endpoints",
                "http://198.18.255.254:2379",
                "--etcd-ca-file",
                not_pem,
                "lookup",
                "list",
            ],
            "--etcd-ca-file is for https:// endpoints",
        ),
        (
            &[
                "--etcd-endpoints",
                "https://198.18.255.254:2379",
                "--etcd-ca-file",
                not_pem,
                "lookup",
                "list",
            ],
            "holds no PEM CERTIFICATE",
        ),
        (
            &["--etcd-endpoints", "198.18.255.254:2379", "lookup", "list"],
            "is not a URL like https://",
        ),
    ];
    for (args, says) in cases {
        let (code, err) = nvctl(args)?;
        ensure!(
            code == 1 && err.contains(says) && err.lines().count() == 1,
            "nvctl {args:?}: exit {code}, said {err:?}; expected one line with {says:?}"
        );
    }
    // Positive control: the same command without the flags gets as far as the agent.
    let (code, err) = nvctl(&["lookup", "list"])?;
    ensure!(
        code == 1 && err.contains("cannot reach nv-agent at /nonexistent/nv.sock"),
        "{code} {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
