"""Mint a token for the running demo (`make run`), signed with its key.

    .venv/bin/python demo/mint.py --scope "read:patient-profile delete:lab-results"
    .venv/bin/python demo/mint.py --scope export:bulk --acr urn:example:loa:mfa
"""

from __future__ import annotations

import argparse
import sys
import time

from demo import KEY_FILE, load_key
from harness import mint


def main() -> int:
    parser = argparse.ArgumentParser(description="Mint a demo access token.")
    parser.add_argument("--scope", default="read:patient-profile", help="space-separated scopes")
    parser.add_argument("--sub", default="demo-clinician")
    parser.add_argument("--client-id", default="phi-guard-demo")
    parser.add_argument("--ttl", type=int, default=300, help="seconds until exp")
    parser.add_argument("--acr", help="acr claim (for step-up rules); also sets auth_time=now")
    args = parser.parse_args()
    if not KEY_FILE.exists():
        sys.exit("no demo key: start the demo first (make run)")
    extra = {"acr": args.acr, "auth_time": int(time.time())} if args.acr else {}
    now = int(time.time())
    claims = {"scope": args.scope, "sub": args.sub, "client_id": args.client_id, "iat": now, "exp": now + args.ttl}
    print(mint(load_key(), **claims, **extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
