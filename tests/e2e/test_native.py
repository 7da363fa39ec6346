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
