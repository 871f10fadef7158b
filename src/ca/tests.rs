//! Tests of the CA with real keys, files and rustls-webpki path validation;
//! time is injected so rotation schedules run in milliseconds.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::*;
use crate::svid::verify_chain;

const HOUR: Duration = Duration::from_secs(3600);
const SECOND: Duration = Duration::from_secs(1);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn t0() -> SystemTime {
    // A fixed instant keeps the schedule arithmetic readable.
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn settings(dir: &Path) -> CaSettings {
    CaSettings::new(td(), dir.join("ca"))
}

fn request(path: &str, ttl: Duration) -> X509SvidRequest {
    X509SvidRequest {
        spiffe_id: td().spiffe_id(path).unwrap(),
        ttl,
        ends_by: None,
        dns_names: Vec::new(),
    }
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).unwrap().1
}

fn ski(der: &[u8]) -> Vec<u8> {
    parse(der)
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap()
}

fn aki(der: &[u8]) -> Vec<u8> {
    parse(der)
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                k.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn minted_svid_conforms_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let mut req = request("/agent/researcher", HOUR);
    req.dns_names = vec!["svc.example.org".into()];
    let svid = ca.mint_x509_svid(&req, t0()).unwrap();

    let leaf = svid.leaf().unwrap();
    assert_eq!(svid::check_leaf_conformance(leaf).unwrap(), req.spiffe_id);
    assert_eq!(svid.cert_chain.len(), 1, "own mode: the root is not sent");
    verify_chain(&svid.cert_chain, &ca.x509_authorities(), t0()).unwrap();

    let parsed = parse(leaf);
    assert_eq!(parsed.raw_serial(), svid.serial.as_slice());
    assert_eq!(svid.serial.len(), 16);
    assert_eq!(svid.serial_hex(), hex::encode(parsed.raw_serial()));
    assert_eq!(svid.issuer_key_id, ski(&ca.x509_authorities()[0]));
    assert_eq!(aki(leaf), svid.issuer_key_id);
    assert_eq!(svid.issuer_key_id, ca.active_key_id());
    assert_eq!(unix(svid.not_before), unix(t0()) - 10);
    assert_eq!(unix(svid.not_after), unix(t0()) + 3600);
    assert_eq!(
        parsed.validity().not_before.timestamp() as u64,
        unix(svid.not_before)
    );
    assert_eq!(
        parsed.validity().not_after.timestamp() as u64,
        unix(svid.not_after)
    );
    assert_eq!(svid.chain_der_concat(), leaf.to_vec());

    // The private key handed out is the leaf's.
    let key = KeyPair::try_from(svid.private_key_pkcs8_der()).unwrap();
    assert_eq!(
        key.public_key_raw(),
        parsed.public_key().subject_public_key.data.as_ref()
    );

    // SVIDs are not valid before notBefore or after notAfter.
    assert!(verify_chain(&svid.cert_chain, &ca.x509_authorities(), t0() - HOUR).is_err());
    assert!(verify_chain(&svid.cert_chain, &ca.x509_authorities(), t0() + 2 * HOUR).is_err());
}

#[test]
fn root_certificate_follows_the_signing_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let roots = ca.x509_authorities();
    assert_eq!(roots.len(), 1);
    let id = svid::check_signing_cert_conformance(&roots[0]).unwrap();
    assert_eq!(id.unwrap().to_string(), "spiffe://example.org");
    let root = parse(&roots[0]);
    assert!(root.name_constraints().unwrap().is_none());
    let usage = root.key_usage().unwrap().unwrap();
    assert!(usage.critical && usage.value.key_cert_sign() && usage.value.crl_sign());
    assert!(!usage.value.digital_signature());
    assert_eq!(root.subject(), root.issuer());
    let cn = root.subject().iter_common_name().next().unwrap();
    assert!(cn.as_str().unwrap().starts_with("writ CA example.org "));
    assert_eq!(root.raw_serial().len(), 16);
    assert_eq!(
        root.validity().not_after.timestamp() as u64,
        unix(t0() + DEFAULT_CA_TTL)
    );
    root.verify_signature(None).unwrap();
}

#[test]
fn every_svid_gets_a_fresh_key_and_serial() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let req = request("/a", HOUR);
    let one = ca.mint_x509_svid(&req, t0()).unwrap();
    let two = ca.mint_x509_svid(&req, t0()).unwrap();
    assert_ne!(one.serial, two.serial);
    assert_ne!(one.private_key_pkcs8_der(), two.private_key_pkcs8_der());
    let pk = |s: &X509Svid| {
        parse(s.leaf().unwrap())
            .public_key()
            .subject_public_key
            .data
            .to_vec()
    };
    assert_ne!(pk(&one), pk(&two));
}

#[test]
fn not_after_is_clamped_to_the_signer() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let svid = ca
        .mint_x509_svid(&request("/a", 100 * DEFAULT_CA_TTL), t0())
        .unwrap();
    assert_eq!(svid.not_after, ca.active_not_after());
    verify_chain(&svid.cert_chain, &ca.x509_authorities(), t0()).unwrap();

    // Without a rotate(), a signer past its end refuses rather than minting
    // an SVID that is born expired.
    let late = ca.active_not_after() + Duration::from_secs(1);
    assert!(matches!(
        ca.mint_x509_svid(&request("/a", HOUR), late),
        Err(CaError::SignerExpired { .. })
    ));
}

#[test]
fn credentials_end_on_the_whole_second_of_the_exact_end() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    // A task ending 1.5 s after x.9 s ends at x+2.4 s: its certificate must
    // run to x+2 (never past the task), not to x+1, 0.1 s after it is
    // signed, which had it rotated again at once.
    let now = t0() + Duration::from_millis(900);
    let task_end = now + Duration::from_millis(1500);
    let capped_x509 = X509SvidRequest {
        ends_by: Some(task_end),
        ..request("/a", HOUR)
    };
    let svid = ca.mint_x509_svid(&capped_x509, now).unwrap();
    assert_eq!(svid.not_after, t0() + Duration::from_secs(2));
    let leaf_not_after = parse(svid.leaf().unwrap()).validity().not_after.timestamp();
    assert_eq!(leaf_not_after as u64, unix(t0()) + 2);
    // A whole-second TTL from a whole second is unchanged.
    let svid = ca.mint_x509_svid(&request("/a", HOUR), t0()).unwrap();
    assert_eq!(svid.not_after, t0() + HOUR);
    // Tokens end the same way.
    let capped = JwtSvidRequest {
        ends_by: Some(task_end),
        ..jwt_request("/a", HOUR)
    };
    let token = ca.mint_jwt_svid(&capped, now).unwrap();
    assert_eq!(token.expires_at, t0() + Duration::from_secs(2));
    // At x+1.3 s the task's last whole second leaves 0.7 s: nothing.
    let late = t0() + Duration::from_millis(1300);
    assert!(matches!(
        ca.mint_x509_svid(&capped_x509, late),
        Err(CaError::TtlTooShort)
    ));
    assert!(matches!(
        ca.mint_jwt_svid(&capped, late),
        Err(CaError::TtlTooShort)
    ));
}

#[test]
fn certificates_live_at_least_their_ttl() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    // Signed at x.99 s, a one-second certificate ends at x+2, not at x+1,
    // 10 ms later: rounding down left short TTLs a fraction of themselves
    // and streams re-minting until the next second began.
    let now = t0() + Duration::from_millis(990);
    let svid = ca.mint_x509_svid(&request("/a", SECOND), now).unwrap();
    assert_eq!(svid.not_after, t0() + 2 * SECOND);
    let leaf_not_after = parse(svid.leaf().unwrap()).validity().not_after.timestamp();
    assert_eq!(leaf_not_after as u64, unix(t0()) + 2);
    // A token's exp stays its iat plus its TTL, as relying parties expect
    // (they allow for skew; a stream never re-mints tokens).
    let token = ca.mint_jwt_svid(&jwt_request("/a", SECOND), now).unwrap();
    assert_eq!(token.expires_at, token.issued_at + SECOND);
    // And never more than a second over it.
    let svid = ca
        .mint_x509_svid(&request("/a", 2 * SECOND), t0() + Duration::from_millis(1))
        .unwrap();
    assert_eq!(svid.not_after, t0() + 3 * SECOND);
}

#[test]
fn bad_requests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let foreign = X509SvidRequest {
        spiffe_id: "spiffe://other.org/a".parse().unwrap(),
        ttl: HOUR,
        ends_by: None,
        dns_names: vec![],
    };
    assert!(matches!(
        ca.mint_x509_svid(&foreign, t0()),
        Err(CaError::ForeignTrustDomain(..))
    ));
    let root_id = X509SvidRequest {
        spiffe_id: "spiffe://example.org".parse().unwrap(),
        ttl: HOUR,
        ends_by: None,
        dns_names: vec![],
    };
    assert!(matches!(
        ca.mint_x509_svid(&root_id, t0()),
        Err(CaError::LeafWithoutPath(_))
    ));
    assert!(matches!(
        ca.mint_x509_svid(&request("/a", Duration::from_millis(500)), t0()),
        Err(CaError::TtlTooShort)
    ));
    let mut bad_dns = request("/a", HOUR);
    bad_dns.dns_names = vec!["bad name".into()];
    assert!(matches!(
        ca.mint_x509_svid(&bad_dns, t0()),
        Err(CaError::InvalidDnsName(_))
    ));
}

#[test]
fn state_is_reused_across_restarts_with_private_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let first = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let second = CertificateAuthority::load_or_create(settings(tmp.path()), t0() + HOUR).unwrap();
    assert_eq!(first.x509_authorities(), second.x509_authorities());
    assert_eq!(first.active_key_id(), second.active_key_id());

    // An SVID from the first instance verifies against the second's bundle.
    let svid = first.mint_x509_svid(&request("/a", HOUR), t0()).unwrap();
    verify_chain(
        &svid.cert_chain,
        &second.x509_authorities(),
        t0() + HOUR / 2,
    )
    .unwrap();

    let dir = tmp.path().join("ca");
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut keys = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        assert!(!name.starts_with('.'), "temp file left behind: {name}");
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
        if name.ends_with(".key.pem") {
            keys += 1;
        }
    }
    assert_eq!(keys, 2, "one root key and one JWT key");
}

/// The key file of the only root (JWT keys sit beside it as `jwt-*`).
fn only_key_file(dir: &Path) -> std::path::PathBuf {
    let mut roots = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("x509-") && name.ends_with(".key.pem")
        });
    let root = roots.next().unwrap();
    assert!(roots.next().is_none(), "more than one root key");
    root
}

#[test]
fn corrupt_key_file_is_an_error_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let dir = tmp.path().join("ca");
    let key_path = only_key_file(&dir);
    let state_before = fs::read(dir.join("state.json")).unwrap();

    let garbage = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    fs::write(&key_path, garbage).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(
        matches!(err, CaError::CorruptState { ref path, .. } if *path == key_path),
        "{err}"
    );
    assert_eq!(fs::read(&key_path).unwrap(), garbage);
    assert_eq!(fs::read(dir.join("state.json")).unwrap(), state_before);

    // A valid key that is not the root's is just as wrong.
    fs::write(&key_path, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");

    let good_key = fs::read(&key_path).unwrap();
    fs::remove_file(&key_path).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(matches!(err, CaError::Io { .. }), "{err}");
    assert_eq!(fs::read(dir.join("state.json")).unwrap(), state_before);

    // Losing state.json while keys remain must not start a new root.
    fs::write(&key_path, &good_key).unwrap();
    fs::remove_file(dir.join("state.json")).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(err.to_string().contains("key files are present"), "{err}");
    assert!(!dir.join("state.json").exists());
    assert_eq!(fs::read(&key_path).unwrap(), good_key);
}

#[test]
fn corrupt_or_foreign_state_is_an_error_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let state_path = tmp.path().join("ca/state.json");
    let good = fs::read(&state_path).unwrap();

    let mut other = settings(tmp.path());
    other.trust_domain = TrustDomain::new("other.org").unwrap();
    let err = CertificateAuthority::load_or_create(other, t0()).unwrap_err();
    assert!(err.to_string().contains("belongs to trust domain"), "{err}");

    fs::write(&state_path, &good[..good.len() / 2]).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(matches!(err, CaError::CorruptState { .. }), "{err}");
    assert_eq!(fs::read(&state_path).unwrap(), &good[..good.len() / 2]);

    let text = String::from_utf8(good.clone()).unwrap();
    fs::write(&state_path, text.replace("\"active\"", "\"retired\"")).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(err.to_string().contains("one active"), "{err}");

    fs::write(&state_path, &good).unwrap();
    let key_path = only_key_file(&tmp.path().join("ca"));
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o640)).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(matches!(err, CaError::InsecurePermissions { .. }), "{err}");
}

#[test]
fn settings_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(tmp.path());
    s.ca_ttl = HOUR;
    s.svid_ttl = HOUR;
    assert!(matches!(
        CertificateAuthority::load_or_create(s, t0()),
        Err(CaError::InvalidSettings(_))
    ));
    assert!(!tmp.path().join("ca").exists());
}

/// Key ids of the published roots.
fn published(ca: &CertificateAuthority) -> Vec<Vec<u8>> {
    ca.x509_authorities().iter().map(|c| ski(c)).collect()
}

#[test]
fn rotation_schedule_with_injected_time() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let mut ca = CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    let root_a = ca.active_key_id().to_vec();
    let a_not_after = ca.active_not_after();
    // Root A: notBefore t0-10s, notAfter t0+24h, so life L = 24h+10s.
    let life = DEFAULT_CA_TTL + Duration::from_secs(10);
    let a_not_before = t0() - Duration::from_secs(10);
    let half = a_not_before + life / 2;
    let five_sixths = a_not_before + life * 5 / 6;
    assert_eq!(ca.next_rotation_at(), half);

    // Before half-life: nothing.
    let out = ca.rotate(half - Duration::from_secs(1)).unwrap();
    assert_eq!(out, RotationOutcome::default());
    assert_eq!(published(&ca), vec![root_a.clone()]);

    // At half-life: the next root is published, A still signs. The JWT key
    // made with root A follows the same schedule.
    let old_svid = ca.mint_x509_svid(&request("/a", HOUR), half).unwrap();
    let out = ca.rotate(half).unwrap();
    assert_eq!(
        out,
        RotationOutcome {
            authorities_changed: true,
            signer_changed: false,
            jwt_authorities_changed: true,
            ..RotationOutcome::default()
        }
    );
    let pub_b = published(&ca);
    assert_eq!(pub_b.len(), 2);
    assert_eq!(pub_b[0], root_a);
    let root_b = pub_b[1].clone();
    assert_eq!(ca.active_key_id(), root_a);
    assert_eq!(ca.next_rotation_at(), five_sixths);
    let reloaded = CertificateAuthority::load_or_create(s.clone(), half).unwrap();
    assert_eq!(reloaded.x509_authorities(), ca.x509_authorities());
    assert_eq!(reloaded.active_key_id(), root_a);
    let svid = ca.mint_x509_svid(&request("/a", HOUR), half).unwrap();
    assert_eq!(svid.issuer_key_id, root_a);

    // At 5/6: B signs; A stays published (its SVIDs are still live).
    let out = ca.rotate(five_sixths).unwrap();
    assert_eq!(
        out,
        RotationOutcome {
            authorities_changed: false,
            signer_changed: true,
            jwt_authorities_changed: false,
            ..RotationOutcome::default()
        }
    );
    assert_eq!(ca.active_key_id(), root_b);
    assert_eq!(published(&ca), pub_b);
    let new_svid = ca
        .mint_x509_svid(&request("/a", HOUR), five_sixths)
        .unwrap();
    assert_eq!(new_svid.issuer_key_id, root_b);
    let b_only: Vec<_> = ca.x509_authorities()[1..].to_vec();
    let a_only: Vec<_> = ca.x509_authorities()[..1].to_vec();
    verify_chain(&new_svid.cert_chain, &b_only, five_sixths).unwrap();
    assert!(verify_chain(&new_svid.cert_chain, &a_only, five_sixths).is_err());
    let reloaded = CertificateAuthority::load_or_create(s.clone(), five_sixths).unwrap();
    assert_eq!(reloaded.active_key_id(), root_b);
    assert_eq!(reloaded.x509_authorities(), ca.x509_authorities());
    // Retired roots keep their keys (CRLs) until they expire.
    let revoked = [RevokedCert {
        serial: old_svid.serial.clone(),
        issuer_key_id: root_a.clone(),
        revoked_at: five_sixths,
    }];
    assert_eq!(
        reloaded
            .sign_crls(&revoked.iter().collect::<Vec<_>>(), 1, HOUR, five_sixths)
            .unwrap()
            .len(),
        1
    );

    // A is dropped (with its key file) once it expires; by then B has
    // prepared its own successor.
    let mut now = five_sixths;
    while now < a_not_after {
        now = ca.next_rotation_at();
        ca.rotate(now).unwrap();
    }
    assert!(!published(&ca).contains(&root_a));
    assert!(published(&ca).contains(&root_b));
    let key_a = tmp
        .path()
        .join(format!("ca/x509-{}.key.pem", hex::encode(&root_a)));
    assert!(!key_a.exists());
    let reloaded = CertificateAuthority::load_or_create(s, now).unwrap();
    assert_eq!(reloaded.x509_authorities(), ca.x509_authorities());
}

#[test]
fn rotation_invariants_over_many_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(tmp.path());
    s.ca_ttl = 6 * HOUR;
    s.svid_ttl = HOUR;
    let mut ca = CertificateAuthority::load_or_create(s, t0()).unwrap();
    let mut ever_published: HashSet<Vec<u8>> = published(&ca).into_iter().collect();
    let mut live: Vec<X509Svid> = Vec::new();
    let mut now = t0();
    let mut signers = HashSet::new();
    for _ in 0..40 {
        // Mint at every event, and halfway to the next.
        for at in [
            now,
            now + (ca
                .next_rotation_at()
                .duration_since(now)
                .unwrap_or_default()
                / 2),
        ] {
            let svid = ca.mint_x509_svid(&request("/w", HOUR), at).unwrap();
            assert!(
                svid.not_after >= at + HOUR && svid.not_after < at + HOUR + SECOND,
                "the active root can always sign a full-length SVID"
            );
            live.push(svid);
        }
        let next = ca.next_rotation_at();
        assert!(next > now, "the schedule always moves forward");
        now = next;
        let before: HashSet<Vec<u8>> = published(&ca).into_iter().collect();
        let out = ca.rotate(now).unwrap();
        let after: HashSet<Vec<u8>> = published(&ca).into_iter().collect();
        assert_eq!(out.authorities_changed, before != after);
        if out.signer_changed {
            assert!(
                before.contains(ca.active_key_id()),
                "a root is published before it signs"
            );
        }
        ever_published.extend(after.iter().cloned());
        signers.insert(ca.active_key_id().to_vec());
        // Every SVID still within its validity keeps verifying.
        live.retain(|svid| svid.not_after > now);
        for svid in &live {
            verify_chain(&svid.cert_chain, &ca.x509_authorities(), now).unwrap();
        }
        assert!(ca.x509_authorities().len() <= 3);
    }
    assert!(signers.len() >= 5, "several generations were exercised");
    // Only the keys of held roots and JWT keys remain on disk.
    let key_files = key_files(tmp.path());
    assert_eq!(
        key_files,
        ca.x509_authorities().len() + ca.jwt_authorities().len()
    );
}

#[test]
fn restart_after_everything_expired_starts_a_new_root() {
    let tmp = tempfile::tempdir().unwrap();
    let first = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let much_later = t0() + 10 * DEFAULT_CA_TTL;
    let second = CertificateAuthority::load_or_create(settings(tmp.path()), much_later).unwrap();
    assert_ne!(first.active_key_id(), second.active_key_id());
    assert_eq!(second.x509_authorities().len(), 1);
    let svid = second
        .mint_x509_svid(&request("/a", HOUR), much_later)
        .unwrap();
    verify_chain(&svid.cert_chain, &second.x509_authorities(), much_later).unwrap();
}

/// writ was down at half-life and comes back after 5/6 (but while the
/// active root can still sign full SVIDs): the successor it creates now is
/// published first and signs only after a lead, for roots and JWT keys
/// alike; a restart in the middle of that lead keeps to it.
#[test]
fn a_successor_prepared_late_is_published_before_it_signs() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let first = CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    let root_a = first.active_key_id().to_vec();
    let jwt_a = first.active_jwt_key_id().unwrap().to_owned();
    let first_outcome = first.rotated_at_load();
    assert!(!first_outcome.x509_signer_unpublished && !first_outcome.jwt_signer_unpublished);
    drop(first);

    // Root A ends at t0+24h and can sign a full hour until t0+23h; 5/6 of
    // its life is about t0+20h. Back at t0+21h: publish B, keep signing
    // with A until A can no longer sign a full SVID (2 h of lead, less than
    // the 8 h an on-time successor gets, but every SVID stays full length).
    let back = t0() + 21 * HOUR;
    let ca = CertificateAuthority::load_or_create(s.clone(), back).unwrap();
    let out = ca.rotated_at_load();
    assert!(out.authorities_changed && out.jwt_authorities_changed);
    assert!(!out.signer_changed, "the late successor must not sign yet");
    assert!(!out.x509_signer_unpublished && !out.jwt_signer_unpublished);
    assert_eq!(ca.active_key_id(), root_a);
    assert_eq!(ca.active_jwt_key_id(), Some(jwt_a.as_str()));
    let root_b = published(&ca)[1].clone();
    assert_eq!(jwt_kids(&ca).len(), 2);
    let switch = back + 2 * HOUR;
    assert_eq!(ca.next_rotation_at(), switch);
    let svid = ca.mint_x509_svid(&request("/a", HOUR), back).unwrap();
    assert_eq!(svid.issuer_key_id, root_a);
    assert_eq!(svid.not_after, back + HOUR);
    let token = ca.mint_jwt_svid(&jwt_request("/a", HOUR), back).unwrap();
    assert_eq!(token.key_id, jwt_a);
    drop(ca);

    // Killed and restarted in the middle of the lead: the same state, the
    // same switch-over time (it is derived from B's notBefore).
    let mut ca = CertificateAuthority::load_or_create(s.clone(), back + HOUR).unwrap();
    assert_eq!(ca.rotated_at_load(), RotationOutcome::default());
    assert_eq!(ca.active_key_id(), root_a);
    assert_eq!(published(&ca), vec![root_a.clone(), root_b.clone()]);
    assert_eq!(ca.next_rotation_at(), switch);

    assert_eq!(
        ca.rotate(switch - SECOND).unwrap(),
        RotationOutcome::default()
    );
    let out = ca.rotate(switch).unwrap();
    assert!(out.signer_changed && !out.x509_signer_unpublished && !out.jwt_signer_unpublished);
    assert_eq!(ca.active_key_id(), root_b);
    // JWT key A can sign a full 5-minute token for longer, so its
    // successor's lead runs on until then.
    assert_eq!(ca.active_jwt_key_id(), Some(jwt_a.as_str()));
    let jwt_switch = t0() + DEFAULT_CA_TTL - DEFAULT_JWT_SVID_TTL;
    assert_eq!(ca.next_rotation_at(), jwt_switch);
    let out = ca.rotate(jwt_switch).unwrap();
    assert!(!out.jwt_signer_unpublished);
    assert_ne!(ca.active_jwt_key_id(), Some(jwt_a.as_str()));
}

/// Back so late that the active root can no longer sign a full SVID: the
/// successor still waits, for half of what the old root has left, and
/// SVIDs signed meanwhile end with the old root.
#[test]
fn a_successor_prepared_in_the_last_svid_ttl_waits_half_the_time_left() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let root_a = CertificateAuthority::load_or_create(s.clone(), t0())
        .unwrap()
        .active_key_id()
        .to_vec();
    let a_end = t0() + DEFAULT_CA_TTL;
    let back = a_end - 30 * 60 * SECOND;
    let mut ca = CertificateAuthority::load_or_create(s, back).unwrap();
    assert!(!ca.rotated_at_load().signer_changed);
    assert_eq!(ca.active_key_id(), root_a);
    assert_eq!(ca.next_rotation_at(), back + 15 * 60 * SECOND);
    let svid = ca.mint_x509_svid(&request("/a", HOUR), back).unwrap();
    assert_eq!(svid.issuer_key_id, root_a);
    assert_eq!(svid.not_after, a_end, "capped at the old root's notAfter");
    let out = ca.rotate(back + 15 * 60 * SECOND).unwrap();
    assert!(out.signer_changed && !out.x509_signer_unpublished);
}

/// Only a root that expired while writ was down lets an unpublished
/// successor sign at once, and the outcome says so (the caller records
/// it in the audit trail); a first start is not such a case.
#[test]
fn an_unpublished_successor_signs_at_once_only_after_the_active_key_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let first = CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    assert!(!first.rotated_at_load().x509_signer_unpublished);
    let root_a = first.active_key_id().to_vec();
    drop(first);
    let much_later = t0() + DEFAULT_CA_TTL + HOUR;
    let ca = CertificateAuthority::load_or_create(s, much_later).unwrap();
    let out = ca.rotated_at_load();
    assert!(out.signer_changed && out.x509_signer_unpublished && out.jwt_signer_unpublished);
    assert_ne!(ca.active_key_id(), root_a);
    assert_eq!(ca.x509_authorities().len(), 1);
}

/// The CA was made at t0, then run once with the clock two days ahead (the
/// t0 root "expired while down", so a new root was made), then restarted
/// with the clock right: the only root held is not valid for two days. It
/// must not sign: a root valid now takes over at once, unpublished (as
/// after an expiry), and the future root stays published, retired, until
/// it ends. The JWT key, made at the same wrong time, follows suit.
#[test]
fn a_root_dated_in_the_future_is_replaced_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    let ahead = t0() + 2 * DEFAULT_CA_TTL;
    let wrong = CertificateAuthority::load_or_create(s.clone(), ahead).unwrap();
    let future_root = wrong.active_key_id().to_vec();
    let future_jwt = wrong.active_jwt_key_id().unwrap().to_owned();
    drop(wrong);

    let ca = CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    let out = ca.rotated_at_load();
    assert!(out.signer_changed && out.x509_signer_unpublished && out.jwt_signer_unpublished);
    assert_ne!(ca.active_key_id(), future_root);
    assert_ne!(ca.active_jwt_key_id(), Some(future_jwt.as_str()));
    assert!(ca.active_not_before() <= t0());
    assert_eq!(
        published(&ca),
        vec![ca.active_key_id().to_vec(), future_root.clone()],
        "the future root stays published, oldest first"
    );
    assert!(jwt_kids(&ca).contains(&future_jwt));
    let svid = ca.mint_x509_svid(&request("/a", HOUR), t0()).unwrap();
    assert_eq!(svid.issuer_key_id, ca.active_key_id());
    verify_chain(&svid.cert_chain, &ca.x509_authorities(), t0()).unwrap();
    let token = ca.mint_jwt_svid(&jwt_request("/a", HOUR), t0()).unwrap();
    assert_ne!(token.key_id, future_jwt);
    let active = ca.active_key_id().to_vec();
    drop(ca);

    // Settled: a later restart changes nothing, and the retired future
    // root is not brought back.
    let ca = CertificateAuthority::load_or_create(s, t0() + HOUR).unwrap();
    assert_eq!(ca.rotated_at_load(), RotationOutcome::default());
    assert_eq!(ca.active_key_id(), active);
}

/// First started with the clock ahead and kept running past half-life, so
/// both the active root and its prepared successor are dated in the
/// future: neither may sign once the clock is right.
#[test]
fn a_successor_dated_in_the_future_does_not_take_over() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let ahead = t0() + 2 * DEFAULT_CA_TTL;
    let mut wrong = CertificateAuthority::load_or_create(s.clone(), ahead).unwrap();
    wrong.rotate(ahead + 13 * HOUR).unwrap();
    let future = published(&wrong);
    assert_eq!(future.len(), 2, "active and prepared next");
    drop(wrong);

    let ca = CertificateAuthority::load_or_create(s, t0()).unwrap();
    assert!(ca.rotated_at_load().x509_signer_unpublished);
    assert!(!future.contains(&ca.active_key_id().to_vec()));
    assert!(ca.active_not_before() <= t0());
    assert_eq!(published(&ca).len(), 3);
    let svid = ca.mint_x509_svid(&request("/a", HOUR), t0()).unwrap();
    verify_chain(&svid.cert_chain, &ca.x509_authorities(), t0()).unwrap();
}

/// The clock set back while writ runs: a root barely ahead (an NTP step of
/// seconds) keeps signing, since an unpublished replacement would cost
/// federated peers more; one ahead by more than `NOT_BEFORE_ALLOWANCE` is
/// replaced at the next rotation, and refuses to sign until then.
#[test]
fn a_clock_set_back_replaces_the_root_only_beyond_the_allowance() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let root_a = ca.active_key_id().to_vec();
    // notBefore is t0 - 10 s (backdated); 50 s back leaves it 40 s ahead.
    let slightly_back = t0() - 50 * SECOND;
    assert_eq!(
        ca.rotate(slightly_back).unwrap(),
        RotationOutcome::default()
    );
    assert_eq!(ca.active_key_id(), root_a);
    ca.mint_x509_svid(&request("/a", HOUR), slightly_back)
        .unwrap();

    let far_back = t0() - HOUR;
    assert!(matches!(
        ca.mint_x509_svid(&request("/a", HOUR), far_back),
        Err(CaError::SignerNotYetValid { .. })
    ));
    let out = ca.rotate(far_back).unwrap();
    assert!(out.signer_changed && out.x509_signer_unpublished);
    assert_ne!(ca.active_key_id(), root_a);
    let svid = ca.mint_x509_svid(&request("/a", HOUR), far_back).unwrap();
    verify_chain(&svid.cert_chain, &ca.x509_authorities(), far_back).unwrap();
}

#[test]
fn crls_one_per_issuing_ca_signed_by_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    // Long-lived, so they are still valid when the next root takes over.
    let a1 = ca
        .mint_x509_svid(&request("/a", DEFAULT_CA_TTL), t0())
        .unwrap();
    let a2 = ca
        .mint_x509_svid(&request("/b", DEFAULT_CA_TTL), t0())
        .unwrap();
    let kept = ca
        .mint_x509_svid(&request("/c", DEFAULT_CA_TTL), t0())
        .unwrap();
    // Rotate until a different root signs.
    let first_signer = ca.active_key_id().to_vec();
    let mut now = t0();
    while ca.active_key_id() == first_signer {
        now = ca.next_rotation_at();
        ca.rotate(now).unwrap();
    }
    let b1 = ca.mint_x509_svid(&request("/d", HOUR), now).unwrap();
    let revoke = |s: &X509Svid| RevokedCert {
        serial: s.serial.clone(),
        issuer_key_id: s.issuer_key_id.clone(),
        revoked_at: now,
    };
    let mut revoked = vec![revoke(&a1), revoke(&a2), revoke(&b1)];
    revoked.push(RevokedCert {
        serial: vec![0x42; 16],
        issuer_key_id: vec![0xee; 20],
        revoked_at: now,
    });
    let crls = ca
        .sign_crls(&revoked.iter().collect::<Vec<_>>(), 7, HOUR, now)
        .unwrap();
    assert_eq!(
        crls.len(),
        2,
        "one CRL per issuing CA; unknown issuers skipped"
    );

    let roots = ca.x509_authorities();
    for der in &crls {
        let (rest, crl) = CertificateRevocationList::from_der(der).unwrap();
        assert!(rest.is_empty());
        let issuer_cert = roots
            .iter()
            .map(|r| parse(r))
            .find(|r| r.subject().as_raw() == crl.issuer().as_raw())
            .expect("CRL issuer is one of the roots");
        crl.verify_signature(issuer_cert.public_key()).unwrap();
        let issuer_ski = ski(issuer_cert.as_raw());
        let crl_aki = crl
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(k) => {
                    k.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(crl_aki, issuer_ski);
        assert_eq!(crl.crl_number().unwrap().to_u64_digits(), vec![7]);
        assert_eq!(crl.last_update().timestamp() as u64, unix(now));
        assert_eq!(
            crl.next_update().unwrap().timestamp() as u64,
            unix(now) + 3600
        );
        let listed: HashSet<Vec<u8>> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        let want: HashSet<Vec<u8>> = [&a1, &a2, &b1]
            .into_iter()
            .filter(|s| s.issuer_key_id == issuer_ski)
            .map(|s| s.serial.clone())
            .collect();
        assert!(!want.is_empty());
        assert_eq!(listed, want);
        for r in crl.iter_revoked_certificates() {
            assert_eq!(r.revocation_date.timestamp() as u64, unix(now));
        }
    }

    // rustls-webpki, given the CRLs, rejects revoked SVIDs and accepts others.
    let owned: Vec<webpki::CertRevocationList<'_>> = crls
        .iter()
        .map(|c| webpki::OwnedCertRevocationList::from_der(c).unwrap().into())
        .collect();
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = owned.iter().collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let check = |svid: &X509Svid| {
        let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs)
            .unwrap()
            .build();
        let leaf = webpki::EndEntityCert::try_from(svid.leaf().unwrap()).unwrap();
        let at = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(unix(now)));
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            at,
            webpki::KeyUsage::client_auth(),
            Some(revocation),
            None,
        )
        .map(|_| ())
    };
    for gone in [&a1, &a2, &b1] {
        assert_eq!(check(gone), Err(webpki::Error::CertRevoked));
    }
    check(&kept).unwrap();

    assert!(
        ca.sign_crls(&revoked.iter().collect::<Vec<_>>(), 8, HOUR, now)
            .unwrap()
            .len()
            == 2
    );
    assert!(ca.sign_crls(&[], 9, HOUR, now).unwrap().is_empty());
    assert!(matches!(
        ca.sign_crls(&revoked.iter().collect::<Vec<_>>(), 9, Duration::ZERO, now),
        Err(CaError::CrlValidityTooShort)
    ));
}

#[test]
fn debug_output_has_no_key_material() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let key_pem = fs::read_to_string(only_key_file(&tmp.path().join("ca"))).unwrap();
    let body: String = key_pem.lines().nth(1).unwrap().to_owned();
    let dbg = format!("{ca:?}");
    assert!(!dbg.contains(&body), "{dbg}");
    assert!(dbg.contains("example.org"));
}

// ---- upstream mode ----

struct Pki {
    root: rcgen::Certificate,
    root_issuer: rcgen::Issuer<'static, KeyPair>,
}

fn pki() -> Pki {
    pki_with(|_| ())
}

/// `pki()`, with the root's parameters adjusted by `adjust` first.
fn pki_with(adjust: impl FnOnce(&mut CertificateParams)) -> Pki {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Upstream Root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(unix(t0()) as i64 - 86400).unwrap();
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp(unix(t0()) as i64 + 365 * 86400).unwrap();
    adjust(&mut params);
    let key = KeyPair::generate().unwrap();
    let root = params.self_signed(&key).unwrap();
    Pki {
        root,
        root_issuer: rcgen::Issuer::new(params, key),
    }
}

fn intermediate_params(valid_for: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Upstream");
    params
        .distinguished_name
        .push(DnType::CommonName, "writ intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    params.use_authority_key_identifier_extension = true;
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(unix(t0()) as i64 - 3600).unwrap();
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp((unix(t0()) + valid_for.as_secs()) as i64)
            .unwrap();
    params
}

struct UpstreamSetup {
    files: UpstreamCaFiles,
    root_der: CertificateDer<'static>,
    intermediate_der: CertificateDer<'static>,
}

/// Writes a key file as an operator must: readable by its owner alone.
fn write_private_key(path: &Path, pem: &str) {
    fs::write(path, pem).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn write_upstream(
    dir: &Path,
    pki: &Pki,
    params: &CertificateParams,
    key_pem: Option<String>,
) -> UpstreamSetup {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.root_issuer).unwrap();
    let files = UpstreamCaFiles {
        cert: dir.join("intermediate.pem"),
        key: dir.join("intermediate.key"),
        bundle: dir.join("roots.pem"),
    };
    fs::write(&files.cert, cert.pem()).unwrap();
    write_private_key(&files.key, &key_pem.unwrap_or_else(|| key.serialize_pem()));
    fs::write(&files.bundle, pki.root.pem()).unwrap();
    UpstreamSetup {
        files,
        root_der: pki.root.der().clone(),
        intermediate_der: cert.der().clone(),
    }
}

fn upstream_settings(dir: &Path, files: UpstreamCaFiles) -> CaSettings {
    CaSettings {
        upstream: Some(files),
        ..settings(dir)
    }
}

#[test]
fn upstream_mode_chains_through_the_intermediate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki();
    let setup = write_upstream(tmp.path(), &pki, &intermediate_params(12 * HOUR), None);
    let mut ca = CertificateAuthority::load_or_create(
        upstream_settings(tmp.path(), setup.files.clone()),
        t0(),
    )
    .unwrap();
    assert!(ca.is_upstream());
    assert_eq!(ca.x509_authorities(), vec![setup.root_der.clone()]);

    let svid = ca.mint_x509_svid(&request("/a", HOUR), t0()).unwrap();
    assert_eq!(svid.cert_chain.len(), 2);
    assert_eq!(svid.cert_chain[1], setup.intermediate_der);
    assert_eq!(svid.issuer_key_id, ski(&setup.intermediate_der));
    assert_eq!(aki(svid.leaf().unwrap()), svid.issuer_key_id);
    svid::check_leaf_conformance(svid.leaf().unwrap()).unwrap();
    verify_chain(&svid.cert_chain, &ca.x509_authorities(), t0()).unwrap();
    // Without the intermediate the leaf does not verify: it really is in the path.
    assert!(verify_chain(&svid.cert_chain[..1], &ca.x509_authorities(), t0()).is_err());

    // notAfter is clamped to the intermediate's.
    let long = ca.mint_x509_svid(&request("/a", 48 * HOUR), t0()).unwrap();
    assert_eq!(unix(long.not_after), unix(t0()) + 12 * 3600);
    assert_eq!(long.not_after, ca.active_not_after());

    // The intermediate signs CRLs for what it issued.
    let crls = ca
        .sign_crls(
            &[&RevokedCert {
                serial: svid.serial.clone(),
                issuer_key_id: svid.issuer_key_id.clone(),
                revoked_at: t0(),
            }],
            1,
            HOUR,
            t0(),
        )
        .unwrap();
    assert_eq!(crls.len(), 1);
    let (_, crl) = CertificateRevocationList::from_der(&crls[0]).unwrap();
    crl.verify_signature(parse(&setup.intermediate_der).public_key())
        .unwrap();

    assert_eq!(ca.rotate(t0() + HOUR).unwrap(), RotationOutcome::default());
    // Upstream mode keeps JWT keys only: no root of its own.
    let state = fs::read_to_string(tmp.path().join("ca/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["x509_authorities"], serde_json::json!([]));
    assert_eq!(state["jwt_authorities"].as_array().unwrap().len(), 1);
    assert!(!fs::read_dir(tmp.path().join("ca")).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("x509-")
    }));
}

/// An upstream intermediate that is not P-256 signs its CRLs through the
/// general builder; they list the same serials and verify under it.
#[test]
fn a_p384_upstream_intermediate_signs_crls_through_the_general_builder() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cert = intermediate_params(12 * HOUR)
        .signed_by(&key, &pki.root_issuer)
        .unwrap();
    let files = UpstreamCaFiles {
        cert: tmp.path().join("intermediate.pem"),
        key: tmp.path().join("intermediate.key"),
        bundle: tmp.path().join("roots.pem"),
    };
    fs::write(&files.cert, cert.pem()).unwrap();
    write_private_key(&files.key, &key.serialize_pem());
    fs::write(&files.bundle, pki.root.pem()).unwrap();
    let ca =
        CertificateAuthority::load_or_create(upstream_settings(tmp.path(), files), t0()).unwrap();
    let svids: Vec<_> = (0..3)
        .map(|_| ca.mint_x509_svid(&request("/a", HOUR), t0()).unwrap())
        .collect();
    let revoked: Vec<RevokedCert> = svids
        .iter()
        .map(|svid| RevokedCert {
            serial: svid.serial.clone(),
            issuer_key_id: svid.issuer_key_id.clone(),
            revoked_at: t0(),
        })
        .collect();
    let crls = ca
        .sign_crls(&revoked.iter().collect::<Vec<_>>(), 5, HOUR, t0())
        .unwrap();
    assert_eq!(crls.len(), 1);
    let (_, crl) = CertificateRevocationList::from_der(&crls[0]).unwrap();
    crl.verify_signature(parse(cert.der()).public_key())
        .unwrap();
    let listed: Vec<Vec<u8>> = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect();
    let minted: Vec<Vec<u8>> = svids.iter().map(|s| s.serial.clone()).collect();
    assert_eq!(listed, minted);
    assert_eq!(crl.crl_number().map(|n| n.to_string()), Some("5".into()));
}

#[test]
fn upstream_accepts_a_sec1_key() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki();
    // Write the intermediate, then replace its key file with the SEC1 form
    // (curve parameters included, as `openssl ecparam -genkey` writes it).
    let setup = write_upstream(tmp.path(), &pki, &intermediate_params(12 * HOUR), None);
    let pkcs8_pem = fs::read_to_string(&setup.files.key).unwrap();
    let pkcs8 = pem::parse(&pkcs8_pem).unwrap().into_contents();
    let sec1 = pkcs8_to_sec1_with_curve(&pkcs8);
    fs::write(
        &setup.files.key,
        pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1)),
    )
    .unwrap();
    let ca = CertificateAuthority::load_or_create(upstream_settings(tmp.path(), setup.files), t0())
        .unwrap();
    let svid = ca.mint_x509_svid(&request("/a", HOUR), t0()).unwrap();
    verify_chain(&svid.cert_chain, &ca.x509_authorities(), t0()).unwrap();
}

/// Unwraps ring's PKCS#8 and re-inserts the `[0]` curve parameters that
/// OpenSSL's SEC1 output carries.
fn pkcs8_to_sec1_with_curve(pkcs8: &[u8]) -> Vec<u8> {
    use authority::der::{read_tlv, tlv};
    let (_, info, _) = read_tlv(pkcs8).unwrap();
    let (_, _, rest) = read_tlv(info).unwrap();
    let (_, alg, rest) = read_tlv(rest).unwrap();
    let (_, sec1, _) = read_tlv(rest).unwrap();
    let (_, _, curve) = read_tlv(alg).unwrap();
    let (_, body, _) = read_tlv(sec1).unwrap();
    let (_, version, rest) = read_tlv(body).unwrap();
    let (_, private, rest) = read_tlv(rest).unwrap();
    let mut inner = tlv(0x02, version);
    inner.extend(tlv(0x04, private));
    inner.extend(tlv(0xa0, curve));
    inner.extend_from_slice(rest); // [1] publicKey
    tlv(0x30, &inner)
}

/// `writ validate` checks upstream files as a start does, down to a signed
/// SVID, and leaves the state directory alone (it may not even be ours).
#[test]
fn upstream_files_are_checked_without_the_ca_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki();
    let check = |files: UpstreamCaFiles| {
        CertificateAuthority::check_settings(&upstream_settings(tmp.path(), files), t0())
    };
    let good = write_upstream(tmp.path(), &pki, &intermediate_params(12 * HOUR), None);
    check(good.files.clone()).unwrap();
    let wrong_key = write_upstream(
        tmp.path(),
        &pki,
        &intermediate_params(12 * HOUR),
        Some(KeyPair::generate().unwrap().serialize_pem()),
    );
    let err = check(wrong_key.files).unwrap_err().to_string();
    assert!(err.contains("does not belong"), "{err}");
    let missing = UpstreamCaFiles {
        key: tmp.path().join("missing.key"),
        ..good.files
    };
    let err = check(missing).unwrap_err().to_string();
    assert!(err.contains("missing.key"), "{err}");
    assert!(!tmp.path().join("ca").exists());
}

#[test]
fn upstream_files_are_verified_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki();
    let load = |files: UpstreamCaFiles| {
        CertificateAuthority::load_or_create(upstream_settings(tmp.path(), files), t0())
            .unwrap_err()
            .to_string()
    };

    let wrong_key = write_upstream(
        tmp.path(),
        &pki,
        &intermediate_params(12 * HOUR),
        Some(KeyPair::generate().unwrap().serialize_pem()),
    );
    assert!(load(wrong_key.files).contains("does not belong"));

    let mut not_ca = intermediate_params(12 * HOUR);
    not_ca.is_ca = IsCa::ExplicitNoCa;
    assert!(load(write_upstream(tmp.path(), &pki, &not_ca, None).files).contains("cA=true"));

    let mut no_cert_sign = intermediate_params(12 * HOUR);
    no_cert_sign.key_usages = vec![KeyUsagePurpose::CrlSign];
    assert!(
        load(write_upstream(tmp.path(), &pki, &no_cert_sign, None).files).contains("keyCertSign")
    );

    let mut no_crl_sign = intermediate_params(12 * HOUR);
    no_crl_sign.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    assert!(load(write_upstream(tmp.path(), &pki, &no_crl_sign, None).files).contains("cRLSign"));

    let mut expired = intermediate_params(12 * HOUR);
    expired.not_after = time::OffsetDateTime::from_unix_timestamp(unix(t0()) as i64 - 60).unwrap();
    assert!(load(write_upstream(tmp.path(), &pki, &expired, None).files).contains("not valid now"));

    let mut foreign = intermediate_params(12 * HOUR);
    foreign.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://other.org".try_into().unwrap(),
    )];
    assert!(
        load(write_upstream(tmp.path(), &pki, &foreign, None).files)
            .contains("not in trust domain")
    );

    // Signed by a root that is not in the bundle.
    let other = self::pki();
    let setup = write_upstream(tmp.path(), &other, &intermediate_params(12 * HOUR), None);
    fs::write(&setup.files.bundle, pki.root.pem()).unwrap();
    assert!(load(setup.files).contains("does not chain"));

    // A bundle holding a leaf instead of a CA.
    let setup = write_upstream(tmp.path(), &pki, &intermediate_params(12 * HOUR), None);
    let leaf = CertificateParams::new(vec!["x.example".to_owned()])
        .unwrap()
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap();
    fs::write(&setup.files.bundle, leaf.pem()).unwrap();
    assert!(load(setup.files.clone()).contains("not a CA"));

    fs::write(&setup.files.bundle, "").unwrap();
    assert!(load(setup.files.clone()).contains("no CERTIFICATE"));

    let missing = UpstreamCaFiles {
        cert: tmp.path().join("nope.pem"),
        ..setup.files.clone()
    };
    assert!(load(missing).contains("nope.pem"));

    // A key others may read is refused, as writ's own keys are.
    let readable = write_upstream(tmp.path(), &pki, &intermediate_params(12 * HOUR), None);
    fs::set_permissions(&readable.files.key, fs::Permissions::from_mode(0o644)).unwrap();
    let refused = load(readable.files.clone());
    assert!(
        refused.contains("intermediate.key") && refused.contains("mode 0644"),
        "{refused}"
    );

    // Certificate files others may write: anyone could slip in a trust
    // anchor writ would then publish, or another intermediate.
    for world_writable in [&readable.files.bundle, &readable.files.cert] {
        fs::set_permissions(&readable.files.key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(world_writable, fs::Permissions::from_mode(0o666)).unwrap();
        let refused = load(readable.files.clone());
        let name = world_writable.file_name().unwrap().to_str().unwrap();
        assert!(
            refused.contains(name) && refused.contains("mode 0666"),
            "{refused}"
        );
        fs::set_permissions(world_writable, fs::Permissions::from_mode(0o644)).unwrap();
    }
    // A key that another user owns, whatever its mode.
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(
            &readable.files.key,
            Some(nix::unistd::Uid::from_raw(65534)),
            None,
        )
        .unwrap();
        let refused = load(readable.files.clone());
        assert!(
            refused.contains("intermediate.key") && refused.contains("owned by uid 65534"),
            "{refused}"
        );
        nix::unistd::chown(&readable.files.key, Some(nix::unistd::geteuid()), None).unwrap();
    }

    let mut with_eku = intermediate_params(12 * HOUR);
    with_eku.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    // An intermediate whose EKU excludes TLS yields SVIDs rustls rejects; the
    // probe SVID catches what the static checks do not.
    assert!(
        load(write_upstream(tmp.path(), &pki, &with_eku, None).files).contains("does not verify")
    );
}

/// What webpki does not check of an upstream chain — the trust anchor's
/// validity, key usage and path length, name constraints anywhere — is
/// checked at load and by `writ validate` (`check_settings`), naming the
/// file and the problem.
#[test]
fn upstream_anchors_and_constraints_that_verifiers_refuse_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let at =
        |secs: i64| time::OffsetDateTime::from_unix_timestamp(unix(t0()) as i64 + secs).unwrap();
    let refused = |pki: &Pki, params: &CertificateParams| {
        let files = write_upstream(tmp.path(), pki, params, None).files;
        let validated = CertificateAuthority::check_settings(
            &upstream_settings(tmp.path(), files.clone()),
            t0(),
        )
        .unwrap_err()
        .to_string();
        let loaded =
            CertificateAuthority::load_or_create(upstream_settings(tmp.path(), files), t0())
                .unwrap_err()
                .to_string();
        assert_eq!(validated, loaded);
        loaded
    };
    let good = intermediate_params(12 * HOUR);

    let expired_root = pki_with(|p| {
        p.not_before = at(-10 * 86400);
        p.not_after = at(-60);
    });
    let err = refused(&expired_root, &good);
    assert!(
        err.contains("roots.pem") && err.contains("not valid now"),
        "{err}"
    );

    let pl0_root = pki_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
    let err = refused(&pl0_root, &good);
    assert!(err.contains("pathLenConstraint 0"), "{err}");
    // One CA certificate below a root of path length 1 is fine.
    let pl1_root = pki_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1)));
    let files = write_upstream(tmp.path(), &pl1_root, &good, None).files;
    CertificateAuthority::check_settings(&upstream_settings(tmp.path(), files), t0()).unwrap();

    let no_cert_sign_root = pki_with(|p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature]);
    let err = refused(&no_cert_sign_root, &good);
    assert!(err.contains("keyCertSign"), "{err}");

    let mut constrained = intermediate_params(12 * HOUR);
    constrained.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.com".into())],
        excluded_subtrees: Vec::new(),
    });
    let err = refused(&pki(), &constrained);
    assert!(
        err.contains("intermediate.pem") && err.contains("name constraints"),
        "{err}"
    );
}

/// An upstream root that ends before the intermediate: no SVID and no CRL
/// may outlive it.
#[test]
fn upstream_svids_and_crls_end_by_the_earliest_end_in_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let root_end = t0() + 2 * HOUR;
    let short_root = pki_with(|p| {
        p.not_after = time::OffsetDateTime::from_unix_timestamp(unix(root_end) as i64).unwrap();
    });
    let setup = write_upstream(
        tmp.path(),
        &short_root,
        &intermediate_params(12 * HOUR),
        None,
    );
    let ca = CertificateAuthority::load_or_create(upstream_settings(tmp.path(), setup.files), t0())
        .unwrap();
    assert_eq!(ca.active_not_after(), root_end);
    let svid = ca.mint_x509_svid(&request("/a", 48 * HOUR), t0()).unwrap();
    assert_eq!(svid.not_after, root_end);
    verify_chain(&svid.cert_chain, &ca.x509_authorities(), root_end - SECOND).unwrap();
    let crls = ca
        .sign_crls(
            &[&RevokedCert {
                serial: svid.serial.clone(),
                issuer_key_id: svid.issuer_key_id.clone(),
                revoked_at: t0(),
            }],
            1,
            24 * HOUR,
            t0(),
        )
        .unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&crls[0]).unwrap();
    assert_eq!(
        crl.next_update().map(|t| t.timestamp()),
        Some(unix(root_end) as i64)
    );
}

// ---- interoperability ----

/// The spiffe crate (what Rust workloads use) accepts our SVIDs, keys and
/// bundles, in both modes; and the CA's roots survive the bundle document.
#[test]
fn output_is_accepted_by_the_spiffe_crate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let pki = pki();
    let setup = write_upstream(tmp.path(), &pki, &intermediate_params(12 * HOUR), None);
    let up = CertificateAuthority::load_or_create(upstream_settings(tmp.path(), setup.files), t0())
        .unwrap();
    for ca in [&ca, &up] {
        let svid = ca.mint_x509_svid(&request("/agent/x", HOUR), t0()).unwrap();
        let parsed = spiffe::X509Svid::parse_from_der(
            &svid.chain_der_concat(),
            svid.private_key_pkcs8_der(),
        )
        .unwrap();
        assert_eq!(
            parsed.spiffe_id().to_string(),
            "spiffe://example.org/agent/x"
        );
        assert_eq!(parsed.cert_chain().len(), svid.cert_chain.len());

        let bundle = crate::bundle::TrustBundle {
            x509_authorities: ca.x509_authorities(),
            ..crate::bundle::TrustBundle::new(td())
        };
        let theirs = spiffe::X509Bundle::parse_from_der(
            spiffe::TrustDomain::new("example.org").unwrap(),
            &bundle.x509_der_concat(),
        )
        .unwrap();
        assert_eq!(theirs.authorities().len(), bundle.x509_authorities.len());
        let json = bundle.to_spiffe_json();
        let back = crate::bundle::TrustBundle::from_spiffe_json(td(), &json).unwrap();
        assert_eq!(back, bundle);
    }
}

// ---- JWT signing keys ----

fn jwt_request(path: &str, ttl: Duration) -> JwtSvidRequest {
    JwtSvidRequest {
        spiffe_id: td().spiffe_id(path).unwrap(),
        audience: vec!["api".into()],
        ttl,
        ends_by: None,
        extra_claims: serde_json::Map::new(),
    }
}

fn jwt_key_set(ca: &CertificateAuthority) -> crate::jwt::JwtKeySet {
    let mut keys = crate::jwt::JwtKeySet::default();
    keys.set_bundle(&crate::bundle::TrustBundle {
        jwt_authorities: ca.jwt_authorities(),
        ..crate::bundle::TrustBundle::new(td())
    });
    keys
}

fn jwt_kids(ca: &CertificateAuthority) -> Vec<String> {
    ca.jwt_authorities().into_iter().map(|a| a.key_id).collect()
}

#[test]
fn jwt_svids_are_signed_by_the_active_key_and_validate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    assert_eq!(ca.jwt_svid_ttl(), DEFAULT_JWT_SVID_TTL);
    assert_eq!(jwt_kids(&ca).len(), 1);
    let svid = ca
        .mint_jwt_svid(&jwt_request("/agent/a", DEFAULT_JWT_SVID_TTL), t0())
        .unwrap();
    assert_eq!(Some(svid.key_id.as_str()), ca.active_jwt_key_id());
    assert_eq!(unix(svid.issued_at), unix(t0()));
    assert_eq!(unix(svid.expires_at), unix(t0()) + 300);
    assert!(!format!("{svid:?}").contains(&svid.token));

    let ok = crate::jwt::validate(&svid.token, "api", &jwt_key_set(&ca), t0()).unwrap();
    assert_eq!(ok.spiffe_id.to_string(), "spiffe://example.org/agent/a");
    assert_eq!(ok.claims["jti"], svid.jti.as_str());
    assert_eq!(ok.claims["iat"], unix(t0()));
    assert_eq!(ok.claims["exp"], unix(t0()) + 300);

    // Every token is distinct, even for the same request at the same time.
    let again = ca
        .mint_jwt_svid(&jwt_request("/agent/a", DEFAULT_JWT_SVID_TTL), t0())
        .unwrap();
    assert_ne!(again.jti, svid.jti);
    assert_ne!(again.token, svid.token);
}

#[test]
fn jwt_svid_requests_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let mint = |req: JwtSvidRequest| ca.mint_jwt_svid(&req, t0()).unwrap_err();
    let base = jwt_request("/a", DEFAULT_JWT_SVID_TTL);

    let foreign = JwtSvidRequest {
        spiffe_id: "spiffe://other.org/a".parse().unwrap(),
        ..base.clone()
    };
    assert!(matches!(mint(foreign), CaError::ForeignTrustDomain(..)));
    let root = JwtSvidRequest {
        spiffe_id: "spiffe://example.org".parse().unwrap(),
        ..base.clone()
    };
    assert!(matches!(mint(root), CaError::LeafWithoutPath(_)));
    for audience in [vec![], vec!["a".to_owned(), String::new()]] {
        let req = JwtSvidRequest {
            audience,
            ..base.clone()
        };
        assert!(matches!(mint(req), CaError::InvalidJwtRequest(_)));
    }
    let mut reserved = base.clone();
    reserved.extra_claims.insert("sub".into(), "x".into());
    assert!(mint(reserved).to_string().contains("claim sub"));
    let short = JwtSvidRequest {
        ttl: Duration::from_millis(500),
        ..base.clone()
    };
    assert!(matches!(mint(short), CaError::TtlTooShort));
    let huge = JwtSvidRequest {
        audience: (0..200).map(|i| format!("{i:0>100}")).collect(),
        ..base
    };
    assert!(mint(huge).to_string().contains("byte limit"));
}

#[test]
fn jwt_keys_rotate_publish_before_signing_and_cap_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(tmp.path());
    s.ca_ttl = 6 * HOUR;
    s.svid_ttl = HOUR;
    s.jwt_svid_ttl = 10 * Duration::from_secs(60);
    let mut ca = CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    let first = ca.active_jwt_key_id().unwrap().to_owned();

    // A token never outlives the key that signs it.
    let long = ca
        .mint_jwt_svid(&jwt_request("/a", 100 * HOUR), t0())
        .unwrap();
    assert_eq!(unix(long.expires_at), unix(t0()) + 6 * 3600);

    let mut now = t0();
    let mut published_before: HashSet<String> = jwt_kids(&ca).into_iter().collect();
    let mut signers: HashSet<String> = HashSet::new();
    let mut live: Vec<JwtSvid> = Vec::new();
    let mut saw_three = false;
    for _ in 0..60 {
        now = ca.next_rotation_at();
        let out = ca.rotate(now).unwrap();
        let kids = jwt_kids(&ca);
        assert_eq!(
            out.jwt_authorities_changed,
            kids.iter().cloned().collect::<HashSet<_>>() != published_before
        );
        let active = ca.active_jwt_key_id().unwrap().to_owned();
        if !signers.contains(&active) {
            // The first time a key signs, it was already in the bundle that
            // relying parties held before this rotation.
            assert!(
                published_before.contains(&active),
                "JWT key {active} signs before it was published"
            );
        }
        signers.insert(active.clone());
        let svid = ca
            .mint_jwt_svid(&jwt_request("/w", s.jwt_svid_ttl), now)
            .unwrap();
        assert_eq!(svid.key_id, active);
        assert_eq!(
            unix(svid.expires_at) - unix(now),
            600,
            "the active key can always sign a full-length token"
        );
        live.push(svid);
        // Every token still valid keeps validating after the rotation.
        live.retain(|t| t.expires_at > now);
        let keys = jwt_key_set(&ca);
        for token in &live {
            crate::jwt::validate(&token.token, "api", &keys, now).unwrap();
        }
        saw_three |= kids.len() == 3;
        assert!(kids.len() <= 3);
        published_before = kids.into_iter().collect();
    }
    assert!(signers.len() >= 5, "several generations were exercised");
    assert!(saw_three, "retired keys linger beside active and next");
    assert!(
        !published_before.contains(&first),
        "the first key was dropped"
    );
    let first_file = tmp.path().join(format!("ca/jwt-{first}.key.pem"));
    assert!(!first_file.exists(), "a dropped key's file is deleted");

    // Keys, roles and windows survive a restart.
    let reloaded = CertificateAuthority::load_or_create(s, now).unwrap();
    assert_eq!(jwt_kids(&reloaded), jwt_kids(&ca));
    assert_eq!(reloaded.active_jwt_key_id(), ca.active_jwt_key_id());
    assert_eq!(reloaded.next_rotation_at(), ca.next_rotation_at());
}

#[test]
fn jwt_keys_are_published_at_half_life_and_sign_at_five_sixths() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let a = ca.active_jwt_key_id().unwrap().to_owned();
    let life = DEFAULT_CA_TTL + Duration::from_secs(10);
    let start = t0() - Duration::from_secs(10);
    let half = start + life / 2;
    let five_sixths = start + life * 5 / 6;

    ca.rotate(half - Duration::from_secs(1)).unwrap();
    assert_eq!(jwt_kids(&ca), vec![a.clone()]);
    ca.rotate(half).unwrap();
    let kids = jwt_kids(&ca);
    assert_eq!(kids.len(), 2);
    let b = kids[1].clone();
    // Published, not yet signing: a token minted now still uses A.
    let token = ca.mint_jwt_svid(&jwt_request("/a", HOUR), half).unwrap();
    assert_eq!(token.key_id, a);
    ca.rotate(five_sixths - Duration::from_secs(1)).unwrap();
    assert_eq!(ca.active_jwt_key_id(), Some(a.as_str()));
    ca.rotate(five_sixths).unwrap();
    assert_eq!(ca.active_jwt_key_id(), Some(b.as_str()));
    // A keeps validating what it signed until its end plus one token TTL.
    let a_end = t0() + DEFAULT_CA_TTL;
    ca.rotate(a_end + DEFAULT_JWT_SVID_TTL - Duration::from_secs(1))
        .unwrap();
    assert!(jwt_kids(&ca).contains(&a));
    ca.rotate(a_end + DEFAULT_JWT_SVID_TTL).unwrap();
    assert!(!jwt_kids(&ca).contains(&a));
}

#[test]
fn jwt_key_state_is_checked_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    let dir = tmp.path().join("ca");
    let state_path = dir.join("state.json");
    let good = fs::read_to_string(&state_path).unwrap();
    let state: serde_json::Value = serde_json::from_str(&good).unwrap();
    let kid = state["jwt_authorities"][0]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let key_path = dir.join(format!("jwt-{kid}.key.pem"));
    assert_eq!(
        fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_before = fs::read(&key_path).unwrap();

    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(matches!(err, CaError::InsecurePermissions { .. }), "{err}");
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();

    // A root's key in place of the JWT key: the wrong kind of file is refused.
    fs::write(
        &key_path,
        "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(
        matches!(&err, CaError::CorruptState { path, .. } if *path == key_path),
        "{err}"
    );
    fs::write(&key_path, &key_before).unwrap();

    let two_active = good.replacen("\"next\"", "\"active\"", 1);
    let mut doubled: serde_json::Value = serde_json::from_str(&two_active).unwrap();
    let copy = doubled["jwt_authorities"][0].clone();
    doubled["jwt_authorities"]
        .as_array_mut()
        .unwrap()
        .push(copy);
    fs::write(&state_path, doubled.to_string()).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(err.to_string().contains("JWT key"), "{err}");
    assert_eq!(fs::read(&key_path).unwrap(), key_before);

    // A window no clock can reach is corrupt, not a reason to panic later.
    let mut far: serde_json::Value = serde_json::from_str(&good).unwrap();
    far["jwt_authorities"][0]["not_after"] = i64::MAX.into();
    fs::write(&state_path, far.to_string()).unwrap();
    let err = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap_err();
    assert!(
        err.to_string().contains("impossible validity window"),
        "{err}"
    );

    // A state file from before JWT keys (no member at all) gains one.
    let mut old: serde_json::Value = serde_json::from_str(&good).unwrap();
    old.as_object_mut().unwrap().remove("jwt_authorities");
    fs::write(&state_path, old.to_string()).unwrap();
    fs::remove_file(&key_path).unwrap();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), t0()).unwrap();
    assert_eq!(jwt_kids(&ca).len(), 1);
    assert_ne!(jwt_kids(&ca)[0], kid);
}

#[test]
fn upstream_mode_keeps_its_jwt_keys_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki();
    let setup = write_upstream(tmp.path(), &pki, &intermediate_params(12 * HOUR), None);
    let s = upstream_settings(tmp.path(), setup.files);
    let first = CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    let second = CertificateAuthority::load_or_create(s, t0() + HOUR).unwrap();
    assert_eq!(jwt_kids(&first), jwt_kids(&second));
    let svid = first.mint_jwt_svid(&jwt_request("/a", HOUR), t0()).unwrap();
    crate::jwt::validate(&svid.token, "api", &jwt_key_set(&second), t0() + HOUR / 2).unwrap();

    // Switching back to self-signed keeps the JWT keys and makes a root.
    let own = CertificateAuthority::load_or_create(settings(tmp.path()), t0() + HOUR).unwrap();
    assert!(!own.is_upstream());
    assert_eq!(own.x509_authorities().len(), 1);
    assert_eq!(jwt_kids(&own), jwt_kids(&first));
}

#[test]
fn jwt_svids_are_accepted_by_the_spiffe_crate() {
    let tmp = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let ca = CertificateAuthority::load_or_create(settings(tmp.path()), now).unwrap();
    let mut req = jwt_request("/agent/x", DEFAULT_JWT_SVID_TTL);
    req.audience = vec!["one".into(), "two".into()];
    let svid = ca.mint_jwt_svid(&req, now).unwrap();
    let bundle = crate::bundle::TrustBundle {
        jwt_authorities: ca.jwt_authorities(),
        ..crate::bundle::TrustBundle::new(td())
    };
    let theirs = spiffe::JwtBundle::from_jwt_authorities(
        spiffe::TrustDomain::new("example.org").unwrap(),
        &bundle.jwt_jwks_json(),
    )
    .unwrap();
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(theirs);
    let parsed = spiffe::JwtSvid::parse_and_validate(&svid.token, &set, &["two"]).unwrap();
    assert_eq!(
        parsed.spiffe_id().to_string(),
        "spiffe://example.org/agent/x"
    );
    assert_eq!(parsed.key_id(), svid.key_id);
    assert!(spiffe::JwtSvid::parse_and_validate(&svid.token, &set, &["three"]).is_err());
}

/// Signs audit checkpoints with whatever root is active in a shared CA, as
/// the agent does.
struct SharedCaSigner(std::sync::Arc<std::sync::Mutex<CertificateAuthority>>);

impl crate::audit::CheckpointSigner for SharedCaSigner {
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        self.0.lock().unwrap().sign_checkpoint(message)
    }
}

fn state_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join("ca/state.json")).unwrap()).unwrap()
}

#[test]
fn expired_roots_keep_their_certificate_but_lose_their_key_and_leave_the_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let mut ca = CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    let root_a = ca.x509_authorities()[0].clone();
    let a_not_after = ca.active_not_after();
    // A fresh state has nothing expired and writes no such member, so the
    // file stays what older writ versions wrote.
    assert!(
        state_json(tmp.path())
            .get("expired_x509_authorities")
            .is_none()
    );
    assert_eq!(ca.checkpoint_roots(), ca.x509_authorities());

    let mut now = t0();
    while now <= a_not_after {
        now = ca.next_rotation_at();
        ca.rotate(now).unwrap();
    }
    let published = ca.x509_authorities();
    assert!(
        !published.contains(&root_a),
        "an expired root is not served"
    );
    assert!(!published.is_empty());
    let checkpoint_roots = ca.checkpoint_roots();
    assert_eq!(checkpoint_roots[0], root_a);
    assert_eq!(checkpoint_roots[1..], published[..]);
    let key_a = tmp
        .path()
        .join(format!("ca/x509-{}.key.pem", hex::encode(ski(&root_a))));
    assert!(!key_a.exists(), "the key of an expired root is deleted");

    // The state keeps the certificate, and nothing else, of the expired root.
    let state = state_json(tmp.path());
    let expired = state["expired_x509_authorities"].as_array().unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(
        expired[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["certificate"]
    );
    let pem = pem::parse(expired[0]["certificate"].as_str().unwrap()).unwrap();
    assert_eq!(pem.contents(), root_a.as_ref());

    // It survives a restart, still unpublished, and reads back without keys.
    let reloaded = CertificateAuthority::load_or_create(s.clone(), now).unwrap();
    assert_eq!(reloaded.x509_authorities(), published);
    assert_eq!(reloaded.checkpoint_roots(), checkpoint_roots);
    assert_eq!(
        read_checkpoint_roots(&tmp.path().join("ca")).unwrap(),
        checkpoint_roots
    );

    // A state file from before expired roots were kept still loads.
    let mut old = state.clone();
    old.as_object_mut()
        .unwrap()
        .remove("expired_x509_authorities");
    fs::write(
        tmp.path().join("ca/state.json"),
        serde_json::to_vec_pretty(&old).unwrap(),
    )
    .unwrap();
    let from_old = CertificateAuthority::load_or_create(s.clone(), now).unwrap();
    assert_eq!(from_old.x509_authorities(), published);
    assert_eq!(from_old.checkpoint_roots(), published);
}

#[test]
fn generations_of_expired_roots_accumulate_and_a_broken_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(tmp.path());
    s.ca_ttl = 6 * HOUR;
    s.svid_ttl = HOUR;
    let mut ca = CertificateAuthority::load_or_create(s.clone(), t0()).unwrap();
    let mut ever: Vec<CertificateDer<'static>> = ca.x509_authorities();
    let mut now = t0();
    for _ in 0..20 {
        now = ca.next_rotation_at();
        ca.rotate(now).unwrap();
        for root in ca.x509_authorities() {
            if !ever.contains(&root) {
                ever.push(root);
            }
        }
        let published = ca.x509_authorities();
        let roots = ca.checkpoint_roots();
        // Every root ever held stays verifiable, exactly once; only the
        // unexpired ones are served.
        assert_eq!(roots.len(), ever.len());
        assert!(ever.iter().all(|r| roots.contains(r)));
        assert!(published.len() <= 3);
        for root in &published {
            assert!(parse(root).validity().is_valid_at(
                x509_parser::time::ASN1Time::from_timestamp(unix(now) as i64).unwrap()
            ));
        }
    }
    assert!(ever.len() > 5, "several generations expired");
    // Key files exist only for held roots and JWT keys.
    let keys = key_files(tmp.path());
    assert_eq!(
        keys,
        ca.x509_authorities().len() + ca.jwt_authorities().len()
    );

    // A damaged expired root is an error naming the member; nothing changes.
    let path = tmp.path().join("ca/state.json");
    let mut state = state_json(tmp.path());
    state["expired_x509_authorities"][0]["certificate"] = "not a certificate".into();
    let broken = serde_json::to_vec_pretty(&state).unwrap();
    fs::write(&path, &broken).unwrap();
    let err = CertificateAuthority::load_or_create(s, now).unwrap_err();
    assert!(matches!(err, CaError::CorruptState { .. }), "{err}");
    assert!(
        err.to_string().contains("expired_x509_authorities"),
        "{err}"
    );
    assert_eq!(fs::read(&path).unwrap(), broken);
}

#[test]
fn a_trail_signed_by_every_generation_verifies_from_the_state_directory_alone() {
    use crate::audit::{AuditEvent, AuditLog, EventKind, VerifyErrorKind};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(tmp.path());
    s.ca_ttl = 6 * HOUR;
    s.svid_ttl = HOUR;
    let ca = Arc::new(Mutex::new(
        CertificateAuthority::load_or_create(s.clone(), t0()).unwrap(),
    ));
    let first_root = ca.lock().unwrap().x509_authorities()[0].clone();
    let first_not_after = ca.lock().unwrap().active_not_after();
    let clock_secs = Arc::new(AtomicU64::new(unix(t0())));
    let clock_now = clock_secs.clone();
    let clock: crate::audit::Clock = Arc::new(move || {
        SystemTime::UNIX_EPOCH + Duration::from_secs(clock_now.load(Ordering::SeqCst))
    });
    let audit = crate::config::AuditConfig {
        path: tmp.path().join("audit/audit.jsonl"),
        max_file_bytes: 64 << 20,
        preallocate_bytes: 1 << 20,
        checkpoint_every: 1000,
        checkpoint_interval: 1000 * HOUR,
    };
    let log =
        AuditLog::open_with_clock(&audit, Arc::new(SharedCaSigner(ca.clone())), clock).unwrap();
    let mut signers = HashSet::new();
    let mut now = t0();
    // Step the schedule well past the first root's expiry, writing a record
    // and a checkpoint (by whichever root signs then) at every step.
    while now <= first_not_after + 2 * s.ca_ttl {
        log.append_blocking(AuditEvent::new(EventKind::X509Issued, "c"))
            .unwrap();
        log.checkpoint().unwrap();
        signers.insert(ca.lock().unwrap().active_key_id().to_vec());
        let (outcome, roots) = {
            let mut ca = ca.lock().unwrap();
            now = ca.next_rotation_at();
            (ca.rotate(now).unwrap(), ca.x509_authorities())
        };
        clock_secs.store(unix(now), Ordering::SeqCst);
        // What the agent records on a rotation: the roots served from now.
        if outcome.authorities_changed {
            log.append_blocking(
                AuditEvent::new(EventKind::CaRotated, "r").x509_authorities(&roots),
            )
            .unwrap();
        }
    }
    log.close();
    assert!(signers.len() >= 3, "checkpoints by several roots");
    let published = ca.lock().unwrap().x509_authorities();
    assert!(!published.contains(&first_root));

    // The served roots alone no longer vouch for the oldest checkpoints:
    // the first one is named.
    let err = crate::audit::verify(&audit.path, &published).unwrap_err();
    assert_eq!(err.kind, VerifyErrorKind::Untrusted, "{err}");
    assert_eq!(err.seq, Some(2), "{err}");
    assert_eq!(err.line, 3, "{err}");
    assert!(err.reason.contains("neither a trusted root"), "{err}");

    // The state directory remembers every root, so the whole trail verifies
    // with nothing else, in another process's view (no CA loaded).
    drop(ca);
    let roots = read_checkpoint_roots(&tmp.path().join("ca")).unwrap();
    assert!(roots.contains(&first_root));
    let report = crate::audit::verify(&audit.path, &roots).unwrap();
    assert_eq!(report.end, crate::audit::TrailEnd::Closed);
    assert!(report.checkpoints as usize > signers.len());

    // The trail carries its own chain of roots: the first root alone is
    // enough, each later one being handed on by the rotation records.
    let report = crate::audit::verify(&audit.path, std::slice::from_ref(&first_root)).unwrap();
    assert_eq!(report.learned_roots as usize, roots.len() - 1);
}

/// How many private key files the CA directory under `state` holds.
fn key_files(state: &std::path::Path) -> usize {
    fs::read_dir(state.join("ca"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".key.pem")
        })
        .count()
}
