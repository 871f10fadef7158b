//! The rotation schedule every key kind of the CA follows: a successor is
//! prepared (and published) at half of the active key's life, takes over at
//! 5/6 — earlier if the active key could no longer sign a full-length
//! credential — and a key is dropped once nothing it signed can be valid.

use std::time::{Duration, SystemTime};

use super::CaError;
use super::store::Role;

/// What the schedule needs to know of a key, whatever its kind.
pub(crate) trait Scheduled: Clone {
    fn role(&self) -> Role;
    fn set_role(&mut self, role: Role);
    fn not_before(&self) -> SystemTime;
    /// The last moment the key may sign (credentials end no later).
    fn not_after(&self) -> SystemTime;
}

/// The timing rules of one key kind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    /// The longest credential the active key must always be able to sign in
    /// full: its successor takes over at least this long before it ends.
    pub credential_ttl: Duration,
    /// How long a key stays published after `not_after`. X.509 roots need
    /// none (a certificate cannot outlive its issuer); JWT keys keep a margin
    /// for validators whose clocks run behind.
    pub linger: Duration,
}

impl Schedule {
    pub(crate) fn prepare_at<E: Scheduled>(&self, active: &E) -> SystemTime {
        fraction_of_life(active, 1, 2).min(self.activate_at(active))
    }

    pub(crate) fn activate_at<E: Scheduled>(&self, active: &E) -> SystemTime {
        let last_full_credential = active
            .not_after()
            .checked_sub(self.credential_ttl)
            .unwrap_or(active.not_before())
            .max(active.not_before());
        fraction_of_life(active, 5, 6).min(last_full_credential)
    }

    pub(crate) fn drop_at<E: Scheduled>(&self, key: &E) -> SystemTime {
        key.not_after()
            .checked_add(self.linger)
            .unwrap_or(key.not_after())
    }

    /// When `advance` next has work to do for `held` (may be in the past).
    pub(crate) fn next_event<E: Scheduled>(&self, held: &[E]) -> SystemTime {
        let Some(active) = held.iter().find(|e| e.role() == Role::Active) else {
            return SystemTime::UNIX_EPOCH;
        };
        let has_next = held.iter().any(|e| e.role() == Role::Next);
        let step = if has_next {
            self.activate_at(active)
        } else {
            self.prepare_at(active)
        };
        held.iter()
            .map(|e| self.drop_at(e))
            .fold(step, SystemTime::min)
    }

    /// Brings `held` up to `now`: drops keys past their drop time, then makes
    /// at most a few transitions (activate the next key, retire the old one,
    /// prepare a successor with `create`, which must return a `Next` key).
    /// Returns the new list, oldest first, and the keys created.
    pub(crate) fn advance<E: Scheduled>(
        &self,
        held: &[E],
        now: SystemTime,
        mut create: impl FnMut() -> Result<E, CaError>,
    ) -> Result<(Vec<E>, Vec<E>), CaError> {
        let mut next_state: Vec<E> = held
            .iter()
            .filter(|e| now < self.drop_at(*e))
            .cloned()
            .collect();
        let mut created: Vec<E> = Vec::new();
        // Each pass makes one transition; two suffice in practice (activate,
        // then prepare), the bound only guards against a degenerate schedule.
        for _ in 0..4 {
            let active = next_state.iter().position(|e| e.role() == Role::Active);
            let next = next_state.iter().position(|e| e.role() == Role::Next);
            match (active, next) {
                (None, Some(n)) => next_state[n].set_role(Role::Active),
                (None, None) => {
                    // Nothing held (first start, or everything expired while
                    // we were down): a new key must sign at once.
                    let entry = create()?;
                    created.push(entry.clone());
                    let mut entry = entry;
                    entry.set_role(Role::Active);
                    next_state.push(entry);
                }
                (Some(a), Some(n)) => {
                    if now < self.activate_at(&next_state[a]) {
                        break;
                    }
                    next_state[a].set_role(Role::Retired);
                    next_state[n].set_role(Role::Active);
                }
                (Some(a), None) => {
                    if now < self.prepare_at(&next_state[a]) {
                        break;
                    }
                    let entry = create()?;
                    created.push(entry.clone());
                    next_state.push(entry);
                }
            }
        }
        next_state.sort_by_key(|e| e.not_before());
        Ok((next_state, created))
    }
}

fn fraction_of_life<E: Scheduled>(key: &E, num: u32, den: u32) -> SystemTime {
    let life = key
        .not_after()
        .duration_since(key.not_before())
        .unwrap_or_default();
    key.not_before() + life * num / den
}
