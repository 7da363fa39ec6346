//! When a fetched document (a provider's JWKS, the revocation list) is
//! fetched, and how long it serves: the schedule and freshness of one
//! document, whatever it holds. Time is passed in as Unix milliseconds (a
//! whole-second clock would refresh up to a second early); the host does the
//! fetching and sharing (`host/fetcher.rs`).

use crate::config::FetchSource;

/// What a document can offer a request right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Fetched within `refresh_seconds + max_stale_seconds`.
    Usable,
    /// There is one, but older than that: unreachable for too long.
    Stale,
    /// None yet, and no fetch has failed: the first may be under way.
    Pending,
    /// None yet, and the last fetch failed.
    Failed,
}

fn ms(seconds: u64) -> u64 {
    seconds.saturating_mul(1000)
}

/// What ends a request's wait for a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnds {
    /// Whatever comes next: a document, or a failed fetch.
    NextNews,
    /// Only the end of a fetch started at or after this time (ms): a key
    /// unknown now may have been added after a fetch already under way
    /// read the set, so that fetch cannot answer for it.
    FetchFrom(u64),
}

/// A request's wish for a document, granted: what ends its wait, and
/// whether a fetch must be asked for (`Some(true)`: on demand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wish {
    pub ends: WaitEnds,
    pub fetch: Option<bool>,
}

/// One document's bookkeeping: when it was fetched, whether a fetch is
/// running, and when the last on-demand refetch happened. The document
/// itself lives next to it, in the host; this only decides.
#[derive(Debug, Clone, Default)]
pub struct CacheClock {
    /// When the fetch that brought the current document started, ms
    /// (`None`: never): the endpoint served it at this time or later.
    pub fetched_at: Option<u64>,
    /// When the last fetch was started (ms), and whether it is still running.
    pub last_attempt: Option<u64>,
    pub in_flight: bool,
    /// The last fetch failed (or brought garbage).
    pub last_failed: bool,
    /// When the last on-demand refetch (an unknown `kid`) was asked for, ms.
    pub last_kid_refetch: Option<u64>,
    /// The latest start (ms) of a fetch that has ended, with a document or
    /// failed: a wait for a fetch started at or before it has its answer.
    pub settled_from: Option<u64>,
}

impl CacheClock {
    /// What a document fetched at `fetched_at` is worth at `now`.
    pub fn freshness(&self, src: &FetchSource, now: u64) -> Freshness {
        match self.fetched_at {
            Some(at) => {
                let until = at
                    .saturating_add(ms(src.refresh_seconds))
                    .saturating_add(ms(src.max_stale_seconds));
                if now <= until {
                    Freshness::Usable
                } else {
                    Freshness::Stale
                }
            }
            None if self.last_failed => Freshness::Failed,
            None => Freshness::Pending,
        }
    }

    /// Whether the document may be used at `now`.
    pub fn usable(&self, src: &FetchSource, now: u64) -> bool {
        self.freshness(src, now) == Freshness::Usable
    }

    /// Whether a scheduled fetch is due at `now`: the document is older than
    /// `refresh_seconds`, or missing and the last attempt is `retry_seconds` old.
    pub fn fetch_due(&self, src: &FetchSource, now: u64) -> bool {
        if self.in_flight {
            return false;
        }
        let retry_ok = self
            .last_attempt
            .is_none_or(|at| now >= at.saturating_add(ms(src.retry_seconds)));
        match self.fetched_at {
            None => retry_ok,
            Some(at) => now >= at.saturating_add(ms(src.refresh_seconds)) && retry_ok,
        }
    }

    /// Whether a request may trigger a refetch at `now` (an unknown `kid`:
    /// at most one per `min_refetch_seconds`, so junk cannot make us hammer
    /// the endpoint).
    pub fn kid_refetch_allowed(&self, src: &FetchSource, now: u64) -> bool {
        self.last_kid_refetch
            .is_none_or(|at| now >= at.saturating_add(ms(src.min_refetch_seconds)))
    }

    /// A request needs the document at `now` (`on_demand`: for an unknown
    /// `kid`). `None` when it may not wait (the refetch rate limit, with no
    /// refetch left to wait for): it is decided now.
    ///
    /// An unknown `kid` waits for a fetch started after it came: one under
    /// way may have read the set just before the key was added, so another
    /// follows it. Tokens of a new key come in bursts: those after the
    /// first wait for the refetch it asked for, while that has not ended
    /// (bounded by the fetch in flight and the refetch, each `timeout_ms`).
    pub fn want(&mut self, src: &FetchSource, now: u64, on_demand: bool) -> Option<Wish> {
        if !on_demand {
            return Some(Wish {
                ends: WaitEnds::NextNews,
                fetch: (!self.in_flight).then_some(false),
            });
        }
        if self.kid_refetch_allowed(src, now) {
            self.last_kid_refetch = Some(now);
            let running_serves = self.in_flight && self.last_attempt.is_some_and(|at| at >= now);
            return Some(Wish {
                ends: WaitEnds::FetchFrom(now),
                fetch: (!running_serves).then_some(true),
            });
        }
        let asked = self.last_kid_refetch?;
        let bound = asked
            .saturating_add(src.timeout_ms.saturating_mul(2))
            .saturating_add(1000);
        let open = !self.answers(WaitEnds::FetchFrom(asked)) && now < bound;
        open.then_some(Wish {
            ends: WaitEnds::FetchFrom(asked),
            fetch: None,
        })
    }

    /// Whether a wait that `ends` so has its answer (for `NextNews`: some
    /// fetch has ended, which the host knows better; always `true` here).
    pub fn answers(&self, ends: WaitEnds) -> bool {
        match ends {
            WaitEnds::NextNews => true,
            WaitEnds::FetchFrom(since) => self.settled_from.is_some_and(|at| at >= since),
        }
    }

    /// A fetch starts at `now`.
    pub fn started(&mut self, now: u64) {
        self.in_flight = true;
        self.last_attempt = Some(now);
    }

    /// The fetch ended: with a document whose fetch started at
    /// `fetched_at`, or failed (the one started at `last_attempt`).
    pub fn finished(&mut self, fetched_at: Option<u64>) {
        self.in_flight = false;
        self.last_failed = fetched_at.is_none();
        if fetched_at.is_some() {
            self.fetched_at = fetched_at;
        }
        if let Some(at) = fetched_at.or(self.last_attempt) {
            self.settled_from = Some(self.settled_from.map_or(at, |s| s.max(at)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> FetchSource {
        FetchSource {
            uri: "http://idp/jwks".into(),
            authority: "idp".into(),
            path: "/jwks".into(),
            cluster: "idp".into(),
            timeout_ms: 2000000,
            refresh_seconds: 300,
            max_stale_seconds: 3600,
            min_refetch_seconds: 30,
            retry_seconds: 1,
        }
    }

    #[test]
    fn cache_clock() {
        let src = src();
        let mut c = CacheClock::default();
        assert_eq!(c.freshness(&src, 1000000), Freshness::Pending);
        assert!(c.fetch_due(&src, 1000000));
        c.started(1000000);
        assert!(!c.fetch_due(&src, 1001000), "one fetch at a time");
        c.finished(None);
        assert!(c.last_failed);
        assert_eq!(c.freshness(&src, 1000000), Freshness::Failed);
        assert!(!c.fetch_due(&src, 1000000), "retry waits retry_seconds");
        assert!(c.fetch_due(&src, 1001000));
        c.started(1001000);
        c.finished(Some(1001000));
        assert_eq!(c.freshness(&src, 1001000), Freshness::Usable);
        assert!(c.usable(&src, 1001000));
        assert!(!c.fetch_due(&src, 1300000));
        assert!(c.fetch_due(&src, 1301000));
        // A failed refresh keeps the document until max_stale, then it is stale.
        c.started(1301000);
        c.finished(None);
        assert_eq!(c.freshness(&src, 1_001_000 + 3_900_000), Freshness::Usable);
        assert_eq!(c.freshness(&src, 1_001_000 + 3_900_001), Freshness::Stale);
        assert!(!c.usable(&src, 1_001_000 + 3_900_001));
        // On-demand refetches are rate limited.
        assert!(c.kid_refetch_allowed(&src, 2000000));
        assert!(c.want(&src, 2000000, true).is_some());
        c.started(2000000);
        c.finished(Some(2000000));
        assert!(!c.kid_refetch_allowed(&src, 2029000));
        assert!(c.kid_refetch_allowed(&src, 2030000));
    }

    /// The soak's race: a refresh under way when a key is added cannot
    /// answer the key's first tokens; a refetch after it does, and the
    /// burst of tokens that follows waits for that refetch rather than
    /// being refused by the rate limit.
    #[test]
    fn an_unknown_kid_waits_for_a_fetch_started_after_it() {
        let src = src();
        let mut c = CacheClock::default();
        c.started(1_000_000);
        c.finished(Some(1_000_000));
        // The scheduled refresh leaves at 1,300,000 and reads the old set.
        c.started(1_300_000);
        let first = c.want(&src, 1_300_003, true).unwrap();
        assert_eq!(first.ends, WaitEnds::FetchFrom(1_300_003));
        assert_eq!(
            first.fetch,
            Some(true),
            "another fetch must follow the one under way"
        );
        let second = c.want(&src, 1_300_004, true).unwrap();
        assert_eq!(
            second.ends,
            WaitEnds::FetchFrom(1_300_003),
            "waits for the first one's refetch"
        );
        assert_eq!(second.fetch, None, "asked for once");
        c.finished(Some(1_300_000));
        assert!(!c.answers(first.ends), "the old set answers nobody");
        assert!(
            c.want(&src, 1_300_005, true).is_some(),
            "still waiting for the refetch"
        );
        c.started(1_300_006);
        c.finished(Some(1_300_006));
        assert!(c.answers(first.ends) && c.answers(second.ends));
        // The refetch ended: within min_refetch_seconds an unknown kid is decided now.
        assert_eq!(c.want(&src, 1_300_007, true), None);
        // A failed refetch answers too (decided with the keys held).
        let later = c.want(&src, 1_400_000, true).unwrap();
        c.started(1_400_001);
        c.finished(None);
        assert!(c.answers(later.ends));
        // A refetch asked for but never answered is waited for at most twice timeout_ms.
        let src = FetchSource {
            timeout_ms: 2000,
            ..src
        };
        let mut c = CacheClock::default();
        let asked = c.want(&src, 5_000_000, true).unwrap();
        c.started(5_000_000);
        assert_eq!(
            c.want(&src, 5_000_001, true).map(|w| w.ends),
            Some(asked.ends)
        );
        assert_eq!(c.want(&src, 5_000_000 + 2 * 2000 + 1000, true), None);
        // A scheduled want fetches unless one runs.
        assert_eq!(c.want(&src, 5_000_002, false).map(|w| w.fetch), Some(None));
        c.finished(None);
        assert_eq!(
            c.want(&src, 5_000_003, false).map(|w| w.fetch),
            Some(Some(false))
        );
    }

    /// A document fetched late in a second is refreshed a whole interval
    /// later, not at the next whole second.
    #[test]
    fn refresh_counts_milliseconds() {
        let src = src();
        let mut c = CacheClock::default();
        c.started(1_000_950);
        c.finished(Some(1_000_950));
        assert!(!c.fetch_due(&src, 1_300_000));
        assert!(!c.fetch_due(&src, 1_300_949));
        assert!(c.fetch_due(&src, 1_300_950));
    }
}
