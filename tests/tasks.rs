//! Task-scoped identity end to end: the real `writ` binary, its admin API,
//! real bound processes, real cgroups, CRLs checked by a rustls tool server.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::{Writ, helper_command, is_root, revoked_serials};
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::Code;
use writ::proto::admin as apb;
use writ::proto::workload as pb;
use writ::spiffe_id::TrustDomain;
use writ::tls::{SpiffeTls, TrustStore};
use x509_parser::prelude::{FromDer, X509Certificate};

const ORCH_ID: &str = "spiffe://writ.test/orchestrator";

fn config(extra: &str) -> String {
    config_with_tasks("", extra)
}

/// `config`, with more keys in its `[tasks]` table.
fn config_with_tasks(tasks_extra: &str, extra: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    config_for_orchestrator(&format!(r#""unix:uid:{uid}""#), tasks_extra, extra)
}

/// `config_with_tasks`, with the orchestrator's entry matching `selectors`
/// (a TOML array's items).
fn config_for_orchestrator(selectors: &str, tasks_extra: &str, extra: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    format!(
        r#"
[admin_api]
authorized = [["unix:uid:{uid}"]]

[tasks]
max_ttl = "1h"
default_ttl = "10m"
x509_svid_ttl = "10m"
max_depth = 3
{tasks_extra}

[[entry]]
spiffe_id = "{ORCH_ID}"
selectors = [{selectors}]
{extra}
"#
    )
}

fn admin_socket(writ: &Writ) -> PathBuf {
    writ.dir.path().join("run/admin.sock")
}

async fn tasks_client(writ: &Writ) -> apb::tasks_client::TasksClient<tonic::transport::Channel> {
    apb::tasks_client::TasksClient::new(
        writ::cli::client::connect(&admin_socket(writ))
            .await
            .unwrap(),
    )
}

async fn entries_client(
    writ: &Writ,
) -> apb::entries_client::EntriesClient<tonic::transport::Channel> {
    apb::entries_client::EntriesClient::new(
        writ::cli::client::connect(&admin_socket(writ))
            .await
            .unwrap(),
    )
}

async fn get_task(
    tasks: &mut apb::tasks_client::TasksClient<tonic::transport::Channel>,
    id: &str,
) -> apb::Task {
    tasks
        .get_task(apb::GetTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The IDs ListTasks returns, completed tasks included.
async fn every_task_id(
    tasks: &mut apb::tasks_client::TasksClient<tonic::transport::Channel>,
) -> Vec<String> {
    listed_pages(tasks, true, 0).await.concat()
}

/// Every page of a task listing, as the IDs on each.
async fn listed_pages(
    tasks: &mut apb::tasks_client::TasksClient<tonic::transport::Channel>,
    include_completed: bool,
    page_size: i32,
) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = tasks
            .list_tasks(apb::ListTasksRequest {
                include_completed,
                page_size,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.tasks.into_iter().map(|t| t.task_id).collect());
        if page.next_page_token.is_empty() {
            return pages;
        }
        page_token = page.next_page_token;
    }
}

/// The task IDs of `writ task list --output json`, in its order.
fn task_ids_in(listed: &serde_json::Value) -> Vec<&str> {
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect()
}

fn end_req(id: &str) -> apb::EndTaskRequest {
    apb::EndTaskRequest {
        task_id: id.into(),
        reason: String::new(),
    }
}

fn begin_pid(id: &str, pid: u32) -> apb::BeginTaskRequest {
    apb::BeginTaskRequest {
        task_id: id.into(),
        binding: Some(apb::Binding {
            target: Some(apb::binding::Target::Pid(pid as i32)),
        }),
        intent: Some(apb::Intent {
            purpose: "summarise tickets".into(),
            tools: vec!["jira".into(), "search".into()],
            targets: vec!["tickets".into()],
            data_class: "internal".into(),
            attributes: Default::default(),
        }),
        ..Default::default()
    }
}

/// `begin_pid` with an explicit SPIFFE ID and, unless empty, a parent.
fn begin_explicit(id: &str, pid: u32, spiffe_id: &str, parent: &str) -> apb::BeginTaskRequest {
    apb::BeginTaskRequest {
        spiffe_id: spiffe_id.into(),
        parent_task_id: parent.into(),
        ..begin_pid(id, pid)
    }
}

fn begin_cgroup(id: &str, cgroup: &str) -> apb::BeginTaskRequest {
    apb::BeginTaskRequest {
        task_id: id.into(),
        binding: Some(apb::Binding {
            target: Some(apb::binding::Target::Cgroup(cgroup.into())),
        }),
        ..Default::default()
    }
}

/// A process bound to tasks in tests: re-runs this binary as a helper that
/// waits for a go-file, then follows FetchX509SVID and reports every update
/// as a line `ids|serials`, also writing each default SVID to `out/N.*`.
struct BoundChild {
    child: Child,
    go: PathBuf,
    out: PathBuf,
    lines: mpsc::Receiver<String>,
    /// Statuses the stream ended with (the helper then reconnects).
    errors: mpsc::Receiver<String>,
}

impl BoundChild {
    fn spawn(writ: &Writ, name: &str) -> BoundChild {
        Self::spawn_with(writ, name, helper_command("task-child"))
    }

    /// `spawn`, with the helper started by `command` (another executable,
    /// say, so that it matches other entries).
    fn spawn_with(writ: &Writ, name: &str, mut command: Command) -> BoundChild {
        let go = writ.dir.path().join(format!("{name}.go"));
        let out = writ.dir.path().join(format!("{name}.out"));
        std::fs::create_dir_all(&out).unwrap();
        let mut child = command
            .env("WRIT_SOCKET", &writ.socket)
            .env("WRIT_GO_FILE", &go)
            .env("WRIT_OUT_DIR", &out)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let (error_tx, errors) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest prints "test helper ... " without a newline first.
                if let Some((_, update)) = line.split_once("UPDATE ") {
                    let _ = tx.send(update.to_owned());
                } else if let Some((_, status)) = line.split_once("STREAM_ERROR ") {
                    let _ = error_tx.send(status.to_owned());
                }
            }
        });
        BoundChild {
            child,
            go,
            out,
            lines: rx,
            errors,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn go(&self) {
        std::fs::write(&self.go, b"go").unwrap();
    }

    /// Next update: (spiffe ids, serials).
    fn next_update(&self, timeout: Duration) -> (Vec<String>, Vec<String>) {
        let (ids, serials, _) = self.next_update_with_crl(timeout);
        (ids, serials)
    }

    /// Next update: (spiffe ids, serials, serials its CRL revokes).
    fn next_update_with_crl(&self, timeout: Duration) -> (Vec<String>, Vec<String>, Vec<String>) {
        let line = self
            .lines
            .recv_timeout(timeout)
            .expect("no stream update from bound child");
        let mut parts = line.split('|');
        let mut next = || -> Vec<String> {
            parts
                .next()
                .unwrap_or_default()
                .split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect()
        };
        (next(), next(), next())
    }

    /// The statuses the child's streams have ended with so far.
    fn stream_errors(&self) -> Vec<String> {
        self.errors.try_iter().collect()
    }

    fn svid_files(&self, n: usize) -> (Vec<u8>, Vec<u8>) {
        (
            std::fs::read(self.out.join(format!("{n}.chain"))).unwrap(),
            std::fs::read(self.out.join(format!("{n}.key"))).unwrap(),
        )
    }
}

impl Drop for BoundChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// The CRLs and bundle the test process itself sees on the Workload API.
async fn crls_and_bundle(writ: &Writ) -> (Vec<bytes::Bytes>, Vec<u8>) {
    let mut c = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        writ::cli::client::connect(&writ.socket).await.unwrap(),
    );
    let m = c
        .fetch_x509_bundles(with_header(pb::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    (m.crl, m.bundles.get("spiffe://writ.test").cloned().unwrap())
}

fn split_der(mut der: &[u8]) -> Vec<CertificateDer<'static>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der).unwrap();
        out.push(CertificateDer::from(der[..der.len() - rest.len()].to_vec()));
        der = rest;
    }
    out
}

/// A tool server that authorizes task identities and checks the CRL, and a
/// client presenting `chain`/`key`: Ok if the handshake and exchange work.
async fn tool_server_accepts(
    chain: &[u8],
    key: &[u8],
    bundle: &[u8],
    crls: Vec<bytes::Bytes>,
) -> Result<(), String> {
    let mut trust = TrustStore::default();
    trust
        .bundles
        .insert(TrustDomain::new("writ.test").unwrap(), split_der(bundle));
    trust.crls = crls;
    let server_tls = SpiffeTls::new();
    // The tool server's own identity: the same SVID is fine for this check.
    server_tls.set_identity(split_der(chain), key).unwrap();
    server_tls.set_trust(trust.clone());
    let server_config = server_tls
        .server_config(Arc::new(|id| id.path().contains("/task/")))
        .unwrap();
    let client_tls = SpiffeTls::new();
    client_tls.set_identity(split_der(chain), key).unwrap();
    client_tls.set_trust(TrustStore {
        crls: Vec::new(),
        ..trust
    });
    let client_config = client_tls.client_config(Arc::new(|_| true)).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut s) => {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"ok").await;
                let _ = s.shutdown().await;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let client = async {
        let mut s = connector
            .connect(ServerName::try_from("tool.invalid").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        use tokio::io::AsyncReadExt;
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        if buf == b"ok" {
            Ok(())
        } else {
            Err("no reply".to_string())
        }
    };
    let client_result = client.await;
    let server_result = server.await.unwrap();
    server_result?;
    client_result
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bound_child_gets_the_task_identity_and_loses_it_when_the_task_ends() {
    let writ = Writ::start(&config(""));
    let child = BoundChild::spawn(&writ, "worker");
    let outsider = BoundChild::spawn(&writ, "outsider");
    let mut tasks = tasks_client(&writ).await;
    let mut events = task_events(&writ).await;
    let task = tasks
        .begin_task(begin_pid("t-42", child.pid()))
        .await
        .unwrap()
        .into_inner();
    let task_id = format!("{ORCH_ID}/task/t-42");
    assert_eq!(task.spiffe_id, task_id);
    assert_eq!(task.orchestrator_spiffe_id, ORCH_ID);

    child.go();
    outsider.go();
    let (ids, serials) = child.next_update(Duration::from_secs(10));
    assert_eq!(
        ids,
        vec![task_id.clone(), ORCH_ID.to_string()],
        "task identity first"
    );
    let task_serial = serials[0].clone();
    // The SVID the child holds was minted as the task began: BeginTask,
    // ListTasks and the watchers' event all name its serial.
    assert_eq!(task.issued_serials, [task_serial.as_str()]);
    let listed = tasks
        .list_tasks(apb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks[0].issued_serials, [task_serial.as_str()]);
    let begun = events.message().await.unwrap().unwrap();
    assert_eq!(begun.kind, apb::task_event::Kind::Begun as i32);
    assert_eq!(begun.task.unwrap().issued_serials, [task_serial.as_str()]);
    let (outsider_ids, _) = outsider.next_update(Duration::from_secs(10));
    assert_eq!(
        outsider_ids,
        vec![ORCH_ID.to_string()],
        "outsider must not get the task identity"
    );

    // While the task runs, the tool server accepts the task SVID.
    let (crls, bundle) = crls_and_bundle(&writ).await;
    let (chain, key) = child.svid_files(1);
    tool_server_accepts(&chain, &key, &bundle, crls)
        .await
        .expect("active task SVID accepted");

    let ended = tasks
        .end_task(apb::EndTaskRequest {
            task_id: "t-42".into(),
            reason: "done".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.completion_reason, "end_task");
    assert!(
        ended.issued_serials.contains(&task_serial),
        "{:?} lacks {task_serial}",
        ended.issued_serials
    );
    // Asked again, the completed task reports the same serials (from the
    // store rather than from the completion).
    let again = tasks.end_task(end_req("t-42")).await.unwrap().into_inner();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(again.issued_serials),
        sorted(ended.issued_serials.clone())
    );
    let completed = events.message().await.unwrap().unwrap();
    assert_eq!(completed.kind, apb::task_event::Kind::Completed as i32);
    assert_eq!(
        sorted(completed.task.unwrap().issued_serials),
        sorted(ended.issued_serials.clone())
    );

    // The child's open stream gets a full state without the task identity,
    // with its other identity re-keyed.
    let (ids, serials) = child.next_update(Duration::from_secs(10));
    assert_eq!(ids, vec![ORCH_ID.to_string()]);
    assert_ne!(serials[0], task_serial);
    let (crls, bundle) = crls_and_bundle(&writ).await;
    assert!(
        revoked_serials(&crls).contains(&task_serial),
        "serial not in CRL"
    );
    let refused = tool_server_accepts(&chain, &key, &bundle, crls.clone()).await;
    // Refused for being revoked, and the client is told so by its alert.
    let why = refused.expect_err("revoked task SVID was accepted");
    assert!(why.contains("invalid peer certificate: Revoked"), "{why}");
    // The child's re-keyed identity is valid but no task: not authorized.
    let (chain, key) = child.svid_files(2);
    let why = tool_server_accepts(&chain, &key, &bundle, crls)
        .await
        .expect_err("a non-task identity was accepted");
    assert!(
        why.contains(&format!("peer {ORCH_ID} is not authorized")),
        "{why}"
    );
}

/// A process that matches no entry is served its task's identity alone, so
/// once the task ends it holds nothing valid: its stream is refused (no
/// identity left) and the only certificate it ever held is on the CRL. This
/// is what the README offers to whoever needs that guarantee, since the
/// identities held beside a task are re-keyed but not revoked.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_matching_no_entry_holds_nothing_valid_after_its_task() {
    let writ = Writ::start(&config_for_orchestrator(&orchestrator_only(), "", ""));
    let child = BoundChild::spawn_with(&writ, "worker", helper_elsewhere(&writ, "task-child"));

    let mut tasks = tasks_client(&writ).await;
    tasks
        .begin_task(begin_pid("t-alone", child.pid()))
        .await
        .unwrap();
    child.go();
    let task_id = format!("{ORCH_ID}/task/t-alone");
    let (ids, serials) = child.next_update(Duration::from_secs(10));
    assert_eq!(ids, vec![task_id], "the task's identity and nothing else");
    let task_serial = serials[0].clone();

    tasks.end_task(end_req("t-alone")).await.unwrap();
    let refused = common::wait_for(Duration::from_secs(10), "the stream to end", || {
        child.stream_errors().into_iter().next()
    });
    assert!(refused.starts_with("PermissionDenied"), "{refused}");
    let (crls, _) = crls_and_bundle(&writ).await;
    assert!(
        revoked_serials(&crls).contains(&task_serial),
        "the task's serial is not in the CRL"
    );
    // Nor does asking again bring anything.
    assert!(
        child
            .lines
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "an identity was served after the task ended"
    );
    // Refusals of the child are on the audit trail, as any refusal is.
    let trail = std::fs::read_to_string(writ.dir.path().join("state/audit/audit.jsonl")).unwrap();
    let denied = trail
        .lines()
        // The file's preallocated tail is not records.
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "denied" && r["action"] == "IssueX509SVID")
        .filter(|r| r["caller"]["pid"] == child.pid())
        .count();
    assert!(
        denied >= 1,
        "no denied record for the child's stream:\n{trail}"
    );
}

/// Selectors for the orchestrator's entry that only the test binary itself
/// matches, not a copy of it run from elsewhere (`helper_elsewhere`).
fn orchestrator_only() -> String {
    let uid = nix::unistd::geteuid().as_raw();
    let test_exe = std::env::current_exe().unwrap();
    format!(r#""unix:uid:{uid}", "unix:path:{}""#, test_exe.display())
}

/// The helper `role`, run from a copy of this binary in writ's temp dir: the
/// same uid, but not the orchestrator's executable, so no entry of
/// `orchestrator_only` matches it.
fn helper_elsewhere(writ: &Writ, role: &str) -> Command {
    let copy = writ.dir.path().join(format!("{role}-exe"));
    common::copy_executable(&std::env::current_exe().unwrap(), &copy);
    let helper = helper_command(role);
    let mut command = Command::new(&copy);
    command.args(helper.get_args()).envs(
        helper
            .get_envs()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
    );
    command
}

/// A bundle stream, like an SVID stream, is for callers that hold an
/// identity: when the only one it held was a task's, the task's end refuses
/// the stream at once, rather than sending it the new bundles and CRL until
/// the next re-attestation.
#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_stream_whose_only_identity_was_a_task_is_refused_when_it_ends() {
    let writ = Writ::start(&config_for_orchestrator(
        &orchestrator_only(),
        "",
        "\n[workload_api]\nreattest_interval = \"1h\"\n",
    ));
    let child = BoundChild::spawn_with(&writ, "bundles", helper_elsewhere(&writ, "bundles-child"));
    let mut tasks = tasks_client(&writ).await;
    tasks
        .begin_task(begin_pid("t-bundles", child.pid()))
        .await
        .unwrap();
    child.go();
    child.next_update(Duration::from_secs(10));

    tasks.end_task(end_req("t-bundles")).await.unwrap();
    let outcome = common::wait_for(
        Duration::from_secs(10),
        "the bundle stream to react",
        || {
            if let Some(error) = child.stream_errors().into_iter().next() {
                return Some(error);
            }
            child
                .lines
                .try_recv()
                .ok()
                .map(|update| format!("sent {update}"))
        },
    );
    assert!(outcome.starts_with("PermissionDenied"), "{outcome}");
}

/// A task that runs out its TTL ends quietly for the process bound to it:
/// its SVID is rotated while a replacement can live a whole second, then kept
/// to its end; the stream never fails (it used to end with Unavailable when
/// the CA was asked for an SVID under a second), and the identity held
/// beside the task is re-keyed when the task completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_bound_childs_stream_lives_through_its_tasks_ttl() {
    let writ = Writ::start(&config(""));
    let child = BoundChild::spawn(&writ, "worker");
    let mut tasks = tasks_client(&writ).await;
    let mut req = begin_pid("t-short", child.pid());
    req.ttl = "3s".into();
    tasks.begin_task(req).await.unwrap();
    child.go();
    let task_id = format!("{ORCH_ID}/task/t-short");
    let (ids, serials) = child.next_update(Duration::from_secs(10));
    assert_eq!(ids, vec![task_id.clone(), ORCH_ID.to_string()]);
    let held_beside = serials[1].clone();
    let mut task_serials = vec![serials[0].clone()];
    let mut updates = 1;
    loop {
        let (ids, serials) = child.next_update(Duration::from_secs(10));
        updates += 1;
        if ids.first() == Some(&task_id) {
            task_serials.push(serials[0].clone());
            continue;
        }
        assert_eq!(ids, vec![ORCH_ID.to_string()]);
        if serials[0] != held_beside {
            break;
        }
    }
    let errors = child.stream_errors();
    assert!(errors.is_empty(), "the stream failed: {errors:?}");
    // The first SVID, its one rotation, the drop in the task's last
    // second, the re-key at completion: no burst of ever shorter rotations.
    assert!(updates <= 5, "{updates} updates for a 3 s task");
    let task = get_task(&mut tasks, "t-short").await;
    assert_eq!(task.completion_reason, "ttl_expired");
    for serial in &task_serials {
        assert!(task.issued_serials.contains(serial), "{serial} not revoked");
    }
}

/// Completions back to back, seen from a stream they do not concern: it
/// may receive fewer messages than there were CRL publications (a stream
/// that has just sent one holds newer documents back while resending them
/// to every stream is costly), but it always ends up with the newest CRL,
/// revoking every task's serial, and with no task identity.
#[tokio::test(flavor = "multi_thread")]
async fn an_unaffected_stream_ends_up_with_the_newest_crl_after_a_burst_of_completions() {
    // Re-attesting would also resend the newest state; with a long interval
    // it cannot hide a publication the stream failed to pass on.
    let writ = Writ::start(&config("[workload_api]\nreattest_interval = \"1h\"\n"));
    let outsider = BoundChild::spawn(&writ, "outsider");
    let workers: Vec<BoundChild> = (0..4)
        .map(|i| BoundChild::spawn(&writ, &format!("worker-{i}")))
        .collect();
    let mut tasks = tasks_client(&writ).await;
    let mut task_serials = Vec::new();
    for (i, worker) in workers.iter().enumerate() {
        let id = format!("t-burst-{i}");
        tasks
            .begin_task(begin_pid(&id, worker.pid()))
            .await
            .unwrap();
        worker.go();
        let (ids, serials) = worker.next_update(Duration::from_secs(10));
        assert_eq!(ids[0], format!("{ORCH_ID}/task/{id}"));
        task_serials.push(serials[0].clone());
    }
    outsider.go();
    let (ids, _, revoked) = outsider.next_update_with_crl(Duration::from_secs(10));
    assert_eq!(ids, vec![ORCH_ID.to_string()]);
    assert!(revoked.is_empty(), "nothing completed yet: {revoked:?}");

    for i in 0..workers.len() {
        tasks
            .end_task(end_req(&format!("t-burst-{i}")))
            .await
            .unwrap();
    }
    loop {
        let (ids, _, revoked) = outsider.next_update_with_crl(Duration::from_secs(10));
        assert_eq!(ids, vec![ORCH_ID.to_string()]);
        if task_serials.iter().all(|s| revoked.contains(s)) {
            break;
        }
    }
}

async fn collect_completions(
    events: &mut tonic::Streaming<apb::TaskEvent>,
    window: Duration,
) -> HashMap<String, Vec<String>> {
    let mut done: HashMap<String, Vec<String>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok(Some(ev))) = tokio::time::timeout_at(deadline, events.message()).await {
        if ev.kind == apb::task_event::Kind::Completed as i32 {
            let t = ev.task.unwrap();
            done.entry(t.task_id).or_default().push(t.completion_reason);
        }
    }
    done
}

/// A cgroup `<prefix>-<pid>.slice` under the v2 mount for one test; it and
/// its `job` child are removed when this is dropped.
struct TestSlice {
    mount: PathBuf,
    name: String,
}

impl TestSlice {
    /// `None`, saying so loudly, when not root (creating cgroups needs it).
    fn create(prefix: &str) -> Option<Self> {
        if !is_root() {
            eprintln!("SKIPPED: needs root to create cgroups");
            return None;
        }
        let mount = writ_attestors::find_cgroup2_mount()
            .unwrap()
            .expect("cgroup2 mounted");
        let name = format!("{prefix}-{}.slice", std::process::id());
        std::fs::create_dir(mount.join(&name)).unwrap();
        Some(Self { mount, name })
    }

    fn dir(&self) -> PathBuf {
        self.mount.join(&self.name)
    }

    /// Makes its child cgroup `job` and returns its directory.
    fn make_job(&self) -> PathBuf {
        let job = self.dir().join("job");
        std::fs::create_dir(&job).unwrap();
        job
    }

    /// The config table that makes writ trust this slice's cgroups.
    fn trusted_root(&self) -> String {
        format!(
            "\n[attestors.cgroup]\ntrusted_roots = [\"/{}\"]\n",
            self.name
        )
    }
}

impl Drop for TestSlice {
    fn drop(&mut self) {
        // Its child cgroups first (a cgroup with children cannot go).
        for child in std::fs::read_dir(self.dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if child.path().is_dir() {
                let _ = std::fs::remove_dir(child.path());
            }
        }
        let _ = std::fs::remove_dir(self.dir());
    }
}

/// The kernel lets a cgroup's name hold any byte but '/' and a newline; one
/// that is not UTF-8 no selector or binding can name. A process in such a
/// cgroup is attested without cgroup facts and served what its other
/// selectors earn; a probe's was refused everything with `Unavailable`,
/// which clients retry forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_in_a_cgroup_whose_name_is_not_utf8_is_still_attested() {
    use std::os::unix::ffi::OsStrExt as _;
    let Some(test_slice) = TestSlice::create("writ-test-odd-name") else {
        return;
    };
    let odd = test_slice
        .dir()
        .join(std::ffi::OsStr::from_bytes(b"ff\xff"));
    std::fs::create_dir(&odd).unwrap();
    let writ = Writ::start(&config(&test_slice.trusted_root()));
    let fetched = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && exec "$2" api fetch x509 --socket "$3""#)
        .args(["sh".as_ref(), odd.as_os_str()])
        .arg(common::WRIT)
        .arg(writ.endpoint())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&fetched.stdout);
    let err = String::from_utf8_lossy(&fetched.stderr);
    assert!(fetched.status.success(), "{out}{err}");
    assert!(out.contains(ORCH_ID), "{out}");
}

/// An orchestrator may bind a cgroup before it starts the task's processes
/// in it: the task does not end as "emptied" until the cgroup has held a
/// process and holds none.
#[tokio::test(flavor = "multi_thread")]
async fn a_cgroup_bound_before_its_processes_start_ends_once_they_are_gone() {
    let Some(test_slice) = TestSlice::create("writ-test-early") else {
        return;
    };
    let slice = test_slice.name.clone();
    let job = test_slice.make_job();
    let writ = Writ::start(&config(&test_slice.trusted_root()));
    let mut tasks = tasks_client(&writ).await;
    tasks
        .begin_task(begin_cgroup("early", &format!("/{slice}/job")))
        .await
        .unwrap();
    let worker = BoundChild::spawn(&writ, "late-starter");
    std::fs::write(job.join("cgroup.procs"), worker.pid().to_string()).unwrap();
    worker.go();
    let (ids, _) = tokio::task::block_in_place(|| worker.next_update(Duration::from_secs(10)));
    assert_eq!(ids[0], format!("{ORCH_ID}/task/early"), "{ids:?}");
    assert_eq!(get_task(&mut tasks, "early").await.completed_at, 0);
    drop(worker); // killed and reaped: the cgroup is empty again
    let waited = std::time::Instant::now();
    loop {
        let t = get_task(&mut tasks, "early").await;
        if t.completed_at != 0 {
            assert_eq!(t.completion_reason, "cgroup_empty", "{t:?}");
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the emptied cgroup's task never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bound cgroup that is removed ends its task, and a cgroup made again at
/// its path is another cgroup: its processes do not get the task's
/// identity. Removal signals nothing on the cgroup's own files, so writ
/// used to miss it: the task lived to its TTL, and whatever was started in
/// the new cgroup was served the task's SVID.
#[tokio::test(flavor = "multi_thread")]
async fn a_bound_cgroup_removed_and_made_again_ends_its_task_and_serves_nothing_new() {
    let Some(test_slice) = TestSlice::create("writ-test-remade") else {
        return;
    };
    let slice = test_slice.name.clone();
    let job = test_slice.make_job();
    let writ = Writ::start(&config(&test_slice.trusted_root()));
    let mut tasks = tasks_client(&writ).await;
    for id in ["remade", "removed"] {
        std::fs::create_dir_all(&job).unwrap();
        tasks
            .begin_task(begin_cgroup(id, &format!("/{slice}/job")))
            .await
            .unwrap();
        std::fs::remove_dir(&job).unwrap();
        if id == "remade" {
            std::fs::create_dir(&job).unwrap();
            let worker = BoundChild::spawn(&writ, "in-the-new-cgroup");
            std::fs::write(job.join("cgroup.procs"), worker.pid().to_string()).unwrap();
            worker.go();
            let (ids, _) =
                tokio::task::block_in_place(|| worker.next_update(Duration::from_secs(10)));
            assert_eq!(ids, [ORCH_ID], "the new cgroup's process got {ids:?}");
            drop(worker);
            std::fs::remove_dir(&job).unwrap();
        }
        assert_eq!(completion_reason(&mut tasks, id).await, "cgroup_empty");
    }
}

/// Runs a process inside the cgroup at `dir` that exits at once: it moves
/// itself in, then execs `true`. Returns once it has been reaped.
fn run_briefly_in(dir: &Path) {
    let procs = dir.join("cgroup.procs");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {}; exec true", procs.display()))
        .status()
        .unwrap();
    assert!(status.success(), "moving into {} failed", dir.display());
}

/// Waits until task `id` has completed, and returns its completion reason.
async fn completion_reason(
    tasks: &mut apb::tasks_client::TasksClient<tonic::transport::Channel>,
    id: &str,
) -> String {
    let waited = std::time::Instant::now();
    loop {
        let t = get_task(tasks, id).await;
        if t.completed_at != 0 {
            return t.completion_reason;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "task {id} never ended: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A task's process may come and go within a millisecond (a quick tool
/// call), between two looks of writ at the cgroup: `populated` then reads 0
/// each time. The cgroup's CPU time, grown since the task began, still
/// tells that it held a process, so the task ends. It used to live to its
/// TTL, its credentials valid all along.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_lived_a_moment_in_a_bound_cgroup_ends_its_task() {
    let Some(test_slice) = TestSlice::create("writ-test-brief") else {
        return;
    };
    let slice = test_slice.name.clone();
    let writ = Writ::start(&config(&test_slice.trusted_root()));
    let mut tasks = tasks_client(&writ).await;
    for n in 0..5 {
        let job = test_slice.dir().join(format!("job{n}"));
        std::fs::create_dir(&job).unwrap();
        let id = format!("brief-{n}");
        tasks
            .begin_task(begin_cgroup(&id, &format!("/{slice}/job{n}")))
            .await
            .unwrap();
        run_briefly_in(&job);
        assert_eq!(completion_reason(&mut tasks, &id).await, "cgroup_empty");
    }
}

/// A `sleep` in each of several cgroups; dropping this (before the
/// `TestSlice` they are under) kills every one left and removes its cgroup.
#[derive(Default)]
struct CgroupSleepers(HashMap<usize, (PathBuf, Child)>);

impl CgroupSleepers {
    /// Makes the cgroup `dir` and starts process `n` in it.
    fn start_in(&mut self, n: usize, dir: PathBuf) {
        std::fs::create_dir(&dir).unwrap();
        // Filed before it is moved: a failed move still kills it.
        let child = Command::new("sleep").arg("600").spawn().unwrap();
        let pid = child.id();
        self.0.insert(n, (dir.clone(), child));
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// Kills process `n` and reaps it, which empties its cgroup.
    fn stop(&mut self, n: usize) {
        if let Some((_, child)) = self.0.get_mut(&n) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for CgroupSleepers {
    fn drop(&mut self) {
        for (dir, child) in self.0.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// How many inotify instances process `pid` holds open.
fn inotify_instances(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|to| to.as_os_str() == "anon_inode:inotify")
        })
        .count()
}

/// Each cgroup-bound task used to open an inotify instance of its own: at
/// 128 tasks (the default fs.inotify.max_user_instances) writ held every
/// instance its uid may, so that its uid's other processes (root's:
/// systemd, the container runtime) could open none, and the tasks past 128
/// silently re-read their cgroups every 100 ms. One instance serves them
/// all, and a cgroup emptying ends its own task and no other.
#[tokio::test(flavor = "multi_thread")]
async fn many_cgroup_tasks_share_one_inotify_instance_and_each_ends_alone() {
    const TASKS: usize = 150;
    let Some(test_slice) = TestSlice::create("writ-test-many") else {
        return;
    };
    let slice = test_slice.name.clone();
    let writ = Writ::start(&config(&test_slice.trusted_root()));
    let mut tasks = tasks_client(&writ).await;
    let mut sleepers = CgroupSleepers::default();
    for n in 0..TASKS {
        sleepers.start_in(n, test_slice.dir().join(format!("c{n}")));
        tasks
            .begin_task(begin_cgroup(
                &format!("many-{n}"),
                &format!("/{slice}/c{n}"),
            ))
            .await
            .unwrap();
    }
    // Exactly one: none would mean every task fell back to re-reading its
    // cgroup every 100 ms.
    let instances = inotify_instances(writ.pid());
    assert_eq!(
        instances, 1,
        "writ holds {instances} inotify instances for {TASKS} cgroup tasks"
    );

    // Under the same parent as the rest, and some past the 128th.
    let emptied = [0, 1, 77, 128, 149];
    for n in emptied {
        sleepers.stop(n);
    }
    for n in emptied {
        assert_eq!(
            completion_reason(&mut tasks, &format!("many-{n}")).await,
            "cgroup_empty"
        );
    }
    for n in (0..TASKS).filter(|n| !emptied.contains(n)) {
        let t = get_task(&mut tasks, &format!("many-{n}")).await;
        assert_eq!(t.completed_at, 0, "{t:?}");
    }
}

/// A cgroup bound before its processes start is still waiting for them
/// after writ restarts, unless a process ran in it while writ was down:
/// writ used to take any empty cgroup at restart for one that had emptied,
/// ending tasks whose work had not started.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_crash_a_cgroup_still_waiting_for_its_processes_stays_bound() {
    let Some(test_slice) = TestSlice::create("writ-test-waiting") else {
        return;
    };
    let slice = test_slice.name.clone();
    let mut writ = Writ::start(&config(&test_slice.trusted_root()));
    let mut tasks = tasks_client(&writ).await;
    for name in ["waiting", "ran"] {
        std::fs::create_dir(test_slice.dir().join(name)).unwrap();
        tasks
            .begin_task(begin_cgroup(name, &format!("/{slice}/{name}")))
            .await
            .unwrap();
    }
    writ.kill9();
    run_briefly_in(&test_slice.dir().join("ran"));
    writ.spawn();

    let mut tasks = tasks_client(&writ).await;
    assert_eq!(completion_reason(&mut tasks, "ran").await, "cgroup_empty");
    let t = get_task(&mut tasks, "waiting").await;
    assert_eq!(t.completed_at, 0, "{t:?}");
    run_briefly_in(&test_slice.dir().join("waiting"));
    assert_eq!(
        completion_reason(&mut tasks, "waiting").await,
        "cgroup_empty"
    );
}

/// Binding a cgroup needs authority over it, as binding a PID does: the
/// caller must own it (a delegated cgroup is its user's) or be allowed to
/// bind anything (`bind_any_pid`). Otherwise an admin caller could hand an
/// identity of its choosing to other users' processes under a trusted root.
#[tokio::test(flavor = "multi_thread")]
async fn a_cgroup_can_be_bound_only_by_its_owner_or_a_caller_allowed_anything() {
    let Some(test_slice) = TestSlice::create("writ-test-owner") else {
        return;
    };
    let slice = test_slice.name.clone();
    std::fs::create_dir(test_slice.dir().join("ours")).unwrap();
    let theirs = test_slice.dir().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    let roots = test_slice.trusted_root();

    let writ = Writ::start(&config(&roots));
    let mut tasks = tasks_client(&writ).await;
    tasks
        .begin_task(begin_cgroup("ours", &format!("/{slice}/ours")))
        .await
        .unwrap();
    let err = tasks
        .begin_task(begin_cgroup("theirs", &format!("/{slice}/theirs")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("owned by uid 65534"),
        "{}",
        err.message()
    );

    let trusting = Writ::start(&config(&roots).replacen(
        "[admin_api]\n",
        "[admin_api]\nbind_any_pid = [[\"unix:uid:0\"]]\n",
        1,
    ));
    tasks_client(&trusting)
        .await
        .begin_task(begin_cgroup("theirs", &format!("/{slice}/theirs")))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_trigger_completes_its_task_exactly_once() {
    let Some(test_slice) = TestSlice::create("writ-test") else {
        return;
    };
    let slice = test_slice.name.clone();
    let writ = Writ::start(&config(&test_slice.trusted_root()));
    let mut tasks = tasks_client(&writ).await;
    let mut events = task_events(&writ).await;

    let sleeper = || Command::new("sleep").arg("60").spawn().unwrap();
    // EndTask (then a second EndTask, which must not complete it again).
    let mut a = sleeper();
    tasks.begin_task(begin_pid("by-end", a.id())).await.unwrap();
    tasks.end_task(end_req("by-end")).await.unwrap();
    let again = tasks
        .end_task(end_req("by-end"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.completion_reason, "end_task");
    let _ = a.kill();
    let _ = a.wait();
    // Process exit.
    let mut b = sleeper();
    tasks
        .begin_task(begin_pid("by-exit", b.id()))
        .await
        .unwrap();
    b.kill().unwrap();
    b.wait().unwrap();
    // Cgroup emptied.
    let job = test_slice.make_job();
    let mut c = sleeper();
    std::fs::write(job.join("cgroup.procs"), c.id().to_string()).unwrap();
    tasks
        .begin_task(begin_cgroup("by-cgroup", &format!("/{slice}/job")))
        .await
        .unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    // TTL.
    let mut d = sleeper();
    let mut req = begin_pid("by-ttl", d.id());
    req.ttl = "2s".into();
    tasks.begin_task(req).await.unwrap();
    // Parent completion cascades to its sub-task.
    let mut e = sleeper();
    let mut f = sleeper();
    tasks.begin_task(begin_pid("parent", e.id())).await.unwrap();
    let mut sub = begin_pid("child", f.id());
    sub.parent_task_id = "parent".into();
    sub.intent.as_mut().unwrap().tools = vec!["jira".into()];
    let child_task = tasks.begin_task(sub).await.unwrap().into_inner();
    assert_eq!(
        child_task.spiffe_id,
        format!("{ORCH_ID}/task/parent/task/child")
    );
    tasks.end_task(end_req("parent")).await.unwrap();

    let done = collect_completions(&mut events, Duration::from_secs(4)).await;
    let want = [
        ("by-end", "end_task"),
        ("by-exit", "process_exited"),
        ("by-cgroup", "cgroup_empty"),
        ("by-ttl", "ttl_expired"),
        ("parent", "end_task"),
        ("child", "parent_completed"),
    ];
    for (id, reason) in want {
        assert_eq!(
            done.get(id),
            Some(&vec![reason.to_string()]),
            "task {id}: {done:?}"
        );
    }
    for p in [&mut d, &mut e, &mut f] {
        let _ = p.kill();
        let _ = p.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sub_tasks_cannot_widen_their_parents_scope() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut p = Command::new("sleep").arg("60").spawn().unwrap();
    let mut c = Command::new("sleep").arg("60").spawn().unwrap();
    tasks.begin_task(begin_pid("parent", p.id())).await.unwrap();
    type Widen = Box<dyn Fn(&mut apb::BeginTaskRequest)>;
    let cases: Vec<(&str, Widen)> = vec![
        (
            "intent.tools",
            Box::new(|r| r.intent.as_mut().unwrap().tools.push("shell".into())),
        ),
        (
            "intent.targets",
            Box::new(|r| r.intent.as_mut().unwrap().targets = vec!["prod-db".into()]),
        ),
        (
            "intent.data_class",
            Box::new(|r| r.intent.as_mut().unwrap().data_class = "secret".into()),
        ),
        ("ttl", Box::new(|r| r.ttl = "59m".into())),
    ];
    for (field, widen) in cases {
        let mut req = begin_pid("wider", c.id());
        req.parent_task_id = "parent".into();
        widen(&mut req);
        let err = tasks.begin_task(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // A sub-task that names no data class handles its parent's.
    let mut req = begin_pid("unlabelled", c.id());
    req.parent_task_id = "parent".into();
    req.intent.as_mut().unwrap().data_class = String::new();
    let sub = tasks.begin_task(req).await.unwrap().into_inner();
    assert_eq!(sub.intent.unwrap().data_class, "internal");
    // Once the parent has ended, no sub-task can begin under it.
    tasks.end_task(end_req("parent")).await.unwrap();
    let mut req = begin_pid("late", c.id());
    req.parent_task_id = "parent".into();
    let err = tasks.begin_task(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().starts_with("parent_task_id"), "{err:?}");
    for p in [&mut p, &mut c] {
        let _ = p.kill();
        let _ = p.wait();
    }
}

/// Completed tasks stay listed for a day by default, far more than one
/// response can carry on a busy node (about 35,000 tasks passed the 4 MiB
/// gRPC clients accept, and `writ task list --all` failed): ListTasks
/// answers a page at a time, in the order the tasks began.
#[tokio::test(flavor = "multi_thread")]
async fn tasks_are_listed_a_page_at_a_time_in_the_order_they_began() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let ids: Vec<String> = (0..7).map(|n| format!("t-{n}")).collect();
    for (n, id) in ids.iter().enumerate() {
        tasks.begin_task(begin_pid(id, sleeper.id())).await.unwrap();
        if n % 2 == 1 {
            tasks.end_task(end_req(id)).await.unwrap();
        }
    }
    let all = listed_pages(&mut tasks, true, 3).await;
    assert_eq!(all, [&ids[0..3], &ids[3..6], &ids[6..7]]);
    let active = listed_pages(&mut tasks, false, 2).await;
    assert_eq!(active, [["t-0", "t-2"], ["t-4", "t-6"]]);
    // 0 is the default page (500), and more than 1000 is taken as 1000.
    for page_size in [0, 5000] {
        assert_eq!(listed_pages(&mut tasks, true, page_size).await, [&ids[..]]);
    }

    for (page_size, page_token, field) in [
        (-1, "", "page_size"),
        (0, "abc", "page_token"),
        (0, "0", "page_token"),
        (0, "-4", "page_token"),
    ] {
        let err = tasks
            .list_tasks(apb::ListTasksRequest {
                include_completed: true,
                page_size,
                page_token: page_token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{err:?}");
    }

    // The CLI goes through every page.
    let socket = admin_socket(&writ);
    let list = |extra: &[&str]| {
        let mut args = vec!["task", "list", "--all", "--page-size", "2"];
        args.extend_from_slice(extra);
        args.extend(["--admin-socket", socket.to_str().unwrap()]);
        let (ok, stdout, stderr) = common::writ_cli(&args, None);
        assert!(ok, "{stderr}");
        stdout
    };
    let human: Vec<String> = list(&[])
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(human, ids);
    let json: serde_json::Value = serde_json::from_str(&list(&["--output", "json"])).unwrap();
    assert_eq!(task_ids_in(&json), ids);
    assert_eq!(json[1]["completion_reason"], "end_task");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// An explicit SPIFFE ID must lie in the orchestrator's own lineage:
/// below its own ID, or below the parent task's for a sub-task. Any
/// authorized caller could otherwise give a child any identity of the
/// trust domain (a tester's child got root's).
#[tokio::test(flavor = "multi_thread")]
async fn an_explicit_spiffe_id_must_lie_in_the_callers_lineage() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let explicit =
        |id: &str, spiffe_id: &str, parent: &str| begin_explicit(id, child.id(), spiffe_id, parent);
    let own = tasks
        .begin_task(explicit("own", &format!("{ORCH_ID}/research/run-1"), ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.spiffe_id, format!("{ORCH_ID}/research/run-1"));
    let sub = tasks
        .begin_task(explicit(
            "sub",
            &format!("{ORCH_ID}/research/run-1/step-2"),
            "own",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sub.spiffe_id, format!("{ORCH_ID}/research/run-1/step-2"));
    for (id, spiffe_id, parent) in [
        ("root", "spiffe://writ.test/root", ""),
        ("itself", ORCH_ID, ""),
        ("look-alike", &format!("{ORCH_ID}-other/x"), ""),
        ("sibling", &format!("{ORCH_ID}/elsewhere"), "own"),
    ] {
        let err = tasks
            .begin_task(explicit(id, spiffe_id, parent))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{id}: {err:?}");
        assert!(
            err.message().contains("outside the caller's lineage"),
            "{err:?}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A shell whose children run inside whatever task is bound to it: it runs
/// each command line it is sent and answers with the line's output and
/// exit status.
struct TaskShell {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl TaskShell {
    fn spawn() -> TaskShell {
        let mut child = Command::new("sh")
            .args([
                "-c",
                r#"while IFS= read -r line; do eval "$line" 2>&1; echo "@@exit $?"; done"#,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        TaskShell {
            child,
            stdin,
            stdout,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `line` in a child of the shell: (exit status, its output).
    fn run(&mut self, line: &str) -> (i32, String) {
        writeln!(self.stdin, "{line}").unwrap();
        let mut out = String::new();
        loop {
            let mut l = String::new();
            assert!(
                self.stdout.read_line(&mut l).unwrap() > 0,
                "the shell exited"
            );
            if let Some(status) = l.strip_prefix("@@exit ") {
                return (status.trim().parse().unwrap(), out);
            }
            out.push_str(&l);
        }
    }
}

impl Drop for TaskShell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process working in a task begins sub-tasks of it, whether it names
/// the task as parent or not. A probe's bound process, in a task for
/// `search` on `internal` data for 5 minutes, began a task without
/// `--parent` for `shell` on `secret` data for 55 minutes and got
/// `.../task/t3/task/t3-esc`: wider than its task, and still active after
/// the task ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_begun_from_inside_a_task_is_a_sub_task_of_it() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut shell = TaskShell::spawn();
    let mut target = Command::new("sleep").arg("60").spawn().unwrap();
    let mut req = begin_pid("t3", shell.pid());
    req.intent = Some(apb::Intent {
        tools: vec!["search".into()],
        targets: vec!["wiki".into()],
        data_class: "internal".into(),
        ..Default::default()
    });
    req.ttl = "5m".into();
    let t3 = tasks.begin_task(req).await.unwrap().into_inner();
    let begin = |args: &str| {
        format!(
            "{} task begin --admin-socket {} --pid {} {args}",
            common::WRIT,
            admin_socket(&writ).display(),
            target.id()
        )
    };

    for (args, field) in [
        ("--id esc --tool shell", "intent.tools"),
        ("--id esc --target prod-db", "intent.targets"),
        (
            "--id esc --tool search --data-class secret",
            "intent.data_class",
        ),
        ("--id esc --tool search --ttl 55m", "ttl"),
    ] {
        let (status, out) = shell.run(&begin(args));
        assert_ne!(status, 0, "{args}: began {out}");
        assert!(
            out.contains("InvalidArgument")
                && out.contains(&format!("{field}:"))
                && out.contains("task t3 (the caller works in it"),
            "{args}: {out}"
        );
    }
    // An explicit identity lies below the task's, not merely below the
    // orchestrator's.
    let (status, out) = shell.run(&begin(&format!(
        "--id esc --tool search --spiffe-id {ORCH_ID}/elsewhere"
    )));
    assert_ne!(status, 0, "began {out}");
    assert!(
        out.contains("PermissionDenied") && out.contains("outside the caller's lineage"),
        "{out}"
    );
    let (status, out) = shell.run(&begin("--id sub --tool search"));
    assert_eq!(status, 0, "{out}");
    let (status, out) = shell.run(&begin(&format!(
        "--id named --spiffe-id {}/step-2",
        t3.spiffe_id
    )));
    assert_eq!(status, 0, "{out}");
    let sub = get_task(&mut tasks, "sub").await;
    assert_eq!(sub.parent_task_id, "t3");
    assert_eq!(sub.spiffe_id, format!("{}/task/sub", t3.spiffe_id));
    assert_eq!(sub.orchestrator_spiffe_id, t3.spiffe_id);
    assert!(sub.expires_at <= t3.expires_at, "{sub:?}");
    assert_eq!(sub.intent.unwrap().data_class, "internal");
    assert_eq!(get_task(&mut tasks, "named").await.parent_task_id, "t3");
    let esc = tasks
        .get_task(apb::GetTaskRequest {
            task_id: "esc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(esc.code(), Code::NotFound, "{esc:?}");

    // They end with it.
    tasks.end_task(end_req("t3")).await.unwrap();
    for id in ["sub", "named"] {
        let t = get_task(&mut tasks, id).await;
        assert_eq!(t.completion_reason, "parent_completed", "{id}: {t:?}");
        assert_eq!(t.completion_detail, "ended with task t3", "{id}: {t:?}");
    }
    // Out of the task, the shell's begins are its orchestrator's own again.
    let (status, out) = shell.run(&begin("--id after --tool shell"));
    assert_eq!(status, 0, "{out}");
    let after = get_task(&mut tasks, "after").await;
    assert_eq!(
        (after.parent_task_id.as_str(), after.spiffe_id.as_str()),
        ("", format!("{ORCH_ID}/task/after").as_str())
    );
    target.kill().unwrap();
    target.wait().unwrap();
}

/// A process inside a sub-task's binding is inside its parent's too (the
/// same process here; a child process or a child cgroup in practice). It
/// holds the sub-task's identity, not the parent's broader one: a probe's
/// sub-task process was served both, so narrowing tools and targets bound
/// nothing. Once the sub-task ends, the parent's is its identity again.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_in_a_sub_tasks_binding_holds_the_sub_task_not_its_parent() {
    let writ = Writ::start(&config(""));
    let child = BoundChild::spawn(&writ, "sub-worker");
    let mut tasks = tasks_client(&writ).await;
    let mut parent = begin_pid("wide", child.pid());
    parent.intent = Some(apb::Intent {
        tools: vec!["jira".into(), "shell".into()],
        ..Default::default()
    });
    let parent = tasks.begin_task(parent).await.unwrap().into_inner();
    let mut sub = begin_explicit("narrow", child.pid(), "", "wide");
    sub.intent = Some(apb::Intent {
        tools: vec!["jira".into()],
        ..Default::default()
    });
    let sub = tasks.begin_task(sub).await.unwrap().into_inner();
    assert_eq!(sub.spiffe_id, format!("{}/task/narrow", parent.spiffe_id));

    child.go();
    let (ids, _) = child.next_update(Duration::from_secs(10));
    assert_eq!(
        ids,
        vec![sub.spiffe_id.clone(), ORCH_ID.to_string()],
        "the sub-task's identity, never its parent's"
    );

    tasks.end_task(end_req("narrow")).await.unwrap();
    let (ids, _) = child.next_update(Duration::from_secs(10));
    assert_eq!(ids, vec![parent.spiffe_id.clone(), ORCH_ID.to_string()]);
    tasks.end_task(end_req("wide")).await.unwrap();
}

/// No two active tasks hold one SPIFFE ID, and no task holds an ID below
/// an active task's unless it is a sub-task of it. A probe began `t7` with
/// `t6`'s ID while `t6` was active (ending `t6` left `t7`'s certificate for
/// that ID valid, and `t7`'s processes could end `t6`), and `t8` with
/// `.../task/t6/task/fake-sub` without being a sub-task of `t6`.
#[tokio::test(flavor = "multi_thread")]
async fn no_active_task_takes_anothers_identity_or_one_below_it() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id();
    let explicit =
        move |id: &str, spiffe_id: &str, parent: &str| begin_explicit(id, pid, spiffe_id, parent);
    let t6 = tasks
        .begin_task(begin_pid("t6", pid))
        .await
        .unwrap()
        .into_inner();
    let t6_id = t6.spiffe_id.clone();

    let err = tasks
        .begin_task(explicit("t7", &t6_id, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().starts_with("spiffe_id:") && err.message().contains("active task t6"),
        "{err:?}"
    );
    let fake = format!("{t6_id}/task/fake-sub");
    let err = tasks
        .begin_task(explicit("t8", &fake, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("active task t6") && err.message().contains("parent_task_id t6"),
        "{err:?}"
    );
    // As a sub-task of t6 it may; below a sibling it may not, below its
    // own parent and grandparent it may.
    let real = format!("{t6_id}/task/real-sub");
    tasks.begin_task(explicit("t8", &real, "t6")).await.unwrap();
    let deeper = format!("{real}/deeper");
    let err = tasks
        .begin_task(explicit("t9", &deeper, "t6"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("active task t8"), "{err:?}");
    tasks
        .begin_task(explicit("t9", &deeper, "t8"))
        .await
        .unwrap();

    // An identity derived from a task id collides like a named one.
    tasks
        .begin_task(explicit("x10", &format!("{ORCH_ID}/task/t10"), ""))
        .await
        .unwrap();
    let err = tasks.begin_task(begin_pid("t10", pid)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("active task x10"), "{err:?}");
    // A task id asked for again is still reported as such.
    let err = tasks.begin_task(begin_pid("t6", pid)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(err.message(), "task t6 already exists");

    // Begins racing for one identity: exactly one has it.
    let racing = format!("{ORCH_ID}/race");
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let mut tasks = tasks.clone();
            let req = explicit(&format!("race-{n}"), &racing, "");
            tokio::spawn(async move { tasks.begin_task(req).await })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(won, 1);

    // Nor may a task take an identity above an active task outside its
    // lineage: that task would read as a sub-task of the new one. A
    // sibling whose name merely starts the same is fine.
    let lower = format!("{ORCH_ID}/seq/a/b");
    tasks
        .begin_task(explicit("seq-b", &lower, ""))
        .await
        .unwrap();
    let err = tasks
        .begin_task(explicit("seq-a", &format!("{ORCH_ID}/seq/a"), ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("active task seq-b has {lower}, which lies below")),
        "{err:?}"
    );
    tasks
        .begin_task(explicit("seq-ab", &format!("{ORCH_ID}/seq/a/bc"), ""))
        .await
        .unwrap();

    // Only active tasks hold an identity: once t6 (and its sub-tasks
    // with it) has ended, its ID may be had again.
    tasks.end_task(end_req("t6")).await.unwrap();
    let again = tasks
        .begin_task(explicit("t7", &t6_id, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.spiffe_id, t6_id);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// A sub-task has its parent's attributes: it may add keys, and repeat
/// one with the same value, but not change one. A probe's sub-task of a
/// task with `approval=pending` declared `approval=granted`.
#[tokio::test(flavor = "multi_thread")]
async fn a_sub_task_inherits_its_parents_attributes_and_may_only_add_keys() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let with = |id: &str, parent: &str, attributes: &[(&str, &str)]| {
        let mut req = begin_pid(id, sleeper.id());
        req.parent_task_id = parent.into();
        req.intent.as_mut().unwrap().attributes = attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        req
    };
    let attributes = |t: apb::Task| {
        let mut a: Vec<(String, String)> = t.intent.unwrap().attributes.into_iter().collect();
        a.sort();
        a
    };
    let pairs = |a: &[(&str, &str)]| -> Vec<(String, String)> {
        a.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    tasks
        .begin_task(with(
            "t9",
            "",
            &[("approval", "pending"), ("ticket", "OPS-1")],
        ))
        .await
        .unwrap();
    let err = tasks
        .begin_task(with(
            "t9s",
            "t9",
            &[("approval", "granted"), ("ticket", "OPS-999")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("intent.attributes:")
            && err.message().contains(r#""approval" is "pending""#)
            && err.message().contains(r#""granted""#),
        "{err:?}"
    );
    let added = tasks
        .begin_task(with("t9s", "t9", &[("approval", "pending"), ("step", "2")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        attributes(added),
        pairs(&[("approval", "pending"), ("step", "2"), ("ticket", "OPS-1")])
    );
    let none = tasks
        .begin_task(with("t9u", "t9", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        attributes(none),
        pairs(&[("approval", "pending"), ("ticket", "OPS-1")])
    );
    // A grandchild has them all, and is held to its parent's additions.
    let err = tasks
        .begin_task(with("t9g", "t9s", &[("step", "3")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("parent task t9s"), "{err:?}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// A writ that authorizes nobody beside root, with `admin_extra` in its
/// `[admin_api]` table and `rest` after it, and its admin socket (0770)
/// reachable by nobody through its group; `None`, said loudly, unless the
/// tests run as root (they call as another user).
fn writ_authorizing_nobody(admin_extra: &str, rest: &str) -> Option<(Writ, PathBuf)> {
    if !is_root() {
        eprintln!("SKIPPED: needs root to call as another user");
        return None;
    }
    let nobody = common::NOBODY;
    let writ = Writ::start(&format!(
        "\n[admin_api]\nauthorized = [[\"unix:uid:0\"], [\"unix:uid:{nobody}\"]]\n{admin_extra}\n{rest}"
    ));
    let admin = admin_socket(&writ);
    std::os::unix::fs::chown(&admin, None, Some(nobody)).unwrap();
    Some((writ, admin))
}

/// An authorized caller that did not begin a task, and does not work in
/// it, may neither begin sub-tasks of it nor end it: it could otherwise
/// hand out identities in another orchestrator's lineage
/// (`.../root/task/t/task/hijack`) or stop its work. A tester did both as
/// another user.
#[test]
fn a_stranger_may_neither_delegate_from_nor_end_anothers_task() {
    let nobody = common::NOBODY;
    let Some((_writ, admin)) = writ_authorizing_nobody(
        "",
        &format!(
            r#"
[[entry]]
spiffe_id = "{ORCH_ID}"
selectors = ["unix:uid:0"]

[[entry]]
spiffe_id = "spiffe://writ.test/stranger"
selectors = ["unix:uid:{nobody}"]
"#
        ),
    ) else {
        return;
    };
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let (ok, _, stderr) = common::writ_cli(
        &[
            "task",
            "begin",
            "--pid",
            &sleeper.id().to_string(),
            "--id",
            "theirs",
            "--admin-socket",
            admin.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{stderr}");

    let as_stranger = |script: &str| {
        use std::os::unix::process::CommandExt;
        let out = Command::new("sh")
            .args(["-c", script])
            .uid(nobody)
            .gid(nobody)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = as_stranger(&format!(
        "sleep 30 & {} task begin --pid $! --parent theirs --id hijack --admin-socket {}; s=$?; kill $!; exit $s",
        common::WRIT,
        admin.display()
    ));
    assert!(!ok, "the stranger began a sub-task");
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("may begin sub-tasks of it"),
        "{stderr}"
    );
    let (ok, stderr) = as_stranger(&format!(
        "{} task end theirs --admin-socket {}",
        common::WRIT,
        admin.display()
    ));
    assert!(!ok, "the stranger ended the task");
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("may end it"),
        "{stderr}"
    );
    let (ok, out, stderr) = common::writ_cli(
        &[
            "task",
            "get",
            "theirs",
            "--admin-socket",
            admin.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok && out.contains("active"), "{out}{stderr}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// An entry gives any SPIFFE ID to whatever its selectors match, the
/// caller's own uid included: an authorized caller that could create one
/// would make itself root's identity (here the orchestrator's) and end or
/// sub-task its tasks. Creating and deleting entries takes `[admin_api]
/// operators` (by default the uid writ runs as); listing them does
/// not.
#[test]
fn only_callers_allowed_operators_may_create_or_delete_entries() {
    let nobody = common::NOBODY;
    let Some((writ, admin)) = writ_authorizing_nobody(
        "",
        &format!("[[entry]]\nspiffe_id = \"{ORCH_ID}\"\nselectors = [\"unix:uid:0\"]\n"),
    ) else {
        return;
    };
    let a = admin.to_str().unwrap();
    let create = |uid: Option<u32>, spiffe_id: &str| {
        common::writ_cli(
            &[
                "entry",
                "create",
                "--admin-socket",
                a,
                "--spiffe-id",
                spiffe_id,
                "--selector",
                &format!("unix:uid:{nobody}"),
            ],
            uid,
        )
    };
    let (ok, out, stderr) = create(Some(nobody), ORCH_ID);
    assert!(!ok, "nobody created an entry for root's identity: {out}");
    assert!(
        stderr.contains("PermissionDenied")
            && stderr.contains("may not create entries")
            && stderr.contains("[admin_api] operators"),
        "{stderr}"
    );
    // The orchestrator (root, writ's own uid by default) may.
    let (ok, id, stderr) = create(None, "spiffe://writ.test/for-nobody");
    assert!(ok, "{stderr}");
    let id = id.trim().to_owned();
    let (ok, out, stderr) =
        common::writ_cli(&["entry", "delete", "--admin-socket", a, &id], Some(nobody));
    assert!(!ok, "nobody deleted an entry: {out}");
    assert!(
        stderr.contains("PermissionDenied")
            && stderr.contains("may not delete entries")
            && stderr.contains("[admin_api] operators"),
        "{stderr}"
    );
    // Listing stays open to every authorized caller.
    let (ok, out, stderr) = common::writ_cli(&["entry", "list", "--admin-socket", a], Some(nobody));
    assert!(ok && out.contains("for-nobody"), "{out}{stderr}");
    // Nobody's selectors got no identity of root's.
    let (ok, out, _) = common::writ_cli(
        &["api", "fetch", "x509", "--socket", &writ.endpoint()],
        Some(nobody),
    );
    assert!(!ok || !out.contains(ORCH_ID), "{out}");
    let (ok, _, stderr) = common::writ_cli(&["entry", "delete", "--admin-socket", a, &id], None);
    assert!(ok, "{stderr}");

    // Nor may it choose which CA workloads trust for another trust domain,
    // or reload the configuration.
    let (ok, pem, stderr) = common::writ_cli(
        &["bundle", "show", "--format", "pem", "--admin-socket", a],
        None,
    );
    assert!(ok, "{stderr}");
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, pem.as_bytes()).unwrap();
    let readable = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(file.path(), readable).unwrap();
    let set = [
        "bundle",
        "set",
        "--trust-domain",
        "other.test",
        "--file",
        file.path().to_str().unwrap(),
        "--admin-socket",
        a,
    ];
    let delete = [
        "bundle",
        "delete",
        "--trust-domain",
        "other.test",
        "--admin-socket",
        a,
    ];
    let refused = |args: &[&str], call: &str| {
        let (ok, out, stderr) = common::writ_cli(args, Some(nobody));
        assert!(
            !ok && stderr.contains("PermissionDenied")
                && stderr.contains(&format!("may not {call}"))
                && stderr.contains("[admin_api] operators"),
            "{args:?}: {out}{stderr}"
        );
    };
    refused(&set, "set federated bundles");
    let (ok, _, stderr) = common::writ_cli(&set, None);
    assert!(ok, "{stderr}");
    refused(&delete, "delete federated bundles");
    refused(&["reload", "--admin-socket", a], "reload the configuration");
    let (ok, out, stderr) =
        common::writ_cli(&["bundle", "list", "--admin-socket", a], Some(nobody));
    assert!(ok && out.contains("other.test"), "{out}{stderr}");
    let (ok, _, stderr) = common::writ_cli(&delete, None);
    assert!(ok, "{stderr}");
}

/// Whoever `operators` names may manage entries, and an empty list
/// leaves entries to the config file alone.
#[test]
fn operators_grants_what_it_lists() {
    let nobody = common::NOBODY;
    let Some((_writ, admin)) =
        writ_authorizing_nobody(&format!("operators = [[\"unix:uid:{nobody}\"]]"), "")
    else {
        return;
    };
    let a = admin.to_str().unwrap();
    let args = [
        "entry",
        "create",
        "--admin-socket",
        a,
        "--spiffe-id",
        "spiffe://writ.test/x",
        "--selector",
        "unix:uid:1",
    ];
    let (ok, _, stderr) = common::writ_cli(&args, None);
    assert!(
        !ok && stderr.contains("[admin_api] operators"),
        "root is not listed: {stderr}"
    );
    let (ok, _, stderr) = common::writ_cli(&args, Some(nobody));
    assert!(ok, "{stderr}");
}

/// A PID from an orchestrator in another PID namespace (a container) is a
/// number in that namespace: read in writ's, it named another process
/// (`--pid 2` bound the host's kthreadd). Such a caller is refused.
#[test]
fn a_pid_from_a_caller_in_another_pid_namespace_is_refused() {
    if !is_root() || Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs root and unshare(1)");
        return;
    }
    let writ = Writ::start(&config(""));
    let admin = admin_socket(&writ);
    let script = format!(
        "sleep 30 & {} task begin --admin-socket {} --pid $! --id from-a-container; status=$?; kill $!; exit $status",
        common::WRIT,
        admin.display()
    );
    let out = Command::new("unshare")
        .args(["--fork", "--pid", "--mount-proc", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the task began: {stderr}");
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("runs in another PID namespace"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_unauthorized_admin_calls_are_refused() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut s = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = s.id();
    let cases: Vec<(&str, apb::BeginTaskRequest)> = vec![
        (
            "task_id",
            apb::BeginTaskRequest {
                task_id: "a/b".into(),
                ..begin_pid("", pid)
            },
        ),
        (
            "task_id",
            apb::BeginTaskRequest {
                task_id: "x".repeat(129),
                ..begin_pid("", pid)
            },
        ),
        (
            "binding",
            apb::BeginTaskRequest {
                binding: None,
                ..begin_pid("t", pid)
            },
        ),
        ("binding.pid", begin_pid("t", 0)),
        (
            "ttl",
            apb::BeginTaskRequest {
                ttl: "soon".into(),
                ..begin_pid("t", pid)
            },
        ),
        (
            "ttl",
            apb::BeginTaskRequest {
                ttl: "2h".into(),
                ..begin_pid("t", pid)
            },
        ),
        (
            "ttl",
            apb::BeginTaskRequest {
                ttl: "1s".into(),
                ..begin_pid("t", pid)
            },
        ),
        (
            "spiffe_id",
            apb::BeginTaskRequest {
                spiffe_id: "spiffe://other.test/x".into(),
                ..begin_pid("t", pid)
            },
        ),
        (
            "spiffe_id",
            apb::BeginTaskRequest {
                spiffe_id: "not an id".into(),
                ..begin_pid("t", pid)
            },
        ),
        (
            "spiffe_id",
            apb::BeginTaskRequest {
                spiffe_id: "spiffe://writ.test".into(),
                ..begin_pid("t", pid)
            },
        ),
        (
            "parent_task_id",
            apb::BeginTaskRequest {
                parent_task_id: "nope".into(),
                ..begin_pid("t", pid)
            },
        ),
        (
            "binding.cgroup",
            apb::BeginTaskRequest {
                binding: Some(apb::Binding {
                    target: Some(apb::binding::Target::Cgroup("/user.slice/x".into())),
                }),
                ..begin_pid("t", pid)
            },
        ),
    ];
    for (field, req) in cases {
        let err = tasks.begin_task(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // A thread of a process is not a process: said so, not "no such file".
    let me = std::process::id();
    let thread: u32 = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .find(|tid| *tid != me)
        .expect("the test runtime has threads");
    let err = tasks.begin_task(begin_pid("t", thread)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("{thread} is a thread of process {me}")),
        "{}",
        err.message()
    );
    // A process that is neither our descendant nor running under our uid
    // cannot be bound by us (bind_any_pid is not configured here).
    if is_root() {
        use std::os::unix::process::CommandExt;
        // sh starts a background sleep and exits: the sleep is re-parented
        // away from us, and runs as nobody.
        let out = Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .uid(common::NOBODY)
            .gid(common::NOBODY)
            .output()
            .unwrap();
        let stranger: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(!writ_attestors::is_descendant_of(
            stranger,
            std::process::id() as i32,
            writ_attestors::PinnedProcess::open(std::process::id() as i32)
                .unwrap()
                .start_time()
        ));
        let err = tasks
            .begin_task(begin_pid("t", stranger as u32))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(stranger),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert_eq!(
        tasks
            .get_task(apb::GetTaskRequest {
                task_id: "missing".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Nothing was stored by any of the refused calls.
    let listed = every_task_id(&mut tasks).await;
    assert!(listed.is_empty(), "{listed:?}");
    // An end reason is bounded like the purpose: a huge one is refused and
    // the task stays active.
    tasks.begin_task(begin_pid("t-reason", pid)).await.unwrap();
    let err = tasks
        .end_task(apb::EndTaskRequest {
            task_id: "t-reason".into(),
            reason: "x".repeat(100_000),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("reason"), "{}", err.message());
    assert_eq!(get_task(&mut tasks, "t-reason").await.completed_at, 0);
    let _ = s.kill();
    let _ = s.wait();

    // An admin API that authorizes some other uid refuses us.
    let locked = Writ::start(
        "[admin_api]\nauthorized = [[\"unix:uid:4242424\"]]\n\n[[entry]]\nspiffe_id = \"spiffe://writ.test/x\"\nselectors = [\"unix:uid:0\"]\n",
    );
    let mut c = tasks_client(&locked).await;
    let err = c
        .list_tasks(apb::ListTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let (ok, _, stderr) = common::writ_cli(
        &[
            "task",
            "list",
            "--admin-socket",
            admin_socket(&locked).to_str().unwrap(),
        ],
        None,
    );
    assert!(!ok && stderr.contains("PermissionDenied"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_watch_ends_when_writ_stops_and_does_not_hold_up_the_stop() {
    let mut writ = Writ::start(&config(""));
    // The call returns once the server has subscribed the watcher.
    let mut events = task_events(&writ).await;
    let (writ, status) = tokio::task::spawn_blocking(move || {
        let status = writ.stop();
        (writ, status)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    // The watch ended with the stop: writ did not wait out its drain
    // deadline for it.
    assert!(
        !writ
            .log()
            .contains("connections still open at the drain deadline"),
        "{}",
        writ.log()
    );
    let err = events.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("stopping"), "{}", err.message());
}

/// A WatchTasks stream, subscribed by the time this returns.
async fn task_events(writ: &Writ) -> tonic::Streaming<apb::TaskEvent> {
    tasks_client(writ)
        .await
        .watch_tasks(apb::WatchTasksRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Two children, each bound to a task of its own (`(child, task id)`), each
/// holding its task SVID: returned with the serials of that first update.
async fn two_bound_tasks(
    writ: &Writ,
    first: (&str, &str),
    second: (&str, &str),
) -> [(BoundChild, Vec<String>); 2] {
    let mut tasks = tasks_client(writ).await;
    let mut bound = Vec::new();
    for (child_name, task_id) in [first, second] {
        let child = BoundChild::spawn(writ, child_name);
        tasks
            .begin_task(begin_pid(task_id, child.pid()))
            .await
            .unwrap();
        bound.push((child, task_id));
    }
    let holding: Vec<(BoundChild, Vec<String>)> = bound
        .into_iter()
        .map(|(child, task_id)| {
            child.go();
            let (ids, serials) = child.next_update(Duration::from_secs(10));
            assert_eq!(ids[0], format!("{ORCH_ID}/task/{task_id}"));
            (child, serials)
        })
        .collect();
    match <[_; 2]>::try_from(holding) {
        Ok(both) => both,
        Err(_) => unreachable!("two children were bound"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_crash_dead_tasks_are_revoked_and_live_ones_resume() {
    let mut writ = Writ::start(&config(""));
    let [(dead, dead_serials), (alive, alive_serials)] =
        two_bound_tasks(&writ, ("dead", "dies"), ("alive", "lives")).await;
    let alive_first_serial = alive_serials[0].clone();
    let dead_serial = dead_serials[0].clone();

    writ.kill9();
    drop(dead); // kills and reaps the bound process while writ is down
    writ.spawn();

    let mut tasks = tasks_client(&writ).await;
    let t = get_task(&mut tasks, "dies").await;
    assert_eq!(t.completion_reason, "process_exited");
    assert!(t.issued_serials.contains(&dead_serial));
    let (crls, _) = crls_and_bundle(&writ).await;
    assert!(
        revoked_serials(&crls).contains(&dead_serial),
        "pre-crash serial missing from CRL"
    );

    let t = get_task(&mut tasks, "lives").await;
    assert_eq!(
        t.completed_at, 0,
        "task with a live process must stay active: {t:?}"
    );
    // The surviving process reconnects (its old stream died with writ) and
    // receives its task identity again, from a fresh key.
    let (ids, serials) = alive.next_update(Duration::from_secs(10));
    assert_eq!(ids[0], format!("{ORCH_ID}/task/lives"));
    assert_ne!(serials[0], alive_first_serial);
    let (ok, stdout, stderr) = common::writ_cli(
        &[
            "task",
            "get",
            "lives",
            "--admin-socket",
            admin_socket(&writ).to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("active"), "{stdout}");

    // Another crash: the revocation is still served, under a CRL number
    // higher than any the previous run used.
    let number_before = common::crl_number(&crls);
    writ.kill9();
    writ.spawn();
    let (crls, _) = crls_and_bundle(&writ).await;
    assert!(revoked_serials(&crls).contains(&dead_serial));
    let number_after = common::crl_number(&crls);
    assert!(
        number_after > number_before,
        "CRL number went from {number_before} to {number_after} across a restart"
    );
}

/// writ's own pid, read from the server end of a connection to its socket
/// (a wrapper such as strace stands between the test and it).
fn served_by(socket: &Path) -> i32 {
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .unwrap()
        .pid()
}

/// SIGKILLs a process when dropped: strace, killed, leaves its tracee running.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// `message` with a gRPC deadline (the `grpc-timeout` header), as clients
/// in other languages set one from their context.
fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// A call whose deadline passes midway (writ's gRPC server then drops it,
/// as it does when a client cancels) stops neither a begin nor an end: the
/// begun task still becomes active and is served to its process, the ended
/// one is still revoked and in the CRL. writ runs under strace with every
/// fdatasync of the store's log held 500 ms, so each call is waiting on the
/// store when its 100 ms deadline passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_cut_off_midway_stops_neither_a_begin_nor_an_end() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("SKIPPED: strace is not installed; this test delays writ's fdatasync with it");
        return;
    }
    let mut writ = Writ::start(&config(""));
    writ.kill9();
    // Only the store's syncs: the audit trail may sync on the thread that
    // asked (see `audit::log`), which would hold up the deadline itself.
    let wal = writ.dir.path().join("state/writ.db-wal");
    writ.spawn_under(&[
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-P",
        wal.to_str().unwrap(),
        "-e",
        "trace=fdatasync",
        "-e",
        "inject=fdatasync:delay_enter=500000",
    ]);
    let _writ_itself = KillOnDrop(served_by(&writ.socket));
    let child = BoundChild::spawn(&writ, "abandoned");
    child.go();
    let next_update = |child: &BoundChild| {
        tokio::task::block_in_place(|| child.next_update(Duration::from_secs(10)))
    };
    let (ids, _) = next_update(&child);
    assert_eq!(ids, vec![ORCH_ID.to_string()]);
    let mut tasks = tasks_client(&writ).await;
    let deadline = Duration::from_millis(100);

    let begin = begin_pid("abandoned", child.pid());
    let cut_off = tasks
        .begin_task(with_deadline(begin, deadline))
        .await
        .expect_err("BeginTask answered within its deadline");
    assert_eq!(cut_off.code(), Code::Cancelled, "{cut_off:?}");
    let (ids, serials) = next_update(&child);
    assert_eq!(ids[0], format!("{ORCH_ID}/task/abandoned"), "{ids:?}");
    let task_serial = serials[0].clone();

    let cut_off = tasks
        .end_task(with_deadline(end_req("abandoned"), deadline))
        .await
        .expect_err("EndTask answered within its deadline");
    assert_eq!(cut_off.code(), Code::Cancelled, "{cut_off:?}");
    let waited = std::time::Instant::now();
    loop {
        let (crls, _) = crls_and_bundle(&writ).await;
        if revoked_serials(&crls).contains(&task_serial) {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the cut-off EndTask never published the revocation of {task_serial}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = get_task(&mut tasks, "abandoned").await;
    assert_eq!(t.completion_reason, "end_task", "{t:?}");
    let (ids, _) = next_update(&child);
    assert_eq!(ids, vec![ORCH_ID.to_string()]);
}

/// A task row damaged while writ is down (or written by a newer writ) does
/// not keep writ from starting: that task is ended and its serial revoked,
/// GetTask names the damage (DataLoss), and the other task carries on.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_task_row_is_ended_and_revoked_at_restart_and_writ_still_starts() {
    let mut writ = Writ::start(&config(""));
    let [(_damaged, damaged_serials), (alive, _)] =
        two_bound_tasks(&writ, ("damaged", "damaged"), ("alive", "lives")).await;

    writ.kill9();
    {
        let db = rusqlite::Connection::open(writ.dir.path().join("state/writ.db")).unwrap();
        let changed = db
            .execute(
                "UPDATE tasks SET record = 'not json' WHERE task_id = 'damaged'",
                [],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }
    writ.spawn();

    let mut tasks = tasks_client(&writ).await;
    let e = tasks
        .get_task(apb::GetTaskRequest {
            task_id: "damaged".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");
    assert!(e.message().contains("damaged"), "{e:?}");
    let (crls, _) = crls_and_bundle(&writ).await;
    assert!(
        revoked_serials(&crls).contains(&damaged_serials[0]),
        "the damaged task's serial is not in the CRL"
    );
    let t = get_task(&mut tasks, "lives").await;
    assert_eq!(t.completed_at, 0, "{t:?}");
    let (ids, _) = alive.next_update(Duration::from_secs(10));
    assert_eq!(ids[0], format!("{ORCH_ID}/task/lives"));
}

/// The store keeps a completed task for `completed_retention`, and its
/// serial and revocation until the certificate expires; then a prune (one
/// runs at every start) removes them, a sub-task first and then its parent
/// in the same prune. An active task stays, whatever its age, and the audit
/// trail keeps the pruned task's records.
#[tokio::test]
async fn completed_tasks_leave_the_store_after_their_retention() {
    let mut writ = Writ::start(&config_with_tasks("completed_retention = \"1s\"", ""));
    let mut done_process = Command::new("sleep").arg("60").spawn().unwrap();
    let mut sub_process = Command::new("sleep").arg("60").spawn().unwrap();
    let mut live_process = Command::new("sleep").arg("60").spawn().unwrap();
    let serial = {
        let mut tasks = tasks_client(&writ).await;
        let short = apb::BeginTaskRequest {
            ttl: "2s".into(),
            ..begin_pid("done", done_process.id())
        };
        tasks.begin_task(short).await.unwrap();
        let sub = apb::BeginTaskRequest {
            parent_task_id: "done".into(),
            ..begin_pid("done-sub", sub_process.id())
        };
        tasks.begin_task(sub).await.unwrap();
        // Ending the parent ends its sub-task too.
        tasks.end_task(end_req("done")).await.unwrap();
        tasks
            .begin_task(begin_pid("lives", live_process.id()))
            .await
            .unwrap();
        let done = get_task(&mut tasks, "done").await;
        assert_ne!(done.completed_at, 0);
        done.issued_serials[0].clone()
    };
    let (crls, _) = crls_and_bundle(&writ).await;
    assert!(revoked_serials(&crls).contains(&serial));

    // The task's certificate lived at most its 2 s; the retention is 1 s;
    // a JWT-SVID of the task would have validated 30 s (the validators'
    // clock skew) past its 2 s deadline, and the id stays taken until then.
    tokio::time::sleep(Duration::from_secs(34)).await;
    assert!(writ.stop().success());
    writ.spawn();
    let mut tasks = tasks_client(&writ).await;
    let mut gone = false;
    for _ in 0..100 {
        match tasks
            .get_task(apb::GetTaskRequest {
                task_id: "done".into(),
            })
            .await
        {
            Err(status) if status.code() == Code::NotFound => {
                gone = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(status) => panic!("GetTask: {status:?}"),
        }
    }
    assert!(gone, "the completed task was not pruned");
    assert_eq!(every_task_id(&mut tasks).await, ["lives"]);
    assert_eq!(get_task(&mut tasks, "lives").await.completed_at, 0);
    let (crls, _) = crls_and_bundle(&writ).await;
    assert!(!revoked_serials(&crls).contains(&serial));
    let trail = common::read_to_string(&writ.dir.path().join("state/audit/audit.jsonl"));
    assert!(
        trail
            .lines()
            .any(|l| l.contains("\"task_ended\"") && l.contains("\"done\"")),
        "the audit trail lost the pruned task's completion"
    );
    for process in [&mut done_process, &mut sub_process, &mut live_process] {
        let _ = process.kill();
        let _ = process.wait();
    }
}

/// Not a test: the body of helper processes started by the tests above.
#[test]
#[ignore = "helper process entry point, run by other tests"]
fn helper() {
    let role = std::env::var("WRIT_TEST_HELPER").expect("run only as a helper");
    if role == "bundles-child" {
        return bundles_child();
    }
    if role == "admin-connection-then-setuid" {
        return admin_connection_then_setuid();
    }
    assert_eq!(role, "task-child");
    let go = std::env::var("WRIT_GO_FILE").unwrap();
    let out = PathBuf::from(std::env::var("WRIT_OUT_DIR").unwrap());
    let socket = PathBuf::from(std::env::var("WRIT_SOCKET").unwrap());
    common::wait_for(Duration::from_secs(120), "go file", || {
        std::fs::metadata(&go).ok()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Follows the stream; when writ goes away (a crash test restarts it), the
    // process lives on and reconnects, as a real workload would.
    rt.block_on(async move {
        let mut n = 0;
        loop {
            let Ok(channel) = writ::cli::client::connect(&socket).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut c = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
            let Ok(response) = c.fetch_x509svid(with_header(pb::X509svidRequest {})).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut stream = response.into_inner();
            loop {
                let m = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        println!("STREAM_ERROR {:?}: {}", status.code(), status.message());
                        std::io::stdout().flush().unwrap();
                        break;
                    }
                };
                n += 1;
                write_svid(&out, n, &m.svids[0]);
                let ids: Vec<_> = m.svids.iter().map(|s| s.spiffe_id.clone()).collect();
                let serials: Vec<_> = m
                    .svids
                    .iter()
                    .map(|s| {
                        let (_, cert) = X509Certificate::from_der(&s.x509_svid).unwrap();
                        hex::encode(cert.raw_serial())
                    })
                    .collect();
                let revoked: Vec<String> = m
                    .crl
                    .iter()
                    .flat_map(|der| {
                        let (_, crl) =
                            x509_parser::revocation_list::CertificateRevocationList::from_der(der)
                                .unwrap();
                        crl.iter_revoked_certificates()
                            .map(|r| hex::encode(r.raw_serial()))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                println!(
                    "UPDATE {}|{}|{}",
                    ids.join(","),
                    serials.join(","),
                    revoked.join(",")
                );
                std::io::stdout().flush().unwrap();
            }
        }
    });
}

/// The `admin-connection-then-setuid` helper: connects to `WRIT_SOCKET`,
/// hands the connection to the test (`WRIT_HANDOFF`) and keeps it open;
/// after the go-file, becomes nobody without an exec and prints READY.
fn admin_connection_then_setuid() {
    let conn =
        std::os::unix::net::UnixStream::connect(std::env::var("WRIT_SOCKET").unwrap()).unwrap();
    common::handoff::send_fd(std::env::var("WRIT_HANDOFF").unwrap().as_ref(), &conn);
    let go = std::env::var("WRIT_GO_FILE").unwrap();
    common::wait_for(Duration::from_secs(120), "go file", || {
        std::fs::metadata(&go).ok()
    });
    let nobody_gid = nix::unistd::Gid::from_raw(common::NOBODY);
    let nobody_uid = nix::unistd::Uid::from_raw(common::NOBODY);
    nix::unistd::setgroups(&[]).unwrap();
    nix::unistd::setresgid(nobody_gid, nobody_gid, nobody_gid).unwrap();
    nix::unistd::setresuid(nobody_uid, nobody_uid, nobody_uid).unwrap();
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
    drop(conn);
}

/// The `bundles-child` helper: after the go-file, follows one
/// FetchX509Bundles stream and reports each message as `UPDATE bundles|`
/// and how the stream ended as `STREAM_ERROR`.
fn bundles_child() {
    let go = std::env::var("WRIT_GO_FILE").unwrap();
    let socket = PathBuf::from(std::env::var("WRIT_SOCKET").unwrap());
    common::wait_for(Duration::from_secs(120), "go file", || {
        std::fs::metadata(&go).ok()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let report = |line: String| {
            println!("{line}");
            std::io::stdout().flush().unwrap();
        };
        let mut c = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            writ::cli::client::connect(&socket).await.unwrap(),
        );
        let mut stream = match c
            .fetch_x509_bundles(with_header(pb::X509BundlesRequest {}))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return report(format!(
                    "STREAM_ERROR {:?}: {}",
                    status.code(),
                    status.message()
                ));
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => report("UPDATE bundles|".into()),
                Ok(None) => return report("STREAM_ERROR ended without a status".into()),
                Err(status) => {
                    return report(format!(
                        "STREAM_ERROR {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                }
            }
        }
    });
}

fn write_svid(dir: &Path, n: usize, svid: &pb::X509svid) {
    std::fs::write(dir.join(format!("{n}.chain")), &svid.x509_svid).unwrap();
    std::fs::write(dir.join(format!("{n}.key")), &svid.x509_svid_key).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_federates_receives_that_trust_domains_bundle() {
    let writ = Writ::start(&config(""));
    let admin = admin_socket(&writ);
    // A bundle for other.test, set by hand as an operator would.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = params.self_signed(&key).unwrap();
    let pem_path = writ.dir.path().join("other.pem");
    std::fs::write(&pem_path, ca.pem()).unwrap();
    let (ok, _, err) = common::writ_cli(
        &[
            "bundle",
            "set",
            "--trust-domain",
            "other.test",
            "--format",
            "pem",
            "--file",
            pem_path.to_str().unwrap(),
            "--admin-socket",
            admin.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let fetch = || async {
        let mut c = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            writ::cli::client::connect(&writ.socket).await.unwrap(),
        );
        c.fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap()
    };
    // Our entry does not federate: no other.test bundle.
    assert!(
        !fetch()
            .await
            .federated_bundles
            .contains_key("spiffe://other.test")
    );

    // A task bound to this very process that federates with other.test.
    let mut tasks = tasks_client(&writ).await;
    let mut req = begin_pid("fed", std::process::id());
    req.federates_with = vec!["other.test".into()];
    let task = tasks.begin_task(req).await.unwrap().into_inner();
    assert_eq!(task.federates_with, vec!["other.test".to_string()]);
    let state = fetch().await;
    assert_eq!(state.svids[0].spiffe_id, task.spiffe_id);
    assert_eq!(
        state.federated_bundles.get("spiffe://other.test"),
        Some(&ca.der().to_vec())
    );

    // A sub-task cannot federate with a trust domain its parent does not.
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    tasks
        .begin_task(begin_pid("plain", child.id()))
        .await
        .unwrap();
    let mut sub = begin_pid("wider", child.id());
    sub.parent_task_id = "plain".into();
    sub.intent.as_mut().unwrap().tools = vec!["jira".into()];
    sub.federates_with = vec!["other.test".into()];
    let err = tasks.begin_task(sub).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("federates_with"),
        "{}",
        err.message()
    );
    tasks.end_task(end_req("fed")).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

/// The attestation count writ's /metrics reports.
fn attestations(addr: &str) -> u64 {
    metric(addr, "writ_attestation_seconds_count")
}

/// The value of the sample `name` (with its labels, if any) on /metrics.
fn metric(addr: &str, name: &str) -> u64 {
    let (_, page) = common::http_get(addr, "/metrics");
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} on /metrics:\n{page}"))
}

/// The CRL gauges say what every Workload API message carries: as many
/// entries as the served CRL lists, as many bytes as it has.
#[tokio::test(flavor = "multi_thread")]
async fn the_crl_gauges_match_the_served_crl() {
    let writ = Writ::start(&config("\n[telemetry]\nlisten = \"127.0.0.1:0\"\n"));
    let addr = metrics_addr(&writ);
    let served = |crls: &[bytes::Bytes]| crls.iter().map(|c| c.len() as u64).sum::<u64>();
    let (crls, _) = crls_and_bundle(&writ).await;
    assert_eq!(metric(&addr, "writ_crl_entries"), 0);
    assert_eq!(metric(&addr, "writ_crl_bytes"), served(&crls));

    let mut tasks = tasks_client(&writ).await;
    let mut revoked = 0;
    for id in ["crl-1", "crl-2"] {
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        tasks.begin_task(begin_pid(id, child.id())).await.unwrap();
        let ended = tasks.end_task(end_req(id)).await.unwrap().into_inner();
        revoked += ended.issued_serials.len();
        let _ = child.kill();
        let _ = child.wait();
    }
    let (crls, _) = crls_and_bundle(&writ).await;
    let listed = revoked_serials(&crls).len();
    assert!(
        revoked >= 2,
        "each task's first SVID is minted as it begins"
    );
    assert_eq!(listed, revoked);
    assert_eq!(metric(&addr, "writ_crl_entries") as usize, listed);
    assert_eq!(metric(&addr, "writ_crl_bytes"), served(&crls));
    assert!(served(&crls) > 0);
}

/// Where writ serves /metrics (its config has `[telemetry] listen`).
fn metrics_addr(writ: &Writ) -> String {
    let log = common::wait_for(Duration::from_secs(20), "telemetry address", || {
        let log = writ.log();
        log.contains("health and metrics on http://").then_some(log)
    });
    let start = log.find("health and metrics on http://").unwrap() + 29;
    log[start..].split('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_change_reattests_only_the_streams_it_concerns() {
    // Periodic re-attestation is pushed out of the test's way, so every
    // attestation counted below was caused by the task.
    let writ = Writ::start(&config(
        "\n[workload_api]\nreattest_interval = \"1h\"\n\n[telemetry]\nlisten = \"127.0.0.1:0\"\n",
    ));
    let addr = metrics_addr(&writ);

    const BYSTANDERS: usize = 4;
    let worker = BoundChild::spawn(&writ, "worker");
    let bystanders: Vec<BoundChild> = (0..BYSTANDERS)
        .map(|i| BoundChild::spawn(&writ, &format!("bystander{i}")))
        .collect();
    worker.go();
    for b in &bystanders {
        b.go();
    }
    worker.next_update(Duration::from_secs(10));
    let first: Vec<Vec<String>> = bystanders
        .iter()
        .map(|b| b.next_update(Duration::from_secs(10)).1)
        .collect();
    let before = attestations(&addr);

    let mut tasks = tasks_client(&writ).await;
    tasks
        .begin_task(begin_pid("t-scope", worker.pid()))
        .await
        .unwrap();
    let (ids, during) = worker.next_update(Duration::from_secs(10));
    assert_eq!(ids[0], format!("{ORCH_ID}/task/t-scope"));
    let task_serial = during[0].clone();
    tasks
        .end_task(apb::EndTaskRequest {
            task_id: "t-scope".into(),
            reason: "done".into(),
        })
        .await
        .unwrap();
    // One message drops the task, re-keys the identity held beside it and
    // carries the CRL that revokes the task's certificate.
    let (ids, after, revoked) = worker.next_update_with_crl(Duration::from_secs(10));
    assert_eq!(ids, vec![ORCH_ID.to_string()]);
    assert_ne!(
        after[0], during[1],
        "the identity beside the task was not re-keyed"
    );
    assert!(revoked.contains(&task_serial), "{revoked:?}");
    // Every bystander receives one update too (the new CRL, and the
    // orchestrator SVID it shares with the worker, re-keyed because the
    // worker held it during the task) without being re-judged itself.
    for (b, serials) in bystanders.iter().zip(&first) {
        let (ids, now, revoked) = b.next_update_with_crl(Duration::from_secs(10));
        assert_eq!(ids, vec![ORCH_ID.to_string()]);
        assert_ne!(&now, serials, "the shared SVID was not re-keyed");
        assert_eq!(now, after, "a bystander holds another key than the worker");
        assert!(revoked.contains(&task_serial), "{revoked:?}");
    }
    let caused = attestations(&addr) - before;
    // BeginTask attests the orchestrator, and EndTask on the same
    // connection reuses that: one. The worker's stream resolves its
    // entitlements again once the task begins, from the attestation it
    // already holds (a task bound to a PID changes nothing attested); when
    // the task ends it only drops the identity from that resolution. Had
    // any stream been re-attested, each would add at least one more.
    assert_eq!(
        caused, 1,
        "{caused} attestations for one task with {BYSTANDERS} bystanders"
    );
}

/// An admin connection's caller is attested on its first call and reused
/// by the next ones, like an open stream's; a new connection, a begun
/// cgroup-bound task (the caller may have been moved into that cgroup) and
/// the re-attest interval passing each make writ look again.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_connection_is_attested_once_until_something_may_have_changed() {
    let Some(test_slice) = TestSlice::create("writ-test-admin") else {
        return;
    };
    let slice = test_slice.name.clone();
    let job = test_slice.make_job();
    let writ = Writ::start(&config(&format!(
        "{}\n[workload_api]\nreattest_interval = \"1h\"\n\n[telemetry]\nlisten = \"127.0.0.1:0\"\n",
        test_slice.trusted_root()
    )));
    let addr = metrics_addr(&writ);
    let list = || apb::ListTasksRequest::default();

    let before = attestations(&addr);
    let mut tasks = tasks_client(&writ).await;
    for _ in 0..3 {
        tasks.list_tasks(list()).await.unwrap();
    }
    assert_eq!(
        attestations(&addr) - before,
        1,
        "three calls, one connection"
    );

    let before = attestations(&addr);
    tasks_client(&writ).await.list_tasks(list()).await.unwrap();
    assert_eq!(attestations(&addr) - before, 1, "a second connection");

    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(job.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    let before = attestations(&addr);
    tasks
        .begin_task(begin_cgroup("cg-admin", &format!("/{slice}/job")))
        .await
        .unwrap();
    tasks.list_tasks(list()).await.unwrap();
    tasks.list_tasks(list()).await.unwrap();
    assert_eq!(
        attestations(&addr) - before,
        1,
        "the call after a cgroup-bound task began, and only that one"
    );
    tasks.end_task(end_req("cg-admin")).await.unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// A helper that connects to the admin socket as root and hands the
/// connection over; once the test writes the go-file, it drops to nobody
/// (uid and gid, no exec) and prints READY. Returns the helper, a tasks
/// client over its connection, the go-file, and the helper's stdout.
async fn admin_connection_that_drops_to_nobody(
    writ: &Writ,
) -> (
    Child,
    apb::tasks_client::TasksClient<tonic::transport::Channel>,
    PathBuf,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let handoff_path = writ.dir.path().join("handoff.sock");
    let listener = std::os::unix::net::UnixListener::bind(&handoff_path).unwrap();
    let go = writ.dir.path().join("go-drop");
    let mut helper = helper_command("admin-connection-then-setuid")
        .env("WRIT_SOCKET", admin_socket(writ))
        .env("WRIT_HANDOFF", &handoff_path)
        .env("WRIT_GO_FILE", &go)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let fd = common::handoff::recv_fd(&listener);
    let lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let channel = common::handoff::channel_over(fd).await.unwrap();
    (
        helper,
        apb::tasks_client::TasksClient::new(channel),
        go,
        lines,
    )
}

/// Lets the helper of `admin_connection_that_drops_to_nobody` drop to
/// nobody, and waits until it has.
fn drop_to_nobody(go: &Path, lines: &mut std::io::Lines<BufReader<std::process::ChildStdout>>) {
    std::fs::write(go, b"go").unwrap();
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.ends_with("READY")),
        "the helper did not change its uid"
    );
}

/// An admin connection is served only under the credentials its process
/// connected with, as a Workload API connection is: a process that drops
/// from root to nobody is refused on its next call, not once the re-attest
/// interval (here an hour) has passed.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_call_is_refused_once_its_process_runs_under_other_credentials() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to change a helper's uid");
        return;
    }
    let writ = Writ::start(&config("\n[workload_api]\nreattest_interval = \"1h\"\n"));
    let (mut helper, mut tasks, go, mut lines) = admin_connection_that_drops_to_nobody(&writ).await;
    tasks
        .list_tasks(apb::ListTasksRequest::default())
        .await
        .unwrap();
    drop_to_nobody(&go, &mut lines);
    let err = tasks
        .list_tasks(apb::ListTasksRequest::default())
        .await
        .expect_err("served an admin call after its process changed its uid");
    common::assert_refused_for_dropping_to_nobody(&err);
    let _ = helper.kill();
    let _ = helper.wait();
}

/// A WatchTasks stream is authorized again before each event it sends and
/// every re-attest interval while idle: once its caller no longer matches
/// (here: it dropped to nobody), it ends with PermissionDenied instead of
/// going on sending every task's intent.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_watch_ends_once_its_caller_runs_under_other_credentials() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to change a helper's uid");
        return;
    }
    // Before the next event, with no periodic check in the way.
    let writ = Writ::start(&config("\n[workload_api]\nreattest_interval = \"1h\"\n"));
    let (mut helper, mut watcher, go, mut lines) =
        admin_connection_that_drops_to_nobody(&writ).await;
    let mut events = watcher
        .watch_tasks(apb::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    drop_to_nobody(&go, &mut lines);
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    tasks_client(&writ)
        .await
        .begin_task(begin_pid("secret", sleeper.id()))
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("the watch neither sent nor ended");
    match outcome {
        Err(status) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert!(
                status.message().contains("now runs as uid"),
                "{}",
                status.message()
            );
        }
        Ok(event) => panic!("a watcher that dropped to nobody was sent {event:?}"),
    }
    let _ = helper.kill();
    let _ = helper.wait();

    // While idle, at the re-attest interval.
    let writ = Writ::start(&config("\n[workload_api]\nreattest_interval = \"1s\"\n"));
    let (mut helper, mut watcher, go, mut lines) =
        admin_connection_that_drops_to_nobody(&writ).await;
    let mut events = watcher
        .watch_tasks(apb::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    drop_to_nobody(&go, &mut lines);
    let outcome = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("an idle watch went on after its caller dropped to nobody");
    match outcome {
        Err(status) => assert_eq!(status.code(), Code::PermissionDenied, "{status:?}"),
        Ok(event) => panic!("expected PermissionDenied, got {event:?}"),
    }
    let _ = helper.kill();
    let _ = helper.wait();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// The reuse above lasts no longer than the re-attest interval.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_connection_is_attested_again_after_the_reattest_interval() {
    let writ = Writ::start(&config(
        "\n[workload_api]\nreattest_interval = \"1s\"\n\n[telemetry]\nlisten = \"127.0.0.1:0\"\n",
    ));
    let addr = metrics_addr(&writ);
    let mut tasks = tasks_client(&writ).await;
    tasks
        .list_tasks(apb::ListTasksRequest::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = attestations(&addr);
    tasks
        .list_tasks(apb::ListTasksRequest::default())
        .await
        .unwrap();
    assert_eq!(attestations(&addr) - before, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_inside_a_cgroup_receives_the_cgroup_tasks_identity_and_loses_it() {
    let Some(test_slice) = TestSlice::create("writ-test-stream") else {
        return;
    };
    let (slice, mount) = (test_slice.name.clone(), test_slice.mount.clone());
    let job = test_slice.make_job();
    // No periodic re-attestation during the test: only the task's begin can
    // make the stream look again.
    let writ = Writ::start(&config(&format!(
        "{}\n[workload_api]\nreattest_interval = \"1h\"\n",
        test_slice.trusted_root()
    )));
    // The worker holds its stream before the task exists, and is moved into
    // the cgroup after its first message: only a cgroup-bound task's begin
    // tells its stream to look again.
    let worker = BoundChild::spawn(&writ, "in-cgroup");
    worker.go();
    let (ids, _) = worker.next_update(Duration::from_secs(10));
    assert_eq!(ids, vec![ORCH_ID.to_string()]);
    std::fs::write(job.join("cgroup.procs"), worker.pid().to_string()).unwrap();

    let mut tasks = tasks_client(&writ).await;
    tasks
        .begin_task(begin_cgroup("cg-stream", &format!("/{slice}/job")))
        .await
        .unwrap();
    let (ids, _) = worker.next_update(Duration::from_secs(10));
    assert_eq!(
        ids,
        vec![format!("{ORCH_ID}/task/cg-stream"), ORCH_ID.to_string()]
    );
    tasks.end_task(end_req("cg-stream")).await.unwrap();
    let (ids, _) = worker.next_update(Duration::from_secs(10));
    assert_eq!(ids, vec![ORCH_ID.to_string()]);
    // Out of the cgroup again, so the directories can be removed.
    let parent_procs = mount.join("cgroup.procs");
    std::fs::write(parent_procs, worker.pid().to_string()).unwrap();
}

/// A cgroup-bound task whose cgroup was removed while writ was down, and
/// another cgroup made at the same path for other processes, is completed
/// at restart: the new cgroup's processes never ran the task's work.
#[tokio::test(flavor = "multi_thread")]
async fn a_cgroup_recreated_while_writ_was_down_does_not_inherit_its_task() {
    let Some(test_slice) = TestSlice::create("writ-test-recreated") else {
        return;
    };
    let (slice, mount) = (test_slice.name.clone(), test_slice.mount.clone());
    let job = test_slice.make_job();
    let mut writ = Writ::start(&config(&test_slice.trusted_root()));
    let first = BoundChild::spawn(&writ, "first");
    std::fs::write(job.join("cgroup.procs"), first.pid().to_string()).unwrap();
    {
        let mut tasks = tasks_client(&writ).await;
        tasks
            .begin_task(begin_cgroup("cg-old", &format!("/{slice}/job")))
            .await
            .unwrap();
    }
    writ.kill9();
    drop(first);
    // The cgroup empties, goes, and is made again for a new workload.
    common::wait_for(Duration::from_secs(10), "job removed", || {
        std::fs::remove_dir(&job).ok()
    });
    std::fs::create_dir(&job).unwrap();
    let second = BoundChild::spawn(&writ, "second");
    std::fs::write(job.join("cgroup.procs"), second.pid().to_string()).unwrap();
    writ.spawn();

    let mut tasks = tasks_client(&writ).await;
    let t = get_task(&mut tasks, "cg-old").await;
    second.go();
    let (ids, _) = second.next_update(Duration::from_secs(10));
    // Out of the cgroup again, so the directories can be removed.
    std::fs::write(mount.join("cgroup.procs"), second.pid().to_string()).unwrap();
    assert_eq!(ids, vec![ORCH_ID.to_string()], "task identity inherited");
    assert_eq!(t.completion_reason, "cgroup_empty", "{t:?}");
}

/// The descriptor numbers writ has open now.
fn open_descriptors(pid: u32) -> std::collections::BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Lowers writ's soft open-file limit so that exactly `free` descriptor
/// numbers below it are unused (the kernel hands out the lowest unused
/// number under the soft limit), and returns the limits it had. The hard
/// limit stays (writ inherited the test's), so the old soft limit can be put
/// back without privilege.
fn leave_descriptors_free(pid: u32, free: usize) -> rustix::process::Rlimit {
    use rustix::process::{Pid, Resource, Rlimit, getrlimit, prlimit};
    let open = open_descriptors(pid);
    let limit = (0u64..).filter(|n| !open.contains(n)).nth(free).unwrap();
    let writ = Pid::from_raw(pid as i32).unwrap();
    let lowered = Rlimit {
        current: Some(limit),
        maximum: getrlimit(Resource::Nofile).maximum,
    };
    prlimit(Some(writ), Resource::Nofile, lowered).unwrap()
}

fn restore_descriptor_limit(pid: u32, previous: rustix::process::Rlimit) {
    let writ = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::prlimit(Some(writ), rustix::process::Resource::Nofile, previous).unwrap();
}

/// What became of a connection made while writ had one descriptor left:
/// accepting it takes that one, so pinning its peer cannot succeed.
enum Fate {
    HungUp,
    Served,
    /// Nothing within the wait: writ did not accept it (something of its
    /// own took the last descriptor first).
    NotAccepted,
}

fn connect_with_one_descriptor_left(writ: &Writ) -> Fate {
    use std::io::Read as _;
    let previous = leave_descriptors_free(writ.pid(), 1);
    let mut stream = std::os::unix::net::UnixStream::connect(&writ.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // A server that took the connection on would answer the preface with
    // its SETTINGS frame.
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
    let mut buf = [0u8; 64];
    let fate = match stream.read(&mut buf) {
        Ok(0) => Fate::HungUp,
        Ok(_) => Fate::Served,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Fate::HungUp,
        Err(_) => Fate::NotAccepted,
    };
    restore_descriptor_limit(writ.pid(), previous);
    fate
}

/// Out of descriptors, writ hangs up on a peer it accepted but could not
/// pin (the client reconnects, rather than being refused for as long as it
/// holds the connection), and BeginTask answers Unavailable and stores
/// nothing. Both serve again once descriptors are back.
#[tokio::test(flavor = "multi_thread")]
async fn out_of_descriptors_an_unpinned_peer_is_hung_up_on_and_begin_task_is_unavailable() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    // The admin connection is accepted and pinned before the squeeze.
    every_task_id(&mut tasks).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();

    let fate = (0..5)
        .map(|_| connect_with_one_descriptor_left(&writ))
        .find(|fate| !matches!(fate, Fate::NotAccepted));
    match fate {
        Some(Fate::HungUp) => {}
        Some(Fate::Served) => panic!("a peer writ could not pin was served:\n{}", writ.log()),
        _ => panic!("writ accepted no connection in 5 tries:\n{}", writ.log()),
    }
    assert!(
        writ.log()
            .contains("could not pin the peer; closing its connection"),
        "{}",
        writ.log()
    );

    let previous = leave_descriptors_free(writ.pid(), 0);
    let starved = tasks
        .begin_task(begin_pid("fd-starved", sleeper.id()))
        .await;
    restore_descriptor_limit(writ.pid(), previous);
    let status = starved.expect_err("BeginTask succeeded with no descriptor left");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("try again"),
        "{}",
        status.message()
    );
    let stored = tasks
        .get_task(apb::GetTaskRequest {
            task_id: "fd-starved".into(),
        })
        .await
        .expect_err("a refused task was stored");
    assert_eq!(stored.code(), Code::NotFound, "{stored:?}");

    // With descriptors back, both work again.
    tasks
        .begin_task(begin_pid("fd-starved", sleeper.id()))
        .await
        .unwrap();
    let mut workload = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        writ::cli::client::connect(&writ.socket).await.unwrap(),
    );
    let first = workload
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.svids[0].spiffe_id, ORCH_ID);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// A task whose TTL ran out and whose process exited, both while writ was
/// down, ends as ttl_expired at the restart, every time: which happened
/// first is unknown for the process, known for the TTL. It was one reason
/// or the other by a race between the restored task's timer and restore.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_whose_ttl_passed_while_writ_was_down_ends_as_ttl_expired() {
    let mut writ = Writ::start(&config(""));
    let mut sleepers: Vec<std::process::Child> = (0..4)
        .map(|_| Command::new("sleep").arg("60").spawn().unwrap())
        .collect();
    {
        let mut tasks = tasks_client(&writ).await;
        for (i, sleeper) in sleepers.iter().enumerate() {
            let mut begin = begin_pid(&format!("down-{i}"), sleeper.id());
            begin.ttl = "3s".into();
            tasks.begin_task(begin).await.unwrap();
        }
    }
    writ.kill9();
    for sleeper in &mut sleepers {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
    std::thread::sleep(Duration::from_millis(3500));
    writ.spawn();
    let mut tasks = tasks_client(&writ).await;
    for i in 0..4 {
        let id = format!("down-{i}");
        assert_eq!(
            completion_reason(&mut tasks, &id).await,
            "ttl_expired",
            "{id}"
        );
        let t = get_task(&mut tasks, &id).await;
        assert_eq!(t.completion_detail, "found after restart", "{t:?}");
    }
}

/// A task may not take a registration entry's identity, even one in its
/// caller's lineage, nor an entry an active task's: the entry goes on being
/// issued to whatever it matches, relying parties could not tell the two
/// apart, and ending the task would not end what that identity may do.
#[tokio::test(flavor = "multi_thread")]
async fn tasks_and_registration_entries_never_share_an_identity() {
    let tool_id = format!("{ORCH_ID}/db-tool");
    let writ = Writ::start(&config(&format!(
        "\n[[entry]]\nspiffe_id = \"{tool_id}\"\nselectors = [\"unix:uid:65534\"]\n\
         \n[[entry]]\nspiffe_id = \"{ORCH_ID}/task/pre/helper\"\nselectors = [\"unix:uid:65534\"]\n"
    )));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    // Nor one with an entry below it, its identity derived from its id:
    // relying parties would take the entry for part of the task.
    let err = tasks
        .begin_task(begin_pid("pre", sleeper.id()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().starts_with("task_id:")
            && err.message().contains(&format!(
                "registration entry {ORCH_ID}/task/pre/helper below it"
            )),
        "{err:?}"
    );
    let err = tasks
        .begin_task(begin_explicit("as-tool", sleeper.id(), &tool_id, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("registration entry"), "{err:?}");
    // Beside it, an identity of the task's own is fine.
    tasks
        .begin_task(begin_explicit(
            "own",
            sleeper.id(),
            &format!("{ORCH_ID}/db-tool-run"),
            "",
        ))
        .await
        .unwrap();
    // Nor does an entry take an active task's identity, until it has ended.
    let admin = admin_socket(&writ);
    let create = || {
        common::writ_cli(
            &[
                "entry",
                "create",
                "--admin-socket",
                admin.to_str().unwrap(),
                "--spiffe-id",
                &format!("{ORCH_ID}/db-tool-run"),
                "--selector",
                "unix:uid:65534",
            ],
            None,
        )
    };
    let (ok, out, err) = create();
    assert!(
        !ok && err.contains("is the identity of active task own"),
        "{out}{err}"
    );
    // Nor does a config entry, added and reloaded: the reload is refused
    // and changes nothing.
    let original = std::fs::read_to_string(&writ.config_path).unwrap();
    std::fs::write(
        &writ.config_path,
        format!(
            "{original}\n[[entry]]\nspiffe_id = \"{ORCH_ID}/db-tool-run\"\nselectors = [\"unix:uid:65533\"]\n"
        ),
    )
    .unwrap();
    let reload = || common::writ_cli(&["reload", "--admin-socket", admin.to_str().unwrap()], None);
    let (ok, out, err) = reload();
    assert!(
        !ok && err.contains("the identity of active task own"),
        "{out}{err}"
    );
    let (ok, out, err) = common::writ_cli(
        &["entry", "list", "--admin-socket", admin.to_str().unwrap()],
        None,
    );
    assert!(ok && !out.contains("65533"), "{out}{err}");
    tasks.end_task(end_req("own")).await.unwrap();
    let (ok, out, err) = reload();
    assert!(ok, "{out}{err}");
    let (ok, out, err) = create();
    assert!(ok, "{out}{err}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// A config entry added while writ was down, holding a live task's identity
/// (or one below it), ends that task at start: tasks and entries never
/// share an identity, and the configuration is what goes on. So does a
/// bundle endpoint configured with a live task's identity: that identity
/// is reserved from then on.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_whose_identity_a_new_config_entry_holds_ends_at_restart() {
    let mut writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    tasks
        .begin_task(begin_pid("taken", sleeper.id()))
        .await
        .unwrap();
    tasks
        .begin_task(begin_pid("reserved", sleeper.id()))
        .await
        .unwrap();
    tasks
        .begin_task(begin_pid("kept", sleeper.id()))
        .await
        .unwrap();
    writ.kill9();
    let original = std::fs::read_to_string(&writ.config_path).unwrap();
    std::fs::write(
        &writ.config_path,
        format!(
            "{original}\n[[entry]]\nspiffe_id = \"{ORCH_ID}/task/taken/helper\"\nselectors = [\"unix:uid:65534\"]\n\n[federation.bundle_endpoint]\nlisten = \"127.0.0.1:{}\"\nspiffe_id = \"{ORCH_ID}/task/reserved\"\n",
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        ),
    )
    .unwrap();
    writ.spawn();
    let mut tasks = tasks_client(&writ).await;
    let taken = get_task(&mut tasks, "taken").await;
    assert_eq!(taken.completion_reason, "identity_taken", "{taken:?}");
    let reserved = get_task(&mut tasks, "reserved").await;
    assert_eq!(reserved.completion_reason, "identity_taken", "{reserved:?}");
    assert!(
        writ.log()
            .contains("reserved for the federation bundle endpoint"),
        "{}",
        writ.log()
    );
    let kept = get_task(&mut tasks, "kept").await;
    assert_eq!(kept.completed_at, 0, "{kept:?}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// A task begun while an entry for its identity is created: one of the two
/// is refused, never both accepted, however they interleave (before, each
/// checked what the other had not yet finished adding).
#[tokio::test(flavor = "multi_thread")]
async fn a_task_and_an_entry_racing_for_one_identity_never_both_win() {
    let writ = Writ::start(&config(""));
    let tasks = tasks_client(&writ).await;
    let channel = writ::cli::client::connect(&admin_socket(&writ))
        .await
        .unwrap();
    let entries = apb::entries_client::EntriesClient::new(channel);
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id();
    let mut both = Vec::new();
    for j in 0..40 {
        let (mut tasks, mut entries) = (tasks.clone(), entries.clone());
        let id = format!("ra{j}");
        let begin = tasks.begin_task(begin_pid(&id, pid));
        let create = entries.create_entry(apb::CreateEntryRequest {
            spiffe_id: format!("{ORCH_ID}/task/{id}"),
            selectors: vec!["unix:uid:65534".into()],
            ..Default::default()
        });
        let (begun, created) = tokio::join!(begin, create);
        if begun.is_ok() && created.is_ok() {
            both.push(id);
        }
    }
    assert!(both.is_empty(), "both won for {both:?}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// One uid holds at most 16 task watches: each one that does not read may
/// hold up to 4 MiB of events, so stuck watches must not pile up. One
/// closed gives its place back.
#[tokio::test(flavor = "multi_thread")]
async fn a_uid_holds_at_most_16_task_watches() {
    let writ = Writ::start(&config(""));
    let tasks = tasks_client(&writ).await;
    let mut open = Vec::new();
    for _ in 0..16 {
        let mut client = tasks.clone();
        open.push(
            client
                .watch_tasks(apb::WatchTasksRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let mut client = tasks.clone();
    let err = client
        .watch_tasks(apb::WatchTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("16 task watches"), "{err:?}");
    drop(open.pop());
    common::wait_for(Duration::from_secs(10), "a watch's place back", || {
        let mut client = tasks.clone();
        let opened = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(client.watch_tasks(apb::WatchTasksRequest::default()))
        });
        opened.ok()
    });
}

/// A task's federated trust domains are bounded as an entry's are: every
/// listing, get and watch event carries them, and 16,000 of them made every
/// `writ task list` fail past the 4 MiB clients accept.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_names_at_most_64_federated_trust_domains() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let domains = |n: usize| (0..n).map(|i| format!("td{i}.example")).collect();
    let err = tasks
        .begin_task(apb::BeginTaskRequest {
            federates_with: domains(65),
            ..begin_pid("fed-many", sleeper.id())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("federates_with"), "{err:?}");
    tasks
        .begin_task(apb::BeginTaskRequest {
            federates_with: domains(64),
            ..begin_pid("fed-most", sleeper.id())
        })
        .await
        .unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// A BeginTaskRequest whose intent is as large as writ accepts: a 4 KiB
/// purpose, 64 tools and targets of 1 KiB, a 1 KiB data class and 64
/// attributes of 1 KiB keys and values (some 270 KB in all).
fn begin_largest(id: &str, pid: u32) -> apb::BeginTaskRequest {
    let kib = |c: char, n: usize| format!("{n:04}{}", c.to_string().repeat(1020));
    apb::BeginTaskRequest {
        intent: Some(apb::Intent {
            purpose: "p".repeat(4096),
            tools: (0..64).map(|n| kib('t', n)).collect(),
            targets: (0..64).map(|n| kib('g', n)).collect(),
            data_class: "d".repeat(1024),
            attributes: (0..64).map(|n| (kib('k', n), kib('v', n))).collect(),
        }),
        ..begin_pid(id, pid)
    }
}

/// ListTasks pages end at a byte budget as well as at their page size: 20
/// tasks of the largest intent (some 5 MB) made every listing that held
/// them fail with OutOfRange past the 4 MiB clients accept, `writ task list`
/// included, for as long as they were retained.
#[tokio::test(flavor = "multi_thread")]
async fn tasks_of_the_largest_intents_are_listed_in_pages_clients_accept() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let ids: Vec<String> = (0..20).map(|n| format!("big-{n:02}")).collect();
    for (n, id) in ids.iter().enumerate() {
        tasks
            .begin_task(begin_largest(id, sleeper.id()))
            .await
            .unwrap();
        if n % 2 == 0 {
            tasks.end_task(end_req(id)).await.unwrap();
        }
    }
    // The default page size (500) and the largest (1000): pages of a few
    // tasks, together every task once, in order.
    for page_size in [0, 1000] {
        let pages = listed_pages(&mut tasks, true, page_size).await;
        assert!(
            pages.len() > 1 && pages.iter().all(|p| !p.is_empty()),
            "{pages:?}"
        );
        assert_eq!(pages.concat(), ids);
    }
    let active = listed_pages(&mut tasks, false, 0).await.concat();
    let odd: Vec<String> = ids.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(active, odd);
    // The page size still bounds a page below its byte budget.
    let pages = listed_pages(&mut tasks, true, 2).await;
    assert!(pages.iter().all(|p| p.len() <= 2), "{pages:?}");
    assert_eq!(pages.concat(), ids);

    let socket = admin_socket(&writ);
    let (ok, stdout, stderr) = common::writ_cli(
        &[
            "task",
            "list",
            "--all",
            "--output",
            "json",
            "--admin-socket",
            socket.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(task_ids_in(&listed), ids);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// A watcher that stops reading is dropped once the events waiting for it
/// pass its byte budget (a few MiB), and is told so when it reads again
/// (DataLoss), rather than writ holding up to 4096 full events (over a
/// gigabyte of large tasks) for it. 80 events of the largest tasks (some
/// 21 MB) are far more than the budget and what the connection itself
/// buffers.
#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_that_stops_reading_is_dropped_at_its_byte_budget() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut stuck = task_events(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    for n in 0..40 {
        let id = format!("churn-{n:02}");
        tasks
            .begin_task(begin_largest(&id, sleeper.id()))
            .await
            .unwrap();
        tasks.end_task(end_req(&id)).await.unwrap();
    }
    // Whatever the connection had buffered comes first, in order; then
    // the refusal. (The bound only guards against a hang.)
    let mut read = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match stuck.message().await {
                Ok(Some(event)) => read.push(event.task.unwrap().task_id),
                Ok(None) => panic!("the watch ended without an error"),
                Err(err) => return err,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no DataLoss after reading {} events", read.len()));
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("fell behind"), "{}", err.message());
    assert!(read.len() < 80, "{}", read.len());
    let expected: Vec<String> = (0..40)
        .flat_map(|n| [format!("churn-{n:02}"), format!("churn-{n:02}")])
        .take(read.len())
        .collect();
    assert_eq!(read, expected);
    // A new watcher is served as ever.
    let mut fresh = task_events(&writ).await;
    tasks
        .begin_task(begin_pid("after", sleeper.id()))
        .await
        .unwrap();
    let event = fresh.message().await.unwrap().unwrap();
    assert_eq!(event.task.unwrap().task_id, "after");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// A refusal echoes the value it refuses only in part: copied whole, a
/// value of tens of KB made the status header larger than clients accept,
/// and the caller saw an HTTP/2 protocol error (Internal) instead of the
/// refusal naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_of_huge_values_name_the_field_with_the_value_shortened() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut entries = entries_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id();
    let big = "q".repeat(20_000);
    let check = |what: &str, result: Result<(), tonic::Status>, code: Code, starts: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().starts_with(starts),
            "{what}: {}",
            err.message()
        );
        assert!(err.message().len() < 1000, "{what}: {}", err.message());
        assert!(
            err.message().contains("(20000 bytes)"),
            "{what}: {}",
            err.message()
        );
    };
    let got = tasks
        .get_task(apb::GetTaskRequest {
            task_id: big.clone(),
        })
        .await
        .map(drop);
    check("GetTask", got, Code::NotFound, "task qqq");
    let got = tasks.end_task(end_req(&big)).await.map(drop);
    check("EndTask", got, Code::NotFound, "task qqq");
    let mut req = begin_pid("t-tool", pid);
    req.intent.as_mut().unwrap().tools.push(big.clone());
    let got = tasks.begin_task(req).await.map(drop);
    check("tool", got, Code::InvalidArgument, "intent.tools: item 2");
    let got = tasks
        .begin_task(begin_explicit("t-parent", pid, "", &big))
        .await
        .map(drop);
    check("parent", got, Code::InvalidArgument, "parent_task_id");
    let mut req = begin_pid("t-ttl", pid);
    req.ttl = format!("1{big}");
    let got = tasks.begin_task(req).await.map(drop);
    check("ttl", got, Code::InvalidArgument, "ttl");
    let mut req = begin_pid("t-fed", pid);
    req.federates_with = vec![big.clone()];
    let got = tasks.begin_task(req).await.map(drop);
    check(
        "federates_with",
        got,
        Code::InvalidArgument,
        "federates_with",
    );
    let got = entries
        .delete_entry(apb::DeleteEntryRequest { id: big.clone() })
        .await
        .map(drop);
    check("DeleteEntry", got, Code::NotFound, "entry qqq");
    let create = |change: &dyn Fn(&mut apb::CreateEntryRequest)| {
        let mut req = apb::CreateEntryRequest {
            spiffe_id: "spiffe://writ.test/x".into(),
            selectors: vec!["unix:uid:1".into()],
            ..Default::default()
        };
        change(&mut req);
        req
    };
    for (field, change) in [
        (
            "selectors",
            Box::new(|r: &mut apb::CreateEntryRequest| r.selectors = vec![big.clone()])
                as Box<dyn Fn(&mut apb::CreateEntryRequest)>,
        ),
        (
            "x509_svid_ttl",
            Box::new(|r: &mut apb::CreateEntryRequest| r.x509_svid_ttl = format!("1{big}")),
        ),
        (
            "federates_with",
            Box::new(|r: &mut apb::CreateEntryRequest| r.federates_with = vec![big.clone()]),
        ),
    ] {
        let got = entries.create_entry(create(&*change)).await.map(drop);
        check(field, got, Code::InvalidArgument, field);
    }
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// A list whose order means nothing (tools, targets, trust domains, DNS
/// names) is refused with a repeated item, naming the field, and nothing is
/// stored.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_list_items_are_refused_naming_the_field() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut entries = entries_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id();
    type Spoil = fn(&mut apb::BeginTaskRequest);
    let cases: [(&str, Spoil); 3] = [
        ("intent.tools: item 2 (\"jira\") repeats item 0", |r| {
            r.intent.as_mut().unwrap().tools = vec!["jira".into(), "git".into(), "jira".into()]
        }),
        ("intent.targets: item 1 (\"db\") repeats item 0", |r| {
            r.intent.as_mut().unwrap().targets = vec!["db".into(), "db".into()]
        }),
        (
            "federates_with: item 1 (\"other.example\") repeats item 0",
            |r| r.federates_with = vec!["other.example".into(), "other.example".into()],
        ),
    ];
    for (message, spoil) in cases {
        let mut req = begin_pid("t-rep", pid);
        spoil(&mut req);
        let err = tasks.begin_task(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{message}: {err:?}");
        assert_eq!(err.message(), message);
    }
    let err = tasks
        .get_task(apb::GetTaskRequest {
            task_id: "t-rep".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    type SpoilEntry = fn(&mut apb::CreateEntryRequest);
    let cases: [(&str, SpoilEntry); 3] = [
        ("selectors: item 2 (\"unix:uid:1\") repeats item 0", |r| {
            r.selectors = vec![
                "unix:uid:1".into(),
                "unix:gid:1".into(),
                "unix:uid:1".into(),
            ]
        }),
        // DNS names compare without regard to case.
        ("dns_names: item 1 (\"A.example\") repeats item 0", |r| {
            r.dns_names = vec!["a.example".into(), "A.example".into()]
        }),
        (
            "federates_with: item 1 (\"other.example\") repeats item 0",
            |r| r.federates_with = vec!["other.example".into(), "other.example".into()],
        ),
    ];
    for (message, spoil) in cases {
        let mut req = apb::CreateEntryRequest {
            spiffe_id: "spiffe://writ.test/repeats".into(),
            selectors: vec!["unix:uid:1".into()],
            ..Default::default()
        };
        spoil(&mut req);
        let err = entries.create_entry(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{message}: {err:?}");
        assert!(
            err.message().ends_with(message),
            "{message}: {}",
            err.message()
        );
    }
    let listed = entries
        .list_entries(apb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .entries
            .iter()
            .all(|e| e.spiffe_id != "spiffe://writ.test/repeats"),
        "{listed:?}"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// Intent text and end reasons reach operators' terminals, audit records,
/// JWT claims and policies: a control character in them is refused, the
/// field named, and no task begins.
#[tokio::test(flavor = "multi_thread")]
async fn control_characters_in_intents_and_end_reasons_are_refused() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id();
    type Spoil = fn(&mut apb::Intent);
    let cases: [(&str, Spoil); 5] = [
        ("intent.purpose", |i| {
            i.purpose = "line1\nTask:       FAKE\x1b[31m".into()
        }),
        ("intent.tools", |i| i.tools.push("t\x07bell".into())),
        ("intent.targets", |i| i.targets.push("a\0b".into())),
        ("intent.data_class", |i| {
            i.data_class = "\x1b]0;title\x07".into()
        }),
        ("intent.attributes", |i| {
            i.attributes.insert("k\x1b[2J".into(), "v".into());
        }),
    ];
    for (field, spoil) in cases {
        let mut req = begin_pid("t-ctl", pid);
        spoil(req.intent.as_mut().unwrap());
        let err = tasks.begin_task(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field) && err.message().contains("control character"),
            "{field}: {}",
            err.message()
        );
    }
    let err = tasks
        .get_task(apb::GetTaskRequest {
            task_id: "t-ctl".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    tasks.begin_task(begin_pid("t-ok", pid)).await.unwrap();
    let err = tasks
        .end_task(apb::EndTaskRequest {
            task_id: "t-ok".into(),
            reason: "bye\x1b[1mX\n\r".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("reason"), "{}", err.message());
    assert!(get_task(&mut tasks, "t-ok").await.completed_at == 0);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// Nor does an entry take an identity below an active task's: relying
/// parties that trust what lies below `/task/T` as part of T would accept
/// an entry's long-lived identity that T's end does not revoke. Below is by
/// whole path segments: a sibling whose name merely starts the same is
/// fine.
#[tokio::test(flavor = "multi_thread")]
async fn an_entry_never_takes_an_identity_below_an_active_tasks() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    tasks
        .begin_task(begin_pid("t1", sleeper.id()))
        .await
        .unwrap();
    let task_id = format!("{ORCH_ID}/task/t1");
    let admin = admin_socket(&writ);
    let create = |spiffe_id: &str| {
        common::writ_cli(
            &[
                "entry",
                "create",
                "--admin-socket",
                admin.to_str().unwrap(),
                "--spiffe-id",
                spiffe_id,
                "--selector",
                "unix:uid:65534",
            ],
            None,
        )
    };
    let below = format!("{task_id}/task/x");
    let (ok, out, err) = create(&below);
    assert!(
        !ok && err.contains("AlreadyExists")
            && err.contains(&format!(
                "{below} lies below {task_id}, the identity of active task t1"
            )),
        "{out}{err}"
    );
    let (ok, out, err) = create(&format!("{task_id}0"));
    assert!(ok, "a sibling, not below: {out}{err}");
    // A config entry below it, added and reloaded, is refused the same way.
    let original = std::fs::read_to_string(&writ.config_path).unwrap();
    std::fs::write(
        &writ.config_path,
        format!(
            "{original}\n[[entry]]\nspiffe_id = \"{task_id}/deeper\"\nselectors = [\"unix:uid:65533\"]\n"
        ),
    )
    .unwrap();
    let reload = || common::writ_cli(&["reload", "--admin-socket", admin.to_str().unwrap()], None);
    let (ok, out, err) = reload();
    assert!(
        !ok && err.contains("lies below") && err.contains("the identity of active task t1"),
        "{out}{err}"
    );
    // Once the task has ended, both are fine.
    tasks.end_task(end_req("t1")).await.unwrap();
    let (ok, out, err) = reload();
    assert!(ok, "{out}{err}");
    let (ok, out, err) = create(&below);
    assert!(ok, "{out}{err}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
