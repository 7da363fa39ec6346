"""The provider's keys over time, through the real Envoy with the built
phi-guard .wasm (README "JWKS", "Stats"): refreshed every `cache_seconds`,
cached verified tokens dropped when the key set changes, the last good keys
serving after failed refreshes until `max_stale_seconds` and 503 after that,
and the gauges and counters that show it. Short intervals keep each test to
seconds; every timing assertion is a bound the product's own clock implies,
measured around the request, so a slow machine cannot turn it."""

from __future__ import annotations

import time

import pytest

from conftest import only
from harness import KeyPair, audits, eventually, mint, phi_guard_stats

PATH = "/fhir/Patient/123"


def jwks_settings(policy: dict, **settings) -> dict:
    policy["providers"][0]["jwks"].update(settings)
    return policy


def wait_for_fetch(jwks_server, after: int, timeout: float = 15) -> None:
    """Waits until the server has answered more than `after` fetches."""
    assert eventually(lambda: jwks_server.hits > after, timeout=timeout, interval=0.05), "no JWKS fetch came"


def gauge(envoy, name: str, want) -> int:
    """The gauge once `want(value)` holds (gauges are written on the filter's timer)."""

    def read():
        value = phi_guard_stats(envoy).get(name)
        return [value] if value is not None and want(value) else None  # a list: 0 is a value

    got = eventually(read, timeout=15)
    assert got, (name, phi_guard_stats(envoy))
    return got[0]


def refreshes(jwks_server, within: float = 0.5) -> list[float]:
    """When fetches arrived, those closer than `within` to the one before counted as one."""
    out: list[float] = []
    last = None
    for t in jwks_server.arrivals():
        if last is None or t - last > within:
            out.append(t)
        last = t
    return out


def test_keys_refresh_every_cache_seconds_and_a_changed_set_drops_cached_tokens(
    envoy_factory, policy, jwks_server, upstream, keys, build
):
    # The native module's token cache is per worker thread and forgets a
    # provider at that worker's next request (never using a dropped key), so
    # its entries gauge only moves then; this test reads the gauge before.
    only(build, "wasm", "the token-cache gauge after a key change follows the next request natively")
    cache_seconds = 2
    jwks_settings(policy, cache_seconds=cache_seconds, retry_seconds=1, min_refetch_seconds=3600)
    k1, k2, k3 = keys["ES256"], KeyPair.ec("ES256", kid="rotated-2"), KeyPair.ec("ES256", kid="added-3")
    jwks_server.set_keys(k1)
    envoy = envoy_factory(policy)
    t1 = mint(k1)
    assert [envoy.get(PATH, token=t1).status for _ in range(2)] == [200, 200]
    stats = phi_guard_stats(envoy)
    assert (stats["token_cache.miss"], stats["token_cache.hit"]) == (1, 1), stats
    # README gauges: one worker's cached tokens and about the memory they take.
    assert gauge(envoy, "token_cache.entries", lambda v: v == 1) == 1
    assert gauge(envoy, "token_cache.bytes", lambda v: v > 0) > len(t1)

    # Refreshed on the timer, every cache_seconds, with no request asking.
    start = len(refreshes(jwks_server))
    assert eventually(lambda: len(refreshes(jwks_server)) >= start + 3, timeout=20), jwks_server.arrivals()
    times = refreshes(jwks_server)[start - 1 :]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Whole seconds on the product's clock: a refresh is due cache_seconds after
    # the second the keys came in, so a gap is within (cache_seconds - 1, cache_seconds + 1],
    # plus the 100 ms timer's (and a loaded machine's) lateness.
    assert len(gaps) >= 3 and all(cache_seconds - 1 - 0.1 < g < cache_seconds + 1.5 for g in gaps), gaps
    # The same document again keeps the cache warm, and the key age gauge stays within a refresh.
    assert envoy.get(PATH, token=t1).status == 200
    assert phi_guard_stats(envoy)["token_cache.hit"] == 2
    assert gauge(envoy, "jwks_key_age_seconds", lambda v: v <= cache_seconds + 1) <= cache_seconds + 1

    # Another document (k1 still in it): the cached verification of t1 is
    # dropped, t1 is verified again and still allowed.
    jwks_server.set_keys(k1, k3)
    # The serving worker has the new set once its cache is emptied.
    assert gauge(envoy, "token_cache.entries", lambda v: v == 0) == 0
    before = phi_guard_stats(envoy)
    assert envoy.get(PATH, token=t1).status == 200
    after = phi_guard_stats(envoy)
    assert after["token_cache.miss"] - before["token_cache.miss"] == 1, (before, after)
    assert after["token_cache.hit"] == before["token_cache.hit"], (before, after)

    # k1 gone: a token cached under it must not outlive it.
    assert gauge(envoy, "token_cache.entries", lambda v: v == 1) == 1
    jwks_server.set_keys(k2)
    # The serving worker has the new set once its cache is emptied.
    assert gauge(envoy, "token_cache.entries", lambda v: v == 0) == 0
    upstream.reset()
    resp = envoy.get(PATH, token=t1)
    assert resp.status == 401, (resp.status, resp.text)
    assert upstream.requests == []
    assert envoy.get(PATH, token=mint(k2)).status == 200
    records = audits(envoy, 6)
    assert records[4]["reason"] == "unknown_key", records[4]
    assert phi_guard_stats(envoy)["denied.unknown_key"] == 1
    assert phi_guard_stats(envoy)["jwks_fetch.failed"] == 0


def test_last_good_keys_serve_until_max_stale_then_503(envoy_factory, policy, jwks_server, upstream, keys):
    cache_seconds, max_stale = 1, 4
    jwks_settings(policy, cache_seconds=cache_seconds, max_stale_seconds=max_stale, retry_seconds=1, timeout_ms=1000)
    key = keys["RS256"]
    envoy = envoy_factory(policy)
    cached = mint(key)
    assert envoy.get(PATH, token=cached).status == 200  # verified and cached under these keys

    # One more good fetch, caught at the server so its time is known; every later one fails.
    jwks_server.hold()
    assert jwks_server.wait_held(1, timeout=15)
    # The server's arrival time, on the wall clock the probes below use.
    arrived = time.time() - (time.monotonic() - jwks_server.arrivals()[-1])
    hits = jwks_server.hits
    jwks_server.release()
    wait_for_fetch(jwks_server, hits)
    jwks_server.set_status(503)
    failing_from = time.time()
    failed_before = phi_guard_stats(envoy)["jwks_fetch.failed"]

    # Fresh tokens (never cached) every 0.25 s until the keys are given up.
    seen = []  # (sent, answered, status)
    deadline = failing_from + cache_seconds + max_stale + 15
    while time.time() < deadline:
        sent = time.time()
        status = envoy.get(PATH, token=mint(key)).status
        seen.append((sent, time.time(), status))
        if status == 503:
            break
        time.sleep(0.25)
    statuses = [s for _, _, s in seen]
    assert statuses[-1] == 503 and set(statuses[:-1]) == {200}, seen
    # Served from the last good keys after refreshes had failed ...
    assert phi_guard_stats(envoy)["jwks_fetch.failed"] > failed_before
    stale_served = [a for s, a, st in seen if st == 200 and s >= failing_from + cache_seconds + 1]
    assert stale_served, f"nothing was served from stale keys: {seen}"
    # ... until max_stale. The filter dates keys from their fetch's start
    # (the IdP served them then or later), which is before the server saw
    # the request by the proxy's send time: a few ms, tens on a loaded CI
    # machine. Allowing it the probe interval, 0.25 s, still catches keys
    # dated from the fetch before (at least cache_seconds earlier).
    send_allowance = 0.25
    first_503_answered = seen[-1][1]
    assert first_503_answered > arrived - send_allowance + cache_seconds + max_stale, (arrived, seen)
    assert seen[-1][0] < failing_from + cache_seconds + max_stale + 5, (failing_from, seen)
    # The key age gauge has counted past what the keys may serve.
    assert gauge(envoy, "jwks_key_age_seconds", lambda v: v > cache_seconds + max_stale) > cache_seconds + max_stale
    # A token verified under those keys before is not served from them either.
    upstream.reset()
    resp = envoy.get(PATH, token=cached)
    assert resp.status == 503, (resp.status, resp.text)
    assert upstream.requests == []
    records = audits(envoy, len(seen) + 2)
    assert [r["reason"] for r in records[-2:]] == ["keys_unavailable", "keys_unavailable"], records[-2:]
    assert phi_guard_stats(envoy)["denied.keys_unavailable"] == 2

    # The IdP back: served again, and the age gauge starts over.
    jwks_server.set_status(200)
    assert eventually(lambda: envoy.get(PATH, token=mint(key)).status == 200, timeout=15), envoy.log_tail()
    assert envoy.get(PATH, token=cached).status == 200
    assert gauge(envoy, "jwks_key_age_seconds", lambda v: v <= cache_seconds + 1) <= cache_seconds + 1


def test_verified_token_cache_size_0_turns_the_cache_off(envoy_factory, policy, keys):
    policy["verified_token_cache_size"] = 0
    envoy = envoy_factory(policy)
    token = mint(keys["ES256"])
    assert [envoy.get(PATH, token=token).status for _ in range(3)] == [200, 200, 200]
    stats = phi_guard_stats(envoy)
    assert (stats["token_cache.hit"], stats["token_cache.miss"]) == (0, 3), stats
    # Gauges are written on the timer: give it a few ticks, then they must still be 0.
    time.sleep(0.5)
    assert gauge(envoy, "token_cache.entries", lambda v: True) == 0
    assert gauge(envoy, "token_cache.bytes", lambda v: True) == 0


def test_each_refresh_is_one_fetch(envoy_factory, policy, jwks_server, keys):
    jwks_settings(policy, cache_seconds=1, retry_seconds=1)
    envoy = envoy_factory(policy)
    assert envoy.get(PATH, token=mint(keys["ES256"])).status == 200
    assert eventually(lambda: len(refreshes(jwks_server)) >= 5, timeout=20)
    times = jwks_server.arrivals()
    doubles = [round(b - a, 3) for a, b in zip(times, times[1:]) if b - a < 0.5]
    assert doubles == [], f"{len(times)} fetches for {len(refreshes(jwks_server))} refreshes: gaps {doubles}"
