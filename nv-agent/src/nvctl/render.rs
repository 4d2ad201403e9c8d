//! Answers as nvctl prints them: JSON as the API gives it, or a table whose columns each
//! table's module names ([`crate::tables::Table::COLUMNS`]).
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
use serde_json::Value;

use super::args::Output;

/// The columns of a table: (header, field of the row's JSON form).
pub type Columns = &'static [(&'static str, &'static str)];

/// Prints rows: as a JSON list, or a table of `columns`.
pub fn rows<T: Serialize>(output: Output, rows: &[T], columns: Columns) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Table => {
            let values = rows
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<Vec<_>, _>>()?;
            println!("{}", table(&values, columns));
        }
    }
    Ok(())
}

/// Prints one answer: as a JSON object, or a table of one row.
pub fn one<T: Serialize>(output: Output, row: &T, columns: Columns) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(row)?),
        Output::Table => println!("{}", table(&[serde_json::to_value(row)?], columns)),
    }
    Ok(())
}

/// A new table in nvctl's style, with `header`.
pub fn new_table<S: ToString>(header: impl IntoIterator<Item = S>) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.into_iter().map(|h| h.to_string()));
    t
}

fn table(rows: &[Value], columns: Columns) -> Table {
    let mut t = new_table(columns.iter().map(|(h, _)| *h));
    for row in rows {
        t.add_row(columns.iter().map(|(_, field)| match row.get(field) {
            None | Some(Value::Null) => "-".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        }));
    }
    t
}
