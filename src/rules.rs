//! The pure rule-matching core: request-path safety, Envoy URI-template
//! matching and scope logic. No host calls, no clock, no panics.
//!
//! # Paths
//!
//! [`SafePath::parse`] refuses, before any rule is tried, every path whose
//! meaning could differ between phi-guard and the upstream: encoded `/` or
//! `\`, a literal `\`, dot segments (also percent-encoded, also Servlet-style
//! `..;param`), NUL and other control characters, malformed or non-UTF-8
//! percent-encoding or raw bytes, empty segments (`//`), and paths that are not absolute or
//! are over [`MAX_PATH_LEN`] bytes. Everything else is percent-decoded exactly
//! once and matched segment by segment. As a second line of defence against
//! upstreams that decode twice, a segment is also refused when a *second*
//! decode would turn it into a separator, a control character or a dot segment
//! (`%252f`, `%252e%252e`); a double-encoded ordinary character (`%2541`) stays
//! the literal text `%41`.
//!
//! # Templates
//!
//! [`PathTemplate`] follows Envoy's `envoy.extensions.path.match.uri_template`
//! (`source/extensions/path/uri_template_lib`), where a template compiles to a
//! regex joined with `/`:
//!
//! - `*` and `{name}` / `{name=*}` match exactly one non-empty segment
//!   (Envoy: `[pchar]+`).
//! - `**` and `{name=**}` match the rest of the path after the preceding `/`,
//!   which may be empty (Envoy: `[pchar/]*`). So `/files/**` matches `/files/`
//!   and `/files/a/b` but not `/files`: the slash before `**` is required.
//! - `{name=a/*}` (a variable over several segments) is accepted and matched
//!   like the segments it names.
//! - A trailing `/` in a template is a final empty literal, as in Envoy:
//!   `/fhir/` matches `/fhir/` only.
//! - Literals use Envoy's character set (`A-Za-z0-9-._~%!$&'()+,;:@`) and are
//!   compared case-sensitively with the *decoded* request segment, so
//!   `/fhir/$export` also matches `/fhir/%24export` (what the upstream serves).
//! - Variable names are `[A-Za-z][A-Za-z0-9_]*`, at most 16 bytes, at most 5
//!   per template, no repeats (Envoy's limits).
//!
//! Stricter than Envoy, refused at load: `**` anywhere but last (Envoy allows
//! literals after it), suffixes after a variable or glob (`{id}.json`,
//! `/**.mpd`), and literals that no safe request path could ever match.

use std::fmt;

/// Longest request path (query excluded) that is matched at all.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path template accepted in the configuration.
pub const MAX_TEMPLATE_LEN: usize = 1024;
/// Envoy's limit on variables per template.
const MAX_VARIABLES: usize = 5;
/// Envoy's limit on the length of a variable name.
const MAX_VARIABLE_NAME_LEN: usize = 16;

// ---------------------------------------------------------------------------
// Path safety

/// Why a request path was refused before any rule was tried (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    EncodedSlash,
    EncodedBackslash,
    Backslash,
    DotSegment,
    Nul,
    EmptySegment,
    BadEncoding,
    NotAbsolute,
    TooLong,
    ControlChar,
}

impl PathError {
    /// Stable snake_case reason code for the audit record.
    pub fn code(self) -> &'static str {
        match self {
            PathError::EncodedSlash => "encoded_slash",
            PathError::EncodedBackslash => "encoded_backslash",
            PathError::Backslash => "backslash",
            PathError::DotSegment => "dot_segment",
            PathError::Nul => "nul",
            PathError::EmptySegment => "empty_segment",
            PathError::BadEncoding => "bad_encoding",
            PathError::NotAbsolute => "not_absolute",
            PathError::TooLong => "too_long",
            PathError::ControlChar => "control_char",
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl std::error::Error for PathError {}

/// A request path made safe for matching: query and fragment dropped,
/// percent-decoded exactly once, split into segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePath {
    received: String,
    /// `None` when the path has no `%` and so decodes to itself.
    decoded: Option<String>,
}

impl SafePath {
    /// Checks and decodes `raw`, Envoy's `:path` pseudo-header (may include `?query`).
    pub fn parse(raw: &str) -> Result<SafePath, PathError> {
        let path = raw.split(['?', '#']).next().unwrap_or(raw);
        if path.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        if !path.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        for c in path.chars() {
            check_char(c)?;
        }
        let decoded = if path.contains('%') {
            let mut bytes = Vec::with_capacity(path.len());
            decode_strict(path.as_bytes(), &mut bytes)?;
            let s = String::from_utf8(bytes).map_err(|_| PathError::BadEncoding)?;
            // Raw characters were checked above; this catches decoded C1 controls.
            for c in s.chars() {
                check_char(c)?;
            }
            Some(s)
        } else {
            None
        };
        let view = decoded.as_deref().unwrap_or(path);
        // Encoded slashes are refused, so every `/` here was a raw `/`.
        if view.contains("//") {
            return Err(PathError::EmptySegment);
        }
        for segment in split_segments(view) {
            check_segment(segment)?;
        }
        Ok(SafePath {
            received: path.to_owned(),
            decoded,
        })
    }

    /// The path without the query string, as received (not decoded) — for the audit record.
    pub fn as_received(&self) -> &str {
        &self.received
    }

    /// The path decoded once, as matched.
    pub fn decoded(&self) -> &str {
        self.decoded.as_deref().unwrap_or(&self.received)
    }

    /// The decoded segments; a trailing `/` yields a final empty segment.
    pub fn segments(&self) -> impl Iterator<Item = &str> + '_ {
        split_segments(self.decoded())
    }
}

/// `raw`'s query string contains an `access_token` parameter (RFC 6750 §2.3),
/// which phi-guard never accepts.
///
/// Parameter names are compared after one percent-decode (`+` as space),
/// ASCII case-insensitively; `&`, `;` and `#` all separate parameters, so that
/// no upstream parser can find a token this one missed.
pub fn query_has_access_token(raw: &str) -> bool {
    let Some((_, query)) = raw.split_once('?') else {
        return false;
    };
    query.split(['&', ';', '#']).any(|param| {
        let name = param.split('=').next().unwrap_or(param);
        decoded_eq_ignore_ascii_case(name, "access_token")
    })
}

fn split_segments(path: &str) -> std::str::Split<'_, char> {
    path.strip_prefix('/').unwrap_or(path).split('/')
}

fn check_char(c: char) -> Result<(), PathError> {
    match c {
        '\\' => Err(PathError::Backslash),
        '\0' => Err(PathError::Nul),
        c if c.is_control() => Err(PathError::ControlChar),
        // Raw bytes that were not UTF-8, as the host adapter hands them over.
        '\u{FFFD}' => Err(PathError::BadEncoding),
        _ => Ok(()),
    }
}

/// What a `%HH` may not decode to.
fn check_encoded(byte: u8) -> Result<(), PathError> {
    match byte {
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::EncodedBackslash),
        0 => Err(PathError::Nul),
        b if b < 0x20 || b == 0x7f => Err(PathError::ControlChar),
        _ => Ok(()),
    }
}

/// Checks one decoded segment: no dot segment, and nothing a second decode
/// would turn into structure.
fn check_segment(segment: &str) -> Result<(), PathError> {
    if is_dot_segment(segment) {
        return Err(PathError::DotSegment);
    }
    if segment.contains('%') {
        check_second_decode(segment)?;
    }
    Ok(())
}

/// `.` or `..`, also with a `;param` tail, which Servlet containers drop
/// before resolving (`/public/..;/admin`).
fn is_dot_segment(segment: &str) -> bool {
    let base = segment.split(';').next().unwrap_or(segment);
    base == "." || base == ".."
}

/// Refuses a decoded segment that an upstream decoding twice would read as a
/// separator, control character, invalid UTF-8 or dot segment. Rare, so it may
/// allocate.
fn check_second_decode(segment: &str) -> Result<(), PathError> {
    let mut bytes = Vec::with_capacity(segment.len());
    for unit in PctDecode::new(segment.as_bytes()) {
        match unit {
            Unit::Raw(b) => bytes.push(b),
            Unit::Encoded(b) => {
                check_encoded(b)?;
                bytes.push(b);
            }
            Unit::Malformed => bytes.push(b'%'),
        }
    }
    let twice = String::from_utf8(bytes).map_err(|_| PathError::BadEncoding)?;
    for c in twice.chars() {
        check_char(c)?;
    }
    if is_dot_segment(&twice) {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

/// Decodes every `%HH` in `input` into `out`, refusing malformed escapes and
/// escapes that [`check_encoded`] refuses.
fn decode_strict(input: &[u8], out: &mut Vec<u8>) -> Result<(), PathError> {
    for unit in PctDecode::new(input) {
        match unit {
            Unit::Raw(b) => out.push(b),
            Unit::Encoded(b) => {
                check_encoded(b)?;
                out.push(b);
            }
            Unit::Malformed => return Err(PathError::BadEncoding),
        }
    }
    Ok(())
}

/// Whether `raw`, percent-decoded once (`+` as space), equals `target`
/// ignoring ASCII case. Does not allocate.
fn decoded_eq_ignore_ascii_case(raw: &str, target: &str) -> bool {
    let mut want = target.bytes();
    for unit in PctDecode::new(raw.as_bytes()) {
        let got = match unit {
            Unit::Raw(b'+') => b' ',
            Unit::Raw(b) | Unit::Encoded(b) => b,
            Unit::Malformed => b'%',
        };
        match want.next() {
            Some(w) if w.eq_ignore_ascii_case(&got) => {}
            _ => return false,
        }
    }
    want.next().is_none()
}

/// One unit of percent-decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// A byte that was not part of an escape.
    Raw(u8),
    /// The byte a valid `%HH` stands for.
    Encoded(u8),
    /// A `%` not followed by two hex digits (the `%` alone is consumed).
    Malformed,
}

/// Iterates the units of a byte string, without allocating.
struct PctDecode<'a> {
    rest: &'a [u8],
}

impl<'a> PctDecode<'a> {
    fn new(input: &'a [u8]) -> Self {
        PctDecode { rest: input }
    }
}

impl Iterator for PctDecode<'_> {
    type Item = Unit;

    fn next(&mut self) -> Option<Unit> {
        let (&first, tail) = self.rest.split_first()?;
        if first == b'%' {
            if let [hi, lo, after @ ..] = tail {
                if let (Some(hi), Some(lo)) = (hex_value(*hi), hex_value(*lo)) {
                    self.rest = after;
                    return Some(Unit::Encoded(hi << 4 | lo));
                }
            }
            self.rest = tail;
            return Some(Unit::Malformed);
        }
        self.rest = tail;
        Some(Unit::Raw(first))
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// URI templates

/// Why a path did not match a template; `at` counts the path's segments
/// from 0 (the one after the leading `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathMismatch {
    /// The path ends where the template wants segment `at`.
    TooShort { at: usize },
    /// The path goes on past the template's last segment (`at` is the first extra one).
    TooLong { at: usize },
    /// Segment `at` is empty (a trailing `/`) where the template wants a value.
    EmptySegment { at: usize },
    /// Segment `at` is not the template's literal there.
    Literal { at: usize },
}

/// One compiled template segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Equals the decoded request segment exactly (may be empty: trailing `/`).
    Literal(String),
    /// `*`, `{name}`, `{name=*}`: one non-empty segment.
    One,
    /// `**`, `{name=**}`: the rest of the path after the `/`, possibly empty.
    Rest,
}

/// A compiled Envoy URI template (`/fhir/Patient/{id}`, `/files/{path=**}`,
/// `*`, `**`, and literal segments such as `$export`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    source: String,
    segments: Vec<Segment>,
}

impl PathTemplate {
    /// Compiles `template`, or says what is wrong with it (config-load time).
    pub fn parse(template: &str) -> Result<PathTemplate, String> {
        if template.is_empty() {
            return Err("path template is empty".into());
        }
        if template.len() > MAX_TEMPLATE_LEN {
            return Err(format!(
                "path template is {} bytes; the limit is {MAX_TEMPLATE_LEN}",
                template.len()
            ));
        }
        let Some(mut rest) = template.strip_prefix('/') else {
            return Err("path template must start with `/`".into());
        };
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        if rest.is_empty() {
            // `/` matches only the path `/`, whose one segment is empty.
            segments.push(Segment::Literal(String::new()));
        }
        while !rest.is_empty() {
            let (piece, more) = next_piece(rest)?;
            compile_piece(piece, &mut segments, &mut names)?;
            rest = match more {
                None => "",
                Some("") => {
                    segments.push(Segment::Literal(String::new()));
                    ""
                }
                Some(more) => more,
            };
        }
        if let Some(at) = segments.iter().position(|s| *s == Segment::Rest) {
            if at + 1 != segments.len() {
                return Err("`**` (or `{name=**}`) must be the last segment".into());
            }
        }
        if names.len() > MAX_VARIABLES {
            return Err(format!(
                "path template has {} variables; the limit is {MAX_VARIABLES}",
                names.len()
            ));
        }
        Ok(PathTemplate {
            source: template.to_owned(),
            segments,
        })
    }

    /// Whether `path` matches this template. Does not allocate.
    pub fn matches(&self, path: &SafePath) -> bool {
        self.mismatch(path).is_none()
    }

    /// Why `path` does not match this template (`None`: it matches). The
    /// one matcher: [`PathTemplate::matches`] and `phi-guard explain` both
    /// ask it. Does not allocate.
    pub fn mismatch(&self, path: &SafePath) -> Option<PathMismatch> {
        self.mismatch_segments(path.segments())
    }

    /// The literal the template wants at segment `at` (0-based), if it wants one there.
    pub fn literal_at(&self, at: usize) -> Option<&str> {
        match self.segments.get(at) {
            Some(Segment::Literal(lit)) => Some(lit),
            _ => None,
        }
    }

    /// Whether every path `other` matches is matched by `self` too (so a
    /// rule with `other` placed after one with `self` can be hidden). Errs
    /// towards `false` where the templates cannot be compared segment by segment.
    pub fn covers(&self, other: &PathTemplate) -> bool {
        let mut theirs = other.segments.iter();
        for mine in &self.segments {
            let Some(their) = theirs.next() else {
                return false;
            };
            let covered = match (mine, their) {
                (Segment::Rest, _) => return true,
                (Segment::One, Segment::One) => true,
                (Segment::One, Segment::Literal(lit)) => !lit.is_empty(),
                (Segment::Literal(a), Segment::Literal(b)) => a == b,
                _ => false,
            };
            if !covered {
                return false;
            }
        }
        theirs.next().is_none()
    }

    /// Whether some path matches both templates (`phi-guard lint`: could
    /// this rule serve a path under a PHI prefix, or a high-risk path?).
    pub fn overlaps(&self, other: &PathTemplate) -> bool {
        let (mut mine, mut theirs) = (self.segments.as_slice(), other.segments.as_slice());
        loop {
            match (mine.split_first(), theirs.split_first()) {
                (None, None) => return true,
                // `**` needs the `/` before it, so a path that ends there is not matched.
                (Some((Segment::Rest, _)), Some(_)) | (Some(_), Some((Segment::Rest, _))) => {
                    return true
                }
                (None, Some(_)) | (Some(_), None) => return false,
                (Some((a, a_rest)), Some((b, b_rest))) => {
                    let both = match (a, b) {
                        (Segment::Literal(x), Segment::Literal(y)) => x == y,
                        (Segment::One, Segment::Literal(l))
                        | (Segment::Literal(l), Segment::One) => !l.is_empty(),
                        _ => true,
                    };
                    if !both {
                        return false;
                    }
                    (mine, theirs) = (a_rest, b_rest);
                }
            }
        }
    }

    /// The template's literal segments (decoded), in order.
    pub fn literals(&self) -> impl Iterator<Item = &str> + '_ {
        self.segments.iter().filter_map(|s| match s {
            Segment::Literal(l) => Some(l.as_str()),
            _ => None,
        })
    }

    /// The template as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    fn mismatch_segments<'a>(
        &self,
        mut path: impl Iterator<Item = &'a str>,
    ) -> Option<PathMismatch> {
        for (at, want) in self.segments.iter().enumerate() {
            let Some(got) = path.next() else {
                return Some(PathMismatch::TooShort { at });
            };
            match want {
                Segment::Rest => return None,
                Segment::One if got.is_empty() => return Some(PathMismatch::EmptySegment { at }),
                Segment::One => {}
                Segment::Literal(lit) if lit != got => return Some(PathMismatch::Literal { at }),
                Segment::Literal(_) => {}
            }
        }
        path.next().map(|_| PathMismatch::TooLong {
            at: self.segments.len(),
        })
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// One `/`-separated piece of a template.
enum Piece<'t> {
    /// The text between `{` and `}`.
    Variable(&'t str),
    /// Anything else: `*`, `**` or a literal.
    Plain(&'t str),
}

/// Splits the next piece off `rest` (which follows a `/`). Also returns what
/// follows the piece's closing `/`, if there is one.
fn next_piece(rest: &str) -> Result<(Piece<'_>, Option<&str>), String> {
    if let Some(open) = rest.strip_prefix('{') {
        let Some((inner, after)) = open.split_once('}') else {
            return Err(format!("unclosed `{{` in `{{{open}`"));
        };
        if after.is_empty() {
            return Ok((Piece::Variable(inner), None));
        }
        let Some(more) = after.strip_prefix('/') else {
            return Err(format!(
                "unexpected `{after}` after `{{{inner}}}`: a variable must be a whole segment \
                 (suffixes such as `{{id}}.json` are not supported)"
            ));
        };
        return Ok((Piece::Variable(inner), Some(more)));
    }
    Ok(match rest.split_once('/') {
        Some((piece, more)) => (Piece::Plain(piece), Some(more)),
        None => (Piece::Plain(rest), None),
    })
}

fn compile_piece<'t>(
    piece: Piece<'t>,
    segments: &mut Vec<Segment>,
    names: &mut Vec<&'t str>,
) -> Result<(), String> {
    let inner = match piece {
        Piece::Plain(text) if text.contains(['{', '}']) => {
            return Err(format!(
                "`{text}`: a variable must be a whole segment, like `{{id}}`"
            ));
        }
        Piece::Plain(text) => return compile_simple(text, segments),
        Piece::Variable(inner) => inner,
    };
    let (name, pattern) = match inner.split_once('=') {
        Some((name, pattern)) => (name, Some(pattern)),
        None => (inner, None),
    };
    check_variable_name(name)?;
    if names.contains(&name) {
        return Err(format!("variable `{name}` is used twice"));
    }
    names.push(name);
    let Some(pattern) = pattern else {
        segments.push(Segment::One);
        return Ok(());
    };
    if pattern.is_empty() {
        return Err(format!("variable `{name}` has an empty match after `=`"));
    }
    for part in pattern.split('/') {
        if part.contains('{') {
            return Err(format!("variable `{name}` contains another variable"));
        }
        compile_simple(part, segments)?;
    }
    Ok(())
}

/// Compiles `*`, `**` or a literal.
fn compile_simple(piece: &str, segments: &mut Vec<Segment>) -> Result<(), String> {
    let segment = match piece {
        "" => return Err("empty segment (`//`)".into()),
        "*" => Segment::One,
        "**" => Segment::Rest,
        _ if piece.contains('*') => {
            return Err(format!("`{piece}`: `*` and `**` must be a whole segment"))
        }
        _ => Segment::Literal(compile_literal(piece)?),
    };
    segments.push(segment);
    Ok(())
}

/// Checks a literal's characters (Envoy's set) and decodes it once, refusing
/// what no safe request segment could equal.
fn compile_literal(literal: &str) -> Result<String, String> {
    if let Some(bad) = literal.chars().find(|&c| !is_literal_char(c)) {
        return Err(format!(
            "character `{}` is not allowed in the literal segment `{literal}`",
            bad.escape_default()
        ));
    }
    let refused = |e: PathError| format!("literal segment `{literal}` is refused: {e}");
    let mut bytes = Vec::with_capacity(literal.len());
    decode_strict(literal.as_bytes(), &mut bytes).map_err(refused)?;
    let decoded = String::from_utf8(bytes).map_err(|_| refused(PathError::BadEncoding))?;
    decoded.chars().try_for_each(check_char).map_err(refused)?;
    check_segment(&decoded).map_err(refused)?;
    Ok(decoded)
}

/// Envoy's literal characters: RFC 3986 pchar without `*` and `=`.
fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@".contains(c)
}

fn check_variable_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "bad variable name `{name}`: use a letter, then letters, digits or `_`"
        ));
    }
    if name.len() > MAX_VARIABLE_NAME_LEN {
        return Err(format!(
            "variable name `{name}` is longer than {MAX_VARIABLE_NAME_LEN} bytes"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Scopes

/// The scopes a token grants, after the wildcard policy: sorted, without
/// duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantedScopes {
    scopes: Vec<String>,
}

impl GrantedScopes {
    /// Collects the `scope` claim (space-separated), the `scp` claim (one
    /// scope per element) and `extra` (from role mapping).
    ///
    /// Only RFC 6749 scope-tokens count: an empty string, or one holding a
    /// space, tab, control character, `"` or `\`, grants nothing, so
    /// `"a\tb"` is neither `a` nor `b`. With `deny_wildcard`, a scope that
    /// contains `*`, ends in `:all` or `.all`, or is `all` (any ASCII case)
    /// grants nothing. Wildcards are never expanded: kept, `*` is just the
    /// scope named `*`.
    pub fn new(scope: Option<&str>, scp: &[String], extra: &[String], deny_wildcard: bool) -> Self {
        let mut scopes: Vec<String> = scope
            .into_iter()
            .flat_map(|s| s.split(' '))
            .chain(scp.iter().map(String::as_str))
            .chain(extra.iter().map(String::as_str))
            .filter(|s| is_scope_token(s) && !(deny_wildcard && is_wildcard(s)))
            .map(str::to_owned)
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        GrantedScopes { scopes }
    }

    /// Whether `scope` is granted (exact, case-sensitive).
    pub fn has(&self, scope: &str) -> bool {
        self.scopes
            .binary_search_by(|s| s.as_str().cmp(scope))
            .is_ok()
    }

    /// The granted scopes, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.scopes.iter().map(String::as_str)
    }

    /// No scope is granted.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

/// All of `all` granted, and (when `any` is non-empty) at least one of `any`.
pub fn scopes_satisfied(granted: &GrantedScopes, all: &[String], any: &[String]) -> bool {
    all.iter().all(|s| granted.has(s)) && (any.is_empty() || any.iter().any(|s| granted.has(s)))
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// The wildcard policy: contains `*`, ends in `:all` / `.all`, or is `all`.
pub fn is_wildcard(s: &str) -> bool {
    let ends_with = |suffix: &str| {
        s.len()
            .checked_sub(suffix.len())
            .and_then(|at| s.get(at..))
            .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
    };
    s.contains('*') || s.eq_ignore_ascii_case("all") || ends_with(":all") || ends_with(".all")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segs(p: &SafePath) -> Vec<&str> {
        p.segments().collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    // -- path safety ------------------------------------------------------

    #[test]
    fn refused_paths() {
        use PathError::*;
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        let cases: &[(&str, PathError)] = &[
            // encoded separators, any case, also double-encoded
            ("/a%2Fb", EncodedSlash),
            ("/a%2fb", EncodedSlash),
            ("/%2F", EncodedSlash),
            ("/fhir/Patient%2F123", EncodedSlash),
            ("/a%252Fb", EncodedSlash),
            ("/a%25%32%66b", EncodedSlash),
            ("/a%5Cb", EncodedBackslash),
            ("/a%5cb", EncodedBackslash),
            ("/a%255cb", EncodedBackslash),
            ("/a\\b", Backslash),
            ("/a/..\\b", Backslash),
            // dot segments, raw and encoded, mixed case
            ("/.", DotSegment),
            ("/..", DotSegment),
            ("/a/./b", DotSegment),
            ("/a/../b", DotSegment),
            ("/a/..", DotSegment),
            ("/a/../", DotSegment),
            ("/a/.", DotSegment),
            ("/%2e", DotSegment),
            ("/%2E", DotSegment),
            ("/a/%2e%2e/b", DotSegment),
            ("/a/%2E%2e/b", DotSegment),
            ("/a/.%2E/b", DotSegment),
            ("/a/%2e./b", DotSegment),
            ("/fhir/Patient/%2e%2e/%2e%2e/admin", DotSegment),
            ("/public/..;/admin", DotSegment),
            ("/a/.;x=1/b", DotSegment),
            ("/a/%2e%2e;jsessionid=1", DotSegment),
            ("/a/%252e%252e/b", DotSegment),
            ("/a/%252E./b", DotSegment),
            // NUL and other controls, raw and encoded
            ("/a%00b", Nul),
            ("/a\0b", Nul),
            ("/a%2500", Nul),
            ("/a%01", ControlChar),
            ("/a%1f", ControlChar),
            ("/a%1F", ControlChar),
            ("/a%7f", ControlChar),
            ("/a%7F", ControlChar),
            ("/a%0d%0aX-Injected:1", ControlChar),
            ("/a\tb", ControlChar),
            ("/a\nb", ControlChar),
            ("/a\x7fb", ControlChar),
            ("/a\u{85}b", ControlChar),
            ("/a%C2%85b", ControlChar),
            ("/a%2509", ControlChar),
            // malformed or non-UTF-8 encoding
            ("/a%", BadEncoding),
            ("/a%2", BadEncoding),
            ("/a%zz", BadEncoding),
            ("/a%g0", BadEncoding),
            ("/a%%41", BadEncoding),
            ("/%FF", BadEncoding),
            ("/%C0%AF", BadEncoding),
            ("/%E2%82", BadEncoding),
            ("/a%25C0%25AF", BadEncoding),
            // raw bytes that were not UTF-8, as the host adapter passes them
            ("/fhir/Patient/\u{FFFD}", BadEncoding),
            // not absolute
            ("", NotAbsolute),
            ("a/b", NotAbsolute),
            ("*", NotAbsolute),
            ("http://h/a", NotAbsolute),
            ("?x=/a", NotAbsolute),
            ("%2Fa", NotAbsolute),
            ("\\a", NotAbsolute),
            // empty segments
            ("//", EmptySegment),
            ("//a", EmptySegment),
            ("/a//b", EmptySegment),
            ("/a/b//", EmptySegment),
            ("/a//b?x=1", EmptySegment),
            // too long
            (&long, TooLong),
        ];
        for (raw, want) in cases {
            assert_eq!(SafePath::parse(raw), Err(*want), "{raw:?}");
        }
    }

    #[test]
    fn accepted_paths() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "/fhir/Patient/123",
                "/fhir/Patient/123",
                &["fhir", "Patient", "123"],
            ),
            (
                "/fhir/Patient/abc-123?x=1",
                "/fhir/Patient/abc-123",
                &["fhir", "Patient", "abc-123"],
            ),
            ("/a%20b", "/a%20b", &["a b"]),
            ("/fhir/$export", "/fhir/$export", &["fhir", "$export"]),
            (
                "/fhir/Patient/%24export",
                "/fhir/Patient/%24export",
                &["fhir", "Patient", "$export"],
            ),
            ("/fhir/Patient/", "/fhir/Patient/", &["fhir", "Patient", ""]),
            ("/", "/", &[""]),
            ("/?x=1", "/", &[""]),
            ("/a#frag", "/a", &["a"]),
            ("/a?b=../..%2f#x", "/a", &["a"]),
            ("/%2541", "/%2541", &["%41"]),
            ("/a/.../b", "/a/.../b", &["a", "...", "b"]),
            ("/a/.b/b.", "/a/.b/b.", &["a", ".b", "b."]),
            ("/a/..b/%2e%2e%2e", "/a/..b/%2e%2e%2e", &["a", "..b", "..."]),
            ("/caf%C3%A9", "/caf%C3%A9", &["café"]),
            ("/a;v=1/b", "/a;v=1/b", &["a;v=1", "b"]),
            ("/%7E/%7e", "/%7E/%7e", &["~", "~"]),
            ("/a%25zz", "/a%25zz", &["a%zz"]),
        ];
        for (raw, received, want) in cases {
            let p = SafePath::parse(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(p.as_received(), *received, "{raw:?}");
            assert_eq!(segs(&p), *want, "{raw:?}");
        }
    }

    #[test]
    fn length_limit_counts_path_not_query() {
        let max = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
        assert!(SafePath::parse(&max).is_ok());
        let long_query = format!("/a?{}", "x".repeat(3 * MAX_PATH_LEN));
        assert!(SafePath::parse(&long_query).is_ok());
    }

    #[test]
    fn error_codes_are_stable() {
        use PathError::*;
        let all = [
            (EncodedSlash, "encoded_slash"),
            (EncodedBackslash, "encoded_backslash"),
            (Backslash, "backslash"),
            (DotSegment, "dot_segment"),
            (Nul, "nul"),
            (EmptySegment, "empty_segment"),
            (BadEncoding, "bad_encoding"),
            (NotAbsolute, "not_absolute"),
            (TooLong, "too_long"),
            (ControlChar, "control_char"),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code);
            assert_eq!(e.to_string(), code);
        }
    }

    #[test]
    fn access_token_in_query() {
        let cases: &[(&str, bool)] = &[
            ("/a?access_token=x", true),
            ("/a?x=1&access_token=x", true),
            ("/a?access_token", true),
            ("/a?access_token=", true),
            ("/a?ACCESS_TOKEN=x", true),
            ("/a?access%5Ftoken=x", true),
            ("/a?%61ccess_token=x", true),
            ("/a?x=1;access_token=x", true),
            ("/a?x=1#access_token=x", true),
            ("/a", false),
            ("/access_token", false),
            ("/a?token=x", false),
            ("/a?x=access_token", false),
            ("/a?access_token_hint=x", false),
            ("/a?my_access_token=x", false),
            ("/a?access+token=x", false),
            ("/a?", false),
            ("/a%3Faccess_token=x", false),
        ];
        for (raw, want) in cases {
            assert_eq!(query_has_access_token(raw), *want, "{raw:?}");
        }
    }

    // -- templates --------------------------------------------------------

    #[test]
    fn template_parse_errors() {
        let six = "/{a}/{b}/{c}/{d}/{e}/{f}";
        let long = format!("/{}", "a".repeat(MAX_TEMPLATE_LEN));
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("fhir/Patient", "start with `/`"),
            ("{id}", "start with `/`"),
            ("//", "empty segment"),
            ("/a//b", "empty segment"),
            ("/**/a", "last"),
            ("/a/**/", "last"),
            ("/**/**", "last"),
            ("/{p=**}/a", "last"),
            ("/{p=**/a}", "last"),
            ("/{p=**}/{q}", "last"),
            ("/{id}/{id}", "twice"),
            ("/{id}/x/{id=**}", "twice"),
            ("/{1id}", "bad variable name"),
            ("/{_id}", "bad variable name"),
            ("/{id-x}", "bad variable name"),
            ("/{}", "bad variable name"),
            ("/{ id}", "bad variable name"),
            ("/{abcdefghijklmnopq}", "longer than 16"),
            (six, "limit is 5"),
            ("/{id=}", "empty match"),
            ("/{id=a/}", "empty segment"),
            ("/{id=a//b}", "empty segment"),
            ("/{id=a*}", "whole segment"),
            ("/{id=a/{b}}", "whole segment"),
            ("/{id={b}", "another variable"),
            ("/{id", "unclosed"),
            ("/id}", "whole segment"),
            ("/x{id}", "whole segment"),
            ("/{id}.json", "suffixes"),
            ("/{a}{b}", "suffixes"),
            ("/**.mpd", "whole segment"),
            ("/a*", "whole segment"),
            ("/***", "whole segment"),
            ("/a b", "not allowed"),
            ("/a\\b", "not allowed"),
            ("/a?b", "not allowed"),
            ("/a#b", "not allowed"),
            ("/a=b", "not allowed"),
            ("/café", "not allowed"),
            ("/a\tb", "not allowed"),
            ("/./a", "dot_segment"),
            ("/a/..", "dot_segment"),
            ("/%2e", "dot_segment"),
            ("/a/%2E%2e/b", "dot_segment"),
            ("/a/..;x", "dot_segment"),
            ("/a%2Fb", "encoded_slash"),
            ("/a%5cb", "encoded_backslash"),
            ("/a%00", "nul"),
            ("/a%0a", "control_char"),
            ("/a%zz", "bad_encoding"),
            ("/a%", "bad_encoding"),
            ("/%FF", "bad_encoding"),
            ("/a%252f", "encoded_slash"),
            (&long, "limit is 1024"),
        ];
        for (t, want) in cases {
            match PathTemplate::parse(t) {
                Ok(p) => panic!("{t:?} parsed: {p:?}"),
                Err(e) => assert!(e.contains(want), "{t:?}: {e:?} lacks {want:?}"),
            }
        }
    }

    #[test]
    fn overlaps_when_some_path_matches_both() {
        let t = |s: &str| PathTemplate::parse(s).unwrap();
        let cases = [
            ("/fhir/{rest=**}", "/fhir/Patient/{id}", true),
            ("/fhir/**", "/fhir", false),
            ("/fhir/**", "/fhir/", true),
            ("/fhir", "/fhir", true),
            ("/fhir/Patient/{id}", "/fhir/{type}/7", true),
            ("/fhir/Patient/{id}", "/fhir/Observation/{id}", false),
            ("/fhir/{id}", "/fhir/", false),
            ("/healthz", "/fhir/**", false),
            ("/{a}/{b}", "/fhir", false),
            ("/{a=**}", "/anything/at/all", true),
        ];
        for (a, b, want) in cases {
            assert_eq!(t(a).overlaps(&t(b)), want, "{a} vs {b}");
            assert_eq!(t(b).overlaps(&t(a)), want, "{b} vs {a}");
        }
        assert_eq!(
            t("/fhir/Group/{id}/$export").literals().collect::<Vec<_>>(),
            ["fhir", "Group", "$export"]
        );
    }

    #[test]
    fn mismatch_says_where() {
        use PathMismatch::*;
        let t = PathTemplate::parse("/fhir/Patient/{id}").unwrap();
        let cases: &[(&str, Option<PathMismatch>)] = &[
            ("/fhir/Patient/7", None),
            ("/fhir/Observation/7", Some(Literal { at: 1 })),
            ("/api/Patient/7", Some(Literal { at: 0 })),
            ("/fhir/Patient", Some(TooShort { at: 2 })),
            ("/fhir/Patient/", Some(EmptySegment { at: 2 })),
            ("/fhir/Patient/7/_history", Some(TooLong { at: 3 })),
        ];
        for (raw, want) in cases {
            let path = SafePath::parse(raw).unwrap();
            assert_eq!(t.mismatch(&path), *want, "{raw}");
            assert_eq!(t.matches(&path), want.is_none(), "{raw}");
        }
        assert_eq!(t.literal_at(1), Some("Patient"));
        assert_eq!(t.literal_at(2), None);
        let rest = PathTemplate::parse("/files/{p=**}").unwrap();
        assert_eq!(rest.mismatch(&SafePath::parse("/files/a/b").unwrap()), None);
        assert_eq!(
            rest.mismatch(&SafePath::parse("/files").unwrap()),
            Some(TooShort { at: 1 })
        );
    }

    #[test]
    fn template_matching() {
        let cases: &[(&str, &[(&str, bool)])] = &[
            (
                "/fhir/Patient/{id}",
                &[
                    ("/fhir/Patient/123", true),
                    ("/fhir/Patient/123?_format=json", true),
                    ("/fhir/Patient/%24export", true),
                    ("/fhir/Patient/a%20b", true),
                    ("/fhir/Patient/", false),
                    ("/fhir/Patient", false),
                    ("/fhir/Patient/123/", false),
                    ("/fhir/Patient/123/_history", false),
                    ("/fhir/patient/123", false),
                    ("/FHIR/Patient/123", false),
                    ("/fhir/Patient%2F123", false),
                ],
            ),
            (
                "/fhir/$export",
                &[
                    ("/fhir/$export", true),
                    ("/fhir/%24export", true),
                    ("/fhir/%24export?_type=Patient", true),
                    ("/fhir/$Export", false),
                    ("/fhir/$export/", false),
                    ("/fhir/export", false),
                ],
            ),
            (
                "/fhir/%24export",
                &[("/fhir/$export", true), ("/fhir/%24export", true)],
            ),
            (
                "/files/{path=**}",
                &[
                    ("/files/a", true),
                    ("/files/a/b/c", true),
                    ("/files/a/b/", true),
                    ("/files/", true),
                    ("/files", false),
                    ("/filesx/a", false),
                    ("/", false),
                ],
            ),
            (
                "/files/**",
                &[("/files/a/b", true), ("/files/", true), ("/files", false)],
            ),
            ("/**", &[("/", true), ("/a", true), ("/a/b/", true)]),
            (
                "/a/*/c",
                &[
                    ("/a/b/c", true),
                    ("/a/%2A/c", true),
                    ("/a/c", false),
                    ("/a/b/c/", false),
                    ("/a/b/b/c", false),
                ],
            ),
            ("/", &[("/", true), ("/?x", true), ("/a", false)]),
            (
                "/fhir/",
                &[("/fhir/", true), ("/fhir", false), ("/fhir/a", false)],
            ),
            (
                "/{a}/{b=x/*}/**",
                &[
                    ("/1/x/2/3", true),
                    ("/1/x/2/", true),
                    ("/1/x/2", false),
                    ("/1/y/2/3", false),
                    ("/1/x//3", false),
                ],
            ),
            ("/{id=*}", &[("/x", true), ("/", false), ("/x/y", false)]),
            (
                "/healthz",
                &[
                    ("/healthz", true),
                    ("/healthz?probe=1", true),
                    ("/healthz/", false),
                ],
            ),
            (
                "/a%20b",
                &[("/a%20b", true), ("/a b", true), ("/a+b", false)],
            ),
            (
                "/%2541",
                &[("/%2541", true), ("/%41", false), ("/A", false)],
            ),
            ("/caf%C3%A9", &[("/caf%c3%a9", true), ("/café", true)]),
        ];
        for (template, paths) in cases {
            let t = PathTemplate::parse(template).unwrap_or_else(|e| panic!("{template}: {e}"));
            assert_eq!(t.as_str(), *template);
            for (raw, want) in *paths {
                // A refused path matches nothing.
                let got = SafePath::parse(raw).is_ok_and(|p| t.matches(&p));
                assert_eq!(got, *want, "{template} vs {raw:?}");
            }
        }
    }

    #[test]
    fn design_example_rules() {
        for t in [
            "/healthz",
            "/fhir/Patient/{id}",
            "/billing/{account}",
            "/labs/{id}",
            "/fhir/$export",
        ] {
            assert!(PathTemplate::parse(t).is_ok(), "{t}");
        }
        let five = PathTemplate::parse("/{a}/{b}/{c}/{d}/{abcdefghijklmnop}");
        assert!(five.is_ok(), "{five:?}");
    }

    // -- scopes -----------------------------------------------------------

    #[test]
    fn granted_scopes_collection() {
        type Case<'a> = (
            Option<&'a str>,
            &'a [&'a str],
            &'a [&'a str],
            bool,
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            (Some("read:a write:b"), &[], &[], true, &["read:a", "write:b"]),
            (None, &["read:a", "write:b"], &[], true, &["read:a", "write:b"]),
            (Some("read:a"), &["write:b"], &["role:x"], true, &["read:a", "role:x", "write:b"]),
            (Some("  read:a   write:b "), &[], &[], true, &["read:a", "write:b"]),
            (Some("read:a read:a"), &["read:a"], &["read:a"], true, &["read:a"]),
            (Some(""), &["", " "], &[""], true, &[]),
            (None, &[], &[], true, &[]),
            // tabs and other odd whitespace are not separators: the token is invalid
            (Some("read:a\twrite:b"), &[], &[], true, &[]),
            (Some("read:a\nwrite:b c"), &[], &[], true, &["c"]),
            (None, &["read:a write:b"], &[], true, &[]),
            (Some("a\u{a0}b"), &[], &[], true, &[]),
            (Some("say\"hi\" back\\slash ok"), &[], &[], true, &["ok"]),
            // wildcard policy on
            (Some("* read:all patient/*.* patient/*.read user/Observation.all all"), &[], &[], true, &[]),
            (Some("READ:ALL x.All ALL"), &[], &[], true, &[]),
            (None, &["*", "read:*"], &["admin:all"], true, &[]),
            (
                Some("read:allergies patient/AllergyIntolerance.read ball overall allx all_patients user/Observation.rs"),
                &[],
                &[],
                true,
                &["allx", "all_patients", "ball", "overall", "patient/AllergyIntolerance.read", "read:allergies", "user/Observation.rs"],
            ),
            // wildcard policy off: kept verbatim, never expanded
            (Some("* read:all patient/*.read"), &[], &[], false, &["*", "patient/*.read", "read:all"]),
        ];
        for (scope, scp, extra, deny, want) in cases {
            let g = GrantedScopes::new(*scope, &strings(scp), &strings(extra), *deny);
            let mut want: Vec<&str> = want.to_vec();
            want.sort_unstable();
            assert_eq!(
                g.iter().collect::<Vec<_>>(),
                want,
                "{scope:?} {scp:?} {extra:?} deny={deny}"
            );
            assert_eq!(g.is_empty(), want.is_empty());
            for w in &want {
                assert!(g.has(w));
            }
        }
    }

    #[test]
    fn scope_requirements() {
        let g = GrantedScopes::new(Some("read:patient-profile export:bulk"), &[], &[], true);
        let cases: &[(&[&str], &[&str], bool)] = &[
            (&[], &[], true),
            (&["read:patient-profile"], &[], true),
            (&["read:patient-profile", "export:bulk"], &[], true),
            (&["read:patient-profile", "update:billing"], &[], false),
            (&[], &["update:billing", "export:bulk"], true),
            (&[], &["update:billing"], false),
            (
                &["read:patient-profile"],
                &["update:billing", "export:bulk"],
                true,
            ),
            (&["update:billing"], &["export:bulk"], false),
            (&["read:patient-profile"], &["update:billing"], false),
            (&["READ:patient-profile"], &[], false),
            (&["read:patient"], &[], false),
            (&[""], &[], false),
            (&[], &[""], false),
        ];
        for (all, any, want) in cases {
            assert_eq!(
                scopes_satisfied(&g, &strings(all), &strings(any)),
                *want,
                "{all:?} {any:?}"
            );
        }
        // A kept wildcard grants only itself.
        let star = GrantedScopes::new(Some("*"), &[], &[], false);
        assert!(!scopes_satisfied(
            &star,
            &strings(&["read:patient-profile"]),
            &[]
        ));
        assert!(!scopes_satisfied(
            &GrantedScopes::default(),
            &[],
            &strings(&["a"])
        ));
    }

    // -- properties -------------------------------------------------------

    /// Encodes every byte outside RFC 3986 `unreserved`.
    fn encode_all(s: &str) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// Lenient single decode, the way an upstream would do it.
    fn model_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let (Some(h), Some(l)) = (hex_value(b[i + 1]), hex_value(b[i + 2])) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Decodes only the unreserved characters (RFC 3986 §6.2.2.2).
    fn model_decode_unreserved(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = String::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let (Some(h), Some(l)) = (hex_value(b[i + 1]), hex_value(b[i + 2])) {
                    let c = h << 4 | l;
                    if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                        out.push(char::from(c));
                        i += 3;
                        continue;
                    }
                }
            }
            out.push(char::from(b[i]));
            i += 1;
        }
        out
    }

    /// RFC 3986 §5.2.4 remove_dot_segments, literally.
    fn remove_dot_segments(path: &str) -> String {
        let mut input = path.to_string();
        let mut output = String::new();
        while !input.is_empty() {
            if let Some(rest) = input.strip_prefix("../") {
                input = rest.to_string();
            } else if let Some(rest) = input.strip_prefix("./") {
                input = rest.to_string();
            } else if input.starts_with("/./") {
                input = input[2..].to_string();
            } else if input == "/." {
                input = "/".to_string();
            } else if input.starts_with("/../") || input == "/.." {
                input = format!("/{}", &input[if input == "/.." { 3 } else { 4 }..]);
                match output.rfind('/') {
                    Some(at) => output.truncate(at),
                    None => output.clear(),
                }
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |i| i + start);
                output.push_str(&input[..end]);
                input = input[end..].to_string();
            }
        }
        output
    }

    fn model_segments(resolved: &str) -> Vec<String> {
        resolved
            .strip_prefix('/')
            .unwrap_or(resolved)
            .split('/')
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn remove_dot_segments_rfc_examples() {
        assert_eq!(remove_dot_segments("/a/b/c/./../../g"), "/a/g");
        assert_eq!(remove_dot_segments("mid/content=5/../6"), "mid/6");
        assert_eq!(remove_dot_segments("/a/.."), "/");
        assert_eq!(remove_dot_segments("/../x"), "/x");
        assert_eq!(model_decode("%2541%41%zz%4"), "%41A%zz%4");
    }

    const TEMPLATES: &[&str] = &[
        "/a/{id}",
        "/a/b",
        "/a/b/{c}",
        "/b/{id}",
        "/a/**",
        "/b/**",
        "/{x}/b",
        "/**",
        "/a",
        "/a/",
        "/%2541/{x}",
        "/A/{x}",
        "/*/*/*",
    ];

    fn raw_path() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec![
            ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "/", "/", "/", "\\", "%25", "%",
            "a", "b", "A", "%41", "%61", "%252e", "%252f", ";", "%3b", "~", "%20", "%00", "%c3%a9",
            "..;", "?", "#",
        ]);
        prop::collection::vec(token, 0..14).prop_map(|t| format!("/{}", t.concat()))
    }

    /// Any non-empty segment text without separators, `%`, `?`, `#` or
    /// controls that is not a (Servlet-style) dot segment.
    fn plain_segment() -> impl Strategy<Value = String> {
        "[^/\\\\%?#\\p{Cc}\u{FFFD}]{1,10}".prop_map(|p| {
            let base = p.split(';').next().unwrap_or("");
            if base == "." || base == ".." {
                format!("x{p}")
            } else {
                p
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Decode-once: encoding arbitrary segments and parsing gives them back.
        #[test]
        fn decode_once_round_trips(
            parts in prop::collection::vec(plain_segment(), 1..6),
            trailing in any::<bool>(),
            encode in any::<bool>(),
        ) {
            let mut raw: String = parts
                .iter()
                .map(|p| format!("/{}", if encode { encode_all(p) } else { p.clone() }))
                .collect();
            if trailing {
                raw.push('/');
            }
            let p = SafePath::parse(&raw).unwrap();
            let mut want: Vec<&str> = parts.iter().map(String::as_str).collect();
            if trailing {
                want.push("");
            }
            prop_assert_eq!(segs(&p), want);
        }

        /// Double-encoding an ordinary segment decodes exactly once.
        #[test]
        fn double_encoding_decodes_once(part in "[a-zA-Z0-9 ~!$&'()*+,:;=@-]{1,10}") {
            let once = encode_all(&part);
            let twice = encode_all(&once);
            let p = SafePath::parse(&format!("/{twice}")).unwrap();
            prop_assert_eq!(segs(&p), vec![once.as_str()]);
        }

        /// `covers` is sound: when it says a template hides another, every
        /// path the hidden one matches is matched by the first.
        #[test]
        fn covers_never_overclaims(
            a in prop::collection::vec(0..5usize, 1..4),
            b in prop::collection::vec(0..5usize, 1..4),
            paths in prop::collection::vec(prop::collection::vec(0..4usize, 1..5), 32),
        ) {
            const PIECES: [&str; 5] = ["a", "$x", "", "{v}", "{r=**}"];
            const SEGS: [&str; 4] = ["a", "$x", "", "b"];
            let template = |ix: &[usize]| {
                // `**` only last, as the parser requires.
                let mut pieces: Vec<&str> = ix.iter().map(|&i| PIECES[i]).collect();
                if let Some(at) = pieces.iter().position(|p| *p == "{r=**}") {
                    pieces.truncate(at + 1);
                }
                PathTemplate::parse(&format!("/{}", pieces.join("/")))
            };
            let (Ok(ta), Ok(tb)) = (template(&a), template(&b)) else { return Ok(()) };
            if !ta.covers(&tb) {
                return Ok(());
            }
            for p in &paths {
                let raw: String = p.iter().map(|&i| format!("/{}", SEGS[i])).collect();
                let Ok(path) = SafePath::parse(&raw) else { continue };
                if tb.matches(&path) {
                    prop_assert!(ta.matches(&path), "{} covers {} but not {}", ta, tb, raw);
                }
            }
        }

        /// Whatever is accepted resolves, at a normalising upstream, to exactly
        /// the segments we matched; so no template's verdict changes.
        #[test]
        fn accepted_paths_resolve_to_what_we_matched(raw in raw_path()) {
            let Ok(p) = SafePath::parse(&raw) else { return Ok(()) };
            let ours: Vec<String> = p.segments().map(str::to_string).collect();
            let path = raw.split(['?', '#']).next().unwrap();

            for s in &ours {
                prop_assert!(s != "." && s != "..", "{raw:?} kept a dot segment");
                prop_assert!(!s.contains(['/', '\\']), "{raw:?} kept a separator");
            }
            prop_assert_eq!(ours.len(), path.matches('/').count());

            // Upstream A: decode, (backslash as separator), remove dot segments.
            let decoded = model_decode(path).replace('\\', "/");
            let a = model_segments(&remove_dot_segments(&decoded));
            // Upstream B: RFC 3986 normalisation, then decode.
            let b = model_segments(&model_decode(&remove_dot_segments(&model_decode_unreserved(path))));
            prop_assert_eq!(&a, &ours);
            prop_assert_eq!(&b, &ours);

            for t in TEMPLATES {
                let t = PathTemplate::parse(t).unwrap();
                let here = t.matches(&p);
                prop_assert_eq!(here, t.mismatch_segments(a.iter().map(String::as_str)).is_none());
                prop_assert_eq!(here, t.mismatch_segments(b.iter().map(String::as_str)).is_none());
            }

            // Upstream C decodes twice: the structure (segment count, no dot
            // segments) must still be what we matched.
            let twice = model_decode(&model_decode(path)).replace('\\', "/");
            let c = model_segments(&remove_dot_segments(&twice));
            prop_assert_eq!(c.len(), ours.len(), "{:?} -> {:?}", raw, c);
        }

        /// Anything the generator produces either is refused or has no dot
        /// segments and no empty inner segments after one decode.
        #[test]
        fn accepted_paths_have_no_dot_or_empty_segments(raw in raw_path()) {
            if let Ok(p) = SafePath::parse(&raw) {
                let all: Vec<&str> = p.segments().collect();
                let n = all.len();
                for (i, s) in all.iter().enumerate() {
                    let base = s.split(';').next().unwrap();
                    prop_assert!(base != "." && base != "..", "{:?}", raw);
                    prop_assert!(i + 1 == n || !s.is_empty());
                }
            }
        }

        /// Parsing never panics, on any input.
        #[test]
        fn parse_total(raw in "\\PC*", t in "\\PC*") {
            let _ = SafePath::parse(&raw);
            let _ = query_has_access_token(&raw);
            let _ = PathTemplate::parse(&t);
        }
    }

    #[test]
    fn generator_reaches_accepted_and_refused_paths() {
        // The security property is vacuous unless the generator yields both.
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..2000 {
            let raw =
                proptest::strategy::ValueTree::current(&raw_path().new_tree(&mut runner).unwrap());
            match SafePath::parse(&raw) {
                Ok(_) => accepted += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(
            accepted > 100 && refused > 100,
            "{accepted} accepted, {refused} refused"
        );
    }
}
