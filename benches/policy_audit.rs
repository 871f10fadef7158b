//! What policy evaluation and the audit write add to one issuance, measured
//! in-process with writ's own engine and audit log (release build):
//!
//!     cargo bench --bench policy_audit [-- --quick]
//!
//! Policy: an IssueX509SVID decision for a task identity against the
//! built-in policy and against the example policy set in policy/examples.
//! Audit: `AuditLog::append` of an issuance record, which returns only after
//! the record is fsynced, with 1 and 16 concurrent appenders (group commit),
//! with the default zeroed space kept ready past the last record and, for
//! comparison, with plain appends (`preallocate_bytes = 0`).
//! Issuance: what policy and the audit record add to minting an X509-SVID
//! with writ's CA, composed as writ's issuance path composes them on a
//! runtime worker (the record is written once the serial is chosen, travels
//! to the disk while the key is generated and the certificate signed, and
//! is synced after), against minting alone and against recording only
//! after minting.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use writ::audit::{AuditEvent, AuditLog, CallerFacts, EventKind, KeyPairSigner};
use writ::ca::{CaSettings, CertificateAuthority};
use writ::config::AuditConfig;
use writ::policy::{IdentityFacts, PolicyEngine, PolicyRequest, TaskFacts, Workload};
use writ::spiffe_id::TrustDomain;
use writ::svid::X509SvidRequest;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len().max(1) as u32;
    println!(
        "{name:<44} n={:<6} mean {:>8.1} µs  p50 {:>8.1} µs  p99 {:>8.1} µs",
        samples.len(),
        mean.as_secs_f64() * 1e6,
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
    );
}

fn issue_request() -> PolicyRequest {
    let task = TaskFacts {
        id: "t-42".into(),
        spiffe_id: "spiffe://example.org/orchestrator/research/task/t-42".into(),
        parent_id: None,
        ancestors: Vec::new(),
        depth: 1,
        purpose: "summarise tickets".into(),
        tools: vec!["jira".into()],
        targets: vec!["tickets".into()],
        data_class: "internal".into(),
        attributes: Default::default(),
        ttl_seconds: 600,
        orchestrator: "spiffe://example.org/orchestrator/research".into(),
    };
    PolicyRequest::IssueX509Svid {
        caller: Workload {
            spiffe_id: Some(task.spiffe_id.clone()),
            selectors: vec![
                "unix:uid:1000".into(),
                "unix:gid:1000".into(),
                "cgroup:path:/writ.slice/t-42".into(),
            ],
            pid: 4242,
            uid: 1000,
        },
        identity: IdentityFacts {
            spiffe_id: task.spiffe_id.clone(),
            task: Some(task),
        },
    }
}

fn bench_policy(name: &str, engine: &PolicyEngine, iterations: usize) {
    let request = issue_request();
    let now = time::OffsetDateTime::now_utc();
    for _ in 0..iterations / 10 {
        std::hint::black_box(engine.evaluate(&request, now));
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        std::hint::black_box(engine.evaluate(&request, now));
        samples.push(started.elapsed());
    }
    report(name, samples);
}

fn event(i: usize) -> AuditEvent {
    AuditEvent::new(EventKind::X509Issued, format!("bench-{i}"))
        .caller(CallerFacts {
            spiffe_ids: vec!["spiffe://writ.test/bench".into()],
            pid: 4242,
            uid: 1000,
            selectors: vec!["unix:uid:1000".into(), "unix:gid:1000".into()],
        })
        .spiffe_id("spiffe://writ.test/bench")
        .certificate(format!("{i:032x}"), 1_800_000_000)
        .decision("IssueX509SVID", true, vec!["task-svids".to_string()])
}

/// An audit trail in `dir`, checkpoints signed by a throwaway key.
fn open_log(dir: &Path, file: &str, preallocate_bytes: u64) -> Arc<AuditLog> {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let signer = KeyPairSigner::new(key, cert.der().to_vec()).expect("signer");
    let mut config = AuditConfig::defaults_for(dir);
    config.path = dir.join(file);
    config.preallocate_bytes = preallocate_bytes;
    AuditLog::open(&config, Arc::new(signer)).expect("audit log")
}

async fn bench_audit(dir: &Path, concurrency: usize, per_task: usize, preallocate_bytes: u64) {
    let log = open_log(
        dir,
        &format!("audit-{concurrency}-{preallocate_bytes}.jsonl"),
        preallocate_bytes,
    );
    let mut joins = Vec::new();
    for t in 0..concurrency {
        let log = log.clone();
        joins.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let started = Instant::now();
                log.append(event(t * per_task + i)).await.expect("append");
                samples.push(started.elapsed());
            }
            samples
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for j in joins {
        all.extend(j.await.expect("appender"));
    }
    let elapsed = started.elapsed();
    let n = all.len();
    let layout = if preallocate_bytes == 0 {
        "plain appends".to_owned()
    } else {
        format!("{} KiB ready", preallocate_bytes / 1024)
    };
    report(
        &format!("audit append, {concurrency} appender(s), {layout}"),
        all,
    );
    println!(
        "{:<44} {:.0} records/s",
        "",
        n as f64 / elapsed.as_secs_f64()
    );
    log.close();
}

fn issued_event(i: usize, serial: String, not_after: i64) -> AuditEvent {
    event(i).certificate(serial, not_after)
}

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Median of `samples` after sorting.
fn p50(samples: &mut [Duration]) -> Duration {
    samples.sort();
    percentile(samples, 0.5)
}

async fn bench_issuance(dir: &Path, engine: &PolicyEngine, n: usize) {
    let td = TrustDomain::new("writ.test").expect("trust domain");
    let ca = CertificateAuthority::load_or_create(
        CaSettings::new(td.clone(), dir.join("ca")),
        std::time::SystemTime::now(),
    )
    .expect("CA");
    let log = open_log(
        dir,
        "issuance.jsonl",
        AuditConfig::defaults_for(dir).preallocate_bytes,
    );
    let request = X509SvidRequest {
        spiffe_id: td
            .spiffe_id("/orchestrator/research/task/t-42")
            .expect("SPIFFE ID"),
        ttl: Duration::from_secs(600),
        ends_by: None,
        dns_names: Vec::new(),
    };
    let policy_request = issue_request();
    let (mut mint_only, mut record_only, mut overlapped, mut sequential) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    // Interleaved, so a slow spell of the disk hits every variant alike.
    for i in 0..n + n / 10 {
        let warm = i < n / 10;
        let now = std::time::SystemTime::now();

        let started = Instant::now();
        std::hint::black_box(ca.mint_x509_svid(&request, now).expect("mint"));
        let took = started.elapsed();
        if !warm {
            mint_only.push(took);
        }

        let started = Instant::now();
        log.append(issued_event(i, format!("{i:032x}"), unix(now)))
            .await
            .expect("recorded");
        let took = started.elapsed();
        if !warm {
            record_only.push(took);
        }

        let started = Instant::now();
        let decision = engine.evaluate(&policy_request, time::OffsetDateTime::now_utc());
        assert!(decision.allowed, "the bench's policy must allow issuance");
        let (svid, on_disk) = ca
            .mint_x509_svid_with(&request, now, |plan| {
                log.start_append(issued_event(i, plan.serial_hex(), unix(plan.not_after)))
            })
            .expect("mint");
        on_disk.expect("queued").await.expect("recorded");
        std::hint::black_box(svid);
        let took = started.elapsed();
        if !warm {
            overlapped.push(took);
        }

        let started = Instant::now();
        let decision = engine.evaluate(&policy_request, time::OffsetDateTime::now_utc());
        assert!(decision.allowed);
        let svid = ca.mint_x509_svid(&request, now).expect("mint");
        log.append(issued_event(i, svid.serial_hex(), unix(svid.not_after)))
            .await
            .expect("recorded");
        std::hint::black_box(svid);
        let took = started.elapsed();
        if !warm {
            sequential.push(took);
        }
    }
    let base = p50(&mut mint_only);
    let with_overlap = p50(&mut overlapped);
    let with_sequence = p50(&mut sequential);
    report("mint alone (keygen + sign)", mint_only);
    report("record alone (audit append)", record_only);
    report("policy + mint + record, as writ issues", overlapped);
    report("policy + mint, then record", sequential);
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "policy + audit add (p50 difference): {:.1} µs as writ issues; {:.1} µs recording after minting",
        micros(with_overlap.saturating_sub(base)),
        micros(with_sequence.saturating_sub(base)),
    );
    log.close();
}

/// The disk's own floor under an audit commit, in the bench's directory:
/// 600-byte records each followed by `fdatasync`, appended to a growing
/// file, and written over a file already zeroed and synced.
fn disk_floor(dir: &Path, n: usize) {
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;
    let record = [b'x'; 600];
    let mut appended = std::fs::File::create(dir.join("floor-append")).expect("probe file");
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        appended.write_all(&record).expect("write");
        appended.sync_data().expect("fdatasync");
        samples.push(started.elapsed());
    }
    report("disk: append 600 B + fdatasync", samples);
    let over = std::fs::File::create(dir.join("floor-overwrite")).expect("probe file");
    over.write_all_at(&vec![0u8; (n + 1) * record.len()], 0)
        .expect("zeros");
    over.sync_all().expect("fsync");
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        over.write_all_at(&record, (i * record.len()) as u64)
            .expect("write");
        over.sync_data().expect("fdatasync");
        samples.push(started.elapsed());
    }
    report("disk: overwrite 600 B of zeros + fdatasync", samples);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let iterations = if quick { 2_000 } else { 20_000 };
    println!("policy evaluation (IssueX509SVID, task identity):");
    bench_policy(
        "built-in policy",
        &PolicyEngine::builtin_default(),
        iterations,
    );
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy/examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .expect("policy/examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    files.sort();
    let engine = PolicyEngine::load(&files).expect("example policies load");
    bench_policy(
        &format!("example policies ({} files)", files.len()),
        &engine,
        iterations,
    );

    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "\naudit write per issuance (state on {}):",
        dir.path().display()
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let per = if quick { 200 } else { 1_000 };
    println!("\nX509-SVID issuance with policy and its audit record (built-in policy):");
    // On a runtime worker, where writ's handlers run (not the thread
    // blocked in `block_on`): how a wait for the disk treats the worker is
    // part of what is measured.
    let issuance_dir = dir.path().to_owned();
    rt.block_on(async move {
        tokio::spawn(async move {
            bench_issuance(&issuance_dir, &PolicyEngine::builtin_default(), per).await;
        })
        .await
        .expect("issuance bench task");
    });
    println!("\nthe disk alone:");
    disk_floor(dir.path(), per);
    println!("\naudit appends alone:");
    let default = AuditConfig::defaults_for(dir.path()).preallocate_bytes;
    for preallocate in [default, 0] {
        rt.block_on(bench_audit(dir.path(), 1, per, preallocate));
        rt.block_on(bench_audit(dir.path(), 16, per / 4, preallocate));
    }
}
