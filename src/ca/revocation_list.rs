//! What the next CRLs list: every revoked certificate that has not expired,
//! grouped by issuer, each group's CRL entries kept encoded back to back.
//!
//! A busy node re-signs its CRLs after every batch of task completions, over
//! thousands of entries. Kept this way, a CRL takes its entries as one copy
//! of one buffer, with no per-entry work; and since certificates mostly
//! expire in the order they were revoked (tasks share TTLs), an expired
//! entry usually leaves from the front without moving the rest.

use std::collections::VecDeque;
use std::time::SystemTime;

use super::{CaError, RevokedCert, clock, crl};

/// Revocations whose certificates have not expired, by issuer.
#[derive(Default)]
pub struct RevocationList {
    issuers: Vec<IssuerRevocations>,
}

/// One issuer's share of the list.
struct IssuerRevocations {
    issuer_key_id: Vec<u8>,
    /// The entries' DER back to back, from `start` on. The bytes before
    /// `start` belonged to entries that have left; they are reclaimed once
    /// they outgrow the live ones, so each byte moves a bounded number of
    /// times however long the node runs.
    ders: Vec<u8>,
    start: usize,
    /// The entries in the order of `ders`.
    entries: VecDeque<Listed>,
    /// Unix seconds before which no entry expires.
    next_expiry: i64,
}

/// One entry: what the general CRL builder needs, when it expires, and the
/// length of its encoding in `ders`.
struct Listed {
    serial: Box<[u8]>,
    revoked_at: SystemTime,
    not_after: i64,
    der_len: usize,
}

impl RevocationList {
    /// Adds `cert`, listed until `not_after` (unix seconds). Fails, adding
    /// nothing, when the entry cannot be encoded (a serial over 20 octets, a
    /// revocation time a CRL cannot carry).
    pub fn add(&mut self, cert: &RevokedCert, not_after: i64) -> Result<(), CaError> {
        let revoked_at_unix = clock::to_unix(cert.revoked_at)?;
        let issuer = match self
            .issuers
            .iter_mut()
            .position(|i| i.issuer_key_id == cert.issuer_key_id)
        {
            Some(at) => &mut self.issuers[at],
            None => {
                self.issuers.push(IssuerRevocations {
                    issuer_key_id: cert.issuer_key_id.clone(),
                    ders: Vec::new(),
                    start: 0,
                    entries: VecDeque::new(),
                    next_expiry: i64::MAX,
                });
                let last = self.issuers.len() - 1;
                &mut self.issuers[last]
            }
        };
        let before = issuer.ders.len();
        let written = crl::write_entry(&mut issuer.ders, &cert.serial, revoked_at_unix);
        if let Err(e) = written {
            let abandoned = issuer.entries.is_empty();
            if abandoned {
                self.issuers.retain(|i| !i.entries.is_empty());
            }
            return Err(e);
        }
        issuer.entries.push_back(Listed {
            serial: cert.serial.clone().into_boxed_slice(),
            revoked_at: cert.revoked_at,
            not_after,
            der_len: issuer.ders.len() - before,
        });
        issuer.next_expiry = issuer.next_expiry.min(not_after);
        Ok(())
    }

    /// Drops every entry whose certificate has expired by `now_unix` (its
    /// `not_after` is not after it).
    pub fn remove_expired(&mut self, now_unix: i64) {
        for issuer in &mut self.issuers {
            if issuer.next_expiry <= now_unix {
                issuer.remove_expired(now_unix);
            }
        }
        self.issuers.retain(|i| !i.entries.is_empty());
    }

    /// How many revocations are listed.
    pub fn len(&self) -> usize {
        self.issuers.iter().map(|i| i.entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// `issuer_key_id`'s entries, encoded back to back, or `None` if it has
    /// none.
    pub(crate) fn encoded_for(&self, issuer_key_id: &[u8]) -> Option<&[u8]> {
        self.issuer(issuer_key_id).map(|i| &i.ders[i.start..])
    }

    /// `issuer_key_id`'s entries as (serial, revocation time), in CRL order.
    pub(crate) fn entries_for(
        &self,
        issuer_key_id: &[u8],
    ) -> impl Iterator<Item = (&[u8], SystemTime)> {
        self.issuer(issuer_key_id)
            .into_iter()
            .flat_map(|i| i.entries.iter().map(|e| (&*e.serial, e.revoked_at)))
    }

    fn issuer(&self, issuer_key_id: &[u8]) -> Option<&IssuerRevocations> {
        self.issuers
            .iter()
            .find(|i| i.issuer_key_id == issuer_key_id)
    }
}

impl IssuerRevocations {
    fn remove_expired(&mut self, now_unix: i64) {
        let expired = |e: &Listed| e.not_after <= now_unix;
        while let Some(front) = self.entries.front()
            && expired(front)
        {
            self.start += front.der_len;
            self.entries.pop_front();
        }
        let mut next_expiry = i64::MAX;
        let mut out_of_order = false;
        for entry in &self.entries {
            if expired(entry) {
                out_of_order = true;
            } else {
                next_expiry = next_expiry.min(entry.not_after);
            }
        }
        if out_of_order {
            // Compacted in one pass, the live bytes moving to the front.
            let (ders, mut read, mut write) = (&mut self.ders, self.start, 0);
            self.entries.retain(|entry| {
                let keep = !expired(entry);
                if keep {
                    ders.copy_within(read..read + entry.der_len, write);
                    write += entry.der_len;
                }
                read += entry.der_len;
                keep
            });
            ders.truncate(write);
            self.start = 0;
        } else if self.start > self.ders.len() - self.start {
            self.ders.drain(..self.start);
            self.start = 0;
        }
        self.next_expiry = next_expiry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn cert(serial: u8, issuer: u8) -> RevokedCert {
        RevokedCert {
            serial: vec![0x40, serial],
            issuer_key_id: vec![issuer; 20],
            revoked_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(serial)),
        }
    }

    /// The encoded entries of `serials`, as `write_entry` writes them one by one.
    fn expected(list: &[RevokedCert]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in list {
            crl::write_entry(&mut out, &c.serial, clock::to_unix(c.revoked_at).unwrap()).unwrap();
        }
        out
    }

    fn serials(list: &RevocationList, issuer: u8) -> Vec<u8> {
        list.entries_for(&[issuer; 20]).map(|(s, _)| s[1]).collect()
    }

    #[test]
    fn entries_are_grouped_by_issuer_in_the_order_added() {
        let mut list = RevocationList::default();
        for (serial, issuer) in [(1, 7), (2, 8), (3, 7)] {
            list.add(&cert(serial, issuer), 100).unwrap();
        }
        assert_eq!(list.len(), 3);
        assert_eq!(serials(&list, 7), [1, 3]);
        assert_eq!(serials(&list, 8), [2]);
        assert_eq!(
            list.encoded_for(&[7; 20]).unwrap(),
            expected(&[cert(1, 7), cert(3, 7)])
        );
        assert!(list.encoded_for(&[9; 20]).is_none());
    }

    /// Expiry in the order of addition (moving `start`), out of it
    /// (compaction), and of every entry of an issuer: what is left is always
    /// exactly the unexpired entries, encoded back to back.
    #[test]
    fn expired_entries_leave_in_any_order_and_the_rest_stay_intact() {
        let mut list = RevocationList::default();
        // not_after per serial: mostly increasing, with 6 expiring early.
        let plan = [
            (1, 10),
            (2, 10),
            (3, 20),
            (4, 30),
            (5, 40),
            (6, 15),
            (7, 50),
        ];
        for (serial, not_after) in plan {
            list.add(&cert(serial, 7), not_after).unwrap();
        }
        list.add(&cert(100, 8), 12).unwrap();
        let live = |list: &RevocationList| {
            assert_eq!(
                list.encoded_for(&[7; 20]).unwrap_or_default(),
                expected(
                    &serials(list, 7)
                        .iter()
                        .map(|s| cert(*s, 7))
                        .collect::<Vec<_>>()
                )
            );
            serials(list, 7)
        };
        list.remove_expired(9);
        assert_eq!(live(&list), [1, 2, 3, 4, 5, 6, 7]);
        list.remove_expired(10);
        assert_eq!(live(&list), [3, 4, 5, 6, 7]);
        assert_eq!(serials(&list, 8), [100]);
        list.remove_expired(15);
        assert_eq!(live(&list), [3, 4, 5, 7]);
        assert!(list.encoded_for(&[8; 20]).is_none(), "issuer 8 emptied");
        list.remove_expired(30);
        assert_eq!(live(&list), [5, 7]);
        list.add(&cert(8, 7), 45).unwrap();
        assert_eq!(live(&list), [5, 7, 8]);
        list.remove_expired(45);
        assert_eq!(live(&list), [7]);
        list.remove_expired(50);
        assert!(list.is_empty());
        assert_eq!(list.len(), 0);
    }

    #[test]
    fn an_entry_that_cannot_be_encoded_is_refused_and_nothing_changes() {
        let mut list = RevocationList::default();
        list.add(&cert(1, 7), 100).unwrap();
        let too_long = RevokedCert {
            serial: vec![1; 21],
            ..cert(2, 7)
        };
        assert!(list.add(&too_long, 100).is_err());
        let too_early = RevokedCert {
            revoked_at: UNIX_EPOCH - Duration::from_secs(800_000_000),
            ..cert(3, 9)
        };
        assert!(list.add(&too_early, 100).is_err());
        assert_eq!(list.len(), 1);
        assert!(list.encoded_for(&[9; 20]).is_none());
        assert_eq!(list.encoded_for(&[7; 20]).unwrap(), expected(&[cert(1, 7)]));
    }
}
