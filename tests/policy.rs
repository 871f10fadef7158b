//! Cedar policy end to end: the shipped example policies decide a matrix of
//! real requests, bad files are reported precisely, and `writ policy check`
//! behaves as documented (output and exit codes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use time::{Date, Month, OffsetDateTime};
use writ::policy::{
    Decision, IdentityFacts, PolicyEngine, PolicyError, PolicyRequest, TaskFacts, Workload,
};

const RESEARCH: &str = "spiffe://example.org/orchestrator/research";
const BUILD: &str = "spiffe://example.org/orchestrator/build";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn example_files() -> Vec<PathBuf> {
    [
        "baseline.cedar",
        "research-orchestrator.cedar",
        "delegation-scope.cedar",
        "prod-db-working-hours.cedar",
    ]
    .iter()
    .map(|name| repo_path(&format!("policy/examples/{name}")))
    .collect()
}

fn examples() -> PolicyEngine {
    PolicyEngine::load(&example_files()).unwrap()
}

fn utc(year: i32, month: Month, day: u8, hour: u8, minute: u8) -> OffsetDateTime {
    Date::from_calendar_date(year, month, day)
        .unwrap()
        .with_hms(hour, minute, 0)
        .unwrap()
        .assume_utc()
}

/// 2026-11-23 is a Monday.
fn monday(hour: u8, minute: u8) -> OffsetDateTime {
    utc(2026, Month::November, 23, hour, minute)
}

fn sunday_morning() -> OffsetDateTime {
    utc(2026, Month::November, 22, 10, 0)
}

fn workload(spiffe_id: Option<&str>) -> Workload {
    Workload {
        spiffe_id: spiffe_id.map(str::to_owned),
        selectors: vec!["unix:uid:1000".to_owned()],
        pid: 4242,
        uid: 1000,
    }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| s.to_string()).collect()
}

fn task(orchestrator: &str, id: &str) -> TaskFacts {
    TaskFacts {
        id: id.to_owned(),
        spiffe_id: format!("{orchestrator}/task/{id}"),
        parent_id: None,
        ancestors: Vec::new(),
        depth: 1,
        purpose: "summarise incidents".to_owned(),
        tools: strings(&["search", "jira"]),
        targets: strings(&["jira.example.org"]),
        data_class: "internal".to_owned(),
        attributes: BTreeMap::new(),
        ttl_seconds: 15 * 60,
        orchestrator: orchestrator.to_owned(),
    }
}

fn sub_task(parent: &TaskFacts, caller: &str, id: &str) -> TaskFacts {
    TaskFacts {
        id: id.to_owned(),
        spiffe_id: format!("{}/task/{id}", parent.spiffe_id),
        parent_id: Some(parent.id.clone()),
        ancestors: Vec::new(),
        depth: parent.depth + 1,
        orchestrator: caller.to_owned(),
        ..parent.clone()
    }
}

fn begin(caller: Option<&str>, task: TaskFacts) -> PolicyRequest {
    PolicyRequest::BeginTask {
        caller: workload(caller),
        task,
    }
}

fn delegate(caller: &str, parent: TaskFacts, task: TaskFacts) -> PolicyRequest {
    PolicyRequest::DelegateTask {
        caller: workload(Some(caller)),
        parent,
        task,
    }
}

fn issue_x509(identity: &str, task: Option<TaskFacts>) -> PolicyRequest {
    PolicyRequest::IssueX509Svid {
        caller: workload(None),
        identity: IdentityFacts {
            spiffe_id: identity.to_owned(),
            task,
        },
    }
}

/// Asserts the outcome and exactly which policies decided it.
#[track_caller]
fn expect(decision: &Decision, allowed: bool, deciding: &[&str]) {
    assert_eq!(decision.allowed, allowed, "{decision:?}");
    assert_eq!(decision.deciding_policies, deciding, "{decision:?}");
    assert!(decision.errors.is_empty(), "{decision:?}");
}

#[test]
fn research_orchestrator_begins_only_tasks_inside_its_grant() {
    let engine = examples();
    let now = monday(10, 0);
    let research_task = |change: &dyn Fn(&mut TaskFacts)| {
        let mut t = task(RESEARCH, "t1");
        change(&mut t);
        begin(Some(RESEARCH), t)
    };
    let granted = ["research-begin-task"];

    // Inside the grant, including its edges.
    expect(
        &engine.evaluate(&research_task(&|_| {}), now),
        true,
        &granted,
    );
    for tools in [&["search"][..], &["jira"], &[]] {
        let d = engine.evaluate(&research_task(&|t| t.tools = strings(tools)), now);
        expect(&d, true, &granted);
    }
    let d = engine.evaluate(&research_task(&|t| t.data_class = "public".into()), now);
    expect(&d, true, &granted);
    let d = engine.evaluate(&research_task(&|t| t.ttl_seconds = 1), now);
    expect(&d, true, &granted);

    // Tool not allowed.
    for tools in [&["search", "shell"][..], &["github"]] {
        let d = engine.evaluate(&research_task(&|t| t.tools = strings(tools)), now);
        expect(&d, false, &[]);
        assert_eq!(d.denial_message(), "no policy permits this");
    }
    // Data class too high.
    for class in ["confidential", "secret", "Internal", ""] {
        let d = engine.evaluate(&research_task(&|t| t.data_class = class.into()), now);
        expect(&d, false, &[]);
    }
    // TTL too long.
    let d = engine.evaluate(&research_task(&|t| t.ttl_seconds = 15 * 60 + 1), now);
    expect(&d, false, &[]);
    let d = engine.evaluate(&research_task(&|t| t.ttl_seconds = u64::MAX), now);
    expect(&d, false, &[]);
}

#[test]
fn the_grant_belongs_to_the_research_orchestrator_alone() {
    let engine = examples();
    let now = monday(10, 0);
    let d = engine.evaluate(&begin(Some(BUILD), task(BUILD, "t1")), now);
    expect(&d, false, &[]);
    let d = engine.evaluate(&begin(None, task("pid:4242", "t1")), now);
    expect(&d, false, &[]);
    // A look-alike ID is a different principal.
    let look_alike = format!("{RESEARCH}/x");
    let d = engine.evaluate(&begin(Some(&look_alike), task(&look_alike, "t1")), now);
    expect(&d, false, &[]);
}

#[test]
fn research_tasks_may_not_delegate_even_within_scope() {
    let engine = examples();
    let now = monday(10, 0);
    let parent = task(RESEARCH, "t1");
    let mut narrower = sub_task(&parent, RESEARCH, "t1-a");
    narrower.tools = strings(&["search"]);

    // By the orchestrator itself...
    let d = engine.evaluate(&delegate(RESEARCH, parent.clone(), narrower.clone()), now);
    expect(&d, false, &["research-no-delegation"]);
    assert_eq!(
        d.denial_message(),
        "denied by policy: research-no-delegation"
    );

    // ...and by a process working on one of its tasks.
    let worker = parent.spiffe_id.clone();
    let mut narrower = sub_task(&parent, &worker, "t1-b");
    narrower.tools = strings(&["search"]);
    let d = engine.evaluate(&delegate(&worker, parent, narrower), now);
    expect(&d, false, &["research-no-delegation"]);
}

#[test]
fn other_sub_tasks_may_narrow_but_not_widen_their_parent() {
    let engine = examples();
    let now = monday(10, 0);
    let parent = task(BUILD, "b1");
    let child = |change: &dyn Fn(&mut TaskFacts)| {
        let mut t = sub_task(&parent, BUILD, "b1-a");
        change(&mut t);
        delegate(BUILD, parent.clone(), t)
    };
    let scoped = ["delegate-within-parent-scope"];

    expect(&engine.evaluate(&child(&|_| {}), now), true, &scoped);
    let d = engine.evaluate(&child(&|t| t.tools = strings(&["jira"])), now);
    expect(&d, true, &scoped);
    let d = engine.evaluate(&child(&|t| t.data_class = "public".into()), now);
    expect(&d, true, &scoped);

    // Widening in any dimension.
    let d = engine.evaluate(&child(&|t| t.tools.push("shell".into())), now);
    expect(&d, false, &[]);
    let d = engine.evaluate(&child(&|t| t.targets.push("github.com".into())), now);
    expect(&d, false, &[]);
    let d = engine.evaluate(&child(&|t| t.data_class = "secret".into()), now);
    expect(&d, false, &[]);
    let d = engine.evaluate(&child(&|t| t.ttl_seconds = parent.ttl_seconds + 1), now);
    expect(&d, false, &[]);
}

#[test]
fn prod_db_is_forbidden_outside_working_hours_whatever_else_permits() {
    let engine = examples();
    let mut prod = task(RESEARCH, "m1");
    prod.targets = strings(&["prod-db"]);
    let request = begin(Some(RESEARCH), prod.clone());

    for now in [monday(9, 0), monday(12, 30), monday(16, 59)] {
        expect(
            &engine.evaluate(&request, now),
            true,
            &["research-begin-task"],
        );
    }
    let outside = [
        monday(8, 59),
        monday(17, 0),
        monday(23, 0),
        sunday_morning(),
        utc(2026, Month::November, 28, 12, 0), // Saturday
    ];
    for now in outside {
        let d = engine.evaluate(&request, now);
        expect(&d, false, &["prod-db-working-hours"]);
        assert_eq!(
            d.denial_message(),
            "denied by policy: prod-db-working-hours"
        );
    }

    // Other targets are unaffected at the same hour.
    let d = engine.evaluate(
        &begin(Some(RESEARCH), task(RESEARCH, "t2")),
        sunday_morning(),
    );
    expect(&d, true, &["research-begin-task"]);

    // A running prod-db task gets no fresh identity after hours either.
    let identity = issue_x509(&prod.spiffe_id, Some(prod.clone()));
    expect(
        &engine.evaluate(&identity, monday(16, 0)),
        true,
        &["baseline-task-identities"],
    );
    expect(
        &engine.evaluate(&identity, monday(17, 5)),
        false,
        &["prod-db-working-hours-identity"],
    );

    // A request that is both unpermitted and forbidden names the forbid.
    let mut wide = prod;
    wide.tools = strings(&["shell"]);
    let d = engine.evaluate(&begin(Some(RESEARCH), wide), sunday_morning());
    expect(&d, false, &["prod-db-working-hours"]);
}

#[test]
fn identities_entry_and_task_and_ending_tasks() {
    let engine = examples();
    let now = sunday_morning();
    let d = engine.evaluate(&issue_x509("spiffe://example.org/user/alice", None), now);
    expect(&d, true, &["baseline-entry-identities"]);

    let t = task(RESEARCH, "t1");
    let jwt = PolicyRequest::IssueJwtSvid {
        caller: workload(None),
        identity: IdentityFacts {
            spiffe_id: t.spiffe_id.clone(),
            task: Some(t.clone()),
        },
        audience: strings(&["jira"]),
    };
    expect(
        &engine.evaluate(&jwt, now),
        true,
        &["baseline-task-identities"],
    );
    // A task identity is only the task's own SPIFFE ID.
    let d = engine.evaluate(
        &issue_x509("spiffe://example.org/admin", Some(t.clone())),
        now,
    );
    expect(&d, false, &[]);

    let end = |caller: Option<&str>| PolicyRequest::EndTask {
        caller: workload(caller),
        task: t.clone(),
    };
    expect(
        &engine.evaluate(&end(Some(RESEARCH)), now),
        true,
        &["baseline-end-own-tasks"],
    );
    expect(&engine.evaluate(&end(Some(BUILD)), now), false, &[]);
    expect(&engine.evaluate(&end(None), now), false, &[]);
}

#[test]
fn builtin_default_permits_every_action() {
    let engine = PolicyEngine::builtin_default();
    let now = sunday_morning();
    let mut anything = task("pid:1", "t1");
    anything.tools = strings(&["shell"]);
    anything.targets = strings(&["prod-db"]);
    anything.data_class = "secret".into();
    anything.ttl_seconds = u64::MAX;
    let cases = [
        (begin(None, anything.clone()), "builtin-permit-begin-task"),
        (
            PolicyRequest::EndTask {
                caller: workload(None),
                task: anything.clone(),
            },
            "builtin-permit-end-task",
        ),
        (
            delegate(
                RESEARCH,
                anything.clone(),
                sub_task(&anything, RESEARCH, "t2"),
            ),
            "builtin-permit-delegate-task",
        ),
        (
            issue_x509("spiffe://writ.test/user/me", None),
            "builtin-permit-issue-x509-svid",
        ),
        (
            PolicyRequest::IssueJwtSvid {
                caller: workload(Some(RESEARCH)),
                identity: IdentityFacts {
                    spiffe_id: anything.spiffe_id.clone(),
                    task: Some(anything.clone()),
                },
                audience: Vec::new(),
            },
            "builtin-permit-issue-jwt-svid",
        ),
    ];
    for (request, policy) in cases {
        expect(&engine.evaluate(&request, now), true, &[policy]);
    }
}

#[test]
fn invalid_policy_files_are_reported_with_place_and_leave_nothing_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.cedar");
    std::fs::write(
        &broken,
        "@id(\"ok\")\npermit (principal, action, resource);\n\nforbid (principal, action resource);\n",
    )
    .unwrap();
    let mut files = example_files();
    files.push(broken.clone());
    let err = PolicyEngine::load(&files).unwrap_err();
    let PolicyError::Invalid(problems) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(problems.len(), 1, "{err}");
    assert_eq!(problems[0].file, broken);
    assert_eq!(problems[0].position, Some((4, 27)), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("{}:4:27: ", broken.display())),
        "{err}"
    );

    let unknown = dir.path().join("unknown.cedar");
    std::fs::write(
        &unknown,
        "@id(\"by-owner\")\npermit (principal, action == Writ::Action::\"BeginTask\", resource)\n  when { resource.owner == \"alice\" };\n",
    )
    .unwrap();
    let err = PolicyEngine::load(std::slice::from_ref(&unknown)).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}:3:10: policy by-owner: ", unknown.display())),
        "{message}"
    );
    assert!(
        message.contains("attribute `owner` on entity type `Writ::Task` not found"),
        "{message}"
    );
}

// ---- writ policy check ----

fn writ_policy_check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_writ"))
        .args(["policy", "check"])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn example_policy_args() -> Vec<String> {
    example_files()
        .iter()
        .flat_map(|f| ["--policy".to_owned(), f.display().to_string()])
        .collect()
}

fn check_example(request: &str, extra: &[&str]) -> Output {
    let request = repo_path(&format!("policy/examples/{request}"));
    let mut args = vec!["--request".to_owned(), request.display().to_string()];
    args.extend(example_policy_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    writ_policy_check(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn cli_allows_with_exit_zero_and_names_the_permit() {
    let out = check_example("begin-task.json", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("ALLOW\n"), "{text}");
    assert!(text.contains("action:   BeginTask"), "{text}");
    assert!(text.contains("time:     2026-11-23T10:00:00Z"), "{text}");
    assert!(text.contains("deciding: research-begin-task"), "{text}");
    assert!(text.contains("errors:   none"), "{text}");
}

#[test]
fn cli_denies_with_exit_one_and_names_the_forbid() {
    let out = check_example("delegate-task.json", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("DENY\n"));
    assert!(stdout(&out).contains("deciding: research-no-delegation"));

    let out = check_example("issue-prod-db-sunday.json", &["--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["decision"], "DENY");
    assert_eq!(json["action"], "IssueX509SVID");
    assert_eq!(
        json["deciding_policies"],
        serde_json::json!(["prod-db-working-hours-identity"])
    );
    assert_eq!(
        json["message"],
        "denied by policy: prod-db-working-hours-identity"
    );
}

#[test]
fn cli_uses_the_builtin_policy_by_default_and_reads_stdin() {
    use std::io::Write;
    use std::process::Stdio;

    let request = std::fs::read(repo_path("policy/examples/delegate-task.json")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_writ"))
        .args(["policy", "check", "--request", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&request).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("deciding: builtin-permit-delegate-task"),
        "{text}"
    );
    assert!(text.contains("policies: built-in"), "{text}");
}

#[test]
fn cli_reports_no_permit_when_nothing_matches() {
    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("shell.json");
    let mut value: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo_path("policy/examples/begin-task.json")).unwrap(),
    )
    .unwrap();
    value["task"]["tools"] = serde_json::json!(["search", "shell"]);
    std::fs::write(&request, value.to_string()).unwrap();
    let mut args = vec!["--request".to_owned(), request.display().to_string()];
    args.extend(example_policy_args());
    let out = writ_policy_check(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deciding: none (no policy permits this)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn cli_bad_input_exits_two_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let good_request = repo_path("policy/examples/begin-task.json");

    // A request with a misspelt field.
    let typo = dir.path().join("typo.json");
    std::fs::write(
        &typo,
        r#"{"action": "BeginTask", "caller": {"pid": 1, "uid": 0},
            "task": {"id": "t", "spiffe_id": "spiffe://x/t", "data_class": "public",
                     "ttl_seconds": 60, "orchestrator": "pid:1", "tols": ["search"]}}"#,
    )
    .unwrap();
    let out = writ_policy_check(&["--request", typo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("typo.json: invalid request"), "{err}");
    assert!(err.contains("tols"), "{err}");
    assert!(stdout(&out).is_empty());

    // An unknown action, a missing file, a bad time.
    let unknown = dir.path().join("unknown.json");
    std::fs::write(&unknown, r#"{"action": "Launch"}"#).unwrap();
    let out = writ_policy_check(&["--request", unknown.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Launch"), "{}", stderr(&out));

    let missing = dir.path().join("missing.json");
    let out = writ_policy_check(&["--request", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));

    // A policy file that does not validate.
    let policy = dir.path().join("bad.cedar");
    std::fs::write(
        &policy,
        "permit (principal, action == Writ::Action::\"BeginTask\", resource)\nwhen { resource.tool == \"x\" };\n",
    )
    .unwrap();
    let out = writ_policy_check(&[
        "--request",
        good_request.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}:2:8: policy {}:policy0: ",
            policy.display(),
            policy.display()
        )),
        "{err}"
    );
    assert!(err.contains("do not load"), "{err}");
}

/// `writ policy check` judges a grandchild inside its grandparent when the
/// request lists the task's ancestors, as a running writ does from its task
/// tree; with only `parent_id`, only the parent is known.
#[test]
fn cli_sees_a_task_inside_every_ancestor_it_lists() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("tree.cedar");
    std::fs::write(
        &policy,
        r#"@id("all")
permit (principal, action, resource);
@id("freeze-r1-tree")
forbid (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource)
when { resource has task && resource.task in Writ::Task::"r1" };
"#,
    )
    .unwrap();
    let request = |ancestors: &str| {
        let path = dir.path().join("r3.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"action":"IssueX509SVID","caller":{{"pid":1,"uid":0}},
"identity":{{"spiffe_id":"spiffe://example.org/o/task/r1/task/r2/task/r3",
"task":{{"id":"r3","parent_id":"r2",{ancestors}"depth":3,
"spiffe_id":"spiffe://example.org/o/task/r1/task/r2/task/r3",
"data_class":"internal","ttl_seconds":60,"orchestrator":"spiffe://example.org/o"}}}}}}"#
            ),
        )
        .unwrap();
        writ_policy_check(&[
            "--request",
            path.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ])
    };
    let denied = request(r#""ancestors":["r2","r1"],"#);
    assert_eq!(denied.status.code(), Some(1), "{}", stderr(&denied));
    assert!(
        stdout(&denied).contains("deciding: freeze-r1-tree"),
        "{}",
        stdout(&denied)
    );
    let parent_only = request("");
    assert_eq!(
        parent_only.status.code(),
        Some(0),
        "{}",
        stderr(&parent_only)
    );
}
