"""pytest fixtures for the interop tests: a real OpenID provider and Envoy
with phi-guard trusting it. Envoy, the upstream and the waiting helpers are
the e2e suite's (tests/e2e/harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import WASM, Envoy, Upstream, shipped_policy  # noqa: E402
from oidc import Client, OidcProvider  # noqa: E402

# phi-guard's own client at the provider, for introspection: a space in the id
# and `:`, `%`, `+` in the secret, which RFC 6749 §2.3.1's encoding must carry.
INTROSPECTOR = ("phi-guard gw", "s3:cr%t+/= x")
INTROSPECTOR_ENV = "PHI_GUARD_INTEROP_INTROSPECTION_SECRET"

CLIENTS = [
    Client("ward-app", "ward-app-secret", "read:patient-profile", alg="RS256"),
    Client("lab-robot", "lab-robot-secret", "read:patient-profile delete:lab-results", alg="ES256"),
    # Tokens that live two seconds.
    Client("brief-app", "brief-app-secret", "read:patient-profile", alg="ES256", ttl=2),
    # Opaque access tokens: known only through introspection.
    Client("opaque-app", "opaque-app-secret", "read:patient-profile", format="opaque"),
]


@pytest.fixture(scope="module")
def idp():
    """One provider per test file (its key rotation is the only state a test
    changes, and each test's Envoy fetches the keys it finds)."""
    with OidcProvider(CLIENTS, introspector=INTROSPECTOR) as provider:
        yield provider


@pytest.fixture
def upstream():
    with Upstream() as server:
        yield server


@pytest.fixture
def policy(idp) -> dict:
    """The shipped policy trusting only this provider; no clock skew, so a
    token is refused as soon as the provider's `exp` passes."""
    p = shipped_policy()
    p["providers"] = [idp.policy_provider()]
    p["clock_skew_seconds"] = 0
    return p


@pytest.fixture
def envoy_factory(tmp_path, upstream, idp, monkeypatch):
    """make(policy, **Envoy kwargs) -> a started Envoy whose `idp_jwks` and
    `introspection` clusters lead to the provider; stopped at teardown."""
    monkeypatch.setenv(INTROSPECTOR_ENV, INTROSPECTOR[1])
    made: list[Envoy] = []

    def make(policy: dict, **kwargs) -> Envoy:
        if not WASM.exists():
            pytest.fail(f"{WASM} is missing: run `make wasm`")
        kwargs.setdefault("clusters", {"introspection": idp.port})
        kwargs.setdefault("host_env_keys", [INTROSPECTOR_ENV])
        envoy = Envoy(tmp_path / f"envoy{len(made)}", upstream.port, idp.port, policy, **kwargs)
        made.append(envoy)
        return envoy.start()

    yield make
    for envoy in made:
        envoy.stop()
