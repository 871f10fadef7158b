//! An orchestrator that gives every AI-agent task its own SPIFFE identity.
//!
//! It works through a queue of tasks, each in a child process of its own. For
//! each one it asks writ (admin API, `BeginTask`) to bind a task identity to
//! the child — by cgroup when it runs as root on cgroup v2, else by PID — lets
//! the child fetch that identity and call the tool server with it, then ends
//! the task (`EndTask`) and has the child show that its certificate is refused.
//!
//! `cargo run --example agent_runtime -- --demo` starts a private writ and
//! tool server and runs all of it; see "Demo" in the README.

mod child;
mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tonic::transport::Channel;
use writ::proto::admin::{self as apb, tasks_client::TasksClient};

use child::{CallOutcome, ChildEvent};

#[derive(Parser)]
#[command(about = "Runs a queue of agent tasks, each with its own writ task identity")]
struct Cli {
    /// Start a private writ and tool server, run the queue, print a summary.
    #[arg(long, conflicts_with = "child")]
    demo: bool,
    /// writ's admin socket, where tasks are begun and ended.
    #[arg(long, env = "WRIT_ADMIN_SOCKET", required_unless_present_any = ["demo", "child"])]
    admin_socket: Option<PathBuf>,
    /// Address of the tool server the tasks call.
    #[arg(long, required_unless_present = "demo")]
    tool_server: Option<SocketAddr>,
    /// The SPIFFE ID the tool server must present.
    #[arg(long, required_unless_present = "demo")]
    tool_server_id: Option<String>,
    /// Where task cgroups are made when running as root: a cgroup v2 path
    /// under one of writ's `attestors.cgroup.trusted_roots`.
    #[arg(long, default_value = "/writ.slice")]
    cgroup_parent: String,
    /// The writ binary for --demo. Default: the one built next to this example.
    #[arg(long, env = "WRIT_BIN")]
    writ_bin: Option<PathBuf>,
    /// Internal: run as a task's child process.
    #[arg(long, hide = true, requires_all = ["tool_server", "tool_server_id", "request"])]
    child: bool,
    /// Internal: the tool request a child makes, `<tool> <arguments>`.
    #[arg(long, hide = true)]
    request: Option<String>,
}

/// One unit of agent work: what writ records as the task's intent, and the
/// one tool request the task makes.
struct Job {
    name: &'static str,
    purpose: &'static str,
    tool: &'static str,
    arguments: &'static str,
    target: &'static str,
    data_class: &'static str,
}

const QUEUE: [Job; 3] = [
    Job {
        name: "triage",
        purpose: "summarise open tickets with jira, read-only",
        tool: "jira",
        arguments: "project=OPS status=open",
        target: "jira:OPS",
        data_class: "internal",
    },
    Job {
        name: "digest",
        purpose: "write last week's incident digest from the wiki",
        tool: "wiki",
        arguments: "page=incidents",
        target: "wiki:incidents",
        data_class: "internal",
    },
    Job {
        name: "escalate",
        purpose: "find who is on call for payments",
        tool: "pager",
        arguments: "team=payments",
        target: "pager:payments",
        data_class: "public",
    },
];

/// How long we wait for a child's next step; generous, because the first
/// fetch on a loaded machine can take a while.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = if cli.child {
        child::run(cli.tool_server, cli.tool_server_id, cli.request)
            .await
            .map(|()| true)
    } else if cli.demo {
        demo::run(cli.writ_bin).await
    } else {
        run_against_existing_writ(cli).await
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("agent_runtime: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_against_existing_writ(cli: Cli) -> anyhow::Result<bool> {
    let (Some(admin_socket), Some(tool_server), Some(tool_server_id)) =
        (cli.admin_socket, cli.tool_server, cli.tool_server_id)
    else {
        bail!("--admin-socket, --tool-server and --tool-server-id are required");
    };
    let cgroups = choose_binding(&format!(
        "{}/agent-runtime-{}",
        cli.cgroup_parent,
        std::process::id()
    ));
    let runtime = Runtime {
        admin_socket,
        tool_server,
        tool_server_id,
        workload_endpoint: None,
        cgroups,
    };
    let reports = runtime.run_queue(&QUEUE).await?;
    Ok(print_summary(&reports))
}

/// Binding by cgroup is the stronger choice: everything the task process
/// starts stays inside the binding, and an unprivileged process cannot move
/// itself out. It needs root and cgroup v2, so PID binding is the fallback.
fn choose_binding(cgroup_path: &str) -> Option<CgroupRoot> {
    match CgroupRoot::create(cgroup_path) {
        Ok(root) => {
            println!("binding tasks by cgroup, one per task under {cgroup_path}");
            Some(root)
        }
        Err(why) => {
            println!("binding tasks by PID: {why:#}");
            None
        }
    }
}

/// Everything the orchestrator needs to run tasks.
struct Runtime {
    admin_socket: PathBuf,
    tool_server: SocketAddr,
    tool_server_id: String,
    /// `SPIFFE_ENDPOINT_SOCKET` for children; None passes ours on.
    workload_endpoint: Option<String>,
    /// Where task cgroups go; None binds tasks by PID.
    cgroups: Option<CgroupRoot>,
}

/// What happened to one task, for the summary.
struct TaskReport {
    task_id: String,
    /// The ID writ says the task has, and the one the child actually got.
    task_spiffe_id: String,
    child_spiffe_id: String,
    with_task_svid: CallOutcome,
    after_end_task: CallOutcome,
    /// A request sent after EndTask on a connection opened before it.
    on_held_connection: CallOutcome,
}

/// A job's name, and its report or why it could not finish.
type JobOutcome = (&'static str, Result<TaskReport, String>);

impl TaskReport {
    fn passed(&self) -> bool {
        self.child_spiffe_id == self.task_spiffe_id
            && matches!(self.with_task_svid, CallOutcome::Served(_))
            && matches!(self.after_end_task, CallOutcome::Refused(_))
            && matches!(self.on_held_connection, CallOutcome::Refused(_))
    }
}

impl Runtime {
    /// Runs the jobs one after another; a job that fails is reported and
    /// the queue goes on.
    async fn run_queue(&self, jobs: &[Job]) -> anyhow::Result<Vec<JobOutcome>> {
        let channel = writ::cli::client::connect(&self.admin_socket)
            .await
            .with_context(|| format!("writ admin API at {}", self.admin_socket.display()))?;
        let mut tasks = TasksClient::new(channel);
        let mut reports = Vec::new();
        for (n, job) in jobs.iter().enumerate() {
            println!();
            println!("[{}] {}", job.name, job.purpose);
            let report = self.run_task(&mut tasks, job, n + 1).await;
            if let Err(e) = &report {
                println!("[{}] failed: {e:#}", job.name);
            }
            reports.push((job.name, report.map_err(|e| format!("{e:#}"))));
        }
        Ok(reports)
    }

    async fn run_task(
        &self,
        tasks: &mut TasksClient<Channel>,
        job: &Job,
        n: usize,
    ) -> anyhow::Result<TaskReport> {
        let mut child = self.spawn_child(job)?;
        let pid = child.id().context("the child exited at once")?;
        // The child waits for our "go" before it asks for an SVID, so it is
        // inside its binding before it first talks to the Workload API.
        let cgroup = match &self.cgroups {
            Some(root) => match root.add(&format!("job-{n}"), pid) {
                Ok(cgroup) => Some(cgroup),
                Err(e) => {
                    let _ = child.start_kill();
                    reap(&mut child).await;
                    return Err(e);
                }
            },
            None => None,
        };
        let report = self
            .drive(tasks, job, &mut child, pid, cgroup.as_ref())
            .await;
        // Killing a child we gave up on also ends its task at writ. And a
        // cgroup can only be removed once nothing lives in it: reap first.
        if report.is_err() {
            let _ = child.start_kill();
        }
        reap(&mut child).await;
        drop(cgroup);
        report
    }

    fn spawn_child(&self, job: &Job) -> anyhow::Result<Child> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("--child")
            .arg("--tool-server")
            .arg(self.tool_server.to_string())
            .arg("--tool-server-id")
            .arg(&self.tool_server_id)
            .arg("--request")
            .arg(format!("{} {}", job.tool, job.arguments))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(endpoint) = &self.workload_endpoint {
            command.env("SPIFFE_ENDPOINT_SOCKET", endpoint);
        }
        command.spawn().context("starting a task child")
    }

    /// Begin the task, let the child work, end the task, and collect what
    /// the child saw along the way.
    async fn drive(
        &self,
        tasks: &mut TasksClient<Channel>,
        job: &Job,
        child: &mut Child,
        pid: u32,
        cgroup: Option<&TaskCgroup>,
    ) -> anyhow::Result<TaskReport> {
        let (target, bound_to) = match cgroup {
            Some(cgroup) => (
                apb::binding::Target::Cgroup(cgroup.path.clone()),
                format!("cgroup {}", cgroup.path),
            ),
            // writ lets us bind our own descendants only; the child is one.
            None => (
                apb::binding::Target::Pid(i32::try_from(pid)?),
                format!("pid {pid}"),
            ),
        };
        let task = tasks
            .begin_task(apb::BeginTaskRequest {
                // Empty: writ picks a unique ID (a ULID).
                task_id: String::new(),
                binding: Some(apb::Binding {
                    target: Some(target),
                }),
                intent: Some(apb::Intent {
                    purpose: job.purpose.into(),
                    tools: vec![job.tool.into()],
                    targets: vec![job.target.into()],
                    data_class: job.data_class.into(),
                    attributes: Default::default(),
                }),
                ttl: "5m".into(),
                ..Default::default()
            })
            .await
            .context("BeginTask")?
            .into_inner();
        println!(
            "[{}] began task {}, bound to {bound_to}",
            job.name, task.task_id
        );

        let mut stdin = child.stdin.take().context("child stdin")?;
        stdin
            .write_all(format!("go {}\n", task.spiffe_id).as_bytes())
            .await?;
        let mut events = BufReader::new(child.stdout.take().context("child stdout")?).lines();

        let ChildEvent::Identity { spiffe_id } = next_event(&mut events).await? else {
            bail!("the child did not report its identity first");
        };
        println!("[{}] child holds {spiffe_id}", job.name);
        let ChildEvent::FirstCall(with_task_svid) = next_event(&mut events).await? else {
            bail!("the child did not report its call");
        };
        println!("[{}] tool call: {with_task_svid}", job.name);

        let ended = tasks
            .end_task(apb::EndTaskRequest {
                task_id: task.task_id.clone(),
                reason: "work finished".into(),
            })
            .await
            .context("EndTask")?
            .into_inner();
        println!(
            "[{}] ended the task; writ revoked {} certificate(s): {}",
            job.name,
            ended.issued_serials.len(),
            ended.issued_serials.join(", ")
        );
        let ChildEvent::AfterRevocation {
            outcome: after_end_task,
            served_before,
            on_held_connection,
        } = next_event(&mut events).await?
        else {
            bail!("the child did not report its call after EndTask");
        };
        println!(
            "[{}] same certificate after EndTask: {after_end_task}",
            job.name
        );
        println!(
            "[{}] request after EndTask on a connection opened during the task: {on_held_connection}",
            job.name
        );
        if served_before > 0 {
            println!(
                "[{}] (served {served_before} more time(s) until the tool server had the new CRL)",
                job.name
            );
        }

        Ok(TaskReport {
            task_id: task.task_id,
            task_spiffe_id: task.spiffe_id,
            child_spiffe_id: spiffe_id,
            with_task_svid,
            after_end_task,
            on_held_connection,
        })
    }
}

/// Children report each step as one JSON line on stdout.
async fn next_event(events: &mut Lines<BufReader<ChildStdout>>) -> anyhow::Result<ChildEvent> {
    let line = tokio::time::timeout(STEP_TIMEOUT, events.next_line())
        .await
        .context("the child took too long")??
        .context("the child exited early (its error is above)")?;
    serde_json::from_str(&line).with_context(|| format!("unexpected child output {line:?}"))
}

/// Waits for a child to exit, killing it if it takes too long.
async fn reap(child: &mut Child) {
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// Prints one row per task; true when every task passed.
fn print_summary(reports: &[JobOutcome]) -> bool {
    let mut rows = vec![[
        "job".to_string(),
        "task id".into(),
        "SPIFFE ID the child got".into(),
        "with task SVID".into(),
        "after EndTask".into(),
    ]];
    for (job, report) in reports {
        rows.push(match report {
            Ok(r) => [
                job.to_string(),
                r.task_id.clone(),
                r.child_spiffe_id.clone(),
                r.with_task_svid.label().into(),
                r.after_end_task.label().into(),
            ],
            Err(e) => [
                job.to_string(),
                "-".into(),
                format!("error: {e}"),
                "-".into(),
                "-".into(),
            ],
        });
    }
    let widths: Vec<usize> = (0..5)
        .map(|col| rows.iter().map(|row| row[col].len()).max().unwrap_or(0))
        .collect();
    println!();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    let passed = reports
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(TaskReport::passed))
        .count();
    println!();
    println!(
        "{passed}/{} tasks passed: each child got its task identity, was served, \
         and was refused with the same certificate after EndTask, on a new \
         connection and on one opened before",
        reports.len()
    );
    passed == reports.len()
}

/// A cgroup v2 directory this runtime made to hold one cgroup per task;
/// removed on drop (its task cgroups must be gone by then).
struct CgroupRoot {
    mount: PathBuf,
    path: String,
    /// Every directory we had to create for `path`, deepest first.
    created: Vec<PathBuf>,
}

impl CgroupRoot {
    /// Creates `path` (relative to the cgroup2 mount, e.g. `/writ.slice/x`),
    /// or says why tasks cannot be bound by cgroup here.
    fn create(path: &str) -> anyhow::Result<CgroupRoot> {
        // Checked here because we create directories from it, before writ
        // ever sees it: `..` would lead out of the cgroup hierarchy.
        let normalized = path.strip_prefix('/').is_some_and(|rest| {
            rest.split('/')
                .all(|segment| !matches!(segment, "" | "." | ".."))
        });
        if !normalized {
            bail!("{path:?} is not a normalized absolute cgroup path");
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("not running as root, so no cgroups can be made");
        }
        // Found through mountinfo: cgroup2 is not always at /sys/fs/cgroup
        // (hybrid hosts mount it at /sys/fs/cgroup/unified, for one).
        let mount =
            writ_attestors::find_cgroup2_mount()?.context("no cgroup v2 hierarchy is mounted")?;
        let mut root = CgroupRoot {
            mount,
            path: path.to_owned(),
            created: Vec::new(),
        };
        let mut missing = Vec::new();
        let mut dir = root.dir(path);
        while dir != root.mount && !dir.exists() {
            missing.push(dir.clone());
            dir.pop();
        }
        for dir in missing.into_iter().rev() {
            std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {path}"))?;
            root.created.insert(0, dir);
        }
        Ok(root)
    }

    fn dir(&self, path: &str) -> PathBuf {
        self.mount.join(path.trim_start_matches('/'))
    }

    /// Makes a cgroup for one task and moves `pid` into it.
    fn add(&self, name: &str, pid: u32) -> anyhow::Result<TaskCgroup> {
        let path = format!("{}/{name}", self.path);
        let dir = self.dir(&path);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {path}"))?;
        let cgroup = TaskCgroup { dir, path };
        std::fs::write(cgroup.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving pid {pid} into cgroup {}", cgroup.path))?;
        Ok(cgroup)
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        for dir in &self.created {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("could not remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// One task's cgroup; removed on drop, which needs it to be empty.
struct TaskCgroup {
    dir: PathBuf,
    /// As writ names it: relative to the cgroup2 mount.
    path: String,
}

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("could not remove cgroup {}: {e}", self.dir.display());
        }
    }
}
