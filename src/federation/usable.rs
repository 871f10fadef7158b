//! Whether a foreign bundle would trust anything: the one rule every way a
//! bundle gets in obeys (a fetched document, `writ bundle set`, a bootstrap
//! file), so none of them can leave writ holding, for a trust domain, a
//! bundle that trusts nothing.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bundle::TrustBundle;

/// Why a bundle would trust nothing for its trust domain. Each message
/// reads after "bundle document rejected: " (a fetch) or "bundle for TD
/// refused: " (a bundle set by hand or a bootstrap file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnusableBundle {
    #[error(
        "it holds no authority at all (no x509-svid or jwt-svid key), which would leave nothing to trust for this trust domain"
    )]
    NoAuthority,
    /// Only for a self-serving endpoint, which X.509 authorities alone
    /// authenticate.
    #[error("it holds no X.509 authority, so the next fetch could not be authenticated")]
    NoX509Authority,
    #[error(
        "{}, {}",
        expired_phrase(*.count, *.latest),
        if *.self_serving {
            "so the next fetch could not be authenticated"
        } else {
            "and it holds no JWT authority, so it would authenticate nothing"
        }
    )]
    AllExpired {
        count: usize,
        /// The latest notAfter among them, seconds since the epoch.
        latest: i64,
        self_serving: bool,
    },
}

/// Refuses a bundle that would replace the one held with one that trusts
/// nothing: a peer (or whoever took over its endpoint, or an operator's
/// slip) could otherwise make writ forget the trust domain, and with a
/// self-serving endpoint (`https_spiffe` whose SPIFFE ID is in the trust
/// domain fetched), lose the means to fetch it again. A bundle with no
/// authority, or whose X.509 authorities have all expired while it has no
/// JWT authority; for a self-serving endpoint, one with no unexpired X.509
/// authority, since only those authenticate the next fetch. Authorities
/// not valid yet count as usable: a peer's brand-new root may start a few
/// seconds ahead of this clock, and it soon will be.
pub fn check_usable(
    bundle: &TrustBundle,
    self_serving: bool,
    now: SystemTime,
) -> Result<(), UnusableBundle> {
    if self_serving && bundle.x509_authorities.is_empty() {
        return Err(UnusableBundle::NoX509Authority);
    }
    if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.is_empty() {
        return Err(UnusableBundle::NoAuthority);
    }
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    // Parsing admitted only certificates that parse; one that did not here
    // could authenticate nothing, so it counts as expired.
    let latest = bundle
        .x509_authorities
        .iter()
        .map(|cert| crate::bundle::not_after_unix(cert).unwrap_or(i64::MIN))
        .max();
    match latest {
        Some(latest) if latest < now && (self_serving || bundle.jwt_authorities.is_empty()) => {
            Err(UnusableBundle::AllExpired {
                count: bundle.x509_authorities.len(),
                latest,
                self_serving,
            })
        }
        _ => Ok(()),
    }
}

fn expired_phrase(count: usize, latest: i64) -> String {
    let when = time::OffsetDateTime::from_unix_timestamp(latest)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{latest} s after the epoch"));
    match count {
        1 => format!("its only X.509 authority expired at {when}"),
        n => format!("all {n} of its X.509 authorities have expired, the last at {when}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe_id::TrustDomain;

    /// A CA certificate valid from `from` to `until` (years, January 1st).
    fn ca_valid(from: i32, until: i32) -> rustls_pki_types::CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(until, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    fn bundle_of(
        x509: Vec<rustls_pki_types::CertificateDer<'static>>,
        jwt_keys: usize,
    ) -> TrustBundle {
        let mut bundle = TrustBundle::new(TrustDomain::new("b.test").unwrap());
        bundle.x509_authorities = x509;
        bundle.jwt_authorities = (0..jwt_keys)
            .map(|n| crate::bundle::JwtAuthority {
                key_id: format!("k{n}"),
                public_key_jwk: Default::default(),
            })
            .collect();
        bundle
    }

    #[test]
    fn a_bundle_that_trusts_nothing_is_refused() {
        let now = SystemTime::now();
        let (expired, expired_too) = (ca_valid(2000, 2001), ca_valid(2000, 2002));
        let (current, future) = (ca_valid(2000, 2400), ca_valid(2300, 2400));
        // A self-serving endpoint's refusal says what it would cost.
        assert_eq!(
            check_usable(&bundle_of(vec![], 0), false, now),
            Err(UnusableBundle::NoAuthority)
        );
        assert_eq!(
            check_usable(&bundle_of(vec![], 0), true, now),
            Err(UnusableBundle::NoX509Authority)
        );
        for self_serving in [false, true] {
            let err = check_usable(
                &bundle_of(vec![expired.clone(), expired_too.clone()], 0),
                self_serving,
                now,
            )
            .unwrap_err();
            assert!(
                matches!(err, UnusableBundle::AllExpired { count: 2, .. }),
                "{err:?}"
            );
            assert!(
                err.to_string().contains(
                    "all 2 of its X.509 authorities have expired, the last at 2002-01-01T00:00:00Z"
                ),
                "{err}"
            );
            // One usable authority is enough; so is one not valid yet.
            for usable in [&current, &future] {
                check_usable(
                    &bundle_of(vec![expired.clone(), usable.clone()], 0),
                    self_serving,
                    now,
                )
                .unwrap();
            }
        }
        // JWT keys still authenticate JWT-SVIDs, but a self-serving endpoint
        // needs an X.509 authority to be fetched from again.
        check_usable(&bundle_of(vec![], 1), false, now).unwrap();
        check_usable(&bundle_of(vec![expired.clone()], 1), false, now).unwrap();
        assert_eq!(
            check_usable(&bundle_of(vec![], 1), true, now),
            Err(UnusableBundle::NoX509Authority)
        );
        let err = check_usable(&bundle_of(vec![expired.clone()], 1), true, now).unwrap_err();
        assert!(
            err.to_string().contains("only X.509 authority expired at 2001-01-01T00:00:00Z, so the next fetch could not be authenticated"),
            "{err}"
        );
        let err = check_usable(&bundle_of(vec![expired], 0), false, now).unwrap_err();
        assert_eq!(
            err.to_string(),
            "its only X.509 authority expired at 2001-01-01T00:00:00Z, and it holds no JWT authority, so it would authenticate nothing"
        );
    }
}
