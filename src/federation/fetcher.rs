//! One poller per configured foreign trust domain: fetch its bundle endpoint
//! at the refresh hint, validate the document strictly, and hand a good one
//! to the federation manager. Anything wrong keeps the last good bundle and
//! backs off; the schedule is plain arithmetic so tests can check it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use tokio::sync::watch;

use super::client::{self, FetchError, ServerAuth};
use super::manager::Federation;
use super::url::EndpointUrl;
use super::usable::{UnusableBundle, check_usable};
use crate::bundle::{BundleError, TrustBundle};
use crate::config::{EndpointClientProfile, FederatedTrustDomainConfig};
use crate::spiffe_id::TrustDomain;

/// Poll interval when the document carries no refresh hint (the spec's
/// recommendation).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Longest poll interval whatever a peer asks for, so a typo'd hint of a
/// year cannot silently stop refreshes (and `Instant + hint` stays sane).
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum FetchFailure {
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("bundle document rejected: {0}")]
    Rejected(#[from] BundleError),
    /// The document would trust nothing (see `check_usable`).
    #[error("bundle document rejected: {0}")]
    Unusable(#[from] UnusableBundle),
    #[error(
        "bundle document rejected: it does not authenticate the certificate the endpoint ({endpoint_id}) presented ({reason}), so the next fetch would fail"
    )]
    WouldLockOut { endpoint_id: String, reason: String },
    #[error("no bundle held for {0} to authenticate the endpoint's SVID with")]
    NoTrustBundle(TrustDomain),
    #[error("storing the fetched bundle: {0}")]
    Store(String),
}

/// How long to wait before the next poll: the refresh hint (default five
/// minutes) clamped to `[floor, MAX_POLL_INTERVAL]`.
pub fn poll_interval(hint: Option<Duration>, floor: Duration) -> Duration {
    hint.unwrap_or(DEFAULT_REFRESH)
        .min(MAX_POLL_INTERVAL)
        .max(floor)
}

/// Retry timing: after a failure wait `floor`, then twice that, and so on,
/// never longer than the regular poll interval; a success starts over.
#[derive(Debug, Clone)]
pub struct Schedule {
    floor: Duration,
    failures: u32,
}

impl Schedule {
    pub fn new(floor: Duration) -> Self {
        Self { floor, failures: 0 }
    }

    pub fn after_success(&mut self, hint: Option<Duration>) -> Duration {
        self.failures = 0;
        poll_interval(hint, self.floor)
    }

    pub fn after_failure(&mut self, hint: Option<Duration>) -> Duration {
        let cap = poll_interval(hint, self.floor);
        let backoff = self
            .floor
            .saturating_mul(2u32.saturating_pow(self.failures.min(20)));
        self.failures = self.failures.saturating_add(1);
        backoff.min(cap)
    }
}

/// Polls `td` until `stop` (writ stops) or `retire` (the trust domain was
/// removed or changed on reload) turns true. The first fetch happens at
/// once. A fetch in flight is abandoned when either turns; storing a
/// fetched bundle is not, so the store and the served set never disagree.
pub(super) async fn run(
    federation: Arc<Federation>,
    td: FederatedTrustDomainConfig,
    web_roots: Option<Arc<RootCertStore>>,
    min_refresh_interval: Duration,
    mut stop: watch::Receiver<bool>,
    mut retire: watch::Receiver<bool>,
) {
    let url = match EndpointUrl::parse(&td.url) {
        Ok(url) => url,
        Err(e) => {
            // Config validation parsed it already; this cannot happen.
            tracing::error!(trust_domain = %td.name, error = %e, "bundle endpoint URL is invalid; not fetching");
            return;
        }
    };
    let mut schedule = Schedule::new(min_refresh_interval);
    loop {
        let attempt_at = SystemTime::now();
        let fetched = tokio::select! {
            fetched = fetch_document(&federation, &td, &url, web_roots.as_ref()) => fetched,
            _ = ended(&mut stop, &mut retire) => return,
        };
        let outcome = match fetched {
            Ok(bundle) => install(&federation, bundle).await,
            Err(e) => Err(e),
        };
        let (delay, error) = match outcome {
            Ok(hint) => (schedule.after_success(hint), None),
            Err(e) => {
                let held_hint = federation
                    .agent()
                    .federated_bundles()
                    .get(&td.name)
                    .and_then(|held| held.bundle.refresh_hint);
                let delay = schedule.after_failure(held_hint);
                tracing::warn!(
                    trust_domain = %td.name,
                    url = %url,
                    error = %e,
                    retry_in_secs = delay.as_secs_f64(),
                    "fetching the federated bundle failed; keeping the last good bundle"
                );
                (delay, Some(e.to_string()))
            }
        };
        federation.record_attempt(&td.name, attempt_at, error, attempt_at + delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ended(&mut stop, &mut retire) => return,
        }
    }
}

/// Resolves once either signal turns true or its sender is gone.
async fn ended(stop: &mut watch::Receiver<bool>, retire: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        _ = retire.wait_for(|s| *s) => {}
    }
}

/// One fetch; returns the refresh hint of the bundle it installed.
#[cfg(test)]
pub(super) async fn fetch_once(
    federation: &Federation,
    td: &FederatedTrustDomainConfig,
    url: &EndpointUrl,
    web_roots: Option<&Arc<RootCertStore>>,
) -> Result<Option<Duration>, FetchFailure> {
    let bundle = fetch_document(federation, td, url, web_roots).await?;
    install(federation, bundle).await
}

/// Fetches and checks the document; changes nothing.
async fn fetch_document(
    federation: &Federation,
    td: &FederatedTrustDomainConfig,
    url: &EndpointUrl,
    web_roots: Option<&Arc<RootCertStore>>,
) -> Result<TrustBundle, FetchFailure> {
    let (auth, self_serving) = match &td.profile {
        EndpointClientProfile::HttpsSpiffe { endpoint_spiffe_id } => {
            let endpoint_td = endpoint_spiffe_id.trust_domain();
            // The latest bundle held, not the bootstrap one, so the peer's
            // CA can rotate without anyone touching this side.
            let authorities = federation
                .authorities_of(endpoint_td)
                .ok_or_else(|| FetchFailure::NoTrustBundle(endpoint_td.clone()))?;
            (
                ServerAuth::Spiffe {
                    endpoint_id: endpoint_spiffe_id.clone(),
                    authorities,
                },
                endpoint_td == &td.name,
            )
        }
        EndpointClientProfile::HttpsWeb { .. } => {
            let roots = web_roots
                .cloned()
                .unwrap_or_else(|| Arc::new(RootCertStore::empty()));
            (ServerAuth::Web { roots }, false)
        }
    };
    let fetched = client::fetch(url, &auth, td.follow_redirects).await?;
    let bundle = TrustBundle::from_spiffe_json(td.name.clone(), &fetched.body)?;
    check_usable(&bundle, self_serving, SystemTime::now())?;
    if self_serving && let ServerAuth::Spiffe { endpoint_id, .. } = &auth {
        check_authenticates_endpoint(&bundle, endpoint_id, &fetched.presented)?;
    }
    tracing::debug!(trust_domain = %td.name, sequence = bundle.sequence, "fetched federated bundle");
    // Accepted all the same: the document is authenticated, and a peer
    // restored from a backup legitimately goes back. Worth a look, though.
    if let Some(held) = federation.agent().federated_bundles().get(&td.name)
        && held.source == super::BundleSource::Fetched
        && bundle.sequence < held.bundle.sequence
    {
        tracing::warn!(
            trust_domain = %td.name,
            held = held.bundle.sequence,
            fetched = bundle.sequence,
            "the peer's spiffe_sequence went backwards"
        );
    }
    Ok(bundle)
}

/// For an endpoint that serves its own trust domain's bundle: the new
/// document must still authenticate the certificate the endpoint just
/// presented. Each fetch is authenticated with the bundle held, so a
/// document without the root its endpoint signs with (a peer's mistake, or
/// a document forged by whoever holds the endpoint's identity) would make
/// every later fetch fail, and only an operator could repair it. A peer
/// rotating its root publishes the new one first and drops the old one
/// only after its endpoint has moved, so no sound rotation is refused.
fn check_authenticates_endpoint(
    bundle: &TrustBundle,
    endpoint_id: &crate::spiffe_id::SpiffeId,
    presented: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<(), FetchFailure> {
    let refused = |reason: String| FetchFailure::WouldLockOut {
        endpoint_id: endpoint_id.to_string(),
        reason,
    };
    let Some((leaf, intermediates)) = presented.split_first() else {
        return Err(refused("the endpoint presented no certificate".into()));
    };
    let tls = crate::tls::SpiffeTls::new();
    let mut trust = crate::tls::TrustStore::default();
    trust.bundles.insert(
        endpoint_id.trust_domain().clone(),
        bundle.x509_authorities.clone(),
    );
    tls.set_trust(trust);
    let id = tls
        .verify_peer(
            leaf,
            intermediates,
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::server_auth(),
        )
        .map_err(|e| refused(e.to_string()))?;
    if &id != endpoint_id {
        return Err(refused(format!("the certificate is {id}'s")));
    }
    Ok(())
}

/// Stores and serves a checked document; returns its refresh hint.
async fn install(
    federation: &Federation,
    bundle: TrustBundle,
) -> Result<Option<Duration>, FetchFailure> {
    let hint = bundle.refresh_hint;
    federation
        .install_fetched(bundle)
        .await
        .map_err(|e| FetchFailure::Store(e.to_string()))?;
    Ok(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn polls_at_the_hint_within_bounds() {
        assert_eq!(poll_interval(None, S(30)), S(300));
        assert_eq!(poll_interval(Some(S(60)), S(30)), S(60));
        assert_eq!(poll_interval(Some(S(1)), S(30)), S(30));
        assert_eq!(poll_interval(Some(S(0)), S(30)), S(30));
        assert_eq!(poll_interval(Some(S(u64::MAX)), S(30)), MAX_POLL_INTERVAL);
        // A floor above the cap wins: the operator asked for it.
        assert_eq!(poll_interval(Some(S(10)), S(2 * 86_400)), S(2 * 86_400));
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_poll_interval() {
        let mut s = Schedule::new(S(30));
        let hint = Some(S(300));
        let waits: Vec<_> = (0..6).map(|_| s.after_failure(hint)).collect();
        assert_eq!(waits, [S(30), S(60), S(120), S(240), S(300), S(300)]);
        assert_eq!(s.after_success(hint), S(300));
        assert_eq!(s.after_failure(hint), S(30), "a success resets the backoff");

        // Without any hint the cap is the five-minute default.
        let mut s = Schedule::new(S(1));
        let waits: Vec<_> = (0..12).map(|_| s.after_failure(None)).collect();
        assert_eq!(waits[..4], [S(1), S(2), S(4), S(8)]);
        assert_eq!(*waits.last().unwrap(), S(300));

        // Many failures never overflow.
        let mut s = Schedule::new(S(30));
        for _ in 0..100 {
            assert!(s.after_failure(None) <= S(300));
        }
    }
}
