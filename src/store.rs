//! Durable state in SQLite (WAL, synchronous=FULL): admin-created entries,
//! tasks, every serial issued for a task, revocations, federated trust
//! bundles, and counters that must only grow (bundle sequence, CRL number). Writes go through one writer thread
//! that commits whatever is queued together, so concurrent issuances share an
//! fsync instead of queueing behind one each.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database commit failed: {0}")]
    Commit(String),
    #[error(
        "SQLite rolled back the transaction after a failed statement; nothing it held was stored"
    )]
    RolledBack,
    #[error("the store's writer has stopped")]
    Closed,
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("backing up the store before migrating its schema: {0}")]
    Backup(String),
}

/// The most jobs one transaction takes; bounds how long any one waits.
const MAX_BATCH: usize = 256;
const SCHEMA_VERSION: i64 = 4;

/// A unit of work for the writer. Given the open transaction (or the reason
/// there is none), it runs its SQL inside its own savepoint and returns
/// whether that succeeded, plus a completion that delivers its result once the
/// batch's commit outcome is known.
type Completion = Box<dyn FnOnce(Option<&StoreError>) + Send>;
type Job = Box<dyn FnOnce(Result<&Connection, &StoreError>) -> (bool, Completion) + Send>;

pub struct Store {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let configured = Connection::open_with_flags(path, flags).and_then(|conn| {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // The first statement to read the file: a damaged one fails here.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit that returned has reached the disk, WAL or not. A
        // revocation or an issued serial must never be lost to a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(conn)
    });
    configured.map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })
}

/// How long the write-ahead log is made at open: what it holds when SQLite
/// checkpoints (1000 frames of a 4 KiB page plus 24 bytes), and a little
/// more. SQLite then writes frames over it from the start again.
const WAL_PRESIZE: u64 = 4608 * 1024;

/// Extends the write-ahead log with zeros up to `WAL_PRESIZE`, so commits
/// write over space the file already has: a commit that grows the file has
/// its size to make durable as well, which on ext4 costs a journal commit
/// on top of the data flush. Bytes past the log's valid frames are ignored
/// by SQLite (it finds the end by checksums, and leaves old frames behind
/// whenever it restarts the log), so zeros there change nothing. The write
/// lock is held meanwhile, so no other connection appends frames.
fn presize_wal(conn: &Connection, db_path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::FileExt;
    let mut wal_path = db_path.as_os_str().to_owned();
    wal_path.push("-wal");
    let wal_path = PathBuf::from(wal_path);
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let extended = (|| -> std::io::Result<()> {
        let wal = match std::fs::OpenOptions::new().write(true).open(&wal_path) {
            Ok(file) => file,
            // SQLite creates it with the first frame; nothing to extend.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let before = wal.metadata()?.len();
        if before >= WAL_PRESIZE {
            return Ok(());
        }
        let zeros = vec![0u8; 256 * 1024];
        let mut at = before;
        let mut grown = Ok(());
        while at < WAL_PRESIZE && grown.is_ok() {
            let n = (WAL_PRESIZE - at).min(zeros.len() as u64) as usize;
            grown = wal.write_all_at(&zeros[..n], at);
            at += n as u64;
        }
        // Zeros written before the disk filled would keep the space the
        // commits and the audit trail need: give it back.
        if let Err(e) = grown {
            return Err(match wal.set_len(before) {
                Ok(()) => e,
                Err(undo) => std::io::Error::new(
                    e.kind(),
                    format!("{e}; cutting it back to {before} bytes failed: {undo}"),
                ),
            });
        }
        wal.sync_data()
    })();
    conn.execute_batch("ROLLBACK")?;
    extended.map_err(|e| StoreError::Commit(format!("{}: {e}", wal_path.display())))
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_connection(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // A damaged file opens (SQLite reads lazily) and fails here first:
        // the error must name it.
        migrate(&conn, path).map_err(|e| match e {
            StoreError::Sql(source) => StoreError::Open {
                path: path.to_owned(),
                source,
            },
            other => other,
        })?;
        if let Err(e) = presize_wal(&conn, path) {
            tracing::warn!(error = %e, "could not give the store's write-ahead log its room in advance; commits will grow it instead (slower until SQLite's first checkpoint)");
        }
        let reader = open_connection(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = std::thread::Builder::new()
            .name("writ-store".into())
            .spawn(move || run_writer(conn, rx))
            .map_err(|e| StoreError::Commit(format!("starting writer thread: {e}")))?;
        Ok(Self {
            path: path.to_owned(),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(reader),
        })
    }

    /// Runs `f` in the next batch and resolves once its transaction has
    /// committed durably (or failed).
    pub async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.start_write(f)?.await
    }

    /// `write`, with the job queued before this returns; the future
    /// resolves once it is committed.
    pub fn start_write<R, F>(
        &self,
        f: F,
    ) -> Result<impl Future<Output = Result<R, StoreError>> + Send + use<R, F>, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel();
        self.submit(f, done_tx)?;
        Ok(async move { done_rx.await.map_err(|_| StoreError::Closed)? })
    }

    /// The blocking twin of `write`, for start-up and shutdown paths.
    pub fn write_blocking<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel();
        self.submit(f, done_tx)?;
        done_rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn submit<R, F>(
        &self,
        f: F,
        done: oneshot::Sender<Result<R, StoreError>>,
    ) -> Result<(), StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => f(conn),
                Err(e) => Err(StoreError::Commit(e.to_string())),
            };
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |commit_error: Option<&StoreError>| {
                let outcome = match (result, commit_error) {
                    (Ok(_), Some(e)) => Err(StoreError::Commit(e.to_string())),
                    (r, _) => r,
                };
                let _ = done.send(outcome);
            });
            (ok, completion)
        });
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.as_ref()
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)
    }

    /// Reads on a separate connection; WAL lets them run beside the writer.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    /// Whether the store still works: the writer thread is running and a
    /// read of a real table answers. Blocks on the reader connection, so
    /// callers on the runtime run it on a blocking thread.
    pub fn check(&self) -> Result<(), StoreError> {
        let writer_running = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|handle| !handle.is_finished());
        let accepting = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if !writer_running || !accepting {
            return Err(StoreError::Closed);
        }
        self.read(|conn| read_counter(conn, "bundle_sequence").map(|_| ()))
    }

    /// Finishes queued writes and stops the writer thread.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn run_writer(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while !batch.is_empty() {
            batch = commit_batch(&mut conn, batch, &jobs);
        }
    }
}

/// Runs `batch` in one transaction and delivers every job's outcome. If
/// SQLite ends the transaction itself partway (it may, on a full disk, an
/// I/O error, or running out of memory), the jobs it took with it are told
/// so and the jobs not yet run are returned, for a transaction of their own.
/// Jobs queued on `more`, before the batch began or while it runs, join it
/// up to `MAX_BATCH`: each would otherwise wait for this commit and then
/// for one of its own.
fn commit_batch(conn: &mut Connection, batch: Vec<Job>, more: &mpsc::Receiver<Job>) -> Vec<Job> {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            let err = StoreError::Sql(e);
            tracing::error!(error = %err, "could not begin a store transaction");
            for job in batch {
                let (_, completion) = job(Err(&err));
                completion(Some(&err));
            }
            return Vec::new();
        }
    };
    let mut completions = Vec::with_capacity(batch.len());
    // Prepared once per connection, not parsed again for every job.
    let run = |sql: &str| tx.prepare_cached(sql).and_then(|mut s| s.execute([]));
    let mut jobs = batch.into_iter();
    let mut taken = jobs.len();
    while let Some(job) = jobs.next().or_else(|| {
        let late = (taken < MAX_BATCH).then(|| more.try_recv().ok()).flatten();
        taken += usize::from(late.is_some());
        late
    }) {
        // Each job in its own savepoint: a failing job rolls back only its
        // own changes, never its batch-mates'.
        if let Err(e) = run("SAVEPOINT job") {
            let err = StoreError::Sql(e);
            let (_, completion) = job(Err(&err));
            completion(Some(&err));
            continue;
        }
        let (ok, completion) = job(Ok(&tx));
        completions.push(completion);
        if tx.is_autocommit() {
            // Without this, the savepoint of the next job would open a new
            // transaction, and its commit would report this one's jobs as
            // stored when SQLite has discarded them.
            let err = StoreError::RolledBack;
            tracing::error!(error = %err, jobs = completions.len(), "store transaction lost");
            for completion in completions {
                completion(Some(&err));
            }
            return jobs.collect();
        }
        let closed = if ok {
            run("RELEASE job")
        } else {
            run("ROLLBACK TO job").and_then(|_| run("RELEASE job"))
        };
        if let Err(e) = closed {
            tracing::error!(error = %e, "closing a savepoint failed");
        }
    }
    let commit_error = tx.commit().err().map(StoreError::Sql);
    if let Some(e) = &commit_error {
        tracing::error!(error = %e, "store commit failed");
    }
    for completion in completions {
        completion(commit_error.as_ref());
    }
    Vec::new()
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this writ understands ({SCHEMA_VERSION})"
        )));
    }
    if version > 0 && version < SCHEMA_VERSION {
        // The older writ refuses a migrated store: without this copy,
        // going back to it after an upgrade means starting over.
        let backup = back_up_before_migrating(conn, path, version)?;
        tracing::warn!(
            backup = %backup.display(),
            from = version,
            to = SCHEMA_VERSION,
            "migrating the store's schema; a copy of it as it was is kept: restoring it (with the older writ) returns to that writ, but loses every task, issuance and revocation recorded since"
        );
    }
    if version < 1 {
        conn.execute_batch(
            r#"
            BEGIN;
            CREATE TABLE meta (
                key   TEXT PRIMARY KEY,
                value INTEGER NOT NULL
            );
            CREATE TABLE entries (
                id             TEXT PRIMARY KEY,
                spiffe_id      TEXT NOT NULL,
                selectors      TEXT NOT NULL,
                x509_svid_ttl  INTEGER NOT NULL,
                dns_names      TEXT NOT NULL,
                hint           TEXT NOT NULL,
                federates_with TEXT NOT NULL,
                created_at     INTEGER NOT NULL
            );
            CREATE TABLE tasks (
                task_id           TEXT PRIMARY KEY,
                spiffe_id         TEXT NOT NULL,
                parent_task_id    TEXT REFERENCES tasks(task_id),
                record            TEXT NOT NULL,
                created_at        INTEGER NOT NULL,
                expires_at        INTEGER NOT NULL,
                completed_at      INTEGER,
                completion_reason TEXT,
                completion_detail TEXT
            );
            CREATE INDEX tasks_active ON tasks(completed_at) WHERE completed_at IS NULL;
            CREATE TABLE issued (
                serial        BLOB PRIMARY KEY,
                task_id       TEXT REFERENCES tasks(task_id),
                issuer_key_id BLOB NOT NULL,
                spiffe_id     TEXT NOT NULL,
                not_after     INTEGER NOT NULL,
                issued_at     INTEGER NOT NULL
            );
            CREATE INDEX issued_by_task ON issued(task_id);
            CREATE TABLE revocations (
                serial        BLOB PRIMARY KEY,
                issuer_key_id BLOB NOT NULL,
                not_after     INTEGER NOT NULL,
                revoked_at    INTEGER NOT NULL,
                task_id       TEXT,
                reason        TEXT NOT NULL
            );
            PRAGMA user_version = 1;
            COMMIT;
            "#,
        )?;
    }
    if version < 2 {
        // Bundles of other trust domains, one row each, stored as the SPIFFE
        // bundle document they were parsed from (it round-trips exactly).
        conn.execute_batch(
            r#"
            BEGIN;
            CREATE TABLE federated_bundles (
                trust_domain TEXT PRIMARY KEY,
                spiffe_json  BLOB NOT NULL,
                source       TEXT NOT NULL,
                updated_at   INTEGER NOT NULL
            );
            PRAGMA user_version = 2;
            COMMIT;
            "#,
        )?;
    }
    if version < 3 {
        // Sub-tasks by parent. Deleting a task makes SQLite look for rows
        // whose parent_task_id names it (the foreign key); without an index
        // that is a scan of every task per deleted row. Partial: top-level
        // tasks (most of them) add nothing to it.
        conn.execute_batch(
            r#"
            BEGIN;
            CREATE INDEX tasks_by_parent ON tasks(parent_task_id)
                WHERE parent_task_id IS NOT NULL;
            PRAGMA user_version = 3;
            COMMIT;
            "#,
        )?;
    }
    if version < 4 {
        // Active tasks by SPIFFE ID: a task begins only if no active task
        // holds its ID or an ID above it outside its own lineage, looked
        // up once per path segment in the writer's transaction. Partial:
        // a completed task leaves it, and only active tasks are asked for.
        conn.execute_batch(
            r#"
            BEGIN;
            CREATE INDEX tasks_active_by_spiffe_id ON tasks(spiffe_id)
                WHERE completed_at IS NULL;
            PRAGMA user_version = 4;
            COMMIT;
            "#,
        )?;
    }
    Ok(())
}

/// Writes a consistent copy of the store at `path` (schema `version`) to
/// `<path>.schema-<version>.bak`, or `<path>.schema-<version>.<n>.bak` when
/// that exists: an earlier backup may be the only way back, and is never
/// overwritten. Returns where the copy is.
fn back_up_before_migrating(
    conn: &Connection,
    path: &Path,
    version: i64,
) -> Result<PathBuf, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |backup: &Path, e: &dyn std::fmt::Display| {
        StoreError::Backup(format!(
            "{}: {e}; the store was not migrated",
            backup.display()
        ))
    };
    let name = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(match n {
            0 => format!(".schema-{version}.bak"),
            n => format!(".schema-{version}.{n}.bak"),
        });
        PathBuf::from(name)
    };
    // Created here, empty and 0600 (VACUUM INTO accepts an empty file): the
    // copy holds what the store does, and `create_new` never takes over an
    // existing file.
    let mut n = 0;
    let (backup, file) = loop {
        let backup = name(n);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&backup)
        {
            Ok(file) => break (backup, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(failed(&backup, &e)),
        }
    };
    let copied = (|| -> Result<(), String> {
        let target = backup
            .to_str()
            .ok_or_else(|| "the path is not UTF-8, which SQLite needs".to_owned())?;
        conn.execute("VACUUM INTO ?1", [target])
            .map_err(|e| e.to_string())?;
        // VACUUM INTO does not sync what it wrote.
        file.sync_all().map_err(|e| e.to_string())?;
        let dir = backup
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| e.to_string())
    })();
    if let Err(e) = copied {
        // A partial copy must not pass for a backup.
        let _ = std::fs::remove_file(&backup);
        return Err(failed(&backup, &e));
    }
    Ok(backup)
}

/// What one `prune` removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub revocations: usize,
    pub issued: usize,
    pub tasks: usize,
}

impl Pruned {
    pub fn total(&self) -> usize {
        self.revocations + self.issued + self.tasks
    }
}

/// Where `prune` keeps the longest `[ca] jwt_svid_ttl` (seconds) writ has
/// run with.
const LONGEST_JWT_SVID_TTL: &str = "longest_jwt_svid_ttl_secs";

/// Removes up to `limit` rows of each kind that nothing needs any more:
/// - revocations of certificates expired by `now` (a CRL lists only
///   unexpired ones, and restart loads only those);
/// - issued serials of certificates expired by `now` (revoking an expired
///   certificate changes nothing);
/// - tasks completed at or before `completed_before`, once none of their
///   serials and none of their sub-tasks is left, and once no JWT-SVID
///   minted for them validates any more: a token ends `jwt_svid_ttl` after
///   it was minted (before completion) or at the task's deadline,
///   whichever is sooner, and validators accept it `jwt::CLOCK_SKEW` past
///   that. Until then the task's id must stay taken: a token names its
///   task by id, and a new task of the same id would make it valid again.
///   The TTL is the longest any run has minted with (`jwt_svid_ttl`, this
///   run's, is recorded first): one shortened across a restart leaves
///   longer tokens out there.
///   A sub-task still names its parent (a foreign key), so parents go in
///   a later call than their last sub-task: callers repeat while tasks are
///   removed.
///
/// `now` must not run ahead of the time really elapsed (`Agent::pruning_now`):
/// a row removed for a certificate still valid in truth is lost for good.
///
/// Active tasks are never touched. Rows are taken oldest first (rowid
/// order is insertion order), so each call's work is bounded by `limit`
/// plus the newer rows it must step over.
pub fn prune(
    conn: &Connection,
    now: i64,
    completed_before: i64,
    jwt_svid_ttl: Duration,
    limit: usize,
) -> Result<Pruned, StoreError> {
    raise_counter(conn, LONGEST_JWT_SVID_TTL, jwt_svid_ttl.as_secs())?;
    let jwt_svid_ttl = i64::try_from(read_counter(conn, LONGEST_JWT_SVID_TTL)?).unwrap_or(i64::MAX);
    let tokens_validated_before =
        now.saturating_sub(i64::try_from(crate::jwt::CLOCK_SKEW.as_secs()).unwrap_or(0));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let revocations = conn
        .prepare_cached(
            "DELETE FROM revocations WHERE rowid IN
             (SELECT rowid FROM revocations WHERE not_after <= ?1 ORDER BY rowid LIMIT ?2)",
        )?
        .execute(params![now, limit])?;
    let issued = conn
        .prepare_cached(
            "DELETE FROM issued WHERE rowid IN
             (SELECT rowid FROM issued WHERE not_after <= ?1 ORDER BY rowid LIMIT ?2)",
        )?
        .execute(params![now, limit])?;
    let tasks = conn
        .prepare_cached(
            "DELETE FROM tasks WHERE rowid IN
             (SELECT t.rowid FROM tasks t
              WHERE t.completed_at IS NOT NULL AND t.completed_at <= ?1
                AND MIN(t.completed_at + ?3, t.expires_at) <= ?4
                AND NOT EXISTS (SELECT 1 FROM issued i WHERE i.task_id = t.task_id)
                AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_task_id = t.task_id)
              ORDER BY t.rowid LIMIT ?2)",
        )?
        .execute(params![
            completed_before,
            limit,
            jwt_svid_ttl,
            tokens_validated_before
        ])?;
    Ok(Pruned {
        revocations,
        issued,
        tasks,
    })
}

/// Increments a monotonic counter and returns the new value.
pub fn bump_counter(conn: &Connection, key: &str) -> Result<u64, StoreError> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1",
        params![key],
    )?;
    read_counter(conn, key)
}

/// Sets a counter to `value` unless it is already higher.
pub fn raise_counter(conn: &Connection, key: &str, value: u64) -> Result<(), StoreError> {
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = max(value, ?2)",
        params![key, value],
    )?;
    Ok(())
}

/// Whether `task_id` is stored and not completed. Writers that must not
/// race a completion (a serial issued for the task, a sub-task begun under
/// it) ask inside their own transaction, in the store's one writer.
pub fn task_is_active(conn: &Connection, task_id: &str) -> Result<bool, StoreError> {
    let completed_at: Option<Option<i64>> = conn
        .query_row(
            "SELECT completed_at FROM tasks WHERE task_id = ?1",
            params![task_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(matches!(completed_at, Some(None)))
}

/// This boot of the machine, as the store records it: the first 8 bytes of
/// the kernel's boot id (random, new at every boot). None if unreadable.
pub fn current_boot() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = text.trim().chars().filter(|c| *c != '-').take(16).collect();
    u64::from_str_radix(&hex, 16)
        .ok()
        .map(|v| i64::from_ne_bytes(v.to_ne_bytes()))
}

/// When the kernel booted (`btime` in /proc/stat, whole seconds, by the
/// wall clock), if it can be read.
pub fn boot_time() -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))
}

/// The boot the stored tasks were begun in, if one was recorded.
pub fn recorded_boot(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = 'boot'", [], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Records `boot` as the one the stored tasks belong to.
pub fn record_boot(conn: &Connection, boot: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('boot', ?1) ON CONFLICT(key) DO UPDATE SET value = ?1",
        params![boot],
    )?;
    Ok(())
}

pub fn read_counter(conn: &Connection, key: &str) -> Result<u64, StoreError> {
    let v: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.unwrap_or(0).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_store_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writ.db");
        let mut damaged = b"SQLite format 3\0".to_vec();
        damaged.resize(8192, 0x5a);
        std::fs::write(&path, &damaged).unwrap();
        let err = match Store::open(&path) {
            Ok(_) => panic!("a damaged store opened"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            damaged,
            "the file was changed"
        );
    }

    fn insert_k(c: &Connection, i: i64) -> Result<(), StoreError> {
        c.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)",
            params![format!("k{i}"), i],
        )?;
        Ok(())
    }

    /// Rows the tests wrote into `meta` (keys `k<n>`).
    fn k_rows(store: &Store) -> i64 {
        store
            .read(|c| {
                Ok(
                    c.query_row("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                        r.get(0)
                    })?,
                )
            })
            .unwrap()
    }

    fn wal_of(db: &Path) -> PathBuf {
        PathBuf::from(format!("{}-wal", db.display()))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_log_has_its_room_at_open_and_commits_within_it_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("w.db");
        let store = Store::open(&db).unwrap();
        assert!(std::fs::metadata(wal_of(&db)).unwrap().len() >= WAL_PRESIZE);
        for i in 0..50 {
            store.write(move |c| insert_k(c, i)).await.unwrap();
        }
        // The commits wrote over the zeros instead of growing the file.
        assert_eq!(std::fs::metadata(wal_of(&db)).unwrap().len(), WAL_PRESIZE);
        // What a crash leaves: the database and its log as they are now,
        // frames followed by zeros, never checkpointed.
        let copy = tempfile::tempdir().unwrap();
        let copied = copy.path().join("w.db");
        std::fs::copy(&db, &copied).unwrap();
        std::fs::copy(wal_of(&db), wal_of(&copied)).unwrap();
        let recovered = Store::open(&copied).unwrap();
        assert_eq!(k_rows(&recovered), 50);
        recovered.close();
        store.close();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_job_queued_while_a_batch_runs_joins_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(&dir.path().join("w.db")).unwrap());
        let (queued_tx, queued_rx) = std::sync::mpsc::channel();
        let inner = store.clone();
        let first = store
            .start_write(move |c| {
                insert_k(c, 1)?;
                let outside = inner.clone();
                let second = inner.start_write(move |c| {
                    insert_k(c, 2)?;
                    // Another connection sees only what was committed.
                    outside.read(|r| {
                        Ok(
                            r.query_row("SELECT COUNT(*) FROM meta WHERE key = 'k1'", [], |row| {
                                row.get::<_, i64>(0)
                            })?,
                        )
                    })
                })?;
                queued_tx.send(second).unwrap();
                Ok(())
            })
            .unwrap();
        first.await.unwrap();
        let second = queued_rx.recv().unwrap();
        assert_eq!(
            second.await.unwrap(),
            0,
            "the first job was still uncommitted when the second ran: one transaction"
        );
        assert_eq!(k_rows(&store), 2);
        store.close();
    }

    #[test]
    fn check_answers_while_open_and_fails_once_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("w.db")).unwrap();
        store.check().unwrap();
        store.close();
        assert!(matches!(store.check(), Err(StoreError::Closed)));
    }

    /// SQLite rolls back the whole transaction on some errors (a full disk,
    /// I/O errors); a job that ends it stands in for one. The jobs before it
    /// in its batch are told their writes were lost, the ones after it are
    /// committed on their own.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_transaction_sqlite_rolled_back_reports_its_jobs_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("w.db")).unwrap();
        // Hold the writer so that the next three jobs join its batch.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = store
            .start_write(move |_| {
                let _ = held_tx.send(());
                let _ = release_rx.recv();
                Ok(())
            })
            .unwrap();
        held_rx.recv().unwrap();
        let insert = |key: &'static str| {
            move |c: &Connection| {
                c.execute("INSERT INTO meta(key, value) VALUES (?1, 1)", [key])?;
                Ok(())
            }
        };
        let before = store.start_write(insert("before")).unwrap();
        let lost = store
            .start_write(|c| {
                c.execute("INSERT INTO meta(key, value) VALUES ('lost', 1)", [])?;
                c.execute_batch("ROLLBACK")?;
                Ok(())
            })
            .unwrap();
        let after = store.start_write(insert("after")).unwrap();
        release_tx.send(()).unwrap();
        let (holder, before, lost, after) = tokio::join!(holder, before, lost, after);
        for (name, outcome) in [("holder", holder), ("before", before), ("lost", lost)] {
            let e = outcome.expect_err(name);
            assert!(e.to_string().contains("rolled back"), "{name}: {e}");
        }
        after.unwrap();
        let keys: Vec<String> = store
            .read(|c| {
                let mut s = c.prepare(
                    "SELECT key FROM meta WHERE key IN ('before', 'lost', 'after') ORDER BY key",
                )?;
                Ok(s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
            })
            .unwrap();
        assert_eq!(keys, vec!["after".to_string()]);
        store.close();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_job_rolls_back_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("w.db")).unwrap();
        let ok = store.write(|c| {
            c.execute("INSERT INTO meta(key, value) VALUES ('a', 1)", [])?;
            Ok(())
        });
        let bad = store.write(|c| {
            c.execute("INSERT INTO meta(key, value) VALUES ('b', 1)", [])?;
            // The same key again violates the primary key: this job fails.
            c.execute("INSERT INTO meta(key, value) VALUES ('b', 2)", [])?;
            Ok(())
        });
        let (ok, bad) = tokio::join!(ok, bad);
        ok.unwrap();
        assert!(bad.is_err());
        let keys: Vec<String> = store
            .read(|c| {
                let mut s = c.prepare("SELECT key FROM meta ORDER BY key")?;
                Ok(s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
            })
            .unwrap();
        assert_eq!(keys, vec!["a".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_writes_all_commit_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        {
            let store = std::sync::Arc::new(Store::open(&path).unwrap());
            let mut joins = Vec::new();
            for i in 0..200 {
                let store = store.clone();
                joins.push(tokio::spawn(async move {
                    store
                        .write(move |c| {
                            insert_k(c, i)?;
                            bump_counter(c, "n")
                        })
                        .await
                }));
            }
            let mut seen = Vec::new();
            for j in joins {
                seen.push(j.await.unwrap().unwrap());
            }
            seen.sort();
            // Every increment got its own value: no lost updates.
            assert_eq!(seen, (1..=200).collect::<Vec<u64>>());
            store.close();
        }
        let store = Store::open(&path).unwrap();
        let n = store.read(|c| read_counter(c, "n")).unwrap();
        assert_eq!(n, 200);
        assert_eq!(k_rows(&store), 200);
    }

    /// Leaves at `path` exactly what a version-1 writ left behind, with the
    /// bundle sequence at 2.
    fn make_version_1_store(path: &Path) {
        let store = Store::open(path).unwrap();
        store
            .write_blocking(|c| {
                bump_counter(c, "bundle_sequence")?;
                bump_counter(c, "bundle_sequence")?;
                Ok(())
            })
            .unwrap();
        store.close();
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "DROP TABLE federated_bundles; DROP INDEX tasks_by_parent;
             DROP INDEX tasks_active_by_spiffe_id; PRAGMA user_version = 1;",
        )
        .unwrap();
    }

    /// A migrated store cannot be opened by the older writ again: a copy
    /// as it was is kept beside it, and an earlier copy of the same name
    /// is never overwritten.
    #[test]
    fn migrating_an_older_schema_keeps_a_backup_of_it_first() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        make_version_1_store(&path);
        Store::open(&path).unwrap().close();
        let backup = dir.path().join("w.db.schema-1.bak");
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let conn = Connection::open(&backup).unwrap();
        let (version, sequence): (i64, u64) = (
            conn.pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap(),
            read_counter(&conn, "bundle_sequence").unwrap(),
        );
        assert_eq!((version, sequence), (1, 2));
        drop(conn);
        let first = std::fs::read(&backup).unwrap();

        // Opening the current schema copies nothing.
        Store::open(&path).unwrap().close();
        assert!(!dir.path().join("w.db.schema-1.1.bak").exists());

        // Back to version 1 and migrated again: the first copy stays.
        std::fs::remove_file(&path).unwrap();
        make_version_1_store(&path);
        Store::open(&path).unwrap().close();
        assert_eq!(std::fs::read(&backup).unwrap(), first);
        let second = dir.path().join("w.db.schema-1.1.bak");
        let conn = Connection::open(&second).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1);
    }

    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        make_version_1_store(&path);
        let store = Store::open(&path).unwrap();
        let (version, sequence, rows, indexes): (i64, u64, i64, i64) = store
            .read(|c| {
                Ok((
                    c.pragma_query_value(None, "user_version", |r| r.get(0))?,
                    read_counter(c, "bundle_sequence")?,
                    c.query_row("SELECT COUNT(*) FROM federated_bundles", [], |r| r.get(0))?,
                    c.query_row(
                        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index'
                         AND name IN ('tasks_by_parent', 'tasks_active_by_spiffe_id')",
                        [],
                        |r| r.get(0),
                    )?,
                ))
            })
            .unwrap();
        assert_eq!(
            (version, sequence, rows, indexes),
            (SCHEMA_VERSION, 2, 0, 2)
        );
    }

    fn add_task(c: &Connection, id: &str, parent: Option<&str>, completed_at: Option<i64>) {
        c.execute(
            "INSERT INTO tasks(task_id, spiffe_id, parent_task_id, record, created_at, expires_at, completed_at)
             VALUES (?1, 'spiffe://t/x', ?2, '{}', 0, 10000, ?3)",
            params![id, parent, completed_at],
        )
        .unwrap();
    }

    fn add_serial(c: &Connection, serial: u8, task: &str, not_after: i64) {
        c.execute(
            "INSERT INTO issued(serial, task_id, issuer_key_id, spiffe_id, not_after, issued_at)
             VALUES (?1, ?2, x'01', 'spiffe://t/x', ?3, 0)",
            params![vec![serial], task, not_after],
        )
        .unwrap();
        c.execute(
            "INSERT INTO revocations(serial, issuer_key_id, not_after, revoked_at, task_id, reason)
             VALUES (?1, x'01', ?2, 0, ?3, 'test')",
            params![vec![serial], not_after, task],
        )
        .unwrap();
    }

    fn ids(c: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = c.prepare(sql).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Expired serials and revocations go; completed tasks go once past the
    /// retention, unless a serial of theirs is unexpired or a sub-task of
    /// theirs is kept; active tasks stay whatever their age.
    #[test]
    fn pruning_keeps_what_is_still_needed_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("w.db")).unwrap();
        let pruned = store
            .write_blocking(|c| {
                add_task(c, "old-done", None, Some(100));
                add_task(c, "recent-done", None, Some(900));
                add_task(c, "active", None, None);
                add_task(c, "parent-kept", None, Some(100));
                add_task(c, "child-recent", Some("parent-kept"), Some(950));
                add_task(c, "parent-gone", None, Some(100));
                add_task(c, "child-gone", Some("parent-gone"), Some(100));
                add_task(c, "revoked-unexpired", None, Some(100));
                add_serial(c, 1, "old-done", 500);
                add_serial(c, 2, "revoked-unexpired", 2000);
                add_serial(c, 3, "active", 700);
                Ok((
                    prune(c, 1000, 200, Duration::ZERO, 1000)?,
                    prune(c, 1000, 200, Duration::ZERO, 1000)?,
                ))
            })
            .unwrap();
        // child-gone goes first; parent-gone once it has no sub-task left.
        assert_eq!(
            pruned,
            (
                Pruned {
                    revocations: 2,
                    issued: 2,
                    tasks: 2
                },
                Pruned {
                    revocations: 0,
                    issued: 0,
                    tasks: 1
                }
            )
        );
        store
            .read(|c| {
                assert_eq!(
                    ids(c, "SELECT task_id FROM tasks ORDER BY task_id"),
                    [
                        "active",
                        "child-recent",
                        "parent-kept",
                        "recent-done",
                        "revoked-unexpired"
                    ]
                );
                assert_eq!(ids(c, "SELECT hex(serial) FROM issued"), ["02"]);
                assert_eq!(ids(c, "SELECT hex(serial) FROM revocations"), ["02"]);
                Ok(())
            })
            .unwrap();
    }

    /// A parent is pruned only once no sub-task of it is left in the store:
    /// one kept for its unexpired serial, or one beyond this call's limit,
    /// still names it (a foreign key), and deleting the parent under it
    /// would fail the whole prune, every time it ran.
    #[test]
    fn pruning_never_removes_a_parent_before_its_sub_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("w.db")).unwrap();
        let passes = store
            .write_blocking(|c| {
                add_task(c, "parent", None, Some(100));
                add_task(c, "child-with-valid-serial", Some("parent"), Some(100));
                add_serial(c, 1, "child-with-valid-serial", 2000);
                add_task(c, "parent-2", None, Some(100));
                add_task(c, "child-2", Some("parent-2"), Some(100));
                let mut passes = Vec::new();
                for _ in 0..3 {
                    passes.push(prune(c, 1000, 200, Duration::ZERO, 1)?.tasks);
                }
                Ok(passes)
            })
            .unwrap();
        // child-2 first (its parent waits for it), then parent-2, then
        // nothing: parent stays under its child with a valid certificate.
        assert_eq!(passes, [1, 1, 0]);
        store
            .read(|c| {
                assert_eq!(
                    ids(c, "SELECT task_id FROM tasks ORDER BY task_id"),
                    ["child-with-valid-serial", "parent"]
                );
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn pruning_takes_at_most_its_limit_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("w.db")).unwrap();
        let (first, second) = store
            .write_blocking(|c| {
                add_task(c, "t", None, Some(100));
                for serial in 1..=5 {
                    add_serial(c, serial, "t", 500);
                }
                Ok((
                    prune(c, 1000, 0, Duration::ZERO, 2)?,
                    prune(c, 1000, 1000, Duration::ZERO, 10)?,
                ))
            })
            .unwrap();
        assert_eq!(
            first,
            Pruned {
                revocations: 2,
                issued: 2,
                tasks: 0
            }
        );
        assert_eq!(
            second,
            Pruned {
                revocations: 3,
                issued: 3,
                tasks: 1
            }
        );
    }

    #[test]
    fn a_newer_schema_is_refused_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("newer"), "{err}");
    }
}
