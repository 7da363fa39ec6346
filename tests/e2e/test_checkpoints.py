"""Audit checkpoints through the real Envoy (issue #12, "an audit trail whose
completeness can be checked"; README "Audit checkpoints").

One Envoy with two workers, `audit.checkpoint_seconds: 1` and Envoy's own log
at warn except the `wasm` component at info (as the README asks) serves
traffic in two phases; between them the access log is rotated for real
(renamed, then Envoy's `/reopen_logs`). The tests then hold copies of the
access log against the checkpoints in Envoy's log with `phi-guard audit verify
--checkpoints`: intact logs pass; a cut tail, a worker's whole chain removed,
and a rotated log read without `--start-anywhere` do not. A second Envoy shows
the checkpoint written when the plugin stops (root `on_done`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import E2E_BUILDS
from harness import REPO, WASM, Envoy, JwksServer, Upstream, eventually, http_request, mint, shipped_policy

# README "Audit checkpoints": the line each VM writes to Envoy's log.
CHECKPOINT = re.compile(r"phi-guard audit checkpoint (\{.*\})\s*$")
# Envoy's prefix for the filter's log line at info, before its message (the
# wasm VM's, or the dynamic module's).
WASM_INFO = re.compile(
    r"^\[[^\]]+\]\[\d+\]\[info\]\[(?:wasm|dynamic_modules)\] .*"
    r"(?:wasm log phi_guard )?phi_guard: phi-guard audit checkpoint "
)


# --------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def cli() -> Path:
    """The native `phi-guard` command, built once."""
    subprocess.run(["cargo", "build", "--quiet", "--bin", "phi-guard"], cwd=REPO, check=True, timeout=900)
    binary = REPO / "target" / "debug" / "phi-guard"
    assert binary.exists(), binary
    return binary


def verify(cli: Path, log: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(cli), "audit", "verify", str(log), *args], capture_output=True, text=True, timeout=60)


def checkpoints(envoy_log: Path) -> list[dict]:
    """The checkpoints in Envoy's log, in order."""
    out = []
    for line in envoy_log.read_text(errors="replace").splitlines():
        m = CHECKPOINT.search(line)
        if m:
            out.append(json.loads(m.group(1)))
    return out


def records(path: Path) -> list[dict]:
    """The audit records of an access-log file, in order."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [r for r in (record_of(l) for l in text.splitlines() if l.strip()) if r]


def heads(recs: list[dict]) -> dict[str, int]:
    """The last seq of each VM's chain."""
    out: dict[str, int] = {}
    for r in recs:
        out[r["vm"]] = max(out.get(r["vm"], 0), r["seq"])
    return out


def checkpointed(envoy_log: Path) -> dict[str, int]:
    """The highest checkpointed seq of each VM."""
    return heads(checkpoints(envoy_log))


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(l + "\n" for l in lines))
    return path


def record_of(line: str) -> dict | None:
    """The audit record in one access-log line (None: Envoy answered itself)."""
    raw = json.loads(line).get("audit")
    return None if raw in (None, "", "-") else json.loads(raw)


def vm_of(line: str) -> str | None:
    rec = record_of(line)
    return rec and rec["vm"]


def start(envoy: Envoy, workers: int) -> None:
    """Starts Envoy with `workers` workers and the wasm component's log at info
    (the rest at the harness's warn): what the README asks of a deployment."""
    real_popen = subprocess.Popen

    def popen(argv, *args, **kwargs):
        argv = list(argv)
        argv[argv.index("--concurrency") + 1] = str(workers)
        argv += ["--component-log-level", "wasm:info,dynamic_modules:info"]
        return real_popen(argv, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(subprocess, "Popen", popen)
        envoy.start()


def wait_until_checkpointed(envoy: Envoy, access_log: Path) -> dict[str, int]:
    """Waits until the access log's last record of every VM is checkpointed in
    Envoy's log; returns the heads."""

    def covered():
        want = heads(records(access_log))
        got = checkpointed(envoy.log_path)
        return want if want and all(got.get(vm, 0) >= seq for vm, seq in want.items()) else None

    got = eventually(covered, timeout=30, interval=0.25)
    assert got, (heads(records(access_log)), checkpointed(envoy.log_path), envoy.log_tail())
    return got


def traffic(envoy: Envoy, token: str, path: Path, count: int, want_vms: int) -> None:
    """`count` requests on fresh connections (the kernel spreads them over the
    workers), then more until `want_vms` VMs have records in `path`."""
    for batch in range(20):
        for i in range(count if batch == 0 else 10):
            assert envoy.get(f"/fhir/Patient/{i}", token=token if i % 3 else None).status in (200, 401)
        vms = eventually(lambda: len(heads(records(path))) >= want_vms and heads(records(path)), timeout=5)
        if vms:
            return
    pytest.fail(f"want records from {want_vms} workers in {path}: {heads(records(path))}")


# --------------------------------------------------------------------------
# Two workers, two phases, a real rotation between them


@dataclass
class Run:
    envoy: Envoy
    before: list[str]  # access-log lines written before the rotation (access.log.1)
    after: list[str]  # the current access.log's lines
    workdir: Path

    @property
    def whole(self) -> list[str]:
        return self.before + self.after


@pytest.fixture(scope="module", params=E2E_BUILDS)
def run(request, tmp_path_factory, keys) -> Run:
    if request.param == "wasm" and not WASM.exists():
        pytest.fail(f"{WASM} is missing: run `make wasm` (or `make e2e`)")
    key = keys["ES256"]
    jwks = JwksServer(key)
    upstream = Upstream()
    policy = Envoy.point_jwks(shipped_policy(), jwks.port)
    policy["audit"] = {"checkpoint_seconds": 1}
    workdir = tmp_path_factory.mktemp("checkpoints")
    envoy = Envoy(workdir / "envoy", upstream.port, jwks.port, policy, build=request.param)
    try:
        start(envoy, workers=2)
        token = mint(key)
        traffic(envoy, token, envoy.access_log_path, 30, want_vms=2)
        wait_until_checkpointed(envoy, envoy.access_log_path)
        # Rotate as logrotate would: rename, then have Envoy reopen its access logs.
        rotated = envoy.access_log_path.with_name("access.log.1")
        os.rename(envoy.access_log_path, rotated)
        reopen = http_request(envoy.admin_port, "POST", "/reopen_logs")
        assert reopen.status == 200, reopen.text
        traffic(envoy, token, envoy.access_log_path, 30, want_vms=2)
        wait_until_checkpointed(envoy, envoy.access_log_path)
        time.sleep(0.5)  # a straggling line of the old file is flushed
        before = [l for l in rotated.read_text().splitlines() if l.strip()]
        after = [l for l in envoy.access_log_path.read_text().splitlines() if l.strip()]
        yield Run(envoy, before, after, workdir)
    finally:
        envoy.stop()
        upstream.stop()
        jwks.stop()


def check(run: Run, name: str, lines: list[str], cli: Path, *args: str) -> subprocess.CompletedProcess:
    return verify(cli, write(run.workdir / f"{name}.log", lines), "--checkpoints", str(run.envoy.log_path), *args)


def assert_incomplete(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 1, (res.stdout, res.stderr)
    for word in words:
        assert word in res.stderr, (word, res.stderr)


def test_each_worker_checkpoints_its_chain_in_envoys_log(run):
    lines = [l for l in run.envoy.log_text().splitlines() if CHECKPOINT.search(l)]
    assert lines, run.envoy.log_tail()
    for line in lines:
        # Envoy's wasm component at info, everything else at warn: the line still comes.
        assert WASM_INFO.match(line), line
        cp = json.loads(CHECKPOINT.search(line).group(1))
        assert list(cp) == ["vm", "seq", "chain", "ts"], cp
        assert re.fullmatch(r"[0-9a-f]{64}", cp["chain"]), cp
    recs = [r for r in map(record_of, run.whole) if r]
    by_seq = {(r["vm"], r["seq"]): r["chain"] for r in recs}
    cps = checkpoints(run.envoy.log_path)
    # Only the two workers write checkpoints (the main thread's VM decides nothing),
    # and every checkpoint names a record of theirs, chain value and all.
    assert {c["vm"] for c in cps} == {r["vm"] for r in recs}, (cps, heads(recs))
    for c in cps:
        assert by_seq.get((c["vm"], c["seq"])) == c["chain"], c
    # Both phases are vouched for, each VM at its last record.
    assert checkpointed(run.envoy.log_path) == heads(recs)


def test_an_idle_worker_writes_no_more_checkpoints(run):
    count = len(checkpoints(run.envoy.log_path))
    time.sleep(3)  # three periods without a request
    assert len(checkpoints(run.envoy.log_path)) == count


def test_verify_passes_on_the_real_logs(run, cli):
    res = check(run, "whole", run.whole, cli)
    assert res.returncode == 0, (res.stdout, res.stderr)
    recs = [r for r in map(record_of, run.whole) if r]
    assert f"ok: {len(recs)} records from 2 workers" in res.stdout, res.stdout
    matched = int(re.search(r"ok: (\d+) checkpoints matched \(0 from before the log\)", res.stdout).group(1))
    assert matched == len(checkpoints(run.envoy.log_path)) >= 4, res.stdout
    assert "warning" not in res.stderr, res.stderr


def test_verify_finds_a_cut_tail_and_names_the_chain(run, cli):
    lines = list(run.whole)
    last = heads([r for r in map(record_of, lines) if r])
    vm = max(last, key=last.get)  # the busier worker: it has records to spare
    mine = [i for i, l in enumerate(lines) if vm_of(l) == vm]
    assert len(mine) > 3, last
    cut = [l for i, l in enumerate(lines) if i not in mine[-3:]]
    res = check(run, "tail-cut", cut, cli)
    assert_incomplete(res, f"tail cut: vm {vm}: records end at seq {last[vm] - 3}", f"reached seq {last[vm]}")
    (other,) = set(last) - {vm}
    assert f"vm {other}" not in res.stderr, res.stderr
    # Without the checkpoints, the cut log passes: only they can tell.
    assert verify(cli, run.workdir / "tail-cut.log").returncode == 0


def test_verify_finds_a_workers_whole_chain_removed(run, cli):
    vm = vm_of(run.whole[0])
    gone = [l for l in run.whole if vm_of(l) != vm]
    res = check(run, "chain-removed", gone, cli)
    assert_incomplete(res, f"chain missing: vm {vm}: no records")
    assert verify(cli, run.workdir / "chain-removed.log").returncode == 0


def test_rotated_log_passes_only_with_start_anywhere(run, cli):
    res = check(run, "rotated", run.after, cli)
    # Without --start-anywhere the chain check itself refuses a log that starts mid-chain.
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "line 1: missing" in res.stderr, res.stderr
    res = check(run, "rotated", run.after, cli, "--start-anywhere")
    assert res.returncode == 0, (res.stdout, res.stderr)
    m = re.search(r"ok: (\d+) checkpoints matched \((\d+) from before the log\)", res.stdout)
    assert m, res.stdout
    matched, before = int(m.group(1)), int(m.group(2))
    # The first phase's checkpoints vouch for the rotated-away file, not held against this one.
    assert matched >= 2 and before >= 2, res.stdout
    assert matched + before == len(checkpoints(run.envoy.log_path)), res.stdout


def test_rotated_log_is_still_held_to_its_checkpoints(run, cli):
    vm = vm_of(run.after[-1])
    last = max(i for i, l in enumerate(run.after) if vm_of(l) == vm)
    cut = run.after[:last]
    res = check(run, "rotated-cut", cut, cli, "--start-anywhere")
    assert_incomplete(res, f"tail cut: vm {vm}")


# --------------------------------------------------------------------------
# The last checkpoint, written as the plugin stops


def test_stopping_envoy_checkpoints_what_the_timer_did_not(envoy_factory, policy, keys, cli, tmp_path):
    policy["audit"] = {"checkpoint_seconds": 3600}
    envoy = envoy_factory(policy, start=False)
    start(envoy, workers=1)
    token = mint(keys["ES256"])
    assert envoy.get("/fhir/Patient/1", token=token).status == 200
    # The first record is checkpointed at once...
    (first,) = eventually(lambda: checkpoints(envoy.log_path), timeout=15)
    assert first["seq"] == 1, first
    for i in range(4):
        assert envoy.get(f"/fhir/Patient/{i}", token=token).status == 200
    eventually(lambda: len(records(envoy.access_log_path)) == 5, timeout=10)
    # ...and then none within the hour: the tail is vouched for by nothing yet.
    time.sleep(1)
    assert checkpointed(envoy.log_path) == {first["vm"]: 1}
    envoy.stop()  # SIGTERM: Envoy calls the root context's on_done
    assert checkpointed(envoy.log_path) == {first["vm"]: 5}, envoy.log_tail()
    lines = [l for l in envoy.access_log_path.read_text().splitlines() if l.strip()]
    res = verify(cli, envoy.access_log_path, "--checkpoints", str(envoy.log_path))
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "ok: 2 checkpoints matched" in res.stdout, res.stdout
    res = verify(cli, write(tmp_path / "cut.log", lines[:-1]), "--checkpoints", str(envoy.log_path))
    assert_incomplete(res, f"tail cut: vm {first['vm']}: records end at seq 4")
