//! `--output table`: responses as boxed tables for people, in the shape of the aws CLI's
//! (awscli `formatter.py` and `table.py`). The response is titled with the operation's name;
//! a structure's scalar members make a row under a header of their names (sorted), and its
//! lists and structures follow as sections of their own, indented by one border each; a
//! list of structures is one section whose rows share the union of their scalar members as
//! columns. Every section is stretched to the width of the widest.
//!
//! One difference, for terminals: a structure whose row would be wider than [`MAX_ROW`]
//! columns (DescribeKey's `KeyMetadata` has some twenty members) is shown as `name | value`
//! rows instead, as the aws CLI shows a structure of a single member; and so is each
//! element of a list whose rows would be that wide (ListGrants, ListAliases).

use serde_json::{Map, Value};

use crate::output::{is_scalar, scalar_text as cell};

/// The widest a structure's single row may be before it is turned into name/value rows.
const MAX_ROW: usize = 120;

/// A titled part of the table, at a depth of nesting.
struct Section {
    indent: usize,
    title: Option<String>,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// The table for `response` to `operation`, with a final newline; empty for an empty response.
pub fn render(operation: &str, response: &Value) -> String {
    let mut sections = Vec::new();
    build(&mut sections, Some(operation), response, 0);
    layout(&sections)
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Object(members) => members.is_empty(),
        Value::Array(items) => items.is_empty(),
        Value::Null => true,
        _ => false,
    }
}

fn build(sections: &mut Vec<Section>, title: Option<&str>, value: &Value, indent: usize) {
    if is_empty(value) {
        return;
    }
    sections.push(Section { indent, title: title.map(str::to_string), header: Vec::new(), rows: Vec::new() });
    match value {
        Value::Array(items) if items.first().is_some_and(Value::is_object) => {
            list_of_structures(sections, title, items, indent)
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Array(inner) if inner.iter().all(is_scalar) => {
                        let row = inner.iter().map(cell).collect();
                        push_row(sections, row);
                    }
                    scalar if is_scalar(scalar) => push_row(sections, vec![cell(scalar)]),
                    nested => build(sections, None, nested, indent),
                }
            }
        }
        Value::Object(members) => structure(sections, members, indent, false),
        scalar => push_row(sections, vec![cell(scalar)]),
    }
}

fn push_row(sections: &mut [Section], row: Vec<String>) {
    if let Some(section) = sections.last_mut() {
        section.rows.push(row);
    }
}

/// A structure's member names: its scalars' and the rest, each sorted.
fn split(members: &Map<String, Value>) -> (Vec<&String>, Vec<&String>) {
    let (mut scalars, mut nested): (Vec<&String>, Vec<&String>) =
        members.keys().partition(|name| is_scalar(&members[name.as_str()]));
    scalars.sort();
    nested.sort();
    (scalars, nested)
}

/// A structure's section: its scalars as one row under a header of their names, or as
/// name/value rows if there is only one, if that row would be too wide, or if `vertical`.
fn structure(sections: &mut Vec<Section>, members: &Map<String, Value>, indent: usize, vertical: bool) {
    let (scalars, nested) = split(members);
    let values: Vec<String> = scalars.iter().map(|name| cell(&members[name.as_str()])).collect();
    let wide = vertical
        || scalars.iter().zip(&values).map(|(name, value)| name.len().max(value.chars().count()) + 5).sum::<usize>()
            > MAX_ROW;
    if scalars.len() == 1 || (wide && !scalars.is_empty()) {
        for (name, value) in scalars.iter().zip(values) {
            push_row(sections, vec![name.to_string(), value]);
        }
    } else if !scalars.is_empty() {
        if let Some(section) = sections.last_mut() {
            section.header = scalars.iter().map(|name| name.to_string()).collect();
            section.rows.push(values);
        }
    }
    for name in nested {
        build(sections, Some(name), &members[name.as_str()], indent + 1);
    }
}

fn list_of_structures(sections: &mut Vec<Section>, title: Option<&str>, items: &[Value], indent: usize) {
    let mut header: Vec<&String> = Vec::new();
    let mut nested: Vec<&String> = Vec::new();
    for members in items.iter().filter_map(Value::as_object) {
        let (s, n) = split(members);
        header.extend(s);
        nested.extend(n);
    }
    header.sort();
    header.dedup();
    nested.sort();
    nested.dedup();
    let header: Vec<String> = header.into_iter().cloned().collect();
    let widest = |name: &String| {
        let cells = items.iter().filter_map(|item| item.get(name.as_str())).map(|v| cell(v).chars().count());
        cells.chain([name.len()]).max().unwrap_or(0) + 5
    };
    if header.iter().map(widest).sum::<usize>() > MAX_ROW {
        // Too wide for a row each: each element as name/value rows of its own section.
        for (i, member) in items.iter().enumerate() {
            if i > 0 {
                sections.push(Section {
                    indent,
                    title: title.map(str::to_string),
                    header: Vec::new(),
                    rows: Vec::new(),
                });
            }
            if let Value::Object(members) = member {
                structure(sections, members, indent, true);
            }
        }
        return;
    }
    for (i, members) in items.iter().filter_map(Value::as_object).enumerate() {
        // With nested members, each element gets a section of its own (as in the aws CLI),
        // so that what is nested stays beside the row it belongs to.
        if i > 0 && !nested.is_empty() {
            sections.push(Section { indent, title: title.map(str::to_string), header: Vec::new(), rows: Vec::new() });
        }
        if let Some(section) = sections.last_mut() {
            section.header.clone_from(&header);
            section.rows.push(header.iter().map(|name| members.get(name).map(cell).unwrap_or_default()).collect());
        }
        for name in &nested {
            if let Some(member) = members.get(name.as_str()) {
                build(sections, Some(name), member, indent + 1);
            }
        }
    }
}

/// A section's columns: how many, and the width each needs (two spaces of padding on
/// either side of a value, one on either side of a header).
fn natural_widths(section: &Section) -> Vec<usize> {
    let columns = section.rows.iter().map(Vec::len).chain([section.header.len()]).max().unwrap_or(0).max(1);
    (0..columns)
        .map(|i| {
            let header = section.header.get(i).map_or(0, |h| h.chars().count() + 2);
            let cells = section.rows.iter().filter_map(|row| row.get(i)).map(|c| c.chars().count() + 4);
            cells.chain([header]).max().unwrap_or(0)
        })
        .collect()
}

/// Stretches `widths` to fill `inner` characters between a section's borders.
fn stretch(widths: &mut [usize], inner: usize) {
    let used: usize = widths.iter().sum::<usize>() + widths.len().saturating_sub(1);
    let extra = inner.saturating_sub(used);
    let n = widths.len().max(1);
    for (i, width) in widths.iter_mut().enumerate() {
        *width += extra / n + usize::from(i < extra % n);
    }
}

fn center(text: &str, width: usize) -> String {
    let len = text.chars().count();
    let left = width.saturating_sub(len) / 2;
    format!("{}{text}{}", " ".repeat(left), " ".repeat(width.saturating_sub(len + left)))
}

fn left(text: &str, width: usize) -> String {
    let shown = format!("  {text}");
    let len = shown.chars().count();
    format!("{shown}{}", " ".repeat(width.saturating_sub(len)))
}

fn layout(sections: &[Section]) -> String {
    if sections.is_empty() {
        return String::new();
    }
    let mut widths: Vec<Vec<usize>> = sections.iter().map(natural_widths).collect();
    let total = sections
        .iter()
        .zip(&widths)
        .map(|(s, w)| {
            let cells = w.iter().sum::<usize>() + w.len() + 1;
            let title = s.title.as_ref().map_or(0, |t| t.chars().count() + 4);
            cells.max(title) + 2 * s.indent
        })
        .max()
        .unwrap_or(0);
    let mut out = format!("{}\n", "-".repeat(total));
    for (section, widths) in sections.iter().zip(widths.iter_mut()) {
        let side = "|".repeat(section.indent);
        let inner = total - 2 * section.indent - 2;
        stretch(widths, inner);
        let rule = format!("{side}+{}+{side}\n", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("+"));
        let line = |cells: Vec<String>| format!("{side}|{}|{side}\n", cells.join("|"));
        if let Some(title) = &section.title {
            out.push_str(&format!("{side}|{}|{side}\n", center(title, inner)));
            out.push_str(&rule);
        }
        if !section.header.is_empty() {
            out.push_str(&line(section.header.iter().zip(widths.iter()).map(|(h, w)| center(h, *w)).collect()));
            out.push_str(&rule);
        }
        if !section.rows.is_empty() {
            for row in &section.rows {
                let cells = (0..widths.len()).map(|i| left(row.get(i).map_or("", String::as_str), widths[i]));
                out.push_str(&line(cells.collect()));
            }
            out.push_str(&rule);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_list_is_a_section_with_a_header_under_the_operation() {
        let response = json!({"Keys": [{"KeyId": "k1", "KeyArn": "arn:k1"}, {"KeyId": "k2", "KeyArn": "arn:k2"}],
                              "Truncated": false});
        let expected = "\
-------------------------
|       ListKeys        |
+-------------+---------+
|  Truncated  |  False  |
+-------------+---------+
||        Keys         ||
|+------------+--------+|
||   KeyArn   | KeyId  ||
|+------------+--------+|
||  arn:k1    |  k1    ||
||  arn:k2    |  k2    ||
|+------------+--------+|
";
        assert_eq!(render("ListKeys", &response), expected);
    }

    #[test]
    fn a_wide_structure_becomes_name_value_rows_and_lists_of_scalars_rows() {
        let long = "x".repeat(60);
        let response = json!({"KeyMetadata": {"Arn": long, "Description": long, "KeyId": "k",
                                              "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"]}});
        let out = render("DescribeKey", &response);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].contains("DescribeKey") && lines[3].contains("KeyMetadata"), "{out}");
        assert!(lines[5].starts_with("||  Arn ") && lines[5].contains(&long), "{out}");
        assert!(lines[7].starts_with("||  KeyId ") && lines[7].ends_with("||"), "{out}");
        assert!(lines[9].contains("EncryptionAlgorithms"), "{out}");
        assert!(lines[11].starts_with("|||  SYMMETRIC_DEFAULT") && lines[11].ends_with("|||"), "{out}");
        let width = lines[0].len();
        assert!(lines.iter().all(|l| l.chars().count() == width), "ragged:\n{out}");
    }

    #[test]
    fn nothing_to_show_shows_nothing() {
        assert_eq!(render("ListAliases", &json!({})), "");
    }
}
