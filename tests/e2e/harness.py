"""Shared helpers for phi-guard's end-to-end tests (and the demo).

One place for everything a test needs around the real Envoy: keys and hand-made
JWS tokens, a JWKS server the test can break at will, an upstream that records
what reached it, and a runner that starts Envoy with the shipped config
rewritten to those servers. Everything listens on 127.0.0.1 with OS-picked ports.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
ENVOY_YAML = REPO / "envoy" / "envoy.yaml"
# PHI_GUARD_WASM lets a developer try another build (a debug one, say).
WASM = Path(os.environ.get("PHI_GUARD_WASM", REPO / "target" / "wasm32-wasip1" / "release" / "phi_guard.wasm"))
ENVOY_BIN = REPO / ".venv" / "bin" / "envoy"
# The dynamic module (`make native`): Envoy loads lib<name>.so from this directory.
NATIVE_DIR = Path(os.environ.get("PHI_GUARD_NATIVE_DIR", REPO / "target" / "native"))
NATIVE = NATIVE_DIR / "libphi_guard.so"
# The builds the e2e suite runs against (conftest parametrises on them).
BUILDS = ("wasm", "native")

ISSUER = "https://idp.example.org"
AUDIENCE = "https://fhir.example.org"
WASM_FILTER = "envoy.filters.http.wasm"
NATIVE_FILTER = "envoy.filters.http.dynamic_modules"
# Where Envoy puts a filter's own stats, by build.
STATS_PREFIX = {"wasm": "wasmcustom.", "native": "dynamicmodulescustom."}


# --------------------------------------------------------------------------
# Keys and tokens
# --------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(n: int, size: int | None = None) -> bytes:
    size = size or max(1, (n.bit_length() + 7) // 8)
    return n.to_bytes(size, "big")


_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


class KeyPair:
    """A signing key with a `kid` and a default `alg`, and its public JWK."""

    def __init__(self, private, alg: str, kid: str | None = None):
        self.private = private
        self.alg = alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"

    @classmethod
    def rsa(cls, alg: str = "RS256", kid: str | None = None, bits: int = 2048) -> KeyPair:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits), alg, kid)

    @classmethod
    def ec(cls, alg: str = "ES256", kid: str | None = None) -> KeyPair:
        curve = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}[alg]()
        return cls(ec.generate_private_key(curve), alg, kid)

    @classmethod
    def ed25519(cls, kid: str | None = None) -> KeyPair:
        return cls(ed25519.Ed25519PrivateKey.generate(), "EdDSA", kid)

    @classmethod
    def for_alg(cls, alg: str, kid: str | None = None) -> KeyPair:
        """A fresh key of the family `alg` needs."""
        if alg[:2] in ("RS", "PS"):
            return cls.rsa(alg, kid)
        if alg in ("ES256", "ES384"):
            return cls.ec(alg, kid)
        if alg == "EdDSA":
            return cls.ed25519(kid)
        raise ValueError(f"no key family for {alg}")

    @classmethod
    def from_pem(cls, pem: bytes, alg: str, kid: str) -> KeyPair:
        return cls(serialization.load_pem_private_key(pem, password=None), alg, kid)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        """The public key as PEM: the classic HMAC-confusion 'secret'."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_jwk(self, **overrides) -> dict:
        """Public JWK with kid, alg and use; overrides (None = drop) let tests break it."""
        pub = self.private.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            nums = pub.public_numbers()
            jwk = {"kty": "RSA", "n": b64url(_int_bytes(nums.n)), "e": b64url(_int_bytes(nums.e))}
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            nums = pub.public_numbers()
            size = (pub.curve.key_size + 7) // 8
            crv = {256: "P-256", 384: "P-384"}[pub.curve.key_size]
            jwk = {
                "kty": "EC",
                "crv": crv,
                "x": b64url(_int_bytes(nums.x, size)),
                "y": b64url(_int_bytes(nums.y, size)),
            }
        else:
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return _apply(jwk, overrides)

    def sign(self, alg: str, data: bytes) -> bytes:
        """Signature of `data` under `alg`, in JWS form (ECDSA as raw r||s, not DER)."""
        key = self.private
        if alg.startswith("RS"):
            return key.sign(data, padding.PKCS1v15(), _HASHES[alg[2:]]())
        if alg.startswith("PS"):
            h = _HASHES[alg[2:]]()
            # RFC 7518 §3.5: salt length equals the hash length.
            return key.sign(data, padding.PSS(padding.MGF1(h), h.digest_size), h)
        if alg in ("ES256", "ES384"):
            der = key.sign(data, ec.ECDSA(_HASHES[alg[2:]]()))
            r, s = decode_dss_signature(der)
            size = (key.curve.key_size + 7) // 8
            return _int_bytes(r, size) + _int_bytes(s, size)
        if alg == "EdDSA":
            return key.sign(data)
        raise ValueError(f"cannot sign {alg} with this key")


def _apply(base: dict, overrides: dict) -> dict:
    """Merge overrides into base; a None value removes the key."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def jwks(*keys: KeyPair) -> dict:
    return {"keys": [k.public_jwk() for k in keys]}


def default_claims(**overrides) -> dict:
    """Claims of a good access token; overrides (None = drop) make bad ones."""
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-4711",
        "client_id": "phi-guard-tests",
        "scope": "read:patient-profile",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    return _apply(base, overrides)


def mint(
    key: KeyPair | None,
    alg: str | None = None,
    claims: dict | None = None,
    header: dict | None = None,
    hmac_secret: bytes | None = None,
    **claim_overrides,
) -> str:
    """A JWS compact token, built by hand so tests can forge anything.

    `alg` defaults to the key's; "none" gives an empty signature; HS* signs with
    `hmac_secret`. `header` entries override the default header (None = drop),
    e.g. {"kid": "nope"} or {"crit": ["x"]}. Keyword arguments override claims.
    """
    alg = alg or (key.alg if key else "none")
    hdr = {"alg": alg, "typ": "at+jwt"}
    if key is not None:
        hdr["kid"] = key.kid
    hdr = _apply(hdr, header or {})
    body = _apply(claims if claims is not None else default_claims(), claim_overrides)
    signing_input = (
        b64url(json.dumps(hdr, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(body, separators=(",", ":")).encode())
    ).encode("ascii")
    if alg == "none":
        sig = b""
    elif alg in _HMAC:
        sig = hmac.new(hmac_secret or b"", signing_input, _HMAC[alg]).digest()
    else:
        if key is None:
            raise ValueError(f"{alg} needs a key")
        sig = key.sign(alg, signing_input)
    return signing_input.decode("ascii") + "." + b64url(sig)


def tamper(token: str) -> str:
    """The same token with one bit of its signature flipped."""
    head, payload, sig = token.split(".")
    raw = bytearray(b64url_decode(sig))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


# --------------------------------------------------------------------------
# TLS: a local CA, the listener's certificate, client certificates


@dataclass
class Certs:
    """PEM files of a local CA, a server certificate for 127.0.0.1 and
    localhost, and two client certificates ("alice", "bob") it signed."""

    dir: Path
    ca: Path
    server: Path
    server_key: Path

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of a client certificate the CA signed."""
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def client_sha256(self, name: str) -> bytes:
        """SHA-256 of the client certificate's DER: what `cnf.x5t#S256` binds to."""
        cert = x509.load_pem_x509_certificate(self.client(name)[0].read_bytes())
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def _write_key(path: Path, key) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_certs(directory: Path) -> Certs:
    """A CA and the certificates it signs, written to `directory` (kept if
    there already: `make run` and docker-compose reuse them)."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certs(directory, directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if certs.ca.exists() and certs.server.exists() and certs.client("bob")[0].exists():
        return certs
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=825)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("phi-guard local CA"))
        .issuer_name(name("phi-guard local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage, sans=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        "localhost",
        x509.ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    certs.ca.write_bytes(pem(ca))
    certs.server.write_bytes(pem(server))
    _write_key(certs.server_key, server_key)
    for client in ("alice", "bob"):
        cert, key = leaf(client, x509.ExtendedKeyUsageOID.CLIENT_AUTH)
        cert_path, key_path = certs.client(client)
        cert_path.write_bytes(pem(cert))
        _write_key(key_path, key)
    return certs


_CERTS: Certs | None = None


def tls_certs() -> Certs:
    """The tests' certificates, made once per process."""
    global _CERTS
    if _CERTS is None:
        _CERTS = make_certs(Path(tempfile.mkdtemp(prefix="phi-guard-certs-")))
    return _CERTS


def client_tls(
    client: str | None = None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context trusting the tests' CA; `client` presents that
    client certificate; `minimum`/`maximum` pin the TLS versions offered
    (TLS 1.1 needs OpenSSL's security level lowered, done here)."""
    certs = tls_certs()
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if client is not None:
        cert, key = certs.client(client)
        ctx.load_cert_chain(str(cert), str(key))
    if minimum is not None and minimum < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        # Python deprecates naming TLS 1.0/1.1: only tests of refusing them do.
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
    return ctx


# --------------------------------------------------------------------------
# Loopback HTTP servers
# --------------------------------------------------------------------------


class _Listener(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops connections a burst of
    # requests opens at once (Envoy then answers 503 "reset reason: connect").
    request_queue_size = 128


class _Server:
    """A threaded loopback HTTP server that can be stopped and restarted on its port.

    Handlers speak HTTP/1.0 (close after each answer), so stopping the listener
    really makes the endpoint unreachable: no pooled connection lingers.
    """

    def __init__(self, handler_cls, port: int = 0):
        self._handler_cls = handler_cls
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port  # 0: the OS picks; the demo asks for fixed ones
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        if self._httpd is not None:
            return
        httpd = _Listener(("127.0.0.1", self.port), self._handler_cls)
        httpd.daemon_threads = True
        httpd.owner = self  # handlers reach their server's state through this
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):  # keep pytest output readable
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _JwksHandler(_QuietHandler):
    def do_GET(self):
        owner: JwksServer = self.server.owner
        with owner.lock:
            owner.hits += 1
            owner.paths.append(self.path)
            status, body, delay = owner.status, owner.body, owner.delay_seconds
        if delay:
            time.sleep(delay)
        self._answer(status, body, "application/json")


class _HoldingServer(_Server):
    """A _Server that `down()` takes down (connection refused) and `up()`
    brings back on the same port.

    While down, the port stays bound by a socket that does not listen. A freed
    port could be taken before `up()`: Envoy retrying the refused endpoint may
    be given that very port as its ephemeral source and connect to itself
    (TCP simultaneous open), which once failed CI with "Address already in use".
    Linux never hands out an explicitly bound port as an ephemeral one.
    """

    def __init__(self, handler_cls, port: int = 0):
        self._placeholder: socket.socket | None = None
        super().__init__(handler_cls, port)

    def down(self) -> None:
        if not self.running:
            return
        self.stop()
        hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server did
        hold.bind(("127.0.0.1", self.port))
        self._placeholder = hold

    def up(self) -> None:
        hold, self._placeholder = self._placeholder, None
        if hold is not None:
            hold.close()
        self.start()

    def stop(self) -> None:
        super().stop()
        hold, self._placeholder = self._placeholder, None
        if hold is not None:
            hold.close()


class JwksServer(_HoldingServer):
    """Serves a JWKS document; the test changes it, its status, or takes it down.

    `down()` stops listening (connection refused; see _HoldingServer);
    `set_status(503)` keeps listening but fails; `hits` counts requests that
    reached it.
    """

    def __init__(self, *keys: KeyPair, port: int = 0):
        self.hits = 0
        self.paths: list[str] = []
        self.status = 200
        self.delay_seconds = 0.0
        self.body = b""
        super().__init__(_HoldingJwksHandler, port)
        self.set_keys(*keys)

    def set_keys(self, *keys: KeyPair) -> None:
        self.set_document(jwks(*keys))

    def set_document(self, doc) -> None:
        """A dict/list is served as JSON; str/bytes as they are (for garbage)."""
        if isinstance(doc, (dict, list)):
            doc = json.dumps(doc)
        if isinstance(doc, str):
            doc = doc.encode()
        with self.lock:
            self.body = doc

    def set_status(self, status: int) -> None:
        with self.lock:
            self.status = status

    # -- holding answers: a fetch stays "in flight" until the test says ------

    def hold(self, as_arrived: bool = False) -> None:
        """Requests that arrive from now on wait, unanswered, until `release()`.
        `as_arrived`: they are answered with the document as it was when they
        arrived (an IdP that read its keys, then was slow to send them)."""
        gate = self._gate()
        with gate:
            self._gate_closed = True
            self._gate_as_arrived = as_arrived

    def release(self) -> None:
        """Lets every held request through, answered with what is set by then."""
        gate = self._gate()
        with gate:
            self._gate_closed = False
            gate.notify_all()

    def wait_held(self, count: int = 1, timeout: float = 30) -> bool:
        """Waits until `count` requests are held; False if they did not come."""
        gate = self._gate()
        with gate:
            return gate.wait_for(lambda: self._gate_waiting >= count, timeout=timeout)

    @property
    def held(self) -> int:
        """How many requests are held right now."""
        gate = self._gate()
        with gate:
            return self._gate_waiting

    def arrivals(self) -> list[float]:
        """`time.monotonic()` of every request's arrival (held or not), in order."""
        gate = self._gate()
        with gate:
            return list(self._arrivals)

    def _gate(self) -> threading.Condition:
        # Made on first use: __init__ stays as it was.
        with self.lock:
            if getattr(self, "_gate_cond", None) is None:
                self._gate_cond = threading.Condition()
                self._gate_closed = False
                self._gate_as_arrived = False
                self._gate_waiting = 0
                self._arrivals: list[float] = []
            return self._gate_cond

    def _arrived(self) -> bytes | None:
        """A request came in: note when, and wait here while held. Returns the
        body to answer with when it was held `as_arrived`."""
        gate = self._gate()
        with gate:
            self._arrivals.append(time.monotonic())
            if not self._gate_closed:
                return None
            with self.lock:
                body = self.body if self._gate_as_arrived else None
            self._gate_waiting += 1
            gate.notify_all()
            # Bounded: an answer a failed test left held still goes out.
            gate.wait_for(lambda: not self._gate_closed, timeout=120)
            self._gate_waiting -= 1
            return body


@dataclass
class SeenIntrospection:
    """One request as the introspection server received it."""

    method: str
    path: str
    content_type: str | None
    content_length: str | None
    authorization: str | None
    body: bytes
    form: dict[str, list[str]] = field(default_factory=dict)

    @property
    def token(self) -> str | None:
        values = self.form.get("token", [])
        return values[0] if len(values) == 1 else None

    @property
    def basic_raw(self) -> tuple[str, str] | None:
        """The Basic user and password as sent (still form-urlencoded)."""
        scheme, _, value = (self.authorization or "").partition(" ")
        if scheme != "Basic":
            return None
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        return (user, password) if sep else None

    @property
    def client(self) -> tuple[str, str] | None:
        """Client id and secret, decoded as RFC 6749 §2.3.1 says the server does."""
        raw = self.basic_raw
        return None if raw is None else tuple(urllib.parse.unquote_plus(p) for p in raw)


class _IntrospectionHandler(_QuietHandler):
    def _introspect(self):
        owner: IntrospectionServer = self.server.owner
        body = self._read_body()
        seen = SeenIntrospection(
            method=self.command,
            path=self.path,
            content_type=self.headers.get("Content-Type"),
            content_length=self.headers.get("Content-Length"),
            authorization=self.headers.get("Authorization"),
            body=body,
            form=urllib.parse.parse_qs(body.decode("latin-1"), keep_blank_values=True),
        )
        with owner.lock:
            owner.requests.append(seen)
            status, delay, raw = owner.status, owner.delay_seconds, owner.raw
            answer = owner.answers.get(seen.token, {"active": False})
        if delay:
            time.sleep(delay)
        if raw is None:
            raw = json.dumps(answer).encode()
        try:
            self._answer(status, raw, "application/json")
        except (BrokenPipeError, ConnectionResetError):
            pass  # Envoy gave up waiting (timeout_ms): what a slow-server test wants

    do_GET = do_POST = _introspect


class IntrospectionServer(_HoldingServer):
    """An RFC 7662 introspection endpoint the test controls.

    `answer(token, {...})` sets what it says about a token (unknown tokens
    are `{"active": false}`); `status`, `delay_seconds` and `raw` (bytes
    served whatever the token) break it; `down()`/`up()` as JwksServer.
    `requests` records each request: method, path, content type, form
    fields and Basic credentials.
    """

    def __init__(self, port: int = 0):
        self.requests: list[SeenIntrospection] = []
        self.answers: dict[str, dict] = {}
        self.status = 200
        self.delay_seconds = 0.0
        self.raw: bytes | None = None
        super().__init__(_IntrospectionHandler, port)

    def answer(self, token: str, answer: dict) -> None:
        with self.lock:
            self.answers[token] = answer

    def asked_about(self, token: str) -> int:
        """How many requests asked about `token`."""
        with self.lock:
            return sum(r.token == token for r in self.requests)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)


class _HoldingJwksHandler(_JwksHandler):
    """Notes the arrival and waits while the server is held (JwksServer.hold), then answers as usual."""

    def do_GET(self):
        body = self.server.owner._arrived()
        if body is None:
            super().do_GET()
            return
        owner: JwksServer = self.server.owner
        with owner.lock:
            owner.hits += 1
            owner.paths.append(self.path)
        self._answer(200, body, "application/json")


class MisbehavingJwks:
    """A JWKS endpoint on a raw socket, for the ways an IdP can fail mid-answer.

    `mode` picks the next answers: "ok" (the keys), "huge" (50 MB of JSON),
    "empty" (200, no body), "truncated" (half the body, then close),
    "reset" (half the body, then a TCP reset), "html" (200 text/html error
    page), "redirect" (302 to `/moved`, which would serve the keys), "drip"
    (the keys one byte a second). `down()`/`up()` refuse connections and take
    them again, keeping the port bound as JwksServer does. `hits` counts
    requests per path. It answers any method, reading a request's body
    (an introspection POST's form) before it answers, so a connection is
    never reset early by a body left unread; `set_document` changes what
    "ok" serves (a JWKS, a revocation list, an introspection answer).
    """

    MODES = ("huge", "empty", "truncated", "reset", "html", "redirect", "drip")

    def __init__(self, *keys: KeyPair):
        self.document = json.dumps(jwks(*keys)).encode()
        self.mode = "ok"
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._listening = False
        self._closed = False
        self.up()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def hits_on(self, path: str) -> int:
        with self.lock:
            return self.hits.get(path, 0)

    def set_document(self, doc) -> None:
        """A dict/list is served as JSON; str/bytes as they are."""
        if isinstance(doc, (dict, list)):
            doc = json.dumps(doc)
        if isinstance(doc, str):
            doc = doc.encode()
        with self.lock:
            self.document = doc

    def down(self) -> None:
        """Refuse connections: a bound socket that does not listen answers SYN with RST."""
        with self.lock:
            if not self._listening:
                return
            self._listening = False
            self._sock.close()
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The accept loop's poll holds the old socket for up to 0.1 s.
            deadline = time.monotonic() + 2
            while True:
                try:
                    self._sock.bind(("127.0.0.1", self.port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

    def up(self) -> None:
        with self.lock:
            if not self._listening:
                self._sock.listen(64)
                self._sock.settimeout(0.1)
                self._listening = True

    def stop(self) -> None:
        self._closed = True
        with self.lock:
            self._listening = False
            self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _accept_loop(self) -> None:
        while not self._closed:
            with self.lock:
                sock, listening = self._sock, self._listening
            if not listening:
                time.sleep(0.02)
                continue
            try:
                conn, _ = sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            head, _, body = request.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            want = int(length.group(1)) if length else 0
            while len(body) < want:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                body += chunk
            path = request.split(b" ", 2)[1].decode("latin-1")
            with self.lock:
                self.hits[path] = self.hits.get(path, 0) + 1
                mode = self.mode
            if path == "/moved":
                mode = "ok"
            self._answer(conn, mode)
        except OSError:
            pass  # Envoy gave up on us (timeout, buffer limit): what the test wants
        finally:
            conn.close()

    @staticmethod
    def _head(status: str, content_type: str, length: int, extra: str = "") -> bytes:
        return (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n{extra}Connection: close\r\n\r\n"
        ).encode()

    def _answer(self, conn: socket.socket, mode: str) -> None:
        with self.lock:
            doc = self.document
        if mode == "ok":
            conn.sendall(self._head("200 OK", "application/json", len(doc)) + doc)
        elif mode == "huge":
            size = 50 * 1024 * 1024
            prefix, suffix = b'{"keys": [], "padding": "', b'"}'
            conn.sendall(self._head("200 OK", "application/json", size))
            conn.sendall(prefix)
            chunk, left = b"x" * 65536, size - len(prefix) - len(suffix)
            while left > 0:
                conn.sendall(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            conn.sendall(suffix)
        elif mode == "empty":
            conn.sendall(self._head("200 OK", "application/json", 0))
        elif mode in ("truncated", "reset"):
            conn.sendall(self._head("200 OK", "application/json", len(doc)) + doc[: len(doc) // 2])
            time.sleep(0.2)
            if mode == "reset":
                # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            conn.sendall(self._head("200 OK", "text/html", len(page)) + page)
        elif mode == "redirect":
            extra = f"Location: http://127.0.0.1:{self.port}/moved\r\n"
            conn.sendall(self._head("302 Found", "text/plain", 0, extra))
        elif mode == "drip":
            conn.sendall(self._head("200 OK", "application/json", len(doc)))
            for byte in doc:
                conn.sendall(bytes([byte]))
                time.sleep(1)
        else:
            raise ValueError(f"unknown mode {mode}")


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _UpstreamHandler(_QuietHandler):
    def _record(self):
        owner: Upstream = self.server.owner
        seen = SeenRequest(self.command, self.path, list(self.headers.items()), self._read_body())
        with owner.lock:
            owner.requests.append(seen)
        self._answer(200, b"upstream ok\n", "text/plain")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _record


class Upstream(_Server):
    """The protected API: answers 200 and records every request that got through."""

    def __init__(self, port: int = 0):
        self.requests: list[SeenRequest] = []
        super().__init__(_UpstreamHandler, port)

    @property
    def last(self) -> SeenRequest | None:
        with self.lock:
            return self.requests[-1] if self.requests else None

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()


# --------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http_request(
    port: int,
    method: str,
    path: str,
    headers=None,
    body: bytes | None = None,
    timeout: float = 10,
    tls: ssl.SSLContext | None = None,
) -> Response:
    """One request on a fresh connection (HTTPS with `tls`); headers may be a
    dict or a list of pairs (a list allows repeated names such as two
    Authorization headers)."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if tls is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in items:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def shipped_config() -> dict:
    with open(ENVOY_YAML) as f:
        return yaml.safe_load(f)


def _http_filters(config: dict) -> list:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return hcm["typed_config"]["http_filters"]


def _wasm_filter(config: dict) -> dict | None:
    for f in _http_filters(config):
        if f["name"] == WASM_FILTER:
            return f["typed_config"]["config"]
    return None


def _native_filter(policy: str) -> dict:
    """The dynamic-module filter entry that replaces the wasm one in a native
    build: the same policy JSON, as the filter's StringValue config."""
    return {
        "name": NATIVE_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": "phi_guard"},
            "filter_name": "phi_guard",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": policy},
        },
    }


def shipped_policy() -> dict:
    """The policy JSON from envoy/envoy.yaml, as a dict to adapt per test."""
    return json.loads(_wasm_filter(shipped_config())["configuration"]["value"])


class EnvoyFailedToStart(RuntimeError):
    pass


class Envoy:
    """Runs the real Envoy on envoy/envoy.yaml rewritten for one test.

    The listener and admin take OS-picked ports (found again through admin),
    clusters point at the test's upstream and JWKS servers, the access log goes
    to the work dir. `policy` replaces the filter's JSON (a dict, or a str
    taken verbatim so tests can send broken JSON); `with_wasm=False` drops the
    filter to check the harness itself. `clusters` adds loopback clusters by
    name and port; `host_env_keys` names environment variables of Envoy's
    own environment passed to the VM (`vm_config.environment_variables`),
    such as a client secret. `build="native"` runs the dynamic module
    (target/native/libphi_guard.so) in place of the wasm filter, on the same
    policy; a module reads Envoy's own environment, so `host_env_keys` has
    nothing to pass there.

    The listener speaks TLS (the shipped config's, with the tests' own
    certificates: `harness.tls_certs()`), and `request`/`get` use it.
    `tls=False` makes it plaintext, for the tests that need that and say so;
    `tls_versions=("TLSv1_0", "TLSv1_2")` sets the versions Envoy offers.
    """

    def __init__(
        self,
        workdir: Path,
        upstream_port: int,
        jwks_port: int,
        policy: dict | str | None = None,
        with_wasm: bool = True,
        wasm: Path = WASM,
        log_level: str = "warn",
        clusters: dict[str, int] | None = None,
        concurrency: int = 1,
        host_env_keys: list[str] | None = None,
        build: str = "wasm",
        tls: bool = True,
        tls_versions: tuple[str, str] | None = None,
    ):
        assert build in BUILDS, build
        self.build = build
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "envoy.yaml"
        self.log_path = self.workdir / "envoy.log"
        self.access_log_path = self.workdir / "access.log"
        self.admin_address_path = self.workdir / "admin.address"
        self.log_level = log_level
        self.concurrency = concurrency
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.admin_port = 0
        self.tls = tls
        self.config = self._rewrite(upstream_port, jwks_port, policy, with_wasm, wasm)
        self._listener_tls(tls, tls_versions)
        if host_env_keys and build == "wasm":
            _wasm_filter(self.config)["vm_config"]["environment_variables"] = {"host_env_keys": list(host_env_keys)}
        for name, port in (clusters or {}).items():
            self.add_cluster(name, port)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def _rewrite(self, upstream_port, jwks_port, policy, with_wasm, wasm) -> dict:
        config = shipped_config()
        res = config["static_resources"]
        res["listeners"][0]["address"]["socket_address"]["port_value"] = 0
        config["admin"]["address"]["socket_address"]["port_value"] = 0
        ports = {"upstream": upstream_port, "idp_jwks": jwks_port}
        for cluster in res["clusters"]:
            if cluster["name"] in ports:
                for group in cluster["load_assignment"]["endpoints"]:
                    for lb in group["lb_endpoints"]:
                        lb["endpoint"]["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
        hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        for log in hcm.get("access_log", []):
            if "path" in log["typed_config"]:
                log["typed_config"]["path"] = str(self.access_log_path)
        plugin = _wasm_filter(config)
        if not with_wasm:
            hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != WASM_FILTER]
            return config
        plugin["vm_config"]["code"]["local"]["filename"] = str(Path(wasm).resolve())
        if policy is None:
            policy = self.point_jwks(shipped_policy(), jwks_port)
        if isinstance(policy, dict):
            policy = json.dumps(policy, indent=2)
        plugin["configuration"]["value"] = policy
        if self.build == "native":
            filters = hcm["http_filters"]
            at = next(i for i, f in enumerate(filters) if f["name"] == WASM_FILTER)
            filters[at] = _native_filter(policy)
        return config

    def _listener_tls(self, tls: bool, versions: tuple[str, str] | None) -> None:
        chain = self.config["static_resources"]["listeners"][0]["filter_chains"][0]
        if not tls:
            chain.pop("transport_socket", None)
            return
        certs = tls_certs()
        context = chain["transport_socket"]["typed_config"]["common_tls_context"]
        context["tls_certificates"] = [
            {"certificate_chain": {"filename": str(certs.server)}, "private_key": {"filename": str(certs.server_key)}}
        ]
        context["validation_context"] = {"trusted_ca": {"filename": str(certs.ca)}}
        if versions is not None:
            params = context["tls_params"]
            params["tls_minimum_protocol_version"], params["tls_maximum_protocol_version"] = versions
            if versions[0] in ("TLSv1_0", "TLSv1_1"):
                # Old versions need old (CBC, SHA-1) suites, which Envoy no
                # longer offers by default: only for tests of refusing them.
                params["cipher_suites"] = params.get("cipher_suites", []) + ["ECDHE-ECDSA-AES128-SHA"]

    def client_tls(self, client: str | None = None, **versions) -> ssl.SSLContext | None:
        """The context `request` uses: None over plaintext."""
        return client_tls(client, **versions) if self.tls else None

    def write_config(self) -> None:
        """Writes `self.config` (after a test changed it) for the next start."""
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def add_cluster(self, name: str, port: int) -> None:
        """Another loopback cluster (a revocation list, an introspection endpoint)."""
        res = self.config["static_resources"]
        template = next(c for c in res["clusters"] if c["name"] == "idp_jwks")
        cluster = copy.deepcopy(template)
        cluster["name"] = name
        cluster["load_assignment"]["cluster_name"] = name
        for group in cluster["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                lb["endpoint"]["address"]["socket_address"]["port_value"] = port
        res["clusters"] = [c for c in res["clusters"] if c["name"] != name] + [cluster]
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    @staticmethod
    def point_jwks(policy: dict, jwks_port: int) -> dict:
        """Point every provider's JWKS uri at the test server (the cluster
        decides where the callout goes; the uri gives its :authority/:path)."""
        policy = copy.deepcopy(policy)
        for p in policy.get("providers", []):
            if "jwks" in p:
                p["jwks"]["uri"] = f"http://127.0.0.1:{jwks_port}/.well-known/jwks.json"
        return policy

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 30) -> Envoy:
        """Start and wait until admin says LIVE and the listener has a port.
        Raises EnvoyFailedToStart (with the log tail) if it exits or hangs."""
        self.admin_address_path.unlink(missing_ok=True)
        argv = [str(ENVOY_BIN), "-c", str(self.config_path), "--concurrency", str(self.concurrency)]
        # Several Envoys (tests, a running demo) must not share shared memory.
        argv += ["--use-dynamic-base-id", "--log-level", self.log_level]
        # Envoy writes access-log files every 10 s by default; tests read them sooner.
        argv += ["--file-flush-interval-msec", "200"]
        argv += ["--admin-address-path", str(self.admin_address_path)]
        env = self.env()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyFailedToStart(f"envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise EnvoyFailedToStart(f"envoy not ready after {timeout}s:\n{self.log_tail()}")

    @staticmethod
    def env() -> dict[str, str]:
        """Envoy's environment: ours, plus where the dynamic module is."""
        return dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(NATIVE_DIR.resolve()))

    def _ready(self) -> bool:
        if not self.admin_port:
            try:
                addr = self.admin_address_path.read_text().strip()
            except FileNotFoundError:
                return False
            if not addr:
                return False
            self.admin_port = int(addr.rsplit(":", 1)[1])
        try:
            ready = http_request(self.admin_port, "GET", "/ready", timeout=2)
            if ready.status != 200 or ready.text.strip() != "LIVE":
                return False
            listeners = json.loads(http_request(self.admin_port, "GET", "/listeners?format=json").body)
        except (OSError, http.client.HTTPException, ValueError):
            self.admin_port = 0  # re-read the address file, in case we caught it half-written
            return False
        for status in listeners.get("listener_statuses", []):
            port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                self.port = int(port)
                return True
        return False

    def expect_start_failure(self, timeout: float = 30) -> str:
        """Start, expecting Envoy to refuse the config; returns its log.
        Fails the test if Envoy becomes ready instead."""
        try:
            self.start(timeout=timeout)
        except EnvoyFailedToStart:
            return self.log_text()
        self.stop()
        raise AssertionError(f"envoy started but should not have:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- talking to it -----------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        headers=None,
        body: bytes | None = None,
        token: str | None = None,
        timeout: float = 10,
        tls: ssl.SSLContext | None = None,
    ):
        """A request to the listener; `token` adds `Authorization: Bearer <token>`;
        `tls` replaces the default client context (a client certificate, other versions)."""
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if token is not None:
            items.append(("Authorization", f"Bearer {token}"))
        return http_request(self.port, method, path, items, body, timeout=timeout, tls=tls or self.client_tls())

    @property
    def origin(self) -> str:
        """The listener's URL as a client names it (`htu` of a DPoP proof)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def get(self, path: str, token: str | None = None, headers=None) -> Response:
        return self.request("GET", path, headers=headers, token=token)

    def admin(self, path: str) -> Response:
        return http_request(self.admin_port, "GET", path)

    def phi_stats(self) -> dict[str, int]:
        """<prefix>phi_guard.* from /stats (wasmcustom. or dynamicmodulescustom.,
        by build), as {"allowed": n, "jwks_fetch.failed": n, ...}."""
        prefix = STATS_PREFIX[self.build] + "phi_guard."
        text = self.admin("/stats?filter=" + urllib.parse.quote("^" + re.escape(prefix))).text
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name.removeprefix(prefix)] = int(value)
        return out

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def access_log(self, at_least: int = 0, timeout: float = 5) -> list[dict]:
        """Access log records; waits for `at_least` of them (Envoy flushes
        the file about once a second)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines = self.access_log_path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= at_least or time.monotonic() > deadline:
                return [json.loads(line) for line in lines if line.strip()]
            time.sleep(0.1)


def eventually(fn, timeout: float = 10, interval: float = 0.2):
    """Call fn until it returns something truthy; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------------
# Answers and audit records
# --------------------------------------------------------------------------

# One auth-param of a challenge: name=token or name="quoted-string" (RFC 9110 §11.2).
_AUTH_PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))\s*(,|$)')


def parse_challenge(value: str) -> tuple[str, dict[str, tuple[str, bool]]]:
    """Splits one challenge into its scheme and {param: (value, was_quoted)}.

    Strict on purpose: anything that is not a clean comma-separated list of
    auth-params, or a parameter named twice, fails the test."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, tuple[str, bool]] = {}
    pos = 0
    while pos < len(rest):
        m = _AUTH_PARAM.match(rest, pos)
        assert m, f"cannot parse auth-param at {rest[pos:]!r} in {value!r}"
        name = m.group(1).lower()
        assert name not in params, f"{name} twice in {value!r}"
        if m.group(2) is not None:
            params[name] = (re.sub(r"\\(.)", r"\1", m.group(2)), True)
        else:
            params[name] = (m.group(3), False)
        pos = m.end()
        assert m.group(4) == "," or pos == len(rest), value
    return scheme, params


def challenge_of(resp: Response) -> tuple[str, dict[str, tuple[str, bool]]]:
    values = [v for k, v in resp.headers if k.lower() == "www-authenticate"]
    assert len(values) == 1, f"want exactly one WWW-Authenticate, got {values}"
    return parse_challenge(values[0])


def assert_insufficient_scope(resp: Response, upstream, required: set[str]) -> None:
    """403 with `Bearer error="insufficient_scope", scope="<rule's scopes>"`."""
    assert resp.status == 403, (resp.status, resp.text)
    scheme, params = challenge_of(resp)
    assert scheme == "Bearer"
    assert params["error"] == ("insufficient_scope", True), params
    scope, quoted = params["scope"]
    assert quoted, "scope must be a quoted-string (RFC 6750 §3)"
    assert "" not in scope.split(" ") and set(scope.split(" ")) == required, scope
    assert upstream.requests == [], "a refused request reached the upstream"


def audits(envoy, count: int) -> list[dict | None]:
    """The audit record of each of the first `count` requests (None where the
    filter never saw the request: Envoy answered it itself)."""
    records = envoy.access_log(at_least=count, timeout=15)
    assert len(records) >= count, (records, envoy.log_tail())
    out = []
    for r in records[:count]:
        raw = r.get("audit")
        out.append(None if raw in (None, "", "-") else json.loads(raw))
    return out


def phi_guard_stats(envoy) -> dict[str, int]:
    """The filter's metrics from admin /stats without the `wasmcustom.phi_guard.`
    (or, native, `dynamicmodulescustom.phi_guard.`) prefix:
    {"allowed": n, "denied.expired": n, "jwks_key_age_seconds": n, ...}."""
    prefix = STATS_PREFIX[envoy.build] + "phi_guard."
    text = envoy.admin("/stats?filter=" + urllib.parse.quote("^" + re.escape(prefix))).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
            out[name[len(prefix) :]] = int(value)
    return out


def readme_reason_codes() -> list[str]:
    """The reason codes the README lists under "Audit record" (the contract
    dashboards key on), in the README's order."""
    text = (REPO / "README.md").read_text()
    start = text.index("Reason codes:")
    paragraph = text[start : text.index("\n\n", start)]
    # A code is a backticked lower_snake word; parentheses explain, they list none.
    return re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", paragraph))
