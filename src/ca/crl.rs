//! X.509 CRLs (RFC 5280 §5) encoded straight into DER. A task-heavy node
//! re-signs its CRL after every batch of completions, and the CRL holds
//! every revoked certificate that has not expired yet; building it through a
//! general-purpose certificate builder cost an allocation and a date
//! conversion per entry on every publication. This writes each entry with
//! no allocation of its own, then signs once.

use bytes::Bytes;
use rcgen::SigningKey;

use super::CaError;

/// `ecdsa-with-SHA256` (1.2.840.10045.4.3.2) as an AlgorithmIdentifier.
const ECDSA_WITH_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// id-ce-authorityKeyIdentifier (2.5.29.35).
const OID_AUTHORITY_KEY_ID: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x23];
/// id-ce-cRLNumber (2.5.29.20).
const OID_CRL_NUMBER: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x14];

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const BIT_STRING: u8 = 0x03;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Appends one revoked certificate's `revokedCertificates` element to
/// `out`; on error `out` is left as it was.
pub(crate) fn write_entry(
    out: &mut Vec<u8>,
    serial: &[u8],
    revoked_at_unix: i64,
) -> Result<(), CaError> {
    if serial.len() > 20 {
        return Err(CaError::Crl(format!(
            "a {}-octet serial is longer than RFC 5280 allows (20)",
            serial.len()
        )));
    }
    let at = out.len();
    // INTEGER (a serial is at most 20 octets, plus a sign octet) and a time
    // of at most 15 octets: the content is always under 128 bytes, so the
    // SEQUENCE's length is one octet, patched in once the content is known.
    out.extend_from_slice(&[SEQUENCE, 0]);
    write_integer(out, serial);
    if let Err(e) = write_time(out, revoked_at_unix) {
        out.truncate(at);
        return Err(e);
    }
    out[at + 1] = (out.len() - at - 2) as u8;
    Ok(())
}

/// What the CRL says about itself and who signs it.
pub(crate) struct CrlHeader<'a> {
    /// The issuing CA certificate's subject, as encoded in that certificate.
    pub issuer_name: &'a [u8],
    pub issuer_key_id: &'a [u8],
    pub crl_number: u64,
    pub this_update_unix: i64,
    pub next_update_unix: i64,
}

/// Whether `key` signs with ECDSA P-256/SHA-256, the one algorithm this
/// encoder writes; other CA keys (an upstream RSA intermediate, say) go
/// through the general builder.
pub(crate) fn supports(key: &rcgen::KeyPair) -> bool {
    key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256
}

/// A CRL's to-be-signed part, written where the signed CRL will hold it:
/// after room for the CRL's own header, so that signing copies nothing.
pub(crate) struct UnsignedCrl {
    buf: Vec<u8>,
    /// Where the TBS begins in `buf`; the CRL's header goes right before.
    tbs_at: usize,
}

/// The longest ECDSA P-256 signature as a BIT STRING's content: one octet
/// of unused bits, then at most 72 octets of DER.
const MAX_SIGNATURE_CONTENT: usize = 1 + 72;

/// The to-be-signed part of a CRL listing `entries`: elements written by
/// `write_entry`, back to back (at least one).
pub(crate) fn prepare(header: &CrlHeader<'_>, entries: &[u8]) -> Result<UnsignedCrl, CaError> {
    // The list dominates (tens of bytes per revoked certificate, and a
    // busy node revokes thousands): it is copied once, into the TBS, whose
    // length is known before anything is written.
    let mut head = Vec::with_capacity(header.issuer_name.len() + 64);
    write_tlv(&mut head, INTEGER, &[1]); // v2
    head.extend_from_slice(ECDSA_WITH_SHA256);
    head.extend_from_slice(header.issuer_name);
    write_time(&mut head, header.this_update_unix)?;
    write_time(&mut head, header.next_update_unix)?;
    let mut tail = Vec::with_capacity(64);
    write_tlv(&mut tail, 0xa0, &extensions(header));
    let body_len = head.len() + header_len(entries.len()) + entries.len() + tail.len();
    let tbs_len = header_len(body_len) + body_len;
    let signed_max = tbs_len
        + ECDSA_WITH_SHA256.len()
        + header_len(MAX_SIGNATURE_CONTENT)
        + MAX_SIGNATURE_CONTENT;
    let tbs_at = header_len(signed_max);

    let mut buf = Vec::with_capacity(tbs_at + signed_max);
    buf.resize(tbs_at, 0);
    write_header(&mut buf, SEQUENCE, body_len);
    buf.extend_from_slice(&head);
    write_header(&mut buf, SEQUENCE, entries.len());
    buf.extend_from_slice(entries);
    buf.extend_from_slice(&tail);
    Ok(UnsignedCrl { buf, tbs_at })
}

/// Signs `unsigned` with `key` (ECDSA P-256, see `supports`): the DER CRL.
pub(crate) fn finish(unsigned: UnsignedCrl, key: &rcgen::KeyPair) -> Result<Bytes, CaError> {
    let UnsignedCrl { mut buf, tbs_at } = unsigned;
    let signature = key
        .sign(&buf[tbs_at..])
        .map_err(|e| CaError::Crl(format!("signing: {e}")))?;
    let signature_len = 1 + signature.len(); // no unused bits, then the DER
    if signature_len > MAX_SIGNATURE_CONTENT {
        return Err(CaError::Crl(format!(
            "a {}-byte signature is longer than P-256 makes",
            signature.len()
        )));
    }
    let tbs_len = buf.len() - tbs_at;
    buf.extend_from_slice(ECDSA_WITH_SHA256);
    write_header(&mut buf, BIT_STRING, signature_len);
    buf.push(0);
    buf.extend_from_slice(&signature);
    let crl_len = buf.len() - tbs_at;
    debug_assert!(crl_len >= tbs_len);
    // The header is at most as long as the room left for it, since the
    // signature is at most as long as assumed there.
    let mut crl_header = Vec::with_capacity(8);
    write_header(&mut crl_header, SEQUENCE, crl_len);
    let start = tbs_at
        .checked_sub(crl_header.len())
        .ok_or_else(|| CaError::Crl("no room for the CRL's header".into()))?;
    buf[start..tbs_at].copy_from_slice(&crl_header);
    Ok(Bytes::from(buf).slice(start..))
}

/// A signed CRL listing `entries` (see `prepare`).
#[cfg(test)]
fn sign(header: &CrlHeader<'_>, entries: &[u8], key: &rcgen::KeyPair) -> Result<Bytes, CaError> {
    finish(prepare(header, entries)?, key)
}

/// `[0] EXPLICIT Extensions`' content: the authority key identifier (so a
/// verifier finds the right key after rotation) and the CRL number.
fn extensions(header: &CrlHeader<'_>) -> Vec<u8> {
    let mut key_id = Vec::new();
    write_tlv(&mut key_id, 0x80, header.issuer_key_id); // [0] keyIdentifier
    let mut aki_value = Vec::new();
    write_tlv(&mut aki_value, SEQUENCE, &key_id);
    let mut aki = OID_AUTHORITY_KEY_ID.to_vec();
    write_tlv(&mut aki, OCTET_STRING, &aki_value);

    let mut number_value = Vec::new();
    write_integer(&mut number_value, &header.crl_number.to_be_bytes());
    let mut number = OID_CRL_NUMBER.to_vec();
    write_tlv(&mut number, OCTET_STRING, &number_value);

    let mut list = Vec::new();
    write_tlv(&mut list, SEQUENCE, &aki);
    write_tlv(&mut list, SEQUENCE, &number);
    let mut out = Vec::new();
    write_tlv(&mut out, SEQUENCE, &list);
    out
}

fn write_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    write_header(out, tag, content.len());
    out.extend_from_slice(content);
}

/// A tag and a DER length, for `len` content bytes written after it.
fn write_header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// How many bytes `write_header` writes for `len` content bytes.
fn header_len(len: usize) -> usize {
    if len < 0x80 {
        2
    } else {
        2 + std::mem::size_of::<usize>() - (len.leading_zeros() as usize / 8)
    }
}

/// A non-negative INTEGER from big-endian bytes, minimally encoded (the
/// same bytes the certificate's serial was written with, so verifiers that
/// compare serials byte for byte match them).
fn write_integer(out: &mut Vec<u8>, big_endian: &[u8]) {
    let skip = big_endian
        .iter()
        .take_while(|b| **b == 0)
        .count()
        .min(big_endian.len().saturating_sub(1));
    let digits = &big_endian[skip..];
    let pad = digits.first().is_none_or(|b| b & 0x80 != 0);
    out.push(INTEGER);
    let len = digits.len() + usize::from(pad);
    // Serials are at most 20 octets (RFC 5280 §4.1.2.2), CRL numbers 8.
    out.push(len as u8);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
}

/// UTCTime through 2049, GeneralizedTime after, as RFC 5280 §5.1.2.4 asks.
fn write_time(out: &mut Vec<u8>, unix: i64) -> Result<(), CaError> {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    if !(1950..=9999).contains(&year) {
        return Err(CaError::Crl(format!(
            "time {unix} is outside what a CRL can carry"
        )));
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let (tag, len) = if year < 2050 {
        (UTC_TIME, 13)
    } else {
        (GENERALIZED_TIME, 15)
    };
    out.extend_from_slice(&[tag, len]);
    if year >= 2050 {
        push_two_digits(out, year / 100);
    }
    for field in [year % 100, month, day, h, m, s] {
        push_two_digits(out, field);
    }
    out.push(b'Z');
    Ok(())
}

fn push_two_digits(out: &mut Vec<u8>, value: i64) {
    // Every field passed here is in 0..=99.
    out.push(b'0' + (value / 10 % 10) as u8);
    out.push(b'0' + (value % 10) as u8);
}

/// Proleptic Gregorian date of a day count from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_the_time_crate() {
        for unix in [
            0i64,
            951_782_400, // 2000-02-29
            1_700_000_000,
            2_524_608_000, // 2050-01-01: first GeneralizedTime year
            -631_152_000,  // 1950-01-01
            4_102_444_799,
        ] {
            let t = time::OffsetDateTime::from_unix_timestamp(unix).unwrap();
            assert_eq!(
                civil_from_days(unix.div_euclid(86_400)),
                (
                    i64::from(t.year()),
                    i64::from(u8::from(t.month())),
                    i64::from(t.day())
                ),
                "{unix}"
            );
        }
        let mut out = Vec::new();
        write_time(&mut out, 1_700_000_000).unwrap();
        assert_eq!(&out[..2], &[UTC_TIME, 13]);
        assert_eq!(&out[2..], b"231114221320Z");
        out.clear();
        write_time(&mut out, 2_524_608_000).unwrap();
        assert_eq!(&out[..2], &[GENERALIZED_TIME, 15]);
        assert_eq!(&out[2..], b"20500101000000Z");
        assert!(write_time(&mut out, -700_000_000).is_err());
    }

    #[test]
    fn integers_are_minimal_and_non_negative() {
        let enc = |b: &[u8]| {
            let mut out = Vec::new();
            write_integer(&mut out, b);
            out
        };
        assert_eq!(enc(&[0x42, 0x01]), [0x02, 0x02, 0x42, 0x01]);
        assert_eq!(enc(&[0x00, 0x00, 0x42]), [0x02, 0x01, 0x42]);
        assert_eq!(enc(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(enc(&[0x00, 0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(enc(&[0, 0, 0, 0, 0, 0, 0, 7]), [0x02, 0x01, 0x07]);
        assert_eq!(enc(&[0]), [0x02, 0x01, 0x00]);
    }

    #[test]
    fn long_lengths_use_the_fewest_octets() {
        let mut out = Vec::new();
        write_tlv(&mut out, SEQUENCE, &[0u8; 200]);
        assert_eq!(&out[..3], &[SEQUENCE, 0x81, 200]);
        out.clear();
        write_tlv(&mut out, SEQUENCE, &vec![0u8; 70_000]);
        assert_eq!(&out[..5], &[SEQUENCE, 0x83, 0x01, 0x11, 0x70]);
        // The sizes `sign` reserves are the sizes written.
        for len in [
            0,
            1,
            0x7f,
            0x80,
            0xff,
            0x100,
            0xffff,
            0x1_0000,
            70_000,
            1 << 24,
        ] {
            out.clear();
            write_header(&mut out, SEQUENCE, len);
            assert_eq!(out.len(), header_len(len), "{len}");
        }
    }

    /// A CRL of many entries (more than fit a two-octet length) parses, lists
    /// every serial in order, and verifies under the signing key.
    #[test]
    fn a_large_crl_is_well_formed_and_verifies() {
        use x509_parser::prelude::FromDer;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.der()).unwrap();
        let serials: Vec<[u8; 16]> = (0u32..3000)
            .map(|i| {
                let mut s = [0x11u8; 16];
                s[12..].copy_from_slice(&i.to_be_bytes());
                s
            })
            .collect();
        let mut entries = Vec::new();
        for serial in &serials {
            write_entry(&mut entries, serial, 1_700_000_000).unwrap();
        }
        let header = CrlHeader {
            issuer_name: ca_cert.subject().as_raw(),
            issuer_key_id: &[7; 20],
            crl_number: 42,
            this_update_unix: 1_700_000_000,
            next_update_unix: 1_700_003_600,
        };
        let der = sign(&header, &entries, &key).unwrap();
        let (rest, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        assert!(rest.is_empty());
        let listed: Vec<Vec<u8>> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        let expected: Vec<Vec<u8>> = serials.iter().map(|s| s.to_vec()).collect();
        assert_eq!(listed, expected);
        assert_eq!(crl.crl_number().map(|n| n.to_string()), Some("42".into()));
        crl.verify_signature(ca_cert.public_key()).unwrap();
    }
}
