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

/// One document's bookkeeping: when it was fetched, whether a fetch is
/// running, and when the last on-demand refetch happened. The document
/// itself lives next to it, in the host; this only decides.
#[derive(Debug, Clone, Default)]
pub struct CacheClock {
    /// When the current document was fetched, ms (`None`: never).
    pub fetched_at: Option<u64>,
    /// When the last fetch was started (ms), and whether it is still running.
    pub last_attempt: Option<u64>,
    pub in_flight: bool,
    /// The last fetch failed (or brought garbage).
    pub last_failed: bool,
    /// When the last on-demand refetch (an unknown `kid`) was started, ms.
    pub last_kid_refetch: Option<u64>,
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

    /// A fetch starts at `now`.
    pub fn started(&mut self, now: u64, for_unknown_kid: bool) {
        self.in_flight = true;
        self.last_attempt = Some(now);
        if for_unknown_kid {
            self.last_kid_refetch = Some(now);
        }
    }

    /// The fetch ended: with a document fetched at `fetched_at`, or failed.
    pub fn finished(&mut self, fetched_at: Option<u64>) {
        self.in_flight = false;
        self.last_failed = fetched_at.is_none();
        if fetched_at.is_some() {
            self.fetched_at = fetched_at;
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
        c.started(1000000, false);
        assert!(!c.fetch_due(&src, 1001000), "one fetch at a time");
        c.finished(None);
        assert!(c.last_failed);
        assert_eq!(c.freshness(&src, 1000000), Freshness::Failed);
        assert!(!c.fetch_due(&src, 1000000), "retry waits retry_seconds");
        assert!(c.fetch_due(&src, 1001000));
        c.started(1001000, false);
        c.finished(Some(1001000));
        assert_eq!(c.freshness(&src, 1001000), Freshness::Usable);
        assert!(c.usable(&src, 1001000));
        assert!(!c.fetch_due(&src, 1300000));
        assert!(c.fetch_due(&src, 1301000));
        // A failed refresh keeps the document until max_stale, then it is stale.
        c.started(1301000, false);
        c.finished(None);
        assert_eq!(c.freshness(&src, 1_001_000 + 3_900_000), Freshness::Usable);
        assert_eq!(c.freshness(&src, 1_001_000 + 3_900_001), Freshness::Stale);
        assert!(!c.usable(&src, 1_001_000 + 3_900_001));
        // On-demand refetches are rate limited.
        assert!(c.kid_refetch_allowed(&src, 2000000));
        c.started(2000000, true);
        c.finished(Some(2000000));
        assert!(!c.kid_refetch_allowed(&src, 2029000));
        assert!(c.kid_refetch_allowed(&src, 2030000));
    }

    /// A document fetched late in a second is refreshed a whole interval
    /// later, not at the next whole second.
    #[test]
    fn refresh_counts_milliseconds() {
        let src = src();
        let mut c = CacheClock::default();
        c.started(1_000_950, false);
        c.finished(Some(1_000_950));
        assert!(!c.fetch_due(&src, 1_300_000));
        assert!(!c.fetch_due(&src, 1_300_949));
        assert!(c.fetch_due(&src, 1_300_950));
    }
}
