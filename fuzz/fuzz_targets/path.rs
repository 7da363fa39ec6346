//! Path safety (`SafePath::parse`), URI templates (`PathTemplate`) and the
//! query-token check.
//!
//! Input: text of three lines: template A, template B, request path (the rest
//! of the input, as Envoy's `:path`, query included).
//!
//! Oracles: a path accepted as safe has no dot segment (also `..;x`), no
//! empty segment, no encoded or raw separator, NUL or control character, and
//! decoding a segment a second time yields none of them either; its segments
//! rebuild its decoded form. A template that compiles matches a path built
//! from it (none is dead on arrival). If A covers B, every path B matches, A
//! matches too (what the config's shadowed-rule check relies on).
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_guard::rules::{query_has_access_token, PathTemplate, SafePath, MAX_PATH_LEN};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let a = lines.next().and_then(|t| PathTemplate::parse(t).ok());
    let b = lines.next().and_then(|t| PathTemplate::parse(t).ok());
    let raw = lines.next().unwrap_or("");
    let _ = query_has_access_token(raw);

    if let Ok(path) = SafePath::parse(raw) {
        check_safe(&path);
        if let (Some(a), Some(b)) = (&a, &b) {
            if a.covers(b) && b.matches(&path) {
                assert!(a.matches(&path), "{a} covers {b} but not {raw:?}");
            }
        }
    }
    for t in [&a, &b].into_iter().flatten() {
        let witness = witness(t.as_str());
        let path = SafePath::parse(&witness)
            .unwrap_or_else(|e| panic!("{t}: its own path {witness:?} is refused: {e}"));
        assert!(
            t.matches(&path),
            "{t} does not match its own path {witness:?}"
        );
    }
});

fn check_safe(path: &SafePath) {
    let received = path.as_received();
    assert!(received.starts_with('/') && received.len() <= MAX_PATH_LEN);
    assert!(!received.contains(['?', '#', '\\']));
    let lower = received.to_ascii_lowercase();
    assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%00"));
    let decoded = path.decoded();
    assert!(!decoded.contains("//"), "empty segment in {decoded:?}");
    let segments: Vec<&str> = path.segments().collect();
    assert_eq!(format!("/{}", segments.join("/")), decoded);
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        assert!(
            !segment.is_empty() || i == last,
            "empty segment in {decoded:?}"
        );
        for once in [segment.to_string(), decode_lenient(segment)] {
            let base = once.split(';').next().unwrap_or("");
            assert!(base != "." && base != "..", "dot segment in {decoded:?}");
            assert!(
                !once.contains(['/', '\\']) && !once.chars().any(char::is_control),
                "separator or control character in segment {once:?} of {decoded:?}"
            );
        }
    }
}

/// A percent-decode as a careless upstream does it: bad escapes stay as they are.
fn decode_lenient(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) if bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path the template must match: each variable, `*` or `**` becomes `x`.
fn witness(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(c) = rest.chars().next() {
        if c == '{' {
            let Some(end) = rest.find('}') else {
                break;
            };
            let inner = rest.get(1..end).unwrap_or("");
            let pattern = inner.split_once('=').map_or("*", |(_, p)| p);
            out.push_str(&witness_plain(pattern));
            rest = rest.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find('{').unwrap_or(rest.len());
            out.push_str(&witness_plain(rest.get(..end).unwrap_or("")));
            rest = rest.get(end..).unwrap_or("");
        }
    }
    out
}

fn witness_plain(text: &str) -> String {
    text.split('/')
        .map(|seg| if seg == "*" || seg == "**" { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}
