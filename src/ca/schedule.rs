//! The rotation schedule every key kind of the CA follows: a successor is
//! prepared (and published) at half of the active key's life, takes over at
//! 5/6 — earlier if the active key could no longer sign a full-length
//! credential, later if the successor was published late — and a key is
//! dropped once nothing it signed can be valid. A key dated in the future
//! never signs.

use std::time::{Duration, SystemTime};

use super::CaError;
use super::authority::BACKDATE;
use super::store::Role;

/// How far in the future a key's notBefore may lie and the key still
/// sign. Keys and leaves are backdated `BACKDATE` (10 s), so a clock set
/// back by a few seconds (an NTP step) leaves the signer valid or barely
/// ahead: replacing it then would put an unpublished key in charge, which
/// locks federated peers out until they fetch the bundle again, a far
/// worse harm than relying parties refusing chains for under a minute. A
/// clock that was wrong by hours or days (a bad RTC at boot, a clock set
/// back while writ was down) is far beyond it.
pub const NOT_BEFORE_ALLOWANCE: Duration = Duration::from_secs(60);

/// Whether something valid from `not_before` cannot be used at `now`: it
/// starts more than `NOT_BEFORE_ALLOWANCE` later.
pub fn not_yet_valid(not_before: SystemTime, now: SystemTime) -> bool {
    now.checked_add(NOT_BEFORE_ALLOWANCE)
        .is_some_and(|latest| not_before > latest)
}

/// What the schedule needs to know of a key, whatever its kind.
pub(crate) trait Scheduled: Clone {
    fn role(&self) -> Role;
    fn set_role(&mut self, role: Role);
    fn not_before(&self) -> SystemTime;
    /// The last moment the key may sign (credentials end no later).
    fn not_after(&self) -> SystemTime;
    /// When the key entered the bundle. Keys are published the moment they
    /// are created (the state naming them is written, then the bundle is
    /// rebuilt), and both kinds record their creation as notBefore
    /// backdated by `BACKDATE`. Derived rather than stored, so a restart
    /// in the middle of a publication lead finds the same switch-over time.
    fn published_at(&self) -> SystemTime {
        self.not_before()
            .checked_add(BACKDATE)
            .unwrap_or(self.not_before())
    }
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
    /// When the active key gets a successor: at half of its life, or
    /// sooner if it must hand over sooner (see `on_time_activation`).
    pub(crate) fn prepare_at<E: Scheduled>(&self, active: &E) -> SystemTime {
        fraction_of_life(active, 1, 2).min(self.on_time_activation(active))
    }

    /// When a successor prepared on time takes over: at 5/6 of the active
    /// key's life, or sooner if the active key could not sign a full
    /// `credential_ttl` credential until then.
    fn on_time_activation<E: Scheduled>(&self, active: &E) -> SystemTime {
        fraction_of_life(active, 5, 6).min(self.last_full_credential(active))
    }

    /// The last moment `active` can sign a credential of `credential_ttl`
    /// in full.
    fn last_full_credential<E: Scheduled>(&self, active: &E) -> SystemTime {
        active
            .not_after()
            .checked_sub(self.credential_ttl)
            .unwrap_or(active.not_before())
            .max(active.not_before())
    }

    /// When `next` takes over from `active`: on time (see
    /// `on_time_activation`), but never before `next` has been published
    /// for its `publication_lead`. Peers learn a key only by fetching the
    /// bundle, so one that signs before they could have fetched it (above
    /// all the bundle endpoint's own certificate, which they authenticate
    /// with the bundle they hold) locks them out until someone re-bundles
    /// by hand. A successor published on time always has its full lead by
    /// 5/6; one published late (writ was down at half-life) waits.
    pub(crate) fn activate_at<E: Scheduled>(&self, active: &E, next: &E) -> SystemTime {
        let published = next.published_at();
        let lead = self.publication_lead(active, published);
        self.on_time_activation(active)
            .max(published.checked_add(lead).unwrap_or(published))
    }

    /// How long a successor published at `published` stays in the bundle
    /// before it signs: the lead it gets on time (1/3 of the active key's
    /// life, from 1/2 to 5/6), cut so the active key can still sign
    /// full-length credentials up to the switch, but never below half of
    /// the life the active key had left at publication. The floor favours
    /// peers over credential length on purpose: credentials signed in the
    /// second half of that wait merely end with the active key (capped at
    /// its notAfter, shorter than their TTL), whereas a peer that misses
    /// the successor is locked out for good. Zero only once the active key
    /// has ended: then nothing but the successor can sign.
    fn publication_lead<E: Scheduled>(&self, active: &E, published: SystemTime) -> Duration {
        let on_time = fraction_of_life(active, 5, 6)
            .duration_since(fraction_of_life(active, 1, 2))
            .unwrap_or_default();
        let full_credentials = self
            .last_full_credential(active)
            .duration_since(published)
            .unwrap_or_default();
        let half_left = active
            .not_after()
            .duration_since(published)
            .unwrap_or_default()
            / 2;
        on_time.min(full_credentials.max(half_left))
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
        let step = match held.iter().find(|e| e.role() == Role::Next) {
            Some(next) => self.activate_at(active, next),
            None => self.prepare_at(active),
        };
        held.iter()
            .map(|e| self.drop_at(e))
            .fold(step, SystemTime::min)
    }

    /// Brings `held` up to `now`: drops keys past their drop time, then makes
    /// at most a few transitions (activate the next key, retire the old one,
    /// prepare a successor with `create`, which must return a `Next` key).
    /// A key created here signs at once only when nothing else can: nothing
    /// is held, or the active key has ended or is not valid yet
    /// (`Advanced::unpublished_signer`).
    pub(crate) fn advance<E: Scheduled>(
        &self,
        held: &[E],
        now: SystemTime,
        mut create: impl FnMut() -> Result<E, CaError>,
    ) -> Result<Advanced<E>, CaError> {
        let mut next_state: Vec<E> = held
            .iter()
            .filter(|e| now < self.drop_at(*e))
            .cloned()
            .collect();
        // Keys at this index or beyond were created by this call: no
        // bundle has carried them yet.
        let first_created = next_state.len();
        let mut created: Vec<E> = Vec::new();
        let mut unpublished_signer = false;
        // An active key dated in the future was made while the clock ran
        // ahead (a wrong RTC at boot, or the clock set back since): what it
        // signs does not verify now, so it is replaced at once, as if it
        // had expired. It stays published until it ends: harmless, and
        // what it signed verifies again should the clock be right after
        // all and move forward.
        for key in next_state.iter_mut() {
            if key.role() == Role::Active && not_yet_valid(key.not_before(), now) {
                key.set_role(Role::Retired);
            }
        }
        // Each pass makes one transition; two suffice in practice (activate,
        // then prepare), the bound only guards against a degenerate schedule.
        for _ in 0..4 {
            let active = next_state.iter().position(|e| e.role() == Role::Active);
            let next = next_state.iter().position(|e| e.role() == Role::Next);
            match (active, next) {
                (None, Some(n)) => {
                    if not_yet_valid(next_state[n].not_before(), now) {
                        // Dated in the future like the active key was: it
                        // cannot take over either, so the next pass makes
                        // a key valid now. (With an active key, the
                        // schedule never activates a successor before its
                        // publication, which is after its notBefore.)
                        next_state[n].set_role(Role::Retired);
                    } else {
                        unpublished_signer |= n >= first_created;
                        next_state[n].set_role(Role::Active);
                    }
                }
                (None, None) => {
                    // Nothing usable held (first start, everything expired
                    // while we were down, or dated in the future): a new
                    // key must sign at once. Only the latter two are worth
                    // a warning: on a first start no peer holds anything
                    // of ours yet.
                    let entry = create()?;
                    created.push(entry.clone());
                    let mut entry = entry;
                    entry.set_role(Role::Active);
                    next_state.push(entry);
                    unpublished_signer |= !held.is_empty();
                }
                (Some(a), Some(n)) => {
                    if now < self.activate_at(&next_state[a], &next_state[n]) {
                        break;
                    }
                    unpublished_signer |= n >= first_created;
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
        Ok(Advanced {
            held: next_state,
            created,
            unpublished_signer,
        })
    }
}

/// What `Schedule::advance` made of the keys held.
pub(crate) struct Advanced<E> {
    /// The keys to hold from now on, oldest first.
    pub held: Vec<E>,
    /// The keys it created (their files must be written).
    pub created: Vec<E>,
    /// A key that no bundle has carried yet signs from now on, because
    /// nothing else could (the active key expired while writ was down, or
    /// was dated in the future):
    /// federated peers cannot know it until they fetch the bundle again,
    /// which they cannot do over https_spiffe if it signs the endpoint's
    /// certificate too.
    pub unpublished_signer: bool,
}

fn fraction_of_life<E: Scheduled>(key: &E, num: u32, den: u32) -> SystemTime {
    let life = key
        .not_after()
        .duration_since(key.not_before())
        .unwrap_or_default();
    key.not_before() + life * num / den
}
