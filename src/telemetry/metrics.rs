//! The Prometheus metrics writ keeps: one `Metrics` per agent, updated on the
//! hot paths with atomic counters and small fixed-bucket histograms, and
//! rendered as OpenMetrics text for `/metrics`.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// One label, as prometheus-client encodes it.
pub type Label = [(&'static str, &'static str); 1];
/// A label whose value comes from data (a trust domain name).
pub type DynLabel = [(&'static str, String); 1];
/// A trust domain and an outcome.
pub type FetchLabel = [(&'static str, String); 2];

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric writ exposes. The fields are public so each subsystem can
/// count what it does without a layer of wrappers in between.
pub struct Metrics {
    registry: Registry,
    /// Reading a caller's selectors and proving them with the pidfd.
    pub attestation_seconds: Histogram,
    /// SVIDs minted, by `kind` ("x509" or "jwt"); a cached SVID handed out
    /// again is not counted.
    pub svids_issued: Family<Label, Counter>,
    pub tasks_active: Gauge,
    /// Tasks completed, by `reason` (`CompletionReason::as_str`).
    pub tasks_completed: Family<Label, Counter>,
    /// Serials revoked because their task completed.
    pub revocations: Counter,
    /// Workload API streams currently open.
    pub open_streams: Gauge,
    /// Requests a policy refused. The policy engine increments it.
    pub policy_denials: Counter,
    /// Federated bundle fetches, by `trust_domain` and `outcome`
    /// ("success" or "failure").
    pub federation_fetches: Family<FetchLabel, Counter>,
    /// Seconds since the last successful fetch, by `trust_domain`.
    pub federation_bundle_age_seconds: Family<DynLabel, FloatGauge>,
    /// Seconds until the active CA certificate expires.
    pub ca_expiry_seconds: FloatGauge,
    /// Revocations on the CRLs writ serves, and their size: every
    /// Workload API message carries them, so their size is what each
    /// message costs (task rate × task SVID lifetime sets it).
    pub crl_entries: Gauge,
    pub crl_bytes: Gauge,
    /// Seconds until the soonest-expiring cached X.509-SVID expires.
    pub svid_expiry_seconds: FloatGauge,
    /// Appending a record to the audit trail, fsync included.
    pub audit_write_seconds: Histogram,
    /// Refusal records not written in full because their uid had used its
    /// budget (`refusal_budget`); the trail has their counts instead.
    pub audit_refusals_suppressed: Counter,
    /// Configuration reloads, by `outcome` ("success" or "failure").
    pub reloads: Family<Label, Counter>,
    /// 1 if the last reload applied, 0 if it was refused.
    pub last_reload_success: Gauge,
    /// Unix time of the last reload attempt.
    pub last_reload_timestamp_seconds: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Few buckets: each observation costs a scan of them, on every RPC.
fn latency_buckets() -> [f64; 8] {
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0]
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("writ");
        let attestation_seconds = Histogram::new(latency_buckets());
        registry.register(
            "attestation_seconds",
            "Time to attest a caller: read its selectors and confirm them through its pidfd",
            attestation_seconds.clone(),
        );
        let svids_issued = Family::<Label, Counter>::default();
        registry.register(
            "svids_issued",
            "SVIDs minted, by kind (x509, jwt)",
            svids_issued.clone(),
        );
        let tasks_active = Gauge::default();
        registry.register(
            "tasks_active",
            "Tasks currently active",
            tasks_active.clone(),
        );
        let tasks_completed = Family::<Label, Counter>::default();
        registry.register(
            "tasks_completed",
            "Tasks completed, by reason",
            tasks_completed.clone(),
        );
        let revocations = Counter::default();
        registry.register(
            "revocations",
            "Certificate serials revoked because their task completed",
            revocations.clone(),
        );
        let open_streams = Gauge::default();
        registry.register(
            "open_streams",
            "Workload API streams currently open",
            open_streams.clone(),
        );
        let policy_denials = Counter::default();
        registry.register(
            "policy_denials",
            "Requests refused by policy",
            policy_denials.clone(),
        );
        let federation_fetches = Family::<FetchLabel, Counter>::default();
        registry.register(
            "federation_fetches",
            "Federated bundle fetches, by trust domain and outcome",
            federation_fetches.clone(),
        );
        let federation_bundle_age_seconds = Family::<DynLabel, FloatGauge>::default();
        registry.register(
            "federation_bundle_age_seconds",
            "Seconds since a federated trust domain's bundle was last fetched successfully",
            federation_bundle_age_seconds.clone(),
        );
        let ca_expiry_seconds = FloatGauge::default();
        registry.register(
            "ca_expiry_seconds",
            "Seconds until the active CA certificate expires",
            ca_expiry_seconds.clone(),
        );
        let crl_entries = Gauge::default();
        registry.register(
            "crl_entries",
            "Revoked certificates listed on the CRLs served with every Workload API message",
            crl_entries.clone(),
        );
        let crl_bytes = Gauge::default();
        registry.register(
            "crl_bytes",
            "Size of the CRLs served with every Workload API message, DER bytes",
            crl_bytes.clone(),
        );
        let svid_expiry_seconds = FloatGauge::default();
        registry.register(
            "svid_expiry_seconds",
            "Seconds until the soonest-expiring cached X.509-SVID expires",
            svid_expiry_seconds.clone(),
        );
        let audit_write_seconds = Histogram::new(latency_buckets());
        registry.register(
            "audit_write_seconds",
            "Time to append one audit record durably",
            audit_write_seconds.clone(),
        );
        let audit_refusals_suppressed = Counter::default();
        registry.register(
            "audit_refusals_suppressed",
            "Refusals written to the audit trail as a count in a refusals_suppressed record rather than one record each, their uid being past its budget",
            audit_refusals_suppressed.clone(),
        );
        let reloads = Family::<Label, Counter>::default();
        registry.register(
            "reloads",
            "Configuration reloads, by outcome (success, failure)",
            reloads.clone(),
        );
        // 1 from the start, as Prometheus' own: the configuration writ
        // started with was loaded whole, and an alert on 0 must not fire
        // until a reload is refused.
        let last_reload_success = Gauge::default();
        last_reload_success.set(1);
        registry.register(
            "last_reload_success",
            "1 if the configuration in force loaded whole (at start or by the last reload), 0 if the last reload was refused",
            last_reload_success.clone(),
        );
        let last_reload_timestamp_seconds = Gauge::default();
        registry.register(
            "last_reload_timestamp_seconds",
            "Unix time of the last configuration reload attempt",
            last_reload_timestamp_seconds.clone(),
        );
        // Known label values start at zero, so a rate() over the first
        // increment works and dashboards see every series from the start.
        for kind in ["x509", "jwt"] {
            let _ = svids_issued.get_or_create(&[("kind", kind)]);
        }
        for reason in crate::tasks::CompletionReason::ALL {
            let _ = tasks_completed.get_or_create(&[("reason", reason.as_str())]);
        }
        for outcome in ["success", "failure"] {
            let _ = reloads.get_or_create(&[("outcome", outcome)]);
        }
        Metrics {
            registry,
            attestation_seconds,
            svids_issued,
            tasks_active,
            tasks_completed,
            revocations,
            open_streams,
            policy_denials,
            federation_fetches,
            federation_bundle_age_seconds,
            ca_expiry_seconds,
            crl_entries,
            crl_bytes,
            svid_expiry_seconds,
            audit_write_seconds,
            audit_refusals_suppressed,
            reloads,
            last_reload_success,
            last_reload_timestamp_seconds,
        }
    }

    pub fn svid_issued(&self, kind: &'static str) {
        self.svids_issued.get_or_create(&[("kind", kind)]).inc();
    }

    pub fn task_completed(&self, reason: &'static str) {
        self.tasks_completed
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn federation_fetch(&self, trust_domain: &str, success: bool) {
        let outcome = if success { "success" } else { "failure" };
        self.federation_fetches
            .get_or_create(&[
                ("trust_domain", trust_domain.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// Creates a configured trust domain's fetch series at zero.
    pub fn federation_fetch_series(&self, trust_domain: &str) {
        for outcome in ["success", "failure"] {
            let _ = self.federation_fetches.get_or_create(&[
                ("trust_domain", trust_domain.to_owned()),
                ("outcome", outcome.to_owned()),
            ]);
        }
    }

    /// Drops a trust domain's fetch series once it is no longer
    /// configured, so /metrics shows only trust domains writ fetches.
    pub fn drop_federation_fetch_series(&self, trust_domain: &str) {
        for outcome in ["success", "failure"] {
            self.federation_fetches.remove(&[
                ("trust_domain", trust_domain.to_owned()),
                ("outcome", outcome.to_owned()),
            ]);
        }
    }

    pub fn reload(&self, success: bool, now: SystemTime) {
        let outcome = if success { "success" } else { "failure" };
        self.reloads.get_or_create(&[("outcome", outcome)]).inc();
        self.last_reload_success.set(i64::from(success));
        self.last_reload_timestamp_seconds
            .set(unix_seconds(now).try_into().unwrap_or(i64::MAX));
    }

    /// Renders every metric as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error here could only come
        // from a metric's own encoder, and then a partial page is still
        // better than none for a scraper.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// `later - now` in seconds, negative once `later` has passed.
pub fn seconds_until(later: SystemTime, now: SystemTime) -> f64 {
    match later.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// Decrements `open_streams` when a stream ends, however it ends.
pub struct StreamGuard(Gauge);

impl StreamGuard {
    pub fn open(metrics: &Metrics) -> StreamGuard {
        metrics.open_streams.inc();
        StreamGuard(metrics.open_streams.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_removed_trust_domain_leaves_no_fetch_series() {
        let m = Metrics::new();
        m.federation_fetch_series("kept.example");
        m.federation_fetch_series("gone.example");
        m.federation_fetch("gone.example", true);
        m.drop_federation_fetch_series("gone.example");
        let text = m.encode();
        assert!(!text.contains("gone.example"), "{text}");
        assert!(text.contains("trust_domain=\"kept.example\""), "{text}");
    }

    #[test]
    fn counters_and_gauges_show_in_the_exposition() {
        let m = Metrics::new();
        let fresh = m.encode();
        assert_eq!(value_of(&fresh, "writ_last_reload_success"), Some(1.0));
        m.svid_issued("x509");
        m.svid_issued("x509");
        m.svid_issued("jwt");
        m.task_completed("ttl_expired");
        m.federation_fetch("partner.example", false);
        m.policy_denials.inc();
        {
            let _a = StreamGuard::open(&m);
            let _b = StreamGuard::open(&m);
            assert_eq!(m.open_streams.get(), 2);
        }
        m.attestation_seconds.observe(0.002);
        m.reload(false, SystemTime::UNIX_EPOCH + Duration::from_secs(1234));
        let text = m.encode();
        assert_eq!(
            value_of(&text, "writ_svids_issued_total{kind=\"x509\"}"),
            Some(2.0)
        );
        assert_eq!(
            value_of(&text, "writ_svids_issued_total{kind=\"jwt\"}"),
            Some(1.0)
        );
        assert_eq!(
            value_of(&text, "writ_tasks_completed_total{reason=\"ttl_expired\"}"),
            Some(1.0)
        );
        assert_eq!(
            value_of(
                &text,
                "writ_federation_fetches_total{trust_domain=\"partner.example\",outcome=\"failure\"}"
            ),
            Some(1.0)
        );
        assert_eq!(value_of(&text, "writ_policy_denials_total"), Some(1.0));
        assert_eq!(value_of(&text, "writ_open_streams"), Some(0.0));
        assert_eq!(value_of(&text, "writ_attestation_seconds_count"), Some(1.0));
        assert_eq!(value_of(&text, "writ_last_reload_success"), Some(0.0));
        assert_eq!(
            value_of(&text, "writ_last_reload_timestamp_seconds"),
            Some(1234.0)
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn seconds_until_is_signed() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(seconds_until(now + Duration::from_secs(5), now), 5.0);
        assert_eq!(seconds_until(now - Duration::from_secs(5), now), -5.0);
    }
}
