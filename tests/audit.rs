//! The audit trail end to end, on real files with real ECDSA P-256 keys:
//! rotation, checkpoints, tampering of every kind, concurrent appenders,
//! torn writes, SIGKILL mid-write, a full disk, and the `writ audit` CLI.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use writ::audit::{
    self, AuditError, AuditEvent, AuditLog, CallerFacts, CheckpointSigner, EventKind,
    KeyPairSigner, TaskFacts, TrailEnd, VerifyErrorKind, VerifyOptions,
};
use writ::config::AuditConfig;

const WRIT: &str = env!("CARGO_BIN_EXE_writ");
/// Set in a re-executed copy of this test binary to make `helper_process`
/// play a part (see there); unset, that test does nothing.
const HELPER_ROLE: &str = "WRIT_AUDIT_HELPER_ROLE";
const HELPER_DIR: &str = "WRIT_AUDIT_HELPER_DIR";

/// Starting a process forks this one, and until the child execs it holds a
/// copy of every descriptor open here, a trail's writer lock included: a
/// lock held that way outlives `close`, so the next open finds the trail
/// `Locked` and verify finds a closed trail live. A loaded machine widens
/// that window enough for parallel tests to hit it, so processes start only
/// while no test here has a trail open or is checking one: such tests hold
/// `no_spawns` (async tests take `SPAWN_GATE.read()`), and `spawn` waits
/// for them.
static SPAWN_GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn no_spawns() -> tokio::sync::RwLockReadGuard<'static, ()> {
    SPAWN_GATE.blocking_read()
}

/// Starts `command` once no test has a trail open. It returns when the
/// child has exec'd, which closed its copies of this process's descriptors.
fn spawn(command: &mut Command) -> Child {
    let _alone = SPAWN_GATE.blocking_write();
    command.spawn().unwrap()
}

/// The `writ` binary run with `args` (and no WRIT_CONFIG from the
/// environment): its exit code, stdout and stderr.
fn run_writ(args: &[&str]) -> (Option<i32>, String, String) {
    let out = spawn(
        Command::new(WRIT)
            .args(args)
            .env_remove("WRIT_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `writ audit verify --config <config_path>`: its exit code, stdout and
/// stderr.
fn verify_with_config(config_path: &Path) -> (Option<i32>, String, String) {
    run_writ(&["audit", "verify", "--config", config_path.to_str().unwrap()])
}

/// This test binary, run as the helper process playing `role` on the
/// trail in `dir`.
fn helper(role: &str, dir: &Path) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "helper_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ROLE, role)
        .env(HELPER_DIR, dir);
    command
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A self-signed P-256 root and a checkpoint signer using its key.
fn root_signer(name: &str) -> (Arc<dyn CheckpointSigner>, CertificateDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let cert = ca_params(name).self_signed(&key).unwrap();
    let der = cert.der().clone();
    (
        Arc::new(KeyPairSigner::new(key, der.to_vec()).unwrap()),
        der,
    )
}

fn config(dir: &Path) -> AuditConfig {
    AuditConfig {
        path: dir.join("audit").join("audit.jsonl"),
        max_file_bytes: 64 * 1024 * 1024,
        preallocate_bytes: 1 << 20,
        checkpoint_every: 1000,
        checkpoint_interval: Duration::from_secs(3600),
    }
}

fn issued(i: u64) -> AuditEvent {
    AuditEvent::new(EventKind::X509Issued, format!("corr-{i}"))
        .caller(CallerFacts {
            spiffe_ids: vec!["spiffe://writ.test/agent".into()],
            pid: 4242,
            uid: 1000,
            selectors: vec!["unix:uid:1000".into(), "systemd:unit:agent.service".into()],
        })
        .task(TaskFacts {
            id: format!("task-{i}"),
            parent_id: Some("task-0".into()),
            orchestrator: "spiffe://writ.test/orchestrator".into(),
            tools: vec!["search".into(), "jira".into()],
            targets: vec!["internal-wiki".into()],
            data_class: "internal".into(),
        })
        .decision("IssueX509SVID", true, ["policy0"])
        .spiffe_id(format!("spiffe://writ.test/task/{i}"))
        .certificate(format!("{i:032x}"), 1_900_000_000)
}

/// Every record line of the trail, oldest first, with file and 1-based line.
fn trail_lines(path: &Path) -> Vec<(PathBuf, u64, String)> {
    let mut out = Vec::new();
    for file in audit::trail_files(path).unwrap() {
        let text = std::fs::read_to_string(&file).unwrap();
        // The live file ends in the writer's zeroed space.
        for (i, line) in text.trim_end_matches('\0').lines().enumerate() {
            out.push((file.clone(), i as u64 + 1, line.to_owned()));
        }
    }
    out
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap()
}

/// A closed trail in one file: started, `n` issuances, a checkpoint every
/// `every` records, the close checkpoint.
fn closed_trail(dir: &Path, n: u64, every: u64) -> (PathBuf, CertificateDer<'static>) {
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir);
    config.checkpoint_every = every;
    let log = AuditLog::open(&config, signer).unwrap();
    for i in 0..n {
        log.append_blocking(issued(i)).unwrap();
    }
    log.close();
    (config.path, root)
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .trim_end_matches('\0')
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untouched_rotated_checkpointed_trail_verifies() {
    let _no_spawns = SPAWN_GATE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir.path());
    config.max_file_bytes = 8 * 1024;
    config.checkpoint_every = 7;
    let log = AuditLog::open(&config, signer.clone()).unwrap();
    let mut receipts = Vec::new();
    for i in 0..120 {
        receipts.push(log.append(issued(i)).await.unwrap());
    }
    log.checkpoint_async().await.unwrap();
    log.close();
    assert!(matches!(
        log.append(issued(999)).await,
        Err(AuditError::Closed)
    ));

    let report = audit::verify(&config.path, std::slice::from_ref(&root)).unwrap();
    assert_eq!(report.end, TrailEnd::Closed);
    assert!(report.files.len() >= 4, "{:?}", report.files);
    // 1 started + 120 issued; a periodic checkpoint after every 7 records
    // (checkpoints count towards the next 7 only from the record after),
    // one requested, one close.
    let lines = trail_lines(&config.path);
    assert_eq!(report.records, lines.len() as u64);
    let kinds: Vec<String> = lines
        .iter()
        .filter_map(|(_, _, l)| json(l)["checkpoint"]["kind"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(report.checkpoints, kinds.len() as u64);
    assert_eq!(kinds.iter().filter(|k| *k == "periodic").count(), 121 / 7);
    assert_eq!(kinds[kinds.len() - 2..], ["requested", "close"]);
    assert_eq!(report.last_seq, Some(lines.len() as u64 - 1));
    // Seqs count up across files, and each file continues its
    // predecessor's chain.
    for (i, (_, _, line)) in lines.iter().enumerate() {
        let record = json(line);
        assert_eq!(record["seq"], i as u64);
        if i > 0 {
            assert_eq!(record["prev"], json(&lines[i - 1].2)["hash"]);
        }
    }
    // Receipts name records that are in the trail.
    let by_seq: HashMap<u64, String> = lines
        .iter()
        .map(|(_, _, l)| {
            let r = json(l);
            (
                r["seq"].as_u64().unwrap(),
                r["hash"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for receipt in &receipts {
        assert_eq!(by_seq[&receipt.seq], receipt.hash);
    }
    // The record carries the facts handed in.
    let first_issued = json(&lines[1].2);
    assert_eq!(first_issued["event"], "x509_issued");
    assert_eq!(first_issued["caller"]["pid"], 4242);
    assert_eq!(first_issued["task"]["tools"][1], "jira");
    assert_eq!(first_issued["decision"], "allow");
    assert_eq!(first_issued["policies"][0], "policy0");
    assert_eq!(first_issued["not_after"], 1_900_000_000);
    assert!(first_issued["time"].as_str().unwrap().ends_with('Z'));

    // A second run continues the chain and records a clean previous end.
    let log = AuditLog::open(&config, signer).unwrap();
    log.append(issued(1000)).await.unwrap();
    log.close();
    let report2 = audit::verify(&config.path, &[root]).unwrap();
    assert_eq!(report2.records, report.records + 3);
    assert!(report2.unclean_starts.is_empty());
    let started = trail_lines(&config.path)
        .into_iter()
        .map(|(_, _, l)| json(&l))
        .filter(|r| r["event"] == "audit_started")
        .collect::<Vec<_>>();
    assert_eq!(started.len(), 2);
    assert_eq!(started[0]["detail"]["previous_end"], "none");
    assert_eq!(started[1]["detail"]["previous_end"], "clean");
}

#[test]
fn every_kind_of_tampering_is_detected_and_located() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let (path, root) = closed_trail(dir.path(), 30, 5);
    let roots = std::slice::from_ref(&root);
    let original = lines_of(&path);
    let report = audit::verify(&path, roots).unwrap();
    assert_eq!(report.end, TrailEnd::Closed);
    let checkpoint_lines: Vec<usize> = original
        .iter()
        .enumerate()
        .filter(|(_, l)| json(l)["event"] == "checkpoint")
        .map(|(i, _)| i)
        .collect();
    assert!(checkpoint_lines.len() >= 5);

    let check = |lines: Vec<String>, kind: VerifyErrorKind, line: u64, seq: Option<u64>| {
        write_lines(&path, &lines);
        let err = audit::verify(&path, roots).unwrap_err();
        assert_eq!((err.kind, err.line, err.seq), (kind, line, seq), "{err}");
        assert_eq!(err.file, path);
        err
    };

    // One byte changed (line 11 holds seq 10).
    let mut lines = original.clone();
    lines[10] = lines[10].replacen("corr-", "corr_", 1);
    let err = check(lines, VerifyErrorKind::Modified, 11, Some(10));
    assert!(
        err.to_string()
            .contains("audit.jsonl:11 (seq 10): the record was modified")
    );

    // One record deleted: the next one is out of place.
    let mut lines = original.clone();
    lines.remove(10);
    check(lines, VerifyErrorKind::Chain, 11, Some(11));

    // Two records swapped.
    let mut lines = original.clone();
    lines.swap(10, 11);
    check(lines, VerifyErrorKind::Chain, 11, Some(11));

    // Cut after an earlier checkpoint: the close checkpoint and every
    // record after that checkpoint are gone.
    let cut = checkpoint_lines[checkpoint_lines.len() - 3];
    let err = check(
        original[..=cut].to_vec(),
        VerifyErrorKind::Truncated,
        cut as u64 + 1,
        Some(cut as u64),
    );
    assert!(err.reason.contains("without a close checkpoint"), "{err}");
    // Cut between checkpoints: the same, named at the new last record.
    check(
        original[..cut + 3].to_vec(),
        VerifyErrorKind::Truncated,
        cut as u64 + 3,
        Some(cut as u64 + 2),
    );

    // A record changed and the whole chain after it recomputed (anyone can
    // do that): the next checkpoint's signature no longer matches.
    let mut lines = original.clone();
    lines[10] = lines[10].replacen("corr-", "corr_", 1);
    rehash_from(&mut lines, 10);
    let first_checkpoint_after = *checkpoint_lines.iter().find(|&&i| i > 10).unwrap();
    let err = check(
        lines,
        VerifyErrorKind::Checkpoint,
        first_checkpoint_after as u64 + 1,
        Some(first_checkpoint_after as u64),
    );
    assert!(err.reason.contains("signature"), "{err}");

    // The untouched trail still verifies.
    write_lines(&path, &original);
    audit::verify(&path, roots).unwrap();
    // And against the wrong root, the first checkpoint is untrusted.
    let (_, other_root) = root_signer("someone else");
    let err = audit::verify(&path, &[other_root]).unwrap_err();
    assert_eq!(err.kind, VerifyErrorKind::Untrusted, "{err}");
    assert_eq!(err.seq, Some(checkpoint_lines[0] as u64));
}

/// What an attacker without the key can do: rewrite `prev` and `hash` of
/// every record from `from` on so the hash chain is consistent again.
fn rehash_from(lines: &mut [String], from: usize) {
    use sha2::{Digest, Sha256};
    for i in from..lines.len() {
        let prev = json(&lines[i - 1])["hash"].as_str().unwrap().to_owned();
        // Checkpoints name their head too; rewrite that as well.
        let old_prev = json(&lines[i])["prev"].as_str().unwrap().to_owned();
        lines[i] = lines[i].replace(
            &format!("\"head_hash\":\"{old_prev}\""),
            &format!("\"head_hash\":\"{prev}\""),
        );
        let prev_at = lines[i].rfind(",\"prev\":\"").unwrap();
        let canonical = format!("{},\"prev\":\"{prev}\"}}", &lines[i][..prev_at]);
        let hash = hex::encode(Sha256::digest(canonical.as_bytes()));
        lines[i] = format!(
            "{},\"hash\":\"{hash}\"}}",
            &canonical[..canonical.len() - 1]
        );
    }
}

#[test]
fn deleting_a_rotated_file_breaks_the_chain_at_the_next_file() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir.path());
    config.max_file_bytes = 4 * 1024;
    config.checkpoint_every = 10;
    let log = AuditLog::open(&config, signer).unwrap();
    for i in 0..60 {
        log.append_blocking(issued(i)).unwrap();
    }
    log.close();
    let files = audit::trail_files(&config.path).unwrap();
    assert!(files.len() >= 4);
    audit::verify(&config.path, std::slice::from_ref(&root)).unwrap();
    let first_of_third = json(&lines_of(&files[2])[0])["seq"].as_u64().unwrap();
    std::fs::remove_file(&files[1]).unwrap();
    let err = audit::verify(&config.path, std::slice::from_ref(&root)).unwrap_err();
    assert_eq!(
        (err.kind, err.file.clone(), err.line, err.seq),
        (
            VerifyErrorKind::Chain,
            files[2].clone(),
            1,
            Some(first_of_third)
        ),
        "{err}"
    );
    // Removing the oldest file is caught too: the trail must start at 0.
    std::fs::remove_file(&files[0]).unwrap();
    let err = audit::verify(&config.path, &[root]).unwrap_err();
    assert_eq!((err.kind, err.line), (VerifyErrorKind::Chain, 1), "{err}");
    assert!(
        err.reason.contains(&format!(
            "the trail starts at seq {first_of_third}, not seq 0"
        )),
        "{err}"
    );
}

#[test]
fn checkpoints_by_a_foreign_key_are_refused_unless_it_is_trusted() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let (path, root) = closed_trail(dir.path(), 6, 4);
    let before = lines_of(&path).len() as u64;
    // Someone continues the trail with their own key (the chain itself is
    // fine: they had the file).
    let (foreign, foreign_root) = root_signer("intruder");
    let mut config = config(dir.path());
    config.checkpoint_every = 4;
    let log = AuditLog::open(&config, foreign).unwrap();
    for i in 0..5 {
        log.append_blocking(issued(i)).unwrap();
    }
    log.close();
    let err = audit::verify(&path, std::slice::from_ref(&root)).unwrap_err();
    assert_eq!(err.kind, VerifyErrorKind::Untrusted, "{err}");
    // started, 3 issued, then the first checkpoint by the intruder's key.
    assert_eq!(err.seq, Some(before + 4));
    assert_eq!(err.line, before + 5);
    assert!(err.reason.contains("intruder"), "{err}");
    audit::verify(&path, &[root, foreign_root]).unwrap();
}

#[test]
fn a_key_certified_by_a_trusted_root_may_sign_checkpoints() {
    let _no_spawns = no_spawns();
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("upstream root");
    let root = root_params.self_signed(&root_key).unwrap().der().clone();
    let issuer = Issuer::new(root_params, root_key);
    // An upstream intermediate may hold any key type writ signs SVIDs with
    // (ring generates no RSA keys, hence the fixture).
    let rsa_pem = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bundle/testdata/rsa2048-jwt-test-key.pem"),
    )
    .unwrap();
    let keys = [
        ("P-256", KeyPair::generate().unwrap()),
        (
            "P-384",
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        ),
        ("RSA", KeyPair::from_pem(&rsa_pem).unwrap()),
        (
            "Ed25519",
            KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        ),
    ];
    for (kind, key) in keys {
        let dir = tempfile::tempdir().unwrap();
        let intermediate = ca_params("writ intermediate")
            .signed_by(&key, &issuer)
            .unwrap()
            .der()
            .to_vec();
        let signer = Arc::new(KeyPairSigner::new(key, intermediate).unwrap());
        let mut config = config(dir.path());
        config.checkpoint_every = 3;
        let log = AuditLog::open(&config, signer).unwrap();
        for i in 0..7 {
            log.append_blocking(issued(i)).unwrap();
        }
        log.close();
        let report = audit::verify(&config.path, std::slice::from_ref(&root))
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(report.checkpoints, 3, "{kind}");
        assert_eq!(report.end, audit::TrailEnd::Closed, "{kind}");
    }
}

/// Signs with one key but hands back another key's certificate.
struct MismatchedSigner {
    signing: KeyPairSigner,
    certificate: Vec<u8>,
}

impl CheckpointSigner for MismatchedSigner {
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let (signature, _) = self.signing.sign(message)?;
        Ok((signature, self.certificate.clone()))
    }
}

#[test]
fn a_checkpoint_the_signer_got_wrong_is_refused_without_harming_the_trail() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = ca_params("a").self_signed(&key).unwrap().der().to_vec();
    let (_, other) = root_signer("b");
    let signer = Arc::new(MismatchedSigner {
        signing: KeyPairSigner::new(key, cert).unwrap(),
        certificate: other.to_vec(),
    });
    let config = config(dir.path());
    let log = AuditLog::open(&config, signer).unwrap();
    log.append_blocking(issued(1)).unwrap();
    let err = log.checkpoint().unwrap_err();
    assert!(matches!(err, AuditError::Signer(_)), "{err}");
    // Records still go in; only the (unsignable) close checkpoint is missing.
    log.append_blocking(issued(2)).unwrap();
    log.close();
    let report = audit::verify_with(
        &config.path,
        &[other],
        &VerifyOptions {
            allow_open_end: true,
        },
    )
    .unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(report.checkpoints, 0);
}

#[test]
fn one_writer_at_a_time_and_internal_events_are_refused() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let (signer, root) = root_signer("writ test root");
    let config = config(dir.path());
    let log = AuditLog::open(&config, signer.clone()).unwrap();
    let second = AuditLog::open(&config, signer.clone());
    assert!(
        matches!(second, Err(AuditError::Locked { .. })),
        "{second:?}"
    );
    for kind in [EventKind::Checkpoint, EventKind::AuditStarted] {
        let err = log.append_blocking(AuditEvent::new(kind, "x")).unwrap_err();
        assert!(matches!(err, AuditError::InvalidEvent(_)), "{err}");
    }
    // A live trail verifies even though it is not closed yet.
    log.append_blocking(issued(1)).unwrap();
    let report = audit::verify(&config.path, std::slice::from_ref(&root)).unwrap();
    assert_eq!(
        report.end,
        TrailEnd::Live {
            unsigned_records: 2
        }
    );
    log.close();
    drop(log);
    AuditLog::open(&config, signer).unwrap().close();
    audit::verify(&config.path, &[root]).unwrap();
}

/// The trail's lock file deleted by hand while a writer runs: a second
/// writer still finds the trail taken (its current file is locked too),
/// before it changes anything, also after a rotation; the first one's
/// records stay as written.
#[test]
fn a_deleted_lock_file_lets_no_second_writer_in() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir.path());
    config.max_file_bytes = 4 * 1024;
    let log = AuditLog::open(&config, signer.clone()).unwrap();
    let lock = config.path.with_file_name("audit.jsonl.lock");
    for round in 0..2u64 {
        for i in 0..30 {
            log.append_blocking(issued(round * 100 + i)).unwrap();
        }
        std::fs::remove_file(&lock).unwrap();
        let before = std::fs::read(&config.path).unwrap();
        let second = AuditLog::open(&config, signer.clone());
        assert!(
            matches!(second, Err(AuditError::Locked { .. })),
            "round {round}: {second:?}"
        );
        assert_eq!(std::fs::read(&config.path).unwrap(), before);
    }
    assert!(
        audit::trail_files(&config.path).unwrap().len() >= 2,
        "no rotation"
    );
    log.close();
    drop(log);
    audit::verify(&config.path, &[root]).unwrap();
}

#[test]
fn checkpoints_follow_the_injected_clock() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir.path());
    config.checkpoint_interval = Duration::from_secs(60);
    let now = Arc::new(AtomicU64::new(1_800_000_000));
    let clock_now = now.clone();
    let clock: audit::Clock =
        Arc::new(move || UNIX_EPOCH + Duration::from_secs(clock_now.load(Ordering::SeqCst)));
    let log = AuditLog::open_with_clock(&config, signer, clock).unwrap();
    log.append_blocking(issued(1)).unwrap();
    now.fetch_add(30, Ordering::SeqCst);
    log.append_blocking(issued(2)).unwrap();
    let events = |path: &Path| -> Vec<String> {
        lines_of(path)
            .iter()
            .map(|l| json(l)["event"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        events(&config.path),
        ["audit_started", "x509_issued", "x509_issued"]
    );
    now.fetch_add(31, Ordering::SeqCst);
    log.append_blocking(issued(3)).unwrap();
    // The interval passed: the checkpoint went to disk with that record.
    let lines = lines_of(&config.path);
    let last = json(lines.last().unwrap());
    assert_eq!(last["checkpoint"]["kind"], "periodic");
    assert_eq!(last["time"], "2027-01-15T08:01:01.000000Z");
    assert_eq!(json(&lines[1])["time"], "2027-01-15T08:00:00.000000Z");
    // The clock set back two hours: the next record brings a checkpoint
    // at once, not only once the clock has caught up.
    now.fetch_sub(7200, Ordering::SeqCst);
    log.append_blocking(issued(4)).unwrap();
    let lines = lines_of(&config.path);
    let last = json(lines.last().unwrap());
    assert_eq!(last["checkpoint"]["kind"], "periodic", "{last}");
    assert_eq!(last["time"], "2027-01-15T06:01:01.000000Z");
    log.close();
    audit::verify(&config.path, &[root]).unwrap();
}

/// With the clock before the signing certificate's notBefore (a clock set
/// back, or a root made while the clock was ahead), writ writes no
/// checkpoint: verify would refuse one dated outside its certificate for
/// good. Once the clock is inside, checkpoints cover the records again.
#[test]
fn no_checkpoint_is_dated_outside_its_certificates_validity() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    const START: u64 = 1_800_000_000;
    let key = KeyPair::generate().unwrap();
    let mut params = ca_params("writ test root, valid from an hour on");
    params.not_before = time::OffsetDateTime::from_unix_timestamp(START as i64 + 3600).unwrap();
    let root = params.self_signed(&key).unwrap().der().clone();
    let signer: Arc<dyn CheckpointSigner> =
        Arc::new(KeyPairSigner::new(key, root.to_vec()).unwrap());
    let config = config(dir.path());
    let now = Arc::new(AtomicU64::new(START));
    let clock_now = now.clone();
    let clock: audit::Clock =
        Arc::new(move || UNIX_EPOCH + Duration::from_secs(clock_now.load(Ordering::SeqCst)));
    let log = AuditLog::open_with_clock(&config, signer.clone(), clock.clone()).unwrap();
    log.append_blocking(issued(1)).unwrap();
    log.close();
    drop(log);
    // Not one checkpoint: verify says the trail may have lost its end,
    // not that it was forged.
    let err = audit::verify(&config.path, std::slice::from_ref(&root)).unwrap_err();
    assert_eq!(err.kind, VerifyErrorKind::Truncated, "{err}");

    now.fetch_add(7200, Ordering::SeqCst);
    let log = AuditLog::open_with_clock(&config, signer, clock).unwrap();
    log.append_blocking(issued(2)).unwrap();
    log.close();
    let report = audit::verify(&config.path, &[root]).unwrap();
    assert_eq!(report.last_checkpoint_seq, report.last_seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_on_disk_when_they_return() {
    let _no_spawns = SPAWN_GATE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir.path());
    config.checkpoint_every = 100;
    let log = AuditLog::open(&config, signer).unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let log = log.clone();
        let path = config.path.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..40 {
                let receipt = log.append(issued(t * 1000 + i)).await.unwrap();
                // Read back through a fresh descriptor: it is in the file.
                let text = std::fs::read_to_string(&path).unwrap();
                let needle = format!("{{\"seq\":{},", receipt.seq);
                let line = text
                    .lines()
                    .find(|l| l.starts_with(&needle))
                    .unwrap_or_else(|| panic!("seq {} not on disk", receipt.seq));
                assert!(line.ends_with(&format!("\"hash\":\"{}\"}}", receipt.hash)));
                assert!(line.contains(&format!("\"correlation_id\":\"corr-{}\"", t * 1000 + i)));
                seqs.push(receipt.seq);
            }
            seqs
        }));
    }
    let mut all = HashSet::new();
    for task in tasks {
        for seq in task.await.unwrap() {
            assert!(all.insert(seq), "seq {seq} handed out twice");
        }
    }
    assert_eq!(all.len(), 640);
    log.close();
    let report = audit::verify(&config.path, &[root]).unwrap();
    assert_eq!(report.end, TrailEnd::Closed);
    assert!(report.records >= 642);
}

#[test]
fn a_torn_last_line_is_set_aside_on_reopen_and_recorded() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let (path, root) = closed_trail(dir.path(), 5, 100);
    let roots = std::slice::from_ref(&root);
    let fragment = b"{\"seq\":8,\"time\":\"2025-01-0";
    let records_before = lines_of(&path).len() as u64;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(fragment)
        .unwrap();
    let err = audit::verify(&path, roots).unwrap_err();
    assert_eq!(
        (err.kind, err.line),
        (VerifyErrorKind::Malformed, records_before + 1),
        "{err}"
    );
    let report = audit::verify_with(
        &path,
        roots,
        &VerifyOptions {
            allow_open_end: true,
        },
    )
    .unwrap();
    assert_eq!(
        report.end,
        TrailEnd::Open {
            unsigned_records: 0,
            torn_bytes: fragment.len() as u64
        }
    );

    let (signer, _) = root_signer("unused");
    let mut config = config(dir.path());
    config.path = path.clone();
    // Reopening with another key is fine for this test: nothing is signed
    // until close, and we only verify up to there.
    let log = AuditLog::open(&config, signer).unwrap();
    let aside: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), fragment);
    let lines = lines_of(&path);
    let started = json(lines.last().unwrap());
    assert_eq!(started["event"], "audit_started");
    assert_eq!(started["seq"], records_before);
    assert_eq!(started["detail"]["previous_end"], "unclean");
    assert_eq!(started["detail"]["torn_tail_bytes"], fragment.len());
    assert_eq!(
        started["detail"]["torn_tail_moved_to"],
        aside[0].display().to_string()
    );
    drop(log);
    let report = audit::verify_with(
        &path,
        roots,
        &VerifyOptions {
            allow_open_end: true,
        },
    );
    // The reopened run's close checkpoint is by the "unused" key.
    let err = report.unwrap_err();
    assert_eq!(err.kind, VerifyErrorKind::Untrusted);
    assert_eq!(err.seq, Some(records_before + 1));
}

#[test]
fn a_crash_killed_writer_leaves_every_acknowledged_record_and_a_verifiable_trail() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn(
        helper("append-forever", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ACK ") {
                let (seq, hash) = rest.split_once(' ').unwrap();
                if tx
                    .send((seq.parse::<u64>().unwrap(), hash.to_owned()))
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 3000 {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(ack) => acknowledged.push(ack),
            Err(e) => panic!(
                "the helper stopped acknowledging after {}: {e}",
                acknowledged.len()
            ),
        }
    }
    child.kill().unwrap(); // SIGKILL, mid-stream
    child.wait().unwrap();
    reader.join().unwrap();
    acknowledged.extend(rx.try_iter());

    let _no_spawns = no_spawns();
    let path = config(dir.path()).path;
    let root = CertificateDer::from(std::fs::read(dir.path().join("root.der")).unwrap());
    let roots = std::slice::from_ref(&root);
    // Verifies up to the last complete record...
    let report = audit::verify_with(
        &path,
        roots,
        &VerifyOptions {
            allow_open_end: true,
        },
    )
    .unwrap();
    assert!(matches!(report.end, TrailEnd::Open { .. }), "{report:?}");
    assert!(report.files.len() > 1, "the helper rotates files");
    // ...and every record the child was told is durable is there.
    let on_disk: HashMap<u64, String> = trail_lines(&path)
        .iter()
        .filter_map(|(_, _, l)| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["hash"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (seq, hash) in &acknowledged {
        assert_eq!(on_disk.get(seq), Some(hash), "acknowledged seq {seq}");
    }
    // Strictly, a crash looks exactly like a cut: reported as such.
    let err = audit::verify(&path, roots).unwrap_err();
    assert_eq!(err.kind, VerifyErrorKind::Truncated, "{err}");
    // The next start records the unclean end and the trail is whole again.
    let key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("root.key")).unwrap()).unwrap();
    let signer = Arc::new(KeyPairSigner::new(key, root.to_vec()).unwrap());
    let mut config = config(dir.path());
    config.max_file_bytes = 64 * 1024;
    AuditLog::open(&config, signer).unwrap().close();
    let report = audit::verify(&path, roots).unwrap();
    assert_eq!(report.end, TrailEnd::Closed);
    assert_eq!(report.unclean_starts.len(), 1);
}

#[test]
fn a_failed_write_fails_the_append_and_the_trail_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let output = spawn(
        helper("file-size-limit", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("HELPER DONE"),
        "helper failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Not a test on its own: a copy of this binary runs it as a helper
/// process when `WRIT_AUDIT_HELPER_ROLE` is set.
#[test]
fn helper_process() {
    let Ok(role) = std::env::var(HELPER_ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(HELPER_DIR).unwrap());
    match role.as_str() {
        "append-forever" => append_forever(&dir),
        "file-size-limit" => file_size_limit(&dir),
        other => panic!("unknown helper role {other}"),
    }
}

/// Appends from 8 tasks until killed, printing `ACK <seq> <hash>` only
/// after each append has returned.
fn append_forever(dir: &Path) {
    let key = KeyPair::generate().unwrap();
    let cert = ca_params("crash test root").self_signed(&key).unwrap();
    std::fs::write(dir.join("root.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root.der"), cert.der()).unwrap();
    let signer = Arc::new(KeyPairSigner::new(key, cert.der().to_vec()).unwrap());
    let mut config = config(dir);
    config.max_file_bytes = 64 * 1024;
    config.checkpoint_every = 64;
    let log = AuditLog::open(&config, signer).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let receipt = log.append(issued(t * 1_000_000 + i)).await.unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {} {}", receipt.seq, receipt.hash).unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

/// Lowers RLIMIT_FSIZE so a write fails part-way (EFBIG), checks the
/// append fails and the file still ends on the last acknowledged record,
/// then lifts the limit and checks the chain carries on.
fn file_size_limit(dir: &Path) {
    use nix::sys::signal::{SigSet, Signal};
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // Exceeding the limit raises SIGXFSZ, which would kill us; blocked, the
    // write fails with EFBIG instead. Threads started later inherit this.
    SigSet::from(Signal::SIGXFSZ).thread_block().unwrap();
    let (signer, root) = root_signer("writ test root");
    let config = config(dir);
    let log = AuditLog::open(&config, signer).unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        acknowledged.push(log.append_blocking(issued(i)).unwrap());
    }
    // Where the records end: the file itself runs on with zeroed space.
    let size = std::fs::read(&config.path)
        .unwrap()
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1);
    let original = getrlimit(Resource::Fsize);
    setrlimit(
        Resource::Fsize,
        Rlimit {
            current: Some(size + 3000),
            maximum: original.maximum,
        },
    )
    .unwrap();
    let mut failed = None;
    for i in 5..100 {
        match log.append_blocking(issued(i)) {
            Ok(receipt) => acknowledged.push(receipt),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("a write past RLIMIT_FSIZE failed");
    assert!(matches!(err, AuditError::Write(_)), "{err}");
    let text = std::fs::read_to_string(&config.path).unwrap();
    // Zeroed space may follow (the writer tries to keep some ready); no
    // byte of the failed batch may.
    let text = text.trim_end_matches('\0');
    assert!(text.ends_with('\n'), "the partial write was taken back");
    let last = json(text.lines().last().unwrap());
    let last_ack = acknowledged.last().unwrap();
    assert_eq!(last["seq"], last_ack.seq);
    assert_eq!(last["hash"], last_ack.hash.as_str());
    setrlimit(Resource::Fsize, original).unwrap();
    let next = log.append_blocking(issued(1000)).unwrap();
    assert_eq!(next.seq, last_ack.seq + 1);
    log.close();
    let report = audit::verify(&config.path, &[root]).unwrap();
    assert_eq!(report.end, TrailEnd::Closed);
    println!("HELPER DONE");
}

#[test]
fn the_cli_verifies_and_tails_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir.path());
    config.max_file_bytes = 4 * 1024;
    config.checkpoint_every = 10;
    {
        let _no_spawns = no_spawns();
        let log = AuditLog::open(&config, signer.clone()).unwrap();
        for i in 0..40 {
            log.append_blocking(issued(i)).unwrap();
        }
        log.close();
    }
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        pem::encode(&pem::Pem::new("CERTIFICATE", root.to_vec())),
    )
    .unwrap();
    let path = config.path.display().to_string();
    let bundle_arg = bundle.display().to_string();
    let writ = run_writ;

    let (code, stdout, stderr) =
        writ(&["audit", "verify", "--path", &path, "--bundle", &bundle_arg]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let files = audit::trail_files(&config.path).unwrap().len();
    assert!(
        stdout.starts_with("OK: ")
            && stdout.contains(&format!("in {files} file(s)"))
            && stdout.contains("closed cleanly"),
        "{stdout}"
    );

    let (code, stdout, _) = writ(&["audit", "tail", "--path", &path, "-n", "3"]);
    assert_eq!(code, Some(0));
    let all = trail_lines(&config.path);
    let expected: Vec<&str> = all[all.len() - 3..]
        .iter()
        .map(|(_, _, l)| l.as_str())
        .collect();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected);
    // More lines than the current file holds come from rotated files.
    let (_, stdout, _) = writ(&["audit", "tail", "--path", &path, "-n", "100000"]);
    assert_eq!(stdout.lines().count(), all.len());
    // Where there is no trail, tail fails as verify does, saying so.
    let missing = dir.path().join("absent.jsonl").display().to_string();
    for args in [
        vec!["audit", "tail", "--path", &missing],
        vec![
            "audit",
            "verify",
            "--path",
            &missing,
            "--bundle",
            &bundle_arg,
        ],
    ] {
        let (code, stdout, stderr) = writ(&args);
        assert_eq!(code, Some(1), "{args:?}: {stdout}{stderr}");
        assert!(
            stdout.is_empty()
                && stderr.contains(&missing)
                && stderr.contains("no audit trail here"),
            "{args:?}: {stdout}{stderr}"
        );
    }

    // Follow: new records appear, across a rotation.
    let mut follower = spawn(
        Command::new(WRIT)
            .args(["audit", "tail", "--follow", "--path", &path, "-n", "1"])
            .env_remove("WRIT_CONFIG")
            .stdout(Stdio::piped()),
    );
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(first, all.last().unwrap().2);
    {
        let _no_spawns = no_spawns();
        let log = AuditLog::open(&config, signer.clone()).unwrap();
        for i in 100..140 {
            log.append_blocking(issued(i)).unwrap();
        }
        log.close();
    }
    let now = trail_lines(&config.path);
    assert!(audit::trail_files(&config.path).unwrap().len() > files);
    for (_, _, expected) in &now[all.len()..] {
        let got = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(&got, expected);
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
    reader.join().unwrap();

    // A modified record: exit 1, naming file, line and seq.
    let current = lines_of(&config.path);
    let mut tampered = current.clone();
    tampered[1] = tampered[1].replacen("corr-", "corr_", 1);
    write_lines(&config.path, &tampered);
    let (code, _, stderr) = writ(&["audit", "verify", "--path", &path, "--bundle", &bundle_arg]);
    assert_eq!(code, Some(1));
    let seq = json(&current[1])["seq"].as_u64().unwrap();
    assert!(
        stderr.contains(&format!("{path}:2 (seq {seq}): the record was modified")),
        "{stderr}"
    );
    write_lines(&config.path, &current);
}

#[test]
fn the_cli_takes_the_path_and_roots_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("state");
    let audit_path = dir.path().join("trail").join("audit.jsonl");
    let config_path = dir.path().join("writ.toml");
    std::fs::write(
        &config_path,
        format!(
            "data_dir = \"{}\"\n[audit]\npath = \"{}\"\n",
            data_dir.display(),
            audit_path.display()
        ),
    )
    .unwrap();
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir.path());
    config.path = audit_path.clone();
    {
        let _no_spawns = no_spawns();
        let log = AuditLog::open(&config, signer).unwrap();
        log.append_blocking(issued(1)).unwrap();
        log.close();
    }
    let verify = || {
        let (code, out, err) = verify_with_config(&config_path);
        (code, out + &err)
    };
    // No CA state yet: the error says where it looked.
    let (code, text) = verify();
    assert_eq!(code, Some(1));
    assert!(
        text.contains(&data_dir.join("ca/state.json").display().to_string()),
        "{text}"
    );

    // A real CA's state file: its roots are read, and ours is not among them.
    let trust_domain = writ::spiffe_id::TrustDomain::new("writ.test").unwrap();
    writ::ca::CertificateAuthority::load_or_create(
        writ::ca::CaSettings::new(trust_domain, data_dir.join("ca")),
        SystemTime::now(),
    )
    .unwrap();
    let (code, text) = verify();
    assert_eq!(code, Some(1));
    assert!(
        text.contains("neither a trusted root nor issued by one"),
        "{text}"
    );

    // The same file format listing our root: verified.
    let state = serde_json::json!({
        "version": 1,
        "trust_domain": "writ.test",
        "x509_authorities": [{
            "role": "active",
            "certificate": pem::encode(&pem::Pem::new("CERTIFICATE", root.to_vec())),
            "key_file": "x.key.pem",
        }],
    });
    std::fs::write(data_dir.join("ca/state.json"), state.to_string()).unwrap();
    let (code, text) = verify();
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.starts_with("OK: 3 records, 1 checkpoints in 1 file(s)"),
        "{text}"
    );
}

#[test]
fn verifying_a_trail_while_it_is_written_and_rotated_sees_no_false_break() {
    let _no_spawns = no_spawns();
    let dir = tempfile::tempdir().unwrap();
    let (signer, root) = root_signer("writ test root");
    let mut config = config(dir.path());
    config.max_file_bytes = 2 * 1024;
    config.checkpoint_every = 16;
    let log = AuditLog::open(&config, signer).unwrap();
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for i in 0..600 {
                log.append_blocking(issued(i)).unwrap();
            }
        })
    };
    let mut verified = 0;
    while !writer.is_finished() {
        let report = audit::verify(&config.path, std::slice::from_ref(&root))
            .unwrap_or_else(|e| panic!("after {verified} good runs: {e}"));
        assert!(matches!(report.end, TrailEnd::Live { .. }), "{report:?}");
        verified += 1;
    }
    writer.join().unwrap();
    log.close();
    let report = audit::verify(&config.path, &[root]).unwrap();
    assert_eq!(report.end, TrailEnd::Closed);
    assert!(report.files.len() > 50);
}

#[test]
fn the_cli_in_upstream_mode_also_trusts_roots_the_state_kept_from_self_signed_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("state");
    let audit_path = dir.path().join("trail").join("audit.jsonl");
    let upstream_bundle = dir.path().join("upstream-roots.pem");
    let config_path = dir.path().join("writ.toml");
    // Only the bundle is read by verify; the intermediate's files need not exist.
    std::fs::write(
        &config_path,
        format!(
            "data_dir = \"{}\"\n[audit]\npath = \"{}\"\n[ca.upstream]\ncert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"\n",
            data_dir.display(),
            audit_path.display(),
            dir.path().join("absent-intermediate.pem").display(),
            dir.path().join("absent-intermediate.key").display(),
            upstream_bundle.display()
        ),
    )
    .unwrap();
    // A self-signed run, then an upstream one, on the same trail.
    let (self_signed, self_signed_root) = root_signer("self-signed era");
    let (upstream, upstream_root) = root_signer("upstream root");
    let mut config = config(dir.path());
    config.path = audit_path.clone();
    for signer in [self_signed, upstream] {
        let _no_spawns = no_spawns();
        let log = AuditLog::open(&config, signer).unwrap();
        log.append_blocking(issued(1)).unwrap();
        log.close();
    }
    let pem_of =
        |der: &CertificateDer<'_>| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    std::fs::write(&upstream_bundle, pem_of(&upstream_root)).unwrap();
    let verify = || verify_with_config(&config_path);
    // No state: the upstream bundle alone, which cannot vouch for the
    // first run's close checkpoint (seq 2).
    let (code, _, err) = verify();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("(seq 2)") && err.contains("self-signed era"),
        "{err}"
    );

    // The state remembers the self-signed root as expired: all verifies.
    std::fs::create_dir_all(data_dir.join("ca")).unwrap();
    let state = serde_json::json!({
        "version": 1,
        "trust_domain": "writ.test",
        "x509_authorities": [],
        "expired_x509_authorities": [{ "certificate": pem_of(&self_signed_root) }],
    });
    std::fs::write(data_dir.join("ca/state.json"), state.to_string()).unwrap();
    let (code, out, err) = verify();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("OK: 6 records, 2 checkpoints"), "{out}");

    // An unusable state is reported, and the upstream bundle still used.
    std::fs::write(data_dir.join("ca/state.json"), "{").unwrap();
    let (code, _, err) = verify();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("warning: not using the roots in"), "{err}");
    assert!(err.contains("(seq 2)"), "{err}");
}
