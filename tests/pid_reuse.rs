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
            "inside_pid_namespace",
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
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true).unwrap();
        let slot = std::sync::Mutex::new(Some(std_stream));
        let channel = tonic::transport::Endpoint::try_from("http://localhost")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let s = slot.lock().unwrap().take();
                async move {
                    let s = s.ok_or_else(|| std::io::Error::other("used"))?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::from_std(s)?,
                    ))
                }
            }))
            .await;
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
            // Refused (pinned, then gone), or hung up on (never pinned).
            Err(status) => assert!(
                matches!(status.code(), Code::PermissionDenied | Code::Unavailable),
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
