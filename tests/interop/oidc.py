"""Runs the real OpenID provider (tests/interop/provider.mjs, oidc-provider
from npm) and talks to it over HTTP: discovery, the token endpoint
(client-credentials grant with a resource indicator), revocation and
introspection. Used by the interop tests and `make run IDP=oidc-provider`.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "provider.mjs"
NODE_MODULES = HERE / "node_modules" / "oidc-provider"
AUDIENCE = "https://fhir.example.org"


class ProviderError(RuntimeError):
    pass


@dataclass
class Client:
    """A client registered at the provider (client-credentials grant)."""

    client_id: str
    client_secret: str
    scope: str
    alg: str = "RS256"
    format: str = "jwt"
    ttl: int | None = None

    def registration(self) -> dict:
        out = {"client_id": self.client_id, "client_secret": self.client_secret, "scope": self.scope,
               "alg": self.alg, "format": self.format}
        if self.ttl:
            out["ttl"] = self.ttl
        return out


def basic(client_id: str, secret: str) -> str:
    """HTTP Basic client credentials as RFC 6749 §2.3.1 has them: each part
    form-urlencoded, joined by `:`, then base64."""
    raw = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


class OidcProvider:
    """oidc-provider on 127.0.0.1 (an OS-picked port unless `port` is given),
    with `clients` and, if given, an `introspector` (client id, secret) that
    may only introspect. `kids` holds the signing key ids by algorithm;
    `rotate()` makes the provider sign with new keys (keeping the old ones
    published) and waits until it does."""

    def __init__(self, clients: list[Client], introspector: tuple[str, str] | None = None, port: int = 0):
        if not NODE_MODULES.exists():
            raise ProviderError(f"{NODE_MODULES} is missing: run `make interop-deps` (npm ci in {HERE})")
        node = shutil.which("node")
        if node is None:
            raise ProviderError("node (Node.js 20 or later) is not on PATH")
        self.clients = {c.client_id: c for c in clients}
        self._dir = tempfile.TemporaryDirectory(prefix="phi-guard-oidc-")
        config = Path(self._dir.name) / "config.json"
        doc = {"port": port, "audience": AUDIENCE, "clients": [c.registration() for c in clients]}
        if introspector:
            doc["introspector"] = {"client_id": introspector[0], "client_secret": introspector[1]}
        config.write_text(json.dumps(doc))
        self.log_path = Path(self._dir.name) / "provider.log"
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [node, str(LAUNCHER), str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._wait_event("ready", 0, timeout=30)
        self.issuer: str = ready["issuer"]
        self.port: int = ready["port"]
        self.kids: dict[str, str] = ready["kids"]
        self.discovery = json.loads(self._request("GET", "/.well-known/openid-configuration")[1])

    # -- the process --------------------------------------------------------

    def _read(self) -> None:
        """Every line of its output goes to the log; JSON events are kept."""
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and "event" in event:
                    with self._cond:
                        self._events.append(event)
                        self._cond.notify_all()

    def _wait_event(self, name: str, after: int, timeout: float) -> dict:
        """The first `name` event past the first `after` events."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self._events[after:]:
                    if event["event"] == name:
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise ProviderError(f"oidc-provider: no {name} event:\n{self.log_text()}")
                self._cond.wait(min(left, 0.2))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def rotate(self) -> dict[str, str]:
        """New signing keys at the provider (RS256 and ES256), the old ones
        still published; returns the new kids."""
        with self._cond:
            seen = len(self._events)
        os.kill(self.proc.pid, signal.SIGUSR2)
        self.kids = self._wait_event("rotated", seen, timeout=30)["kids"]
        return self.kids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._dir.cleanup()

    def __enter__(self) -> OidcProvider:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP ---------------------------------------------------------------

    def _request(self, method: str, path: str, form: dict | None = None, auth: str | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {}
            body = None
            if form is not None:
                body = urllib.parse.urlencode(form).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            if auth:
                headers["Authorization"] = auth
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _endpoint(self, name: str) -> str:
        """The path of a discovery document endpoint (all on this host)."""
        url = urllib.parse.urlsplit(self.discovery[name])
        assert (url.hostname, url.port) == ("127.0.0.1", self.port), self.discovery[name]
        return url.path

    @property
    def jwks_uri(self) -> str:
        return self.discovery["jwks_uri"]

    @property
    def introspection_uri(self) -> str:
        return self.discovery["introspection_endpoint"]

    def token_response(self, client_id: str, scope: str, resource: str = AUDIENCE) -> tuple[int, dict]:
        c = self.clients[client_id]
        status, body = self._request(
            "POST",
            self._endpoint("token_endpoint"),
            {"grant_type": "client_credentials", "scope": scope, "resource": resource},
            basic(c.client_id, c.client_secret),
        )
        return status, json.loads(body)

    def token(self, client_id: str, scope: str) -> str:
        """An access token for the API's audience from the token endpoint."""
        status, answer = self.token_response(client_id, scope)
        if status != 200:
            raise ProviderError(f"token endpoint: {status} {answer}")
        return answer["access_token"]

    def revoke(self, client_id: str, token: str) -> int:
        """RFC 7009 revocation by the token's own client; the status."""
        c = self.clients[client_id]
        status, _ = self._request(
            "POST",
            self._endpoint("revocation_endpoint"),
            {"token": token, "token_type_hint": "access_token"},
            basic(c.client_id, c.client_secret),
        )
        return status

    def introspect(self, token: str, client_id: str, secret: str) -> tuple[int, dict]:
        status, body = self._request(
            "POST",
            self._endpoint("introspection_endpoint"),
            {"token": token, "token_type_hint": "access_token"},
            basic(client_id, secret),
        )
        return status, json.loads(body or b"{}")

    def policy_provider(self, name: str = "oidc-provider", **jwks) -> dict:
        """phi-guard's `providers[]` entry for this provider: its issuer, the
        API's audience, RS256 and ES256, the keys from its own `jwks_uri`
        (through cluster `idp_jwks`)."""
        return {
            "name": name,
            "issuer": self.issuer,
            "audiences": [AUDIENCE],
            "algorithms": ["RS256", "ES256"],
            "jwks": {"uri": self.jwks_uri, "cluster": "idp_jwks", **jwks},
        }
