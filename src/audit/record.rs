//! The bytes of one record line: how writ serializes and hashes a record,
//! and how a reader checks a line's hash without re-serializing it (so the
//! hash covers exactly what is on disk). Also the signed checkpoint message.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::event::AuditEvent;

/// `prev` of the very first record of a trail.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Every line ends with `,"hash":"<64 lowercase hex>"}`.
const HASH_MEMBER_OPEN: &[u8] = b",\"hash\":\"";
const HASH_MEMBER_LEN: usize = HASH_MEMBER_OPEN.len() + 64 + 2;

/// Domain separation for checkpoint signatures, so no other signature the
/// CA makes can be passed off as one.
const CHECKPOINT_CONTEXT: &str = "writ-audit-checkpoint-v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// After `checkpoint_every` records or `checkpoint_interval`.
    Periodic,
    /// `AuditLog::checkpoint` was called.
    Requested,
    /// The last record writ writes on a clean close. A trail whose last
    /// record is not one was cut short, or writ did not stop cleanly.
    Close,
}

impl CheckpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Periodic => "periodic",
            CheckpointKind::Requested => "requested",
            CheckpointKind::Close => "close",
        }
    }
}

/// The `checkpoint` member of a checkpoint record: a signature over the
/// chain head, which is the record just before the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFacts {
    pub kind: CheckpointKind,
    /// Records before this one; equals the checkpoint's own `seq`.
    pub records: u64,
    /// `seq` of the head (absent only for a checkpoint at seq 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_seq: Option<u64>,
    /// `hash` of the head; equals the checkpoint's own `prev`.
    pub head_hash: String,
    /// Standard base64 of the DER ECDSA P-256 SHA-256 signature over
    /// [`checkpoint_message`].
    pub signature: String,
    /// Standard base64 of the signing certificate (DER).
    pub certificate: String,
}

/// The exact bytes a checkpoint signature covers. Binding the checkpoint's
/// own seq and time stops a valid signature from being moved elsewhere.
pub fn checkpoint_message(
    seq: u64,
    time: &str,
    kind: CheckpointKind,
    records: u64,
    head_hash: &str,
) -> Vec<u8> {
    format!(
        "{CHECKPOINT_CONTEXT}\nseq={seq}\ntime={time}\nkind={}\nrecords={records}\nhead={head_hash}\n",
        kind.as_str()
    )
    .into_bytes()
}

/// A record as serialized: the log's fields around the caller's event,
/// in this order. `hash` is appended by [`encode_line`].
#[derive(Serialize)]
pub(crate) struct RecordBody<'a> {
    pub seq: u64,
    pub time: &'a str,
    #[serde(flatten)]
    pub event: &'a AuditEvent,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<&'a CheckpointFacts>,
    pub prev: &'a str,
}

/// Appends the record's line (with `\n`) to `out` and returns its hash:
/// SHA-256 over the compact JSON of `body` (the canonical bytes), whose
/// closing `}` is then replaced by `,"hash":"<hex>"}`.
pub(crate) fn encode_line(body: &RecordBody<'_>, out: &mut Vec<u8>) -> Result<String, String> {
    let start = out.len();
    if let Err(e) = serde_json::to_writer(&mut *out, body) {
        out.truncate(start);
        return Err(format!("serializing a record: {e}"));
    }
    if out.last() != Some(&b'}') {
        out.truncate(start);
        return Err("a record did not serialize to a JSON object".into());
    }
    let hash = hex::encode(Sha256::digest(&out[start..]));
    out.pop();
    out.extend_from_slice(HASH_MEMBER_OPEN);
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
    Ok(hash)
}

/// The fields a reader needs from a line; everything else is covered by
/// the hash but not interpreted, so newer writers can add fields.
#[derive(Debug, Deserialize)]
pub(crate) struct RecordView {
    pub seq: u64,
    pub time: String,
    pub event: String,
    #[serde(default)]
    pub checkpoint: Option<CheckpointFacts>,
    #[serde(default)]
    pub detail: Option<serde_json::Map<String, serde_json::Value>>,
    pub prev: String,
}

#[derive(Debug)]
pub(crate) struct ParsedLine {
    pub view: RecordView,
    /// The hash the line claims, checked against its bytes.
    pub hash: String,
}

impl ParsedLine {
    pub fn is_close_checkpoint(&self) -> bool {
        self.view
            .checkpoint
            .as_ref()
            .is_some_and(|c| c.kind == CheckpointKind::Close)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineError {
    /// Not shaped like a record line at all.
    Malformed(String),
    /// The stated hash is not the hash of the line's bytes.
    HashMismatch { stated: String, computed: String },
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::Malformed(reason) => write!(f, "not a valid record: {reason}"),
            LineError::HashMismatch { stated, computed } => write!(
                f,
                "the record was modified: its bytes hash to {computed}, but it states {stated}"
            ),
        }
    }
}

/// Checks one line (without its `\n`) against its own hash and reads it.
/// Works on the bytes as stored: it never re-serializes.
pub(crate) fn parse_line(line: &[u8]) -> Result<ParsedLine, LineError> {
    let split = line
        .len()
        .checked_sub(HASH_MEMBER_LEN)
        .ok_or_else(|| LineError::Malformed("too short".into()))?;
    let (canonical_head, member) = line.split_at(split);
    let stated = member
        .strip_prefix(HASH_MEMBER_OPEN)
        .and_then(|rest| rest.strip_suffix(b"\"}"))
        .filter(|hex| hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| {
            LineError::Malformed(
                r#"it does not end with ,"hash":"<64 lowercase hex digits>"}"#.into(),
            )
        })?;
    let stated = String::from_utf8_lossy(stated).into_owned();
    let mut hasher = Sha256::new();
    hasher.update(canonical_head);
    hasher.update(b"}");
    let computed = hex::encode(hasher.finalize());
    if computed != stated {
        return Err(LineError::HashMismatch { stated, computed });
    }
    let view: RecordView = serde_json::from_slice(line)
        .map_err(|e| LineError::Malformed(format!("not JSON with seq, time, event, prev: {e}")))?;
    Ok(ParsedLine { view, hash: stated })
}

/// RFC 3339, UTC, microseconds: `2025-01-31T12:00:00.123456Z`. Times
/// before 1970 (a broken clock) are written as the epoch.
pub(crate) fn format_time(t: SystemTime) -> String {
    let nanos = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let t = i128::try_from(nanos)
        .ok()
        .and_then(|n| time::OffsetDateTime::from_unix_timestamp_nanos(n).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    // Every record carries one: its digits are written in place, not
    // through the formatting machinery, which cost more than the rest of
    // the record's encoding.
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, value: u32| {
        let mut rest = value;
        for digit in text[at..at + width].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
    };
    // Years are at most 9999: `time` refuses later instants, and those
    // fell back to the epoch above.
    put(0, 4, u32::try_from(t.year()).unwrap_or(0));
    put(5, 2, u32::from(u8::from(t.month())));
    put(8, 2, u32::from(t.day()));
    put(11, 2, u32::from(t.hour()));
    put(14, 2, u32::from(t.minute()));
    put(17, 2, u32::from(t.second()));
    put(20, 6, t.microsecond());
    text.iter().map(|b| char::from(*b)).collect()
}

pub(crate) fn parse_time(text: &str) -> Option<SystemTime> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    let nanos = u64::try_from(t.unix_timestamp_nanos()).ok()?;
    Some(UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::EventKind;

    fn line_for(event: &AuditEvent, seq: u64, prev: &str) -> (Vec<u8>, String) {
        let mut out = Vec::new();
        let body = RecordBody {
            seq,
            time: "2025-01-31T12:00:00.000001Z",
            event,
            checkpoint: None,
            prev,
        };
        let hash = encode_line(&body, &mut out).unwrap();
        (out, hash)
    }

    #[test]
    fn a_line_is_its_canonical_bytes_with_the_hash_member_last() {
        let event = AuditEvent::new(EventKind::Denied, "c-1")
            .reason("line\nbreak \"quoted\" ünïcode")
            .detail("b", 2)
            .detail("a", "x");
        let (line, hash) = line_for(&event, 7, ZERO_HASH);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
        let line = &line[..line.len() - 1];
        let text = std::str::from_utf8(line).unwrap();
        assert!(
            text.starts_with(r#"{"seq":7,"time":"2025-01-31T12:00:00.000001Z","event":"denied","correlation_id":"c-1","reason":"#),
            "{text}"
        );
        let suffix = format!(r#","prev":"{ZERO_HASH}","hash":"{hash}"}}"#);
        assert!(text.ends_with(&suffix), "{text}");
        // The hash is SHA-256 of the line without its hash member.
        let canonical = text.replace(&format!(r#","hash":"{hash}""#), "");
        assert_eq!(hex::encode(Sha256::digest(canonical.as_bytes())), hash);
        let parsed = parse_line(line).unwrap();
        assert_eq!(parsed.hash, hash);
        assert_eq!(parsed.view.seq, 7);
        assert_eq!(parsed.view.event, "denied");
        assert_eq!(parsed.view.prev, ZERO_HASH);
        // Events round-trip through the record.
        let back: AuditEvent = serde_json::from_slice(line).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn any_changed_byte_is_caught_even_when_the_json_means_the_same() {
        let (line, _) = line_for(&AuditEvent::new(EventKind::TaskBegun, "abc"), 1, ZERO_HASH);
        let line = &line[..line.len() - 1];
        for i in 0..line.len() {
            let mut bad = line.to_vec();
            bad[i] ^= 0x01;
            assert!(parse_line(&bad).is_err(), "byte {i}");
        }
        // Whitespace is meaningless to JSON but still a modification.
        let text = std::str::from_utf8(line).unwrap().replacen(",", ", ", 1);
        assert!(matches!(
            parse_line(text.as_bytes()),
            Err(LineError::HashMismatch { .. })
        ));
        assert!(matches!(parse_line(b"{}"), Err(LineError::Malformed(_))));
    }

    #[test]
    fn times_are_utc_microseconds_and_parse_back() {
        let t = UNIX_EPOCH + std::time::Duration::from_nanos(1_738_324_800_123_456_789);
        let text = format_time(t);
        assert_eq!(text, "2025-01-31T12:00:00.123456Z");
        assert_eq!(
            parse_time(&text),
            Some(UNIX_EPOCH + std::time::Duration::from_nanos(1_738_324_800_123_456_000))
        );
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // Field by field as `format!` writes them, across leap days, month
        // and year ends, and microsecond values of every width.
        for secs in (0u64..253_402_300_799).step_by(7_777_777) {
            let sub = u32::try_from(secs % 1_000_000).unwrap() * 1_000 + 999;
            let t = UNIX_EPOCH + std::time::Duration::new(secs, sub);
            let nanos = i128::from(secs) * 1_000_000_000 + i128::from(sub);
            let d = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second(),
                d.microsecond()
            );
            assert_eq!(format_time(t), expected, "{nanos}");
        }
    }
}
