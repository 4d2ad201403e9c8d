//! A real Prometheus server (Debian's `prometheus`), started in a test's namespace to scrape the
//! agents, and stopped (by its pid) when dropped; its query API read with curl from the same
//! namespace.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::netns::Netns;

pub struct Prometheus {
    child: Child,
    ns: String,
    listen: String,
    pub log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, listening on `listen` (host:port), scraping `targets`
    /// (host:port) every second and loading the alert rules in `rules`.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        listen: &str,
        targets: &[String],
        rules: &[&Path],
    ) -> anyhow::Result<Prometheus> {
        std::fs::create_dir_all(dir)?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: nv\n    static_configs:\n      - targets: [",
        );
        config.push_str(
            &targets
                .iter()
                .map(|t| format!("'{t}'"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        config.push_str("]\n");
        if !rules.is_empty() {
            config.push_str("rule_files:\n");
            for r in rules {
                let _ = writeln!(config, "  - '{}'", r.display());
            }
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config)?;
        let log = dir.join("prometheus.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "prometheus"])
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context(
                "start prometheus (Debian's prometheus package; `cargo xtask setup` installs it)",
            )?;
        let p = Prometheus {
            child,
            ns: ns.name.clone(),
            listen: listen.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.get("/-/ready").is_err() {
            if Instant::now() > deadline {
                bail!(
                    "prometheus not ready in 30 s: {}",
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(p)
    }

    /// GET `path` on the server (from inside its namespace).
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sfg", "--max-time", "5"])
            .arg(format!("http://{}{path}", self.listen))
            .output()
            .context("run curl")?;
        if !out.status.success() {
            bail!("GET {path}: curl {}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The samples of an instant query: (labels, value).
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<(Value, f64)>> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body: Value =
            serde_json::from_str(&self.get(&format!("/api/v1/query?query={encoded}"))?)?;
        if body["status"] != "success" {
            bail!("query {promql}: {body}");
        }
        body["data"]["result"]
            .as_array()
            .context("result")?
            .iter()
            .map(|r| {
                let v = r["value"][1].as_str().context("value")?.parse::<f64>()?;
                Ok((r["metric"].clone(), v))
            })
            .collect()
    }

    /// The single value of `promql`, waiting (up to 20 s) until `ready` accepts it: scrapes
    /// come every second.
    pub fn wait_for(&self, promql: &str, ready: impl Fn(f64) -> bool) -> anyhow::Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let last = self.query(promql)?;
            if let [(_, v)] = last.as_slice()
                && ready(*v)
            {
                return Ok(*v);
            }
            if Instant::now() > deadline {
                bail!("{promql}: {last:?} after 20 s");
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
