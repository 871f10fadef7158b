//! `cargo bench --bench jwt [-- --quick]`: JWT-SVIDs from a real `writ` on its
//! Unix socket — sustained FetchJWTSVID (the caller's cached token re-served,
//! and a new token each call, audited and fsynced before it leaves) and
//! ValidateJWTSVID rates and latencies at 1 and 16 clients.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{Summary, Writ, fmt_duration, print_table};
use writ::cli::client::{WorkloadClient, workload_client};
use writ::proto::workload as pb;

/// The audience every token is issued for and validated against.
const AUDIENCE: &str = "bench";

/// No client loop runs longer than its level's duration, nor more requests.
const MAX_REQUESTS_PER_CLIENT: usize = 2_000_000;

/// Settings that `--quick` shrinks; every loop is bounded by these.
struct Plan {
    level_duration: Duration,
    levels: Vec<usize>,
    /// Requests each client makes on its connection before timing starts.
    warmup_per_client: usize,
    fsync_samples: usize,
}

fn main() -> Result<()> {
    let args = common::parse_args()?;
    if args.ttl.is_some() || args.fetch.is_some() || args.skip_latency {
        bail!("--ttl, --fetch and --skip-latency are options of the tasks bench");
    }
    let mut plan = if args.quick {
        Plan {
            level_duration: Duration::from_millis(1500),
            levels: vec![1, 16],
            warmup_per_client: 20,
            fsync_samples: 100,
        }
    } else {
        Plan {
            level_duration: Duration::from_secs(5),
            levels: vec![1, 16],
            warmup_per_client: 100,
            fsync_samples: 500,
        }
    };
    if let Some(duration) = args.duration {
        plan.level_duration = duration;
    }
    if let Some(levels) = args.levels.clone() {
        plan.levels = levels;
    }
    common::print_machine("jwt", &args);
    // Every issuance is fsynced to the audit trail, so the disk's own
    // latency is the floor under the fetch figures.
    let fsync = common::fsync_probe(&std::env::temp_dir(), plan.fsync_samples)?;
    println!(
        "- fdatasync of 4 KiB in the state dir's filesystem: p50 {}, p99 {}, max {} (n = {})",
        fmt_duration(fsync.p50),
        fmt_duration(fsync.p99),
        fmt_duration(fsync.max),
        fsync.n
    );
    // Two runtime threads on a two-core machine: the client load competes
    // with the agent for the same cores, as a co-located workload would.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(common::until_interrupted(run(plan)))
}

/// What each client request is.
#[derive(Clone)]
enum Op {
    /// The same audience every time: after the first call the agent hands
    /// the caller its cached token (until half-life).
    Fetch,
    /// A new audience every time, so every call signs, audits and fsyncs a
    /// new token.
    FetchNew,
    Validate(Arc<String>),
}

/// Makes every `FetchNew` audience unique.
static NEXT_AUDIENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn fetch(client: &mut WorkloadClient, audience: String) -> Result<String> {
    let response = client
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec![audience],
            spiffe_id: String::new(),
        })
        .await?
        .into_inner();
    let svid = response
        .svids
        .into_iter()
        .next()
        .context("FetchJWTSVID returned no token")?;
    if svid.spiffe_id != common::BENCH_ID || svid.svid.is_empty() {
        bail!("unexpected JWT-SVID for {:?}", svid.spiffe_id);
    }
    Ok(svid.svid)
}

async fn validate(client: &mut WorkloadClient, token: &str) -> Result<()> {
    let response = client
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: AUDIENCE.to_owned(),
            svid: token.to_owned(),
        })
        .await?
        .into_inner();
    if response.spiffe_id != common::BENCH_ID {
        bail!("token validated as {:?}", response.spiffe_id);
    }
    Ok(())
}

async fn request(client: &mut WorkloadClient, op: &Op) -> Result<()> {
    match op {
        Op::Fetch => fetch(client, AUDIENCE.to_owned()).await.map(drop),
        Op::FetchNew => {
            let n = NEXT_AUDIENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            fetch(client, format!("{AUDIENCE}-{n}")).await.map(drop)
        }
        Op::Validate(token) => validate(client, token).await,
    }
}

struct Level {
    clients: usize,
    summary: Summary,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
    /// Successful requests before timing started (warm-up).
    warmed: usize,
    writ_cpu: Duration,
    machine_busy: f64,
}

impl Level {
    fn rate(&self) -> f64 {
        self.summary.n as f64 / self.elapsed.as_secs_f64()
    }
}

/// `clients` connections (one HTTP/2 connection each), warmed up, then each
/// runs `op` back to back until the deadline.
async fn sustained(
    writ: &Writ,
    op: Op,
    clients: usize,
    warmup: usize,
    duration: Duration,
) -> Result<Level> {
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut client = workload_client(&writ.socket).await?;
        for _ in 0..warmup {
            request(&mut client, &op).await?;
        }
        connected.push(client);
    }
    let cpu_before = writ.cpu_time()?;
    let machine_before = common::machine_cpu()?;
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut run = common::ClientRun::new();
                while run.go_on(deadline, MAX_REQUESTS_PER_CLIENT) {
                    let t = Instant::now();
                    run.record(t, request(&mut client, &op).await);
                }
                run
            })
        })
        .collect();
    let totals = common::join_clients(start, handles).await?;
    let writ_cpu = writ.cpu_time()?.saturating_sub(cpu_before);
    let machine_busy = common::busy_percent(machine_before, common::machine_cpu()?);
    Ok(Level {
        clients: totals.clients,
        summary: totals.summary,
        errors: totals.errors,
        first_error: totals.first_error,
        elapsed: totals.elapsed,
        warmed: clients * warmup,
        writ_cpu,
        machine_busy,
    })
}

/// `jwt_issued` records in the audit trail, rotated files included.
fn audited_issuances(writ: &Writ) -> Result<usize> {
    let dir = writ.dir().join("state/audit");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let is_trail = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("audit.jsonl") && !n.contains("torn"));
        if is_trail {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            count += text
                .lines()
                .filter(|l| l.contains("\"jwt_issued\""))
                .count();
        }
    }
    Ok(count)
}

/// One sustained level of `op` per client count in the plan.
async fn every_level(writ: &mut Writ, plan: &Plan, op: Op) -> Result<Vec<Level>> {
    let mut levels = Vec::new();
    for &clients in &plan.levels {
        let level = sustained(
            writ,
            op.clone(),
            clients,
            plan.warmup_per_client,
            plan.level_duration,
        )
        .await?;
        writ.check_alive()?;
        levels.push(level);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(levels)
}

async fn run(plan: Plan) -> Result<()> {
    let mut writ = Writ::start("")?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let fetch_levels = every_level(&mut writ, &plan, Op::Fetch).await?;
    let audited_cached = audited_issuances(&writ)?;
    let new_levels = every_level(&mut writ, &plan, Op::FetchNew).await?;
    let issued_new: usize = new_levels.iter().map(|l| l.summary.n + l.warmed).sum();
    let audited_new = audited_issuances(&writ)? - audited_cached;

    // A token fetched beforehand (5 min TTL by default: it outlives the run).
    let mut client = workload_client(&writ.socket).await?;
    let token = Arc::new(fetch(&mut client, AUDIENCE.to_owned()).await?);
    drop(client);
    let validate_levels = every_level(&mut writ, &plan, Op::Validate(token.clone())).await?;

    let rows = |levels: &[Level]| -> Vec<Vec<String>> {
        levels
            .iter()
            .map(|l| {
                let writ_share = l.writ_cpu.as_secs_f64() / l.elapsed.as_secs_f64();
                let per_request = if l.summary.n == 0 {
                    Duration::ZERO
                } else {
                    l.writ_cpu / l.summary.n as u32
                };
                vec![
                    l.clients.to_string(),
                    l.summary.n.to_string(),
                    l.errors.to_string(),
                    format!("{:.0}", l.rate()),
                    fmt_duration(l.summary.p50),
                    fmt_duration(l.summary.p90),
                    fmt_duration(l.summary.p99),
                    fmt_duration(l.summary.max),
                    format!("{:.0}%", 100.0 * writ_share),
                    fmt_duration(per_request),
                    format!("{:.0}%", l.machine_busy),
                ]
            })
            .collect()
    };
    let headers = [
        "clients",
        "requests",
        "errors",
        "req/s",
        "p50",
        "p90",
        "p99",
        "max",
        "writ CPU (one core = 100%)",
        "writ CPU per request",
        "machine busy",
    ];
    let secs = plan.level_duration.as_secs_f64();
    print_table(
        &format!(
            "FetchJWTSVID, audience \"{AUDIENCE}\" every time (the caller's token is re-served until half-life), {secs} s per level, one HTTP/2 connection per client (goal: p99 < 1 ms)"
        ),
        &headers,
        &rows(&fetch_levels),
    );
    let cached_requests: usize = fetch_levels.iter().map(|l| l.summary.n + l.warmed).sum();
    println!(
        "\nAudit trail: {audited_cached} jwt_issued records for {cached_requests} fetches (one per client connection's process and audience: tokens are re-served, not re-issued)."
    );
    print_table(
        &format!(
            "FetchJWTSVID, a new audience every time (every call signs a token and fsyncs its audit record), {secs} s per level, one HTTP/2 connection per client"
        ),
        &headers,
        &rows(&new_levels),
    );
    println!(
        "\nAudit trail: {audited_new} jwt_issued records for {issued_new} new tokens handed out (warm-up included)."
    );
    print_table(
        &format!(
            "ValidateJWTSVID of one token fetched beforehand, {secs} s per level, one HTTP/2 connection per client (goal: > 10,000/s)"
        ),
        &headers,
        &rows(&validate_levels),
    );
    for level in fetch_levels
        .iter()
        .chain(&new_levels)
        .chain(&validate_levels)
    {
        if let Some(e) = &level.first_error {
            println!(
                "\n{} clients: {} errors, first: {e}",
                level.clients, level.errors
            );
        }
    }
    if audited_new < issued_new {
        bail!(
            "{issued_new} new tokens were handed out but only {audited_new} are in the audit trail"
        );
    }
    if audited_cached == 0 {
        bail!("no jwt_issued record for the re-served tokens");
    }
    writ.check_alive()?;
    Ok(())
}
