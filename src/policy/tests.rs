use std::collections::BTreeMap;
use std::path::PathBuf;

use time::{Date, Month, UtcOffset};

use super::*;

const RESEARCH: &str = "spiffe://example.org/orchestrator/research";

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn caller() -> Workload {
    Workload {
        spiffe_id: Some(RESEARCH.to_owned()),
        selectors: vec!["unix:uid:1000".to_owned()],
        pid: 4242,
        uid: 1000,
    }
}

fn task(id: &str) -> TaskFacts {
    TaskFacts {
        id: id.to_owned(),
        spiffe_id: format!("{RESEARCH}/task/{id}"),
        parent_id: None,
        ancestors: Vec::new(),
        depth: 1,
        purpose: "triage".to_owned(),
        tools: vec!["search".to_owned()],
        targets: vec!["jira.example.org".to_owned()],
        data_class: "internal".to_owned(),
        attributes: BTreeMap::from([("ticket".to_owned(), "OPS-1".to_owned())]),
        ttl_seconds: 600,
        orchestrator: RESEARCH.to_owned(),
    }
}

fn begin(task: TaskFacts) -> PolicyRequest {
    PolicyRequest::BeginTask {
        caller: caller(),
        task,
    }
}

fn at(year: i32, month: Month, day: u8, hour: u8, minute: u8, offset_hours: i8) -> OffsetDateTime {
    Date::from_calendar_date(year, month, day)
        .unwrap()
        .with_hms(hour, minute, 0)
        .unwrap()
        .assume_offset(UtcOffset::from_hms(offset_hours, 0, 0).unwrap())
}

fn monday_noon() -> OffsetDateTime {
    at(2026, Month::November, 23, 12, 0, 0)
}

#[test]
fn shipped_schema_loads_without_warnings() {
    let (_schema, warnings) = Schema::from_cedarschema_str(SCHEMA).unwrap();
    assert_eq!(warnings.count(), 0);
}

/// The engine skips schema checks per request for speed; this is where
/// every kind of request it builds is held to the schema instead.
#[test]
fn every_kind_of_request_conforms_to_the_schema() {
    let (schema, _) = Schema::from_cedarschema_str(SCHEMA).unwrap();
    let vocabulary = request::Vocabulary::new().unwrap();
    for request in &every_kind_of_request() {
        if let Err(e) = vocabulary.cedar_request(request, monday_noon(), Some(&schema)) {
            panic!("{} does not conform: {e}", request.action_name());
        }
    }
}

/// One request of each action, with and without the optional parts.
fn every_kind_of_request() -> Vec<PolicyRequest> {
    let mut child = task("child");
    child.parent_id = Some("t1".to_owned());
    child.depth = 2;
    let anonymous = Workload {
        spiffe_id: None,
        ..caller()
    };
    let identity = |task: Option<TaskFacts>| IdentityFacts {
        spiffe_id: format!("{RESEARCH}/task/t1"),
        task,
    };
    let mut grandchild = task("grandchild");
    grandchild.parent_id = Some("child".to_owned());
    grandchild.ancestors = vec!["child".to_owned(), "t1".to_owned()];
    grandchild.depth = 3;
    let mut child_with_ancestors = child.clone();
    child_with_ancestors.ancestors = vec!["t1".to_owned()];
    [
        PolicyRequest::DelegateTask {
            caller: caller(),
            parent: child_with_ancestors,
            task: grandchild.clone(),
        },
        PolicyRequest::IssueX509Svid {
            caller: caller(),
            identity: identity(Some(grandchild)),
        },
        begin(task("t1")),
        begin(child.clone()),
        PolicyRequest::BeginTask {
            caller: anonymous.clone(),
            task: task("t1"),
        },
        PolicyRequest::EndTask {
            caller: caller(),
            task: child.clone(),
        },
        PolicyRequest::DelegateTask {
            caller: caller(),
            parent: task("t1"),
            task: child.clone(),
        },
        PolicyRequest::IssueX509Svid {
            caller: anonymous.clone(),
            identity: identity(None),
        },
        PolicyRequest::IssueX509Svid {
            caller: caller(),
            identity: identity(Some(child)),
        },
        PolicyRequest::IssueJwtSvid {
            caller: caller(),
            identity: identity(Some(task("t1"))),
            audience: vec!["a".to_owned(), "b".to_owned()],
        },
        PolicyRequest::IssueJwtSvid {
            caller: anonymous,
            identity: identity(None),
            audience: Vec::new(),
        },
    ]
    .into()
}

/// An action every applying policy decides without conditions is decided
/// without building a Cedar request; for each kind of policy set and every
/// kind of request, the decision is the one Cedar makes.
#[test]
fn unconditional_actions_are_decided_as_cedar_decides_them() {
    let dir = tempfile::tempdir().unwrap();
    let sets: [(&str, &[&str]); 4] = [
        (
            BUILTIN_POLICY,
            &[
                "BeginTask",
                "DelegateTask",
                "EndTask",
                "IssueX509SVID",
                "IssueJWTSVID",
            ],
        ),
        (
            r#"@id("p-any") permit (principal, action, resource);
               @id("f-jwt") forbid (principal, action == Writ::Action::"IssueJWTSVID", resource);
               @id("p-jira") permit (principal, action == Writ::Action::"BeginTask", resource)
                   when { resource.tools.contains("jira") };"#,
            &["DelegateTask", "EndTask", "IssueX509SVID", "IssueJWTSVID"],
        ),
        (
            r#"@id("p-in") permit (principal,
                   action in [Writ::Action::"EndTask", Writ::Action::"IssueX509SVID"], resource);
               @id("p-is") permit (principal is Writ::Workload,
                   action == Writ::Action::"BeginTask", resource);
               @id("p-eq") permit (principal, action == Writ::Action::"DelegateTask",
                   resource == Writ::Task::"t1");"#,
            &["EndTask", "IssueX509SVID", "IssueJWTSVID"],
        ),
        (
            "// nothing yet\n",
            &[
                "BeginTask",
                "DelegateTask",
                "EndTask",
                "IssueX509SVID",
                "IssueJWTSVID",
            ],
        ),
    ];
    let mut requests = every_kind_of_request();
    let mut same = task("same");
    same.parent_id = Some("same".to_owned());
    requests.push(PolicyRequest::DelegateTask {
        caller: caller(),
        parent: task("same"),
        task: same,
    });
    for (n, (text, fast)) in sets.iter().enumerate() {
        let path = write(&dir, &format!("set{n}.cedar"), text);
        let engine = PolicyEngine::load(&[path]).unwrap();
        let mut decided: Vec<&str> = engine.inner.unconditional.keys().copied().collect();
        decided.sort();
        let mut expected = fast.to_vec();
        expected.sort();
        assert_eq!(decided, expected, "set {n}");
        for request in &requests {
            assert_eq!(
                engine.evaluate(request, monday_noon()),
                engine.evaluate_in_cedar(request, monday_noon()),
                "set {n}, {request:?}"
            );
        }
    }
}

#[test]
fn builtin_policy_loads_with_one_named_permit_per_action() {
    let engine = PolicyEngine::builtin_default();
    assert!(engine.is_builtin());
    assert_eq!(engine.source(), "built-in");
    assert!(engine.warnings().is_empty(), "{:?}", engine.warnings());
    assert_eq!(
        engine.policy_ids(),
        [
            "builtin-permit-begin-task",
            "builtin-permit-end-task",
            "builtin-permit-delegate-task",
            "builtin-permit-issue-x509-svid",
            "builtin-permit-issue-jwt-svid",
        ]
    );
}

#[test]
fn policies_without_id_annotation_are_named_by_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "two.cedar",
        "permit (principal, action == Writ::Action::\"EndTask\", resource);\n\
         @id(\"named \\\"ü\\\"\")\n\
         permit (principal, action == Writ::Action::\"BeginTask\", resource);\n\
         permit (principal, action == Writ::Action::\"BeginTask\", resource) when { resource.depth == 1 };\n",
    );
    let engine = PolicyEngine::load(std::slice::from_ref(&path)).unwrap();
    let file = path.display();
    assert_eq!(
        engine.policy_ids(),
        [
            format!("{file}:policy0"),
            "named \"ü\"".to_owned(),
            format!("{file}:policy2")
        ]
    );
    assert_eq!(engine.source(), file.to_string());
    let decision = engine.evaluate(&begin(task("t1")), monday_noon());
    assert!(decision.allowed);
    assert_eq!(
        decision.deciding_policies,
        ["named \"ü\"".to_owned(), format!("{file}:policy2")]
    );
}

#[test]
fn parse_errors_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        &dir,
        "good.cedar",
        "permit (principal, action, resource);\n",
    );
    let bad = write(
        &dir,
        "bad.cedar",
        "// first line\npermit (principal, action, resource)\n  when { resource.depth == 1 ;\n",
    );
    let err = PolicyEngine::load(&[good, bad.clone()]).unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 1, "{err}");
    assert_eq!(problems[0].file, bad);
    assert_eq!(problems[0].position, Some((3, 30)));
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3:30: unexpected token", bad.display())),
        "{err}"
    );
}

#[test]
fn every_file_is_parsed_and_all_problems_are_reported_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(&dir, "a.cedar", "permit (principal, action, resource)\n");
    let b = write(
        &dir,
        "b.cedar",
        "permit (principal, action == Writ::Action::\"BeginTask\", resource)\n  when { resource.owner == \"x\" };\n",
    );
    let err = PolicyEngine::load(&[a.clone(), b.clone()]).unwrap_err();
    let files: Vec<_> = err.problems().iter().map(|p| p.file.clone()).collect();
    assert_eq!(files, [a, b]);
}

#[test]
fn unknown_attribute_fails_validation_with_policy_id_and_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "typo.cedar",
        "@id(\"tools-typo\")\npermit (principal, action == Writ::Action::\"BeginTask\", resource)\nwhen { resource.tool.contains(\"search\") };\n",
    );
    let err = PolicyEngine::load(std::slice::from_ref(&path)).unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 1, "{err}");
    assert_eq!(problems[0].policy_id.as_deref(), Some("tools-typo"));
    assert_eq!(problems[0].position, Some((3, 8)));
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}:3:8: policy tools-typo: ", path.display())),
        "{message}"
    );
    assert!(message.contains("attribute `tool`"), "{message}");
    assert!(message.contains("Writ::Task"), "{message}");
}

#[test]
fn strict_validation_rejects_unguarded_optional_attributes_and_unknown_actions() {
    let dir = tempfile::tempdir().unwrap();
    let optional = write(
        &dir,
        "optional.cedar",
        "permit (principal, action == Writ::Action::\"IssueX509SVID\", resource)\nwhen { resource.task.depth == 1 };\n",
    );
    let err = PolicyEngine::load(&[optional]).unwrap_err();
    assert!(err.to_string().contains("task"), "{err}");

    let action = write(
        &dir,
        "action.cedar",
        "permit (principal, action == Writ::Action::\"Launch\", resource);\n",
    );
    let err = PolicyEngine::load(&[action]).unwrap_err();
    assert!(err.to_string().contains("Launch"), "{err}");
}

#[test]
fn duplicate_ids_across_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = "@id(\"same\")\npermit (principal, action, resource);\n";
    let a = write(&dir, "a.cedar", text);
    let b = write(&dir, "b.cedar", text);
    let err = PolicyEngine::load(&[a.clone(), b.clone()]).unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 1, "{err}");
    assert_eq!(problems[0].file, b);
    assert!(
        problems[0].message.contains(&a.display().to_string()),
        "{err}"
    );
}

#[test]
fn templates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "template.cedar",
        "permit (principal == ?principal, action, resource);\n",
    );
    let err = PolicyEngine::load(&[path]).unwrap_err();
    assert!(err.to_string().contains("template"), "{err}");
}

#[test]
fn no_files_and_unreadable_files_are_errors() {
    assert_eq!(PolicyEngine::load(&[]).unwrap_err(), PolicyError::NoFiles);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.cedar");
    let err = PolicyEngine::load(std::slice::from_ref(&missing)).unwrap_err();
    assert!(matches!(&err, PolicyError::Read { path, .. } if *path == missing));
    let latin1 = dir.path().join("latin1.cedar");
    std::fs::write(&latin1, b"// caf\xe9\n").unwrap();
    let err = PolicyEngine::load(&[latin1]).unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");
}

#[test]
fn an_empty_policy_set_denies_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "empty.cedar", "// nothing yet\n");
    let engine = PolicyEngine::load(&[path]).unwrap();
    let decision = engine.evaluate(&begin(task("t1")), monday_noon());
    assert!(!decision.allowed);
    assert!(decision.deciding_policies.is_empty());
    assert_eq!(decision.denial_message(), "no policy permits this");
}

#[test]
fn time_is_given_in_utc_with_weekday_and_unix_seconds() {
    let dir = tempfile::tempdir().unwrap();
    // 2026-11-22 is a Sunday; 23:30 at UTC-05:00 is 04:30 on Monday in UTC.
    let path = write(
        &dir,
        "time.cedar",
        r#"permit (principal, action == Writ::Action::"BeginTask", resource)
when {
  context.time.weekday == "Monday" && context.time.hour == 4 && context.time.minute == 30 &&
  context.time.timestamp == "2026-11-23T04:30:00Z" &&
  context.time.unix == 1795408200
};"#,
    );
    let engine = PolicyEngine::load(&[path]).unwrap();
    let local = at(2026, Month::November, 22, 23, 30, -5);
    let decision = engine.evaluate(&begin(task("t1")), local);
    assert!(decision.allowed, "{decision:?}");
    let decision = engine.evaluate(&begin(task("t1")), at(2026, Month::November, 22, 23, 30, 0));
    assert!(!decision.allowed, "{decision:?}");
}

#[test]
fn tags_selectors_and_optional_attributes_reach_policies() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "facts.cedar",
        r#"permit (principal, action == Writ::Action::"BeginTask", resource)
when {
  principal.selectors.contains("unix:uid:1000") && principal.uid == 1000 && principal.pid == 4242 &&
  principal has spiffe_id &&
  resource.hasTag("ticket") && resource.getTag("ticket") == "OPS-1" &&
  !(resource has parent_id)
};
permit (principal, action == Writ::Action::"IssueJWTSVID", resource)
when { context.audience.contains("jira") && resource has task && resource.task.tools.contains("search") };
permit (principal == Writ::Workload::"pid:77", action == Writ::Action::"EndTask", resource);
"#,
    );
    let engine = PolicyEngine::load(&[path]).unwrap();
    assert!(engine.evaluate(&begin(task("t1")), monday_noon()).allowed);
    let mut untagged = task("t1");
    untagged.attributes.clear();
    assert!(!engine.evaluate(&begin(untagged), monday_noon()).allowed);

    let jwt = |audience: &str| PolicyRequest::IssueJwtSvid {
        caller: caller(),
        identity: IdentityFacts {
            spiffe_id: task("t1").spiffe_id,
            task: Some(task("t1")),
        },
        audience: vec![audience.to_owned()],
    };
    assert!(engine.evaluate(&jwt("jira"), monday_noon()).allowed);
    assert!(!engine.evaluate(&jwt("github"), monday_noon()).allowed);

    let anonymous = Workload {
        spiffe_id: None,
        selectors: Vec::new(),
        pid: 77,
        uid: 1000,
    };
    let end = PolicyRequest::EndTask {
        caller: anonymous,
        task: task("t1"),
    };
    assert!(engine.evaluate(&end, monday_noon()).allowed);
}

#[test]
fn a_runtime_error_in_one_policy_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    // Overflow passes validation but fails at evaluation.
    let path = write(
        &dir,
        "overflow.cedar",
        r#"@id("overflows")
permit (principal, action == Writ::Action::"BeginTask", resource)
when { resource.ttl_seconds + 9223372036854775807 > 0 };
@id("plain")
permit (principal, action == Writ::Action::"EndTask", resource);
"#,
    );
    let engine = PolicyEngine::load(&[path]).unwrap();
    let decision = engine.evaluate(&begin(task("t1")), monday_noon());
    assert!(!decision.allowed);
    assert_eq!(decision.errors.len(), 1, "{decision:?}");
    assert!(decision.errors[0].contains("overflows"), "{decision:?}");
    let end = PolicyRequest::EndTask {
        caller: caller(),
        task: task("t1"),
    };
    assert!(engine.evaluate(&end, monday_noon()).allowed);
}

#[test]
fn a_request_cedar_cannot_express_is_denied_with_the_reason() {
    let engine = PolicyEngine::builtin_default();

    let mut child = task("same");
    child.parent_id = Some("same".to_owned());
    child.depth = 2;
    let delegate = PolicyRequest::DelegateTask {
        caller: caller(),
        parent: task("same"),
        task: child,
    };
    let decision = engine.evaluate(&delegate, monday_noon());
    assert!(!decision.allowed, "{decision:?}");
    assert!(decision.errors[0].contains("under itself"), "{decision:?}");
}

#[test]
fn sub_tasks_are_in_their_parent() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "tree.cedar",
        r#"permit (principal, action == Writ::Action::"DelegateTask", resource in Writ::Task::"root")
when { context.parent.tools.containsAll(resource.tools) && resource.depth == context.parent.depth + 1 };
"#,
    );
    let engine = PolicyEngine::load(&[path]).unwrap();
    let mut child = task("child");
    child.parent_id = Some("root".to_owned());
    child.depth = 2;
    let delegate = |parent: TaskFacts, task: TaskFacts| PolicyRequest::DelegateTask {
        caller: caller(),
        parent,
        task,
    };
    assert!(
        engine
            .evaluate(&delegate(task("root"), child.clone()), monday_noon())
            .allowed
    );
    let mut wider = child.clone();
    wider.tools.push("shell".to_owned());
    assert!(
        !engine
            .evaluate(&delegate(task("root"), wider), monday_noon())
            .allowed
    );
    let mut elsewhere = child;
    elsewhere.parent_id = Some("other".to_owned());
    assert!(
        !engine
            .evaluate(&delegate(task("other"), elsewhere), monday_noon())
            .allowed
    );
}

/// A task is `in` every task above it, not only its parent, for every
/// action that has a task; the chain comes from `ancestors`, which writ
/// fills in from its task tree and a `writ policy check` request gives.
#[test]
fn tasks_are_in_every_ancestor_for_every_action() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "tree.cedar",
        r#"@id("all")
permit (principal, action, resource);
@id("freeze-r1-tree")
forbid (principal, action in [Writ::Action::"IssueX509SVID", Writ::Action::"IssueJWTSVID"], resource)
when { resource has task && resource.task in Writ::Task::"r1" };
@id("no-begin-under-r1")
forbid (principal, action in [Writ::Action::"BeginTask", Writ::Action::"DelegateTask", Writ::Action::"EndTask"], resource in Writ::Task::"r1");
"#,
    );
    let engine = PolicyEngine::load(&[path]).unwrap();
    let mut r3 = task("r3");
    r3.parent_id = Some("r2".to_owned());
    r3.depth = 3;
    let issue = |task: TaskFacts| PolicyRequest::IssueX509Svid {
        caller: caller(),
        identity: IdentityFacts {
            spiffe_id: task.spiffe_id.clone(),
            task: Some(task),
        },
    };
    // Only the parent known: r3 is not seen inside r1.
    expect_allowed(&engine.evaluate(&issue(r3.clone()), monday_noon()));

    r3.ancestors = vec!["r2".to_owned(), "r1".to_owned()];
    let denied = engine.evaluate(&issue(r3.clone()), monday_noon());
    assert!(!denied.allowed, "{denied:?}");
    assert_eq!(denied.deciding_policies, ["freeze-r1-tree"]);
    let jwt = PolicyRequest::IssueJwtSvid {
        caller: caller(),
        identity: IdentityFacts {
            spiffe_id: r3.spiffe_id.clone(),
            task: Some(r3.clone()),
        },
        audience: vec!["a".to_owned()],
    };
    assert!(!engine.evaluate(&jwt, monday_noon()).allowed);
    let end = PolicyRequest::EndTask {
        caller: caller(),
        task: r3.clone(),
    };
    assert!(!engine.evaluate(&end, monday_noon()).allowed);

    // A delegation under r2: the new task is in r2 and, through r2's
    // ancestors, in r1.
    let mut r2 = task("r2");
    r2.parent_id = Some("r1".to_owned());
    r2.ancestors = vec!["r1".to_owned()];
    r2.depth = 2;
    let mut r4 = task("r4");
    r4.parent_id = Some("r2".to_owned());
    r4.depth = 3;
    let delegate = PolicyRequest::DelegateTask {
        caller: caller(),
        parent: r2,
        task: r4,
    };
    let decision = engine.evaluate(&delegate, monday_noon());
    assert_eq!(decision.deciding_policies, ["no-begin-under-r1"]);

    // Chains writ would never build are refused, not judged.
    for (ancestors, why) in [
        (vec!["r1", "r2"], "must start with its parent_id"),
        (vec!["r2", "r3"], "its own ancestor"),
    ] {
        let mut odd = r3.clone();
        odd.ancestors = ancestors.into_iter().map(str::to_owned).collect();
        let decision = engine.evaluate(&issue(odd), monday_noon());
        assert!(!decision.allowed, "{decision:?}");
        assert!(decision.errors[0].contains(why), "{decision:?}");
    }
}

#[track_caller]
fn expect_allowed(decision: &Decision) {
    assert!(decision.allowed, "{decision:?}");
    assert!(decision.errors.is_empty(), "{decision:?}");
}

/// Cedar skips a policy that fails to evaluate, so an erroring forbid lets
/// the request through; the decision still names it and its error.
#[test]
fn an_erroring_forbid_is_skipped_and_named_on_an_allowed_decision() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "overflow.cedar",
        r#"@id("permit-begin")
permit (principal, action == Writ::Action::"BeginTask", resource);
@id("overflowing-forbid")
forbid (principal, action == Writ::Action::"BeginTask", resource)
when { resource.ttl_seconds * 9223372036854775807 > 0 };
"#,
    );
    let engine = PolicyEngine::load(&[path]).unwrap();
    let decision = engine.evaluate(&begin(task("t1")), monday_noon());
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(decision.deciding_policies, ["permit-begin"]);
    assert_eq!(decision.failed_policies, ["overflowing-forbid"]);
    assert_eq!(decision.errors.len(), 1, "{decision:?}");
    assert!(
        decision.errors[0].starts_with("policy overflowing-forbid: ")
            && decision.errors[0].contains("overflow"),
        "{decision:?}"
    );
}

#[test]
fn failure_warnings_come_once_per_policy_per_interval_with_the_count_between() {
    let warnings = FailureWarnings::new(Duration::from_secs(60));
    let failing = |ids: &[&str]| Decision {
        allowed: true,
        deciding_policies: vec!["p".to_owned()],
        errors: ids.iter().map(|id| format!("policy {id}: boom")).collect(),
        failed_policies: ids.iter().map(|id| (*id).to_owned()).collect(),
    };
    let start = Instant::now();
    let first = failing(&["a", "b"]);
    let due = warnings.due(&first, start);
    assert_eq!(
        due,
        [
            FailureWarning {
                policy: "a",
                error: "policy a: boom",
                unlogged: 0
            },
            FailureWarning {
                policy: "b",
                error: "policy b: boom",
                unlogged: 0
            },
        ]
    );
    let again = failing(&["a"]);
    for s in 1..=3 {
        assert!(
            warnings
                .due(&again, start + Duration::from_secs(s))
                .is_empty()
        );
    }
    let later = warnings.due(&again, start + Duration::from_secs(61));
    assert_eq!(later.len(), 1);
    assert_eq!((later[0].policy, later[0].unlogged), ("a", 3));
    // A reload forgets them: a policy still failing is warned about at once.
    warnings.clear();
    assert_eq!(
        warnings.due(&again, start + Duration::from_secs(62)).len(),
        1
    );
}

#[test]
fn files_with_no_policy_and_an_empty_set_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(&dir, "empty.cedar", "// nothing here yet\n");
    let engine = PolicyEngine::load(std::slice::from_ref(&empty)).unwrap();
    assert_eq!(
        engine.warnings(),
        [
            format!("{}: holds no policies", empty.display()),
            format!(
                "no policies loaded from {}: every request is denied",
                empty.display()
            ),
        ]
    );
    // Beside a file with policies, only the empty file is named.
    let some = write(
        &dir,
        "some.cedar",
        "permit (principal, action == Writ::Action::\"EndTask\", resource);\n",
    );
    let engine = PolicyEngine::load(&[some, empty.clone()]).unwrap();
    assert_eq!(
        engine.warnings(),
        [format!("{}: holds no policies", empty.display())]
    );
    assert!(PolicyEngine::builtin_default().warnings().is_empty());
}

#[test]
fn denial_message_names_forbids_or_says_nothing_permits() {
    let denied = Decision {
        allowed: false,
        deciding_policies: vec!["a".into(), "b".into()],
        errors: Vec::new(),
        failed_policies: Vec::new(),
    };
    assert_eq!(denied.denial_message(), "denied by policy: a, b");
    let nothing = Decision {
        allowed: false,
        deciding_policies: Vec::new(),
        errors: Vec::new(),
        failed_policies: Vec::new(),
    };
    assert_eq!(nothing.denial_message(), "no policy permits this");
}

#[test]
fn requests_round_trip_through_json_and_reject_unknown_fields() {
    let request = PolicyRequest::IssueJwtSvid {
        caller: caller(),
        identity: IdentityFacts {
            spiffe_id: "spiffe://example.org/x".to_owned(),
            task: Some(task("t1")),
        },
        audience: vec!["a".to_owned()],
    };
    let json = serde_json::to_value(&request).unwrap();
    assert_eq!(json["action"], "IssueJWTSVID");
    assert_eq!(
        serde_json::from_value::<PolicyRequest>(json).unwrap(),
        request
    );

    let typo = serde_json::json!({
        "action": "BeginTask",
        "caller": {"pid": 1, "uid": 0},
        "task": {"id": "t", "spiffe_id": "spiffe://x/t", "data_class": "public",
                 "ttl_seconds": 60, "orchestrator": "pid:1", "tols": ["search"]}
    });
    let err = serde_json::from_value::<PolicyRequest>(typo).unwrap_err();
    assert!(err.to_string().contains("tols"), "{err}");

    let minimal = serde_json::json!({
        "action": "EndTask",
        "caller": {"pid": 1, "uid": 0},
        "task": {"id": "t", "spiffe_id": "spiffe://x/t", "data_class": "public",
                 "ttl_seconds": 60, "orchestrator": "pid:1"}
    });
    let PolicyRequest::EndTask { caller, task } = serde_json::from_value(minimal).unwrap() else {
        panic!("wrong variant");
    };
    assert_eq!(caller.entity_id(), "pid:1");
    assert_eq!(task.depth, 1);
    assert!(task.tools.is_empty() && task.attributes.is_empty());
}

#[test]
fn line_and_column_count_characters() {
    let text = "ab\nçd\n";
    assert_eq!(line_and_column(text, 0), (1, 1));
    assert_eq!(line_and_column(text, 3), (2, 1));
    // 'ç' is two bytes; the offset after it is column 2.
    assert_eq!(line_and_column(text, 5), (2, 2));
    assert_eq!(line_and_column(text, 4), (2, 1));
    assert_eq!(line_and_column(text, 999), (3, 1));
}
