//! The writing side: `AuditLog` hands events to one writer thread, which
//! serializes and chains them, appends whatever is queued as one write with
//! one fdatasync (group commit), answers each caller only after that, adds
//! signed checkpoints, and rotates the file by size. It keeps zeroed space
//! ready past the last record so that a commit overwrites blocks the file
//! already has: its fdatasync then has no new file size to commit, which on
//! ext4 spares a journal commit per batch.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::sync::oneshot;

use super::files::{self, rotated_path, sync_dir, take_writer_lock};
use super::record::{
    CheckpointFacts, CheckpointKind, RecordBody, ZERO_HASH, checkpoint_message, encode_line,
    format_time,
};
use super::recover::{Recovered, recover};
use super::{AuditError, AuditEvent, CheckpointSigner, EventKind};
use crate::config::AuditConfig;

/// Where record times come from; tests pass a controllable one.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Proof that a record is on disk: its place and hash in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReceipt {
    pub seq: u64,
    pub hash: String,
}

/// The most jobs one write takes; bounds how long any one waits.
const MAX_BATCH: usize = 512;
/// After the signer fails, automatic checkpoints wait at most this long
/// before trying again (or `checkpoint_interval`, if shorter).
const SIGNER_RETRY: Duration = Duration::from_secs(30);

enum Job {
    Append {
        event: Box<AuditEvent>,
        reply: oneshot::Sender<Result<AuditReceipt, AuditError>>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<(), AuditError>>,
    },
}

/// The audit trail, open for appending. Share it as `Arc<AuditLog>`.
pub struct AuditLog {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Why the writer gave up, once it has (shared with the writer thread).
    failed: Arc<std::sync::OnceLock<String>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or continues) the trail at `config.path` with the system
    /// clock. See [`AuditLog::open_with_clock`].
    pub fn open(
        config: &AuditConfig,
        signer: Arc<dyn CheckpointSigner>,
    ) -> Result<Arc<Self>, AuditError> {
        Self::open_with_clock(config, signer, Arc::new(SystemTime::now))
    }

    /// Opens (or continues) the trail: takes the writer lock (a second
    /// writer is refused), continues the chain from the last complete
    /// record, moves a torn tail aside, writes an `audit_started` record
    /// saying how the previous run ended, and starts the writer thread.
    pub fn open_with_clock(
        config: &AuditConfig,
        signer: Arc<dyn CheckpointSigner>,
        clock: Clock,
    ) -> Result<Arc<Self>, AuditError> {
        let path = config.path.clone();
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| AuditError::Io { path, source }
        };
        let dir = files::parent_dir(&path).to_owned();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let lock = take_writer_lock(&path)
            .map_err(io_err(&files::lock_path(&path)))?
            .ok_or_else(|| AuditError::Locked {
                path: path.clone(),
                lock: files::lock_path(&path),
            })?;

        let now = clock();
        let Recovered {
            head,
            torn,
            next_rotation,
        } = recover(&path, now)?;
        // `recover` left the current file ending on its last record.
        let (file, file_len) = open_current(&path, &dir)?;

        let mut started = AuditEvent::new(EventKind::AuditStarted, correlation_id())
            .detail("writ_version", env!("CARGO_PKG_VERSION"))
            .detail("pid", std::process::id());
        // Bytes after the close checkpoint mean it was not the end.
        let clean = head.as_ref().is_some_and(|h| h.closed) && torn.is_none();
        started = match &head {
            None if torn.is_none() => started.detail("previous_end", "none"),
            _ if clean => started.detail("previous_end", "clean"),
            _ => started
                .detail("previous_end", "unclean")
                .reason("the previous run did not end with a close checkpoint: writ stopped without closing the trail, or records were removed from its end"),
        };
        if let Some(h) = head.as_ref().filter(|_| !clean) {
            started = started.detail("previous_seq", h.seq);
        }
        if let Some(torn) = &torn {
            started = started
                .detail("torn_tail_moved_to", torn.moved_to.display().to_string())
                .detail("torn_tail_bytes", torn.bytes);
        }

        let mut writer = Writer {
            path: path.clone(),
            dir,
            max_file_bytes: config.max_file_bytes.max(1),
            checkpoint_every: config.checkpoint_every.max(1),
            checkpoint_interval: config.checkpoint_interval.max(Duration::from_millis(1)),
            signer,
            clock,
            file,
            file_len,
            allocated: file_len,
            preallocate: config.preallocate_bytes,
            next_rotation,
            chain: ChainState {
                next_seq: head.as_ref().map_or(0, |h| h.seq + 1),
                head: head.map_or_else(|| ZERO_HASH.to_owned(), |h| h.hash),
                since_checkpoint: 0,
                last_checkpoint_at: now,
            },
            checkpoint_retry_at: now,
            poisoned: None,
            buf: Vec::with_capacity(64 * 1024),
            failed: Arc::new(std::sync::OnceLock::new()),
            _lock: lock,
        };
        let failed = writer.failed.clone();
        let saved = writer.chain.clone();
        writer.buf.clear();
        writer
            .push_record(&started, None)
            .map_err(AuditError::Write)?;
        writer.commit(&saved)?;
        writer.keep_space_ready();

        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("writ-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Write(format!("starting the audit writer thread: {e}")))?;
        Ok(Arc::new(Self {
            path,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            failed,
        }))
    }

    /// Whether records can still be appended: the trail is open, its
    /// writer thread runs, and no failed fsync has stopped it.
    pub fn check(&self) -> Result<(), AuditError> {
        if let Some(reason) = self.failed.get() {
            return Err(AuditError::Poisoned(reason.clone()));
        }
        let accepting = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        let writer_running = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|handle| !handle.is_finished());
        if accepting && writer_running {
            Ok(())
        } else {
            Err(AuditError::Closed)
        }
    }

    /// The current file of the trail.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` and resolves once it is on disk (fdatasync), sharing
    /// the sync with whatever else is queued. On error the caller must fail
    /// the operation being audited. Dropping the future does not withdraw
    /// the record.
    pub async fn append(&self, event: AuditEvent) -> Result<AuditReceipt, AuditError> {
        self.start_append(event)?.await
    }

    /// `append`, with the record queued before this returns: the writer
    /// can be syncing it while the caller does other work, and the future
    /// resolves once it is on disk.
    ///
    /// It yields the CPU once after queuing: the scheduler tends to wake the
    /// writer thread on the waking CPU, where it would otherwise wait for
    /// the caller's work to finish, and the overlap would be lost (measured
    /// in the `policy_audit` bench).
    pub fn start_append(
        &self,
        event: AuditEvent,
    ) -> Result<impl Future<Output = Result<AuditReceipt, AuditError>> + Send + use<>, AuditError>
    {
        let (reply, done) = oneshot::channel();
        self.submit(Job::Append {
            event: Box::new(event),
            reply,
        })?;
        std::thread::yield_now();
        Ok(async move { done.await.map_err(|_| AuditError::Closed)? })
    }

    /// Appends several records in the order given, as one group (the
    /// writer commits what it has queued together), and returns each
    /// outcome once all are on disk.
    pub async fn append_all(
        &self,
        events: Vec<AuditEvent>,
    ) -> Vec<Result<AuditReceipt, AuditError>> {
        let queued: Vec<_> = events
            .into_iter()
            .map(|event| {
                let (reply, done) = oneshot::channel();
                self.submit(Job::Append {
                    event: Box::new(event),
                    reply,
                })
                .map(|()| done)
            })
            .collect();
        let mut outcomes = Vec::with_capacity(queued.len());
        for waiting in queued {
            outcomes.push(match waiting {
                Ok(done) => done.await.unwrap_or(Err(AuditError::Closed)),
                Err(e) => Err(e),
            });
        }
        outcomes
    }

    /// The blocking twin of `append`, for threads outside the async runtime.
    pub fn append_blocking(&self, event: AuditEvent) -> Result<AuditReceipt, AuditError> {
        let (reply, done) = oneshot::channel();
        self.submit(Job::Append {
            event: Box::new(event),
            reply,
        })?;
        futures::executor::block_on(done).map_err(|_| AuditError::Closed)?
    }

    /// Writes a signed checkpoint now and returns once it is on disk
    /// (blocking). Checkpoints are also written every `checkpoint_every`
    /// records, after `checkpoint_interval`, and on close.
    pub fn checkpoint(&self) -> Result<(), AuditError> {
        let (reply, done) = oneshot::channel();
        self.submit(Job::Checkpoint { reply })?;
        futures::executor::block_on(done).map_err(|_| AuditError::Closed)?
    }

    /// `checkpoint` for async callers.
    pub async fn checkpoint_async(&self) -> Result<(), AuditError> {
        let (reply, done) = oneshot::channel();
        self.submit(Job::Checkpoint { reply })?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    fn submit(&self, job: Job) -> Result<(), AuditError> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.as_ref()
            .ok_or(AuditError::Closed)?
            .send(job)
            .map_err(|_| AuditError::Closed)
    }

    /// Writes what is queued, then a close checkpoint (the marker of a
    /// clean end), and stops the writer. Later appends fail with `Closed`.
    /// Blocks until done; calling it again does nothing.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn correlation_id() -> String {
    ulid::Ulid::new().to_string()
}

/// Opens (creating, 0600) the current file for writing at its end.
fn open_current(path: &Path, dir: &Path) -> Result<(File, u64), AuditError> {
    let io_err = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let existed = path.exists();
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_err)?;
    if !existed {
        sync_dir(dir).map_err(io_err)?;
    }
    let len = file.metadata().map_err(io_err)?.len();
    Ok((file, len))
}

/// The chain as of the last record written; saved before a batch so a
/// failed write can be taken back.
#[derive(Clone)]
struct ChainState {
    next_seq: u64,
    head: String,
    since_checkpoint: u64,
    last_checkpoint_at: SystemTime,
}

/// A reply owed once the batch is durable.
enum Pending {
    Append(
        oneshot::Sender<Result<AuditReceipt, AuditError>>,
        AuditReceipt,
    ),
    Checkpoint(oneshot::Sender<Result<(), AuditError>>),
}

/// State owned by the writer thread alone.
struct Writer {
    path: PathBuf,
    dir: PathBuf,
    max_file_bytes: u64,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    signer: Arc<dyn CheckpointSigner>,
    clock: Clock,
    file: File,
    /// Where the records of the current file end; all of them are durable.
    file_len: u64,
    /// The current file's size: its records, then zeroed space.
    allocated: u64,
    /// How much zeroed space to keep ready past the records.
    preallocate: u64,
    next_rotation: u64,
    chain: ChainState,
    /// Automatic checkpoints wait until then after a signer failure.
    checkpoint_retry_at: SystemTime,
    /// Set when an fsync failed: what reached the disk is unknown, so
    /// nothing more is written (the kernel may have dropped the pages).
    poisoned: Option<String>,
    /// `poisoned`, as `AuditLog::check` sees it from other threads.
    failed: Arc<std::sync::OnceLock<String>>,
    buf: Vec<u8>,
    /// Held for the writer's life; released when it is dropped.
    _lock: File,
}

impl Writer {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        loop {
            let first = match self.checkpoint_wait() {
                None => jobs
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(wait) => jobs.recv_timeout(wait),
            };
            match first {
                Ok(job) => {
                    let mut batch = vec![job];
                    while batch.len() < MAX_BATCH {
                        match jobs.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    self.process(batch);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.process(Vec::new()),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.finish();
    }

    /// How long until an interval checkpoint is due; `None` when nothing
    /// is waiting to be checkpointed.
    fn checkpoint_wait(&self) -> Option<Duration> {
        if self.chain.since_checkpoint == 0 || self.poisoned.is_some() {
            return None;
        }
        let due = (self.chain.last_checkpoint_at + self.checkpoint_interval)
            .max(self.checkpoint_retry_at);
        let wait = due
            .duration_since((self.clock)())
            .unwrap_or(Duration::ZERO)
            // A clock set back must not postpone checkpoints indefinitely.
            .min(self.checkpoint_interval);
        Some(wait.max(Duration::from_millis(1)))
    }

    fn interval_due(&self, now: SystemTime) -> bool {
        self.chain.since_checkpoint > 0
            && now >= self.checkpoint_retry_at
            && now
                .duration_since(self.chain.last_checkpoint_at)
                .is_ok_and(|d| d >= self.checkpoint_interval)
    }

    fn process(&mut self, jobs: Vec<Job>) {
        self.rotate_if_due();
        if let Some(reason) = &self.poisoned {
            for job in jobs {
                match job {
                    Job::Append { reply, .. } => {
                        let _ = reply.send(Err(AuditError::Poisoned(reason.clone())));
                    }
                    Job::Checkpoint { reply } => {
                        let _ = reply.send(Err(AuditError::Poisoned(reason.clone())));
                    }
                }
            }
            return;
        }
        let saved = self.chain.clone();
        self.buf.clear();
        let mut pending = Vec::with_capacity(jobs.len());
        for job in jobs {
            match job {
                Job::Append { event, reply } => {
                    if event.event.is_internal() {
                        let _ = reply.send(Err(AuditError::InvalidEvent(format!(
                            "{} records are written by the audit log itself",
                            event.event
                        ))));
                        continue;
                    }
                    match self.push_record(&event, None) {
                        Ok(receipt) => pending.push(Pending::Append(reply, receipt)),
                        Err(reason) => {
                            let _ = reply.send(Err(AuditError::Write(reason)));
                        }
                    }
                    if self.chain.since_checkpoint >= self.checkpoint_every {
                        self.automatic_checkpoint();
                    }
                }
                Job::Checkpoint { reply } => {
                    match self.push_checkpoint(CheckpointKind::Requested) {
                        Ok(()) => pending.push(Pending::Checkpoint(reply)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
        }
        if self.interval_due((self.clock)()) {
            self.automatic_checkpoint();
        }
        if self.buf.is_empty() {
            return;
        }
        let outcome = self.commit(&saved);
        for p in pending {
            let failure = outcome.as_ref().err().map(|e| match e {
                AuditError::Poisoned(r) => AuditError::Poisoned(r.clone()),
                AuditError::Write(r) => AuditError::Write(r.clone()),
                other => AuditError::Write(other.to_string()),
            });
            match p {
                Pending::Append(reply, receipt) => {
                    let _ = reply.send(failure.map_or(Ok(receipt), Err));
                }
                Pending::Checkpoint(reply) => {
                    let _ = reply.send(failure.map_or(Ok(()), Err));
                }
            }
        }
        self.keep_space_ready();
    }

    /// Serializes one record into the batch buffer and advances the chain.
    fn push_record(
        &mut self,
        event: &AuditEvent,
        checkpoint: Option<(&CheckpointFacts, &str)>,
    ) -> Result<AuditReceipt, String> {
        let own_time;
        let time = match checkpoint {
            // A checkpoint's time is part of what was signed.
            Some((_, time)) => time,
            None => {
                own_time = format_time((self.clock)());
                &own_time
            }
        };
        let seq = self.chain.next_seq;
        let body = RecordBody {
            seq,
            time,
            event,
            checkpoint: checkpoint.map(|(c, _)| c),
            prev: &self.chain.head,
        };
        let hash = encode_line(&body, &mut self.buf)?;
        self.chain.next_seq += 1;
        self.chain.head.clone_from(&hash);
        self.chain.since_checkpoint += 1;
        Ok(AuditReceipt { seq, hash })
    }

    /// A checkpoint that nobody waits for: a signer failure is logged and
    /// retried later, never allowed to fail the records around it.
    fn automatic_checkpoint(&mut self) {
        let now = (self.clock)();
        if now < self.checkpoint_retry_at {
            return;
        }
        if let Err(e) = self.push_checkpoint(CheckpointKind::Periodic) {
            tracing::warn!(error = %e, "could not write an audit checkpoint; will retry");
            self.checkpoint_retry_at = now + self.checkpoint_interval.min(SIGNER_RETRY);
        }
    }

    /// Signs the current head and adds the checkpoint record to the batch.
    fn push_checkpoint(&mut self, kind: CheckpointKind) -> Result<(), AuditError> {
        let now = (self.clock)();
        let time = format_time(now);
        let seq = self.chain.next_seq;
        let message = checkpoint_message(seq, &time, kind, seq, &self.chain.head);
        let (signature, certificate) = self.signer.sign(&message).map_err(AuditError::Signer)?;
        // A signer handing back the wrong certificate would make every
        // checkpoint unverifiable; catch that now rather than at audit time.
        super::verify::check_checkpoint_signature(&certificate, &message, &signature)
            .map_err(|e| AuditError::Signer(format!("the signature it returned {e}")))?;
        let facts = CheckpointFacts {
            kind,
            records: seq,
            head_seq: seq.checked_sub(1),
            head_hash: self.chain.head.clone(),
            signature: BASE64.encode(signature),
            certificate: BASE64.encode(certificate),
        };
        let event = AuditEvent::new(EventKind::Checkpoint, correlation_id());
        self.push_record(&event, Some((&facts, &time)))
            .map_err(AuditError::Write)?;
        self.chain.since_checkpoint = 0;
        self.chain.last_checkpoint_at = now;
        Ok(())
    }

    /// Writes the batch buffer after the last record with one write and one
    /// fdatasync.
    fn commit(&mut self, saved: &ChainState) -> Result<(), AuditError> {
        let end = self.file_len + self.buf.len() as u64;
        // Past the ready space, the file grows by this batch and a fresh
        // stretch of zeros, both covered by the one fdatasync below.
        let grown = if end > self.allocated {
            self.zero_fill(end, end + self.preallocate)
        } else {
            Ok(())
        };
        let written = grown.and_then(|()| self.file.write_all_at(&self.buf, self.file_len));
        if let Err(e) = written {
            // Take back a partial write so the file still ends on the last
            // durable record and the chain can continue from it.
            return match self
                .file
                .set_len(self.file_len)
                .and_then(|()| self.file.sync_data())
            {
                Ok(()) => {
                    self.allocated = self.file_len;
                    self.chain = saved.clone();
                    self.buf.clear();
                    tracing::error!(error = %e, "writing the audit trail failed");
                    Err(AuditError::Write(format!("{}: {e}", self.path.display())))
                }
                Err(undo) => Err(self.poison(format!(
                    "{}: {e}; removing the partial write failed: {undo}",
                    self.path.display()
                ))),
            };
        }
        if let Err(e) = self.file.sync_data() {
            return Err(self.poison(format!("{}: fdatasync: {e}", self.path.display())));
        }
        self.file_len = end;
        self.buf.clear();
        Ok(())
    }

    /// Writes zeros over `from..to` and counts them as ready space.
    fn zero_fill(&mut self, from: u64, to: u64) -> std::io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        self.allocated = self.allocated.max(to);
        Ok(())
    }

    /// After a batch has been answered: when less than half of the zeroed
    /// space is left, adds more and makes it durable, so the next batches
    /// find it ready. A write failure is not fatal (commits then grow the
    /// file); a failed fdatasync is, as in `commit`.
    fn keep_space_ready(&mut self) {
        if self.poisoned.is_some()
            || self.preallocate == 0
            || self.allocated.saturating_sub(self.file_len) >= self.preallocate / 2
        {
            return;
        }
        let (from, to) = (self.allocated, self.file_len + self.preallocate);
        if let Err(e) = self.zero_fill(from, to) {
            tracing::warn!(error = %e, file = %self.path.display(), "could not add zeroed space to the audit trail; commits will grow the file instead");
            return;
        }
        if let Err(e) = self.file.sync_data() {
            self.poison(format!("{}: fdatasync: {e}", self.path.display()));
        }
    }

    /// Cuts the zeroed space off the current file, so it ends on its last
    /// record: before the file is rotated away, and when the trail closes.
    fn trim_unwritten(&mut self) -> std::io::Result<()> {
        if self.allocated > self.file_len {
            self.file.set_len(self.file_len)?;
            self.file.sync_data()?;
            self.allocated = self.file_len;
        }
        Ok(())
    }

    fn poison(&mut self, reason: String) -> AuditError {
        tracing::error!(reason = %reason, "the audit trail is unavailable until writ restarts");
        self.poisoned = Some(reason.clone());
        let _ = self.failed.set(reason.clone());
        AuditError::Poisoned(reason)
    }

    /// Renames the full current file to the next `<path>.<n>` and starts a
    /// new one. The chain simply continues. A failure leaves the current
    /// file in use (it grows past the limit) and is retried next batch.
    fn rotate_if_due(&mut self) {
        if self.poisoned.is_some() || self.file_len == 0 || self.file_len < self.max_file_bytes {
            return;
        }
        // A rotated file ends on its last record, like any finished file.
        if let Err(e) = self.trim_unwritten() {
            tracing::warn!(error = %e, file = %self.path.display(), "could not cut the zeroed space off the audit file before rotating it; still appending to it");
            return;
        }
        let mut target = rotated_path(&self.path, self.next_rotation);
        while target.exists() {
            self.next_rotation += 1;
            target = rotated_path(&self.path, self.next_rotation);
        }
        if let Err(e) = std::fs::rename(&self.path, &target) {
            tracing::warn!(error = %e, file = %self.path.display(), "could not rotate the audit trail; still appending to the current file");
            return;
        }
        self.next_rotation += 1;
        match open_current(&self.path, &self.dir) {
            Ok((file, len)) => {
                if let Err(e) = sync_dir(&self.dir) {
                    tracing::warn!(error = %e, "fsync of the audit directory after rotation failed");
                }
                self.file = file;
                self.file_len = len;
                self.allocated = len;
            }
            Err(e) => {
                // Put the old file back so readers find the trail where
                // they expect it; writing continues through the old handle.
                tracing::warn!(error = %e, "could not start a new audit file; still appending to the current one");
                if let Err(back) = std::fs::rename(&target, &self.path) {
                    let reason = format!(
                        "rotation left the current file at {} and could not start {}: {e}; moving it back failed: {back}",
                        target.display(),
                        self.path.display()
                    );
                    self.poison(reason);
                }
            }
        }
    }

    /// Runs once the queue is closed and empty: seals the trail with a
    /// close checkpoint, the marker of a clean end.
    fn finish(&mut self) {
        if self.poisoned.is_some() {
            return;
        }
        self.rotate_if_due();
        let saved = self.chain.clone();
        self.buf.clear();
        if let Err(e) = self.push_checkpoint(CheckpointKind::Close) {
            tracing::error!(error = %e, "could not write the closing audit checkpoint; the next start will record an unclean end");
            return;
        }
        if let Err(e) = self.commit(&saved) {
            tracing::error!(error = %e, "could not write the closing audit checkpoint");
            return;
        }
        if let Err(e) = self.trim_unwritten() {
            tracing::warn!(error = %e, file = %self.path.display(), "could not cut the zeroed space off the audit file; the next start does");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::audit::{AuditEvent, EventKind, KeyPairSigner};

    fn signer() -> Arc<KeyPairSigner> {
        signer_and_root().0
    }

    fn signer_and_root() -> (
        Arc<KeyPairSigner>,
        rustls::pki_types::CertificateDer<'static>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        (
            Arc::new(KeyPairSigner::new(key, der.to_vec()).unwrap()),
            der,
        )
    }

    #[tokio::test]
    async fn append_all_keeps_the_order_given_and_reports_each_record() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            path: dir.path().join("audit.jsonl"),
            max_file_bytes: 1 << 20,
            preallocate_bytes: 1 << 20,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(3600),
        };
        let log = AuditLog::open(&config, signer()).unwrap();
        let events: Vec<AuditEvent> = (0..40)
            .map(|i| AuditEvent::new(EventKind::Revoked, format!("corr-{i:02}")))
            .collect();
        let outcomes = log.append_all(events).await;
        assert_eq!(outcomes.len(), 40);
        let seqs: Vec<u64> = outcomes.into_iter().map(|o| o.unwrap().seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        log.close();
        let trail = std::fs::read_to_string(&config.path).unwrap();
        let order: Vec<&str> = trail
            .lines()
            .filter_map(|l| l.split("\"corr-").nth(1))
            .map(|rest| &rest[..2])
            .collect();
        let expected: Vec<String> = (0..40).map(|i| format!("{i:02}")).collect();
        assert_eq!(order, expected);
    }

    fn config_in(dir: &Path, max_file_bytes: u64, preallocate_bytes: u64) -> AuditConfig {
        AuditConfig {
            path: dir.join("audit.jsonl"),
            max_file_bytes,
            preallocate_bytes,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(3600),
        }
    }

    fn records_and_zeros(path: &Path) -> (usize, usize) {
        let bytes = std::fs::read(path).unwrap();
        let records = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        assert!(bytes[..records].iter().all(|&b| b != 0));
        assert!(records == 0 || bytes[records - 1] == b'\n');
        (records, bytes.len() - records)
    }

    #[test]
    fn zeroed_space_stays_ready_while_open_and_is_cut_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), 64 << 20, 8192);
        let (signer, root) = signer_and_root();
        let log = AuditLog::open(&config, signer).unwrap();
        // The file's size changes only when ready space is added, about
        // once per half the preallocation, not with every commit. (A read
        // racing a page-by-page extension can see one size in between.)
        let mut sizes = std::collections::BTreeSet::new();
        for i in 0..200 {
            log.append_blocking(AuditEvent::new(EventKind::Denied, format!("c{i}")))
                .unwrap();
            let (records, zeros) = records_and_zeros(&config.path);
            sizes.insert(records + zeros);
        }
        let (records, _) = records_and_zeros(&config.path);
        assert!(
            sizes.len() <= 2 * (records / 4096) + 2,
            "{} sizes for {records} bytes of records",
            sizes.len()
        );
        log.checkpoint().unwrap();
        let live = crate::audit::verify(&config.path, std::slice::from_ref(&root)).unwrap();
        assert_eq!(live.last_seq, Some(201), "started, 200 records, checkpoint");
        assert_eq!(
            live.end,
            crate::audit::TrailEnd::Live {
                unsigned_records: 0
            }
        );
        log.close();
        let (records, zeros) = records_and_zeros(&config.path);
        assert_eq!(zeros, 0);
        assert!(records > 200 * 100);
        let closed = crate::audit::verify(&config.path, &[root]).unwrap();
        assert_eq!(closed.last_seq, Some(202));
        assert_eq!(closed.end, crate::audit::TrailEnd::Closed);
    }

    #[test]
    fn rotated_files_end_on_their_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), 4096, 1 << 20);
        let log = AuditLog::open(&config, signer()).unwrap();
        for i in 0..100 {
            log.append_blocking(AuditEvent::new(EventKind::Denied, format!("c{i}")))
                .unwrap();
        }
        let rotated = files::rotated_numbers(&config.path).unwrap();
        assert!(rotated.len() >= 3, "{rotated:?}");
        for n in rotated {
            let (records, zeros) = records_and_zeros(&rotated_path(&config.path, n));
            assert_eq!(zeros, 0, "file {n}");
            assert!(records >= 4096, "file {n} rotated at {records} bytes");
        }
        assert!(records_and_zeros(&config.path).1 > 0);
        log.close();
    }

    #[test]
    fn without_preallocation_the_file_is_only_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), 64 << 20, 0);
        let log = AuditLog::open(&config, signer()).unwrap();
        let mut sizes = std::collections::BTreeSet::new();
        for i in 0..20 {
            log.append_blocking(AuditEvent::new(EventKind::Denied, format!("c{i}")))
                .unwrap();
            let (records, zeros) = records_and_zeros(&config.path);
            assert_eq!(zeros, 0);
            sizes.insert(records);
        }
        assert_eq!(sizes.len(), 20);
        log.close();
    }

    #[test]
    fn check_passes_while_open_and_fails_once_closed() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&AuditConfig::defaults_for(dir.path()), signer()).unwrap();
        log.check().unwrap();
        log.close();
        assert!(matches!(log.check(), Err(AuditError::Closed)));
    }
}
