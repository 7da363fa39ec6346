"""pytest fixtures for the e2e tests; the helpers themselves live in harness.py."""

from __future__ import annotations

import pytest

from harness import WASM, Envoy, JwksServer, KeyPair, Upstream, shipped_policy

# One key per algorithm family the contract requires.
FAMILIES = ["RS256", "PS256", "ES256", "ES384", "EdDSA"]


@pytest.fixture(scope="session")
def keys() -> dict[str, KeyPair]:
    """Signing keys by algorithm, made once (RSA generation is the slow part)."""
    return {alg: KeyPair.for_alg(alg, kid=f"test-{alg.lower()}") for alg in FAMILIES}


@pytest.fixture
def upstream():
    with Upstream() as server:
        yield server


@pytest.fixture
def jwks_server(keys):
    with JwksServer(*keys.values()) as server:
        yield server


@pytest.fixture
def policy(jwks_server) -> dict:
    """The shipped policy, pointed at this test's JWKS server and allowing every
    family the tests sign with (the shipped one leaves out ES384)."""
    p = Envoy.point_jwks(shipped_policy(), jwks_server.port)
    p["providers"][0]["algorithms"] = list(FAMILIES)
    return p


@pytest.fixture
def envoy_factory(tmp_path, upstream, jwks_server):
    """make(policy=..., start=True, **Envoy kwargs) -> Envoy; every Envoy made
    is stopped at teardown, pass or fail."""
    made: list[Envoy] = []

    def make(policy=None, start: bool = True, **kwargs) -> Envoy:
        wasm = kwargs.get("wasm", WASM)
        if kwargs.get("with_wasm", True) and wasm == WASM and not WASM.exists():
            pytest.fail(f"{WASM} is missing: run `make wasm` (or `make e2e`)")
        envoy = Envoy(tmp_path / f"envoy{len(made)}", upstream.port, jwks_server.port, policy, **kwargs)
        made.append(envoy)
        return envoy.start() if start else envoy

    yield make
    for envoy in made:
        envoy.stop()


@pytest.fixture
def envoy(envoy_factory, policy) -> Envoy:
    """Envoy with phi-guard on the test policy, started and ready."""
    return envoy_factory(policy)
