//! The JWT-SVIDs writ has handed out, to hand out again to the same
//! process for the same identity and audience while they are in the first
//! half of their life (as SPIRE's agent does: a caller fetching before
//! every request gets one token, not a signature and an fsync each time).
//!
//! Bounded in count and in bytes: a caller chooses its audience, and with
//! it the size of its token (up to 16 KiB), so a count alone let one caller
//! pin hundreds of MiB.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::jwt::JwtSvid;

/// Tokens kept at most.
pub const MAX_TOKENS: usize = 16_384;
/// Bytes kept at most (tokens, their keys and a fixed overhead each).
pub const MAX_BYTES: usize = 16 * 1024 * 1024;
/// What an entry costs beyond its strings: the map slot, the struct, the
/// allocations' headers.
const ENTRY_OVERHEAD: usize = 256;

/// Whose JWT-SVID a cached token is: one process (pid and start time, so a
/// reused PID never inherits it), one identity, one audience list. Tokens
/// are not shared between processes, so each token's issuance record names
/// the only process that ever received it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtCacheKey {
    pub pid: i32,
    pub start_time: u64,
    pub identity: String,
    pub audience: Vec<String>,
}

#[derive(Default)]
pub struct JwtSvidCache {
    tokens: HashMap<JwtCacheKey, JwtSvid>,
    bytes: usize,
}

impl JwtSvidCache {
    /// The token for `key`, while in the first half of its life at `now`.
    pub fn get(&self, key: &JwtCacheKey, now: SystemTime) -> Option<JwtSvid> {
        let svid = self.tokens.get(key)?;
        (now >= svid.issued_at && !past_half_life(svid, now)).then(|| svid.clone())
    }

    /// Keeps `svid` for `key`. At either bound, tokens past half-life go
    /// first; if that frees too little, everything goes (callers simply get
    /// fresh tokens) rather than scanning again on every insert. A token
    /// that alone would take more than a tenth of the bytes is not kept.
    pub fn insert(&mut self, key: JwtCacheKey, svid: JwtSvid, now: SystemTime) {
        let cost = cost(&key, &svid);
        if cost > MAX_BYTES / 10 {
            self.remove(&key);
            return;
        }
        if self.tokens.len() >= MAX_TOKENS || self.bytes + cost > MAX_BYTES {
            self.retain(|_, s| !past_half_life(s, now));
            if self.tokens.len() >= MAX_TOKENS / 2 || self.bytes + cost > MAX_BYTES / 2 {
                self.clear();
            }
        }
        self.remove(&key);
        self.bytes += cost;
        self.tokens.insert(key, svid);
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&JwtCacheKey, &JwtSvid) -> bool) {
        let mut freed = 0;
        self.tokens.retain(|k, s| {
            let kept = keep(k, s);
            if !kept {
                freed += cost(k, s);
            }
            kept
        });
        self.bytes -= freed;
    }

    pub fn clear(&mut self) {
        self.tokens.clear();
        self.bytes = 0;
    }

    fn remove(&mut self, key: &JwtCacheKey) {
        if let Some(old) = self.tokens.remove(key) {
            self.bytes -= cost(key, &old);
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tokens.len()
    }
}

fn past_half_life(svid: &JwtSvid, now: SystemTime) -> bool {
    let lifetime = svid
        .expires_at
        .duration_since(svid.issued_at)
        .unwrap_or_default();
    now >= svid.issued_at + lifetime / 2
}

fn cost(key: &JwtCacheKey, svid: &JwtSvid) -> usize {
    ENTRY_OVERHEAD
        + key.identity.len()
        + key.audience.iter().map(String::len).sum::<usize>()
        + svid.token.len()
        + svid.key_id.len()
        + svid.jti.len()
        + svid.spiffe_id.trust_domain().name().len()
        + svid.spiffe_id.path().len()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn token(audience_bytes: usize, issued_at: SystemTime) -> (JwtCacheKey, JwtSvid) {
        let audience = "a".repeat(audience_bytes);
        let key = JwtCacheKey {
            pid: 1,
            start_time: 1,
            identity: format!("id-{audience_bytes}-{}", rand_suffix()),
            audience: vec![audience.clone()],
        };
        let svid = JwtSvid {
            spiffe_id: "spiffe://writ.test/w".parse().unwrap(),
            token: format!("h.{audience}.s"),
            key_id: "k".into(),
            jti: "j".into(),
            issued_at,
            expires_at: issued_at + Duration::from_secs(300),
        };
        (key, svid)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn large_tokens_are_bounded_by_bytes_not_only_by_count() {
        let now = SystemTime::now();
        let mut cache = JwtSvidCache::default();
        // 11 KiB audiences, as a caller may choose: far fewer than
        // MAX_TOKENS fit, and the bytes never pass the bound.
        for _ in 0..5_000 {
            let (key, svid) = token(11 * 1024, now);
            cache.insert(key, svid, now);
            assert!(cache.bytes() <= MAX_BYTES, "{}", cache.bytes());
        }
        assert!(cache.len() < 1_500, "{}", cache.len());
        // Counted exactly: emptying it leaves nothing.
        cache.retain(|_, _| false);
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    #[test]
    fn a_token_is_served_again_until_half_life_and_replaced_in_place() {
        let now = SystemTime::now();
        let mut cache = JwtSvidCache::default();
        let (key, svid) = token(10, now);
        cache.insert(key.clone(), svid.clone(), now);
        let one = cache.bytes();
        assert_eq!(
            cache.get(&key, now).map(|s| s.token),
            Some(svid.token.clone())
        );
        assert!(cache.get(&key, now + Duration::from_secs(150)).is_none());
        // The same key again: still one entry's bytes.
        cache.insert(key.clone(), svid, now);
        assert_eq!((cache.len(), cache.bytes()), (1, one));
        // One that alone would take a tenth of the budget is not kept.
        let (big_key, big) = token(MAX_BYTES / 10, now);
        cache.insert(big_key.clone(), big, now);
        assert!(cache.get(&big_key, now).is_none());
        assert_eq!(cache.bytes(), one);
    }
}
