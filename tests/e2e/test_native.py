"""The dynamic-module build against the pinned Envoy: it loads, its ABI
version matches the one Envoy was built with, and it serves requests."""

from __future__ import annotations

import pytest

from harness import NATIVE, Envoy


@pytest.fixture
def native_envoy(tmp_path, upstream, jwks_server, policy):
    if not NATIVE.exists():
        pytest.fail(f"{NATIVE} is missing: run `make native` (or `make e2e`)")
    envoy = Envoy(tmp_path / "native", upstream.port, jwks_server.port, policy, build="native", log_level="info")
    yield envoy.start()
    envoy.stop()


def test_native_module_loads_and_answers(native_envoy, upstream):
    log = native_envoy.log_text()
    assert "Dynamic module ABI version v0.2.0 matched." in log, native_envoy.log_tail()
    resp = native_envoy.get("/healthz")
    assert resp.status == 200, resp.text
    assert upstream.last is not None and upstream.last.path == "/healthz"


def test_a_missing_module_stops_envoy(tmp_path, upstream, jwks_server, policy, monkeypatch):
    import harness

    monkeypatch.setattr(harness, "NATIVE_DIR", tmp_path / "nowhere")
    envoy = Envoy(tmp_path / "missing", upstream.port, jwks_server.port, policy, build="native")
    log = envoy.expect_start_failure()
    assert "Unable to load dynamic module libphi_guard.so" in log and not envoy.alive


def test_introspection_is_refused_at_load(tmp_path, upstream, jwks_server, policy):
    """Not supported natively yet: refused, so nothing gets through unasked."""
    policy["providers"][0]["introspection"] = {
        "uri": "http://127.0.0.1:1/introspect",
        "cluster": "idp_jwks",
        "client_id": "phi-guard",
        "client_secret_env": "PATH",
    }
    envoy = Envoy(tmp_path / "introspect", upstream.port, jwks_server.port, policy, build="native")
    log = envoy.expect_start_failure()
    assert "invalid configuration at `providers[0].introspection`" in log, log[-2000:]
