"""pytest fixtures for the e2e tests; the helpers themselves live in harness.py."""

from __future__ import annotations

import pytest

import os

from harness import BUILDS, NATIVE, WASM, Envoy, JwksServer, KeyPair, Upstream, shipped_policy

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


# The builds every test on `envoy_factory` runs against: the wasm filter and
# the dynamic module (PHI_GUARD_BUILDS=wasm picks one).
E2E_BUILDS = [b for b in os.environ.get("PHI_GUARD_BUILDS", ",".join(BUILDS)).split(",") if b]


@pytest.fixture(params=E2E_BUILDS)
def build(request) -> str:
    """The build under test; a test that only makes sense for one build
    skips the other with `only(build, ...)`."""
    return request.param


def only(build: str, wanted: str, why: str) -> None:
    """Skips the test unless it runs against `wanted`."""
    if build != wanted:
        pytest.skip(f"{wanted} build only: {why}")


@pytest.fixture
def envoy_factory(tmp_path, upstream, jwks_server, build):
    """make(policy=..., start=True, **Envoy kwargs) -> Envoy; every Envoy made
    is stopped at teardown, pass or fail. Made with the build under test
    unless `build=` says otherwise."""
    made: list[Envoy] = []

    def make(policy=None, start: bool = True, **kwargs) -> Envoy:
        kwargs.setdefault("build", build)
        wasm = kwargs.get("wasm", WASM)
        if kwargs["build"] == "native" and kwargs.get("with_wasm", True) and not NATIVE.exists():
            pytest.fail(f"{NATIVE} is missing: run `make native` (or `make e2e`)")
        if kwargs["build"] == "wasm" and kwargs.get("with_wasm", True) and wasm == WASM and not WASM.exists():
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
