//! Import files for `nvctl lookup import`: a JSON list of lookup records, or CSV with a header
//! line; both use the flag names as field names. Every record is read before anything is sent,
//! so a bad line changes nothing.
use std::{io::Read as _, path::Path};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::model::{LookupRecord, Mac, Method};

/// One CSV row: every column but the required four may be missing or empty.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    vsid: u32,
    ca: std::net::IpAddr,
    pa: std::net::IpAddr,
    mac: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    port: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// Reads `file` (`-` for standard input).
pub fn read(file: &Path) -> anyhow::Result<Vec<LookupRecord>> {
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("read standard input")?;
    } else {
        text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
    }
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()));
    }
    let mut out = Vec::new();
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    for (i, row) in reader.deserialize::<Row>().enumerate() {
        // Line numbers count the header.
        let line = i + 2;
        let row = row.map_err(|e| anyhow::anyhow!("{} line {line}: {e}", file.display()))?;
        let mac: Mac = row
            .mac
            .parse()
            .map_err(|e| anyhow::anyhow!("{} line {line}: {e}", file.display()))?;
        let method = match non_empty(row.method).as_deref() {
            None | Some("encap") => Method::Encap,
            Some("rewrite") => Method::Rewrite,
            Some(other) => bail!(
                "{} line {line}: method '{other}' is neither encap nor rewrite",
                file.display()
            ),
        };
        out.push(LookupRecord {
            vsid: row.vsid,
            ca: row.ca,
            pa: row.pa,
            mac,
            method,
            port: non_empty(row.port),
            name: non_empty(row.name),
        });
    }
    if out.is_empty() {
        bail!("{} holds no records", file.display());
    }
    Ok(out)
}

/// Writes `records` as `read` takes them: a JSON list, one record a line.
pub fn write_json(records: &[LookupRecord], out: &mut impl std::io::Write) -> anyhow::Result<()> {
    writeln!(out, "[")?;
    for (i, r) in records.iter().enumerate() {
        let sep = if i + 1 < records.len() { "," } else { "" };
        writeln!(out, "  {}{sep}", serde_json::to_string(r)?)?;
    }
    writeln!(out, "]")?;
    Ok(())
}

/// Writes `records` as CSV with the header line `read` takes; absent fields are empty.
pub fn write_csv(records: &[LookupRecord], out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(["vsid", "ca", "pa", "mac", "method", "port", "name"])?;
    for r in records {
        let method = match r.method {
            Method::Encap => "encap",
            Method::Rewrite => "rewrite",
        };
        w.write_record([
            r.vsid.to_string(),
            r.ca.to_string(),
            r.pa.to_string(),
            r.mac.to_string(),
            method.to_owned(),
            r.port.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_json_read_the_same_records() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("r.csv");
        std::fs::write(&csv, "vsid,ca,pa,mac,method,port,name\n5001,10.0.0.1,198.18.0.1,02:00:00:00:01:01,,red1,RED-1\n5001, 10.0.0.2 ,198.18.0.2,02:00:00:00:02:01,encap,,\n").unwrap();
        let from_csv = read(&csv).unwrap();
        let json = dir.path().join("r.json");
        std::fs::write(&json, serde_json::to_string(&from_csv).unwrap()).unwrap();
        assert_eq!(read(&json).unwrap(), from_csv);
        assert_eq!(from_csv.len(), 2);
        assert_eq!(from_csv[0].port.as_deref(), Some("red1"));
        assert_eq!(from_csv[1].name, None);
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("r.csv");
        std::fs::write(&csv, "vsid,ca,pa,mac\n5001,10.0.0.1,198.18.0.1,02:00:00:00:01:01\n5001,10.0.0.x,198.18.0.2,02:00:00:00:02:01\n").unwrap();
        let err = read(&csv).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        std::fs::write(
            &csv,
            "vsid,ca,pa,mac,method\n5001,10.0.0.1,198.18.0.1,02:00:00:00:01:01,nat\n",
        )
        .unwrap();
        let err = read(&csv).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("nat"), "{err}");
    }
}
