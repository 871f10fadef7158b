//! Cedar policies enforced by a running writ: BeginTask and issuance are
//! decided by policy, denials name the deciding policies and are audited,
//! and a reload with a broken policy file leaves the running policies on.
//! Sub-tasks are judged inside every ancestor; rotations ask policy again;
//! allowed decisions record their policies and any that failed; a stream
//! losing an identity to policy leaves one denial; reloads that change
//! what policy means say so.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Writ, writ_cli};
use tonic::Code;
use writ::proto::admin as apb;
use writ::proto::workload as wpb;
use writ::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

const ORCH: &str = "spiffe://writ.test/orchestrator";

const BASE: &str = r#"
@id("entry-svids")
permit (principal, action == Writ::Action::"IssueX509SVID", resource)
when { !(resource has task) };

@id("task-svids")
permit (principal, action == Writ::Action::"IssueX509SVID", resource)
when { resource has task };

@id("no-forbidden-identity")
forbid (principal, action == Writ::Action::"IssueX509SVID", resource)
when { resource.spiffe_id == "spiffe://writ.test/forbidden" };

@id("orchestrator-begin")
permit (
  principal == Writ::Workload::"spiffe://writ.test/orchestrator",
  action == Writ::Action::"BeginTask",
  resource
)
when {
  ["search", "jira"].containsAll(resource.tools) &&
  ["public", "internal"].contains(resource.data_class) &&
  resource.ttl_seconds <= 900
};

@id("no-prod-db")
forbid (principal, action == Writ::Action::"BeginTask", resource)
when { resource.targets.contains("prod-db") };

@id("end-any")
permit (principal, action == Writ::Action::"EndTask", resource);
"#;

fn begin(id: &str, pid: u32, tools: &[&str], targets: &[&str], ttl: &str) -> apb::BeginTaskRequest {
    apb::BeginTaskRequest {
        task_id: id.into(),
        binding: Some(apb::Binding {
            target: Some(apb::binding::Target::Pid(pid as i32)),
        }),
        intent: Some(apb::Intent {
            purpose: "triage".into(),
            tools: tools.iter().map(|s| s.to_string()).collect(),
            targets: targets.iter().map(|s| s.to_string()).collect(),
            data_class: "internal".into(),
            attributes: Default::default(),
        }),
        ttl: ttl.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_decide_tasks_and_issuance_and_survive_a_bad_reload() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("agents.cedar");
    std::fs::write(&policy, BASE).unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    let writ = Writ::start(&format!(
        r#"
[policy]
files = ["{policy}"]

[[entry]]
spiffe_id = "{ORCH}"
selectors = ["unix:uid:{uid}"]

[[entry]]
spiffe_id = "spiffe://writ.test/forbidden"
selectors = ["unix:uid:{uid}"]
"#,
        policy = policy.display()
    ));
    let admin = writ.dir.path().join("run/admin.sock");
    let channel = writ::cli::client::connect(&admin).await.unwrap();
    let mut tasks = apb::tasks_client::TasksClient::new(channel);
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = child.id();

    // Allowed: the orchestrator, jira, internal data, 10 minutes.
    tasks
        .begin_task(begin("ok", pid, &["jira"], &["tickets"], "10m"))
        .await
        .unwrap();
    // Denied: a tool nobody permits, a TTL too long, a forbidden target.
    for (id, tools, targets, ttl, why) in [
        (
            "shell",
            vec!["shell"],
            vec!["tickets"],
            "10m",
            "no policy permits this",
        ),
        (
            "long",
            vec!["jira"],
            vec!["tickets"],
            "20m",
            "no policy permits this",
        ),
        (
            "prod",
            vec!["jira"],
            vec!["prod-db"],
            "10m",
            "denied by policy: no-prod-db",
        ),
    ] {
        let err = tasks
            .begin_task(begin(id, pid, &tools, &targets, ttl))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{id}: {err:?}");
        assert!(err.message().contains(why), "{id}: {}", err.message());
    }

    // Issuance: the forbidden identity is withheld, the others are served.
    let (ok, out, err) = writ_cli(
        &[
            "api",
            "fetch",
            "x509",
            "--socket",
            &writ.endpoint(),
            "--output",
            "json",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(!out.contains("spiffe://writ.test/forbidden"), "{out}");
    assert!(out.contains(ORCH), "{out}");

    // A broken policy file is refused on reload; the old policies stay.
    std::fs::write(
        &policy,
        "permit (principal, action, resource) when { nonsense",
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(writ.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    // Each line of the error is a log line of its own, so the one naming
    // the file and line may come a moment after the first.
    common::wait_for(
        Duration::from_secs(10),
        "a refused reload naming agents.cedar and the line",
        || {
            writ.log()
                .lines()
                .any(|l| {
                    l.contains("keeping the running policies") && l.contains("agents.cedar:1:")
                })
                .then_some(())
        },
    );
    let err = tasks
        .begin_task(begin("prod2", pid, &["jira"], &["prod-db"], "10m"))
        .await
        .unwrap_err();
    assert!(err.message().contains("no-prod-db"), "{}", err.message());

    // A good file takes effect: now the shell tool is allowed too.
    std::fs::write(
        &policy,
        BASE.replace(
            r#"["search", "jira"].containsAll"#,
            r#"["search", "jira", "shell"].containsAll"#,
        ),
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(writ.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    common::wait_for(Duration::from_secs(10), "policy reload", || {
        let mut t = tasks.clone();
        let r = futures::executor::block_on(t.begin_task(begin(
            "shell2",
            pid,
            &["shell"],
            &["tickets"],
            "10m",
        )));
        r.is_ok().then_some(())
    });

    // Every denial is in the audit trail with the deciding policy.
    let trail = std::fs::read_to_string(writ.dir.path().join("state/audit/audit.jsonl")).unwrap();
    let denials: Vec<serde_json::Value> = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "denied")
        .collect();
    assert!(
        denials
            .iter()
            .any(|d| d["action"] == "BeginTask" && d["policies"][0] == "no-prod-db"),
        "{denials:?}"
    );
    assert!(trail.contains("\"event\":\"policy_reloaded\""));
    let _ = child.kill();
    let _ = child.wait();
}

const TOOL: &str = "spiffe://writ.test/tool";

/// Starts writ with `policy` as its only policy file, the orchestrator
/// entry and a tool entry (both for this test's uid, the tool's SVIDs
/// living `tool_ttl`), and `extra` config.
fn start_with_policy(
    policy: &str,
    tool_ttl: &str,
    extra: &str,
) -> (Writ, std::path::PathBuf, tempfile::TempDir) {
    let uid = nix::unistd::geteuid().as_raw();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.cedar");
    std::fs::write(&path, policy).unwrap();
    let writ = Writ::start(&format!(
        r#"{extra}
[policy]
files = ["{policy}"]

[[entry]]
spiffe_id = "{ORCH}"
selectors = ["unix:uid:{uid}"]

[[entry]]
spiffe_id = "{TOOL}"
selectors = ["unix:uid:{uid}"]
x509_svid_ttl = "{tool_ttl}"
"#,
        policy = path.display()
    ));
    (writ, path, dir)
}

/// Every record of the audit trail so far.
fn audit_records(writ: &Writ) -> Vec<serde_json::Value> {
    std::fs::read_to_string(writ.dir.path().join("state/audit/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn records<'a>(
    all: &'a [serde_json::Value],
    event: &str,
    spiffe_id: &str,
) -> Vec<&'a serde_json::Value> {
    all.iter()
        .filter(|r| r["event"] == event && r["spiffe_id"] == spiffe_id)
        .collect()
}

async fn admin_tasks(writ: &Writ) -> apb::tasks_client::TasksClient<tonic::transport::Channel> {
    let admin = writ.dir.path().join("run/admin.sock");
    apb::tasks_client::TasksClient::new(writ::cli::client::connect(&admin).await.unwrap())
}

/// An X.509-SVID stream opened by this test process.
async fn x509_stream(writ: &Writ) -> tonic::Streaming<wpb::X509svidResponse> {
    let channel = writ::cli::client::connect(&writ.socket).await.unwrap();
    let mut request = tonic::Request::new(wpb::X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
        .unwrap()
        .into_inner()
}

fn ids(message: &wpb::X509svidResponse) -> Vec<String> {
    message.svids.iter().map(|s| s.spiffe_id.clone()).collect()
}

/// `writ reload` through the admin socket; the reload result as JSON.
fn reload(writ: &Writ) -> serde_json::Value {
    let admin = writ.dir.path().join("run/admin.sock");
    let (ok, out, err) = writ_cli(
        &[
            "reload",
            "--admin-socket",
            admin.to_str().unwrap(),
            "--output",
            "json",
        ],
        None,
    );
    assert!(ok, "{err}\n{out}");
    serde_json::from_str(&out).unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A task's identity is judged inside every task above it: a rule freezing
/// the tree of r1 withholds the identity of r1's grandchild too (it used to
/// see only the parent, so r3 got its SVIDs). The task_begun records name
/// the policy that allowed each task.
#[tokio::test(flavor = "multi_thread")]
async fn a_grandchild_is_judged_inside_its_grandparent() {
    let (writ, _policy, _dir) = start_with_policy(
        r#"
@id("begin-any")
permit (principal, action in [Writ::Action::"BeginTask", Writ::Action::"DelegateTask"], resource);
@id("issue-any")
permit (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource);
@id("freeze-r1-tree")
forbid (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource)
when { resource has task && resource.task in Writ::Task::"r1" };
"#,
        "1h",
        "",
    );
    let mut tasks = admin_tasks(&writ).await;
    let r1_process = Command::new("sleep").arg("60").spawn().unwrap();
    let r2_process = Command::new("sleep").arg("60").spawn().unwrap();
    // r3's process waits to be bound, then fetches as a workload of r3.
    let go = writ.dir.path().join("go");
    let script = format!(
        "while [ ! -e '{go}' ]; do sleep 0.05; done; \
         '{writ}' api fetch x509 --socket '{socket}' --output json; \
         '{writ}' api fetch jwt --audience a --socket '{socket}' --output json",
        go = go.display(),
        writ = common::WRIT,
        socket = writ.endpoint(),
    );
    let r3_process = Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tasks
        .begin_task(begin("r1", r1_process.id(), &["jira"], &[], "10m"))
        .await
        .unwrap();
    let mut r2 = begin("r2", r2_process.id(), &["jira"], &[], "9m");
    r2.parent_task_id = "r1".into();
    tasks.begin_task(r2).await.unwrap();
    let mut r3 = begin("r3", r3_process.id(), &["jira"], &[], "8m");
    r3.parent_task_id = "r2".into();
    let r3_id = tasks.begin_task(r3).await.unwrap().into_inner().spiffe_id;
    assert!(r3_id.ends_with("/task/r1/task/r2/task/r3"), "{r3_id}");

    std::fs::write(&go, "").unwrap();
    let out = r3_process.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both fetches succeed, with the orchestrator's identity alone.
    assert!(stdout.contains(ORCH), "{stdout}");
    assert!(!stdout.contains("/task/r3"), "{stdout}");

    let all = audit_records(&writ);
    let denied = records(&all, "denied", &r3_id);
    assert!(
        denied
            .iter()
            .any(|d| d["action"] == "IssueX509SVID" && d["policies"][0] == "freeze-r1-tree"),
        "{denied:?}"
    );
    for id in ["r1", "r2", "r3"] {
        let begun: Vec<_> = all
            .iter()
            .filter(|r| r["event"] == "task_begun" && r["task"]["id"] == id)
            .collect();
        assert_eq!(begun.len(), 1, "{begun:?}");
        assert_eq!(begun[0]["policies"], serde_json::json!(["begin-any"]));
    }
    for mut p in [r1_process, r2_process] {
        let _ = p.kill();
        let _ = p.wait();
    }
}

/// An open stream asks policy before each rotation, not only when it
/// re-attests: a rule on `context.time` stops the next rotation (with a
/// re-attest interval of an hour, the tool identity used to rotate on).
/// Each issuance records the policy that allowed it; the loss of the
/// identity is one denial.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_asks_policy_again() {
    let cutoff = unix_now() + 12;
    let (writ, _policy, _dir) = start_with_policy(
        &format!(
            r#"
@id("issue-any")
permit (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource);
@id("tool-cutoff")
forbid (principal, action == Writ::Action::"IssueX509SVID", resource)
when {{ resource.spiffe_id == "{TOOL}" && context.time.unix >= {cutoff} }};
"#
        ),
        "4s",
        "[workload_api]\nreattest_interval = \"1h\"\n",
    );
    let mut stream = x509_stream(&writ).await;
    let first = stream.message().await.unwrap().unwrap();
    assert!(ids(&first).contains(&TOOL.to_owned()), "{:?}", ids(&first));
    assert!(
        unix_now() + 5 < cutoff,
        "writ took too long to start for this test to see a rotation before the cutoff"
    );
    // The tool rotates every 2 s; the first rotation after the cutoff
    // leaves it out.
    let without_tool = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let message = stream.message().await.unwrap().unwrap();
            if !ids(&message).contains(&TOOL.to_owned()) {
                return message;
            }
        }
    })
    .await
    .expect("the tool identity kept rotating after policy forbade it");
    assert!(unix_now() >= cutoff);
    assert_eq!(ids(&without_tool), [ORCH]);

    let all = audit_records(&writ);
    let issued = records(&all, "x509_issued", TOOL);
    assert!(
        issued.len() >= 2,
        "no rotation before the cutoff: {issued:?}"
    );
    for record in issued.iter().chain(&records(&all, "x509_issued", ORCH)) {
        assert_eq!(
            record["policies"],
            serde_json::json!(["issue-any"]),
            "{record}"
        );
    }
    let denied = records(&all, "denied", TOOL);
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["policies"], serde_json::json!(["tool-cutoff"]));
}

/// A stream whose identity a reloaded policy takes away leaves one denial
/// on the trail: when it loses the identity, not again at later updates.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_losing_an_identity_to_policy_leaves_one_denial() {
    let permit = r#"
@id("issue-any")
permit (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource);
"#;
    let (writ, policy, _dir) = start_with_policy(permit, "1h", "");
    let mut stream = x509_stream(&writ).await;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(ids(&first).len(), 2, "{:?}", ids(&first));

    std::fs::write(
        &policy,
        format!(
            r#"{permit}
@id("no-tool")
forbid (principal, action == Writ::Action::"IssueX509SVID", resource)
when {{ resource.spiffe_id == "{TOOL}" }};
"#
        ),
    )
    .unwrap();
    reload(&writ);
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no update after the reload")
        .unwrap()
        .unwrap();
    assert_eq!(ids(&next), [ORCH]);
    let denied = || {
        let all = audit_records(&writ);
        records(&all, "denied", TOOL)
            .into_iter()
            .cloned()
            .collect::<Vec<_>>()
    };
    let first_denials = denied();
    assert_eq!(first_denials.len(), 1, "{first_denials:?}");
    assert_eq!(first_denials[0]["policies"], serde_json::json!(["no-tool"]));

    // Another reload makes the stream judge the caller afresh; the tool is
    // still refused, but the stream no longer held it: no second record.
    reload(&writ);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(denied().len(), 1, "{:?}", denied());
}

/// Cedar skips a policy that fails to evaluate, so an erroring forbid lets
/// the identity through; writ keeps that, but the issuance records name the
/// failing policy and its error, and the log warns about it once (not once
/// per evaluation).
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_policy_is_on_the_record_and_warned_about_once() {
    let (writ, _policy, _dir) = start_with_policy(
        &format!(
            r#"
@id("issue-any")
permit (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource);
@id("tool-off-overflow")
forbid (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource)
when {{ resource.spiffe_id == "{TOOL}" && context.time.unix * 9223372036854775807 > 0 }};
"#
        ),
        "1h",
        "",
    );
    let fetch = |what: &[&str]| {
        let mut args = vec!["api", "fetch"];
        args.extend_from_slice(what);
        let endpoint = writ.endpoint();
        args.extend_from_slice(&["--socket", &endpoint, "--output", "json"]);
        let (ok, out, err) = writ_cli(&args, None);
        assert!(ok, "{err}");
        out
    };
    for _ in 0..2 {
        assert!(fetch(&["x509"]).contains(TOOL));
    }
    assert!(fetch(&["jwt", "--audience", "a"]).contains(TOOL));

    let all = audit_records(&writ);
    for event in ["x509_issued", "jwt_issued"] {
        let issued = records(&all, event, TOOL);
        assert_eq!(issued.len(), 1, "{event}: {issued:?}");
        assert_eq!(issued[0]["decision"], "allow");
        assert_eq!(issued[0]["policies"], serde_json::json!(["issue-any"]));
        let errors = issued[0]["detail"]["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0]
                .as_str()
                .unwrap()
                .starts_with("policy tool-off-overflow: "),
            "{errors:?}"
        );
    }
    let log = writ.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("a policy failed to evaluate"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("tool-off-overflow"), "{}", warnings[0]);
}

/// Reloads that change what policy means while succeeding say so: a policy
/// file left empty (nothing is permitted any more) and `[policy] files`
/// emptied (the built-in policy permits everything now).
#[tokio::test(flavor = "multi_thread")]
async fn reloads_that_change_what_policy_means_warn() {
    let (writ, policy, _dir) = start_with_policy(
        r#"
@id("issue-any")
permit (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource);
"#,
        "1h",
        "",
    );
    std::fs::write(&policy, "// to be written\n").unwrap();
    let result = reload(&writ);
    let notes = result["notes"].to_string();
    assert!(notes.contains("holds no policies"), "{notes}");
    assert!(notes.contains("every request is denied"), "{notes}");
    assert!(writ.log().contains("every request is denied"));

    let config = std::fs::read_to_string(&writ.config_path).unwrap();
    let files_line = format!("files = [\"{}\"]", policy.display());
    assert!(config.contains(&files_line), "{config}");
    std::fs::write(&writ.config_path, config.replace(&files_line, "files = []")).unwrap();
    let result = reload(&writ);
    assert_eq!(result["policy_source"], "built-in");
    let notes = result["notes"].to_string();
    assert!(
        notes.contains("permits every action") && notes.contains(&policy.display().to_string()),
        "{notes}"
    );
    assert!(
        writ.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("permits every action")),
        "{}",
        writ.log()
    );
    let reloaded: Vec<_> = audit_records(&writ)
        .into_iter()
        .filter(|r| r["event"] == "policy_reloaded")
        .collect();
    assert!(
        reloaded.last().is_some_and(|r| r["detail"]["warnings"]
            .to_string()
            .contains("permits every action")),
        "{reloaded:?}"
    );
}
