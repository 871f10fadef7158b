//! `--demo`: everything the runtime needs, private and temporary — a real
//! writ on a temp directory with a generated config, and the tool_server
//! example — then the task queue and its summary. Nothing outlives the demo:
//! processes are stopped, cgroups removed, the temp directory deleted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::{QUEUE, Runtime, choose_binding, print_summary};

const TRUST_DOMAIN: &str = "writ.test";
const ORCHESTRATOR_ID: &str = "spiffe://writ.test/agent-runtime";
const TOOL_SERVER_ID: &str = "spiffe://writ.test/tool-server";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the demo; true when every task passed.
pub async fn run(writ_bin: Option<PathBuf>) -> anyhow::Result<bool> {
    let binaries = Binaries::locate(writ_bin)?;
    let dir = tempfile::Builder::new().prefix("writ-demo-").tempdir()?;
    println!("demo state in {}", dir.path().display());
    let workload_socket = dir.path().join("run/workload.sock");
    let admin_socket = dir.path().join("run/admin.sock");

    let cgroup_root = format!("/writ-demo-{}.slice", std::process::id());
    let cgroups = choose_binding(&cgroup_root);
    let config = writ_config(
        dir.path(),
        &workload_socket,
        &admin_socket,
        &binaries.tool_server,
        cgroups.is_some().then_some(cgroup_root.as_str()),
    )?;
    let config_path = dir.path().join("writ.toml");
    std::fs::write(&config_path, config)?;

    let log_path = dir.path().join("writ.log");
    let log = std::fs::File::create(&log_path)?;
    let mut writ = Command::new(&binaries.writ)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binaries.writ.display()))?;
    let endpoint = format!("unix://{}", workload_socket.display());

    let result = async {
        wait_until_serving(&mut writ, &workload_socket).await?;
        let (mut tool_server, tool_server_address, tool_server_log) =
            start_tool_server(&binaries.tool_server, &endpoint).await?;
        let runtime = Runtime {
            admin_socket: admin_socket.clone(),
            tool_server: tool_server_address,
            tool_server_id: TOOL_SERVER_ID.into(),
            workload_endpoint: Some(endpoint.clone()),
            cgroups,
        };
        let reports = runtime.run_queue(&QUEUE).await;
        let _ = tool_server.start_kill();
        let _ = tool_server.wait().await;
        // Its last lines are printed before our summary, not into it.
        let _ = tool_server_log.await;
        // Dropping the runtime removes the cgroup root, now that every task
        // cgroup in it is gone.
        drop(runtime);
        anyhow::Ok(print_summary(&reports?))
    }
    .await;

    stop(&mut writ).await;
    if !matches!(result, Ok(true)) {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("the end of writ's log:");
        for line in tail.iter().rev() {
            eprintln!("    {line}");
        }
    }
    result
}

/// writ and the tool_server example: this demo runs both.
struct Binaries {
    writ: PathBuf,
    tool_server: PathBuf,
}

impl Binaries {
    /// `cargo run --example agent_runtime` builds this example only. When
    /// cargo started us (it sets $CARGO), we have it build writ and the
    /// tool server too — a no-op when they are up to date — into the same
    /// target directory and profile as ourselves; else they must be built.
    fn locate(writ_bin: Option<PathBuf>) -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe()?;
        // <target dir>/<profile dir>/examples/agent_runtime
        let examples_dir = exe.parent().context("examples directory")?;
        let profile_dir = examples_dir.parent().context("profile directory")?;
        let target_dir = profile_dir.parent().context("target directory")?;
        let tool_server = examples_dir.join("tool_server");
        let writ = writ_bin.clone().unwrap_or_else(|| profile_dir.join("writ"));

        if let Ok(cargo) = std::env::var("CARGO") {
            let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") => "dev",
                Some(name) => name,
                None => bail!("cannot tell the cargo profile from {}", exe.display()),
            };
            let mut build = std::process::Command::new(cargo);
            build
                .args(["build", "--profile", profile, "--example", "tool_server"])
                .arg("--manifest-path")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                .arg("--target-dir")
                .arg(target_dir);
            if writ_bin.is_none() {
                build.args(["--bin", "writ"]);
            }
            // cargo gave us our package's CARGO_PKG_*, CARGO_MANIFEST_* and
            // OUT_DIR variables. Build scripts that watch them (ring's does)
            // would see them change and rebuild half the tree: don't pass them on.
            for (key, _) in std::env::vars_os() {
                if key.to_str().is_some_and(|k| {
                    k.starts_with("CARGO_PKG_")
                        || k.starts_with("CARGO_MANIFEST_")
                        || matches!(
                            k,
                            "OUT_DIR"
                                | "CARGO_CRATE_NAME"
                                | "CARGO_BIN_NAME"
                                | "CARGO_PRIMARY_PACKAGE"
                        )
                }) {
                    build.env_remove(key);
                }
            }
            let status = build.status().context("running cargo build")?;
            if !status.success() {
                bail!("cargo build failed ({status})");
            }
        }
        for binary in [&writ, &tool_server] {
            if !binary.is_file() {
                bail!(
                    "{} is missing: run `cargo build --bin writ --example tool_server` first",
                    binary.display()
                );
            }
        }
        // writ matches `unix:path` selectors against /proc/<pid>/exe, which
        // has symlinks resolved; so must the paths in our config.
        Ok(Binaries {
            writ: writ.canonicalize()?,
            tool_server: tool_server.canonicalize()?,
        })
    }
}

/// The config writ runs with. Both programs run as our uid, so the binary
/// path tells them apart.
fn writ_config(
    dir: &Path,
    workload_socket: &Path,
    admin_socket: &Path,
    tool_server: &Path,
    cgroup_root: Option<&str>,
) -> anyhow::Result<String> {
    let uid = nix::unistd::geteuid().as_raw();
    let runtime = path_selector(&std::env::current_exe()?.canonicalize()?)?;
    let trusted_cgroups = match cgroup_root {
        Some(root) => format!(
            "[attestors.cgroup]\n# Task cgroups go under this root, which only root can write to.\ntrusted_roots = [{}]\n",
            toml_string(root)
        ),
        None => String::new(),
    };
    Ok(format!(
        r#"trust_domain = "{TRUST_DOMAIN}"
data_dir = {data_dir}

[workload_api]
socket_path = {workload_socket}

[admin_api]
socket_path = {admin_socket}
# Only the orchestrator may begin and end tasks. It may bind tasks to its own
# descendants only (bind_any_pid is left empty).
authorized = [["unix:uid:{uid}", {runtime}]]

{trusted_cgroups}
# The orchestrator. Its task children run the same binary, so they match this
# entry too: they get its SVID after their task SVID, and keep it once the
# task ends. A real runtime would start tasks from a different binary or uid.
[[entry]]
spiffe_id = "{ORCHESTRATOR_ID}"
selectors = ["unix:uid:{uid}", {runtime}]

[[entry]]
spiffe_id = "{TOOL_SERVER_ID}"
selectors = ["unix:uid:{uid}", {tool_server}]
"#,
        data_dir = toml_path(&dir.join("state"))?,
        workload_socket = toml_path(workload_socket)?,
        admin_socket = toml_path(admin_socket)?,
        tool_server = path_selector(tool_server)?,
    ))
}

async fn wait_until_serving(writ: &mut Child, socket: &Path) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = writ.try_wait()? {
            bail!("writ exited at startup ({status})");
        }
        let json = false;
        if writ::cli::api::healthcheck(socket, Duration::from_secs(2), json)
            .await
            .is_ok()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("writ did not start serving on {}", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the tool server, waits for its `listening on ADDR` line, and then
/// passes on what it logs (who called, who was refused and why) until it exits.
async fn start_tool_server(
    binary: &Path,
    endpoint: &str,
) -> anyhow::Result<(Child, SocketAddr, JoinHandle<()>)> {
    let mut child = Command::new(binary)
        .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("tool server stdout")?).lines();
    let first = tokio::time::timeout(STARTUP_TIMEOUT, lines.next_line())
        .await
        .context("the tool server did not start in time")??
        .context("the tool server exited at startup (its error is above)")?;
    let address = first
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("unexpected first line from the tool server: {first:?}"))?;
    println!("tool server listening on {address}");
    let log = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("    tool_server | {line}");
        }
    });
    Ok((child, address, log))
}

/// SIGTERM, so writ shuts down cleanly; SIGKILL if it does not.
async fn stop(writ: &mut Child) {
    if let Some(pid) = writ.id().and_then(|pid| i32::try_from(pid).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), writ.wait())
        .await
        .is_err()
    {
        let _ = writ.start_kill();
        let _ = writ.wait().await;
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Paths that are not UTF-8 are refused rather than mangled: writ compares
/// them byte for byte.
fn toml_path(path: &Path) -> anyhow::Result<String> {
    Ok(toml_string(utf8(path)?))
}

fn path_selector(path: &Path) -> anyhow::Result<String> {
    Ok(toml_string(&format!("unix:path:{}", utf8(path)?)))
}

fn utf8(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}
