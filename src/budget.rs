//! A per-worker budget of failed signature checks per downstream source.
//!
//! A token whose header and claims are right (issuer, audience, `kid` and
//! expiry are public) but whose signature is forged costs a full signature
//! check and is never cached: a cheap way to burn a worker's CPU. Past
//! `verification_budget` failures in one second, a source's tokens that are
//! not already cached are refused without a signature check until the next
//! second. Sources are addresses as Envoy gives them (`source.address`: the
//! peer, or the client Envoy derived from trusted `x-forwarded-for` hops);
//! IPv6 ones count per /64, the block one host usually holds.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// Most sources tracked per worker within one second; a flood from more
/// addresses than this is beyond what a per-source budget can stop.
pub const MAX_SOURCES: usize = 4096;

/// Longest source text kept when it is not an address (a pipe, say).
const MAX_SOURCE_TEXT: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Window {
    second: i64,
    failures: u32,
}

/// Failed signature checks per source in the current second.
#[derive(Debug, Default)]
pub struct VerificationBudget {
    /// Failures allowed per source per second; 0 turns the budget off.
    per_second: u32,
    windows: HashMap<String, Window>,
}

impl VerificationBudget {
    /// A budget of `per_second` failures per source (0: off).
    pub fn new(per_second: u32) -> VerificationBudget {
        VerificationBudget {
            per_second,
            windows: HashMap::new(),
        }
    }

    /// Whether `source` used up its failures for second `now`: its next
    /// uncached token is then refused without a signature check.
    pub fn exhausted(&self, source: Option<&str>, now: i64) -> bool {
        if self.per_second == 0 {
            return false;
        }
        self.windows
            .get(&source_key(source))
            .is_some_and(|w| w.second == now && w.failures >= self.per_second)
    }

    /// Counts one failed signature check of `source` at second `now`.
    pub fn charge(&mut self, source: Option<&str>, now: i64) {
        if self.per_second == 0 {
            return;
        }
        let key = source_key(source);
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_SOURCES {
            // Only this second's windows still count for anything.
            self.windows.retain(|_, w| w.second == now);
            if self.windows.len() >= MAX_SOURCES {
                return;
            }
        }
        let w = self.windows.entry(key).or_insert(Window {
            second: now,
            failures: 0,
        });
        if w.second != now {
            *w = Window {
                second: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }

    /// Sources tracked (for tests and stats).
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// The budget's key for a source: the IP without the port, an IPv6 address
/// as its /64, anything else as (at most 64 characters of) itself.
pub fn source_key(source: Option<&str>) -> String {
    let Some(text) = source else {
        return String::new();
    };
    let ip = text
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| text.parse::<IpAddr>());
    match ip.map(|ip| ip.to_canonical()) {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => {
            let [a, b, c, d, ..] = v6.segments();
            format!("{a:x}:{b:x}:{c:x}:{d:x}::/64")
        }
        Err(_) => text.chars().take(MAX_SOURCE_TEXT).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Option<&str> = Some("203.0.113.7:51000");

    #[test]
    fn a_source_is_exhausted_after_its_failures_until_the_next_second() {
        let mut b = VerificationBudget::new(3);
        for _ in 0..2 {
            b.charge(A, 100);
        }
        assert!(!b.exhausted(A, 100));
        b.charge(A, 100);
        assert!(b.exhausted(A, 100));
        // Another port of the same address is the same source; another address is not.
        assert!(b.exhausted(Some("203.0.113.7:9"), 100));
        assert!(!b.exhausted(Some("203.0.113.8:51000"), 100));
        // A new second starts a new window.
        assert!(!b.exhausted(A, 101));
        b.charge(A, 101);
        assert!(!b.exhausted(A, 101));
    }

    #[test]
    fn zero_turns_the_budget_off() {
        let mut b = VerificationBudget::new(0);
        for _ in 0..1000 {
            b.charge(A, 5);
        }
        assert!(!b.exhausted(A, 5));
        assert!(b.is_empty());
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            source_key(Some("[2001:db8:1:2:aaaa::1]:443")),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            source_key(Some("[2001:db8:1:2:ffff::9]:1")),
            source_key(Some("[2001:db8:1:2::]:2"))
        );
        assert_ne!(
            source_key(Some("[2001:db8:1:3::1]:1")),
            source_key(Some("[2001:db8:1:2::1]:1"))
        );
        assert_eq!(source_key(Some("[::ffff:192.0.2.1]:80")), "192.0.2.1");
        assert_eq!(source_key(Some("192.0.2.1")), "192.0.2.1");
        assert_eq!(source_key(None), "");
        let long = "x".repeat(500);
        assert_eq!(source_key(Some(&long)).len(), MAX_SOURCE_TEXT);
    }

    #[test]
    fn the_table_stays_bounded_and_stale_windows_make_room() {
        let mut b = VerificationBudget::new(1);
        for i in 0..(MAX_SOURCES + 100) {
            b.charge(Some(&format!("10.0.{}.{}:1", i / 256, i % 256)), 7);
        }
        assert_eq!(b.len(), MAX_SOURCES);
        // Untracked past the bound this second: counted as nothing, not refused.
        let late = format!(
            "10.0.{}.{}:1",
            (MAX_SOURCES + 50) / 256,
            (MAX_SOURCES + 50) % 256
        );
        assert!(!b.exhausted(Some(&late), 7));
        // The next second, stale windows give way to new sources.
        b.charge(Some("192.0.2.99:1"), 8);
        assert!(b.exhausted(Some("192.0.2.99:1"), 8));
        assert_eq!(b.len(), 1);
    }
}
