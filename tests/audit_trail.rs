//! The audit trail as a running writ writes it: every issuance, denial and
//! task event recorded, the chain verifiable, and no SVID a client received
//! missing from it — even when writ is killed mid-stream.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{NOBODY, Writ, is_root, writ_cli};
use writ::proto::workload as pb;
use x509_parser::prelude::{FromDer, X509Certificate};

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn records(writ: &Writ) -> Vec<serde_json::Value> {
    let path = writ.dir.path().join("state/audit/audit.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn verify(writ: &Writ, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "audit",
        "verify",
        "--config",
        writ.config_path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    writ_cli(&args, None)
}

#[test]
fn issuances_denials_and_tasks_are_recorded_in_a_trail_that_verifies() {
    let mut writ = Writ::start(&format!(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/audited\"\nselectors = [\"unix:uid:{}\"]\n",
        uid()
    ));
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
    let fetched: serde_json::Value = serde_json::from_str(&out).unwrap();
    let serial = fetched[0]["serial"].as_str().unwrap().to_lowercase();
    if is_root() {
        let (ok, _, _) = writ_cli(
            &["api", "fetch", "x509", "--socket", &writ.endpoint()],
            Some(NOBODY),
        );
        assert!(!ok, "nobody has no entry");
    }
    let admin = writ.dir.path().join("run/admin.sock");
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let (ok, _, err) = writ_cli(
        &[
            "task",
            "begin",
            "--admin-socket",
            admin.to_str().unwrap(),
            "--pid",
            &child.id().to_string(),
            "--id",
            "t-audit",
            "--tool",
            "jira",
        ],
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = writ_cli(
        &[
            "task",
            "end",
            "t-audit",
            "--admin-socket",
            admin.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let _ = child.kill();
    let _ = child.wait();
    assert!(writ.stop().success());

    let all = records(&writ);
    let find = |event: &'static str| all.iter().filter(move |r| r["event"] == event);
    let issued: Vec<_> = find("x509_issued").collect();
    let mine = issued
        .iter()
        .find(|r| r["serial"].as_str() == Some(serial.as_str()))
        .unwrap_or_else(|| panic!("no record for serial {serial}: {issued:?}"));
    assert_eq!(mine["spiffe_id"], "spiffe://writ.test/audited");
    assert_eq!(mine["caller"]["uid"], uid());
    assert!(
        mine["caller"]["selectors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == &format!("unix:uid:{}", uid()))
    );
    if is_root() {
        assert!(
            find("denied").any(|r| r["caller"]["uid"] == NOBODY),
            "denial not recorded"
        );
    }
    let begun = find("task_begun").next().expect("task_begun");
    assert_eq!(begun["task"]["id"], "t-audit");
    assert_eq!(begun["task"]["tools"][0], "jira");
    let ended = find("task_ended").next().expect("task_ended");
    assert_eq!(ended["reason"], "end_task");
    // Who ended it early, and the decision that let them.
    assert_eq!(ended["caller"]["uid"], uid(), "{ended}");
    assert!(
        ended["caller"]["pid"].as_i64().is_some_and(|p| p > 0),
        "{ended}"
    );
    assert_eq!(ended["action"], "EndTask", "{ended}");
    assert_eq!(ended["decision"], "allow", "{ended}");
    assert!(
        ended["policies"].as_array().is_some_and(|p| !p.is_empty()),
        "the allowing policies are named: {ended}"
    );
    // Hash chain intact, closed with a signed checkpoint.
    let (ok, out, err) = verify(&writ, &[]);
    assert!(ok, "{out}{err}");

    // Change one byte of the issuance record: verification names it.
    let path = writ.dir.path().join("state/audit/audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().position(|l| l.contains(&serial)).unwrap() + 1;
    std::fs::write(&path, text.replacen("audited", "audites", 1)).unwrap();
    let (ok, out, err) = verify(&writ, &[]);
    assert!(!ok);
    assert!(
        format!("{out}{err}").contains(&format!("audit.jsonl:{line}")),
        "{out}{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_every_svid_a_client_received_has_its_record() {
    // Ten identities rotating every second: constant issuance.
    let mut body = String::new();
    for i in 0..10 {
        body.push_str(&format!(
            "[[entry]]\nspiffe_id = \"spiffe://writ.test/busy/{i}\"\nselectors = [\"unix:uid:{}\"]\nx509_svid_ttl = \"1s\"\n\n",
            uid()
        ));
    }
    let mut writ = Writ::start(&body);
    let channel = writ::cli::client::connect(&writ.socket).await.unwrap();
    let mut client = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut request = tonic::Request::new(pb::X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(request).await.unwrap().into_inner();
    let mut received = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(Some(message))) = tokio::time::timeout_at(deadline, stream.message()).await {
        for svid in &message.svids {
            let (_, cert) = X509Certificate::from_der(&svid.x509_svid).unwrap();
            received.insert(hex::encode(cert.raw_serial()));
        }
    }
    writ.kill9();
    assert!(
        received.len() > 20,
        "expected many issuances, got {}",
        received.len()
    );

    // The trail verifies up to its last complete record (it has no closing
    // checkpoint: the run was killed), and holds every serial we received.
    let (ok, out, err) = verify(&writ, &["--allow-open"]);
    assert!(ok, "{out}{err}");
    let recorded: std::collections::BTreeSet<String> = records(&writ)
        .iter()
        .filter(|r| r["event"] == "x509_issued")
        .filter_map(|r| r["serial"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<_> = received.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "SVIDs received without an audit record: {missing:?}"
    );
    // Strict verification names the missing close; a restart records the
    // unclean end and the trail continues.
    let (ok, _, _) = verify(&writ, &[]);
    assert!(!ok, "a killed run must not verify as cleanly closed");
    writ.spawn();
    assert!(writ.stop().success());
    let (ok, out, err) = verify(&writ, &[]);
    assert!(ok, "{out}{err}");
}

/// The certificates (DER) in a PEM text.
fn pem_certs(text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(text)
        .unwrap()
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect()
}

/// (expired roots, held roots) of the CA state, DER.
fn ca_roots(writ: &Writ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let text = std::fs::read_to_string(writ.dir.path().join("state/ca/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let certs = |member: &str| -> Vec<Vec<u8>> {
        state[member]
            .as_array()
            .map(|list| {
                list.iter()
                    .flat_map(|a| pem_certs(a["certificate"].as_str().unwrap()))
                    .collect()
            })
            .unwrap_or_default()
    };
    (certs("expired_x509_authorities"), certs("x509_authorities"))
}

fn write_pem(path: &std::path::Path, certs: &[Vec<u8>]) {
    let text: String = certs
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
        .collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn checkpoints_by_expired_roots_verify_from_the_state_dir_and_those_roots_are_not_served() {
    // Roots live four seconds, so several expire within the test; every
    // record is followed by a checkpoint, so each root signs some.
    let mut writ = Writ::start(&format!(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/rooted\"\nselectors = [\"unix:uid:{}\"]\n\n[tasks]\nx509_svid_ttl = \"1s\"\n\n[ca]\nca_ttl = \"4s\"\nx509_svid_ttl = \"1s\"\njwt_svid_ttl = \"1s\"\n\n[audit]\ncheckpoint_every = 1\n",
        uid()
    ));
    common::wait_for(Duration::from_secs(60), "two roots to expire", || {
        (ca_roots(&writ).0.len() >= 2).then_some(())
    });
    assert!(writ.stop().success());
    let (expired, held) = ca_roots(&writ);
    assert!(!held.is_empty());
    assert!(expired.iter().all(|r| !held.contains(r)));
    // The first checkpoint is signed by the first root, which has expired.
    let checkpoint_certs: Vec<Vec<u8>> = records(&writ)
        .iter()
        .filter(|r| r["event"] == "checkpoint")
        .map(|r| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(r["checkpoint"]["certificate"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    assert!(
        expired.contains(&checkpoint_certs[0]),
        "the first checkpoint's root has expired"
    );

    // The state directory alone verifies the whole trail.
    let (ok, out, err) = verify(&writ, &[]);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("OK: "), "{out}");
    // The served roots alone do not: the first checkpoint is named.
    let held_pem = writ.dir.path().join("held.pem");
    write_pem(&held_pem, &held);
    let (ok, out, err) = verify(&writ, &["--bundle", held_pem.to_str().unwrap()]);
    assert!(!ok, "{out}");
    let first_checkpoint = records(&writ)
        .iter()
        .find(|r| r["event"] == "checkpoint")
        .map(|r| r["seq"].as_u64().unwrap())
        .unwrap();
    assert!(
        err.contains(&format!(
            "(seq {first_checkpoint}): the checkpoint's signer is not trusted"
        )),
        "{err}"
    );

    // A restarted writ serves none of the expired roots (they never come
    // back), and its trail still verifies from the state directory.
    writ.spawn();
    let out_dir = writ.dir.path().join("fetched");
    let (ok, _, err) = writ_cli(
        &[
            "api",
            "fetch",
            "x509",
            "--socket",
            &writ.endpoint(),
            "--write",
            out_dir.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let served = pem_certs(&std::fs::read_to_string(out_dir.join("bundle.0.pem")).unwrap());
    assert!(!served.is_empty());
    assert!(
        served.iter().all(|root| !expired.contains(root)),
        "an expired root is served"
    );
    assert!(writ.stop().success());
    let (ok, out, err) = verify(&writ, &[]);
    assert!(ok, "{out}{err}");
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::Builder::new()
            .prefix("writ-small-disk-")
            .tempdir()
            .unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs failed");
        SmallDisk { dir }
    }

    /// Fills the disk; returns the filler to delete to free it again.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let filler = self.dir.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let small = [0x5au8; 512];
        while file.write_all(&small).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// On a full disk, fetches new JWT-SVIDs (each an audit record) until the
/// trail's room ahead is used up and one is refused for want of it.
fn use_up_the_trails_room(writ: &Writ) {
    let refused = (0..200).any(|n| {
        let audience = format!("audience-{n}");
        let (ok, _, err) = writ_cli(
            &[
                "api",
                "fetch",
                "jwt",
                "--audience",
                &audience,
                "--socket",
                &writ.endpoint(),
            ],
            None,
        );
        !ok && err.contains("audit")
    });
    assert!(refused, "the trail never filled");
}

/// A writ whose audit trail (`audit.jsonl` on a 2 MiB tmpfs, 4 KiB
/// preallocated) can be filled, with one entry for the caller's uid.
fn writ_with_its_trail_on_a_small_disk() -> (SmallDisk, std::path::PathBuf, Writ) {
    let disk = SmallDisk::mount("2m");
    let trail = disk.dir.path().join("audit.jsonl");
    let writ = Writ::start(&format!(
        "[audit]\npath = \"{}\"\npreallocate_bytes = 4096\n\n[[entry]]\nspiffe_id = \"spiffe://writ.test/audited\"\nselectors = [\"unix:uid:{}\"]\n",
        trail.display(),
        uid()
    ));
    (disk, trail, writ)
}

/// A task's completion is durable in the store before its records are
/// written, so it stands even when the trail refuses them (a full disk).
/// Those records used to be lost for good; now they are kept and written,
/// marked `recorded_late`, once the trail takes them again.
#[test]
fn records_the_trail_refused_are_written_once_it_has_room_again() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to mount a small disk for the trail");
        return;
    }
    let (disk, trail, writ) = writ_with_its_trail_on_a_small_disk();
    let admin = writ.dir.path().join("run/admin.sock");
    let admin = admin.to_str().unwrap();
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let (ok, _, err) = writ_cli(
        &[
            "task",
            "begin",
            "--pid",
            &sleeper.id().to_string(),
            "--id",
            "late",
            "--admin-socket",
            admin,
        ],
        None,
    );
    assert!(ok, "{err}");

    // A full disk, and the trail's room ahead used up by issuances until
    // one is refused.
    let filler = disk.fill();
    use_up_the_trails_room(&writ);

    let (ok, _, err) = writ_cli(&["task", "end", "late", "--admin-socket", admin], None);
    assert!(ok, "the completion stands: {err}");
    let ended = |records: &[serde_json::Value]| {
        records
            .iter()
            .find(|r| r["event"] == "task_ended" && r["task"]["id"] == "late")
            .cloned()
    };
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&trail)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    assert!(ended(&read()).is_none(), "the full trail took the record");

    std::fs::remove_file(filler).unwrap();
    let record = common::wait_for(
        Duration::from_secs(15),
        "the late record",
        || ended(&read()),
    );
    assert_eq!(record["detail"]["recorded_late"], true, "{record}");
    assert!(record["detail"]["refused_at"].is_i64(), "{record}");
    let revoked = read()
        .into_iter()
        .any(|r| r["event"] == "revoked" && r["detail"]["task_id"] == "late");
    assert!(revoked, "the revocation's record is written too");
    let (ok, out, err) = verify(&writ, &[]);
    assert!(ok, "{out}{err}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    drop(writ);
}

/// Deleting the whole trail leaves a mark: writ knows from its store that it
/// ran before, so the new trail's first record says earlier records are
/// missing, writ warns, and verify reports it. A crash (no close
/// checkpoint) is warned of at start too.
#[test]
fn a_trail_removed_between_runs_or_left_open_is_reported_at_start_and_by_verify() {
    let mut writ = Writ::start("");
    let started = |writ: &Writ| -> Vec<String> {
        records(writ)
            .iter()
            .filter(|r| r["event"] == "audit_started")
            .map(|r| r["detail"]["previous_end"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(started(&writ), ["none"], "a first run's trail is new");

    writ.stop();
    std::fs::remove_dir_all(writ.dir.path().join("state/audit")).unwrap();
    writ.spawn();
    assert_eq!(started(&writ), ["missing"]);
    assert!(
        writ.log()
            .contains("writ has run with this data directory before, but there is no audit trail"),
        "{}",
        writ.log()
    );
    writ.stop();
    let (ok, out, err) = verify(&writ, &[]);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("warning: the record at seq 0 says writ had run with its data directory before but found no audit trail"),
        "{err}"
    );

    // Killed: no close checkpoint, which the next start warns of.
    writ.spawn();
    writ.kill9();
    writ.spawn();
    assert_eq!(started(&writ), ["missing", "clean", "unclean"]);
    assert!(
        writ.log()
            .contains("the audit trail did not end with a close checkpoint"),
        "{}",
        writ.log()
    );
}

/// A trail loosened by hand to be world-readable gets a warning at start
/// (it names every task's intent); one a group may read does not.
#[test]
fn a_trail_others_can_read_is_warned_of_at_start() {
    use std::os::unix::fs::PermissionsExt;
    const WARNING: &str = "the audit trail is readable or writable by others";
    let mut writ = Writ::start("");
    let trail = writ.dir.path().join("state/audit/audit.jsonl");
    assert_eq!(
        std::fs::metadata(&trail).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!writ.log().contains(WARNING), "{}", writ.log());
    writ.stop();
    std::fs::set_permissions(&trail, std::fs::Permissions::from_mode(0o640)).unwrap();
    writ.spawn();
    assert!(!writ.log().contains(WARNING), "{}", writ.log());
    writ.stop();
    std::fs::set_permissions(&trail, std::fs::Permissions::from_mode(0o644)).unwrap();
    writ.spawn();
    let log = writ.log();
    let line = log.lines().find(|l| l.contains(WARNING));
    assert!(
        line.is_some_and(|l| l.contains("0644") && l.contains("audit.jsonl")),
        "{log}"
    );
}

/// A stop while the trail still refuses records (a full disk) says at
/// ERROR how many it leaves out, and of which kinds, instead of dropping
/// them without a word.
#[test]
fn a_stop_counts_the_records_the_full_trail_still_refuses() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to mount a small disk for the trail");
        return;
    }
    let (disk, _, mut writ) = writ_with_its_trail_on_a_small_disk();
    let admin = writ.dir.path().join("run/admin.sock");
    let admin = admin.to_str().unwrap().to_owned();
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let (ok, _, err) = writ_cli(
        &[
            "task",
            "begin",
            "--pid",
            &sleeper.id().to_string(),
            "--id",
            "unrecorded",
            "--admin-socket",
            &admin,
        ],
        None,
    );
    assert!(ok, "{err}");
    let _filler = disk.fill();
    use_up_the_trails_room(&writ);
    let (ok, _, err) = writ_cli(
        &["task", "end", "unrecorded", "--admin-socket", &admin],
        None,
    );
    assert!(ok, "the completion stands: {err}");

    let status = writ.stop();
    assert!(status.success(), "{status:?}");
    let log = writ.log();
    let line = log
        .lines()
        .find(|l| l.contains("they are not in the trail"))
        .unwrap_or_else(|| panic!("no count of the records left out:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("revoked=1") && line.contains("task_ended=1"),
        "{line}"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// `[audit] path` naming a file that is not a trail: validate refuses writ's
/// own files, and a start refuses any other file that holds no record, and
/// changes nothing in it (it used to move the whole file aside as a "torn
/// tail" and write records over it).
#[test]
fn an_audit_path_on_a_file_that_is_no_trail_is_refused_and_left_alone() {
    let mut writ = Writ::start("");
    writ.stop();
    let base = std::fs::read_to_string(&writ.config_path).unwrap();
    let store = writ.dir.path().join("state/writ.db");
    let config = writ.dir.path().join("audit-elsewhere.toml");
    let with_audit_path = |path: &std::path::Path| {
        std::fs::write(
            &config,
            format!("{base}\n[audit]\npath = \"{}\"\n", path.display()),
        )
        .unwrap();
    };

    with_audit_path(&store);
    let (ok, out, err) = writ_cli(&["validate", "--config", config.to_str().unwrap()], None);
    assert!(!ok, "validate accepted the store as the trail: {out}");
    assert!(
        err.contains(&format!(
            "audit.path \"{}\" is writ's store",
            store.display()
        )),
        "{err}"
    );

    let notes = writ.dir.path().join("notes.txt");
    let content = "some notes\nthat are not an audit trail\n";
    std::fs::write(&notes, content).unwrap();
    with_audit_path(&notes);
    let (code, output) = common::run_expecting_failure(&config);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(&notes.display().to_string())
            && output.contains("does not look like a writ audit trail"),
        "{output}"
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), content);
    let side_files: Vec<_> = std::fs::read_dir(writ.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // The trail's lock is taken before the file is read.
        .filter(|name| name.starts_with("notes.txt.") && name != "notes.txt.lock")
        .collect();
    assert!(side_files.is_empty(), "{side_files:?}");
}

/// A whole last line changed while writ was stopped cannot be a write cut
/// short: the next start moves it aside as modified (not torn), logs an
/// error, and verify keeps failing on that start's record afterwards.
#[test]
fn a_modified_last_record_is_set_aside_as_modified_and_verify_keeps_failing() {
    let mut writ = Writ::start("");
    writ.stop();
    let trail = writ.dir.path().join("state/audit/audit.jsonl");
    let text = std::fs::read_to_string(&trail).unwrap();
    let last_start = text[..text.len() - 1].rfind('\n').map_or(0, |i| i + 1);
    let (kept, last) = text.split_at(last_start);
    let changed = last.replace("\"kind\":\"close\"", "\"kind\":\"periodic\"");
    assert_ne!(changed, last);
    std::fs::write(&trail, format!("{kept}{changed}")).unwrap();
    let (ok, _, err) = verify(&writ, &[]);
    assert!(!ok && err.contains("the record was modified"), "{err}");

    writ.spawn();
    writ.stop();
    let log = writ.log();
    assert!(
        log.contains("ERROR") && log.contains("were modified after writ wrote them"),
        "{log}"
    );
    assert!(!log.contains("incomplete record"), "{log}");
    let started = records(&writ)
        .into_iter()
        .rev()
        .find(|r| r["event"] == "audit_started")
        .unwrap();
    let moved_to = started["detail"]["modified_tail_moved_to"]
        .as_str()
        .unwrap_or_else(|| panic!("{started}"))
        .to_owned();
    assert!(
        started["detail"].get("torn_tail_moved_to").is_none(),
        "{started}"
    );
    assert!(moved_to.contains("audit.jsonl.modified-"), "{moved_to}");
    assert_eq!(std::fs::read_to_string(&moved_to).unwrap(), changed);

    let (ok, out, err) = verify(&writ, &[]);
    assert!(!ok, "verify passed a trail whose end was modified: {out}");
    assert!(
        err.contains(&format!("(seq {})", started["seq"]))
            && err.contains("modified")
            && err.contains(&moved_to),
        "{err}"
    );
}

/// A tmpfs mounted over a directory, unmounted (lazily, so a writ still
/// running cannot keep it) when dropped.
struct MountedOver(std::path::PathBuf);

impl Drop for MountedOver {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn free_bytes(dir: &std::path::Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(dir).unwrap();
    stat.blocks_available() as u64 * stat.fragment_size() as u64
}

/// On a nearly full disk the store's write-ahead log pre-size and the
/// trail's zeroed space are best effort: both fail, leave no partial zeros
/// behind, and writ still starts and records what it must, with the few
/// hundred KiB free that its records need.
#[test]
fn a_nearly_full_state_disk_starts_without_the_preallocations() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to mount a small disk for the state directory");
        return;
    }
    let mut writ = Writ::start("");
    writ.stop();
    let state = writ.dir.path().join("state");
    let saved = writ.dir.path().join("state-saved");
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let status = Command::new("cp")
            .arg("-a")
            .arg(from.join("."))
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    };
    std::fs::create_dir(&saved).unwrap();
    copy(&state, &saved);
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs failed");
    let _mounted = MountedOver(state.clone());
    copy(&saved, &state);
    // A clean stop leaves no write-ahead log: the next start pre-sizes anew.
    let wal_len = std::fs::metadata(state.join("writ.db-wal")).map_or(0, |m| m.len());
    assert_eq!(wal_len, 0);

    // Less room than the log's 4.5 MiB and the trail's 1 MiB of zeros.
    let leave = 320 * 1024;
    let filler = state.join("filler");
    let status = Command::new("fallocate")
        .args(["-l", &(free_bytes(&state) - leave).to_string()])
        .arg(&filler)
        .status()
        .unwrap();
    assert!(status.success());
    let free_before = free_bytes(&state);
    assert!(free_before <= leave + 4096, "{free_before}");

    writ.spawn();
    let log = writ.log();
    assert!(
        log.contains("could not give the store's write-ahead log its room in advance"),
        "{log}"
    );
    assert!(
        log.contains("could not add zeroed space to the audit trail"),
        "{log}"
    );
    // Neither left the zeros it managed to write before the disk filled.
    let wal = std::fs::metadata(state.join("writ.db-wal")).map_or(0, |m| m.len());
    assert!(wal < 256 * 1024, "the log kept {wal} bytes of pre-size");
    assert!(
        free_bytes(&state) > free_before / 2,
        "{} of {free_before} bytes left",
        free_bytes(&state)
    );
    let started = records(&writ)
        .into_iter()
        .rev()
        .find(|r| r["event"] == "audit_started")
        .unwrap();
    assert_eq!(started["detail"]["previous_end"], "clean", "{started}");
    writ.stop();
    let (ok, out, err) = verify(&writ, &[]);
    assert!(ok, "{out}{err}");
}

/// A caller refused over and over (here: no entry matches it, and its
/// JWT-SVIDs do not validate) cannot fill the trail's disk: past a burst
/// its refusals are counted in `refusals_suppressed` records, and every
/// refusal is in the trail either as its own record or in a count. A
/// refusal record keeps only an excerpt of a caller-chosen audience.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_refusals_is_counted_rather_than_written_one_by_one() {
    use writ::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let writ = Writ::start(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/someone-else\"\nselectors = [\"unix:uid:4242424\"]\n",
    );
    let mut client =
        SpiffeWorkloadApiClient::new(writ::cli::client::connect(&writ.socket).await.unwrap());
    fn with_header<T>(message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        r
    }
    const DENIED: usize = 300;
    const INVALID: usize = 50;
    // Within the burst: written one by one.
    let long_audience = "a".repeat(100_000);
    for _ in 0..INVALID {
        let err = client
            .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
                audience: long_audience.clone(),
                svid: "x.y.z".into(),
            }))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    for _ in 0..DENIED {
        let err = client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    }
    let mine = |r: &serde_json::Value| r["caller"]["uid"] == uid();
    // Counts are written about once a second.
    let records = common::wait_for(Duration::from_secs(10), "the suppressed counts", || {
        let records = records(&writ);
        let counted: u64 = records
            .iter()
            .filter(|r| r["event"] == "refusals_suppressed" && mine(r))
            .map(|r| r["detail"]["count"].as_u64().unwrap())
            .sum();
        let written = records
            .iter()
            .filter(|r| {
                (r["event"] == "denied" || r["event"] == "jwt_validation_failed") && mine(r)
            })
            .count();
        (written as u64 + counted == (DENIED + INVALID) as u64).then_some(records)
    });
    let written_one_by_one = records
        .iter()
        .filter(|r| (r["event"] == "denied" || r["event"] == "jwt_validation_failed") && mine(r))
        .count();
    assert!(
        written_one_by_one < DENIED,
        "{written_one_by_one} refusal records for {DENIED} + {INVALID} refusals"
    );
    let suppressed: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "refusals_suppressed")
        .collect();
    assert!(
        suppressed
            .iter()
            .all(|r| r["detail"]["by_event"].as_object().is_some_and(|by| {
                by.values().map(|n| n.as_u64().unwrap()).sum::<u64>()
                    == r["detail"]["count"].as_u64().unwrap()
            })),
        "{suppressed:?}"
    );
    let rejected: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "jwt_validation_failed")
        .collect();
    assert_eq!(rejected.len(), INVALID);
    for record in rejected {
        let audience = record["detail"]["audience"].as_str().unwrap();
        assert!(
            audience.len() < 1_000 && audience.ends_with("(100000 bytes)"),
            "{audience}"
        );
    }
    let (ok, out, err) = verify(&writ, &[]);
    assert!(ok, "{out}{err}");
}

/// A caller the admin API turns away (not authorized at all, or authorized
/// but not an operator) is on the audit trail, within its uid's budget of
/// refusal records like every refusal.
#[test]
fn admin_api_refusals_are_recorded() {
    let me = uid();
    for (config, args, wanted) in [
        (
            "[admin_api]\nauthorized = [[\"unix:uid:4242424\"]]\n".to_owned(),
            vec!["task", "list"],
            "is not authorized for the admin API",
        ),
        (
            format!(
                "[admin_api]\nauthorized = [[\"unix:uid:{me}\"]]\noperators = [[\"unix:uid:4242424\"]]\n"
            ),
            vec!["entry", "delete", "e-none"],
            "may not delete entries",
        ),
    ] {
        let writ = Writ::start(&config);
        let admin = writ.dir.path().join("run/admin.sock");
        let mut full = args.clone();
        full.extend(["--admin-socket", admin.to_str().unwrap()]);
        let (ok, _, err) = writ_cli(&full, None);
        assert!(!ok && err.contains("PermissionDenied"), "{err}");
        let refusal = common::wait_for(Duration::from_secs(10), "the refusal record", || {
            records(&writ).into_iter().find(|r| {
                r["event"] == "denied"
                    && r["action"] == "AdminAPI"
                    && r["caller"]["uid"] == me
                    && r["reason"].as_str().is_some_and(|m| m.contains(wanted))
            })
        });
        assert!(
            refusal["caller"]["selectors"]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
            "{refusal}"
        );
    }
}
