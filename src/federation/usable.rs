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
    /// None valid now, and some only from a time further ahead than
    /// `NOT_YET_VALID_ALLOWANCE`.
    #[error(
        "none of its {count} X.509 {} is valid now; the earliest to become valid does so at {}, {}",
        if *.count == 1 { "authority" } else { "authorities" },
        rfc3339(*.earliest),
        if *.self_serving {
            "so the next fetch could not be authenticated"
        } else {
            "and it holds no JWT authority, so it would authenticate nothing"
        }
    )]
    NotValidYet {
        count: usize,
        /// The earliest notBefore still ahead, seconds since the epoch.
        earliest: i64,
        self_serving: bool,
    },
}

/// How far ahead of this clock an authority's notBefore may lie and the
/// authority still count as valid now: a peer's brand-new root may start
/// ahead of this clock by the two hosts' skew. SPIRE backdates its roots'
/// notBefore by 10 s for the same reason.
pub const NOT_YET_VALID_ALLOWANCE: i64 = 300;

/// Refuses a bundle that would replace the one held with one that trusts
/// nothing: a peer (or whoever took over its endpoint, or an operator's
/// slip) could otherwise make writ forget the trust domain, and with a
/// self-serving endpoint (`https_spiffe` whose SPIFFE ID is in the trust
/// domain fetched), lose the means to fetch it again. A bundle with no
/// authority, or with no X.509 authority valid now while it has no JWT
/// authority; for a self-serving endpoint, one with no X.509 authority
/// valid now, since only those authenticate the next fetch. Valid now
/// allows a notBefore up to `NOT_YET_VALID_ALLOWANCE` ahead.
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
    if bundle.x509_authorities.is_empty() || !(self_serving || bundle.jwt_authorities.is_empty()) {
        return Ok(());
    }
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    // Parsing admitted only certificates that parse; one that did not here
    // could authenticate nothing, so it counts as expired.
    let validities: Vec<(i64, i64)> = bundle
        .x509_authorities
        .iter()
        .map(|cert| crate::bundle::validity_unix(cert).unwrap_or((i64::MAX, i64::MIN)))
        .collect();
    let valid_now = |(from, until): &(i64, i64)| {
        *from <= now.saturating_add(NOT_YET_VALID_ALLOWANCE) && now <= *until
    };
    if validities.iter().any(valid_now) {
        return Ok(());
    }
    let count = validities.len();
    let ahead = validities
        .iter()
        .filter(|(from, until)| now <= *until && *from != i64::MAX)
        .map(|(from, _)| *from)
        .min();
    Err(match ahead {
        Some(earliest) => UnusableBundle::NotValidYet {
            count,
            earliest,
            self_serving,
        },
        None => UnusableBundle::AllExpired {
            count,
            latest: validities
                .iter()
                .map(|(_, until)| *until)
                .max()
                .unwrap_or(i64::MIN),
            self_serving,
        },
    })
}

fn rfc3339(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{at} s after the epoch"))
}

fn expired_phrase(count: usize, latest: i64) -> String {
    let when = rfc3339(latest);
    match count {
        1 => format!("its only X.509 authority expired at {when}"),
        n => format!("all {n} of its X.509 authorities have expired, the last at {when}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe_id::TrustDomain;

    use crate::federation::tests::ca_valid_between;

    /// A CA certificate valid from `from` to `until` (years, January 1st).
    fn ca_valid(from: i32, until: i32) -> rustls_pki_types::CertificateDer<'static> {
        ca_valid_between(
            rcgen::date_time_ymd(from, 1, 1),
            rcgen::date_time_ymd(until, 1, 1),
        )
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
            // One authority valid now is enough, beside any number that
            // are not.
            check_usable(
                &bundle_of(vec![expired.clone(), future.clone(), current.clone()], 0),
                self_serving,
                now,
            )
            .unwrap();
            // Valid only centuries from now, it authenticates nothing today.
            let err = check_usable(
                &bundle_of(vec![expired.clone(), future.clone()], 0),
                self_serving,
                now,
            )
            .unwrap_err();
            assert!(
                matches!(err, UnusableBundle::NotValidYet { count: 2, .. }),
                "{err:?}"
            );
            assert!(
                err.to_string().starts_with(
                    "none of its 2 X.509 authorities is valid now; the earliest to become valid does so at 2300-01-01T00:00:00Z, "
                ),
                "{err}"
            );
        }
        // A root whose notBefore is a little ahead of this clock (the
        // peer's runs ahead) counts as valid now.
        let soon = ca_valid_between(
            time::OffsetDateTime::now_utc() + time::Duration::seconds(60),
            rcgen::date_time_ymd(2400, 1, 1),
        );
        check_usable(&bundle_of(vec![soon], 0), true, now).unwrap();
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
