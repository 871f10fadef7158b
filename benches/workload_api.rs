//! `cargo bench --bench workload_api [-- --quick]`: the SPIFFE Workload API of
//! a real `writ` process on its Unix socket — first-response latency,
//! sustained FetchX509SVID rates at 1/16/256 clients, in-process attestation
//! cost, and the agent's memory idle, after load and holding 1,000 streams.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{ChildGuard, Summary, Writ, fmt_duration, fmt_mib, print_table, summarize};
use writ::cli::client::{WorkloadClient, workload_client};
use writ::proto::workload as pb;
use writ_attestors::{AttestorConfig, AttestorSet, CgroupConfig, PinnedProcess, UnixConfig};

/// Settings that `--quick` shrinks; every loop is bounded by these.
struct Plan {
    latency_samples: usize,
    latency_warmup: usize,
    level_duration: Duration,
    levels: Vec<usize>,
    attest_samples: usize,
    held_streams: usize,
    held_connections: usize,
    held_cpu_window: Duration,
}

/// No client loop runs longer than its level's duration, nor more requests.
const MAX_REQUESTS_PER_CLIENT: usize = 2_000_000;

fn main() -> Result<()> {
    let args = common::parse_args()?;
    if args.ttl.is_some() || args.fetch.is_some() || args.skip_latency {
        bail!("--ttl, --fetch and --skip-latency are options of the tasks bench");
    }
    let mut plan = if args.quick {
        Plan {
            latency_samples: 300,
            latency_warmup: 30,
            level_duration: Duration::from_millis(1500),
            levels: vec![1, 16, 256],
            attest_samples: 2_000,
            held_streams: 1_000,
            held_connections: 16,
            held_cpu_window: Duration::from_millis(5_500),
        }
    } else {
        Plan {
            latency_samples: 2_000,
            latency_warmup: 200,
            level_duration: Duration::from_secs(5),
            levels: vec![1, 16, 256],
            attest_samples: 20_000,
            held_streams: 1_000,
            held_connections: 16,
            held_cpu_window: Duration::from_secs(10),
        }
    };
    if let Some(duration) = args.duration {
        plan.level_duration = duration;
    }
    if let Some(levels) = args.levels.clone() {
        plan.levels = levels;
    }
    common::print_machine("workload_api", &args);
    // Two runtime threads on a two-core machine: the client load competes
    // with the agent for the same cores, as a co-located workload would.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(common::until_interrupted(run(plan)))
}

async fn run(plan: Plan) -> Result<()> {
    let attest_rows = attestation(plan.attest_samples)?;

    let mut writ = Writ::start("")?;
    let pid = writ.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = writ.memory()?;

    let new_conn = new_connection_latency(&writ, plan.latency_warmup, plan.latency_samples).await?;
    let new_stream = new_stream_latency(&writ, plan.latency_warmup, plan.latency_samples).await?;

    let mut level_rows = Vec::new();
    for &clients in &plan.levels {
        let level = sustained(&writ, clients, plan.level_duration).await?;
        writ.check_alive()?;
        level_rows.push(level);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Give the agent time to notice every hung-up stream and connection.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_load = writ.memory()?;

    writ.check_alive()?;
    drop(writ);

    // A fresh agent for the held streams, so what they cost is not hidden in
    // memory the allocator kept from the load above.
    let mut fresh = Writ::start("")?;
    let fresh_pid = fresh.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fresh_idle = fresh.memory()?;
    let held = hold_streams(&fresh, plan.held_connections, plan.held_streams).await?;
    let with_streams = fresh.memory()?;
    let cpu_before = fresh.cpu_time()?;
    let window_start = Instant::now();
    tokio::time::sleep(plan.held_cpu_window).await;
    let cpu_used = fresh.cpu_time()?.saturating_sub(cpu_before);
    let window = window_start.elapsed();
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let released = fresh.memory()?;
    fresh.check_alive()?;

    let lat_row = |what: &str, s: &Summary| {
        vec![
            what.to_owned(),
            s.n.to_string(),
            fmt_duration(s.p50),
            fmt_duration(s.p90),
            fmt_duration(s.p99),
            fmt_duration(s.max),
            fmt_duration(s.mean),
        ]
    };
    print_table(
        "First FetchX509SVID response, sequential (goal: p99 < 2 ms)",
        &["what", "n", "p50", "p90", "p99", "max", "mean"],
        &[
            lat_row("new connection + stream -> first message", &new_conn),
            lat_row(
                "new stream on an open connection -> first message",
                &new_stream,
            ),
        ],
    );
    print_table(
        &format!(
            "Sustained FetchX509SVID, {} s per level; one HTTP/2 connection per client, each request = open stream, first message, drop",
            plan.level_duration.as_secs_f64()
        ),
        &[
            "clients", "requests", "errors", "req/s", "p50", "p99", "max",
        ],
        &level_rows
            .iter()
            .map(|l| {
                vec![
                    l.clients.to_string(),
                    l.summary.n.to_string(),
                    l.errors.to_string(),
                    format!("{:.0}", l.summary.n as f64 / l.elapsed.as_secs_f64()),
                    fmt_duration(l.summary.p50),
                    fmt_duration(l.summary.p99),
                    fmt_duration(l.summary.max),
                ]
            })
            .collect::<Vec<_>>(),
    );
    print_table(
        "Attestation in-process (AttestorSet::attest on a live `sleep`; goal: < 100 µs)",
        &[
            "hash_executable",
            "n",
            "first call",
            "mean",
            "p50",
            "p99",
            "max",
            "selectors",
        ],
        &attest_rows,
    );
    print_table(
        "writ memory (goal: idle RSS < 15 MiB)",
        &[
            "agent",
            "when",
            "VmRSS",
            "VmHWM",
            "of VmRSS: anonymous",
            "of VmRSS: file-backed (the executable's pages)",
        ],
        &[
            (pid, "idle, 1 s after start", idle),
            (
                pid,
                "after all the latency and load runs above, every stream closed",
                after_load,
            ),
            (fresh_pid, "fresh agent, idle, 1 s after start", fresh_idle),
            (
                fresh_pid,
                &format!(
                    "same, holding {} open FetchX509SVID streams on {} connections",
                    plan.held_streams, plan.held_connections
                ) as &str,
                with_streams,
            ),
            (fresh_pid, "same, 2 s after those streams closed", released),
        ]
        .iter()
        .map(|(pid, what, m)| {
            vec![
                format!("pid {pid}"),
                what.to_string(),
                fmt_mib(m.rss_kib),
                fmt_mib(m.hwm_kib),
                fmt_mib(m.anon_kib),
                fmt_mib(m.file_kib),
            ]
        })
        .collect::<Vec<_>>(),
    );
    println!(
        "\nPer held stream: {:.1} KiB of RSS.",
        (with_streams.rss_kib.saturating_sub(fresh_idle.rss_kib)) as f64 / plan.held_streams as f64
    );
    println!(
        "writ CPU while holding {} idle streams (each re-attests every 5 s): {:.1} ms over {:.1} s = {:.2}% of one core",
        plan.held_streams,
        cpu_used.as_secs_f64() * 1e3,
        window.as_secs_f64(),
        100.0 * cpu_used.as_secs_f64() / window.as_secs_f64()
    );
    Ok(())
}

fn x509_request() -> pb::X509svidRequest {
    pb::X509svidRequest {}
}

/// Opens a FetchX509SVID stream, waits for its first message and drops the
/// stream (the client sends RST_STREAM; the agent ends the stream task).
async fn first_message(client: &mut WorkloadClient) -> Result<()> {
    let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
    let message = stream
        .message()
        .await?
        .context("stream ended before its first message")?;
    if message.svids.first().map(|s| s.spiffe_id.as_str()) != Some(common::BENCH_ID) {
        bail!(
            "unexpected first SVID in {:?}",
            message.svids.first().map(|s| &s.spiffe_id)
        );
    }
    Ok(())
}

async fn new_connection_latency(writ: &Writ, warmup: usize, n: usize) -> Result<Summary> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let start = Instant::now();
        let mut client = workload_client(&writ.socket).await?;
        first_message(&mut client).await?;
        let took = start.elapsed();
        drop(client);
        if i >= warmup {
            samples.push(took);
        }
    }
    Ok(summarize(&samples))
}

async fn new_stream_latency(writ: &Writ, warmup: usize, n: usize) -> Result<Summary> {
    let mut client = workload_client(&writ.socket).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let start = Instant::now();
        first_message(&mut client).await?;
        if i >= warmup {
            samples.push(start.elapsed());
        }
    }
    Ok(summarize(&samples))
}

type Level = common::LevelTotals;

async fn sustained(writ: &Writ, clients: usize, duration: Duration) -> Result<Level> {
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut client = workload_client(&writ.socket).await?;
        first_message(&mut client).await?;
        connected.push(client);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut run = common::ClientRun::new();
                while run.go_on(deadline, MAX_REQUESTS_PER_CLIENT) {
                    let t = Instant::now();
                    run.record(t, first_message(&mut client).await);
                }
                run
            })
        })
        .collect();
    common::join_clients(start, handles).await
}

/// The connections are kept beside the streams so none closes under them.
type HeldStreams = (
    Vec<WorkloadClient>,
    Vec<tonic::Streaming<pb::X509svidResponse>>,
);

/// Opens `streams` FetchX509SVID streams spread over `connections` HTTP/2
/// connections, each having delivered its first message, and keeps them open.
async fn hold_streams(writ: &Writ, connections: usize, streams: usize) -> Result<HeldStreams> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(workload_client(&writ.socket).await?);
    }
    let mut held = Vec::with_capacity(streams);
    for i in 0..streams {
        let client = &mut clients[i % connections];
        let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
        stream
            .message()
            .await?
            .with_context(|| format!("held stream {i} ended before its first message"))?;
        held.push(stream);
    }
    Ok((clients, held))
}

/// The attestation writ runs on every RPC, called in-process N times on a
/// live child, without and with the executable digest (cached after the
/// first call, as in the agent).
fn attestation(n: usize) -> Result<Vec<Vec<String>>> {
    let sleeper = ChildGuard::spawn("sleep", &["600"])?;
    // Under setpriv the child runs setpriv until it execs sleep; attest sleep.
    let exe = format!("/proc/{}/exe", sleeper.0.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_link(&exe).is_ok_and(|p| p.ends_with("sleep")) {
        if Instant::now() > deadline {
            bail!("the sleep child did not start");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let process = PinnedProcess::open(sleeper.0.id() as i32).context("pinning sleep")?;
    let mut rows = Vec::new();
    for hash_executable in [false, true] {
        let attestors = AttestorSet::new(AttestorConfig {
            unix: UnixConfig {
                hash_executable,
                ..UnixConfig::default()
            },
            cgroup: CgroupConfig::default(),
        })?;
        let start = Instant::now();
        let first = attestors.attest(&process)?;
        let first_call = start.elapsed();
        for _ in 0..n / 10 {
            attestors.attest(&process)?;
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            let attestation = attestors.attest(&process)?;
            samples.push(start.elapsed());
            if attestation.selectors.len() != first.selectors.len() {
                bail!("selectors changed between calls");
            }
        }
        let s = summarize(&samples);
        rows.push(vec![
            hash_executable.to_string(),
            s.n.to_string(),
            fmt_duration(first_call),
            fmt_duration(s.mean),
            fmt_duration(s.p50),
            fmt_duration(s.p99),
            fmt_duration(s.max),
            first.selectors.len().to_string(),
        ]);
    }
    Ok(rows)
}
