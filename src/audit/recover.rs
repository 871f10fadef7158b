//! Picking up an existing trail at start: finding the last complete record
//! (the chain head to continue from), moving what follows it into a side
//! file so the trail ends on a whole record and no byte is lost (a torn
//! tail left by a crash, or lines changed since they were written), and
//! refusing a file that is no trail at all.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::AuditError;
use super::files::{
    self, read_tail, records_end, rotated_numbers, rotated_path, suffixed, sync_dir,
};
use super::record::{ParsedLine, parse_line};

/// The `audit_started` detail naming where a modified tail was moved;
/// verify reports every record that has it.
pub(crate) const MODIFIED_TAIL_MOVED_TO: &str = "modified_tail_moved_to";

/// Every record line begins so.
const RECORD_START: &[u8] = b"{\"seq\":";

/// The last complete record of the trail.
pub(crate) struct Head {
    pub seq: u64,
    pub hash: String,
    /// It is a close checkpoint: the previous run stopped cleanly.
    pub closed: bool,
}

/// Why bytes after the last record were set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TailKind {
    /// What a crash mid-write leaves: a line cut short, or lines with
    /// blocks that were never written (NUL bytes, which no record holds).
    Torn,
    /// At least one whole line, ended by its newline and free of NUL
    /// bytes, that is not a record or does not chain on: a write cut short
    /// cannot produce that, so the line was changed after it was written.
    Modified,
}

impl TailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TailKind::Torn => "torn",
            TailKind::Modified => "modified",
        }
    }
}

/// Bytes set aside from the end of the newest file.
pub(crate) struct SetAside {
    pub kind: TailKind,
    pub moved_to: PathBuf,
    pub bytes: u64,
}

pub(crate) struct Recovered {
    pub head: Option<Head>,
    pub set_aside: Option<SetAside>,
    /// The number the next rotated file gets.
    pub next_rotation: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Finds the head of the trail at `path`. Only the newest file can end in
/// a torn write (older ones were complete and fsynced before rotation), so
/// invalid bytes at the end of an older file refuse the start instead.
pub(crate) fn recover(path: &Path, now: SystemTime) -> Result<Recovered, AuditError> {
    let numbers = rotated_numbers(path).map_err(io_err(path))?;
    let next_rotation = numbers.last().map_or(1, |n| n + 1);
    let mut newest_first: Vec<PathBuf> = numbers
        .iter()
        .rev()
        .map(|&n| rotated_path(path, n))
        .collect();
    if path.exists() {
        newest_first.insert(0, path.to_owned());
    }
    let mut set_aside = None;
    for (i, file_path) in newest_first.iter().enumerate() {
        let newest = i == 0;
        let file = OpenOptions::new()
            .read(true)
            .write(newest)
            .open(file_path)
            .map_err(io_err(file_path))?;
        let size = file.metadata().map_err(io_err(file_path))?.len();
        // Zeroed space kept ready past the last record is not a torn
        // write; it is cut off so the writer starts from a file that ends
        // on its last record. Older files were cut before they rotated.
        let len = if newest {
            records_end(&file, size).map_err(io_err(file_path))?
        } else {
            size
        };
        let (valid_end, last) = if len == 0 {
            (0, None)
        } else {
            last_valid_record(&file, len).map_err(io_err(file_path))?
        };
        // Checked before anything is cut: a file that some other program
        // owns (a database, a text file) named as the trail by mistake
        // would otherwise be moved aside whole as a "torn tail" and then
        // overwritten with records.
        if newest && last.is_none() && len > 0 && !begins_like_a_record(file_path, &file, len)? {
            return Err(AuditError::NotATrail {
                path: file_path.clone(),
                bytes: size,
            });
        }
        if newest && len < size {
            file.set_len(len)
                .and_then(|()| file.sync_all())
                .map_err(io_err(file_path))?;
        }
        if len == 0 {
            continue;
        }
        if valid_end < len {
            if !newest {
                return Err(AuditError::Corrupt {
                    path: file_path.clone(),
                    line: count_lines(file_path, valid_end).map_err(io_err(file_path))? + 1,
                    reason: format!(
                        "the file ends with {} bytes that are not a valid record, and only the newest file can hold a torn write",
                        len - valid_end
                    ),
                });
            }
            let kind = tail_kind(&file, valid_end, len).map_err(io_err(file_path))?;
            set_aside = Some(move_aside(file_path, &file, kind, valid_end, len, now)?);
        }
        if let Some(last) = last {
            return Ok(Recovered {
                head: Some(Head {
                    seq: last.view.seq,
                    closed: last.is_close_checkpoint(),
                    hash: last.hash,
                }),
                set_aside,
                next_rotation,
            });
        }
    }
    Ok(Recovered {
        head: None,
        set_aside,
        next_rotation,
    })
}

/// Whether the first bytes of the file could start a record: `{"seq":` or
/// as much of it as the file holds, or a NUL (a first block that a crash
/// left unwritten).
fn begins_like_a_record(file_path: &Path, file: &File, len: u64) -> Result<bool, AuditError> {
    let mut start = [0u8; RECORD_START.len()];
    let n = usize::try_from(len).map_or(start.len(), |len| len.min(start.len()));
    file.read_exact_at(&mut start[..n], 0)
        .map_err(io_err(file_path))?;
    Ok(start[0] == 0 || start[..n] == RECORD_START[..n])
}

/// The end offset of the last line that is a self-consistent record and
/// chains onto the line before it (when that line is a record), and that
/// record; `(0, None)` when no line is.
fn last_valid_record(file: &File, len: u64) -> io::Result<(u64, Option<ParsedLine>)> {
    let mut want = 1;
    loop {
        let tail = read_tail(file, len, want)?;
        let mut need_more = false;
        for i in (0..tail.lines.len()).rev() {
            let (offset, line) = &tail.lines[i];
            let Ok(parsed) = parse_line(line) else {
                continue;
            };
            let predecessor = match i.checked_sub(1) {
                Some(p) => parse_line(&tail.lines[p].1).ok(),
                None if tail.from_start => None,
                None => {
                    need_more = true;
                    break;
                }
            };
            let chains = predecessor.is_none_or(|p| {
                parsed.view.prev == p.hash && Some(parsed.view.seq) == p.view.seq.checked_add(1)
            });
            if chains {
                return Ok((offset + line.len() as u64 + 1, Some(parsed)));
            }
        }
        if tail.from_start && !need_more {
            return Ok((0, None));
        }
        want = tail.lines.len().saturating_mul(2).saturating_add(2);
    }
}

/// Whether `start..end` (all after the last record) is what a crash leaves
/// or holds a line someone changed: see `TailKind`.
fn tail_kind(file: &File, start: u64, end: u64) -> io::Result<TailKind> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = start;
    let mut line_has_nul = false;
    while offset < end {
        let n = usize::try_from(end - offset).map_or(buf.len(), |left| left.min(buf.len()));
        file.read_exact_at(&mut buf[..n], offset)?;
        for &b in &buf[..n] {
            match b {
                b'\n' if !line_has_nul => return Ok(TailKind::Modified),
                b'\n' => line_has_nul = false,
                0 => line_has_nul = true,
                _ => {}
            }
        }
        offset += n as u64;
    }
    Ok(TailKind::Torn)
}

/// Copies `valid_end..len` to `<file>.<kind>-<unix µs>` (0600, fsynced),
/// and only then cuts it from the file: a crash in between leaves both
/// copies. Copied in blocks, as the tail may be large.
fn move_aside(
    file_path: &Path,
    file: &File,
    kind: TailKind,
    valid_end: u64,
    len: u64,
    now: SystemTime,
) -> Result<SetAside, AuditError> {
    let micros = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let name = kind.as_str();
    let mut moved_to = suffixed(file_path, &format!("{name}-{micros}"));
    let mut n = 0;
    while moved_to.exists() {
        n += 1;
        moved_to = suffixed(file_path, &format!("{name}-{micros}-{n}"));
    }
    let mut side = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&moved_to)
        .map_err(io_err(&moved_to))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = valid_end;
    while offset < len {
        let n = usize::try_from(len - offset).map_or(buf.len(), |left| left.min(buf.len()));
        file.read_exact_at(&mut buf[..n], offset)
            .map_err(io_err(file_path))?;
        side.write_all(&buf[..n]).map_err(io_err(&moved_to))?;
        offset += n as u64;
    }
    side.sync_all().map_err(io_err(&moved_to))?;
    sync_dir(files::parent_dir(file_path)).map_err(io_err(file_path))?;
    file.set_len(valid_end)
        .and_then(|()| file.sync_all())
        .map_err(io_err(file_path))?;
    let bytes = len - valid_end;
    match kind {
        TailKind::Torn => tracing::warn!(
            file = %file_path.display(),
            moved_to = %moved_to.display(),
            bytes,
            "the audit trail ended in an incomplete record (writ stopped mid-write); moved it aside"
        ),
        TailKind::Modified => tracing::error!(
            file = %file_path.display(),
            moved_to = %moved_to.display(),
            bytes,
            "the audit trail ended in whole lines that are not valid records or do not chain on: they were modified after writ wrote them (a crash cannot leave that); moved them aside, and `writ audit verify` will report this start"
        ),
    }
    Ok(SetAside {
        kind,
        moved_to,
        bytes,
    })
}

/// Lines in the first `end` bytes of a file, for error messages.
fn count_lines(path: &Path, end: u64) -> io::Result<u64> {
    let mut count = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = File::open(path)?.take(end);
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(count);
        }
        count += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::{AuditEvent, AuditLog, EventKind};
    use crate::config::AuditConfig;

    fn trail(dir: &Path, max_file_bytes: u64, records: u64) -> AuditConfig {
        let (signer, _) = crate::audit::test_signers::ca_signer();
        let config = AuditConfig {
            path: dir.join("audit.jsonl"),
            max_file_bytes,
            preallocate_bytes: 1 << 20,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(3600),
        };
        let log = AuditLog::open(&config, signer).unwrap();
        for i in 0..records {
            log.append_blocking(AuditEvent::new(EventKind::Denied, format!("c{i}")))
                .unwrap();
        }
        log.close();
        config
    }

    fn append(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    #[test]
    fn a_fragment_at_the_end_of_the_newest_file_is_moved_aside_as_torn() {
        let dir = tempfile::tempdir().unwrap();
        let config = trail(dir.path(), 1 << 20, 3);
        let before = std::fs::read(&config.path).unwrap();
        // A whole line with blocks never written (NULs) is a crash's too.
        let junk = b"{\"seq\":5,\0\0\0\0\"hash\":\"00\"}\n{\"seq\":6,\"cut sh";
        append(&config.path, junk);
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let recovered = recover(&config.path, now).unwrap();
        let head = recovered.head.unwrap();
        assert_eq!(head.seq, 4, "started, 3 records, close checkpoint");
        assert!(head.closed);
        let torn = recovered.set_aside.unwrap();
        assert_eq!(torn.kind, TailKind::Torn);
        assert_eq!(torn.bytes, junk.len() as u64);
        assert_eq!(
            torn.moved_to,
            suffixed(&config.path, "torn-1700000000000000")
        );
        assert_eq!(std::fs::read(&torn.moved_to).unwrap(), junk);
        assert_eq!(std::fs::read(&config.path).unwrap(), before);
    }

    #[test]
    fn whole_invalid_lines_at_the_end_are_moved_aside_as_modified() {
        let dir = tempfile::tempdir().unwrap();
        let config = trail(dir.path(), 1 << 20, 3);
        let before = std::fs::read(&config.path).unwrap();
        let junk = b"{\"seq\":5,\"looks\":\"like a record\"}\n\0\0\0partial";
        append(&config.path, junk);
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let recovered = recover(&config.path, now).unwrap();
        assert_eq!(recovered.head.unwrap().seq, 4);
        let modified = recovered.set_aside.unwrap();
        assert_eq!(modified.kind, TailKind::Modified);
        assert_eq!(
            modified.moved_to,
            suffixed(&config.path, "modified-1700000000000000")
        );
        assert_eq!(std::fs::read(&modified.moved_to).unwrap(), junk);
        assert_eq!(std::fs::read(&config.path).unwrap(), before);
    }

    #[test]
    fn a_changed_last_record_is_moved_aside_as_modified_not_torn() {
        let dir = tempfile::tempdir().unwrap();
        let config = trail(dir.path(), 1 << 20, 3);
        let text = std::fs::read_to_string(&config.path).unwrap();
        let last_start = text[..text.len() - 1].rfind('\n').unwrap() + 1;
        let (kept, last) = text.split_at(last_start);
        assert!(last.contains("\"kind\":\"close\""), "{last}");
        let changed = last.replace("\"kind\":\"close\"", "\"kind\":\"periodic\"");
        std::fs::write(&config.path, format!("{kept}{changed}")).unwrap();
        let recovered = recover(&config.path, SystemTime::now()).unwrap();
        let head = recovered.head.unwrap();
        assert_eq!(head.seq, 3);
        assert!(!head.closed);
        let modified = recovered.set_aside.unwrap();
        assert_eq!(modified.kind, TailKind::Modified);
        assert!(
            modified.moved_to.to_string_lossy().contains(".modified-"),
            "{}",
            modified.moved_to.display()
        );
        assert_eq!(
            std::fs::read_to_string(&modified.moved_to).unwrap(),
            changed
        );
        assert_eq!(std::fs::read_to_string(&config.path).unwrap(), kept);
    }

    #[test]
    fn a_valid_record_that_does_not_chain_on_is_moved_aside_as_modified() {
        let dir = tempfile::tempdir().unwrap();
        let config = trail(dir.path(), 1 << 20, 3);
        let before = std::fs::read_to_string(&config.path).unwrap();
        // An earlier record repeated at the end is self-consistent.
        let copied = format!("{}\n", before.lines().nth(1).unwrap());
        append(&config.path, copied.as_bytes());
        let recovered = recover(&config.path, SystemTime::now()).unwrap();
        let head = recovered.head.unwrap();
        assert_eq!(head.seq, 4);
        assert!(head.closed);
        let modified = recovered.set_aside.unwrap();
        assert_eq!(modified.kind, TailKind::Modified);
        assert_eq!(std::fs::read_to_string(&modified.moved_to).unwrap(), copied);
        assert_eq!(std::fs::read_to_string(&config.path).unwrap(), before);
    }

    #[test]
    fn a_file_that_is_no_trail_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut database = b"SQLite format 3\0\x10\0\x02\x02".to_vec();
        database.extend_from_slice(b"\nsome page\n");
        database.resize(8192, 0);
        for content in [
            &b"just some notes\nsecond line\n"[..],
            b"no newline at all",
            b"{\"not\":\"a record\"}\n",
            &database,
        ] {
            std::fs::write(&path, content).unwrap();
            match recover(&path, SystemTime::now()) {
                Err(AuditError::NotATrail { path: at, bytes }) => {
                    assert_eq!(at, path);
                    assert_eq!(bytes, content.len() as u64);
                }
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("recovered {:?}", String::from_utf8_lossy(content)),
            }
            assert_eq!(std::fs::read(&path).unwrap(), content);
            let names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, ["audit.jsonl"]);
        }
    }

    #[test]
    fn a_first_record_cut_short_is_a_torn_tail_and_zeros_alone_are_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"{\"seq\":0,\"time\":\"2026").unwrap();
        let recovered = recover(&path, SystemTime::now()).unwrap();
        assert!(recovered.head.is_none());
        assert_eq!(recovered.set_aside.unwrap().kind, TailKind::Torn);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let recovered = recover(&path, SystemTime::now()).unwrap();
        assert!(recovered.head.is_none() && recovered.set_aside.is_none());
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn zeroed_space_after_the_last_record_is_cut_and_is_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let config = trail(dir.path(), 1 << 20, 3);
        let before = std::fs::read(&config.path).unwrap();
        append(&config.path, &vec![0u8; 300_000]);
        let recovered = recover(&config.path, SystemTime::now()).unwrap();
        assert_eq!(recovered.head.unwrap().seq, 4);
        assert!(recovered.set_aside.is_none());
        assert_eq!(std::fs::read(&config.path).unwrap(), before);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("torn")), "{names:?}");
    }

    #[test]
    fn a_fragment_before_zeroed_space_is_moved_aside_without_the_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let config = trail(dir.path(), 1 << 20, 3);
        let before = std::fs::read(&config.path).unwrap();
        append(&config.path, b"{\"seq\":5,\"cut sh");
        append(&config.path, &vec![0u8; 4096]);
        let recovered = recover(&config.path, SystemTime::now()).unwrap();
        let torn = recovered.set_aside.unwrap();
        assert_eq!(torn.kind, TailKind::Torn);
        assert_eq!(
            std::fs::read(&torn.moved_to).unwrap(),
            b"{\"seq\":5,\"cut sh"
        );
        assert_eq!(std::fs::read(&config.path).unwrap(), before);
    }

    #[test]
    fn a_rotated_file_with_a_bad_end_refuses_the_start_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = trail(dir.path(), 200, 6);
        // Older files are only read when the newer ones hold no record.
        std::fs::write(&config.path, b"").unwrap();
        let numbers = rotated_numbers(&config.path).unwrap();
        let rotated = rotated_path(&config.path, *numbers.last().unwrap());
        append(&rotated, b"garbage\n");
        let before = std::fs::read(&rotated).unwrap();
        let lines = before.iter().filter(|&&b| b == b'\n').count() as u64;
        let err = recover(&config.path, SystemTime::now()).err().unwrap();
        match err {
            AuditError::Corrupt { path, line, .. } => {
                assert_eq!(path, rotated);
                assert_eq!(line, lines);
            }
            other => panic!("{other}"),
        }
        assert_eq!(std::fs::read(&rotated).unwrap(), before);
    }

    #[test]
    fn an_empty_current_file_continues_from_the_newest_rotated_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = trail(dir.path(), 200, 4);
        let numbers = rotated_numbers(&config.path).unwrap();
        assert!(numbers.len() >= 2);
        // As if writ crashed right after rotating.
        let current = std::fs::read(&config.path).unwrap();
        let last = *numbers.last().unwrap();
        std::fs::write(rotated_path(&config.path, last + 1), &current).unwrap();
        std::fs::write(&config.path, b"").unwrap();
        let recovered = recover(&config.path, SystemTime::now()).unwrap();
        let text = String::from_utf8(current).unwrap();
        let last_line = text.lines().last().unwrap();
        let head = recovered.head.unwrap();
        assert_eq!(head.hash, parse_line(last_line.as_bytes()).unwrap().hash);
        assert_eq!(recovered.next_rotation, last + 2);
        assert!(recovered.set_aside.is_none());
    }
}
