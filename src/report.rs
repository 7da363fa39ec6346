//! `phi-guard audit report`: what an auditor asks of the audit trail, read
//! from Envoy access logs in one pass.
//!
//! The chains are verified first ([`ChainVerifier`]): the report says whether
//! they are intact, or gives the first problem, and goes on either way. Then,
//! for the records that pass the filters: per subject and client, requests
//! allowed per rule and denied per reason; escalation attempts (a token that
//! asked for more than it holds, or was forged) with first and last time; bulk
//! exports started and by whom; the busiest sources.
//!
//! Memory does not grow with the log: lines are read one at a time (at most
//! [`MAX_LINE`] bytes each), and what is kept is one row per distinct
//! (subject, client, rule or reason) — the report's own size — plus at most
//! [`SOURCE_SLOTS`] sources. Files are read in the order given (oldest first,
//! so chains run on across rotated files); gzip-compressed ones are
//! recognised by their first bytes.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};

use flate2::read::MultiGzDecoder;
use serde_json::{json, Value};

use crate::audit::{
    find_record, parse_rfc3339_millis, rfc3339_millis, AuditRecord, ChainVerifier, Problem,
    VerifyError,
};

/// Longest line read; a record is far shorter (its fields are bounded), so
/// a longer line is no record and is skipped.
pub const MAX_LINE: usize = 1 << 20;

/// Sources counted exactly; past this many distinct ones, the least busy
/// give way (Space-Saving: the busiest are kept, their counts may run over
/// by at most the `over` each reports).
pub const SOURCE_SLOTS: usize = 10_000;

/// Sources listed.
pub const TOP_SOURCES: usize = 10;

/// Reasons that mean a token asked for more than it was given, or was not
/// the IdP's: escalation attempts.
pub const ESCALATIONS: [&str; 7] = [
    "insufficient_scope",
    "step_up_required",
    "revoked",
    "token_too_old",
    "invalid_signature",
    "alg_not_allowed",
    "unknown_key",
];

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Csv,
    Json,
}

/// The command line of `audit report`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub files: Vec<String>,
    /// Records at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Records before this time (Unix ms).
    pub until_ms: Option<u64>,
    pub subject: Option<String>,
    pub client: Option<String>,
    pub rule: Option<String>,
    pub format: Format,
    /// Environment variable holding the audit HMAC key.
    pub key_env: Option<String>,
    pub start_anywhere: bool,
}

/// `2026-01-01`, or an RFC 3339 UTC time such as `2026-01-01T08:00:00Z`.
pub fn parse_time(s: &str) -> Option<u64> {
    if s.len() == 10 {
        return parse_rfc3339_millis(&format!("{s}T00:00:00Z"));
    }
    parse_rfc3339_millis(s)
}

impl Args {
    /// Parses what follows `audit report`.
    pub fn parse(args: &[&str]) -> Result<Args, String> {
        let mut out = Args {
            files: Vec::new(),
            since_ms: None,
            until_ms: None,
            subject: None,
            client: None,
            rule: None,
            format: Format::Text,
            key_env: None,
            start_anywhere: false,
        };
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let mut value = |name: &str| {
                rest.next()
                    .map(|v| (*v).to_string())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            let time = |name: &str, v: String| {
                parse_time(&v).ok_or_else(|| {
                    format!("{name}: {v:?} is not a date (2026-01-31) or RFC 3339 UTC time (2026-01-31T08:00:00Z)")
                })
            };
            match *arg {
                "--since" => out.since_ms = Some(time("--since", value("--since")?)?),
                "--until" => out.until_ms = Some(time("--until", value("--until")?)?),
                "--subject" => out.subject = Some(value("--subject")?),
                "--client" => out.client = Some(value("--client")?),
                "--rule" => out.rule = Some(value("--rule")?),
                "--key-env" => out.key_env = Some(value("--key-env")?),
                "--start-anywhere" => out.start_anywhere = true,
                "--format" => {
                    out.format = match value("--format")?.as_str() {
                        "text" => Format::Text,
                        "csv" => Format::Csv,
                        "json" => Format::Json,
                        other => {
                            return Err(format!("--format: {other:?} is not text, csv or json"))
                        }
                    }
                }
                flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
                path => out.files.push(path.to_string()),
            }
        }
        if out.files.is_empty() {
            return Err("which access-log files?".into());
        }
        Ok(out)
    }
}

/// A file to read, gunzipped if it is gzip (by its magic bytes, whatever
/// its name); `-` is standard input.
pub fn open(path: &str) -> io::Result<Box<dyn BufRead>> {
    let raw: Box<dyn Read> = if path == "-" {
        Box::new(io::stdin())
    } else {
        Box::new(File::open(path)?)
    };
    let mut reader = BufReader::with_capacity(1 << 16, raw);
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        Box::new(BufReader::with_capacity(
            1 << 16,
            MultiGzDecoder::new(reader),
        ))
    } else {
        Box::new(reader)
    })
}

/// How many, and when first and last (Unix ms; records without a readable
/// time count but do not move these).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub count: u64,
    pub first_ms: Option<u64>,
    pub last_ms: Option<u64>,
}

impl Span {
    fn add(&mut self, ms: Option<u64>) {
        self.count += 1;
        if let Some(ms) = ms {
            self.first_ms = Some(self.first_ms.map_or(ms, |f| f.min(ms)));
            self.last_ms = Some(self.last_ms.map_or(ms, |l| l.max(ms)));
        }
    }
}

/// One subject and client's requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Allowed requests per rule.
    pub allowed: BTreeMap<String, u64>,
    /// Denied requests per reason.
    pub denied: BTreeMap<String, u64>,
}

/// A source's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCount {
    pub source: String,
    pub requests: u64,
    pub denied: u64,
    pub escalations: u64,
    /// How far `requests` may run over the truth (0 while counting is exact).
    pub over: u64,
}

/// The busiest sources in bounded memory: exact while at most `cap` distinct
/// sources were seen; past that, Space-Saving (a new source takes the least
/// busy one's slot and count, noted as `over`), which keeps every source
/// busier than (records / cap).
#[derive(Debug)]
struct TopSources {
    cap: usize,
    /// A min-heap on `requests`.
    heap: Vec<SourceCount>,
    at: HashMap<String, usize>,
    replaced: u64,
}

impl TopSources {
    fn new(cap: usize) -> TopSources {
        TopSources {
            cap: cap.max(1),
            heap: Vec::new(),
            at: HashMap::new(),
            replaced: 0,
        }
    }

    fn add(&mut self, source: &str, denied: bool, escalation: bool) {
        let i = match self.at.get(source) {
            Some(&i) => i,
            None if self.heap.len() < self.cap => {
                self.heap.push(SourceCount {
                    source: source.to_string(),
                    requests: 0,
                    denied: 0,
                    escalations: 0,
                    over: 0,
                });
                let i = self.heap.len() - 1;
                self.at.insert(source.to_string(), i);
                self.sift_up(i)
            }
            None => {
                let Some(least) = self.heap.first_mut() else {
                    return;
                };
                self.at.remove(&least.source);
                *least = SourceCount {
                    source: source.to_string(),
                    requests: least.requests,
                    denied: 0,
                    escalations: 0,
                    over: least.requests,
                };
                self.at.insert(source.to_string(), 0);
                self.replaced += 1;
                0
            }
        };
        if let Some(s) = self.heap.get_mut(i) {
            s.requests += 1;
            s.denied += u64::from(denied);
            s.escalations += u64::from(escalation);
        }
        self.sift_down(i);
    }

    fn requests(&self, i: usize) -> Option<u64> {
        self.heap.get(i).map(|s| s.requests)
    }

    fn swap(&mut self, i: usize, j: usize) {
        self.heap.swap(i, j);
        for k in [i, j] {
            if let Some(s) = self.heap.get(k) {
                if let Some(slot) = self.at.get_mut(&s.source) {
                    *slot = k;
                }
            }
        }
    }

    fn sift_up(&mut self, mut i: usize) -> usize {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.requests(parent) <= self.requests(i) {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
        i
    }

    fn sift_down(&mut self, mut i: usize) {
        loop {
            let mut least = i;
            for child in [2 * i + 1, 2 * i + 2] {
                if let (Some(c), Some(l)) = (self.requests(child), self.requests(least)) {
                    if c < l {
                        least = child;
                    }
                }
            }
            if least == i {
                return;
            }
            self.swap(i, least);
            i = least;
        }
    }

    /// The `n` busiest, busiest first (ties by source).
    fn top(&self, n: usize) -> Vec<SourceCount> {
        let mut all = self.heap.clone();
        all.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then_with(|| a.source.cmp(&b.source))
        });
        all.truncate(n);
        all
    }
}

/// The address of a record's `source` without its port (`10.0.0.7:51234`,
/// `[2001:db8::1]:443`).
pub fn source_address(source: &str) -> &str {
    if let Some(rest) = source.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match source.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => source,
    }
}

/// Whether a path starts a FHIR bulk export: its last segment is `$export`.
pub fn is_export_kickoff(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or_default();
    last == "$export" || last.eq_ignore_ascii_case("%24export")
}

/// What the chains showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chains {
    pub records: u64,
    pub vms: usize,
    /// Lines that hold no record.
    pub skipped_lines: u64,
    /// Lines over [`MAX_LINE`], not read.
    pub oversized_lines: u64,
    /// Records (or lines) the verifier found a problem at.
    pub problems: u64,
    /// The first: file, and the problem (its line within that file).
    pub first_problem: Option<(String, VerifyError)>,
}

/// The report, built record by record.
#[derive(Debug)]
pub struct Report {
    args: Args,
    verifier: ChainVerifier,
    pub chains: Chains,
    /// Records that passed the filters.
    pub matched: u64,
    /// Per (subject, client); `-` where the record has none.
    pub access: BTreeMap<(String, String), Access>,
    /// Per (reason, subject, client, rule).
    pub escalations: BTreeMap<(String, String, String, String), Span>,
    /// Allowed kick-offs per (subject, client, path).
    pub exports: BTreeMap<(String, String, String), Span>,
    sources: TopSources,
}

const NONE: &str = "-";

impl Report {
    /// An empty report; `key` is the audit HMAC key, if the chains are keyed.
    pub fn new(args: Args, key: Option<&[u8]>) -> Report {
        let verifier = ChainVerifier::new(key, args.start_anywhere);
        Report {
            args,
            verifier,
            chains: Chains::default(),
            matched: 0,
            access: BTreeMap::new(),
            escalations: BTreeMap::new(),
            exports: BTreeMap::new(),
            sources: TopSources::new(SOURCE_SLOTS),
        }
    }

    fn problem(&mut self, file: &str, e: VerifyError) {
        self.chains.problems += 1;
        if self.chains.first_problem.is_none() {
            self.chains.first_problem = Some((file.to_string(), e));
        }
    }

    /// Reads one file (named `file` in messages) to its end. A read error
    /// (a truncated gzip file, say) is a problem of the chains: the rest of
    /// that file cannot be vouched for. Returns whether the file was whole.
    pub fn read(&mut self, file: &str, mut reader: impl BufRead) -> bool {
        let mut buf = Vec::new();
        for n in 1.. {
            buf.clear();
            match read_line(&mut reader, &mut buf) {
                Ok(Line::End) => return true,
                Ok(Line::Oversized) => self.chains.oversized_lines += 1,
                Ok(Line::Read) => self.line(file, n, &buf),
                Err(e) => {
                    let detail = format!("{e} (nothing after this line was read)");
                    self.problem(
                        file,
                        VerifyError {
                            line: n,
                            kind: Problem::Io,
                            detail,
                        },
                    );
                    return false;
                }
            }
        }
        true
    }

    fn line(&mut self, file: &str, n: usize, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let record = match find_record(&text) {
            None => {
                self.chains.skipped_lines += 1;
                return;
            }
            Some(Err(detail)) => {
                let kind = Problem::Malformed;
                self.problem(
                    file,
                    VerifyError {
                        line: n,
                        kind,
                        detail,
                    },
                );
                return;
            }
            Some(Ok(record)) => record,
        };
        if let Err(e) = self.verifier.check(n, &record) {
            self.problem(file, e);
        }
        self.chains.records += 1;
        self.chains.vms = self.verifier.vms();
        self.add(&record);
    }

    fn wanted(&self, r: &AuditRecord, ms: Option<u64>) -> bool {
        let is = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        let after = |since: u64| ms.is_some_and(|t| t >= since);
        let before = |until: u64| ms.is_some_and(|t| t < until);
        is(&self.args.subject, &r.sub)
            && is(&self.args.client, &r.client_id)
            && is(&self.args.rule, &r.rule)
            && self.args.since_ms.is_none_or(after)
            && self.args.until_ms.is_none_or(before)
    }

    /// Counts one record, if it passes the filters.
    pub fn add(&mut self, r: &AuditRecord) {
        let ms = parse_rfc3339_millis(&r.ts);
        if !self.wanted(r, ms) {
            return;
        }
        self.matched += 1;
        let name = |v: &Option<String>| v.clone().unwrap_or_else(|| NONE.to_string());
        let (sub, client) = (name(&r.sub), name(&r.client_id));
        let rule = name(&r.rule);
        let allowed = r.decision == "allow";
        let access = self
            .access
            .entry((sub.clone(), client.clone()))
            .or_default();
        let (table, key) = if allowed {
            (&mut access.allowed, &rule)
        } else {
            (&mut access.denied, &r.reason)
        };
        *table.entry(key.clone()).or_default() += 1;
        let escalation = !allowed && ESCALATIONS.contains(&r.reason.as_str());
        if escalation {
            self.escalations
                .entry((r.reason.clone(), sub.clone(), client.clone(), rule))
                .or_default()
                .add(ms);
        }
        if allowed && is_export_kickoff(&r.path) {
            self.exports
                .entry((sub, client, r.path.clone()))
                .or_default()
                .add(ms);
        }
        let source = r.source.as_deref().map_or(NONE, source_address);
        self.sources.add(source, !allowed, escalation);
    }

    /// The busiest sources, and whether their counts are exact.
    pub fn top_sources(&self) -> (Vec<SourceCount>, bool) {
        (self.sources.top(TOP_SOURCES), self.sources.replaced == 0)
    }

    /// Whether every chain read was intact.
    pub fn intact(&self) -> bool {
        self.chains.problems == 0
    }

    /// The report in the chosen format.
    pub fn render(&self) -> String {
        match self.args.format {
            Format::Text => self.text(),
            Format::Csv => self.csv(),
            Format::Json => self.json().to_string() + "\n",
        }
    }

    fn verdict(&self) -> String {
        let c = &self.chains;
        match &c.first_problem {
            None => format!(
                "intact: {} records from {} workers ({} other lines skipped)",
                c.records, c.vms, c.skipped_lines
            ),
            Some((file, e)) => format!(
                "NOT INTACT: {} problem{} in {} records; first: {file}: {e}",
                c.problems,
                if c.problems == 1 { "" } else { "s" },
                c.records
            ),
        }
    }

    fn filters(&self) -> Vec<(&'static str, String)> {
        let a = &self.args;
        let time = |ms: u64| rfc3339_millis(ms.saturating_mul(1_000_000));
        [
            ("since", a.since_ms.map(time)),
            ("until", a.until_ms.map(time)),
            ("subject", a.subject.clone()),
            ("client", a.client.clone()),
            ("rule", a.rule.clone()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let files = self.args.files.join(", ");
        let _ = writeln!(out, "phi-guard audit report: {}", clean(&files));
        let _ = writeln!(out, "chains: {}", clean(&self.verdict()));
        if self.chains.oversized_lines > 0 {
            let _ = writeln!(
                out,
                "  {} lines over {MAX_LINE} bytes were not read (no record is that long)",
                self.chains.oversized_lines
            );
        }
        if !self.intact() {
            let _ = writeln!(
                out,
                "  what follows counts every record as it stands: damaged ones too"
            );
        }
        let filters: Vec<String> = self
            .filters()
            .iter()
            .map(|(k, v)| format!("--{k} {}", clean(v)))
            .collect();
        let _ = writeln!(
            out,
            "records reported: {} of {}{}",
            self.matched,
            self.chains.records,
            if filters.is_empty() {
                String::new()
            } else {
                format!(" ({})", filters.join(" "))
            }
        );

        let _ = writeln!(out, "\nAccess by subject and client");
        let mut rows = vec![row([
            "subject",
            "client",
            "decision",
            "rule / reason",
            "requests",
        ])];
        for ((sub, client), a) in &self.access {
            for (rule, n) in &a.allowed {
                rows.push(row([sub, client, "allowed", rule, &n.to_string()]));
            }
            for (reason, n) in &a.denied {
                rows.push(row([sub, client, "denied", reason, &n.to_string()]));
            }
        }
        table(&mut out, &rows);

        let _ = writeln!(out, "\nEscalation attempts ({})", ESCALATIONS.join(", "));
        let mut rows = vec![row([
            "reason", "subject", "client", "rule", "attempts", "first", "last",
        ])];
        for ((reason, sub, client, rule), s) in &self.escalations {
            let (first, last) = times(s);
            rows.push(row([
                reason,
                sub,
                client,
                rule,
                &s.count.to_string(),
                &first,
                &last,
            ]));
        }
        table(&mut out, &rows);

        let _ = writeln!(out, "\nBulk exports started (allowed $export kick-offs)");
        let mut rows = vec![row([
            "subject", "client", "path", "exports", "first", "last",
        ])];
        for ((sub, client, path), s) in &self.exports {
            let (first, last) = times(s);
            rows.push(row([
                sub,
                client,
                path,
                &s.count.to_string(),
                &first,
                &last,
            ]));
        }
        table(&mut out, &rows);

        let (top, exact) = self.top_sources();
        let _ = writeln!(
            out,
            "\nBusiest sources (top {TOP_SOURCES}{})",
            if exact {
                ""
            } else {
                "; more than 10000 sources: counts may run over by `over`"
            }
        );
        let mut rows = vec![row(["source", "requests", "denied", "escalations", "over"])];
        for s in &top {
            rows.push(row([
                &s.source,
                &s.requests.to_string(),
                &s.denied.to_string(),
                &s.escalations.to_string(),
                &s.over.to_string(),
            ]));
        }
        table(&mut out, &rows);
        out
    }

    fn csv(&self) -> String {
        const HEADER: [&str; 14] = [
            "section",
            "subject",
            "client",
            "rule",
            "reason",
            "path",
            "source",
            "count",
            "denied",
            "escalations",
            "over",
            "first",
            "last",
            "detail",
        ];
        let mut out = String::new();
        let mut put = |fields: [&str; 14]| {
            let cells: Vec<String> = fields.iter().map(|f| csv_cell(f)).collect();
            out.push_str(&cells.join(","));
            out.push_str("\r\n");
        };
        put(HEADER);
        let blank = |s: &str| {
            if s == NONE {
                String::new()
            } else {
                s.to_string()
            }
        };
        let records = self.chains.records.to_string();
        put([
            "chains",
            "",
            "",
            "",
            "",
            "",
            "",
            &records,
            "",
            "",
            "",
            "",
            "",
            &self.verdict(),
        ]);
        for ((sub, client), a) in &self.access {
            let (sub, client) = (blank(sub), blank(client));
            for (rule, n) in &a.allowed {
                let n = n.to_string();
                put([
                    "allowed",
                    &sub,
                    &client,
                    &blank(rule),
                    "",
                    "",
                    "",
                    &n,
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]);
            }
            for (reason, n) in &a.denied {
                let n = n.to_string();
                put([
                    "denied", &sub, &client, "", reason, "", "", &n, "", "", "", "", "", "",
                ]);
            }
        }
        for ((reason, sub, client, rule), s) in &self.escalations {
            let (first, last) = times(s);
            let n = s.count.to_string();
            put([
                "escalation",
                &blank(sub),
                &blank(client),
                &blank(rule),
                reason,
                "",
                "",
                &n,
                "",
                "",
                "",
                &first,
                &last,
                "",
            ]);
        }
        for ((sub, client, path), s) in &self.exports {
            let (first, last) = times(s);
            let n = s.count.to_string();
            put([
                "export",
                &blank(sub),
                &blank(client),
                "",
                "",
                path,
                "",
                &n,
                "",
                "",
                "",
                &first,
                &last,
                "",
            ]);
        }
        for s in self.top_sources().0 {
            put([
                "source",
                "",
                "",
                "",
                "",
                "",
                &blank(&s.source),
                &s.requests.to_string(),
                &s.denied.to_string(),
                &s.escalations.to_string(),
                &s.over.to_string(),
                "",
                "",
                "",
            ]);
        }
        out
    }

    /// The report as one JSON document.
    pub fn json(&self) -> Value {
        let c = &self.chains;
        let time = |ms: Option<u64>| ms.map(|ms| rfc3339_millis(ms.saturating_mul(1_000_000)));
        let nullable = |s: &str| (s != NONE).then(|| s.to_string());
        let (top, exact) = self.top_sources();
        json!({
            "files": self.args.files,
            "chains": {
                "intact": self.intact(),
                "records": c.records,
                "workers": c.vms,
                "skipped_lines": c.skipped_lines,
                "oversized_lines": c.oversized_lines,
                "problems": c.problems,
                "first_problem": c.first_problem.as_ref().map(|(file, e)| json!({
                    "file": file, "line": e.line, "problem": e.to_string(),
                })),
            },
            "filters": self.filters().into_iter().collect::<BTreeMap<_, _>>(),
            "records_reported": self.matched,
            "access": self.access.iter().map(|((sub, client), a)| json!({
                "subject": nullable(sub), "client": nullable(client),
                "allowed": a.allowed, "denied": a.denied,
            })).collect::<Vec<_>>(),
            "escalations": self.escalations.iter().map(|((reason, sub, client, rule), s)| json!({
                "reason": reason, "subject": nullable(sub), "client": nullable(client),
                "rule": nullable(rule), "attempts": s.count,
                "first": time(s.first_ms), "last": time(s.last_ms),
            })).collect::<Vec<_>>(),
            "exports": self.exports.iter().map(|((sub, client, path), s)| json!({
                "subject": nullable(sub), "client": nullable(client), "path": path,
                "exports": s.count, "first": time(s.first_ms), "last": time(s.last_ms),
            })).collect::<Vec<_>>(),
            "sources": {
                "exact": exact,
                "top": top.iter().map(|s| json!({
                    "source": nullable(&s.source), "requests": s.requests, "denied": s.denied,
                    "escalations": s.escalations, "over": s.over,
                })).collect::<Vec<_>>(),
            },
        })
    }
}

enum Line {
    Read,
    Oversized,
    End,
}

/// The next line into `buf` (without its newline), reading at most
/// [`MAX_LINE`] bytes of it; the rest of a longer line is read past.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Read);
    }
    if buf.len() <= MAX_LINE {
        return Ok(Line::Read); // the last line, without a newline
    }
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(Line::Oversized);
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(at) => {
                reader.consume(at + 1);
                return Ok(Line::Oversized);
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
}

fn times(s: &Span) -> (String, String) {
    let time = |ms: Option<u64>| {
        ms.map(|ms| rfc3339_millis(ms.saturating_mul(1_000_000)))
            .unwrap_or_else(|| NONE.to_string())
    };
    (time(s.first_ms), time(s.last_ms))
}

/// Control characters shown escaped, so a value cannot drive the terminal.
fn clean(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        s.to_string()
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| clean(c)).collect()
}

/// Columns padded to their widest cell; "(none)" under a header alone.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = Vec::new();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    for r in rows {
        let mut line = String::new();
        for (cell, w) in r.iter().zip(&widths) {
            let _ = write!(line, "  {cell:<w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if rows.len() <= 1 {
        out.push_str("  (none)\n");
    }
}

/// A CSV cell (RFC 4180), with a spreadsheet formula defused: a value that
/// starts with `=`, `+`, `-`, `@`, a tab or a carriage return gets a `'`.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Runs `audit report`: the report on stdout, and the exit code: 0 when the
/// chains are intact, 1 when not (the report is printed all the same), 2 on
/// a usage error or a file that cannot be opened.
pub fn run(args: &[&str], out: &mut impl io::Write, err: &mut impl io::Write) -> u8 {
    let args = match Args::parse(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = writeln!(err, "phi-guard: {e}");
            return 2;
        }
    };
    let key = match &args.key_env {
        None => None,
        Some(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Some(v.into_bytes()),
            _ => {
                let _ = writeln!(err, "phi-guard: environment variable {name} is not set");
                return 2;
            }
        },
    };
    let mut readers = Vec::new();
    for path in &args.files {
        match open(path) {
            Ok(r) => readers.push((path.clone(), r)),
            Err(e) => {
                let _ = writeln!(err, "phi-guard: cannot open {path}: {e}");
                return 2;
            }
        }
    }
    let mut report = Report::new(args, key.as_deref());
    for (path, reader) in readers {
        report.read(&path, reader);
    }
    let _ = out.write_all(report.render().as_bytes());
    if report.intact() {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditChain;

    const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    fn args(extra: &[&str]) -> Args {
        let mut a = vec!["log"];
        a.extend_from_slice(extra);
        Args::parse(&a).unwrap()
    }

    fn rec(ms: u64, sub: Option<&str>, reason: &str, rule: &str, path: &str) -> AuditRecord {
        let mut r = AuditRecord {
            ts: rfc3339_millis(ms * 1_000_000),
            decision: if reason == "ok" { "allow" } else { "deny" }.into(),
            reason: reason.into(),
            rule: Some(rule.into()),
            method: "GET".into(),
            sub: sub.map(str::to_string),
            client_id: sub.map(|_| "app".to_string()),
            source: Some("10.0.0.1:5000".into()),
            ..AuditRecord::default()
        };
        r.set_path(path);
        r
    }

    fn lines(records: &mut [AuditRecord]) -> String {
        let mut chain = AuditChain::new("vm".into(), None);
        records
            .iter_mut()
            .map(|r| json!({"audit": chain.seal(r)}).to_string() + "\n")
            .collect()
    }

    fn sample() -> Vec<AuditRecord> {
        vec![
            rec(T0, Some("ann"), "ok", "patient-read", "/fhir/Patient/1"),
            rec(
                T0 + 1000,
                Some("ann"),
                "ok",
                "patient-read",
                "/fhir/Patient/2",
            ),
            rec(
                T0 + 2000,
                Some("ann"),
                "insufficient_scope",
                "lab-delete",
                "/labs/1",
            ),
            rec(T0 + 3000, Some("ann"), "ok", "bulk-export", "/fhir/$export"),
            rec(
                T0 + 4000,
                None,
                "invalid_signature",
                "patient-read",
                "/fhir/Patient/1",
            ),
            rec(
                T0 + 5000,
                Some("bob"),
                "insufficient_scope",
                "lab-delete",
                "/labs/9",
            ),
            rec(
                T0 + 6000,
                Some("ann"),
                "insufficient_scope",
                "lab-delete",
                "/labs/2",
            ),
        ]
    }

    fn report(extra: &[&str], text: &str) -> Report {
        let mut r = Report::new(args(extra), None);
        assert!(r.read("log", text.as_bytes()));
        r
    }

    #[test]
    fn counts_per_identity_escalation_export_and_source() {
        let r = report(&[], &lines(&mut sample()));
        assert!(r.intact());
        assert_eq!((r.chains.records, r.matched), (7, 7));
        let ann = &r.access[&("ann".to_string(), "app".to_string())];
        assert_eq!(ann.allowed["patient-read"], 2);
        assert_eq!(ann.allowed["bulk-export"], 1);
        assert_eq!(ann.denied["insufficient_scope"], 2);
        let anon = &r.access[&("-".to_string(), "-".to_string())];
        assert_eq!(anon.denied["invalid_signature"], 1);
        let key = |reason: &str, sub: &str, client: &str, rule: &str| {
            (reason.into(), sub.into(), client.into(), rule.into())
        };
        let ann_esc = r.escalations[&key("insufficient_scope", "ann", "app", "lab-delete")];
        assert_eq!(
            ann_esc,
            Span {
                count: 2,
                first_ms: Some(T0 + 2000),
                last_ms: Some(T0 + 6000)
            }
        );
        assert_eq!(
            r.escalations[&key("invalid_signature", "-", "-", "patient-read")].count,
            1
        );
        assert_eq!(r.escalations.len(), 3);
        let exports: Vec<_> = r.exports.keys().collect();
        assert_eq!(
            exports,
            [&(
                "ann".to_string(),
                "app".to_string(),
                "/fhir/$export".to_string()
            )]
        );
        let (top, exact) = r.top_sources();
        assert!(exact);
        assert_eq!(
            top,
            [SourceCount {
                source: "10.0.0.1".into(),
                requests: 7,
                denied: 4,
                escalations: 4,
                over: 0
            }]
        );
    }

    #[test]
    fn filters_narrow_the_report_not_the_verification() {
        let log = lines(&mut sample());
        let r = report(
            &["--subject", "ann", "--since", "2026-01-01T00:00:01Z"],
            &log,
        );
        assert_eq!((r.chains.records, r.matched), (7, 4));
        assert_eq!(r.access.len(), 1);
        let r = report(&["--until", "2026-01-01T00:00:02Z"], &log);
        assert_eq!(r.matched, 2);
        let r = report(&["--rule", "lab-delete", "--client", "app"], &log);
        assert_eq!(r.matched, 3);
        let r = report(&["--since", "2026-01-02"], &log);
        assert_eq!(r.matched, 0);
    }

    #[test]
    fn a_damaged_chain_is_named_and_the_report_goes_on() {
        let log = lines(&mut sample());
        let edited = log.replacen("/labs/9", "/labs/8", 1);
        let r = report(&[], &edited);
        assert!(!r.intact());
        let (file, e) = r.chains.first_problem.clone().unwrap();
        assert_eq!((file.as_str(), e.line, e.kind), ("log", 6, Problem::Edited));
        assert_eq!(r.chains.problems, 1);
        assert_eq!(r.matched, 7, "every record is still reported");
        let text = r.render();
        assert!(
            text.contains("chains: NOT INTACT: 1 problem in 7 records; first: log: line 6: edited"),
            "{text}"
        );
        // A line that is not a record is skipped; one that holds a broken record is a problem.
        let r = report(
            &[],
            &format!("hello\n{{\"audit\":{{\"seq\":1,\"chain\":2}}}}\n{log}"),
        );
        assert_eq!(
            (r.chains.skipped_lines, r.chains.problems, r.chains.records),
            (1, 1, 7)
        );
    }

    #[test]
    fn oversized_lines_are_skipped_without_being_held() {
        let log = lines(&mut sample());
        let long = "x".repeat(MAX_LINE + 10);
        let r = report(&[], &format!("{long}\n{log}{long}"));
        assert_eq!((r.chains.oversized_lines, r.chains.records), (2, 7));
        assert!(r.intact());
    }

    #[test]
    fn gzip_is_read_by_its_magic_bytes() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let log = lines(&mut sample());
        let (first, second) = log.split_at(log.len() / 2);
        // Two gzip members, as `cat a.gz b.gz` makes: both are read.
        let mut gz = Vec::new();
        for part in [first, second] {
            let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part.as_bytes()).unwrap();
            gz.extend(e.finish().unwrap());
        }
        let path =
            std::env::temp_dir().join(format!("phi-guard-report-{}.log", std::process::id()));
        std::fs::write(&path, &gz).unwrap();
        let mut r = Report::new(args(&[]), None);
        assert!(r.read("gz", open(path.to_str().unwrap()).unwrap()));
        assert_eq!((r.chains.records, r.intact()), (7, true));
        // Cut short: the records before the cut count, and the chains are not vouched for.
        std::fs::write(&path, &gz[..gz.len() / 3]).unwrap();
        let mut r = Report::new(args(&[]), None);
        assert!(!r.read("gz", open(path.to_str().unwrap()).unwrap()));
        assert_eq!(r.chains.first_problem.unwrap().1.kind, Problem::Io);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn top_sources_are_exact_until_full_then_keep_the_busiest() {
        let mut t = TopSources::new(3);
        for (source, n) in [("a", 5), ("b", 3), ("c", 1)] {
            for _ in 0..n {
                t.add(source, false, false);
            }
        }
        assert_eq!(t.replaced, 0);
        let counts = |t: &TopSources| -> Vec<(String, u64, u64)> {
            t.top(10)
                .into_iter()
                .map(|s| (s.source, s.requests, s.over))
                .collect()
        };
        assert_eq!(
            counts(&t),
            [("a".into(), 5, 0), ("b".into(), 3, 0), ("c".into(), 1, 0)]
        );
        // d takes c's slot with c's count as its possible overcount.
        t.add("d", true, true);
        assert_eq!(t.replaced, 1);
        assert_eq!(
            counts(&t),
            [("a".into(), 5, 0), ("b".into(), 3, 0), ("d".into(), 2, 1)]
        );
        // Space-Saving keeps any source with more than records / slots:
        // 400 of 1,400 with 10 slots, amid 1,000 one-off sources.
        let mut t = TopSources::new(10);
        for i in 0..1000 {
            t.add(&format!("x{i}"), false, false);
            if i % 5 < 2 {
                t.add("busy", false, false);
            }
        }
        let top = counts(&t);
        let (source, n, over) = top.first().unwrap().clone();
        assert_eq!(source, "busy");
        assert!(n - over <= 400 && 400 <= n, "{n} {over}");
        assert!(top.iter().all(|(_, n, over)| n >= over));
        // The heap and its index agree.
        for (i, s) in t.heap.iter().enumerate() {
            assert_eq!(t.at[&s.source], i);
        }
    }

    #[test]
    fn addresses_exports_and_csv_cells() {
        assert_eq!(source_address("10.0.0.7:51234"), "10.0.0.7");
        assert_eq!(source_address("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(source_address("2001:db8::1"), "2001:db8::1");
        assert_eq!(source_address("10.0.0.7"), "10.0.0.7");
        assert!(is_export_kickoff("/fhir/$export"));
        assert!(is_export_kickoff("/fhir/Group/7/%24export"));
        assert!(!is_export_kickoff("/fhir/bulkstatus/1"));
        assert_eq!(csv_cell("=1+2"), "'=1+2");
        assert_eq!(csv_cell("a,\"b\""), "\"a,\"\"b\"\"\"");
        assert_eq!(clean("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
    }

    #[test]
    fn arguments() {
        let a = args(&["--format", "csv", "--since", "2026-01-01", "b.gz"]);
        assert_eq!(a.files, ["log", "b.gz"]);
        assert_eq!((a.format, a.since_ms), (Format::Csv, Some(T0)));
        for bad in [
            &["--format", "xml"][..],
            &["--since", "yesterday"],
            &["--until"],
            &["--nope"],
        ] {
            let mut v = vec!["log"];
            v.extend_from_slice(bad);
            assert!(Args::parse(&v).is_err(), "{bad:?}");
        }
        assert!(Args::parse(&[]).is_err());
    }
}
