"""The verification budget (issue #12), in the real Envoy.

Forged-signature tokens cost a full signature check each and are never
cached. Past `verification_budget` failures a second from one source, that
source's uncached tokens get 401 without a check (reason
`verification_rate_limited`); cached tokens and other sources go on as
before. Sources come from Envoy: here the HCM trusts one `x-forwarded-for`
hop, so each test client names its address in that header, and the record's
`source` shows Envoy took it.
"""

from __future__ import annotations

import json
import time
import uuid

import yaml

from harness import eventually, mint, tamper

PATH = "/fhir/Patient/7"


def trust_one_xff_hop(envoy) -> None:
    hcm = envoy.config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["use_remote_address"] = True
    hcm["xff_num_trusted_hops"] = 1
    # Requests now count as external; keep the test's x-request-id to find their records.
    hcm["preserve_external_request_id"] = True
    envoy.config_path.write_text(yaml.safe_dump(envoy.config, sort_keys=False))


def burst(envoy, key, attacker, neighbour, cached):
    """The attacker's budget of 3 forged tokens and what follows, within one
    second (the budget's window); None if the machine was too slow for that."""
    time.sleep(1 - time.time() % 1 + 0.02)  # start at the top of a second
    second = int(time.time())
    plan = [(tamper(mint(key)), attacker) for _ in range(4)]
    plan += [(mint(key), attacker), (cached, attacker), (mint(key), neighbour)]
    sent = []
    for token, ip in plan:
        rid = uuid.uuid4().hex
        resp = envoy.get(PATH, token=token, headers={"x-forwarded-for": ip, "x-request-id": rid})
        sent.append((rid, resp))
    return sent if int(time.time()) == second else None


def test_forged_signatures_use_up_the_sources_budget(envoy_factory, policy, upstream, keys):
    policy["verification_budget"] = 3
    envoy = envoy_factory(policy, start=False)
    trust_one_xff_hop(envoy)
    envoy.start()
    key = keys["ES256"]
    neighbour = "198.51.100.2"
    for attempt in range(5):
        attacker = f"203.0.113.{attempt + 1}"  # a fresh source for each try
        cached = mint(key)
        assert envoy.get(PATH, token=cached, headers={"x-forwarded-for": attacker}).status == 200
        sent = burst(envoy, key, attacker, neighbour, cached)
        if sent is not None:
            break
    else:
        raise AssertionError("five bursts of 7 requests each took more than a second")

    statuses = [r.status for _, r in sent]
    assert statuses == [401, 401, 401, 401, 401, 200, 200], statuses
    for _, r in sent[:5]:
        assert r.header("www-authenticate") == 'Bearer error="invalid_token"', r.headers
    def records():
        by_id = {r.get("request_id"): r for r in envoy.access_log()}
        return by_id if all(rid in by_id for rid, _ in sent) else None

    by_id = eventually(records, timeout=10)
    assert by_id, "records missing from the access log"
    mine = [json.loads(by_id[rid]["audit"]) for rid, _ in sent]
    reasons = [r["reason"] for r in mine]
    assert reasons == ["invalid_signature"] * 3 + ["verification_rate_limited"] * 2 + ["ok", "ok"], reasons
    assert [r["source"].rsplit(":", 1)[0] for r in mine] == [attacker] * 6 + [neighbour], mine
    stats = envoy.phi_stats()
    assert stats.get("denied.verification_rate_limited") == 2, stats

    # A new second: the attacker's good token is checked again, and passes.
    assert eventually(lambda: envoy.get(PATH, token=mint(key), headers={"x-forwarded-for": attacker}).status == 200, timeout=5)


def test_budget_zero_checks_every_signature(envoy_factory, policy, upstream, keys):
    policy["verification_budget"] = 0
    envoy = envoy_factory(policy)
    key = keys["RS256"]
    count = 40
    statuses = [envoy.get(PATH, token=tamper(mint(key))).status for _ in range(count)]
    assert statuses == [401] * count
    assert envoy.get(PATH, token=mint(key)).status == 200
    stats = envoy.phi_stats()
    assert stats.get("denied.invalid_signature") == count, stats
    assert stats.get("denied.verification_rate_limited", 0) == 0, stats
