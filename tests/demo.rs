//! The README's demo, end to end: runs `agent_runtime --demo` (the example)
//! against the writ binary under test and checks what it reports — every
//! task got its own identity, was served by the tool server, and was refused
//! for revocation after EndTask — and that it left nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;

const WRIT: &str = env!("CARGO_BIN_EXE_writ");

#[test]
fn the_demo_gives_each_task_an_identity_and_revokes_it() {
    let agent_runtime = build_examples();
    let out = Command::new(&agent_runtime)
        .arg("--demo")
        .env("WRIT_BIN", WRIT)
        // Without $CARGO the demo uses the binaries as built, not rebuilding.
        .env_remove("CARGO")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    let rows = summary_rows(&stdout);
    let jobs: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(jobs, ["triage", "digest", "escalate"], "{stdout}");
    let mut task_ids: Vec<&str> = rows.iter().map(|r| r[1]).collect();
    for row in &rows {
        let [job, task_id, spiffe_id, with_task_svid, after_end_task] = row[..] else {
            unreachable!()
        };
        assert_eq!(
            spiffe_id,
            format!("spiffe://writ.test/agent-runtime/task/{task_id}"),
            "the child's default SVID is its task identity"
        );
        assert_eq!(with_task_svid, "served", "{stdout}");
        assert_eq!(after_end_task, "refused", "{stdout}");
        // The tool server logged the call, and refused the old certificate
        // because it was revoked, not for some other reason.
        assert!(
            stdout.contains(&format!("tool_server | {spiffe_id} called")),
            "{stdout}"
        );
        assert!(
            stdout.lines().any(|l| l.contains("tool_server |")
                && l.contains("refused a peer certificate")
                && l.ends_with(&format!("peer={spiffe_id} error=CertRevoked"))),
            "no revocation refusal for {spiffe_id}:\n{stdout}"
        );
        // A connection opened while the task ran, its request sent after
        // EndTask: the tool server checks the certificate again, and the
        // refusal is for revocation.
        assert!(
            stdout.contains(&format!(
                "[{job}] request after EndTask on a connection opened during the task: refused: ERR refused"
            )),
            "{stdout}"
        );
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("tool_server | {spiffe_id} called"))
                    && l.contains("ERR refused: the certificate is no longer valid")
                    && l.contains("Revoked")),
            "no refusal on the held connection for {spiffe_id}:\n{stdout}"
        );
    }
    task_ids.sort();
    task_ids.dedup();
    assert_eq!(task_ids.len(), 3, "task ids must differ: {stdout}");
    assert!(stdout.contains("\n3/3 tasks passed"), "{stdout}");
    // The child was told why, by the TLS alert: not a bare handshake failure.
    assert_eq!(
        stdout
            .matches("after EndTask: refused: the tool server sent TLS alert CertificateRevoked")
            .count(),
        3,
        "{stdout}"
    );

    let binding = stdout
        .lines()
        .find(|l| l.starts_with("binding tasks by "))
        .expect("the demo says how it binds tasks");
    if let Some(slice) = binding.strip_prefix("binding tasks by cgroup, one per task under ") {
        let mount = writ_attestors::find_cgroup2_mount().unwrap().unwrap();
        assert!(
            stdout.contains(&format!("bound to cgroup {slice}/job-1")),
            "{stdout}"
        );
        assert!(
            !mount.join(slice.trim_start_matches('/')).exists(),
            "cgroup {slice} left behind"
        );
    } else {
        assert!(binding.starts_with("binding tasks by PID: "), "{binding}");
        assert!(stdout.contains("bound to pid "), "{stdout}");
        assert!(
            !can_make_cgroups(),
            "cgroups are available here but the demo bound by PID: {binding}"
        );
    }

    let state_dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("demo state in "))
        .expect("the demo names its state directory");
    assert!(!Path::new(state_dir).exists(), "{state_dir} left behind");
    let survivors = processes_mentioning(state_dir);
    assert!(
        survivors.is_empty(),
        "demo processes left running: {survivors:?}"
    );
}

/// The summary table's rows, split into their five columns.
fn summary_rows(stdout: &str) -> Vec<Vec<&str>> {
    let mut lines = stdout
        .lines()
        .skip_while(|l| !l.starts_with("job "))
        .skip(1);
    let rows: Vec<Vec<&str>> = lines
        .by_ref()
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    for row in &rows {
        assert_eq!(row.len(), 5, "summary row {row:?} in:\n{stdout}");
    }
    rows
}

/// `cargo test` builds the examples, but `cargo test --test demo` does not:
/// build them (a no-op when fresh) into the profile the writ under test is in.
fn build_examples() -> PathBuf {
    let profile_dir = Path::new(WRIT).parent().unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev",
        other => other,
    };
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .args(["build", "--profile", profile])
        .args(["--example", "agent_runtime", "--example", "tool_server"])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(profile_dir.parent().unwrap());
    // Our own CARGO_PKG_*/CARGO_MANIFEST_*/OUT_DIR would look like changed
    // inputs to build scripts that watch them, and rebuild the world.
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                key.as_str(),
                "OUT_DIR" | "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            build.env_remove(key);
        }
    }
    assert!(build.status().unwrap().success(), "building the examples");
    profile_dir.join("examples/agent_runtime")
}

/// Whether this process could bind tasks by cgroup: root, with a writable
/// cgroup v2 hierarchy.
fn can_make_cgroups() -> bool {
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    let Ok(Some(mount)) = writ_attestors::find_cgroup2_mount() else {
        return false;
    };
    let probe = mount.join(format!("writ-demo-probe-{}", std::process::id()));
    let made = std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    made
}

/// Processes whose command line or environment mention `needle`: the
/// demo's writ (its config path) and everything given its socket.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let Ok(bytes) = std::fs::read(entry.path().join(file)) else {
                continue;
            };
            if String::from_utf8_lossy(&bytes).contains(needle) {
                found.push(format!("pid {name}"));
                break;
            }
        }
    }
    found
}
