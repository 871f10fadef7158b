//! Human-written durations (`"90s"`, `"1h30m"`, `"7d"`) as used for every TTL
//! in writ's configuration: parsing, canonical formatting, and serde helpers.
//! Zero is a valid duration here; callers that need a positive one say so.

use std::fmt::Write as _;
use std::time::Duration;

use writ_attestors::excerpt;

/// Units from largest to smallest. A duration must list its parts in this
/// order, each at most once, so `"1m30m"` (almost surely a typo) is refused
/// rather than quietly read as 31 minutes.
/// Each unit is given in milliseconds.
const UNITS: &[(&str, u64)] = &[
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

const UNIT_LIST: &str = "d, h, m, s, ms";

/// About a century. Anything longer is a typo, and refusing it here keeps
/// `SystemTime + ttl` (which panics on overflow) safe everywhere else.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration is empty; write a number and a unit ({UNIT_LIST}), e.g. \"10m\"")]
    Empty,
    #[error("duration {:?} is negative; only zero or positive durations are allowed", excerpt(.0))]
    Negative(String),
    #[error(
        "duration {:?}: {} has no unit; add one of {UNIT_LIST} (e.g. \"{}s\")",
        excerpt(.input), excerpt(.number), excerpt(.number)
    )]
    MissingUnit { input: String, number: String },
    #[error("duration {:?}: unit {:?} has no number before it", excerpt(.input), excerpt(.unit))]
    MissingNumber { input: String, unit: String },
    #[error("duration {:?}: unknown unit {:?}; use one of {UNIT_LIST}", excerpt(.input), excerpt(.unit))]
    UnknownUnit { input: String, unit: String },
    #[error("duration {:?}: fractions are not supported; combine units instead (e.g. \"1h30m\")", excerpt(.0))]
    Fraction(String),
    #[error(
        "duration {:?}: unexpected character {found:?}; write e.g. \"1h30m\" with no spaces",
        excerpt(.input)
    )]
    UnexpectedChar { input: String, found: char },
    #[error(
        "duration {:?}: unit {:?} is repeated or out of order; list units from largest to smallest, each once (e.g. \"1h30m\")",
        excerpt(.input), excerpt(.unit)
    )]
    UnitOrder { input: String, unit: String },
    #[error("duration {:?} is too large; the maximum is 36500d", excerpt(.0))]
    Overflow(String),
}

/// Parses a duration such as `"500ms"`, `"90s"`, `"10m"`, `"1h30m"`, `"7d"`.
///
/// Every number needs a unit, parts go from the largest unit to the
/// smallest, and there is no sign, fraction or whitespace. `"0s"` parses to
/// zero; rejecting zero is up to the caller, which knows whether it needs a
/// positive value.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    if input.is_empty() {
        return Err(DurationError::Empty);
    }
    if input.starts_with('-') {
        return Err(DurationError::Negative(input.to_owned()));
    }
    let mut total = Duration::ZERO;
    // Index into UNITS of the smallest unit seen so far; the next part must
    // use a strictly smaller one.
    let mut last_unit: Option<usize> = None;
    let mut rest = input;
    while !rest.is_empty() {
        let digits_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (number, after_number) = rest.split_at(digits_len);
        let unit_len = after_number
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_len);

        if number.is_empty() {
            return Err(match after_number.chars().next() {
                Some(c) if c.is_ascii_alphabetic() => DurationError::MissingNumber {
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                },
                Some('.') => DurationError::Fraction(input.to_owned()),
                Some(found) => DurationError::UnexpectedChar {
                    input: input.to_owned(),
                    found,
                },
                None => DurationError::Empty,
            });
        }
        if unit.is_empty() {
            return Err(match after_number.chars().next() {
                Some('.') => DurationError::Fraction(input.to_owned()),
                Some(found) => DurationError::UnexpectedChar {
                    input: input.to_owned(),
                    found,
                },
                None => DurationError::MissingUnit {
                    input: input.to_owned(),
                    number: number.to_owned(),
                },
            });
        }
        let Some(unit_index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(DurationError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.to_owned(),
            });
        };
        if last_unit.is_some_and(|last| unit_index <= last) {
            return Err(DurationError::UnitOrder {
                input: input.to_owned(),
                unit: unit.to_owned(),
            });
        }
        last_unit = Some(unit_index);

        let overflow = || DurationError::Overflow(input.to_owned());
        // The digits are all ASCII, so the only way this parse fails is a
        // number wider than u64.
        let count: u64 = number.parse().map_err(|_| overflow())?;
        let part_ms = count
            .checked_mul(UNITS[unit_index].1)
            .ok_or_else(overflow)?;
        total = total
            .checked_add(Duration::from_millis(part_ms))
            .ok_or_else(overflow)?;
        if total > MAX_DURATION {
            return Err(overflow());
        }
        rest = after_unit;
    }
    Ok(total)
}

/// Formats a duration in the form `parse_duration` reads, using the largest
/// units that divide it (`5400s` becomes `"1h30m"`). Parts below a
/// millisecond are dropped: no configured duration has them.
pub fn format_duration(duration: Duration) -> String {
    let mut remaining_ms = duration.as_millis();
    if remaining_ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (name, unit_ms) in UNITS {
        let unit_ms = u128::from(*unit_ms);
        let count = remaining_ms / unit_ms;
        if count > 0 {
            // Writing into a String cannot fail.
            let _ = write!(out, "{count}{name}");
            remaining_ms %= unit_ms;
        }
    }
    out
}

/// `#[serde(with = "crate::config::duration_serde")]` for `Duration` fields
/// written as `"10m"`-style strings.
pub mod duration_serde {
    use super::{format_duration, parse_duration};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<Duration>`; pair it with `#[serde(default)]`.
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(
            duration: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match duration {
                Some(duration) => serializer.serialize_some(&format_duration(*duration)),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            let text = Option::<String>::deserialize(deserializer)?;
            text.map(|text| parse_duration(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_durations() {
        let cases: &[(&str, Duration)] = &[
            ("500ms", Duration::from_millis(500)),
            ("90s", Duration::from_secs(90)),
            ("10m", Duration::from_secs(600)),
            ("1h30m", Duration::from_secs(5_400)),
            ("24h", Duration::from_secs(86_400)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("1d2h3m4s5ms", Duration::from_millis(93_784_005)),
            ("0s", Duration::ZERO),
            ("90m", Duration::from_secs(5_400)),
            ("5000000000ms", Duration::from_secs(5_000_000)),
            ("36500d", MAX_DURATION),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input).unwrap(), *want, "{input}");
        }
    }

    #[test]
    fn rejects_bad_durations_naming_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("-5m", "negative"),
            ("90", "has no unit"),
            ("1h30", "30 has no unit"),
            ("h", "no number"),
            ("5y", "unknown unit \"y\""),
            ("5sec", "unknown unit \"sec\""),
            ("5M", "unknown unit \"M\""),
            ("1.5h", "fractions"),
            ("1h 30m", "unexpected character ' '"),
            ("+5m", "unexpected character '+'"),
            ("30m1h", "out of order"),
            ("1m30m", "repeated"),
            ("99999999999999999999d", "too large"),
            ("18446744073709551615s", "too large"),
            ("36501d", "too large"),
            ("36500d1ms", "too large"),
        ];
        for (input, want) in cases {
            let err = parse_duration(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn format_is_canonical_and_round_trips() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(5_400), "1h30m"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_millis(93_784_005), "1d2h3m4s5ms"),
        ] {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text).unwrap(), duration);
        }
    }

    #[test]
    fn serde_helpers_read_and_write_strings() {
        #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
        struct Ttls {
            #[serde(with = "duration_serde")]
            ttl: Duration,
            #[serde(default, with = "duration_serde::option")]
            max: Option<Duration>,
        }
        let parsed: Ttls = toml::from_str("ttl = \"1h30m\"\nmax = \"2h\"\n").unwrap();
        assert_eq!(
            parsed,
            Ttls {
                ttl: Duration::from_secs(5_400),
                max: Some(Duration::from_secs(7_200)),
            }
        );
        let without_max: Ttls = toml::from_str("ttl = \"5s\"\n").unwrap();
        assert_eq!(without_max.max, None);
        let err = toml::from_str::<Ttls>("ttl = \"5 s\"\n").unwrap_err();
        assert!(err.message().contains("unexpected character ' '"), "{err}");
        let text = toml::to_string(&parsed).unwrap();
        assert_eq!(text, "ttl = \"1h30m\"\nmax = \"2h\"\n");
    }
}
