//! toml's parse errors as `writ validate` prints them: one line, and a
//! value of the wrong type said in plain words with the key it is for.
//! serde's own wording names Rust types ("invalid value: integer `-1`,
//! expected u64") and leaves the key out, which tells a person editing a
//! config file neither what to write nor where.

/// Keys whose values are durations: TOML has no duration type, so they
/// are strings such as "5s", and a bare number is the usual mistake.
const DURATION_KEYS: &[&str] = &[
    "reattest_interval",
    "ca_ttl",
    "x509_svid_ttl",
    "jwt_svid_ttl",
    "max_ttl",
    "default_ttl",
    "completed_retention",
    "checkpoint_interval",
    "min_refresh_interval",
    "refresh_hint",
];

/// The one-line message for `err`.
pub(super) fn message(err: &toml::de::Error) -> String {
    // toml's messages can run over several lines; one line per error
    // keeps `writ validate` output greppable.
    let message = err.message().trim().replace('\n', "; ");
    match plain_type_error(&message, key_path(err).as_deref()) {
        Some(plain) => plain,
        None => message,
    }
}

/// The dotted path of the key the error is about, when toml knows it. toml
/// keeps the path private and shows it only in its `Display` of an error
/// without the input text (with the input, it shows the line instead), so
/// it is read from there.
fn key_path(err: &toml::de::Error) -> Option<String> {
    let mut bare = err.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let last = shown.trim_end().lines().last()?;
    let path = last.strip_prefix("in `")?.strip_suffix('`')?;
    (!path.is_empty()).then(|| path.to_owned())
}

/// serde's "invalid type: X, expected Y" and "invalid value: X, expected
/// Y" as "KEY: expected Y', found X'" in plain words; `None` for any other
/// message, which is kept as toml wrote it.
fn plain_type_error(message: &str, key: Option<&str>) -> Option<String> {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))?;
    let (found, expected) = rest.rsplit_once(", expected ")?;
    let is_duration = key
        .and_then(|k| k.rsplit('.').next())
        .is_some_and(|last| DURATION_KEYS.contains(&last));
    let expected = plain_expected(expected, is_duration);
    let found = plain_found(found);
    Some(match key {
        Some(key) => format!("{key}: expected {expected}, found {found}"),
        None => format!("expected {expected}, found {found}"),
    })
}

fn plain_expected(expected: &str, is_duration: bool) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number of 0 or more".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a string" | "a borrowed string" if is_duration => {
            "a duration string such as \"5s\"".into()
        }
        "a borrowed string" => "a string".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list [...]".into(),
        "a map" => "a table".into(),
        other if other.starts_with("struct ") => "a table".into(),
        other => other.into(),
    }
}

/// What was written, as serde's `Unexpected` shows it, without the type
/// names and quoting around literals.
fn plain_found(found: &str) -> String {
    for prefix in ["integer ", "floating point ", "boolean "] {
        if let Some(literal) = found.strip_prefix(prefix) {
            return literal.trim_matches('`').to_owned();
        }
    }
    if let Some(string) = found.strip_prefix("string ") {
        return format!("the string {string}");
    }
    match found {
        "sequence" => "a list".into(),
        "map" => "a table".into(),
        other => other.into(),
    }
}
