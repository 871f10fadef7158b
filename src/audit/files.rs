//! Where a trail lives on disk: the current file, its rotated predecessors
//! `<path>.1`, `<path>.2`, ... (oldest first), the lock file that marks a
//! live writer, and reading complete lines back from the end of a file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

/// `<path>.<n>`: the n-th file rotated away (1 is the oldest).
pub(crate) fn rotated_path(path: &Path, n: u64) -> PathBuf {
    suffixed(path, &n.to_string())
}

/// Held (flock, exclusive) by the writer for as long as the log is open.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    suffixed(path, "lock")
}

pub(crate) fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Numbers of the rotated files present, ascending.
pub(crate) fn rotated_numbers(path: &Path) -> io::Result<Vec<u64>> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?
        .to_string_lossy()
        .into_owned();
    let prefix = format!("{name}.");
    let mut numbers = Vec::new();
    let entries = match std::fs::read_dir(parent_dir(path)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(numbers),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry_name = entry?.file_name();
        let Some(suffix) = entry_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        // Only plain decimal numbers: not `.lock`, not `.torn-*`.
        if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(n) = suffix.parse::<u64>() {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Every file of the trail at `path`, oldest first: the rotated files in
/// number order, then `path` itself if it exists.
pub fn trail_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_numbers(path)?
        .into_iter()
        .map(|n| rotated_path(path, n))
        .collect();
    if path.exists() {
        files.push(path.to_owned());
    }
    Ok(files)
}

/// The trail's files opened for reading, oldest first, as one consistent
/// snapshot even while the writer rotates: the current file is opened
/// first, then only rotated files older than it are taken (if it has been
/// rotated meanwhile, it shows up among them, and what follows is newer).
pub(crate) fn open_snapshot(path: &Path) -> io::Result<Vec<(PathBuf, File)>> {
    let current = match File::open(path) {
        Ok(file) => Some(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let current_id = match &current {
        Some(file) => {
            let meta = file.metadata()?;
            Some((meta.dev(), meta.ino()))
        }
        None => None,
    };
    let mut files = Vec::new();
    for n in rotated_numbers(path)? {
        let rotated = rotated_path(path, n);
        let file = File::open(&rotated)?;
        let meta = file.metadata()?;
        if Some((meta.dev(), meta.ino())) == current_id {
            break;
        }
        files.push((rotated, file));
    }
    if let Some(file) = current {
        files.push((path.to_owned(), file));
    }
    Ok(files)
}

/// Takes the writer lock of the trail at `path`; see `lock_exclusively`.
pub(crate) fn take_writer_lock(path: &Path) -> io::Result<Option<File>> {
    lock_exclusively(&lock_path(path))
}

/// An exclusive `flock` on the file `lock` (created 0600 if needed), held
/// until the file is dropped or the process ends, however it ends.
/// `Ok(None)`: another process holds it. The trail's writer lock, and the
/// state directory's (`service`), are taken with it.
pub(crate) fn lock_exclusively(lock: &Path) -> io::Result<Option<File>> {
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock)?;
    match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(lock)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether some process holds the writer lock of the trail at `path` now.
pub(crate) fn writer_is_live(path: &Path) -> bool {
    let Ok(lock) = File::open(lock_path(path)) else {
        return false;
    };
    // A shared lock conflicts only with the writer's exclusive one; it is
    // dropped (with the file) straight away so a starting writer never sees it.
    matches!(
        rustix::fs::flock(&lock, FlockOperation::NonBlockingLockShared),
        Err(rustix::io::Errno::WOULDBLOCK)
    )
}

/// The end of a file split into lines.
pub(crate) struct Tail {
    /// Complete lines (without `\n`) with their byte offsets, in file order.
    pub lines: Vec<(u64, Vec<u8>)>,
    /// Bytes after the last `\n`: a torn write, or a line being written.
    pub fragment: Vec<u8>,
    /// Whether `lines` starts at the beginning of the file.
    pub from_start: bool,
}

/// Reads at least the last `min_lines` complete lines of `file` (all of
/// them if the file has fewer), growing the window from 64 KiB.
pub(crate) fn read_tail(file: &File, len: u64, min_lines: usize) -> io::Result<Tail> {
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        let tail = read_window(file, start, len)?;
        if tail.from_start || tail.lines.len() >= min_lines {
            return Ok(tail);
        }
        window = window.saturating_mul(2);
    }
}

fn read_window(file: &File, start: u64, len: u64) -> io::Result<Tail> {
    let size = usize::try_from(len - start)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
    let mut data = vec![0u8; size];
    file.read_exact_at(&mut data, start)?;
    let last_newline = data.iter().rposition(|&b| b == b'\n');
    let (complete, fragment) = match last_newline {
        Some(i) => (&data[..=i], data[i + 1..].to_vec()),
        None => (&data[..0], data.clone()),
    };
    let mut lines = Vec::new();
    let mut offset = start;
    let mut first = true;
    for piece in complete.split_inclusive(|&b| b == b'\n') {
        let line_start = offset;
        offset += piece.len() as u64;
        // The first piece of a window that does not start the file may be
        // the end of a longer line.
        if first && start > 0 {
            first = false;
            continue;
        }
        first = false;
        lines.push((line_start, piece[..piece.len() - 1].to_vec()));
    }
    Ok(Tail {
        lines,
        fragment,
        from_start: start == 0,
    })
}

/// The end of a trail, for `writ audit tail`.
pub struct TrailTail {
    /// Up to the requested number of complete lines, oldest first, taken
    /// from the current file and as many rotated files as needed.
    pub lines: Vec<Vec<u8>>,
    /// The current file, if it exists, positioned for following: reading
    /// it from `resume_at` continues right after the last line returned.
    pub current: Option<File>,
    pub resume_at: u64,
}

/// What reading the trail says of a path where there is none.
pub(crate) const NO_TRAIL: &str = "no audit trail here (neither the file nor rotated files exist)";

/// The last `n` complete lines of the trail at `path`. A path with no trail
/// is an error: nothing to print would not tell a mistyped path from an
/// empty trail.
pub fn tail_lines(path: &Path, n: usize) -> io::Result<TrailTail> {
    let files = trail_files(path)?;
    if files.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, NO_TRAIL));
    }
    let mut current = None;
    let mut resume_at = 0;
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for file_path in files.iter().rev() {
        let is_current = file_path == path;
        let file = File::open(file_path)?;
        let len = records_end(&file, file.metadata()?.len())?;
        let wanted = n.saturating_sub(lines.len());
        let tail = read_tail(&file, len, wanted)?;
        if is_current {
            resume_at = len - tail.fragment.len() as u64;
            current = Some(file);
        }
        let take = tail.lines.len().min(wanted);
        let mut older: Vec<Vec<u8>> = tail.lines[tail.lines.len() - take..]
            .iter()
            .map(|(_, line)| line.clone())
            .collect();
        older.append(&mut lines);
        lines = older;
        if lines.len() >= n {
            break;
        }
    }
    Ok(TrailTail {
        lines,
        current,
        resume_at,
    })
}

/// Where the records of a file end: its length less any run of NUL bytes
/// at the end. The writer keeps zeroed space ready past the last record
/// (see `[audit] preallocate_bytes`), and a record never holds a NUL byte,
/// so that run is space not yet written, not data.
pub(crate) fn records_end(file: &File, len: u64) -> io::Result<u64> {
    const STEP: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = vec![0u8; STEP as usize];
    while end > 0 {
        let start = end.saturating_sub(STEP);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        match chunk.iter().rposition(|&b| b != 0) {
            Some(i) => return Ok(start + i as u64 + 1),
            None => end = start,
        }
    }
    Ok(0)
}

/// fsync of a directory, so a created or renamed entry survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn trail_files_lists_rotated_files_in_number_order_then_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        for name in [
            "audit.jsonl.10",
            "audit.jsonl.2",
            "audit.jsonl.1",
            "audit.jsonl.lock",
            "audit.jsonl.torn-123",
            "audit.jsonl.2.torn-5",
            "audit.jsonlx.3",
            "other.1",
        ] {
            File::create(dir.path().join(name)).unwrap();
        }
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(trail_files(&path).unwrap()),
            ["audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.10"]
        );
        File::create(&path).unwrap();
        assert_eq!(
            names(trail_files(&path).unwrap()).last().unwrap(),
            "audit.jsonl"
        );
    }

    #[test]
    fn tailing_a_path_with_no_trail_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let Err(err) = tail_lines(&path, 10) else {
            panic!("tailing a missing trail succeeded");
        };
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(err.to_string(), NO_TRAIL);
        // A rotated file alone is a trail (the writer is between files).
        std::fs::write(dir.path().join("audit.jsonl.1"), "{}\n").unwrap();
        assert_eq!(tail_lines(&path, 10).unwrap().lines, [b"{}".to_vec()]);
    }

    #[test]
    fn read_tail_returns_whole_lines_and_the_fragment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        let mut expected = Vec::new();
        let mut offset = 0u64;
        for i in 0..20_000u32 {
            let line = format!("line {i} {}", "x".repeat((i % 7) as usize));
            expected.push((offset, line.clone().into_bytes()));
            offset += line.len() as u64 + 1;
            writeln!(f, "{line}").unwrap();
        }
        write!(f, "partial").unwrap();
        drop(f);
        let file = File::open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        let tail = read_tail(&file, len, 3).unwrap();
        assert_eq!(tail.fragment, b"partial");
        assert!(tail.lines.len() >= 3 && !tail.from_start);
        assert_eq!(
            tail.lines[tail.lines.len() - 3..],
            expected[expected.len() - 3..]
        );
        let all = read_tail(&file, len, usize::MAX).unwrap();
        assert!(all.from_start);
        assert_eq!(all.lines, expected);
    }

    #[test]
    fn records_end_skips_a_zeroed_tail_of_any_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for (records, zeros) in [
            (&b""[..], 0usize),
            (b"", 70_000),
            (b"{\"a\":1}\n", 0),
            (b"{\"a\":1}\n", 1),
            (b"{\"a\":1}\n", 64 * 1024),
            (b"{\"a\":1}\n", 200_000),
            (b"{\"a\":1}\n{\"b\"", 5),
        ] {
            let mut bytes = records.to_vec();
            bytes.resize(records.len() + zeros, 0);
            std::fs::write(&path, &bytes).unwrap();
            let file = File::open(&path).unwrap();
            assert_eq!(
                records_end(&file, bytes.len() as u64).unwrap(),
                records.len() as u64,
                "{} record bytes, {zeros} zeros",
                records.len()
            );
        }
    }

    #[test]
    fn the_writer_lock_is_exclusive_and_visible() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        assert!(!writer_is_live(&path));
        let held = take_writer_lock(&path).unwrap().unwrap();
        assert!(writer_is_live(&path));
        assert!(take_writer_lock(&path).unwrap().is_none());
        drop(held);
        assert!(!writer_is_live(&path));
        assert!(take_writer_lock(&path).unwrap().is_some());
    }
}
