//! Where policies live on disk, for the command line (`lint`, `explain`):
//! an `envoy.yaml` (every phi-guard wasm filter in its listeners), an Istio
//! `WasmPlugin` manifest (`spec.pluginConfig`), or a bare policy JSON. Each
//! policy is found with the exact bytes the filter would be given and a map
//! from its fields to lines of the file, so findings can point at them.
//!
//! YAML is read through saphyr-parser's events (YAML 1.2 core schema,
//! anchors and aliases, `<<` merge keys), built into `serde_json` values.

use std::collections::BTreeMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde_json::{Map, Value};

/// Fields (spelled as config errors spell them: `rules[2].scopes`) to
/// the 1-based line where each starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lines(BTreeMap<String, usize>);

impl Lines {
    /// The line of `field`, else of its nearest enclosing field that has one.
    pub fn of(&self, field: &str) -> Option<usize> {
        let mut f = field;
        loop {
            if let Some(line) = self.0.get(f) {
                return Some(*line);
            }
            f = parent(f)?;
        }
    }

    fn insert(&mut self, field: String, line: usize) {
        self.0.entry(field).or_insert(line);
    }

    /// The fields under `prefix`, re-rooted there (`prefix.x` becomes `x`).
    fn under(&self, prefix: &str) -> Lines {
        let mut out = Lines::default();
        for (field, line) in &self.0 {
            if field == prefix {
                out.insert(String::new(), *line);
            } else if let Some(rest) = field.strip_prefix(prefix) {
                if let Some(rest) = rest.strip_prefix('.') {
                    out.insert(rest.to_owned(), *line);
                } else if rest.starts_with('[') {
                    out.insert(rest.to_owned(), *line);
                }
            }
        }
        out
    }

    /// Every line moved down by `by`.
    fn shifted(mut self, by: usize) -> Lines {
        for line in self.0.values_mut() {
            *line += by;
        }
        self
    }
}

/// `a.b[2]` → `a.b`; `a.b` → `a`; `a` → `` ; `` → none.
fn parent(field: &str) -> Option<&str> {
    if field.is_empty() {
        return None;
    }
    if field.ends_with(']') {
        return field.rfind('[').and_then(|i| field.get(..i));
    }
    Some(match field.rfind('.') {
        Some(i) => field.get(..i).unwrap_or(""),
        None => "",
    })
}

/// `field` joined with an object key.
pub fn key(field: &str, name: &str) -> String {
    if field.is_empty() {
        name.to_owned()
    } else {
        format!("{field}.{name}")
    }
}

/// `field` joined with an array index.
pub fn index(field: &str, i: usize) -> String {
    format!("{field}[{i}]")
}

/// One document of a file, with where its fields are.
#[derive(Debug, Clone)]
pub struct Document {
    pub value: Value,
    pub lines: Lines,
}

/// A file that could not be read as YAML or JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: Option<usize>,
    pub problem: String,
}

/// The documents of a YAML stream (JSON is YAML too, but read as JSON when
/// it looks like JSON, so its numbers and strings are exactly JSON's).
pub fn read_documents(text: &str) -> Result<Vec<Document>, SyntaxError> {
    if text.trim_start().starts_with('{') {
        let value: Value = serde_json::from_str(text).map_err(|e| SyntaxError {
            line: Some(e.line()),
            problem: e.to_string(),
        })?;
        return Ok(vec![Document {
            value,
            lines: json_lines(text),
        }]);
    }
    read_yaml(text)
}

// ---------------------------------------------------------------------------
// Policies in a document

/// What a policy sits in, for the checks around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// A bare policy document.
    Bare,
    /// An `envoy.yaml`: the wasm filter at `filter` (a field of the
    /// document), the `http_connection_manager` config at `hcm`, and its
    /// listener at `listener`.
    Envoy {
        listener: String,
        hcm: String,
        filter: String,
    },
    /// An Istio `WasmPlugin`'s `spec.pluginConfig`.
    WasmPlugin,
}

/// A policy found in a file.
#[derive(Debug, Clone)]
pub struct FoundPolicy {
    /// Which document of the file (0-based).
    pub document: usize,
    /// Where the policy is in the document (empty for a bare one).
    pub at: String,
    pub setting: Setting,
    /// The bytes the filter would be given.
    pub json: String,
    /// The policy as JSON, when it is JSON.
    pub value: Option<Value>,
    /// Lines of the policy's own fields (`rules[1].id`) in the file.
    pub lines: Lines,
    /// Why the policy text cannot be had at all (not a string, say).
    pub problem: Option<String>,
}

/// The Envoy type of a typed config, without its `type.googleapis.com/` prefix.
pub fn type_of(typed_config: &Value) -> &str {
    let t = typed_config
        .get("@type")
        .and_then(Value::as_str)
        .unwrap_or("");
    t.rsplit('/').next().unwrap_or(t)
}

pub const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const WASM_TYPE: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";
pub const ROUTER_TYPE: &str = "envoy.extensions.filters.http.router.v3.Router";

/// What kind of document this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Envoy,
    WasmPlugin,
    /// An `IstioOperator` or bare mesh config (access-log providers).
    MeshConfig,
    Policy,
    Other,
}

/// Tells an Envoy bootstrap, an Istio resource and a bare policy apart.
pub fn kind_of(doc: &Value) -> Kind {
    let kind = doc.get("kind").and_then(Value::as_str);
    if kind == Some("WasmPlugin") {
        Kind::WasmPlugin
    } else if kind == Some("IstioOperator") || doc.get("meshConfig").is_some() {
        Kind::MeshConfig
    } else if doc.get("static_resources").is_some() || doc.get("dynamic_resources").is_some() {
        Kind::Envoy
    } else if doc.get("providers").is_some() || doc.get("rules").is_some() {
        Kind::Policy
    } else {
        Kind::Other
    }
}

/// Every `http_connection_manager` of an Envoy bootstrap: (listener field, hcm typed_config field).
pub fn connection_managers(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let listeners = doc
        .pointer("/static_resources/listeners")
        .and_then(Value::as_array);
    for (i, listener) in listeners.into_iter().flatten().enumerate() {
        let lf = index("static_resources.listeners", i);
        let mut chains: Vec<(String, &Value)> = listener
            .get("filter_chains")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(j, c)| (index(&key(&lf, "filter_chains"), j), c))
            .collect();
        if let Some(c) = listener.get("default_filter_chain") {
            chains.push((key(&lf, "default_filter_chain"), c));
        }
        for (cf, chain) in chains {
            let filters = chain.get("filters").and_then(Value::as_array);
            for (k, f) in filters.into_iter().flatten().enumerate() {
                let tc = f.get("typed_config").unwrap_or(&Value::Null);
                if type_of(tc) == HCM_TYPE {
                    let ff = index(&key(&cf, "filters"), k);
                    out.push((lf.clone(), key(&ff, "typed_config")));
                }
            }
        }
    }
    out
}

/// Whether an HTTP filter is phi-guard's wasm filter.
pub fn is_phi_guard(filter: &Value) -> bool {
    let tc = filter.get("typed_config").unwrap_or(&Value::Null);
    if type_of(tc) != WASM_TYPE {
        return false;
    }
    let config = tc.get("config").unwrap_or(&Value::Null);
    let str_at = |p: &str| config.pointer(p).and_then(Value::as_str).unwrap_or("");
    str_at("/root_id") == "phi_guard"
        || str_at("/name") == "phi_guard"
        || str_at("/vm_config/code/local/filename").ends_with("phi_guard.wasm")
}

/// Reads a field of a document by its spelled path (`a.b[2].c`).
pub fn get<'v>(doc: &'v Value, field: &str) -> Option<&'v Value> {
    let mut v = doc;
    for part in field.split('.').filter(|p| !p.is_empty()) {
        let (name, mut indexes) = match part.find('[') {
            Some(i) => (part.get(..i)?, part.get(i..)?),
            None => (part, ""),
        };
        if !name.is_empty() {
            v = v.get(name)?;
        }
        while let Some(rest) = indexes.strip_prefix('[') {
            let (n, after) = rest.split_once(']')?;
            v = v.get(n.parse::<usize>().ok()?)?;
            indexes = after;
        }
    }
    Some(v)
}

/// Every phi-guard policy in `docs`.
pub fn find_policies(docs: &[Document]) -> Vec<FoundPolicy> {
    let mut out = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        match kind_of(&doc.value) {
            Kind::Policy => out.push(FoundPolicy {
                document: d,
                at: String::new(),
                setting: Setting::Bare,
                json: doc.value.to_string(),
                value: Some(doc.value.clone()),
                lines: doc.lines.clone(),
                problem: None,
            }),
            Kind::WasmPlugin => {
                let at = "spec.pluginConfig".to_owned();
                let (json, value, problem) = match doc.value.pointer("/spec/pluginConfig") {
                    Some(v @ Value::Object(_)) => (v.to_string(), Some(v.clone()), None),
                    Some(_) => (
                        String::new(),
                        None,
                        Some("pluginConfig must be an object (the policy)".to_owned()),
                    ),
                    None => (
                        String::new(),
                        None,
                        Some("no spec.pluginConfig (the policy)".to_owned()),
                    ),
                };
                out.push(FoundPolicy {
                    document: d,
                    lines: doc.lines.under(&at),
                    at,
                    setting: Setting::WasmPlugin,
                    json,
                    value,
                    problem,
                });
            }
            Kind::Envoy => {
                for (listener, hcm) in connection_managers(&doc.value) {
                    let filters_field = key(&hcm, "http_filters");
                    let filters = get(&doc.value, &filters_field).and_then(Value::as_array);
                    for (m, filter) in filters.into_iter().flatten().enumerate() {
                        if !is_phi_guard(filter) {
                            continue;
                        }
                        let ff = index(&filters_field, m);
                        out.push(envoy_policy(d, doc, listener.clone(), hcm.clone(), ff));
                    }
                }
            }
            Kind::MeshConfig | Kind::Other => {}
        }
    }
    out
}

fn envoy_policy(
    document: usize,
    doc: &Document,
    listener: String,
    hcm: String,
    filter: String,
) -> FoundPolicy {
    let cf = key(&key(&filter, "typed_config"), "config.configuration");
    let configuration = get(&doc.value, &cf);
    let setting = Setting::Envoy {
        listener,
        hcm,
        filter,
    };
    let string_value = configuration
        .filter(|c| type_of(c) == "google.protobuf.StringValue" || c.get("@type").is_none());
    let at = key(&cf, "value");
    match string_value.and_then(|c| c.get("value")).and_then(Value::as_str) {
        Some(text) => {
            let base = doc.lines.of(&at).unwrap_or(0);
            // A block scalar's span starts at its text's first line.
            let block = doc.lines.0.contains_key(&format!("{at}#block"));
            let lines = if block {
                json_lines(text).shifted(base.saturating_sub(1))
            } else {
                let mut l = Lines::default();
                l.insert(String::new(), base);
                l
            };
            FoundPolicy {
                document,
                at,
                setting,
                json: text.to_owned(),
                value: serde_json::from_str(text).ok(),
                lines,
                problem: None,
            }
        }
        None => FoundPolicy {
            document,
            at: cf,
            setting,
            json: String::new(),
            value: None,
            lines: Lines::default(),
            problem: Some(
                "the filter's configuration must be a google.protobuf.StringValue holding the policy JSON"
                    .to_owned(),
            ),
        },
    }
}

// ---------------------------------------------------------------------------
// JSON lines

/// Where each field of a JSON text starts (1-based lines); stops quietly
/// at the first thing that is not JSON (the parser reports that).
pub fn json_lines(text: &str) -> Lines {
    let mut s = JsonScan {
        bytes: text.as_bytes(),
        at: 0,
        line: 1,
        out: Lines::default(),
    };
    s.value(String::new());
    s.out
}

struct JsonScan<'a> {
    bytes: &'a [u8],
    at: usize,
    line: usize,
    out: Lines,
}

impl JsonScan<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        if b == b'\n' {
            self.line += 1;
        }
        Some(b)
    }

    fn blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.bump();
        }
    }

    /// Skips a string (at its opening quote), returning its raw text.
    fn string(&mut self) -> Option<String> {
        self.bump();
        let start = self.at;
        loop {
            match self.bump()? {
                b'\\' => {
                    self.bump()?;
                }
                b'"' => break,
                _ => {}
            }
        }
        let raw = self.bytes.get(start..self.at.saturating_sub(1))?;
        let quoted = format!("\"{}\"", String::from_utf8_lossy(raw));
        serde_json::from_str(&quoted).ok()
    }

    fn value(&mut self, field: String) -> Option<()> {
        self.blank();
        self.out.insert(field.clone(), self.line);
        match self.peek()? {
            b'{' => {
                self.bump();
                loop {
                    self.blank();
                    match self.peek()? {
                        b'}' => {
                            self.bump();
                            return Some(());
                        }
                        b',' => {
                            self.bump();
                        }
                        b'"' => {
                            let line = self.line;
                            let name = self.string()?;
                            let f = key(&field, &name);
                            self.out.insert(f.clone(), line);
                            self.blank();
                            if self.bump()? != b':' {
                                return None;
                            }
                            self.value(f)?;
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.bump();
                let mut i = 0;
                loop {
                    self.blank();
                    match self.peek()? {
                        b']' => {
                            self.bump();
                            return Some(());
                        }
                        b',' => {
                            self.bump();
                        }
                        _ => {
                            self.value(index(&field, i))?;
                            i += 1;
                        }
                    }
                }
            }
            b'"' => self.string().map(|_| ()),
            _ => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
                ) {
                    self.bump();
                }
                Some(())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// YAML

/// A collection being built.
enum Frame {
    Seq {
        field: String,
        anchor: usize,
        items: Vec<Value>,
    },
    Map {
        field: String,
        anchor: usize,
        entries: Map<String, Value>,
        /// The key read, waiting for its value.
        key: Option<String>,
        /// `<<` merge sources, applied at the end (explicit keys win).
        merges: Vec<Value>,
    },
}

struct YamlBuilder {
    stack: Vec<Frame>,
    anchors: BTreeMap<usize, Value>,
    lines: Lines,
    docs: Vec<Document>,
    /// The document's value, once complete.
    root: Option<Value>,
}

fn yaml_error(span: Option<Span>, problem: impl Into<String>) -> SyntaxError {
    SyntaxError {
        line: span.map(|s| s.start.line()),
        problem: problem.into(),
    }
}

fn read_yaml(text: &str) -> Result<Vec<Document>, SyntaxError> {
    let mut b = YamlBuilder {
        stack: Vec::new(),
        anchors: BTreeMap::new(),
        lines: Lines::default(),
        docs: Vec::new(),
        root: None,
    };
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| SyntaxError {
            line: Some(e.marker().line()),
            problem: e.info().to_owned(),
        })?;
        b.event(event, span)?;
    }
    Ok(b.docs)
}

impl YamlBuilder {
    /// The field the next value goes to, or an error for a non-scalar key.
    fn next_field(&self) -> String {
        match self.stack.last() {
            None => String::new(),
            Some(Frame::Seq { field, items, .. }) => index(field, items.len()),
            Some(Frame::Map { field, key: k, .. }) => match k {
                Some(name) => key(field, name),
                None => field.clone(),
            },
        }
    }

    /// The next scalar is a mapping key.
    fn wants_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }

    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let line = span.start.line();
        match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
            Event::DocumentStart(_) => {
                self.root = None;
                self.lines = Lines::default();
            }
            Event::DocumentEnd => {
                let value = self.root.take().unwrap_or(Value::Null);
                self.docs.push(Document {
                    value,
                    lines: std::mem::take(&mut self.lines),
                });
            }
            Event::Alias(id) => {
                let value = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| yaml_error(Some(span), "unknown alias"))?;
                if self.wants_key() {
                    return Err(yaml_error(Some(span), "an alias as a mapping key"));
                }
                let field = self.next_field();
                self.lines.insert(field, line);
                self.complete(value, span)?;
            }
            Event::Scalar(text, style, anchor, tag) => {
                if self.wants_key() {
                    if let Some(Frame::Map { key: k, .. }) = self.stack.last_mut() {
                        *k = Some(text.into_owned());
                    }
                    return Ok(());
                }
                let field = self.next_field();
                if matches!(style, ScalarStyle::Literal | ScalarStyle::Folded) {
                    self.lines.insert(format!("{field}#block"), line);
                }
                self.lines.insert(field, line);
                let is_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !is_str {
                    plain_scalar(&text)
                } else {
                    Value::String(text.into_owned())
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, value.clone());
                }
                self.complete(value, span)?;
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if self.wants_key() {
                    return Err(yaml_error(
                        Some(span),
                        "a collection as a mapping key is not supported",
                    ));
                }
                let field = self.next_field();
                self.lines.insert(field.clone(), line);
                self.stack
                    .push(if matches!(event, Event::SequenceStart(..)) {
                        Frame::Seq {
                            field,
                            anchor,
                            items: Vec::new(),
                        }
                    } else {
                        Frame::Map {
                            field,
                            anchor,
                            entries: Map::new(),
                            key: None,
                            merges: Vec::new(),
                        }
                    });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { items, anchor, .. }) => (Value::Array(items), anchor),
                    Some(Frame::Map {
                        mut entries,
                        anchor,
                        merges,
                        ..
                    }) => {
                        for source in merges {
                            let maps = match source {
                                Value::Array(items) => items,
                                one => vec![one],
                            };
                            for m in maps {
                                if let Value::Object(m) = m {
                                    for (k, v) in m {
                                        entries.entry(k).or_insert(v);
                                    }
                                }
                            }
                        }
                        (Value::Object(entries), anchor)
                    }
                    None => return Err(yaml_error(Some(span), "unbalanced collection")),
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, value.clone());
                }
                self.complete(value, span)?;
            }
        }
        Ok(())
    }

    /// A value is complete: it goes into the collection being built, or is
    /// the document's root.
    fn complete(&mut self, value: Value, span: Span) -> Result<(), SyntaxError> {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map {
                entries,
                key: k,
                merges,
                ..
            }) => {
                let Some(name) = k.take() else {
                    return Err(yaml_error(Some(span), "a value without a key"));
                };
                if name == "<<" {
                    merges.push(value);
                } else if entries.insert(name.clone(), value).is_some() {
                    return Err(yaml_error(
                        Some(span),
                        format!("duplicate key {name:?} in a mapping"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A plain scalar under YAML 1.2's core schema.
fn plain_scalar(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = text.trim_start_matches('+').parse::<i64>() {
            return Value::from(n);
        }
        if let Ok(n) = text.trim_start_matches('+').parse::<u64>() {
            return Value::from(n);
        }
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(n) = u64::from_str_radix(hex, 16) {
            return Value::from(n);
        }
    }
    if let Some(oct) = text.strip_prefix("0o") {
        if let Ok(n) = u64::from_str_radix(oct, 8) {
            return Value::from(n);
        }
    }
    let float_like = digits.bytes().any(|b| b.is_ascii_digit())
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if float_like {
        if let Some(n) = text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
        {
            return Value::Number(n);
        }
    }
    Value::String(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_values_and_lines() {
        let text = "\
a: 1
b:
  - x
  - {c: true, d: ~}
e: &anchor
  f: '007'
g: *anchor
h: |
  {\"k\": [1,
   2]}
";
        let docs = read_documents(text).unwrap();
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        assert_eq!(
            d.value,
            json!({"a": 1, "b": ["x", {"c": true, "d": null}], "e": {"f": "007"},
                   "g": {"f": "007"}, "h": "{\"k\": [1,\n 2]}\n"})
        );
        assert_eq!(d.lines.of("a"), Some(1));
        assert_eq!(d.lines.of("b[1].c"), Some(4));
        assert_eq!(d.lines.of("e.f"), Some(6));
        // Inside an alias: the alias's line.
        assert_eq!(d.lines.of("g.f"), Some(7));
        // A block scalar: where its text starts.
        assert_eq!(d.lines.of("h"), Some(9));
        // Unknown fields: the nearest known ancestor, here the document.
        assert_eq!(d.lines.of("nope.deeper[3]"), Some(1));
    }

    #[test]
    fn json_lines_follow_the_text() {
        let text = "{\n  \"rules\": [\n    {\"id\": \"a\"},\n    {\"id\":\n      \"b\", \"s\": [\"x\", \"y\"]}\n  ],\n  \"q\\\"\": 1\n}";
        let l = json_lines(text);
        assert_eq!(l.of("rules"), Some(2));
        assert_eq!(l.of("rules[0].id"), Some(3));
        assert_eq!(l.of("rules[1].id"), Some(4));
        assert_eq!(l.of("rules[1].s[1]"), Some(5));
        assert_eq!(l.of("q\""), Some(7));
        // Broken JSON: what came before is kept, nothing panics.
        assert_eq!(json_lines("{\"a\": [1, {").of("a"), Some(1));
    }

    #[test]
    fn envoy_policy_lines_point_into_the_block() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/envoy/envoy.yaml"))
                .unwrap();
        let docs = read_documents(&text).unwrap();
        let found = find_policies(&docs);
        assert_eq!(found.len(), 1);
        let p = &found[0];
        assert!(p.problem.is_none());
        crate::config::Policy::from_json(p.json.as_bytes()).unwrap();
        let line = p.lines.of("rules[0].id").unwrap();
        let at = text.lines().nth(line - 1).unwrap();
        assert!(at.contains("\"id\": \"health\""), "line {line}: {at}");
        assert!(matches!(p.setting, Setting::Envoy { .. }));
    }

    #[test]
    fn get_reads_spelled_fields() {
        let v = json!({"a": {"b": [{"c": 1}, [2, 3]]}});
        assert_eq!(get(&v, "a.b[0].c"), Some(&json!(1)));
        assert_eq!(get(&v, "a.b[1][1]"), Some(&json!(3)));
        assert_eq!(get(&v, "a.x"), None);
        assert_eq!(get(&v, ""), Some(&v));
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a"), Some(""));
    }

    #[test]
    fn yaml_syntax_errors_have_a_line() {
        let e = read_documents("a: 1\nb: [\n").unwrap_err();
        assert!(e.line.is_some(), "{e:?}");
        assert!(read_documents("a: 1\na: 2\n").is_err());
    }
}
