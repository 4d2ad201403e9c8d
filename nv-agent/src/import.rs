//! Import files for `nvctl lookup import`: a JSON list of lookup records, or CSV with a header
//! line; both use the flag names as field names. nvctl sends the file as it is and the agent
//! parses it ([`parse`]): every record is read before anything is changed, so a bad line
//! changes nothing, and a million records are parsed once, not parsed, encoded and parsed again.
use std::{io::Read as _, path::Path};

use anyhow::Context as _;

use crate::model::{LookupRecord, Mac, Method};

/// What an import body holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A JSON list of records (`application/json`).
    Json,
    /// CSV with a header line of the field names (`text/csv`).
    Csv,
}

impl Format {
    /// JSON starts with `[` (or `{`, to be told it is not a list); anything else is CSV.
    pub fn sniff(text: &[u8]) -> Format {
        if text.trim_ascii_start().starts_with(b"[") || text.trim_ascii_start().starts_with(b"{") {
            Format::Json
        } else {
            Format::Csv
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv",
        }
    }
}

/// The CSV columns, by name: the lookups table's fields, as nvctl's listing names them.
const COLUMNS: [&str; 8] = {
    use crate::tables::{Table as _, lookups::Lookups};
    let mut names = [""; 8];
    let mut i = 0;
    while i < names.len() {
        names[i] = Lookups::COLUMNS[i].1;
        i += 1;
    }
    names
};
const REQUIRED: usize = 4;

/// Parses an import body; errors name the CSV line (the header is line 1) or the JSON
/// position. Records are not validated here (the agent does, against its table).
pub fn parse(text: &[u8], format: Format) -> Result<Vec<LookupRecord>, String> {
    let records = match format {
        Format::Json if text.trim_ascii_start().starts_with(b"{") => {
            return Err("holds one JSON object, not a list of records: put them in [ ]".into());
        }
        Format::Json => serde_json::from_slice(text).map_err(|e| e.to_string())?,
        Format::Csv => parse_csv(text)?,
    };
    if records.is_empty() {
        return Err("holds no records".into());
    }
    Ok(records)
}

fn parse_csv(text: &[u8]) -> Result<Vec<LookupRecord>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text);
    let header = reader.byte_headers().map_err(|e| format!("line 1: {e}"))?;
    // Where each known column is; unknown ones are refused, the four first required.
    let mut at = [None; COLUMNS.len()];
    for (i, name) in header.iter().enumerate() {
        let name = String::from_utf8_lossy(name);
        let Some(c) = COLUMNS.iter().position(|k| *k == name) else {
            return Err(format!(
                "line 1: unknown column '{name}' (columns: {})",
                COLUMNS.join(",")
            ));
        };
        at[c] = Some(i);
    }
    if header.is_empty() {
        return Ok(Vec::new());
    }
    for (c, name) in COLUMNS.iter().enumerate().take(REQUIRED) {
        if at[c].is_none() {
            return Err(format!("line 1: missing column '{name}'"));
        }
    }
    let mut out = Vec::with_capacity(text.len() / 48);
    let mut row = csv::ByteRecord::new();
    let mut line = 1;
    loop {
        match reader.read_byte_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(format!("line {}: {e}", line + 1)),
        }
        line += 1;
        out.push(record(&row, &at).map_err(|e| format!("line {line}: {e}"))?);
    }
    Ok(out)
}

/// One CSV row as a record; `at` says where each column is.
fn record(
    row: &csv::ByteRecord,
    at: &[Option<usize>; COLUMNS.len()],
) -> Result<LookupRecord, String> {
    let field = |c: usize| -> Result<Option<&str>, String> {
        match at[c].and_then(|i| row.get(i)) {
            None | Some(b"") => Ok(None),
            Some(b) => std::str::from_utf8(b)
                .map(Some)
                .map_err(|_| format!("{} is not UTF-8", COLUMNS[c])),
        }
    };
    let required = |c: usize| field(c)?.ok_or_else(|| format!("{} is missing", COLUMNS[c]));
    let vsid = required(0)?;
    let (ca, pa, mac) = (required(1)?, required(2)?, required(3)?);
    Ok(LookupRecord {
        vsid: vsid
            .parse()
            .map_err(|_| format!("vsid '{vsid}' is not a number"))?,
        ca: ca
            .parse()
            .map_err(|_| format!("ca '{ca}' is not an IP address"))?,
        pa: pa
            .parse()
            .map_err(|_| format!("pa '{pa}' is not an IP address"))?,
        mac: mac.parse::<Mac>().map_err(|e| e.to_string())?,
        method: match field(4)? {
            None | Some("encap") => Method::Encap,
            Some("rewrite") => Method::Rewrite,
            Some(other) => {
                return Err(format!("method '{other}' is neither encap nor rewrite"));
            }
        },
        port: field(5)?.map(str::to_owned),
        name: field(6)?.map(str::to_owned),
        host: field(7)?.map(str::to_owned),
    })
}

/// Reads `file` (`-` for standard input) as it is, and what it holds.
pub fn load(file: &Path) -> anyhow::Result<(Vec<u8>, Format)> {
    let mut text = Vec::new();
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut text)
            .context("read standard input")?;
    } else {
        text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    }
    let format = Format::sniff(&text);
    Ok((text, format))
}

/// Reads and parses `file` (`-` for standard input); errors name it.
pub fn read(file: &Path) -> anyhow::Result<Vec<LookupRecord>> {
    let (text, format) = load(file)?;
    parse(&text, format).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

/// Writes `records` as `read` takes them: a JSON list, one record a line.
pub fn write_json<T: serde::Serialize>(
    records: &[T],
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    writeln!(out, "[")?;
    for (i, r) in records.iter().enumerate() {
        let sep = if i + 1 < records.len() { "," } else { "" };
        writeln!(out, "  {}{sep}", serde_json::to_string(r)?)?;
    }
    writeln!(out, "]")?;
    Ok(())
}

/// Writes `records` as CSV with the header line `read` takes; absent fields are empty. The
/// `host` column comes only with records that name one (cluster mode).
pub fn write_csv(records: &[LookupRecord], out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    let hosts = records.iter().any(|r| r.host.is_some());
    let columns = if hosts { &COLUMNS[..] } else { &COLUMNS[..7] };
    w.write_record(columns)?;
    for r in records {
        let method = match r.method {
            Method::Encap => "encap",
            Method::Rewrite => "rewrite",
        };
        let row = [
            r.vsid.to_string(),
            r.ca.to_string(),
            r.pa.to_string(),
            r.mac.to_string(),
            method.to_owned(),
            r.port.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
            r.host.clone().unwrap_or_default(),
        ];
        w.write_record(&row[..columns.len()])?;
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
