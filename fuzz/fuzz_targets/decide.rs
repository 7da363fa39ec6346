//! The whole decision (`decision::decide`) with the shipped policy and the
//! fixed keys, and the answer and identity headers built from it.
//!
//! Input: text. First line `METHOD PATH`, optionally prefixed by `!` (the
//! provider has no keys) and `?` (the request may wait for a fetch); every
//! further line is one `Authorization` value, in which `$name` stands for the
//! fixture token of that name (fixtures/tokens.txt), so that mutations reach
//! the rule checks behind a valid signature.
//!
//! Oracles: a request is answered; the rule named is the first whose method
//! and template match the safe path (none for a bad path or no match); an
//! allow on a protected rule carries a token the generator signed, one on a
//! public rule carries none; the same
//! request decided again, now through the verified-token cache, gets the same
//! verdict; identity headers and challenges hold no control characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_guard::answer::{deny, Reason};
use phi_guard::budget::VerificationBudget;
use phi_guard::decision::{
    challenge, decide, forwarded_headers, Facts, Request, Revocations, State, Trace, Verdict,
    WaitFor,
};
use phi_guard::fhir::Body;
use phi_guard::rules::SafePath;
use phi_guard::token::{extract_bearer, TokenCache};
use phi_guard_fuzz::{fixture, NOW};

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let policy = &f.shipped;
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or("");
    let no_keys = first.contains('!');
    let may_wait = first.contains('?');
    let first = first.trim_start_matches(['!', '?']);
    let (method, path) = first.split_once(' ').unwrap_or((first, "/"));
    let authorization: Vec<String> = lines.map(|l| expand(l, f)).collect();
    let authorization: Vec<&str> = authorization.iter().map(String::as_str).collect();
    let req = Request {
        method,
        path,
        authorization: &authorization,
        source: Some("192.0.2.1:4000"),
        tls_version: Some("TLSv1.3"),
        forwarded_proto: None,
        scheme: "https",
        authority: "fhir.example.org",
        dpop: &[],
        body: Body::Unread,
    };
    let keys = |_: usize| (!no_keys).then_some(&f.keys);
    let facts = Facts {
        keys: &keys,
        revocations: Revocations::Off,
        peer_cert: &|| None,
        dpop_first_use: &|_, _| true,
    };
    let mut state = State {
        cache: TokenCache::new(4),
        budget: VerificationBudget::new(0),
        introspection: Vec::new(),
    };

    let first = decide(
        policy,
        &facts,
        &mut state,
        &req,
        NOW,
        may_wait,
        &mut Trace::default(),
    );
    let mut trace = Trace::default();
    let again = decide(policy, &facts, &mut state, &req, NOW, may_wait, &mut trace);
    assert_eq!(
        summary(&first),
        summary(&again),
        "decided differently the second time (cache hit: {:?})",
        trace.token_cache_hit
    );

    let safe = SafePath::parse(path).ok();
    let first_match = safe.as_ref().and_then(|p| {
        policy
            .rules
            .iter()
            .position(|r| r.allows_method(method) && r.path.matches(p))
    });
    match &first {
        Verdict::Allow { rule, .. } => assert_eq!(Some(*rule), first_match),
        Verdict::Deny { reason, rule, .. } => match reason {
            Reason::BadPath => assert!(safe.is_none() && rule.is_none()),
            Reason::NoRule => assert!(safe.is_some() && first_match.is_none() && rule.is_none()),
            _ => assert_eq!(*rule, first_match),
        },
        Verdict::Wait(_) => assert!(first_match.is_some()),
        Verdict::NeedBody { .. } => panic!("the shipped policy reads no body"),
    }

    match &first {
        Verdict::Allow { rule, token, .. } => {
            let rule = policy.rules.get(*rule).expect("rule index");
            match token {
                None => assert!(rule.public, "{} allowed without a token", rule.id),
                Some(_) => {
                    let bearer = extract_bearer(&authorization).ok().flatten();
                    assert!(
                        bearer.is_some_and(|t| f.signed_by_generator(t)),
                        "allowed with a token nobody signed: {bearer:?}"
                    );
                }
            }
            for (name, value) in forwarded_headers(policy, rule, token.as_deref()) {
                assert!(!name.is_empty());
                assert!(
                    value.bytes().all(|b| (0x20..0x7f).contains(&b)),
                    "{value:?}"
                );
            }
        }
        Verdict::Deny { reason, rule, .. } => {
            let rule = rule.and_then(|i| policy.rules.get(i));
            let answer = deny(
                *reason,
                &policy.realm,
                challenge(rule, Some(&policy.dpop_algs), None),
            );
            assert!((400..600).contains(&answer.status));
            if let Some(www) = answer.www_authenticate {
                assert!(!www.chars().any(char::is_control), "{www:?}");
            }
        }
        Verdict::Wait(WaitFor::Keys { provider, .. }) => {
            assert!(may_wait && *provider < policy.providers.len());
        }
        Verdict::Wait(w) => panic!("waits for {w:?}, which the policy does not use"),
        Verdict::NeedBody { .. } => unreachable!("checked above"),
    }
});

/// `$name` replaced by the fixture token of that name, when there is one.
fn expand(line: &str, f: &phi_guard_fuzz::Fixture) -> String {
    match line.split_once('$') {
        Some((head, name)) => match f.token(name) {
            Some(token) => format!("{head}{token}"),
            None => line.to_owned(),
        },
        None => line.to_owned(),
    }
}

/// What must not change between two decisions of one request.
fn summary(v: &Verdict) -> (u8, Option<Reason>, Option<usize>) {
    match v {
        Verdict::Allow { rule, .. } => (0, None, Some(*rule)),
        Verdict::Deny { reason, rule, .. } => (1, Some(*reason), *rule),
        Verdict::Wait(WaitFor::Keys {
            provider,
            unknown_kid,
        }) => (2 + u8::from(*unknown_kid), None, Some(*provider)),
        Verdict::Wait(WaitFor::Revocations) => (4, None, None),
        Verdict::Wait(WaitFor::Introspection { provider, .. }) => (5, None, Some(*provider)),
        Verdict::NeedBody { rule, .. } => (6, None, Some(*rule)),
    }
}
