"""The Grafana dashboard and Prometheus rules in envoy/observability/ (issue #18)
hold to what Envoy with phi-guard really exports.

Envoy runs with phi-guard, traffic goes through, `/stats/prometheus` is
scraped, and every metric a dashboard query or a rule names must be in it
(a `{__name__=~"…"}` selector must match at least one). Every metric of the
README's Stats table must be exported and on the dashboard. The files are
checked for shape; with `promtool` (Debian's `prometheus` package, which
`.ci/run` unpacks) the rules must pass `promtool check rules`, the alerts
their unit tests (`promtool test rules`), and every dashboard query must
parse as PromQL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from harness import REPO, eventually, mint, readme_reason_codes, tamper

OBS = REPO / "envoy" / "observability"
DASHBOARD = OBS / "grafana-dashboard.json"
RULES = OBS / "prometheus-rules.yaml"
RULES_TEST = OBS / "prometheus-rules.test.yaml"

# PromQL words that look like metric names but are not.
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "increase", "irate", "delta", "clamp_min", "clamp_max",
    "label_replace", "vector", "scalar", "histogram_quantile", "topk", "bottomk", "abs", "absent",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
}


def _strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def referenced(expr: str) -> tuple[set[str], set[str]]:
    """The metric names a PromQL expression selects by name, and the
    `__name__=~` regexes it selects by."""
    regexes = set(re.findall(r'__name__\s*=~\s*"((?:[^"\\]|\\.)*)"', expr))
    s = _strings(expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", s):
        word = m.group(1)
        if word not in _PROMQL_WORDS:
            names.add(word)
    return names, regexes


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def readme_metrics() -> set[str]:
    """Every metric of README's Stats table, as /stats/prometheus names it."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Stats")
    section = text[start : text.index("\n## ", start + 1)]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    names = set()
    for name in re.findall(r"`(phi_guard\.[a-z_.<>]+)`", table):
        if "<reason>" in name:
            names |= {name.replace("<reason>", code) for code in readme_reason_codes() if code != "ok"}
        else:
            names.add(name)
    return {n.replace(".", "_") for n in names}


def readme_anchors() -> set[str]:
    """GitHub's anchors for README's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


# The native module's stats come out as envoy_dynamicmodulescustom_phi_guard_*:
# the README's metric_relabel_configs rule strips the prefix, as done here.
NATIVE_PREFIX = "envoy_dynamicmodulescustom_"


def scrape(envoy) -> dict[str, float]:
    """/stats/prometheus as {name: summed value}, relabelled as the README says."""
    out: dict[str, float] = {}
    for line in envoy.admin("/stats/prometheus").text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            name = m.group(1)
            if name.startswith(NATIVE_PREFIX + "phi_guard_"):
                name = name.removeprefix(NATIVE_PREFIX)
            out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


def test_the_files_have_the_shape_grafana_and_prometheus_want():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in d["templating"]["list"])
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p["datasource"]["uid"] == "${datasource}", p
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]

    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    assert len({g["name"] for g in doc["groups"]}) == len(doc["groups"])
    anchors = readme_anchors()
    alerts = [r for r in rules() if "alert" in r]
    for r in rules():
        assert ("alert" in r) != ("record" in r), r
        assert isinstance(r["expr"], str) and r["expr"].strip(), r
        if "record" in r:
            assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", r["record"]), r["record"]
            continue
        assert re.fullmatch(r"PhiGuard[A-Za-z]+", r["alert"]), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r
        assert r["annotations"]["summary"], r
        runbook = r["annotations"]["runbook"]
        assert runbook.startswith("README.md#") and runbook.split("#", 1)[1] in anchors, runbook
        if "for" in r:
            assert re.fullmatch(r"\d+[smh]", r["for"]), r
    # What the issue asks the alerts to watch.
    watched = " ".join(r["expr"] for r in alerts)
    for metric in ["phi_guard_jwks_key_age_seconds", "phi_guard_jwks_fetch_failed", "phi_guard_denied_invalid_signature",
                   "phi_guard_denied_unknown_key", "phi_guard_denied_insufficient_scope",
                   "envoy_wasm_phi_guard_vm_reload_failure"]:
        assert metric in watched, metric


def test_every_metric_the_dashboard_and_rules_name_is_exported(envoy, keys, upstream, build):
    # Traffic of every kind the dashboard shows: allowed (then from the token
    # cache), no token, insufficient scope, step-up, forged, no rule.
    good = mint(keys["RS256"])
    forged = tamper(mint(keys["ES256"]))
    assert envoy.get("/fhir/Patient/1", token=good).status == 200
    assert envoy.get("/fhir/Patient/2", token=good).status == 200
    assert envoy.get("/fhir/Patient/1").status == 401
    assert envoy.request("DELETE", "/labs/1", token=good).status == 403
    assert envoy.get("/fhir/$export", token=mint(keys["RS256"], scope="export:bulk")).status == 401
    assert envoy.get("/fhir/Patient/1", token=forged).status == 401
    assert envoy.get("/nowhere", token=good).status == 403

    def moved():
        s = scrape(envoy)
        return s if s.get("phi_guard_allowed", 0) >= 2 and s.get("phi_guard_denied_invalid_signature", 0) >= 1 else None

    exported = eventually(moved, timeout=10)
    assert exported, envoy.admin("/stats/prometheus").text[-3000:]
    assert exported["phi_guard_step_up_challenges"] >= 1 and exported["phi_guard_token_cache_hit"] >= 1, exported
    assert exported["phi_guard_denied_insufficient_scope"] >= 1 and exported["phi_guard_denied_no_rule"] >= 1

    if build == "native":
        # No wasm VM there: the VM panels and alerts have nothing to watch;
        # every phi_guard metric the README lists is exported all the same.
        contract = readme_metrics()
        # Introspection is not in the module yet (README, Native module).
        phi = {m for m in contract if m.startswith("phi_guard_") and "introspection" not in m}
        assert len(phi) > 30 and phi <= set(exported), phi - set(exported)
        return

    recorded = {r["record"] for r in rules() if "record" in r}
    exprs = {"dashboard": dashboard_exprs(), "rules": [r["expr"] for r in rules()]}
    on_dashboard: set[str] = set()
    for where, items in exprs.items():
        for expr in items:
            names, regexes = referenced(expr)
            assert names or regexes, (where, expr)
            for name in names:
                assert name in exported or name in recorded, f"{where}: {name} is not exported:\n{expr}"
            for regex in regexes:
                matched = {n for n in exported if re.fullmatch(regex, n)}
                assert matched, f"{where}: {regex!r} matches no exported metric:\n{expr}"
                if where == "dashboard":
                    on_dashboard |= matched
            if where == "dashboard":
                on_dashboard |= names
    # The contract: every metric README lists is exported and on the dashboard.
    contract = readme_metrics()
    assert len(contract) > 40, contract
    assert contract <= set(exported), contract - set(exported)
    assert contract <= on_dashboard, contract - on_dashboard
    assert "envoy_wasm_envoy_wasm_runtime_v8_active" in on_dashboard


def _promtool() -> str:
    tool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not tool:
        pytest.skip("promtool not found (.ci/run unpacks it from Debian's prometheus package; PROMTOOL=path)")
    return tool


def test_promtool_checks_the_rules_runs_their_unit_tests_and_parses_every_dashboard_query(tmp_path):
    promtool = _promtool()
    run = lambda *args, cwd=None: subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True)  # noqa: E731
    checked = run("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout, checked.stdout
    tested = run("test", "rules", RULES_TEST.name, cwd=OBS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Each dashboard query, Grafana's interval made concrete, as a recording rule.
    queries = [e.replace("$__rate_interval", "5m") for e in dashboard_exprs()]
    wrapped = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query:{i}", "expr": q} for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(wrapped))
    parsed = run("check", "rules", str(path))
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
