//! `cargo bench --bench tasks [-- --quick] [--ttl 30s]`: task churn against
//! a real `writ` — BeginTask until the bound process holds the task SVID,
//! EndTask until its stream drops it and the CRL lists the serial, and
//! sustained begin+fetch+end cycles. Bound processes are long-lived workers
//! (this binary re-executed with `--worker`), so process spawning is not timed.

mod common;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{BENCH_ID, Summary, Writ, between, fmt_duration, now_ns, print_table, summarize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use writ::cli::client::{connect, workload_client};
use writ::proto::admin as apb;
use writ::proto::workload as pb;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// How long any single wait may take before the run is declared broken.
const WAIT: Duration = Duration::from_secs(10);
/// No churn loop does more cycles than this, whatever its duration.
const MAX_CYCLES_PER_LOOP: usize = 1_000_000;
/// A loop gives up after this many failed cycles.
const MAX_ERRORS_PER_LOOP: usize = 100;
/// A held-stream worker gives up after this many broken streams.
const MAX_RECONNECTS: usize = 100_000;

struct Plan {
    latency_samples: usize,
    latency_warmup: usize,
    level_duration: Duration,
    levels: Vec<usize>,
    fetch_modes: Vec<FetchMode>,
    latency: bool,
    ttl: String,
    idle_streams: usize,
    admin_connection_per_loop: bool,
}

fn main() -> Result<()> {
    let args = common::parse_args()?;
    if let Some(worker_args) = &args.worker {
        return worker::main(worker_args);
    }
    let ttl = args.ttl.clone().unwrap_or_else(|| "30s".to_owned());
    let levels = args.levels.clone().unwrap_or_else(|| vec![1, 8, 32]);
    let fetch_modes = match args.fetch.as_deref() {
        Some("held") => vec![FetchMode::HeldStream],
        Some(_) => vec![FetchMode::NewConnection],
        None => vec![FetchMode::HeldStream, FetchMode::NewConnection],
    };
    let latency = !args.skip_latency;
    let mut plan = if args.quick {
        Plan {
            latency_samples: 200,
            latency_warmup: 20,
            level_duration: Duration::from_millis(1500),
            levels,
            fetch_modes,
            latency,
            ttl,
            idle_streams: args.idle_streams,
            admin_connection_per_loop: args.admin_connection_per_loop,
        }
    } else {
        Plan {
            latency_samples: 1_000,
            latency_warmup: 100,
            level_duration: Duration::from_secs(5),
            levels,
            fetch_modes,
            latency,
            ttl,
            idle_streams: args.idle_streams,
            admin_connection_per_loop: args.admin_connection_per_loop,
        }
    };
    if let Some(duration) = args.duration {
        plan.level_duration = duration;
    }
    common::print_machine("tasks", &args);
    println!(
        "- task ttl: {} (task SVIDs, hence CRL entries, live this long)",
        plan.ttl
    );
    if plan.idle_streams > 0 {
        println!(
            "- idle streams: {} more workers hold a FetchX509SVID stream through each churn level and are never bound to a task",
            plan.idle_streams
        );
    }
    println!(
        "- admin API: {}",
        if plan.admin_connection_per_loop {
            "each churn loop on a connection of its own"
        } else {
            "all churn loops on one connection (one client, as an orchestrator holds it)"
        }
    );
    let fsync = common::fsync_probe(&std::env::temp_dir(), 200)?;
    println!(
        "- fdatasync of 4 KiB in the state dir's filesystem: p50 {}, p99 {}, max {}",
        fmt_duration(fsync.p50),
        fmt_duration(fsync.p99),
        fmt_duration(fsync.max)
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(common::until_interrupted(run(plan)))
}

async fn run(plan: Plan) -> Result<()> {
    let latency = if plan.latency {
        Some(latencies(&plan).await?)
    } else {
        None
    };
    let mut levels = Vec::new();
    for &mode in &plan.fetch_modes {
        for &loops in &plan.levels {
            levels.push(
                churn(
                    mode,
                    loops,
                    plan.idle_streams,
                    plan.admin_connection_per_loop,
                    plan.level_duration,
                    &plan.ttl,
                )
                .await?,
            );
        }
    }

    let row = |what: &str, s: &Summary| {
        vec![
            what.to_owned(),
            s.n.to_string(),
            fmt_duration(s.p50),
            fmt_duration(s.p90),
            fmt_duration(s.p99),
            fmt_duration(s.max),
        ]
    };
    if let Some(latency) = &latency {
        print_table(
            "Task latency, one task at a time, one bound worker holding a FetchX509SVID stream, bench holding a FetchX509Bundles stream",
            &["interval", "n", "p50", "p90", "p99", "max"],
            &[
                row("BeginTask sent -> BeginTask returned", &latency.begin_rpc),
                row(
                    "BeginTask sent -> worker stream has the task SVID (goal p99 < 2 ms)",
                    &latency.begin_to_svid,
                ),
                row("EndTask sent -> EndTask returned", &latency.end_rpc),
                row(
                    "EndTask sent -> worker stream without the task",
                    &latency.end_to_stream,
                ),
                row(
                    "EndTask sent -> bundles stream CRL lists the serial",
                    &latency.end_to_crl,
                ),
                row(
                    "EndTask sent -> both of the above (goal p99 < 10 ms)",
                    &latency.end_to_both,
                ),
            ],
        );
    }
    print_table(
        &format!(
            "Sustained churn, {:.1} s per level, fresh writ per level; cycle = BeginTask, bound worker receives the task SVID, EndTask returns (goal: >= 2,000 tasks/s)",
            plan.level_duration.as_secs_f64()
        ),
        &[
            "fetch",
            "loops",
            "tasks",
            "failed cycles",
            "streams ended by writ",
            "tasks/s",
            "slowest 1 s",
            "cycle p50",
            "cycle p99",
            "cycle max",
        ],
        &levels
            .iter()
            .map(ChurnLevel::throughput_row)
            .collect::<Vec<_>>(),
    );
    print_table(
        "Where the time went during each churn level (CPU as % of ONE core; the machine has 2)",
        &[
            "fetch",
            "loops",
            "writ CPU",
            "writ CPU per task",
            "bench + workers CPU",
            "machine busy (all cores, incl. other users)",
            "worker messages per task",
            "idle-stream messages per s",
            "CRL at end",
            "writ VmHWM",
            "writ disk writes per task",
        ],
        &levels
            .iter()
            .map(ChurnLevel::resources_row)
            .collect::<Vec<_>>(),
    );
    println!("\nTasks completed in each whole second of each level:");
    for level in &levels {
        println!(
            "- {} x{}: {}",
            level.mode.label(),
            level.loops,
            level
                .per_second()
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!(
        "\nfetch = held stream: each worker keeps one FetchX509SVID stream open and the task SVID arrives as a stream update."
    );
    println!(
        "fetch = new connection: on each task the worker opens a fresh connection and FetchX509SVID, takes the first message, hangs up."
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Bound worker processes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchMode {
    HeldStream,
    NewConnection,
}

impl FetchMode {
    fn arg(self) -> &'static str {
        match self {
            FetchMode::HeldStream => "hold",
            FetchMode::NewConnection => "pull",
        }
    }
    fn label(self) -> &'static str {
        match self {
            FetchMode::HeldStream => "held stream",
            FetchMode::NewConnection => "new connection",
        }
    }
}

/// One Workload API message as a worker saw it.
#[derive(Debug)]
struct Update {
    /// When the worker had the decoded message (wall clock, see `now_ns`).
    at_ns: i64,
    first_serial: String,
    ids: Vec<String>,
}

impl Update {
    fn parse(line: &str) -> Option<Update> {
        let mut parts = line.strip_prefix("U ")?.split(' ');
        let at_ns = parts.next()?.parse().ok()?;
        let first_serial = parts.next()?.to_owned();
        let ids = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Some(Update {
            at_ns,
            first_serial,
            ids,
        })
    }
}

/// A child process the bench spawned (so it may bind tasks to it) that
/// reports every Workload API message it receives as a line on stdout.
struct Worker {
    child: tokio::process::Child,
    pid: i32,
    updates: mpsc::UnboundedReceiver<Update>,
    stdin: Option<tokio::process::ChildStdin>,
    /// Streams writ ended with an error status (the worker reconnected).
    stream_errors: Arc<AtomicUsize>,
    /// Every Workload API message the worker received.
    messages: Arc<AtomicUsize>,
}

impl Worker {
    /// Must be called from the main thread (see `worker::main`).
    fn spawn(mode: FetchMode, socket: &Path) -> Result<Worker> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--worker")
            .arg(mode.arg())
            .arg(socket)
            .arg(std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning a worker")?;
        let pid = child.id().context("worker has no pid")? as i32;
        let stdout = child.stdout.take().context("worker stdout")?;
        let stdin = child.stdin.take();
        let (tx, updates) = mpsc::unbounded_channel();
        let stream_errors = Arc::new(AtomicUsize::new(0));
        let messages = Arc::new(AtomicUsize::new(0));
        let errors = stream_errors.clone();
        let received = messages.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("R ") {
                    errors.fetch_add(1, Ordering::Relaxed);
                } else if let Some(update) = Update::parse(&line) {
                    received.fetch_add(1, Ordering::Relaxed);
                    if tx.send(update).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Worker {
            child,
            pid,
            updates,
            stdin,
            stream_errors,
            messages,
        })
    }

    /// Waits for the first update that satisfies `wanted`, skipping others.
    async fn wait_for(&mut self, what: &str, wanted: impl Fn(&Update) -> bool) -> Result<Update> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.updates.recv()).await {
                Ok(Some(update)) if wanted(&update) => return Ok(update),
                Ok(Some(_)) => {}
                Ok(None) => bail!("worker {} exited while waiting for {what}", self.pid),
                Err(_) => bail!("worker {}: no {what} within {WAIT:?}", self.pid),
            }
        }
    }

    /// Asks a new-connection worker to fetch once.
    async fn request_fetch(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("worker stdin closed")?;
        stdin.write_all(b"F\n").await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Kills the worker and says what it used and saw.
    async fn stop(mut self) -> WorkerTotals {
        let cpu = common::cpu_time_of(self.pid as u32).unwrap_or_default();
        drop(self.stdin.take());
        let _ = self.child.kill().await;
        WorkerTotals {
            cpu,
            stream_errors: self.stream_errors.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
        }
    }
}

struct WorkerTotals {
    cpu: Duration,
    stream_errors: usize,
    messages: usize,
}

mod worker {
    //! The body of a worker process.
    use super::*;

    /// `--worker <hold|pull> <socket> <bench pid>`.
    pub fn main(args: &[String]) -> Result<()> {
        let [mode, socket, parent] = args else {
            bail!("usage: --worker <hold|pull> <socket> <parent pid>");
        };
        let parent: i32 = parent.parse().context("parent pid")?;
        // Die with the bench, whatever kills it; and if it is already gone,
        // do not start at all.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        if nix::unistd::getppid().as_raw() != parent {
            return Ok(());
        }
        let socket = PathBuf::from(socket);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match mode.as_str() {
            "hold" => runtime.block_on(hold(&socket)),
            "pull" => runtime.block_on(pull(&socket)),
            other => bail!("unknown worker mode {other:?}"),
        }
    }

    fn report(message: &pb::X509svidResponse) -> Result<()> {
        let at = now_ns();
        let first = message.svids.first().context("message without SVIDs")?;
        let (_, cert) = X509Certificate::from_der(&first.x509_svid)
            .map_err(|e| anyhow::anyhow!("parsing SVID: {e}"))?;
        let ids: Vec<&str> = message.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "U {at} {} {}",
            hex::encode(cert.raw_serial()),
            ids.join(",")
        )?;
        out.flush()?;
        Ok(())
    }

    /// Follows a FetchX509SVID stream and reports every message. When writ
    /// ends the stream with an error status (it does so with Unavailable when
    /// a task completes while its SVID is being issued) the worker says so
    /// (`R` line) and reconnects at once, as SPIFFE clients retry.
    async fn hold(socket: &Path) -> Result<()> {
        for _ in 0..MAX_RECONNECTS {
            let status = match follow(socket).await {
                Ok(()) => "stream ended without a status".to_owned(),
                Err(e) => format!("{e:#}").replace('\n', " "),
            };
            let mut out = std::io::stdout().lock();
            writeln!(out, "R {status}")?;
            out.flush()?;
        }
        bail!("gave up after {MAX_RECONNECTS} reconnects")
    }

    async fn follow(socket: &Path) -> Result<()> {
        let mut client = workload_client(socket).await?;
        let mut stream = client
            .fetch_x509svid(pb::X509svidRequest {})
            .await?
            .into_inner();
        while let Some(message) = stream.message().await? {
            report(&message)?;
        }
        Ok(())
    }

    /// For each `F` line on stdin: a fresh connection, FetchX509SVID, the
    /// first message reported, then hang up.
    async fn pull(socket: &Path) -> Result<()> {
        // tokio's stdin is not enabled in this build; a plain thread reads it.
        let (tx, mut requests) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if line.trim() == "F" && tx.send(()).is_err() {
                    return;
                }
            }
        });
        while requests.recv().await.is_some() {
            let mut client = workload_client(socket).await?;
            let mut stream = client
                .fetch_x509svid(pb::X509svidRequest {})
                .await?
                .into_inner();
            let message = stream.message().await?.context("stream ended early")?;
            report(&message)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Admin API helpers.

type Tasks = apb::tasks_client::TasksClient<Channel>;

async fn tasks_client(writ: &Writ) -> Result<Tasks> {
    Ok(apb::tasks_client::TasksClient::new(
        connect(&writ.admin_socket).await?,
    ))
}

fn begin_request(task_id: &str, pid: i32, ttl: &str) -> apb::BeginTaskRequest {
    apb::BeginTaskRequest {
        task_id: task_id.to_owned(),
        binding: Some(apb::Binding {
            target: Some(apb::binding::Target::Pid(pid)),
        }),
        ttl: ttl.to_owned(),
        intent: Some(apb::Intent {
            purpose: "bench".into(),
            tools: vec!["search".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn end_request(task_id: &str) -> apb::EndTaskRequest {
    apb::EndTaskRequest {
        task_id: task_id.to_owned(),
        reason: "bench".into(),
    }
}

fn task_spiffe_id(task_id: &str) -> String {
    format!("{BENCH_ID}/task/{task_id}")
}

/// Serial numbers (hex) in a set of DER CRLs.
fn revoked_serials(crls: &[bytes::Bytes]) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for der in crls {
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| anyhow::anyhow!("parsing CRL: {e}"))?;
        for revoked in crl.iter_revoked_certificates() {
            out.insert(hex::encode(revoked.raw_serial()));
        }
    }
    Ok(out)
}

/// The bench's own FetchX509Bundles stream: every message stamped on
/// arrival, CRLs parsed later by whoever waits.
async fn watch_bundles(writ: &Writ) -> Result<mpsc::UnboundedReceiver<(i64, Vec<bytes::Bytes>)>> {
    let mut client = workload_client(&writ.socket).await?;
    let mut stream = client
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await?
        .into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _client = client;
        while let Ok(Some(message)) = stream.message().await {
            if tx.send((now_ns(), message.crl)).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// One fetch of the CRL: (entries, DER bytes).
async fn crl_size(writ: &Writ) -> Result<(usize, usize)> {
    let mut client = workload_client(&writ.socket).await?;
    let message = client
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await?
        .into_inner()
        .message()
        .await?
        .context("bundles stream ended early")?;
    let bytes = message.crl.iter().map(bytes::Bytes::len).sum();
    Ok((revoked_serials(&message.crl)?.len(), bytes))
}

// ---------------------------------------------------------------------------
// Latency, one task at a time.

struct Latencies {
    begin_rpc: Summary,
    begin_to_svid: Summary,
    end_rpc: Summary,
    end_to_stream: Summary,
    end_to_crl: Summary,
    end_to_both: Summary,
}

async fn latencies(plan: &Plan) -> Result<Latencies> {
    let mut writ = Writ::start("")?;
    let mut admin = tasks_client(&writ).await?;
    let mut worker = Worker::spawn(FetchMode::HeldStream, &writ.socket)?;
    worker
        .wait_for("the first SVID", |u| {
            u.ids.first().map(String::as_str) == Some(BENCH_ID)
        })
        .await?;
    let mut crls = watch_bundles(&writ).await?;

    let mut begin_rpc = Vec::new();
    let mut begin_to_svid = Vec::new();
    let mut end_rpc = Vec::new();
    let mut end_to_stream = Vec::new();
    let mut end_to_crl = Vec::new();
    let mut end_to_both = Vec::new();
    for i in 0..plan.latency_warmup + plan.latency_samples {
        let task_id = format!("lat-{i}");
        let want = task_spiffe_id(&task_id);

        let sent = now_ns();
        admin
            .begin_task(begin_request(&task_id, worker.pid, &plan.ttl))
            .await?;
        let returned = now_ns();
        let held = worker
            .wait_for("the task SVID", |u| u.ids.first() == Some(&want))
            .await?;

        let end_sent = now_ns();
        admin.end_task(end_request(&task_id)).await?;
        let end_returned = now_ns();
        let dropped = worker
            .wait_for("an update without the task", |u| !u.ids.contains(&want))
            .await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        let revoked_at = loop {
            match tokio::time::timeout_at(deadline, crls.recv()).await {
                Ok(Some((at, ders))) => {
                    if revoked_serials(&ders)?.contains(&held.first_serial) {
                        break at;
                    }
                }
                Ok(None) => bail!("bundles stream ended"),
                Err(_) => bail!(
                    "serial {} not in any CRL within {WAIT:?}",
                    held.first_serial
                ),
            }
        };
        if i < plan.latency_warmup {
            continue;
        }
        begin_rpc.push(between(sent, returned)?);
        begin_to_svid.push(between(sent, held.at_ns)?);
        end_rpc.push(between(end_sent, end_returned)?);
        end_to_stream.push(between(end_sent, dropped.at_ns)?);
        end_to_crl.push(between(end_sent, revoked_at)?);
        end_to_both.push(between(end_sent, dropped.at_ns.max(revoked_at))?);
    }
    writ.check_alive()?;
    let stream_errors = worker.stop().await.stream_errors;
    if stream_errors > 0 {
        println!(
            "- latency run: the worker's stream was ended by writ {stream_errors} times (it reconnected)"
        );
    }
    Ok(Latencies {
        begin_rpc: summarize(&begin_rpc),
        begin_to_svid: summarize(&begin_to_svid),
        end_rpc: summarize(&end_rpc),
        end_to_stream: summarize(&end_to_stream),
        end_to_crl: summarize(&end_to_crl),
        end_to_both: summarize(&end_to_both),
    })
}

// ---------------------------------------------------------------------------
// Sustained churn.

struct ChurnLevel {
    mode: FetchMode,
    loops: usize,
    cycles: Vec<Duration>,
    /// When each cycle finished, from the level's start.
    finished: Vec<Duration>,
    errors: usize,
    stream_errors: usize,
    /// Messages all workers received, warm-up included.
    worker_messages: usize,
    /// Messages the idle workers received during the level.
    idle_messages: usize,
    elapsed: Duration,
    crl: (usize, usize),
    writ_cpu: Duration,
    /// The bench process and its workers.
    client_cpu: Duration,
    machine_busy: f64,
    writ_hwm_kib: u64,
    /// Bytes writ wrote to storage during the level (`/proc/<pid>/io`).
    writ_disk_writes: u64,
}

impl ChurnLevel {
    /// Cycles finished in each whole second; a last partial second is left
    /// out, as it would read as a dip.
    fn per_second(&self) -> Vec<usize> {
        let mut per_second = vec![0usize; self.elapsed.as_secs() as usize];
        for f in &self.finished {
            if let Some(bucket) = per_second.get_mut(f.as_secs() as usize) {
                *bucket += 1;
            }
        }
        per_second
    }

    fn throughput_row(&self) -> Vec<String> {
        let s = summarize(&self.cycles);
        let slowest = self
            .per_second()
            .iter()
            .min()
            .map_or("-".to_owned(), usize::to_string);
        vec![
            self.mode.label().to_owned(),
            self.loops.to_string(),
            s.n.to_string(),
            self.errors.to_string(),
            self.stream_errors.to_string(),
            format!("{:.0}", s.n as f64 / self.elapsed.as_secs_f64()),
            slowest,
            fmt_duration(s.p50),
            fmt_duration(s.p99),
            fmt_duration(s.max),
        ]
    }

    fn resources_row(&self) -> Vec<String> {
        let secs = self.elapsed.as_secs_f64();
        let per_task = if self.cycles.is_empty() {
            "-".to_owned()
        } else {
            fmt_duration(self.writ_cpu / self.cycles.len() as u32)
        };
        vec![
            self.mode.label().to_owned(),
            self.loops.to_string(),
            format!("{:.0}%", 100.0 * self.writ_cpu.as_secs_f64() / secs),
            per_task,
            format!("{:.0}%", 100.0 * self.client_cpu.as_secs_f64() / secs),
            format!("{:.0}%", self.machine_busy),
            if self.cycles.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{:.1}",
                    self.worker_messages as f64 / self.cycles.len() as f64
                )
            },
            format!("{:.0}", self.idle_messages as f64 / secs),
            format!("{} entries, {} KiB", self.crl.0, self.crl.1 / 1024),
            common::fmt_mib(self.writ_hwm_kib),
            if self.cycles.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{:.0} KiB",
                    self.writ_disk_writes as f64 / 1024.0 / self.cycles.len() as f64
                )
            },
        ]
    }
}

async fn churn(
    mode: FetchMode,
    loops: usize,
    idle_streams: usize,
    admin_connection_per_loop: bool,
    duration: Duration,
    ttl: &str,
) -> Result<ChurnLevel> {
    let mut writ = Writ::start("")?;
    let mut workers = Vec::with_capacity(loops);
    for _ in 0..loops {
        workers.push(Worker::spawn(mode, &writ.socket)?);
    }
    // Bystanders: their streams see every change the churn makes, and
    // whatever writ sends them is counted, as is their CPU.
    let mut idle = Vec::with_capacity(idle_streams);
    for _ in 0..idle_streams {
        let mut worker = Worker::spawn(FetchMode::HeldStream, &writ.socket)?;
        worker
            .wait_for("the first SVID", |u| !u.ids.is_empty())
            .await?;
        idle.push(worker);
    }
    let idle_messages_before: usize = idle
        .iter()
        .map(|w| w.messages.load(Ordering::Relaxed))
        .sum();
    let idle_cpu_before: Duration = idle
        .iter()
        .map(|w| common::cpu_time_of(w.pid as u32).unwrap_or_default())
        .sum();
    // An orchestrator holds one client and sends its calls over it
    // concurrently, as gRPC clients multiplex; a connection per loop is
    // the other way to drive the churn (`--admin-connections per-loop`).
    let shared_admin = if admin_connection_per_loop {
        None
    } else {
        Some(tasks_client(&writ).await?)
    };
    let mut prepared = Vec::with_capacity(loops);
    for mut worker in workers {
        // Warm up: the worker's runtime is running and writ has seen it.
        if mode == FetchMode::NewConnection {
            worker.request_fetch().await?;
        }
        worker
            .wait_for("the first SVID", |u| !u.ids.is_empty())
            .await?;
        let admin = match &shared_admin {
            Some(client) => client.clone(),
            None => tasks_client(&writ).await?,
        };
        prepared.push((admin, worker));
    }

    let bench_pid = std::process::id();
    let writ_cpu_before = writ.cpu_time()?;
    let writ_writes_before = writ.disk_writes()?;
    let bench_cpu_before = common::cpu_time_of(bench_pid)?;
    let machine_before = common::machine_cpu()?;
    let start = Instant::now();
    let deadline = start + duration;
    let ttl = ttl.to_owned();
    let handles: Vec<_> = prepared
        .into_iter()
        .enumerate()
        .map(|(index, (mut admin, mut worker))| {
            let ttl = ttl.clone();
            tokio::spawn(async move {
                let mut cycles = Vec::new();
                let mut finished = Vec::new();
                let mut errors = 0usize;
                let mut n = 0usize;
                while Instant::now() < deadline
                    && n < MAX_CYCLES_PER_LOOP
                    && errors < MAX_ERRORS_PER_LOOP
                {
                    let task_id = format!("c{index}-{n}");
                    n += 1;
                    let t = Instant::now();
                    match cycle(&mut admin, &mut worker, mode, &task_id, &ttl).await {
                        Ok(()) => {
                            cycles.push(t.elapsed());
                            finished.push(start.elapsed());
                        }
                        Err(e) => {
                            if errors == 0 {
                                eprintln!("churn loop {index}: {e:#}");
                            }
                            errors += 1;
                        }
                    }
                }
                let end = Instant::now();
                let totals = worker.stop().await;
                (cycles, finished, errors, totals, end)
            })
        })
        .collect();
    let mut level = ChurnLevel {
        mode,
        loops,
        cycles: Vec::new(),
        finished: Vec::new(),
        errors: 0,
        stream_errors: 0,
        worker_messages: 0,
        idle_messages: 0,
        elapsed: Duration::ZERO,
        crl: (0, 0),
        writ_cpu: Duration::ZERO,
        client_cpu: Duration::ZERO,
        machine_busy: 0.0,
        writ_hwm_kib: 0,
        writ_disk_writes: 0,
    };
    let mut last_end = start;
    for handle in handles {
        let (cycles, finished, errors, totals, end) =
            handle.await.context("churn loop panicked")?;
        level.cycles.extend(cycles);
        level.finished.extend(finished);
        level.errors += errors;
        level.stream_errors += totals.stream_errors;
        level.worker_messages += totals.messages;
        level.client_cpu += totals.cpu;
        last_end = last_end.max(end);
    }
    level.elapsed = last_end - start;
    for worker in idle {
        let totals = worker.stop().await;
        level.idle_messages += totals.messages;
        level.stream_errors += totals.stream_errors;
        level.client_cpu += totals.cpu;
    }
    level.idle_messages = level.idle_messages.saturating_sub(idle_messages_before);
    level.client_cpu = level.client_cpu.saturating_sub(idle_cpu_before);
    level.machine_busy = common::busy_percent(machine_before, common::machine_cpu()?);
    level.writ_cpu = writ.cpu_time()?.saturating_sub(writ_cpu_before);
    level.writ_disk_writes = writ.disk_writes()?.saturating_sub(writ_writes_before);
    level.client_cpu += common::cpu_time_of(bench_pid)?.saturating_sub(bench_cpu_before);
    writ.check_alive()?;
    level.crl = crl_size(&writ).await?;
    level.writ_hwm_kib = writ.memory()?.hwm_kib;
    Ok(level)
}

/// Begin a task bound to the worker, wait until the worker holds its SVID,
/// end it (EndTask returns once the revocation is durable and the CRL signed).
async fn cycle(
    admin: &mut Tasks,
    worker: &mut Worker,
    mode: FetchMode,
    task_id: &str,
    ttl: &str,
) -> Result<()> {
    let want = task_spiffe_id(task_id);
    admin
        .begin_task(begin_request(task_id, worker.pid, ttl))
        .await?;
    if mode == FetchMode::NewConnection {
        worker.request_fetch().await?;
    }
    worker
        .wait_for("the task SVID", |u| u.ids.first() == Some(&want))
        .await?;
    admin.end_task(end_request(task_id)).await?;
    Ok(())
}
