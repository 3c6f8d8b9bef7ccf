//! How listing commands print rows: JSON lines for scripts, an aligned table for a person,
//! or YAML. `--output` picks; by default a table when stdout is a terminal, JSON otherwise.

use std::fmt::Write as _;
use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use serde_json::Value;

/// A listing's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// One JSON object per line (the default when stdout is not a terminal).
    Json,
    /// Aligned columns of the most useful fields (the default on a terminal).
    Table,
    /// A YAML sequence of every field.
    Yaml,
}

/// `--output` of a listing command.
#[derive(Args, Clone, Copy)]
pub struct ListOutput {
    /// Output format [default: table on a terminal, else json].
    #[arg(long, short = 'o', value_enum)]
    pub output: Option<ListFormat>,
}

/// A table column: its header and where its value is in a row (a JSON pointer).
pub type Column = (&'static str, &'static str);

/// Longest cell a table shows; longer values are cut with an ellipsis (json/yaml show all).
const MAX_CELL: usize = 64;

impl ListOutput {
    /// The format to print in.
    pub fn format(self) -> ListFormat {
        self.output.unwrap_or(if std::io::stdout().is_terminal() {
            ListFormat::Table
        } else {
            ListFormat::Json
        })
    }

    /// Prints `rows` (each a JSON object); a table shows `columns`.
    pub fn print(self, rows: &[Value], columns: &[Column]) {
        let text = match self.format() {
            ListFormat::Json => rows.iter().fold(String::new(), |mut s, r| {
                let _ = writeln!(s, "{r}");
                s
            }),
            ListFormat::Table => table(rows, columns),
            ListFormat::Yaml => yaml(rows),
        };
        out!("{}", text.trim_end_matches('\n'));
    }
}

/// Aligned columns with a header line; `-` for an absent value.
pub fn table(rows: &[Value], columns: &[Column]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, at)| cell(r.pointer(at))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let header = columns.iter().map(|(h, _)| h.to_string()).collect();
    let mut s = String::new();
    for line in std::iter::once(&header).chain(&cells) {
        let mut l = String::new();
        for (c, w) in line.iter().zip(&widths) {
            let _ = write!(l, "{c:<w$}  ");
        }
        let _ = writeln!(s, "{}", l.trim_end());
    }
    s
}

fn cell(v: Option<&Value>) -> String {
    let s = match v {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) if s.is_empty() => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".to_owned(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| cell(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    };
    // One line per row, whatever a reason or justification holds.
    let s = s.replace(['\n', '\r', '\t'], " ");
    if s.chars().count() > MAX_CELL {
        s.chars().take(MAX_CELL - 1).chain(['…']).collect()
    } else {
        s
    }
}

/// `rows` as a YAML sequence of mappings (block style; strings quoted whenever a plain
/// scalar could be read as something else).
pub fn yaml(rows: &[Value]) -> String {
    if rows.is_empty() {
        return "[]\n".to_owned();
    }
    let mut s = String::new();
    for r in rows {
        yaml_item(&mut s, r, 0);
    }
    s
}

/// One sequence item at `indent`.
fn yaml_item(s: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            // The first key sits after the dash; the rest align with it.
            for (i, (k, val)) in m.iter().enumerate() {
                let lead = if i == 0 {
                    format!("{pad}- ")
                } else {
                    format!("{pad}  ")
                };
                yaml_entry(s, &lead, k, val, indent + 2);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let _ = writeln!(s, "{pad}-");
            for item in a {
                yaml_item(s, item, indent + 2);
            }
        }
        other => {
            let _ = writeln!(s, "{pad}- {}", scalar(other));
        }
    }
}

/// `key: value` after `lead`; nested values indented to `indent`.
fn yaml_entry(s: &mut String, lead: &str, key: &str, v: &Value, indent: usize) {
    let key = scalar(&Value::String(key.to_owned()));
    match v {
        Value::Object(m) if !m.is_empty() => {
            let _ = writeln!(s, "{lead}{key}:");
            let pad = " ".repeat(indent + 2);
            for (k, val) in m {
                yaml_entry(s, &pad, k, val, indent + 2);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let _ = writeln!(s, "{lead}{key}:");
            for item in a {
                yaml_item(s, item, indent + 2);
            }
        }
        other => {
            let _ = writeln!(s, "{lead}{key}: {}", scalar(other));
        }
    }
}

/// A scalar (or an empty collection) on one line.
fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(_) => "[]".to_owned(),
        Value::Object(_) => "{}".to_owned(),
        Value::String(s) if plain_is_safe(s) => s.clone(),
        // A JSON string is a valid YAML double-quoted scalar.
        Value::String(s) => Value::String(s.clone()).to_string(),
    }
}

/// Whether `s` reads back as the same string when written without quotes: a restricted
/// alphabet (no indicators, no `: ` or ` #`), not a number, boolean or null in YAML 1.1 or 1.2.
fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let keyword = matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~"
    );
    (first.is_ascii_alphabetic() || first == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:@+-=".contains(c))
        && !s.ends_with(':')
        && !keyword
        && s.parse::<f64>().is_err()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_mark_absent_values() {
        let rows = [
            json!({"id": "a", "who": "spiffe://example.org/x", "scopes": ["r", "w"]}),
            json!({"id": "bb", "who": null, "scopes": []}),
        ];
        let t = table(
            &rows,
            &[("ID", "/id"), ("WHO", "/who"), ("SCOPES", "/scopes")],
        );
        assert_eq!(
            t,
            "ID  WHO                     SCOPES\n\
             a   spiffe://example.org/x  r,w\n\
             bb  -                       -\n"
        );
    }

    #[test]
    fn long_or_multi_line_cells_stay_on_one_line() {
        let rows = [json!({"r": format!("line one\nline two {}", "x".repeat(100))})];
        let t = table(&rows, &[("REASON", "/r")]);
        let line = t.lines().nth(1).unwrap();
        assert_eq!(line.chars().count(), MAX_CELL);
        assert!(line.starts_with("line one line two") && line.ends_with('…'));
    }

    #[test]
    fn yaml_quotes_what_a_plain_scalar_would_misread() {
        let rows = [json!({
            "id": "lease-1",
            "spiffe_id": "spiffe://example.org/ci/deploy-agent",
            "state": "no",
            "count": 3,
            "version": "1.0",
            "reason": "a: b # c",
            "empty": "",
            "scopes": ["job:submit"],
            "none": [],
            "intent": {"action": "push", "target": "models/x"},
            "reviews": [{"reviewer": "spiffe://example.org/people/alice", "approve": true}],
        })];
        assert_eq!(
            yaml(&rows),
            "- id: lease-1\n  spiffe_id: spiffe://example.org/ci/deploy-agent\n  state: \"no\"\n  \
             count: 3\n  version: \"1.0\"\n  reason: \"a: b # c\"\n  empty: \"\"\n  scopes:\n    \
             - job:submit\n  none: []\n  intent:\n    action: push\n    target: models/x\n  \
             reviews:\n    - reviewer: spiffe://example.org/people/alice\n      approve: true\n"
        );
        assert_eq!(yaml(&[]), "[]\n");
    }
}
