//! Cedar policies enforced by a running writ: BeginTask and issuance are
//! decided by policy, denials name the deciding policies and are audited,
//! and a reload with a broken policy file leaves the running policies on.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Writ, writ_cli};
use tonic::Code;
use writ::proto::admin as apb;

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
