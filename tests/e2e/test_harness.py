"""Checks of the test harness itself, independent of the filter: hand-made
tokens verify with an independent implementation, the servers behave as the
tests assume, and Envoy starts, proxies and stops cleanly without the wasm."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from harness import JwksServer, b64url_decode, http_request, mint, tamper


def _parts(token):
    head, payload, sig = token.split(".")
    decoded = json.loads(b64url_decode(head)), json.loads(b64url_decode(payload)), b64url_decode(sig)
    return (*decoded, f"{head}.{payload}".encode())


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "ES384", "EdDSA"])
def test_minted_tokens_verify_independently(keys, alg):
    key = keys[alg]
    header, claims, sig, signed = _parts(mint(key))
    assert header == {"alg": alg, "typ": "at+jwt", "kid": key.kid}
    assert claims["exp"] - claims["iat"] == 300
    pub = key.private.public_key()
    if alg == "RS256":
        pub.verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "PS256":
        pub.verify(sig, signed, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    elif alg.startswith("ES"):
        half = len(sig) // 2
        assert half == {"ES256": 32, "ES384": 48}[alg]  # raw r||s, fixed width
        der = encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
        h = hashes.SHA256() if alg == "ES256" else hashes.SHA384()
        pub.verify(der, signed, ec.ECDSA(h))
    else:
        pub.verify(sig, signed)
    jwk = key.public_jwk()
    assert jwk["kid"] == key.kid and jwk["alg"] == alg and jwk["use"] == "sig"


def test_forgeries(keys):
    rsa = keys["RS256"]
    header, _, sig, _ = _parts(mint(None, alg="none"))
    assert header["alg"] == "none" and sig == b""
    header, _, sig, signed = _parts(mint(rsa, alg="HS256", hmac_secret=rsa.public_pem()))
    assert sig == hmac.new(rsa.public_pem(), signed, hashlib.sha256).digest()
    header, claims, _, _ = _parts(mint(rsa, header={"kid": None, "crit": ["x"]}, exp=None))
    assert "kid" not in header and header["crit"] == ["x"] and "exp" not in claims
    token = mint(rsa)
    assert tamper(token) != token and tamper(token).rsplit(".", 1)[0] == token.rsplit(".", 1)[0]


def test_jwks_server_can_fail_in_every_way(keys):
    with JwksServer(keys["ES256"]) as server:
        ok = http_request(server.port, "GET", "/.well-known/jwks.json")
        assert ok.status == 200 and json.loads(ok.body)["keys"][0]["kid"] == keys["ES256"].kid
        server.set_status(503)
        assert http_request(server.port, "GET", "/").status == 503
        server.set_status(200)
        server.set_document("<html>not json")
        assert http_request(server.port, "GET", "/").body == b"<html>not json"
        port = server.port
        server.down()
        with pytest.raises(ConnectionRefusedError):
            http_request(port, "GET", "/")
        server.up()
        assert server.port == port and http_request(port, "GET", "/").status == 200
        assert server.hits == 4


def test_jwks_server_holds_answers_until_released(keys):
    with JwksServer(keys["ES256"]) as server:
        server.hold()
        got = []
        client = threading.Thread(target=lambda: got.append(http_request(server.port, "GET", "/", timeout=30)))
        client.start()
        assert server.wait_held(1, timeout=10) and server.held == 1
        client.join(0.5)
        assert client.is_alive() and got == [], "a held request was answered"
        server.set_document({"keys": []})  # what is set by the release is what goes out
        server.release()
        client.join(10)
        assert [(r.status, json.loads(r.body)) for r in got] == [(200, {"keys": []})]
        assert server.held == 0 and server.hits == 1
        # Released means released: later requests are not held.
        assert http_request(server.port, "GET", "/", timeout=5).status == 200
        times = server.arrivals()
        assert len(times) == 2 and times[0] <= times[1]


def test_envoy_without_filter_proxies_and_stops(envoy_factory, upstream):
    envoy = envoy_factory(with_wasm=False)
    resp = envoy.get("/fhir/Patient/1?x=1", headers={"X-Probe": "yes"})
    assert resp.status == 200 and resp.body == b"upstream ok\n"
    assert upstream.last.path == "/fhir/Patient/1?x=1" and upstream.last.header("x-probe") == "yes"
    (record,) = envoy.access_log(at_least=1)
    assert record["path"] == "/fhir/Patient/1" and record["status"] == 200
    port, proc = envoy.port, envoy.proc
    envoy.stop()
    assert proc.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_start_failure_is_detected(envoy_factory, tmp_path):
    envoy = envoy_factory(wasm=tmp_path / "missing.wasm", start=False)
    log = envoy.expect_start_failure()
    assert "missing.wasm" in log and not envoy.alive
