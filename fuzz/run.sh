#!/usr/bin/env bash
# `make fuzz`: builds every fuzz target, runs each for FUZZ_SECONDS from a
# scratch copy of its committed seeds, prints one line of figures per target
# and exits 1 if any target crashed, panicked, hung or ran out of memory.
# Why `-s none` on stable: see the Makefile.
#
#   FUZZ_SECONDS=30        time per target
#   FUZZ_TARGETS="a b"     which targets (default: all)
#   FUZZ_SANITIZER=none    or address (ASan; needs RUSTC_BOOTSTRAP=1, set here)
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
targets=${FUZZ_TARGETS:-token jwks path policy audit_verify decide revocation}
sanitizer=${FUZZ_SANITIZER:-none}
# New inputs found go here, never into fuzz/corpus (libFuzzer writes to its
# first corpus directory); crash inputs go to fuzz/artifacts/<target>/.
scratch=fuzz/target/scratch-corpus
logs=fuzz/target/logs

if [[ $sanitizer != none ]]; then
  # Sanitizers are -Z flags: the stable compiler takes them only so.
  export RUSTC_BOOTSTRAP=1
fi

start=$SECONDS
cargo fuzz build -s "$sanitizer" || exit 1
built=$((SECONDS - start))

mkdir -p "$logs"
failed=()
rows=()
for t in $targets; do
  rm -rf "${scratch:?}/$t"
  mkdir -p "$scratch/$t"
  log=$logs/$t.log
  echo "fuzz: $t for ${seconds}s"
  # -timeout: one input taking 10 s is a hang; the real code answers in microseconds.
  if cargo fuzz run -s "$sanitizer" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
    # The panic or libFuzzer's report, the input, and how to reproduce it.
    grep -v '^ ' "$log" | sed -n '/panicked at\|ERROR: libFuzzer/,/^Error: Fuzz target/p' | head -n 60
  fi
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)
  field() { sed -n "s/.* $1: \([^ ]*\).*/\1/p" <<<"$done_line"; }
  rows+=("$(printf '%-13s %-6s %10s %8s %6s %6s %5s' "$t" "$status" \
    "$(stat number_of_executed_units)" "$(stat average_exec_per_sec)" \
    "$(field cov)" "$(field ft)" "$(ls "fuzz/corpus/$t" | wc -l)")")
done

printf '\n%-13s %-6s %10s %8s %6s %6s %5s\n' target status runs exec/s cov ft seeds
printf '%s\n' "${rows[@]}"
echo "fuzz: build ${built}s, total $((SECONDS - start))s; logs in $logs"
n_targets=$(wc -w <<<"$targets")
echo "fuzz: $((n_targets - ${#failed[@]})) passed, ${#failed[@]} failed"
if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/; reproduce with" \
    "cargo fuzz run -s $sanitizer <target> <input>)" >&2
  exit 1
fi
