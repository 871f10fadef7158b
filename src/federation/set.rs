//! The bundles writ holds for other trust domains, in memory: exactly one per
//! trust domain (never merged), each stamped with a revision so a stream can
//! tell whether what it last sent is still current.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::bundle::TrustBundle;
use crate::spiffe_id::TrustDomain;

/// Where a federated bundle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleSource {
    /// Set by hand (`writ bundle set`).
    Static,
    /// Fetched from the trust domain's bundle endpoint.
    Fetched,
    /// Read from the configured bootstrap file, not yet replaced by a fetch.
    Bootstrap,
}

impl BundleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleSource::Static => "static",
            BundleSource::Fetched => "fetched",
            BundleSource::Bootstrap => "bootstrap",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "static" => Some(BundleSource::Static),
            "fetched" => Some(BundleSource::Fetched),
            "bootstrap" => Some(BundleSource::Bootstrap),
            _ => None,
        }
    }
}

impl fmt::Display for BundleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One foreign trust domain's bundle, with its Workload API encoding
/// computed once per change rather than once per response.
#[derive(Debug)]
pub struct FederatedBundle {
    pub bundle: TrustBundle,
    /// Concatenated DER of the X.509 authorities.
    pub x509_der: Vec<u8>,
    pub source: BundleSource,
    pub updated_at: SystemTime,
    /// Unique across the whole set and never reused; it changes only when
    /// the authorities do, so a new `spiffe_sequence` alone wakes no one.
    pub revision: u64,
}

#[derive(Default)]
pub struct FederatedBundles {
    bundles: RwLock<Arc<BTreeMap<TrustDomain, Arc<FederatedBundle>>>>,
    last_revision: AtomicU64,
}

impl fmt::Debug for FederatedBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.all().keys()).finish()
    }
}

impl FederatedBundles {
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<Arc<FederatedBundle>> {
        self.all().get(trust_domain).cloned()
    }

    pub fn all(&self) -> Arc<BTreeMap<TrustDomain, Arc<FederatedBundle>>> {
        self.bundles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The bundles held for `trust_domains`, ordered by trust domain, each
    /// once; trust domains without a bundle are skipped.
    pub fn select<'a>(
        &self,
        trust_domains: impl IntoIterator<Item = &'a TrustDomain>,
    ) -> Vec<Arc<FederatedBundle>> {
        let all = self.all();
        let wanted: std::collections::BTreeSet<&TrustDomain> = trust_domains.into_iter().collect();
        wanted
            .into_iter()
            .filter_map(|td| all.get(td).cloned())
            .collect()
    }

    /// Installs `bundle` for its trust domain, replacing any other. Only the
    /// federation manager calls this, after the bundle is on disk.
    pub(crate) fn replace(
        &self,
        bundle: TrustBundle,
        source: BundleSource,
        updated_at: SystemTime,
    ) -> Arc<FederatedBundle> {
        let mut guard = self.bundles.write().unwrap_or_else(|p| p.into_inner());
        let same_authorities = guard.get(&bundle.trust_domain).and_then(|held| {
            held.bundle
                .same_authorities(&bundle)
                .then_some(held.revision)
        });
        let revision = same_authorities
            .unwrap_or_else(|| self.last_revision.fetch_add(1, Ordering::Relaxed) + 1);
        let entry = Arc::new(FederatedBundle {
            x509_der: bundle.x509_der_concat(),
            bundle,
            source,
            updated_at,
            revision,
        });
        let mut next = (**guard).clone();
        next.insert(entry.bundle.trust_domain.clone(), entry.clone());
        *guard = Arc::new(next);
        entry
    }

    pub(crate) fn remove(&self, trust_domain: &TrustDomain) -> Option<Arc<FederatedBundle>> {
        let mut guard = self.bundles.write().unwrap_or_else(|p| p.into_inner());
        if !guard.contains_key(trust_domain) {
            return None;
        }
        let mut next = (**guard).clone();
        let removed = next.remove(trust_domain);
        *guard = Arc::new(next);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::tests::ca_cert;
    use rustls_pki_types::CertificateDer;

    fn bundle(td: &str, certs: Vec<CertificateDer<'static>>, sequence: u64) -> TrustBundle {
        TrustBundle {
            x509_authorities: certs,
            sequence,
            ..TrustBundle::new(TrustDomain::new(td).unwrap())
        }
    }

    #[test]
    fn one_bundle_per_trust_domain_and_revisions_track_authorities() {
        let set = FederatedBundles::default();
        let now = SystemTime::now();
        let (c1, c2) = (ca_cert(), ca_cert());
        let a1 = set.replace(
            bundle("a.test", vec![c1.clone()], 1),
            BundleSource::Bootstrap,
            now,
        );
        let b1 = set.replace(
            bundle("b.test", vec![c2.clone()], 1),
            BundleSource::Fetched,
            now,
        );
        assert_ne!(a1.revision, b1.revision);

        // A new sequence with the same keys keeps the revision.
        let a2 = set.replace(
            bundle("a.test", vec![c1.clone()], 2),
            BundleSource::Fetched,
            now,
        );
        assert_eq!(a2.revision, a1.revision);
        assert_eq!(set.get(&a2.bundle.trust_domain).unwrap().bundle.sequence, 2);

        // New keys replace (never merge) and get a fresh revision.
        let a3 = set.replace(
            bundle("a.test", vec![c2.clone()], 3),
            BundleSource::Fetched,
            now,
        );
        assert!(a3.revision > b1.revision);
        assert_eq!(a3.bundle.x509_authorities, vec![c2.clone()]);
        assert_eq!(a3.x509_der, c2.to_vec());

        let a = TrustDomain::new("a.test").unwrap();
        let b = TrustDomain::new("b.test").unwrap();
        let c = TrustDomain::new("c.test").unwrap();
        let picked = set.select([&c, &b, &a, &b]);
        let names: Vec<_> = picked
            .iter()
            .map(|f| f.bundle.trust_domain.name())
            .collect();
        assert_eq!(names, ["a.test", "b.test"]);

        assert!(set.remove(&a).is_some());
        assert!(set.remove(&a).is_none());
        assert_eq!(set.select([&a, &b]).len(), 1);
    }
}
