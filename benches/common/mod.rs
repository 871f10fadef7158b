//! Shared bench harness: starts the real `writ` binary on a private temp dir
//! with a generated config (entries for the bench's own uid), reads its memory
//! and CPU from /proc, and turns samples into the percentiles the tables show.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

/// The `writ` binary the benches start: the one cargo built with them, or
/// `WRIT_BENCH_BINARY` to compare another build (another commit, say) under
/// the same harness.
pub static WRIT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("WRIT_BENCH_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_writ").to_owned())
});
/// The identity every process of the bench's uid holds from the config entry;
/// task identities are derived from it (`<BENCH_ID>/task/<id>`).
pub const BENCH_ID: &str = "spiffe://writ.test/bench";

/// Command-line options every bench understands. `cargo bench` itself passes
/// `--bench`, which is accepted and ignored.
#[derive(Debug, Default)]
pub struct Args {
    pub quick: bool,
    pub ttl: Option<String>,
    /// Seconds per load level instead of the default.
    pub duration: Option<Duration>,
    /// Concurrency levels instead of the default (clients or loops).
    pub levels: Option<Vec<usize>>,
    /// tasks only: run the churn with this fetch mode alone (`held`/`new`).
    pub fetch: Option<String>,
    /// tasks only: skip the one-at-a-time latency run.
    pub skip_latency: bool,
    /// tasks only: this many more workers hold a FetchX509SVID stream
    /// through each churn level without ever being bound to a task.
    pub idle_streams: usize,
    /// tasks only: each churn loop on an admin connection of its own
    /// instead of all on one.
    pub admin_connection_per_loop: bool,
    /// Set when this process was re-executed as a helper (`--worker ...`).
    pub worker: Option<Vec<String>>,
}

pub fn parse_args() -> Result<Args> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "--quick" => args.quick = true,
            "--ttl" => args.ttl = Some(it.next().context("--ttl needs a duration")?),
            "--duration" => {
                let secs: f64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|s: &f64| *s > 0.0 && *s <= 600.0)
                    .context("--duration needs seconds, at most 600")?;
                args.duration = Some(Duration::from_secs_f64(secs));
            }
            "--levels" => {
                let list = it.next().context("--levels needs a list such as 1,16")?;
                let levels = list
                    .split(',')
                    .map(|v| v.parse().ok().filter(|n: &usize| (1..=1024).contains(n)))
                    .collect::<Option<Vec<usize>>>()
                    .context("--levels takes numbers from 1 to 1024, comma-separated")?;
                args.levels = Some(levels);
            }
            "--fetch" => {
                let mode = it.next().context("--fetch needs held or new")?;
                if mode != "held" && mode != "new" {
                    bail!("--fetch takes held or new, not {mode:?}");
                }
                args.fetch = Some(mode);
            }
            "--skip-latency" => args.skip_latency = true,
            "--idle-streams" => {
                args.idle_streams = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n: &usize| *n <= 1024)
                    .context("--idle-streams needs a number from 0 to 1024")?;
            }
            "--admin-connections" => {
                args.admin_connection_per_loop = match it
                    .next()
                    .context("--admin-connections needs shared or per-loop")?
                    .as_str()
                {
                    "shared" => false,
                    "per-loop" => true,
                    other => bail!("--admin-connections takes shared or per-loop, not {other:?}"),
                };
            }
            "--worker" => {
                args.worker = Some(it.by_ref().collect());
                break;
            }
            other => {
                bail!(
                    "unknown argument {other:?}; options: --quick, --duration SECS, --levels N,N,.. \
                 (tasks also: --ttl D, --fetch held|new, --skip-latency, --idle-streams N, \
                 --admin-connections shared|per-loop)"
                )
            }
        }
    }
    Ok(args)
}

/// Memory figures from /proc/<pid>/status, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// The part of VmRSS that is the process's own memory (heap, stacks).
    pub anon_kib: u64,
    /// The part of VmRSS mapped from files: mostly the executable's pages
    /// in the page cache, shared with every other process mapping them.
    pub file_kib: u64,
}

impl Memory {
    pub fn describe(&self) -> String {
        format!(
            "VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            self.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0
        )
    }
}

pub fn memory_of(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        anon_kib: field("RssAnon:")?,
        file_kib: field("RssFile:")?,
    })
}

/// Bytes the process has caused to be written to storage so far
/// (`write_bytes` in `/proc/<pid>/io`: page-cache pages it dirtied, counted
/// again each time a synced page is dirtied anew).
pub fn disk_writes_of(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no write_bytes in /proc/{pid}/io"))
}

/// User plus system CPU time the process has used so far.
pub fn cpu_time_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses; fields after the
    // last ')' are fixed: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("malformed /proc/<pid>/stat")
    };
    let total = ticks(11)? + ticks(12)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)
        .unwrap_or(100) as u64;
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

/// A running `writ run` on a fresh temp dir. Dropping it (also while
/// unwinding from a panic) kills the process, then removes the directory.
pub struct Writ {
    child: Option<Child>,
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    // Declared last so it is removed only after the process is gone.
    dir: tempfile::TempDir,
}

/// `setpriv --pdeathsig KILL` makes the kernel kill writ if the bench itself
/// dies without unwinding (SIGKILL, abort), so no agent is left behind.
pub fn setpriv() -> Option<&'static str> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

impl Writ {
    /// Starts writ with `extra` appended to a config whose one entry gives the
    /// bench's uid `BENCH_ID`, and whose admin API authorizes that uid. Must
    /// be called from the main thread: the parent-death signal is tied to
    /// the thread that forks.
    pub fn start(extra: &str) -> Result<Writ> {
        let dir = tempfile::Builder::new()
            .prefix("writ-bench-")
            .tempdir()
            .context("creating the temp dir")?;
        let uid = nix::unistd::geteuid().as_raw();
        let socket = dir.path().join("run/workload.sock");
        let admin_socket = dir.path().join("run/admin.sock");
        let config_path = dir.path().join("writ.toml");
        let config = format!(
            r#"trust_domain = "writ.test"
data_dir = "{data}"

[workload_api]
socket_path = "{socket}"

[admin_api]
socket_path = "{admin}"
authorized = [["unix:uid:{uid}"]]

[[entry]]
spiffe_id = "{BENCH_ID}"
selectors = ["unix:uid:{uid}"]

{extra}
"#,
            data = dir.path().join("state").display(),
            socket = socket.display(),
            admin = admin_socket.display(),
        );
        std::fs::write(&config_path, config).context("writing the config")?;
        let log = std::fs::File::create(dir.path().join("writ.log")).context("creating log")?;
        let mut command = match setpriv() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", WRIT.as_str()]);
                c
            }
            None => Command::new(WRIT.as_str()),
        };
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log")?)
            .stderr(log);
        let child = command.spawn().context("starting writ")?;
        let mut writ = Writ {
            child: Some(child),
            socket,
            admin_socket,
            dir,
        };
        writ.wait_ready()?;
        Ok(writ)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("writ exited early with {status}:\n{}", self.log());
            }
            let ready = self.admin_socket.exists()
                && Command::new(WRIT.as_str())
                    .args(["healthcheck", "--socket"])
                    .arg(&self.socket)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("writ did not become ready in 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn memory(&self) -> Result<Memory> {
        memory_of(self.pid())
    }

    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time_of(self.pid())
    }

    pub fn disk_writes(&self) -> Result<u64> {
        disk_writes_of(self.pid())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("writ.log")).unwrap_or_default()
    }

    /// Fails if writ has died (a crash under load is a result worth stopping for).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!("writ died with {status}:\n{}", self.log());
        }
        Ok(())
    }
}

impl Drop for Writ {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A helper child (such as `sleep`) killed and reaped when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `program args` so that it also dies with the bench (see
    /// `setpriv`). Call from the main thread.
    pub fn spawn(program: &str, args: &[&str]) -> Result<ChildGuard> {
        let mut command = match setpriv() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", program]);
                c
            }
            None => Command::new(program),
        };
        let child = command
            .args(args)
            .spawn()
            .with_context(|| format!("spawning {program}"))?;
        Ok(ChildGuard(child))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wall-clock nanoseconds. Used only for intervals whose two ends are taken
/// in different processes: std offers no monotonic clock readable across
/// processes, and both ends read the same kernel clock.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The interval between two `now_ns` stamps; an end before its start means
/// the wall clock stepped, which invalidates the run.
pub fn between(start_ns: i64, end_ns: i64) -> Result<Duration> {
    if end_ns < start_ns {
        bail!(
            "wall clock went backwards by {} ns during a sample",
            start_ns - end_ns
        );
    }
    Ok(Duration::from_nanos((end_ns - start_ns) as u64))
}

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub mean: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// What one client of a sustained-load level did before its deadline.
pub struct ClientRun {
    pub latencies: Vec<Duration>,
    pub errors: usize,
    pub first_error: Option<String>,
    pub ended: Instant,
}

impl ClientRun {
    pub fn new() -> Self {
        Self {
            latencies: Vec::new(),
            errors: 0,
            first_error: None,
            ended: Instant::now(),
        }
    }

    /// Whether this client should send another request.
    pub fn go_on(&self, deadline: Instant, max_requests: usize) -> bool {
        Instant::now() < deadline && self.latencies.len() + self.errors < max_requests
    }

    /// Records one request that started at `started`.
    pub fn record(&mut self, started: Instant, outcome: Result<()>) {
        match outcome {
            Ok(()) => self.latencies.push(started.elapsed()),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        self.ended = Instant::now();
    }
}

/// All clients of one level merged: latencies summarized, errors counted,
/// time from `start` until the last client stopped.
pub struct LevelTotals {
    pub clients: usize,
    pub summary: Summary,
    pub errors: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

pub async fn join_clients(
    start: Instant,
    handles: Vec<tokio::task::JoinHandle<ClientRun>>,
) -> Result<LevelTotals> {
    let clients = handles.len();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut last_end = start;
    for handle in handles {
        let run = handle.await.context("client task panicked")?;
        all.extend(run.latencies);
        errors += run.errors;
        if first_error.is_none() {
            first_error = run.first_error;
        }
        last_end = last_end.max(run.ended);
    }
    Ok(LevelTotals {
        clients,
        summary: summarize(&all),
        errors,
        first_error,
        elapsed: last_end - start,
    })
}

/// Nearest-rank percentiles.
pub fn summarize(samples: &[Duration]) -> Summary {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let at = |p: f64| -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        sorted[rank.clamp(1, n) - 1]
    };
    let total: Duration = sorted.iter().sum();
    Summary {
        n,
        mean: if n == 0 {
            Duration::ZERO
        } else {
            total / n as u32
        },
        p50: at(50.0),
        p90: at(90.0),
        p99: at(99.0),
        max: sorted.last().copied().unwrap_or_default(),
    }
}

/// µs below 1 ms, ms above, so every column reads at a glance.
pub fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

pub fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Prints a Markdown table, columns padded to their widest cell.
pub fn print_table(title: &str, headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from("|");
        for (cell, w) in cells.iter().zip(&widths) {
            let pad = w - cell.chars().count();
            let _ = write!(s, " {cell}{} |", " ".repeat(pad));
        }
        s
    };
    println!("\n### {title}\n");
    println!("{}", line(headers.to_vec()));
    let mut sep = String::from("|");
    for w in &widths {
        let _ = write!(sep, "{}|", "-".repeat(w + 2));
    }
    println!("{sep}");
    for row in rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
}

fn filesystem_of(path: &Path) -> String {
    use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC};
    match nix::sys::statfs::statfs(path) {
        Ok(s) => {
            let t = s.filesystem_type();
            // ext2/3/4 share one magic number.
            if t == EXT4_SUPER_MAGIC {
                "ext4".into()
            } else if t == TMPFS_MAGIC {
                "tmpfs (fsync is free: durability costs are NOT measured)".into()
            } else if t == XFS_SUPER_MAGIC {
                "xfs".into()
            } else if t == BTRFS_SUPER_MAGIC {
                "btrfs".into()
            } else {
                format!("{t:?}")
            }
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// What the numbers were measured on, printed above every run.
pub fn print_machine(bench: &str, args: &Args) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let tmp = std::env::temp_dir();
    println!(
        "## writ bench: {bench}{}\n",
        if args.quick { " (--quick)" } else { "" }
    );
    // The profile's output directory names it (`release` for plain
    // `cargo bench`, `dist` with `--profile dist`).
    let profile = Path::new(WRIT.as_str())
        .parent()
        .and_then(|dir| dir.file_name())
        .map_or_else(|| "?".to_owned(), |n| n.to_string_lossy().into_owned());
    println!(
        "- build: {}",
        if cfg!(debug_assertions) {
            "DEBUG (numbers are meaningless; use cargo bench)".to_owned()
        } else {
            format!("optimized, profile `{profile}` ({})", *WRIT)
        }
    );
    println!("- cores: {cores}; CPU: {cpu}; kernel {}", kernel.trim());
    println!("- load average at start: {}", load.trim());
    println!(
        "- state dir under {} on {}",
        tmp.display(),
        filesystem_of(&tmp)
    );
    println!(
        "- writ parent-death guard: {}",
        setpriv().map_or("none (setpriv not found)", |_| "setpriv --pdeathsig KILL")
    );
}

/// Jiffies the whole machine spent busy and in total so far (/proc/stat),
/// to tell a CPU-starved run from one limited by something else.
pub fn machine_cpu() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle and iowait are the 4th and 5th values.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Percentage of all cores busy between two `machine_cpu` readings.
pub fn busy_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1) as f64;
    if total == 0.0 {
        0.0
    } else {
        100.0 * busy / total
    }
}

/// Latency of a 4 KiB write plus fdatasync in `dir`: the floor under every
/// durable commit writ makes (SQLite WAL, synchronous=FULL).
pub fn fsync_probe(dir: &Path, n: usize) -> Result<Summary> {
    use std::io::Write as _;
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).context("creating the fsync probe file")?;
    let block = [0u8; 4096];
    let mut samples = Vec::with_capacity(n);
    let result = (|| -> Result<()> {
        for _ in 0..n {
            file.write_all(&block)?;
            let start = Instant::now();
            file.sync_data()?;
            samples.push(start.elapsed());
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(summarize(&samples))
}

/// Runs the bench, but on Ctrl-C drops it instead, so every guard (writ,
/// workers, temp dirs) is cleaned up as on any other early exit.
pub async fn until_interrupted(bench: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::select! {
        result = bench => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; writ stopped and temp dirs removed"),
    }
}
