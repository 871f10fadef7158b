//! What policy evaluation and the audit write add to one issuance, measured
//! in-process with writ's own engine and audit log (release build):
//!
//!     cargo bench --bench policy_audit [-- --quick]
//!
//! Policy: an IssueX509SVID decision for a task identity against the
//! built-in policy and against the example policy set in policy/examples.
//! Audit: `AuditLog::append` of an issuance record, which returns only after
//! the record is fsynced, with 1 and 16 concurrent appenders (group commit).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use writ::audit::{AuditEvent, AuditLog, CallerFacts, EventKind, KeyPairSigner};
use writ::config::AuditConfig;
use writ::policy::{IdentityFacts, PolicyEngine, PolicyRequest, TaskFacts, Workload};

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

async fn bench_audit(dir: &Path, concurrency: usize, per_task: usize) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let signer = KeyPairSigner::new(key, cert.der().to_vec()).expect("signer");
    let mut config = AuditConfig::defaults_for(dir);
    config.path = dir.join(format!("audit-{concurrency}.jsonl"));
    let log = AuditLog::open(&config, Arc::new(signer)).expect("audit log");
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
    report(
        &format!("audit append (fsynced), {concurrency} appender(s)"),
        all,
    );
    println!(
        "{:<44} {:.0} records/s",
        "",
        n as f64 / elapsed.as_secs_f64()
    );
    log.close();
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
    rt.block_on(bench_audit(dir.path(), 1, per));
    rt.block_on(bench_audit(dir.path(), 16, per / 4));
}
