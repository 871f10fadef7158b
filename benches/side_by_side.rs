//! `cargo bench --bench side_by_side [-- --quick]`: writ and a real SPIRE
//! v1.15.3 spire-agent (join-token, joined to a loopback spire-server, same
//! uid entry) measured with the same client code on this machine, printed as
//! one table with the ratio and goal per row.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{BENCH_ID, Summary, Writ, fmt_duration, fmt_mib, print_table, summarize};
use writ::cli::client::{WorkloadClient, connect, workload_client};
use writ::proto::admin as apb;
use writ::proto::workload as pb;

/// Settings that `--quick` shrinks; every loop is bounded by these.
struct Plan {
    latency_samples: usize,
    latency_warmup: usize,
    level_duration: Duration,
    levels: Vec<usize>,
    held_streams: usize,
    held_connections: usize,
    identity_samples: usize,
}

const SPIRE_TD: &str = "spire.test";
const SPIRE_BENCH_ID: &str = "spiffe://spire.test/bench";
/// No client loop does more requests than this, whatever its duration.
const MAX_REQUESTS_PER_CLIENT: usize = 2_000_000;
/// The longest one identity appearance or disappearance may take before the
/// run is declared broken (SPIRE's agent syncs entries every few seconds).
const IDENTITY_WAIT: Duration = Duration::from_secs(60);
/// How long either agent may take to start serving the bench identity.
const START_WAIT: Duration = Duration::from_secs(90);

fn main() -> Result<()> {
    let args = common::parse_args()?;
    if args.ttl.is_some() || args.fetch.is_some() || args.skip_latency || args.worker.is_some() {
        bail!("--ttl, --fetch, --skip-latency and --worker are options of the tasks bench");
    }
    let mut plan = if args.quick {
        Plan {
            latency_samples: 300,
            latency_warmup: 30,
            level_duration: Duration::from_millis(1500),
            levels: vec![1, 16, 256],
            held_streams: 1_000,
            held_connections: 16,
            identity_samples: 3,
        }
    } else {
        Plan {
            latency_samples: 1_000,
            latency_warmup: 100,
            level_duration: Duration::from_secs(5),
            levels: vec![1, 16, 256],
            held_streams: 1_000,
            held_connections: 16,
            identity_samples: 6,
        }
    };
    if let Some(duration) = args.duration {
        plan.level_duration = duration;
    }
    if let Some(levels) = args.levels.clone() {
        plan.levels = levels;
    }
    let bins = spire_binaries()?;
    common::print_machine("side_by_side", &args);
    println!("- SPIRE binaries: {}", bins.dir.display());

    // Both agents are started from the main thread: the parent-death signal
    // is tied to the thread that forks.
    let writ = Writ::start("")?;
    let spire = SpireDeployment::start(&bins)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = runtime.block_on(common::until_interrupted(run(plan, &writ, &spire, &bins)));
    if result.is_err() {
        eprintln!(
            "--- spire-agent log (tail) ---\n{}",
            tail(&spire.dir.path().join("agent.log"))
        );
        eprintln!(
            "--- spire-server log (tail) ---\n{}",
            tail(&spire.dir.path().join("server.log"))
        );
    }
    // Explicit drops: the agent before the server, then the temp dirs.
    drop(runtime);
    drop(spire);
    drop(writ);
    result
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One agent under test, as the measuring code sees it.
struct Target<'a> {
    name: &'static str,
    socket: &'a Path,
    pid: u32,
    bench_id: &'static str,
}

/// Everything measured for one agent.
struct Measured {
    rss_idle_kib: u64,
    rss_streams_kib: u64,
    new_connection: Summary,
    levels: Vec<Level>,
    identity_served: Summary,
    identity_call_returned: Summary,
    revoked: Summary,
}

async fn run(plan: Plan, writ: &Writ, spire: &SpireDeployment, bins: &SpireBins) -> Result<()> {
    let writ_target = Target {
        name: "writ",
        socket: &writ.socket,
        pid: writ.pid(),
        bench_id: BENCH_ID,
    };
    let spire_target = Target {
        name: "spire-agent",
        socket: &spire.agent_socket,
        pid: spire.agent_pid(),
        bench_id: SPIRE_BENCH_ID,
    };
    wait_serving(&writ_target).await?;
    wait_serving(&spire_target).await?;
    // Both settle before their idle memory is read.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut results = Vec::new();
    for target in [&writ_target, &spire_target] {
        eprintln!("measuring {} ...", target.name);
        let rss_idle_kib = common::memory_of(target.pid)?.rss_kib;
        let held = hold_streams(target, plan.held_connections, plan.held_streams).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_streams_kib = common::memory_of(target.pid)?.rss_kib;
        drop(held);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let new_connection =
            new_connection_latency(target, plan.latency_warmup, plan.latency_samples).await?;
        let mut levels = Vec::new();
        for &clients in &plan.levels {
            levels.push(sustained(target, clients, plan.level_duration).await?);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (identity_served, identity_call_returned, revoked) = if target.name == "writ" {
            writ_identity(writ, target, plan.identity_samples).await?
        } else {
            spire_identity(spire, bins, target, plan.identity_samples).await?
        };
        results.push(Measured {
            rss_idle_kib,
            rss_streams_kib,
            new_connection,
            levels,
            identity_served,
            identity_call_returned,
            revoked,
        });
    }
    print_results(&plan, &results[0], &results[1]);
    Ok(())
}

fn print_results(plan: &Plan, w: &Measured, s: &Measured) {
    let mut rows = Vec::new();
    let ms = |d: Duration| d.as_secs_f64();
    let mut row = |what: String, wv: String, sv: String, ratio: f64, goal: Option<f64>| {
        let (goal_text, met) = match goal {
            Some(g) => (
                format!("≤ {g}"),
                if ratio <= g { "yes" } else { "NO" }.to_owned(),
            ),
            None => ("—".to_owned(), "—".to_owned()),
        };
        rows.push(vec![what, wv, sv, format!("{ratio:.3}"), goal_text, met]);
    };
    row(
        "new connection → first X509 message, p50".into(),
        fmt_duration(w.new_connection.p50),
        fmt_duration(s.new_connection.p50),
        ms(w.new_connection.p50) / ms(s.new_connection.p50),
        None,
    );
    row(
        "new connection → first X509 message, p99".into(),
        fmt_duration(w.new_connection.p99),
        fmt_duration(s.new_connection.p99),
        ms(w.new_connection.p99) / ms(s.new_connection.p99),
        Some(0.5),
    );
    for (wl, sl) in w.levels.iter().zip(&s.levels) {
        let rate = |l: &Level| l.summary.n as f64 / l.elapsed.as_secs_f64();
        row(
            format!("{} clients: FetchX509SVID req/s", wl.clients),
            format!("{:.0} ({} err)", rate(wl), wl.errors),
            format!("{:.0} ({} err)", rate(sl), sl.errors),
            rate(wl) / rate(sl),
            None,
        );
        row(
            format!("{} clients: p50", wl.clients),
            fmt_duration(wl.summary.p50),
            fmt_duration(sl.summary.p50),
            ms(wl.summary.p50) / ms(sl.summary.p50),
            None,
        );
        row(
            format!("{} clients: p99", wl.clients),
            fmt_duration(wl.summary.p99),
            fmt_duration(sl.summary.p99),
            ms(wl.summary.p99) / ms(sl.summary.p99),
            Some(0.5),
        );
    }
    row(
        "RSS idle".into(),
        fmt_mib(w.rss_idle_kib),
        fmt_mib(s.rss_idle_kib),
        w.rss_idle_kib as f64 / s.rss_idle_kib as f64,
        Some(0.5),
    );
    row(
        format!("RSS with {} open streams", plan.held_streams),
        fmt_mib(w.rss_streams_kib),
        fmt_mib(s.rss_streams_kib),
        w.rss_streams_kib as f64 / s.rss_streams_kib as f64,
        Some(0.5),
    );
    row(
        "new identity wanted → held stream serves it, p50".into(),
        fmt_duration(w.identity_served.p50),
        fmt_duration(s.identity_served.p50),
        ms(w.identity_served.p50) / ms(s.identity_served.p50),
        Some(0.01),
    );
    row(
        "new identity wanted → held stream serves it, max".into(),
        fmt_duration(w.identity_served.max),
        fmt_duration(s.identity_served.max),
        ms(w.identity_served.max) / ms(s.identity_served.max),
        Some(0.01),
    );
    row(
        "  (of which: BeginTask / `entry create` returned, p50)".into(),
        fmt_duration(w.identity_call_returned.p50),
        fmt_duration(s.identity_call_returned.p50),
        ms(w.identity_call_returned.p50) / ms(s.identity_call_returned.p50),
        None,
    );
    row(
        "task over → held stream no longer carries it, p50".into(),
        fmt_duration(w.revoked.p50),
        fmt_duration(s.revoked.p50),
        ms(w.revoked.p50) / ms(s.revoked.p50),
        None,
    );
    row(
        "task over → held stream no longer carries it, max".into(),
        fmt_duration(w.revoked.max),
        fmt_duration(s.revoked.max),
        ms(w.revoked.max) / ms(s.revoked.max),
        None,
    );
    print_table(
        &format!(
            "writ vs spire-agent (same client code, same uid entry; {} latency samples, {} s per load level, {} identity samples)",
            plan.latency_samples,
            plan.level_duration.as_secs_f64(),
            w.identity_served.n
        ),
        &["metric", "writ", "spire-agent", "writ/spire", "goal", "met"],
        &rows,
    );
}

fn x509_request() -> pb::X509svidRequest {
    pb::X509svidRequest {}
}

/// Opens a FetchX509SVID stream, waits for its first message, checks the
/// identity and drops the stream.
async fn first_message(client: &mut WorkloadClient, want: &str) -> Result<()> {
    let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
    let message = stream
        .message()
        .await?
        .context("stream ended before its first message")?;
    let got = message.svids.first().map(|s| s.spiffe_id.as_str());
    if got != Some(want) {
        bail!("expected {want} first, got {got:?}");
    }
    Ok(())
}

async fn wait_serving(target: &Target<'_>) -> Result<()> {
    let deadline = Instant::now() + START_WAIT;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        if target.socket.exists() {
            let attempt = tokio::time::timeout(Duration::from_secs(5), async {
                let mut client = workload_client(target.socket).await?;
                first_message(&mut client, target.bench_id).await
            })
            .await;
            match attempt {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last_error = format!("{e:#}"),
                Err(_) => last_error = "timed out".into(),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "{} did not serve {} within {START_WAIT:?}: {last_error}",
        target.name,
        target.bench_id
    )
}

async fn new_connection_latency(target: &Target<'_>, warmup: usize, n: usize) -> Result<Summary> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let start = Instant::now();
        let mut client = workload_client(target.socket).await?;
        first_message(&mut client, target.bench_id).await?;
        let took = start.elapsed();
        drop(client);
        if i >= warmup {
            samples.push(took);
        }
    }
    Ok(summarize(&samples))
}

type Level = common::LevelTotals;

/// `clients` connections, each looping open stream → first message → drop
/// until the level's deadline.
async fn sustained(target: &Target<'_>, clients: usize, duration: Duration) -> Result<Level> {
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut client = workload_client(target.socket).await?;
        first_message(&mut client, target.bench_id).await?;
        connected.push(client);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let want = target.bench_id;
    let handles: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut run = common::ClientRun::new();
                while run.go_on(deadline, MAX_REQUESTS_PER_CLIENT) {
                    let t = Instant::now();
                    run.record(t, first_message(&mut client, want).await);
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

async fn hold_streams(
    target: &Target<'_>,
    connections: usize,
    streams: usize,
) -> Result<HeldStreams> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(workload_client(target.socket).await?);
    }
    let mut held = Vec::with_capacity(streams);
    for i in 0..streams {
        let client = &mut clients[i % connections];
        let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
        stream
            .message()
            .await?
            .with_context(|| format!("held stream {i} on {} ended early", target.name))?;
        held.push(stream);
    }
    Ok((clients, held))
}

/// Reads the held stream until a message satisfies `done`, returning when.
async fn wait_for_update(
    stream: &mut tonic::Streaming<pb::X509svidResponse>,
    what: &str,
    done: impl Fn(&pb::X509svidResponse) -> bool,
) -> Result<Instant> {
    let deadline = tokio::time::Instant::now() + IDENTITY_WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .with_context(|| format!("no update with {what} in {IDENTITY_WAIT:?}"))??
            .with_context(|| format!("the stream ended while waiting for {what}"))?;
        if done(&message) {
            return Ok(Instant::now());
        }
    }
}

fn carries(message: &pb::X509svidResponse, id: &str) -> bool {
    message.svids.iter().any(|s| s.spiffe_id == id)
}

/// writ: BeginTask binding the bench process itself, which already holds a
/// FetchX509SVID stream, until that stream delivers the task SVID; EndTask
/// until it no longer carries it.
async fn writ_identity(
    writ: &Writ,
    target: &Target<'_>,
    samples: usize,
) -> Result<(Summary, Summary, Summary)> {
    let mut admin = apb::tasks_client::TasksClient::new(connect(&writ.admin_socket).await?);
    let mut client = workload_client(target.socket).await?;
    let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
    stream.message().await?.context("stream ended")?;
    let (mut served, mut returned, mut revoked) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let task_id = format!("side-by-side-{i}-{}", std::process::id());
        let start = Instant::now();
        let task = admin
            .begin_task(apb::BeginTaskRequest {
                task_id: task_id.clone(),
                binding: Some(apb::Binding {
                    target: Some(apb::binding::Target::Pid(std::process::id() as i32)),
                }),
                ttl: "60s".into(),
                ..Default::default()
            })
            .await
            .context("BeginTask")?
            .into_inner();
        returned.push(start.elapsed());
        let want = task.spiffe_id;
        let at = wait_for_update(&mut stream, "the task SVID", |m| carries(m, &want)).await?;
        served.push(at - start);

        let start = Instant::now();
        admin
            .end_task(apb::EndTaskRequest {
                task_id,
                reason: "side-by-side bench".into(),
            })
            .await
            .context("EndTask")?;
        let at = wait_for_update(&mut stream, "the task SVID gone", |m| !carries(m, &want)).await?;
        revoked.push(at - start);
    }
    Ok((
        summarize(&served),
        summarize(&returned),
        summarize(&revoked),
    ))
}

/// SPIRE: `spire-server entry create` with a new SPIFFE ID for the bench's
/// uid until the bench's already-open agent stream delivers it; `entry
/// delete` until the stream no longer carries it.
async fn spire_identity(
    spire: &SpireDeployment,
    bins: &SpireBins,
    target: &Target<'_>,
    samples: usize,
) -> Result<(Summary, Summary, Summary)> {
    let mut client = workload_client(target.socket).await?;
    let mut stream = client.fetch_x509svid(x509_request()).await?.into_inner();
    stream.message().await?.context("stream ended")?;
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    let (mut served, mut returned, mut revoked) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let want = format!(
            "spiffe://{SPIRE_TD}/side-by-side/{i}-{}",
            std::process::id()
        );
        let start = Instant::now();
        let out = spire
            .cli(
                bins,
                &[
                    "entry",
                    "create",
                    "-parentID",
                    &spire.agent_id,
                    "-spiffeID",
                    &want,
                    "-selector",
                    &uid,
                ],
            )
            .await?;
        returned.push(start.elapsed());
        let entry_id = out
            .lines()
            .find_map(|l| l.strip_prefix("Entry ID"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .filter(|id| !id.is_empty())
            .with_context(|| format!("no entry ID in `entry create` output: {out}"))?;
        let at =
            wait_for_update(&mut stream, "the new entry's SVID", |m| carries(m, &want)).await?;
        served.push(at - start);

        let start = Instant::now();
        spire
            .cli(bins, &["entry", "delete", "-entryID", &entry_id])
            .await?;
        let at = wait_for_update(&mut stream, "the deleted entry's SVID gone", |m| {
            !carries(m, &want)
        })
        .await?;
        revoked.push(at - start);
    }
    Ok((
        summarize(&served),
        summarize(&returned),
        summarize(&revoked),
    ))
}

struct SpireBins {
    dir: PathBuf,
    server: PathBuf,
    agent: PathBuf,
}

/// `WRIT_SPIRE_BIN_DIR`, else the interop tests' cache
/// (`<target>/interop/bin`); built there as tests/interop/peers.rs does when
/// missing.
fn spire_binaries() -> Result<SpireBins> {
    let dir = match std::env::var_os("WRIT_SPIRE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .context("the target dir has no parent")?
            .join("interop/bin"),
    };
    let bins = SpireBins {
        server: dir.join("spire-server"),
        agent: dir.join("spire-agent"),
        dir,
    };
    if bins.server.exists() && bins.agent.exists() {
        return Ok(bins);
    }
    eprintln!(
        "side_by_side: building SPIRE into {} (first run only; several minutes)...",
        bins.dir.display()
    );
    std::fs::create_dir_all(&bins.dir).context("creating the SPIRE bin dir")?;
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/spire");
    let out = Command::new("go")
        .current_dir(&source)
        .args(["build", "-o"])
        .arg(&bins.dir)
        .args([
            "github.com/spiffe/spire/cmd/spire-server",
            "github.com/spiffe/spire/cmd/spire-agent",
        ])
        // As the interop tests: module proxy only, go.mod/go.sum untouched.
        .env("GOFLAGS", "-mod=mod -buildvcs=false")
        .env("GOTOOLCHAIN", "local")
        .output()
        .context("running `go build` (is Go installed?)")?;
    if !out.status.success() {
        bail!(
            "building SPIRE failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The interop tests reuse a build only beside a stamp of its go.mod.
    let go_mod = std::fs::read_to_string(source.join("go.mod")).unwrap_or_default();
    let _ = std::fs::write(bins.dir.join("spire.stamp"), go_mod);
    Ok(bins)
}

/// A child killed and reaped when dropped, also while unwinding.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_guarded(program: &Path, args: &[&str], log: &Path) -> Result<Proc> {
    let log = std::fs::File::create(log).context("creating a log file")?;
    let mut command = match common::setpriv() {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Proc(child))
}

/// spire-server (sqlite, memory key manager, join_token) and one
/// join-token spire-agent (unix workload attestor) on loopback, with the
/// bench's uid registered as `SPIRE_BENCH_ID`.
struct SpireDeployment {
    // Dropped in declaration order: agent, server, then the directory.
    agent: Option<Proc>,
    server: Option<Proc>,
    server_socket: PathBuf,
    agent_socket: PathBuf,
    agent_id: String,
    dir: tempfile::TempDir,
}

impl SpireDeployment {
    /// Writes `<name>.conf` and runs `program run -config` on it, logging
    /// to `<name>.log`, all in the deployment's directory.
    fn run_with_config(&self, program: &Path, name: &str, conf_text: &str) -> Result<Proc> {
        let conf = self.dir.path().join(format!("{name}.conf"));
        std::fs::write(&conf, conf_text).with_context(|| format!("writing {name}.conf"))?;
        spawn_guarded(
            program,
            &["run", "-config", &conf.display().to_string()],
            &self.dir.path().join(format!("{name}.log")),
        )
    }

    fn start(bins: &SpireBins) -> Result<SpireDeployment> {
        let dir = tempfile::Builder::new()
            .prefix("writ-spire-bench-")
            .tempdir()
            .context("creating the SPIRE temp dir")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("picking a free port")?
            .port();
        let mut deployment = SpireDeployment {
            agent: None,
            server: None,
            server_socket: dir.path().join("server.sock"),
            agent_socket: dir.path().join("agent.sock"),
            agent_id: String::new(),
            dir,
        };
        let d = deployment.dir.path().display().to_string();
        let server_conf = format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "{SPIRE_TD}"
    data_dir = "{d}/server-data"
    log_level = "WARN"
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/datastore.sqlite3"
        }}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
}}
"#,
            socket = deployment.server_socket.display(),
        );
        deployment.server =
            Some(deployment.run_with_config(&bins.server, "server", &server_conf)?);
        let deadline = Instant::now() + START_WAIT;
        while deployment.cli_blocking(bins, &["healthcheck"]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "spire-server not healthy:\n{}",
                    tail(&deployment.dir.path().join("server.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }

        let out = deployment.cli_blocking(bins, &["token", "generate", "-ttl", "600"])?;
        let token = out
            .lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .map(|t| t.trim().to_owned())
            .with_context(|| format!("no token in {out:?}"))?;
        deployment.agent_id = format!("spiffe://{SPIRE_TD}/spire/agent/join_token/{token}");
        let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
        let agent_id = deployment.agent_id.clone();
        deployment.cli_blocking(
            bins,
            &[
                "entry",
                "create",
                "-parentID",
                &agent_id,
                "-spiffeID",
                SPIRE_BENCH_ID,
                "-selector",
                &uid,
            ],
        )?;
        let agent_conf = format!(
            r#"agent {{
    data_dir = "{d}/agent-data"
    log_level = "WARN"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "{SPIRE_TD}"
    join_token = "{token}"
    insecure_bootstrap = true
}}
plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#,
            socket = deployment.agent_socket.display(),
        );
        deployment.agent = Some(deployment.run_with_config(&bins.agent, "agent", &agent_conf)?);
        Ok(deployment)
    }

    /// The spire-agent's own pid (under setpriv, which execs it, the same).
    fn agent_pid(&self) -> u32 {
        self.agent.as_ref().map_or(0, |p| p.0.id())
    }

    fn cli_blocking(&self, bins: &SpireBins, args: &[&str]) -> Result<String> {
        let out = Command::new(&bins.server)
            .args(args)
            .arg("-socketPath")
            .arg(&self.server_socket)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running spire-server {args:?}"))?;
        if !out.status.success() {
            bail!(
                "spire-server {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn cli(&self, bins: &SpireBins, args: &[&str]) -> Result<String> {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(&bins.server)
                .args(args)
                .arg("-socketPath")
                .arg(&self.server_socket)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("spire-server {args:?} took over 30 s"))?
        .with_context(|| format!("running spire-server {args:?}"))?;
        if !out.status.success() {
            bail!(
                "spire-server {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
