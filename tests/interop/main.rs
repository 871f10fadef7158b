//! Interop with the wider SPIFFE ecosystem, tested against the real things:
//! SPIRE's `spire-agent api fetch`, go-spiffe (our small client program) and
//! py-spiffe, each talking to a real `writ` over its Workload API socket.

#[path = "../common/mod.rs"]
mod common;
mod peers;
mod spire_federation;

use std::process::Command;
use std::time::Duration;

use common::Writ;

const ID: &str = "spiffe://writ.test/interop/workload";

fn writ_with(extra: &str) -> Writ {
    let uid = nix::unistd::geteuid().as_raw();
    Writ::start(&format!(
        "[[entry]]\nspiffe_id = \"{ID}\"\nselectors = [\"unix:uid:{uid}\"]\n{extra}\n"
    ))
}

/// Runs a peer with a deadline; returns (success, stdout, stderr).
fn run_peer(cmd: &mut Command, deadline: Duration) -> (bool, String, String) {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting interop peer");
    let started = std::time::Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("peer output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn spire_agent_api_fetch_x509_reads_writs_socket() {
    let Some(spire) = peers::spire() else { return };
    let writ = writ_with("");
    let out_dir = writ.dir.path().join("spire-out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let (ok, stdout, stderr) = run_peer(
        Command::new(&spire.agent)
            .args(["api", "fetch", "x509", "-socketPath"])
            .arg(&writ.socket)
            .arg("-write")
            .arg(&out_dir),
        Duration::from_secs(60),
    );
    assert!(ok, "spire-agent api fetch x509 failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("SPIFFE ID:\t\t{ID}")) || stdout.contains(ID),
        "{stdout}"
    );
    // It wrote what it received: the SVID, its key and the bundle.
    for f in ["svid.0.pem", "svid.0.key", "bundle.0.pem"] {
        assert!(out_dir.join(f).exists(), "spire-agent did not write {f}");
    }
}

#[test]
fn spire_agent_api_fetch_jwt_reads_writs_socket() {
    let Some(spire) = peers::spire() else { return };
    let writ = writ_with("");
    let (ok, stdout, stderr) = run_peer(
        Command::new(&spire.agent)
            .args(["api", "fetch", "jwt", "-audience", "interop", "-socketPath"])
            .arg(&writ.socket),
        Duration::from_secs(60),
    );
    assert!(ok, "spire-agent api fetch jwt failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(ID), "{stdout}");
    assert!(stdout.contains("token("), "no token printed: {stdout}");
}

#[test]
fn go_spiffe_x509_source_follows_rotation_and_accepts_every_svid() {
    let Some(client) = peers::go_client() else {
        return;
    };
    // Short SVIDs so rotation happens within the test; long enough that a
    // loaded machine still delivers each replacement (at half-life) before
    // the SVID it replaces expires.
    let writ = writ_with("x509_svid_ttl = \"4s\"");
    let (ok, stdout, stderr) = run_peer(
        Command::new(client).args([
            "-mode",
            "x509",
            "-rotations",
            "2",
            "-timeout",
            "40s",
            "-socket",
            &writ.endpoint(),
        ]),
        Duration::from_secs(60),
    );
    assert!(ok, "go-spiffe client failed:\n{stdout}\n{stderr}");
    let events = json_lines(&stdout);
    let svids: Vec<_> = events.iter().filter(|e| e["event"] == "svid").collect();
    assert!(
        svids.len() >= 3,
        "expected the first SVID and two rotations: {stdout}"
    );
    for s in &svids {
        assert_eq!(s["spiffe_id"], ID);
        assert_eq!(s["key_usage_digital_signature"], true);
    }
}

#[test]
fn go_spiffe_jwt_source_fetches_and_validates() {
    let Some(client) = peers::go_client() else {
        return;
    };
    let writ = writ_with("");
    let (ok, stdout, stderr) = run_peer(
        Command::new(client).args([
            "-mode",
            "jwt",
            "-audience",
            "interop",
            "-socket",
            &writ.endpoint(),
        ]),
        Duration::from_secs(60),
    );
    assert!(ok, "go-spiffe JWT client failed:\n{stdout}\n{stderr}");
    let events = json_lines(&stdout);
    assert_eq!(events[0]["spiffe_id"], ID, "{stdout}");
}

#[test]
fn py_spiffe_fetches_x509_svids_and_bundles() {
    let Some(python) = peers::python() else {
        return;
    };
    let writ = writ_with("");
    let (ok, stdout, stderr) = run_peer(
        Command::new(python)
            .arg(peers::py_client_script())
            .arg(writ.endpoint())
            .arg("x509"),
        Duration::from_secs(60),
    );
    assert!(ok, "py-spiffe failed:\n{stdout}\n{stderr}");
    let report = &json_lines(&stdout)[0];
    assert_eq!(report["spiffe_ids"][0], ID, "{stdout}");
    assert_eq!(report["context_default"], ID);
    assert!(report["bundle_authorities"].as_u64().unwrap() >= 1);
}

#[test]
fn py_spiffe_fetches_and_validates_jwt_svids() {
    let Some(python) = peers::python() else {
        return;
    };
    let writ = writ_with("");
    let (ok, stdout, stderr) = run_peer(
        Command::new(python)
            .arg(peers::py_client_script())
            .arg(writ.endpoint())
            .args(["jwt", "interop"]),
        Duration::from_secs(60),
    );
    assert!(ok, "py-spiffe JWT failed:\n{stdout}\n{stderr}");
    let report = &json_lines(&stdout)[0];
    assert_eq!(report["spiffe_id"], ID, "{stdout}");
    assert_eq!(report["validated_spiffe_id"], ID);
}
