"""`make run`: phi-guard in front of a toy FHIR API, with a local IdP.

Starts a JWKS server (127.0.0.1:10002) for a freshly made RSA key, an upstream
(127.0.0.1:10001) and Envoy with the shipped envoy/envoy.yaml (listener
127.0.0.1:10000, admin 127.0.0.1:9901), prints a token and curl lines to try,
and stops everything on Ctrl-C. `--smoke` runs those requests itself and exits.
`--servers-only` starts just the JWKS server and the upstream, prints a token
and stays up: Envoy runs elsewhere (envoy/docker-compose.yaml uses this).
`--idp oidc-provider` (`make run IDP=oidc-provider`) puts a real OpenID
provider (oidc-provider, as in the interop tests) on 127.0.0.1:10002 instead
of the demo IdP: tokens come from its token endpoint (client-credentials
grant), and Envoy runs on a copy of envoy/envoy.yaml trusting it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))
import yaml
from harness import ENVOY_BIN, ENVOY_YAML, REPO, JwksServer, KeyPair, Upstream, http_request, make_certs, mint

LISTENER, UPSTREAM, JWKS, ADMIN = 10000, 10001, 10002, 9901
# mint.py signs with the same key, so more tokens work against the running demo.
# PHI_GUARD_DEMO_KEY moves it, e.g. when the repo is mounted read-only (docker-compose).
KEY_FILE = Path(os.environ.get("PHI_GUARD_DEMO_KEY", REPO / ".run" / "demo-key.json"))
# envoy/envoy.yaml reads its listener's certificate here (`make certs`).
CERTS = REPO / ".run" / "certs"
BASE = f"https://127.0.0.1:{LISTENER}"
CURL = f"curl --cacert {CERTS.relative_to(REPO) / 'ca.pem'}"


def save_key(key: KeyPair) -> None:
    KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
    KEY_FILE.write_text(json.dumps({"kid": key.kid, "alg": key.alg, "pem": key.private_pem().decode()}))
    KEY_FILE.chmod(0o600)


def load_key() -> KeyPair:
    saved = json.loads(KEY_FILE.read_text())
    return KeyPair.from_pem(saved["pem"].encode(), saved["alg"], saved["kid"])


def wait_ready(envoy: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if envoy.poll() is not None:
            sys.exit(f"envoy exited with {envoy.returncode}; see the log above")
        try:
            if http_request(ADMIN, "GET", "/ready", timeout=1).text.strip() == "LIVE":
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("envoy did not become ready")


def smoke(token: str) -> int:
    """The printed curl lines, run and checked."""
    url = "/fhir/Patient/123"
    checks = [
        ("GET", url, {"Authorization": f"Bearer {token}"}, 200),
        ("GET", url, {}, 401),
        ("DELETE", "/labs/1", {"Authorization": f"Bearer {token}"}, 403),
    ]
    failed = 0
    tls = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
    for method, path, headers, want in checks:
        got = http_request(LISTENER, method, path, headers, tls=tls).status
        print(f"{method} {path} -> {got} (want {want})")
        failed += got != want
    return 1 if failed else 0


def _interrupt(*_):
    """Ctrl-C, and SIGTERM or SIGINT from a script (a background job ignores
    SIGINT unless asked), all stop everything cleanly."""
    raise KeyboardInterrupt


def servers_only(key: KeyPair) -> int:
    """The IdP (JWKS) and the upstream without Envoy, until Ctrl-C or SIGTERM
    (`docker compose stop`); Envoy runs elsewhere with envoy/envoy.yaml."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    base = BASE
    try:
        print(
            f"""
phi-guard demo servers are up: JWKS http://127.0.0.1:{JWKS}/.well-known/jwks.json, upstream 127.0.0.1:{UPSTREAM}
(no Envoy here: start it with envoy/envoy.yaml, listener {base})

  TOKEN={mint(key, scope="read:patient-profile")}

  # allowed (200): scope read:patient-profile
  {CURL} -i -H "Authorization: Bearer $TOKEN" {base}/fhir/Patient/123
  # refused (401): no token
  {CURL} -i {base}/fhir/Patient/123
  # refused (403): needs delete:lab-results
  {CURL} -i -X DELETE -H "Authorization: Bearer $TOKEN" {base}/labs/1

  The token expires in 5 minutes. More tokens: python demo/mint.py --scope "delete:lab-results"
  (with docker compose: docker compose -f envoy/docker-compose.yaml exec demo-idp python demo/mint.py)
""",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="run the example requests, then stop")
    mode.add_argument(
        "--servers-only",
        action="store_true",
        help="start only the JWKS server and the upstream (no Envoy), print a token, stay up",
    )
    parser.add_argument(
        "--idp",
        choices=["demo", "oidc-provider"],
        default="demo",
        help="the demo IdP (a JWKS and tokens minted here) or a real OpenID provider",
    )
    args = parser.parse_args()
    if args.idp == "oidc-provider":
        if args.servers_only:
            sys.exit("--servers-only runs the demo IdP only")
        return with_oidc_provider(args.smoke)

    make_certs(CERTS)
    key = KeyPair.rsa("RS256", kid=f"demo-{int(time.time())}")
    save_key(key)
    try:
        jwks, upstream = JwksServer(key, port=JWKS), Upstream(port=UPSTREAM)
    except OSError as e:
        sys.exit(f"cannot listen on 127.0.0.1:{JWKS}/{UPSTREAM} ({e}): is another demo running?")
    if args.servers_only:
        try:
            return servers_only(key)
        finally:
            jwks.stop()
            upstream.stop()
    # Envoy logs warnings only, so the terminal shows its access log: one line,
    # with the audit record, per request.
    envoy = subprocess.Popen(
        [str(ENVOY_BIN), "-c", str(ENVOY_YAML), "--concurrency", "1", "--use-dynamic-base-id", "--log-level", "warn", "--file-flush-interval-msec", "500"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        wait_ready(envoy)
        token = mint(key, scope="read:patient-profile")
        if args.smoke:
            return smoke(token)
        base = BASE
        print(
            f"""
phi-guard demo is up: Envoy {base} -> upstream 127.0.0.1:{UPSTREAM}, JWKS 127.0.0.1:{JWKS}

  TOKEN={token}

  # allowed (200): scope read:patient-profile
  {CURL} -i -H "Authorization: Bearer $TOKEN" {base}/fhir/Patient/123
  # refused (401): no token
  {CURL} -i {base}/fhir/Patient/123
  # refused (403): needs delete:lab-results
  {CURL} -i -X DELETE -H "Authorization: Bearer $TOKEN" {base}/labs/1

  More tokens: .venv/bin/python demo/mint.py --scope "delete:lab-results"
  Access log (with audit): /tmp/phi-guard-access.log. Ctrl-C stops everything.
""",
            flush=True,
        )
        while envoy.poll() is None:
            time.sleep(0.5)
        return envoy.returncode or 1
    except KeyboardInterrupt:
        return 0
    finally:
        if envoy.poll() is None:
            envoy.terminate()
            try:
                envoy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                envoy.kill()
        jwks.stop()
        upstream.stop()


OIDC_CLIENTS = [
    ("ward-app", "ward-app-secret", "read:patient-profile", "RS256"),
    ("lab-robot", "lab-robot-secret", "read:patient-profile delete:lab-results", "ES256"),
]


def oidc_envoy_config(provider) -> Path:
    """envoy/envoy.yaml with its policy trusting `provider`, written to .run/."""
    config = yaml.safe_load(ENVOY_YAML.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]
    policy = json.loads(wasm["configuration"]["value"])
    policy["providers"] = [provider.policy_provider(cache_seconds=60)]
    wasm["configuration"]["value"] = json.dumps(policy, indent=2)
    path = REPO / ".run" / "envoy-oidc-provider.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def with_oidc_provider(smoke_only: bool) -> int:
    """The demo with oidc-provider as the IdP, on the demo IdP's port."""
    from oidc import AUDIENCE, Client, OidcProvider, ProviderError

    make_certs(CERTS)
    clients = [Client(cid, secret, scope, alg=alg) for cid, secret, scope, alg in OIDC_CLIENTS]
    try:
        provider = OidcProvider(clients, port=JWKS)
    except ProviderError as e:
        sys.exit(f"cannot start oidc-provider: {e}")
    try:
        upstream = Upstream(port=UPSTREAM)
    except OSError as e:
        provider.stop()
        sys.exit(f"cannot listen on 127.0.0.1:{UPSTREAM} ({e}): is another demo running?")
    config = oidc_envoy_config(provider)
    envoy = subprocess.Popen(
        [str(ENVOY_BIN), "-c", str(config), "--concurrency", "1", "--use-dynamic-base-id", "--log-level", "warn", "--file-flush-interval-msec", "500"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        wait_ready(envoy)
        token = provider.token("ward-app", "read:patient-profile")
        if smoke_only:
            return smoke(token)
        base = BASE
        token_url = provider.discovery["token_endpoint"]
        print(
            f"""
phi-guard demo is up with oidc-provider: Envoy {base} -> upstream 127.0.0.1:{UPSTREAM},
OpenID provider {provider.issuer} (discovery: {provider.issuer}/.well-known/openid-configuration)

  # an RFC 9068 access token from the provider's token endpoint (client credentials)
  TOKEN=$(curl -s -u ward-app:ward-app-secret -d grant_type=client_credentials \\
    -d scope=read:patient-profile -d resource={AUDIENCE} {token_url} | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

  # allowed (200): scope read:patient-profile
  {CURL} -i -H "Authorization: Bearer $TOKEN" {base}/fhir/Patient/123
  # refused (403): needs delete:lab-results (lab-robot:lab-robot-secret may have it, signed ES256)
  {CURL} -i -X DELETE -H "Authorization: Bearer $TOKEN" {base}/labs/1

  Provider log: {provider.log_path}. Access log (with audit): /tmp/phi-guard-access.log. Ctrl-C stops everything.
""",
            flush=True,
        )
        while envoy.poll() is None and provider.proc.poll() is None:
            time.sleep(0.5)
        return envoy.returncode or 1
    except KeyboardInterrupt:
        return 0
    finally:
        if envoy.poll() is None:
            envoy.terminate()
            try:
                envoy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                envoy.kill()
        provider.stop()
        upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
