//! The writing side of the audit trail. Whoever appends serializes and
//! chains its records and writes them to the current file itself, under one
//! lock, so records land in chain order without a hand-off to another
//! thread. Durability is a group commit: an append is answered once an
//! fdatasync that began after its write has returned. When no sync is
//! running and the appender is the only caller waiting for the trail, it
//! runs that fdatasync in its own thread, so the quiet path wakes no other
//! thread (on a VM, waking a thread on an idle vCPU costs tens of
//! microseconds, a fifth of the whole commit). Otherwise it waits, and the
//! background thread syncs for everyone waiting, so concurrent appenders
//! share syncs and runtime workers are not held in fdatasync under load.
//!
//! A write that finds the file at its size limit rotates it first. The
//! background thread writes interval checkpoints, keeps zeroed space ready
//! past the last record (a commit then overwrites blocks the file already
//! has: its fdatasync has no new file size to commit, which on ext4 spares
//! a journal commit), and seals the trail when it closes.

use std::fs::{DirBuilder, File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::files::{self, rotated_path, sync_dir, take_writer_lock};
use super::record::{
    CheckpointFacts, CheckpointKind, RecordBody, ZERO_HASH, checkpoint_message, encode_line,
    format_time,
};
use super::recover::{MODIFIED_TAIL_MOVED_TO, Recovered, SetAside, TailKind, recover};
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

/// After the signer fails, automatic checkpoints wait at most this long
/// before trying again (or `checkpoint_interval`, if shorter).
const SIGNER_RETRY: Duration = Duration::from_secs(30);
/// After rotating or adding zeroed space failed, the background thread
/// waits this long before trying again, rather than spinning on a full disk.
const MAINTENANCE_RETRY: Duration = Duration::from_secs(1);
/// How long the background thread sleeps when nothing is due.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// The audit trail, open for appending. Share it as `Arc<AuditLog>`.
pub struct AuditLog {
    path: PathBuf,
    shared: Arc<Shared>,
    background: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What appenders, waiters and the background thread share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the background thread: work for it, a sync that ended (a
    /// close waits for that), or the close itself.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct State {
    writer: Writer,
    /// Every record with a lower `seq` is on disk.
    durable_seq: u64,
    /// An fdatasync is running, in an appender or in the background thread.
    syncing: bool,
    /// Appenders waiting for a sync: the `seq` their records end before,
    /// and how to wake them.
    waiters: Vec<(u64, Waker)>,
    /// Records are written that nobody is waiting to sync (an append whose
    /// caller stopped waiting, a background checkpoint, new zeroed space):
    /// the background thread syncs them.
    unclaimed: bool,
    /// Appends (and checkpoint requests) whose caller has not yet been
    /// answered: a caller syncs in its own thread only when it is the only
    /// one, since blocking a runtime worker while others also wait for the
    /// trail costs them more than a hand-off (measured in the `jwt` bench
    /// at 16 clients).
    outstanding: usize,
    /// The background thread has been asked to rotate or add space.
    maintenance_asked: bool,
    /// Rotating or adding space failed; not retried before then.
    maintenance_retry_at: Instant,
    /// `close` has begun: appends are refused and the trail is sealed.
    closing: bool,
}

impl State {
    /// Claims the next fdatasync: it covers every record written so far.
    fn begin_sync(&mut self) -> (u64, Arc<File>) {
        self.syncing = true;
        self.unclaimed = false;
        (self.writer.chain.next_seq, self.writer.file.clone())
    }

    /// Settles a sync begun with `begin_sync` and returns the wakers of
    /// those it answered. Whoever still waits is left to the background
    /// thread, which is woken for them.
    fn finish_sync(
        &mut self,
        covered: u64,
        synced: std::io::Result<()>,
        wake: &Condvar,
    ) -> Vec<Waker> {
        self.syncing = false;
        match synced {
            Ok(()) => self.durable_seq = self.durable_seq.max(covered),
            Err(e) => {
                let reason = format!("{}: fdatasync: {e}", self.writer.path.display());
                self.writer.poison(reason);
            }
        }
        let answered = self.answered_waiters();
        if self.closing || self.unclaimed || !self.waiters.is_empty() {
            wake.notify_all();
        }
        answered
    }

    /// Takes out the waiters whose records are now durable, or all of them
    /// once the trail has failed.
    fn answered_waiters(&mut self) -> Vec<Waker> {
        let (durable, failed) = (self.durable_seq, self.writer.poisoned.is_some());
        let (answered, waiting) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(until, _)| failed || *until <= durable);
        self.waiters = waiting;
        answered.into_iter().map(|(_, waker)| waker).collect()
    }

    /// Whether the background thread has a sync to run: written records
    /// that someone waits for, or that nobody will claim.
    fn sync_wanted(&self) -> bool {
        !self.syncing
            && self.writer.poisoned.is_none()
            && self.durable_seq < self.writer.chain.next_seq
            && (self.unclaimed || !self.waiters.is_empty())
    }

    fn maintenance_due(&self) -> bool {
        self.writer.space_low() && Instant::now() >= self.maintenance_retry_at
    }

    /// Serializes, chains and writes `events` (and a checkpoint, if one is
    /// due) with one write, without waiting for the disk. Returns each
    /// event's outcome and the `seq` that must be durable before any of
    /// them counts.
    fn write_events(
        &mut self,
        events: &[AuditEvent],
        wake: &Condvar,
    ) -> Result<(Vec<Result<AuditReceipt, AuditError>>, u64), AuditError> {
        self.refuse_if_stopped()?;
        if self.rotation_wanted() {
            // Here rather than in the background thread, so a file ends
            // where the limit says (it happens once per `max_file_bytes`).
            self.rotate();
            self.refuse_if_stopped()?;
        }
        let writer = &mut self.writer;
        let saved = writer.chain.clone();
        writer.buf.clear();
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            if event.event.is_internal() {
                outcomes.push(Err(AuditError::InvalidEvent(format!(
                    "{} records are written by the audit log itself",
                    event.event
                ))));
                continue;
            }
            outcomes.push(writer.push_record(event, None).map_err(AuditError::Write));
        }
        if writer.chain.since_checkpoint >= writer.checkpoint_every
            || writer.interval_due((writer.clock)())
        {
            writer.automatic_checkpoint();
        }
        if writer.buf.is_empty() {
            return Ok((outcomes, 0));
        }
        let start = writer.file_len;
        writer.write_out(&saved)?;
        if !self.syncing && self.outstanding == 0 {
            // The trail is quiet (no sync running, nobody else waiting), so
            // nothing would take these bytes to the disk yet: it can have
            // them while the caller finishes its work (an issuance signs its
            // certificate), leaving the sync little more than the cache
            // flush. Under load a sync is due soon anyway, and starting
            // writeback early only writes a page the next record dirties
            // again (measured: 4% more CPU per task in churn).
            let _ = crate::sys::start_writeback(&writer.file, start, writer.file_len - start);
        }
        if !self.maintenance_asked && self.maintenance_due() {
            self.maintenance_asked = true;
            wake.notify_all();
        }
        Ok((outcomes, self.writer.chain.next_seq))
    }

    fn refuse_if_stopped(&self) -> Result<(), AuditError> {
        if let Some(reason) = &self.writer.poisoned {
            return Err(AuditError::Poisoned(reason.clone()));
        }
        if self.closing {
            return Err(AuditError::Closed);
        }
        Ok(())
    }

    /// Whether the file should be rotated before the next write.
    fn rotation_wanted(&self) -> bool {
        self.writer.rotation_due() && Instant::now() >= self.maintenance_retry_at
    }

    /// Makes every record in the current file durable and rotates it. A
    /// rotation that fails is retried no sooner than `MAINTENANCE_RETRY`.
    fn rotate(&mut self) {
        if let Err(e) = self.writer.file.sync_data() {
            let reason = format!("{}: fdatasync: {e}", self.writer.path.display());
            self.writer.poison(reason);
        } else {
            self.durable_seq = self.writer.chain.next_seq;
            if !self.writer.rotate() {
                self.maintenance_retry_at = Instant::now() + MAINTENANCE_RETRY;
            }
        }
        wake_all(self.answered_waiters());
    }

    /// Adds zeroed space past the records; the lock is held throughout, so
    /// appends wait for it, once per half of `preallocate_bytes` written.
    fn maintain(&mut self) {
        self.maintenance_asked = false;
        if self.writer.add_zeroed_space() {
            self.unclaimed = true;
        } else {
            self.maintenance_retry_at = Instant::now() + MAINTENANCE_RETRY;
        }
    }

    /// Once `close` has begun and no sync is running: makes everything
    /// durable and writes the close checkpoint, the marker of a clean end.
    fn seal(&mut self) -> Vec<Waker> {
        if self.writer.poisoned.is_some() {
            return self.answered_waiters();
        }
        if let Err(e) = self.writer.file.sync_data() {
            let reason = format!("{}: fdatasync: {e}", self.writer.path.display());
            self.writer.poison(reason);
            return self.answered_waiters();
        }
        self.durable_seq = self.writer.chain.next_seq;
        let answered = self.answered_waiters();
        let writer = &mut self.writer;
        if writer.rotation_due() {
            writer.rotate();
        }
        let saved = writer.chain.clone();
        writer.buf.clear();
        if let Err(e) = writer.push_checkpoint(CheckpointKind::Close) {
            tracing::error!(error = %e, "could not write the closing audit checkpoint; the next start will record an unclean end");
            return answered;
        }
        if let Err(e) = writer.write_out(&saved).and_then(|()| writer.sync()) {
            tracing::error!(error = %e, "could not write the closing audit checkpoint");
            return answered;
        }
        self.durable_seq = writer.chain.next_seq;
        if let Err(e) = writer.trim_unwritten() {
            tracing::warn!(error = %e, file = %writer.path.display(), "could not cut the zeroed space off the audit file; the next start does");
        }
        answered
    }
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

/// Resolves once the records written before it was made are on disk, or
/// fails if the trail cannot make them so. Dropping it does not withdraw
/// the records: the background thread then syncs them.
#[must_use = "a record counts only once it is on disk"]
struct Durable {
    shared: Arc<Shared>,
    /// The `seq` every record before which must be durable.
    until: u64,
    /// Whether this caller may run the fdatasync itself when none is
    /// running; otherwise the background thread does.
    inline: bool,
    settled: bool,
}

impl Future for Durable {
    type Output = Result<(), AuditError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let shared = this.shared.clone();
        let mut state = shared.lock();
        loop {
            if state.durable_seq >= this.until {
                this.settle(&mut state);
                return Poll::Ready(Ok(()));
            }
            if let Some(reason) = state.writer.poisoned.clone() {
                this.settle(&mut state);
                return Poll::Ready(Err(AuditError::Poisoned(reason)));
            }
            if state.syncing || !this.inline || state.outstanding > 1 {
                if !state.syncing {
                    shared.wake.notify_all();
                }
                let waker = cx.waker();
                if !state
                    .waiters
                    .iter()
                    .any(|(until, w)| *until == this.until && w.will_wake(waker))
                {
                    state.waiters.push((this.until, waker.clone()));
                }
                return Poll::Pending;
            }
            // Nobody is syncing: this caller does, without waking anyone.
            // It blocks this thread for one fdatasync; a hand-off to the
            // background thread and back costs a fifth as much again on a
            // VM with idle vCPUs (measured in the `policy_audit` bench).
            state = run_sync(&shared, state);
        }
    }
}

/// Runs one fdatasync covering every record written so far, outside the
/// lock, then answers whoever it covered; returns the lock retaken.
fn run_sync<'a>(shared: &'a Shared, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    let (covered, file) = state.begin_sync();
    drop(state);
    let synced = file.sync_data();
    state = shared.lock();
    let answered = state.finish_sync(covered, synced, &shared.wake);
    drop(state);
    wake_all(answered);
    shared.lock()
}

impl Durable {
    /// Marks this caller answered: no longer outstanding.
    fn settle(&mut self, state: &mut State) {
        if !self.settled {
            self.settled = true;
            state.outstanding -= 1;
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let shared = self.shared.clone();
        let mut state = shared.lock();
        self.settle(&mut state);
        if state.durable_seq < self.until && state.writer.poisoned.is_none() {
            state.unclaimed = true;
            shared.wake.notify_all();
        }
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
    /// record, moves a torn or modified tail aside, writes an `audit_started` record
    /// saying how the previous run ended, and starts the background thread.
    pub fn open_with_clock(
        config: &AuditConfig,
        signer: Arc<dyn CheckpointSigner>,
        clock: Clock,
    ) -> Result<Arc<Self>, AuditError> {
        Self::open_inner(config, signer, clock, false)
    }

    /// [`AuditLog::open`] for a writ that has run before with the same data
    /// directory (`ran_before`): there a missing trail is not a new one, and
    /// its `audit_started` says so (`previous_end: "missing"`), so that
    /// deleting the whole trail leaves a mark verify reports.
    pub fn open_after_earlier_runs(
        config: &AuditConfig,
        signer: Arc<dyn CheckpointSigner>,
        ran_before: bool,
    ) -> Result<Arc<Self>, AuditError> {
        Self::open_inner(config, signer, Arc::new(SystemTime::now), ran_before)
    }

    fn open_inner(
        config: &AuditConfig,
        signer: Arc<dyn CheckpointSigner>,
        clock: Clock,
        ran_before: bool,
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

        // The lock file alone is not enough: deleted by hand while a writer
        // runs, it would let a second writer in, whose recovery would cut
        // the first one's zeroed space and whose records the first would
        // write over. The writer also holds a lock on the current file
        // itself, so that second writer is refused here, before `recover`.
        let existing = match File::open(&path) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        if let Some(file) = &existing
            && !lock_current(file).map_err(io_err(&path))?
        {
            return Err(AuditError::Locked {
                path: path.clone(),
                lock: path.clone(),
            });
        }

        let now = clock();
        let Recovered {
            head,
            set_aside,
            next_rotation,
        } = recover(&path, now)?;
        // `recover` left the current file ending on its last record.
        let (file, file_len) = open_current(&path, &dir)?;
        // Held from now on through the writer's own descriptor (a lock of
        // another open of the same file would refuse it).
        drop(existing);
        if !lock_current(&file).map_err(io_err(&path))? {
            return Err(AuditError::Locked {
                path: path.clone(),
                lock: path.clone(),
            });
        }

        let mut started = AuditEvent::new(EventKind::AuditStarted, correlation_id())
            .detail("writ_version", env!("CARGO_PKG_VERSION"))
            .detail("pid", std::process::id());
        // Bytes after the close checkpoint mean it was not the end.
        let clean = head.as_ref().is_some_and(|h| h.closed) && set_aside.is_none();
        started = match &head {
            None if set_aside.is_none() && ran_before => {
                tracing::warn!(
                    path = %path.display(),
                    "writ has run with this data directory before, but there is no audit trail at this path: it was removed, or [audit] path was changed; starting a new trail"
                );
                started
                    .detail("previous_end", "missing")
                    .reason("writ has run with this data directory before, but there was no audit trail at this path: it was removed, or [audit] path was changed")
            }
            None if set_aside.is_none() => started.detail("previous_end", "none"),
            _ if clean => started.detail("previous_end", "clean"),
            _ => {
                tracing::warn!(
                    path = %path.display(),
                    last_seq = head.as_ref().map(|h| h.seq),
                    set_aside = set_aside.as_ref().map(|s| s.kind.as_str()),
                    "the audit trail did not end with a close checkpoint: writ stopped without closing it, or records were removed from its end; `writ audit verify` will report this start"
                );
                started
                    .detail("previous_end", "unclean")
                    .reason("the previous run did not end with a close checkpoint: writ stopped without closing the trail, or records were removed from its end")
            }
        };
        if let Some(h) = head.as_ref().filter(|_| !clean) {
            started = started.detail("previous_seq", h.seq);
        }
        // A modified tail gets keys of its own, which verify reports as a
        // problem: a crash explains a torn tail, nothing innocent explains
        // whole lines that changed.
        match &set_aside {
            Some(SetAside {
                kind: TailKind::Torn,
                moved_to,
                bytes,
            }) => {
                started = started
                    .detail("torn_tail_moved_to", moved_to.display().to_string())
                    .detail("torn_tail_bytes", *bytes);
            }
            Some(SetAside {
                kind: TailKind::Modified,
                moved_to,
                bytes,
            }) => {
                started = started
                    .detail(MODIFIED_TAIL_MOVED_TO, moved_to.display().to_string())
                    .detail("modified_tail_bytes", *bytes)
                    .reason("the trail ended in whole lines that were not valid records or did not chain on: they were modified after writ wrote them; they were moved aside");
            }
            None => {}
        }

        let mut writer = Writer {
            path: path.clone(),
            dir,
            max_file_bytes: config.max_file_bytes.max(1),
            checkpoint_every: config.checkpoint_every.max(1),
            checkpoint_interval: config.checkpoint_interval.max(Duration::from_millis(1)),
            signer,
            clock,
            file: Arc::new(file),
            file_len,
            allocated: file_len,
            preallocate: config.preallocate_bytes,
            fill_failed: false,
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
            lock: Some(lock),
        };
        let saved = writer.chain.clone();
        writer.buf.clear();
        writer
            .push_record(&started, None)
            .map_err(AuditError::Write)?;
        writer.write_out(&saved)?;
        writer.sync()?;
        if writer.space_low() && writer.add_zeroed_space() {
            writer.sync()?;
        }

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                durable_seq: writer.chain.next_seq,
                writer,
                syncing: false,
                waiters: Vec::new(),
                outstanding: 0,
                unclaimed: false,
                maintenance_asked: false,
                maintenance_retry_at: Instant::now(),
                closing: false,
            }),
            wake: Condvar::new(),
        });
        let background = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("writ-audit".into())
                .spawn(move || run_background(&shared))
                .map_err(|e| {
                    AuditError::Write(format!("starting the audit background thread: {e}"))
                })?
        };
        Ok(Arc::new(Self {
            path,
            shared,
            background: Mutex::new(Some(background)),
        }))
    }

    /// Whether records can still be appended: the trail is open, its
    /// background thread runs, and no failed fsync has stopped it.
    pub fn check(&self) -> Result<(), AuditError> {
        {
            let state = self.shared.lock();
            state.refuse_if_stopped()?;
            state.writer.check_still_at_path()?;
        }
        let running = self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|handle| !handle.is_finished());
        if running {
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
    /// the sync with concurrent appends. On error the caller must fail the
    /// operation being audited. Dropping the future does not withdraw the
    /// record.
    ///
    /// When no sync is running, polling the future runs one in the calling
    /// thread (blocking it for about one fdatasync), so start other I/O the
    /// caller waits for (a store write) before awaiting this.
    pub async fn append(&self, event: AuditEvent) -> Result<AuditReceipt, AuditError> {
        self.start_append(event)?.await
    }

    /// `append`, with the record written (to the page cache, its write-back
    /// started) before this returns: the disk takes it while the caller
    /// does other work, and the future resolves once it is durable.
    pub fn start_append(
        &self,
        event: AuditEvent,
    ) -> Result<impl Future<Output = Result<AuditReceipt, AuditError>> + Send + use<>, AuditError>
    {
        let (mut outcomes, durable) = self.write(std::slice::from_ref(&event), true)?;
        let receipt = outcomes.pop().unwrap_or(Err(AuditError::Closed))?;
        Ok(async move { durable.await.map(|()| receipt) })
    }

    /// `start_append` for records that stand or fall together (a task begun
    /// and its first SVID): one write, one sync, and the future fails if
    /// any record of the group could not be written or synced.
    pub fn start_append_group(
        &self,
        events: &[AuditEvent],
    ) -> Result<impl Future<Output = Result<(), AuditError>> + Send + use<>, AuditError> {
        let (outcomes, durable) = self.write(events, true)?;
        let refused = outcomes.into_iter().find_map(Result::err);
        Ok(async move {
            // Awaited even when a record was refused, so the waiter count
            // stays right; the refusal is the answer.
            let synced = durable.await;
            match refused {
                Some(e) => Err(e),
                None => synced,
            }
        })
    }

    /// Appends several records in the order given, with one write, and
    /// returns each outcome once all are on disk. The background thread
    /// syncs them: these are records of work already done (a completion,
    /// its revocations), and their caller's thread has other tasks to run
    /// meanwhile, such as the CRL publisher it has just woken.
    pub async fn append_all(&self, events: &[AuditEvent]) -> Vec<Result<AuditReceipt, AuditError>> {
        let (outcomes, durable) = match self.write(events, false) {
            Ok(written) => written,
            Err(e) => return events.iter().map(|_| Err(copy_error(&e))).collect(),
        };
        match durable.await {
            Ok(()) => outcomes,
            Err(e) => outcomes
                .into_iter()
                .map(|o| o.and(Err(copy_error(&e))))
                .collect(),
        }
    }

    /// The blocking twin of `append`, for threads outside the async runtime.
    pub fn append_blocking(&self, event: AuditEvent) -> Result<AuditReceipt, AuditError> {
        futures::executor::block_on(self.start_append(event)?)
    }

    /// Writes a signed checkpoint now and returns once it is on disk
    /// (blocking). Checkpoints are also written every `checkpoint_every`
    /// records, after `checkpoint_interval`, and on close.
    pub fn checkpoint(&self) -> Result<(), AuditError> {
        futures::executor::block_on(self.checkpoint_async())
    }

    /// `checkpoint` for async callers.
    pub async fn checkpoint_async(&self) -> Result<(), AuditError> {
        let durable = {
            let mut state = self.shared.lock();
            state.refuse_if_stopped()?;
            let writer = &mut state.writer;
            let saved = writer.chain.clone();
            writer.buf.clear();
            writer.push_checkpoint(CheckpointKind::Requested)?;
            writer.write_out(&saved)?;
            let until = writer.chain.next_seq;
            self.durable(&mut state, until, true)
        };
        durable.await
    }

    fn write(
        &self,
        events: &[AuditEvent],
        inline: bool,
    ) -> Result<(Vec<Result<AuditReceipt, AuditError>>, Durable), AuditError> {
        let mut state = self.shared.lock();
        let (outcomes, until) = state.write_events(events, &self.shared.wake)?;
        let durable = self.durable(&mut state, until, inline);
        Ok((outcomes, durable))
    }

    /// A waiter for the records written so far, counted in `state`.
    fn durable(&self, state: &mut State, until: u64, inline: bool) -> Durable {
        state.outstanding += 1;
        Durable {
            shared: self.shared.clone(),
            until,
            inline,
            settled: false,
        }
    }

    /// Makes what was appended durable, writes a close checkpoint (the
    /// marker of a clean end), and stops the background thread. Later
    /// appends fail with `Closed`. Blocks until done; calling it again does
    /// nothing.
    pub fn close(&self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// An `AuditError` for every record of a group that failed together.
fn copy_error(e: &AuditError) -> AuditError {
    match e {
        AuditError::Poisoned(r) => AuditError::Poisoned(r.clone()),
        AuditError::Write(r) => AuditError::Write(r.clone()),
        AuditError::Closed => AuditError::Closed,
        other => AuditError::Write(other.to_string()),
    }
}

/// The background thread: syncs what waiters left to it and what nobody
/// claimed, rotates, keeps zeroed space ready, writes interval checkpoints,
/// and seals the trail on close.
fn run_background(shared: &Shared) {
    let mut state = shared.lock();
    while !state.closing {
        if state.sync_wanted() {
            state = run_sync(shared, state);
            continue;
        }
        if !state.syncing && state.maintenance_due() {
            state.maintain();
            continue;
        }
        state.maintenance_asked = false;
        let writer = &mut state.writer;
        if writer.poisoned.is_none() && writer.interval_due((writer.clock)()) {
            let saved = writer.chain.clone();
            writer.buf.clear();
            writer.automatic_checkpoint();
            if !writer.buf.is_empty() {
                match writer.write_out(&saved) {
                    Ok(()) => state.unclaimed = true,
                    // Taken back; try again later rather than at once.
                    Err(_) => {
                        writer.checkpoint_retry_at =
                            (writer.clock)() + writer.checkpoint_interval.min(SIGNER_RETRY);
                    }
                }
            }
            continue;
        }
        let wait = writer.checkpoint_wait().unwrap_or(IDLE_WAIT);
        state = shared
            .wake
            .wait_timeout(state, wait)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    while state.syncing {
        state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
    }
    let answered = state.seal();
    // Another writer (a restart in the same process) may take it now, and
    // the current file's lock with it (its descriptor may live on a while).
    state.writer.lock = None;
    if let Err(e) = rustix::fs::flock(&*state.writer.file, rustix::fs::FlockOperation::Unlock) {
        tracing::warn!(error = %e, "could not release the audit file's lock");
    }
    drop(state);
    wake_all(answered);
}

fn correlation_id() -> String {
    ulid::Ulid::new().to_string()
}

/// An exclusive `flock` on the trail's current file, through `file`; false
/// when another writer holds it. Rotated files keep theirs until the
/// writer drops their descriptor: only the current file matters.
fn lock_current(file: &File) -> std::io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
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
    let meta = file.metadata().map_err(io_err)?;
    warn_if_exposed(path, meta.permissions().mode());
    Ok((file, meta.len()))
}

/// The trail names every task's intent, tools and targets, so writ creates
/// it 0600; a group may be let read it (a log shipper), but a trail others
/// can read, or a group can write, was loosened by hand and is worth a word.
/// Not refused: the hash chain already shows any change to it.
fn warn_if_exposed(path: &Path, mode: u32) {
    const OTHERS_OR_GROUP_WRITE: u32 = 0o026;
    if mode & OTHERS_OR_GROUP_WRITE != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:04o}", mode & 0o7777),
            "the audit trail is readable or writable by others than writ's user and group; writ creates it 0600 (chmod 600, or 640 for a log shipper's group)"
        );
    }
}

/// The chain as of the last record written; saved before a write so a
/// failed one can be taken back.
#[derive(Clone)]
struct ChainState {
    next_seq: u64,
    head: String,
    since_checkpoint: u64,
    last_checkpoint_at: SystemTime,
}

/// The file and the chain, always used under the `State` lock.
struct Writer {
    path: PathBuf,
    dir: PathBuf,
    max_file_bytes: u64,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    signer: Arc<dyn CheckpointSigner>,
    clock: Clock,
    /// Shared with a sync running outside the lock.
    file: Arc<File>,
    /// Where the records written to the current file end (`durable_seq`
    /// says how many of them are on disk).
    file_len: u64,
    /// The current file's size: its records, then zeroed space.
    allocated: u64,
    /// How much zeroed space to keep ready past the records.
    preallocate: u64,
    /// Adding zeroed space failed (a full disk) and has not succeeded
    /// since: appends leave it to the background thread's retries.
    fill_failed: bool,
    next_rotation: u64,
    chain: ChainState,
    /// Automatic checkpoints wait until then after a signer failure.
    checkpoint_retry_at: SystemTime,
    /// Set when an fsync failed: what reached the disk is unknown, so
    /// nothing more is written (the kernel may have dropped the pages).
    poisoned: Option<String>,
    buf: Vec<u8>,
    /// The writer lock, held until the trail is closed.
    lock: Option<File>,
}

impl Writer {
    /// Whether the path still names the file writ appends to: someone who
    /// renames or unlinks it would otherwise see records vanish from the
    /// path unnoticed while writ writes on into the file it holds.
    fn check_still_at_path(&self) -> Result<(), AuditError> {
        use std::os::unix::fs::MetadataExt;
        let displaced = || AuditError::Displaced {
            path: self.path.clone(),
        };
        let held = self.file.metadata().map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })?;
        match std::fs::symlink_metadata(&self.path) {
            Ok(at_path) if (at_path.dev(), at_path.ino()) == (held.dev(), held.ino()) => Ok(()),
            Ok(_) => Err(displaced()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(displaced()),
            Err(source) => Err(AuditError::Io {
                path: self.path.clone(),
                source,
            }),
        }
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

    /// Whether the pause after a signer failure (or after opening) is over.
    /// A retry time further off than any pause writ sets means the clock
    /// was set back since: over too, or no checkpoint would come until the
    /// clock caught up.
    fn retry_pause_over(&self, now: SystemTime) -> bool {
        match self.checkpoint_retry_at.duration_since(now) {
            Err(_) => true,
            Ok(ahead) => ahead.is_zero() || ahead > self.checkpoint_interval.min(SIGNER_RETRY),
        }
    }

    fn interval_due(&self, now: SystemTime) -> bool {
        self.chain.since_checkpoint > 0
            && self.retry_pause_over(now)
            // A clock set back since the last checkpoint makes one due at
            // once (dated now, so the interval counts from there), rather
            // than none until the clock catches up.
            && now
                .duration_since(self.chain.last_checkpoint_at)
                .map_or(true, |d| d >= self.checkpoint_interval)
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
        if !self.retry_pause_over(now) {
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
        // Verify refuses a checkpoint dated outside its certificate's
        // validity, for good (the date is signed): with the clock set
        // before the signer's notBefore, or after its notAfter, none is
        // written; the records still chain, and the next checkpoint once
        // the clock is inside covers them.
        let (not_before, not_after) = super::verify::certificate_validity(&certificate)
            .map_err(|e| AuditError::Signer(format!("the certificate it returned {e}")))?;
        if now < not_before || now > not_after {
            return Err(AuditError::Signer(format!(
                "the clock ({time}) is outside the validity of the signing certificate ({} to {}): a checkpoint dated so would never verify; is the system clock wrong?",
                format_time(not_before),
                format_time(not_after)
            )));
        }
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

    /// Writes the buffer after the last record with one write, growing the
    /// file (with fresh zeroed space after it) if the ready space is short.
    /// A failed write is taken back, so the file still ends on the last
    /// record written and the chain continues from it.
    fn write_out(&mut self, saved: &ChainState) -> Result<(), AuditError> {
        let end = self.file_len + self.buf.len() as u64;
        let written = self.file.write_all_at(&self.buf, self.file_len);
        self.buf.clear();
        if let Err(e) = written {
            return match self
                .file
                .set_len(self.file_len)
                .and_then(|()| self.file.sync_data())
            {
                Ok(()) => {
                    self.allocated = self.file_len;
                    self.chain = saved.clone();
                    tracing::error!(error = %e, "writing the audit trail failed");
                    Err(AuditError::Write(format!("{}: {e}", self.path.display())))
                }
                Err(undo) => Err(self.poison(format!(
                    "{}: {e}; removing the partial write failed: {undo}",
                    self.path.display()
                ))),
            };
        }
        self.file_len = end;
        // The zeroed space is best effort, and written after the record: on
        // a nearly full disk the record must not fail for room it does not
        // need, nor the zeros take the room it does. After a failure the
        // background thread's maintenance retries it (`space_low`).
        if end > self.allocated {
            self.allocated = end;
            if self.preallocate > 0
                && !self.fill_failed
                && let Err(e) = self.zero_fill(end, end + self.preallocate)
            {
                self.fill_failed = true;
                tracing::warn!(error = %e, file = %self.path.display(), "could not add zeroed space to the audit trail; commits will grow the file instead");
            }
        }
        Ok(())
    }

    /// fdatasync under the lock, for opening and sealing the trail.
    fn sync(&mut self) -> Result<(), AuditError> {
        self.file
            .sync_data()
            .map_err(|e| self.poison(format!("{}: fdatasync: {e}", self.path.display())))
    }

    fn rotation_due(&self) -> bool {
        self.poisoned.is_none() && self.file_len > 0 && self.file_len >= self.max_file_bytes
    }

    /// Less than half of the zeroed space is left.
    fn space_low(&self) -> bool {
        self.poisoned.is_none()
            && self.preallocate > 0
            && self.allocated.saturating_sub(self.file_len) < self.preallocate / 2
    }

    /// Tops the zeroed space up to `preallocate` past the records; the next
    /// sync makes it durable. A failed write is not fatal: commits then
    /// grow the file.
    fn add_zeroed_space(&mut self) -> bool {
        let (from, to) = (self.allocated, self.file_len + self.preallocate);
        match self.zero_fill(from, to) {
            Ok(()) => {
                self.fill_failed = false;
                true
            }
            Err(e) => {
                self.fill_failed = true;
                tracing::warn!(error = %e, file = %self.path.display(), "could not add zeroed space to the audit trail; commits will grow the file instead");
                false
            }
        }
    }

    /// Writes zeros over `from..to` (`from` is where the file's zeroed
    /// space ends) and counts them as ready space.
    fn zero_fill(&mut self, from: u64, to: u64) -> std::io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            if let Err(e) = self.file.write_all_at(&ZEROS[..n], at) {
                // Zeros written before the disk filled would take the room
                // the next records need; best effort, as readers skip them.
                let _ = self.file.set_len(from);
                return Err(e);
            }
            at += n as u64;
        }
        self.allocated = self.allocated.max(to);
        Ok(())
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
        AuditError::Poisoned(reason)
    }

    /// Renames the full current file to the next `<path>.<n>` and starts a
    /// new one. The chain simply continues. A failure leaves the current
    /// file in use (it grows past the limit) and is retried a second later.
    fn rotate(&mut self) -> bool {
        // A rotated file ends on its last record, like any finished file.
        if let Err(e) = self.trim_unwritten() {
            tracing::warn!(error = %e, file = %self.path.display(), "could not cut the zeroed space off the audit file before rotating it; still appending to it");
            return false;
        }
        let mut target = rotated_path(&self.path, self.next_rotation);
        while target.exists() {
            self.next_rotation += 1;
            target = rotated_path(&self.path, self.next_rotation);
        }
        if let Err(e) = std::fs::rename(&self.path, &target) {
            tracing::warn!(error = %e, file = %self.path.display(), "could not rotate the audit trail; still appending to the current file");
            return false;
        }
        self.next_rotation += 1;
        let opened =
            open_current(&self.path, &self.dir).and_then(|(file, len)| match lock_current(&file) {
                Ok(true) => Ok((file, len)),
                Ok(false) => Err(AuditError::Locked {
                    path: self.path.clone(),
                    lock: self.path.clone(),
                }),
                Err(source) => Err(AuditError::Io {
                    path: self.path.clone(),
                    source,
                }),
            });
        match opened {
            Ok((file, len)) => {
                if let Err(e) = sync_dir(&self.dir) {
                    tracing::warn!(error = %e, "fsync of the audit directory after rotation failed");
                }
                self.file = Arc::new(file);
                self.file_len = len;
                self.allocated = len;
                true
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
                false
            }
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
        crate::audit::test_signers::ca_signer()
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
        let outcomes = log.append_all(&events).await;
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
    fn concurrent_appenders_share_one_chain_and_every_record_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), 64 << 20, 1 << 20);
        let (signer, root) = signer_and_root();
        let log = AuditLog::open(&config, signer).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| {
                            let receipt = log
                                .append_blocking(AuditEvent::new(
                                    EventKind::Denied,
                                    format!("t{t}-{i}"),
                                ))
                                .unwrap();
                            // Answered only once its sync has returned.
                            assert!(log.shared.lock().durable_seq > receipt.seq);
                            receipt.seq
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=400).collect::<Vec<_>>(), "one chain, no gaps");
        log.close();
        let report = crate::audit::verify(&config.path, &[root]).unwrap();
        assert_eq!(report.last_seq, Some(401), "started, 400 records, close");
        assert_eq!(report.end, crate::audit::TrailEnd::Closed);
    }

    #[test]
    fn a_record_nobody_waits_for_still_reaches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), 64 << 20, 1 << 20);
        let log = AuditLog::open(&config, signer()).unwrap();
        let written = log.shared.lock().writer.chain.next_seq;
        drop(
            log.start_append(AuditEvent::new(EventKind::Denied, "dropped"))
                .unwrap(),
        );
        // The background thread syncs it: nothing else would.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while log.shared.lock().durable_seq <= written {
            assert!(
                std::time::Instant::now() < deadline,
                "the dropped append was never synced"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
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
