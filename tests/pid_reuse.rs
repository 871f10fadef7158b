//! PID reuse cannot move an identity between processes. Everything runs in a
//! fresh PID namespace (unshare), where the test steers `ns_last_pid` so a
//! newcomer process receives exactly the PID of a caller that has exited.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use common::{NOBODY, Writ, handoff, is_root};
use tonic::Code;
use writ::proto::workload as pb;

const DEPARTED_ID: &str = "spiffe://writ.test/departed";
const NEWCOMER_ID: &str = "spiffe://writ.test/newcomer";

#[test]
fn a_reused_pid_never_inherits_or_receives_the_departed_callers_identity() {
    run_in_pid_namespace("inside_pid_namespace");
}

/// A task begun by a caller that holds no SPIFFE ID belongs to that
/// process. Once it has exited, another authorized caller given its PID
/// (and not allowed `bind_any_pid`) may neither begin sub-tasks of the task
/// nor end it.
#[test]
fn a_reused_pid_never_acts_as_the_departed_orchestrator_of_a_task() {
    run_in_pid_namespace("orchestrator_inside_pid_namespace");
}

/// Runs the ignored test `inner` as PID 1 of a fresh PID namespace; it
/// prints PID-REUSE-PROVEN once it has shown what it set out to.
fn run_in_pid_namespace(inner: &str) {
    if !is_root() || Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("SKIPPED: PID reuse test needs root and unshare(1)");
        return;
    }
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            inner,
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WRIT_TEST_IN_PIDNS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "inner test failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("PID-REUSE-PROVEN"),
        "inner test did not run:\n{stdout}\n{stderr}"
    );
}

/// Asserts that this test runs as PID 1 of its own PID namespace, where it
/// may steer `ns_last_pid`.
fn assert_inside_pid_namespace() {
    assert_eq!(
        std::env::var("WRIT_TEST_IN_PIDNS").as_deref(),
        Ok("1"),
        "run via the outer test"
    );
    assert_eq!(
        std::process::id(),
        1,
        "expected to be PID 1 of a fresh PID namespace"
    );
}

#[test]
#[ignore = "runs inside the PID namespace set up by the test above"]
fn orchestrator_inside_pid_namespace() {
    assert_inside_pid_namespace();
    // The orchestrator may bind any process only as this copy of writ, so
    // the newcomer (plain writ, same uid) is allowed no bind_any_pid.
    let bin = common::traversable_tempdir("writ-orch-");
    let orch = bin.path().join("writ-orch");
    common::copy_executable(common::WRIT.as_ref(), &orch);
    let orch = orch.canonicalize().unwrap();
    let writ = Writ::start(&format!(
        r#"
[admin_api]
authorized = [["unix:uid:{NOBODY}"]]
bind_any_pid = [["unix:uid:{NOBODY}", "unix:path:{}"]]
"#,
        orch.display()
    ));
    let admin = writ.dir.path().join("run/admin.sock");
    // Let nobody reach the admin socket (0770) through its group.
    std::os::unix::fs::chown(&admin, None, Some(NOBODY)).unwrap();
    let admin = admin.to_str().unwrap().to_owned();
    // Nobody's: the newcomer may bind it too (bind_same_uid), so only the
    // task's ownership stands between it and a sub-task.
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()
        .unwrap();
    let sleeper_pid = sleeper.id().to_string();
    let as_nobody = |program: &std::path::Path, args: &[&str]| {
        let mut c = Command::new(program);
        c.args(args)
            .args(["--admin-socket", &admin])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let output = |child: Child| {
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    // 1. The orchestrator, with no SPIFFE ID, begins a task and exits.
    let orchestrator = as_nobody(
        &orch,
        &[
            "task",
            "begin",
            "--pid",
            &sleeper_pid,
            "--id",
            "pt1",
            "--spiffe-id",
            "spiffe://writ.test/pidtask1",
            "--tool",
            "x",
        ],
    )
    .spawn()
    .unwrap();
    let departed_pid = orchestrator.id();
    let (ok, out) = output(orchestrator);
    assert!(ok, "{out}");
    let get_task = || {
        let out = as_nobody(
            common::WRIT.as_ref(),
            &["task", "get", "pt1", "--output", "json"],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(
        get_task()["orchestrator_spiffe_id"],
        format!("pid:{departed_pid}")
    );

    // 2. A newcomer on its PID may not begin a sub-task of it...
    let wrote_sub = spawn_with_pid(departed_pid, || {
        as_nobody(
            common::WRIT.as_ref(),
            &[
                "task",
                "begin",
                "--pid",
                &sleeper_pid,
                "--id",
                "ptsub1",
                "--parent",
                "pt1",
                "--tool",
                "x",
            ],
        )
    });
    let (ok, out) = output(wrote_sub);
    assert!(
        !ok,
        "a newcomer on the orchestrator's PID began a sub-task: {out}"
    );
    assert!(
        out.contains("PermissionDenied") && out.contains("may begin sub-tasks of it"),
        "{out}"
    );
    // 3. ...nor end it.
    let ender = spawn_with_pid(departed_pid, || {
        as_nobody(common::WRIT.as_ref(), &["task", "end", "pt1"])
    });
    let (ok, out) = output(ender);
    assert!(
        !ok,
        "a newcomer on the orchestrator's PID ended its task: {out}"
    );
    assert!(
        out.contains("PermissionDenied") && out.contains("may end it"),
        "{out}"
    );
    assert_eq!(get_task()["completed_at"], 0, "the task was ended");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    println!("PID-REUSE-PROVEN pid={departed_pid}");
}

/// Spawns `cmd` until it lands on `pid` (other processes and threads may take
/// PIDs between our write to ns_last_pid and the fork, so retry).
fn spawn_with_pid(pid: u32, mut make: impl FnMut() -> Command) -> Child {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = make().spawn().unwrap();
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not get PID {pid} reused");
}

#[test]
#[ignore = "runs inside the PID namespace set up by the test above"]
fn inside_pid_namespace() {
    assert_inside_pid_namespace();
    let writ = Writ::start(&format!(
        r#"
[[entry]]
spiffe_id = "{DEPARTED_ID}"
selectors = ["unix:uid:0"]

[[entry]]
spiffe_id = "{NEWCOMER_ID}"
selectors = ["unix:uid:{NOBODY}"]
"#
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1. The departed caller (root) connects, hands us its connection, exits.
    let handoff_path = writ.dir.path().join("handoff.sock");
    let listener = std::os::unix::net::UnixListener::bind(&handoff_path).unwrap();
    let mut departed = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "handoff_helper", "--nocapture"])
        .env("WRIT_SOCKET", &writ.socket)
        .env("WRIT_HANDOFF", &handoff_path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let departed_pid = departed.id();
    let fd = handoff::recv_fd(&listener);
    departed.wait().unwrap();

    // 2. A newcomer with another uid takes the departed PID. The old
    //    connection, now naming that PID, must get nothing — certainly not
    //    the newcomer's identity.
    let mut squatter = spawn_with_pid(departed_pid, || {
        let mut c = Command::new("sleep");
        c.arg("60").uid(NOBODY).gid(NOBODY);
        c
    });
    rt.block_on(async {
        let channel = handoff::channel_over(fd).await;
        // writ hangs up on a connection whose peer it could not pin (the
        // departed caller left before writ accepted it): nothing is served.
        let channel = match channel {
            Ok(channel) => channel,
            Err(e) => {
                println!("the departed caller's connection was closed: {e}");
                return;
            }
        };
        let mut client = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
        let mut request = tonic::Request::new(pb::X509svidRequest {});
        request
            .metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        match client.fetch_x509svid(request).await {
            Ok(response) => {
                let mut s = response.into_inner();
                let m = s.message().await;
                panic!("departed caller's connection was served after PID reuse: {m:?}");
            }
            // Refused (pinned, then gone), or hung up on (never pinned):
            // seen as Unavailable, or, when the request was written after
            // writ had closed the connection, as a broken pipe.
            Err(status) => assert!(
                matches!(status.code(), Code::PermissionDenied | Code::Unavailable)
                    || hung_up_on(&status),
                "{status:?}"
            ),
        }
    });
    let _ = squatter.kill();
    let _ = squatter.wait();

    // 3. A newcomer that connects itself on the reused PID gets its own
    //    identity and never the departed caller's.
    let socket = writ.endpoint();
    let newcomer = spawn_with_pid(departed_pid, || {
        let mut c = Command::new(common::WRIT);
        c.args([
            "api", "fetch", "x509", "--output", "json", "--socket", &socket,
        ])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    });
    let out = newcomer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svids: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ids: Vec<&str> = svids
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![NEWCOMER_ID]);
    println!("PID-REUSE-PROVEN pid={departed_pid}");
}

#[test]
#[ignore = "helper process entry point, run by the test above"]
fn handoff_helper() {
    let conn =
        std::os::unix::net::UnixStream::connect(std::env::var("WRIT_SOCKET").unwrap()).unwrap();
    handoff::send_fd(std::env::var("WRIT_HANDOFF").unwrap().as_ref(), &conn);
}

/// Whether a call failed because the server had closed the connection: the
/// client's write found it gone (tonic reports that as Unknown, its cause
/// an I/O error down the chain).
fn hung_up_on(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        {
            return true;
        }
        cause = error.source();
    }
    false
}

#[test]
fn a_broken_pipe_under_a_status_is_a_hang_up() {
    let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed");
    assert!(hung_up_on(&tonic::Status::from_error(Box::new(broken))));
    let refused = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
    assert!(!hung_up_on(&tonic::Status::from_error(Box::new(refused))));
    assert!(!hung_up_on(&tonic::Status::unknown("transport error")));
}
