//! Every structural problem in a config file at once. serde stops at the
//! first unknown key or value of the wrong type, which would make an
//! operator fix a file one `writ validate` at a time. So each problem is
//! recorded, the key-value or table holding it is blanked out with spaces
//! (the same length, so every later error still points into the original
//! text), and the file is read again, until it reads or no further problem
//! can be isolated. A syntax error stops it: past one, the parser cannot
//! say where the next key begins.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml_edit::{Item, Table};

/// Bounds the re-reads of a file full of mistakes.
const MAX_STRUCTURAL_ERRORS: usize = 50;

/// A structural problem: where it is and what toml said about it.
pub(super) struct Problem {
    pub error: toml::de::Error,
    /// The text the error's span indexes: the file with the problems found
    /// before it blanked out, byte for byte as long as the original.
    pub text: String,
}

/// Parses `text` as `T`, or returns every structural problem found, in the
/// order found (the caller sorts them by position).
pub(super) fn parse_all<T: DeserializeOwned>(text: &str) -> Result<T, Vec<Problem>> {
    let mut current = text.to_owned();
    let mut problems = Vec::new();
    while problems.len() < MAX_STRUCTURAL_ERRORS {
        let error = match toml::from_str::<T>(&current) {
            Ok(parsed) if problems.is_empty() => return Ok(parsed),
            Ok(_) => break,
            Err(error) => error,
        };
        // Past the first problem, a file that no longer parses means the
        // blanking itself broke the syntax: its error would be ours, not
        // the file's.
        let document = toml_edit::Document::parse(current.as_str());
        if !problems.is_empty() && document.is_err() {
            break;
        }
        let enclosing = document.ok().and_then(|doc| {
            let at = error.span()?.start;
            let headers = header_starts(doc.as_table());
            enclosing_range(doc.as_table(), at, &headers, &current)
        });
        problems.push(Problem {
            error,
            text: current.clone(),
        });
        match enclosing {
            Some(ranges) if ranges.iter().any(|r| !r.is_empty()) => {
                for range in ranges {
                    blank(&mut current, range);
                }
            }
            _ => break,
        }
    }
    Err(problems)
}

/// Replaces `range` with spaces, keeping line breaks so that lines and
/// columns after it are unchanged.
fn blank(text: &mut String, range: Range<usize>) {
    // A multi-byte character becomes as many spaces as it had bytes, so
    // every later offset still indexes the original text.
    let replacement: String = text[range.clone()]
        .chars()
        .flat_map(|c| {
            let blank = if c == '\n' { '\n' } else { ' ' };
            std::iter::repeat_n(blank, c.len_utf8())
        })
        .collect();
    text.replace_range(range, &replacement);
}

/// Where every `[table]` and `[[array]]` header in the document begins.
fn header_starts(table: &Table) -> Vec<usize> {
    let mut starts = Vec::new();
    collect_headers(table, &mut starts);
    starts.sort_unstable();
    starts
}

fn collect_headers(table: &Table, starts: &mut Vec<usize>) {
    for (_, item) in table.iter() {
        match item {
            Item::Table(sub) => {
                // An implicit table (`a` of `[a.b]`) has no header of its own.
                if !sub.is_implicit() && !sub.is_dotted() {
                    starts.extend(sub.span().map(|s| s.start));
                }
                collect_headers(sub, starts);
            }
            Item::ArrayOfTables(array) => {
                for sub in array.iter() {
                    starts.extend(sub.span().map(|s| s.start));
                    collect_headers(sub, starts);
                }
            }
            Item::Value(_) | Item::None => {}
        }
    }
}

/// The smallest whole key-value, or table with its body, that holds byte
/// `at`: what can be removed while leaving valid TOML behind. A key-value
/// is taken from the start of its line, so that a dotted key (`a.b = 1`,
/// whose last part alone toml_edit gives a span) goes whole. A table with
/// no header of its own (`a` of `[a.b]` and `[a.c]`) named at `at` goes
/// with every table below it, so that it is reported once, not once per
/// header.
fn enclosing_range(
    table: &Table,
    at: usize,
    headers: &[usize],
    text: &str,
) -> Option<Vec<Range<usize>>> {
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        match item {
            Item::Value(value) => {
                if let Some(whole) = key_value_range(key, value, text)
                    && whole.contains(&at)
                {
                    return Some(vec![whole]);
                }
            }
            Item::Table(sub) => {
                if sub.is_implicit() && key.span().is_some_and(|span| span.contains(&at)) {
                    let mut pieces = Vec::new();
                    table_pieces(sub, headers, text, &mut pieces);
                    return Some(pieces);
                }
                if let Some(found) = table_range(sub, at, headers, text) {
                    return Some(found);
                }
            }
            Item::ArrayOfTables(array) => {
                for sub in array.iter() {
                    if let Some(found) = table_range(sub, at, headers, text) {
                        return Some(found);
                    }
                }
            }
            Item::None => {}
        }
    }
    None
}

/// A key-value's whole text, from the start of its line.
fn key_value_range(
    key: &toml_edit::Key,
    value: &toml_edit::Value,
    text: &str,
) -> Option<Range<usize>> {
    let (key_span, value_span) = (key.span()?, value.span()?);
    let line_start = text
        .get(..key_span.start)
        .and_then(|before| before.rfind('\n'))
        .map_or(0, |newline| newline + 1);
    Some(line_start..value_span.end)
}

/// A table with a header: from it up to the next header.
fn header_to_next(table: &Table, headers: &[usize], text: &str) -> Option<Range<usize>> {
    let header = table.span()?;
    let end = headers
        .iter()
        .copied()
        .find(|&start| start >= header.end)
        .unwrap_or(text.len());
    Some(header.start..end)
}

/// Every piece of text that makes up `table`: its key-values, and each
/// table below it with its body.
fn table_pieces(table: &Table, headers: &[usize], text: &str, pieces: &mut Vec<Range<usize>>) {
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        match item {
            Item::Value(value) => pieces.extend(key_value_range(key, value, text)),
            Item::Table(sub) => {
                if !sub.is_implicit() && !sub.is_dotted() {
                    pieces.extend(header_to_next(sub, headers, text));
                }
                table_pieces(sub, headers, text, pieces);
            }
            Item::ArrayOfTables(array) => {
                for sub in array.iter() {
                    pieces.extend(header_to_next(sub, headers, text));
                    table_pieces(sub, headers, text, pieces);
                }
            }
            Item::None => {}
        }
    }
}

/// Within a table: a key-value of it, or the table itself (its header up
/// to the next header) when `at` is in its header.
fn table_range(
    table: &Table,
    at: usize,
    headers: &[usize],
    text: &str,
) -> Option<Vec<Range<usize>>> {
    if let Some(found) = enclosing_range(table, at, headers, text) {
        return Some(found);
    }
    if !table.span()?.contains(&at) {
        return None;
    }
    header_to_next(table, headers, text).map(|range| vec![range])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Shape {
        name: Option<String>,
        count: Option<u32>,
        inner: Option<Inner>,
        #[serde(default)]
        item: Vec<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: Option<u32>,
        pair: Option<Pair>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Pair {
        a: Option<u32>,
    }

    /// Each problem as the text its span covers, in file order.
    fn found(text: &str) -> Vec<String> {
        let Err(problems) = parse_all::<Shape>(text) else {
            return Vec::new();
        };
        let mut spans: Vec<Range<usize>> = problems
            .iter()
            .map(|p| p.error.span().unwrap_or(0..0))
            .collect();
        spans.sort_by_key(|s| s.start);
        spans
            .into_iter()
            .map(|s| text[s].trim().to_owned())
            .collect()
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_found_in_one_pass() {
        let text = "nmae = \"x\"\ncount = \"many\"\n[inner]\nsize = 1\nsise = 2\n\
                    [[item]]\nsize = -1\n[[item]]\nbogus = true\n";
        assert_eq!(found(text), ["nmae", "\"many\"", "sise", "-1", "bogus"]);
    }

    #[test]
    fn an_unknown_table_is_dropped_with_its_body_and_the_next_table_still_read() {
        let text = "[inenr]\nsize = 1\nwhat = 2\n[inner]\nsise = 3\n";
        assert_eq!(found(text), ["inenr", "sise"]);
    }

    #[test]
    fn an_unknown_table_known_only_by_its_sub_tables_is_reported_once() {
        let text = "[inenr.a]\nsize = 1\n[inenr.b]\nsize = 2\n[inner]\nsise = 3\n";
        assert_eq!(found(text), ["inenr", "sise"]);
    }

    #[test]
    fn a_problem_in_a_dotted_key_drops_its_whole_line() {
        let text = "inner.sise = 1\ncount = \"x\"\n[[item]]\npair.b = 2\nsize = \"y\"\n";
        assert_eq!(found(text), ["sise", "\"x\"", "b", "\"y\""]);
    }

    #[test]
    fn a_problem_inside_an_inline_table_drops_the_whole_key_value() {
        let text = "[inner]\npair = { a = 1, b = 2 }\nsise = 1\n";
        assert_eq!(found(text), ["b", "sise"]);
    }

    #[test]
    fn blanking_keeps_every_offset_and_line() {
        let mut text = "a = \"é€\"\nb = 1\n".to_owned();
        let before = text.len();
        let first_line = 0..text.find('\n').unwrap_or(0);
        blank(&mut text, first_line);
        assert_eq!(text.len(), before);
        assert!(text.ends_with("\nb = 1\n"));
        assert!(toml_edit::Document::parse(text.as_str()).is_ok());
    }

    #[test]
    fn a_syntax_error_is_reported_alone() {
        let problems = parse_all::<Shape>("name = \ncount = \"x\"\n")
            .err()
            .unwrap_or_default();
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn a_good_file_parses() {
        let shape: Result<Shape, _> = parse_all("name = \"x\"\n[[item]]\nsize = 2\n");
        assert!(shape.is_ok());
    }
}
