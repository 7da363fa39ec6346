#!/usr/bin/env bash
# One request's work in the core, measured without Envoy (examples/hotpath.rs):
#   instructions per iteration, natively under callgrind (repeatable on a
#   busy machine: the count does not depend on the load), and
#   nanoseconds per iteration in V8: the same code built for wasm32-wasip1
#   and run by node's WASI (best of 3; V8 is Envoy's wasm engine too, though
#   node's is an older one, so compare builds with each other, not with Envoy).
# Usage: bench/hotpath.sh [MODE ...]   (default: cached and its parts)
# RUSTFLAGS / CARGO_PROFILE_RELEASE_* pass through, to compare builds.
set -euo pipefail
cd "$(dirname "$0")/.."
modes=("$@")
((${#modes[@]})) || modes=(cached headers decide forward draft seal)
n=${HOTPATH_N:-2000}
cargo build -q --release --example hotpath
cargo build -q --release --target wasm32-wasip1 --example hotpath
native=target/release/examples/hotpath
wasm=target/wasm32-wasip1/release/examples/hotpath.wasm
runner=$(mktemp --suffix=.mjs)
trap 'rm -f "$runner"' EXIT
cat >"$runner" <<'JS'
import { WASI } from "node:wasi";
import { readFileSync } from "node:fs";
const [file, ...args] = process.argv.slice(2);
const wasi = new WASI({ version: "preview1", args: ["hotpath", ...args], returnOnExit: true });
const module = await WebAssembly.compile(readFileSync(file));
// The library's host adapter imports Envoy's ABI ("env"); the core never calls it.
const env = {};
for (const i of WebAssembly.Module.imports(module)) if (i.module === "env") env[i.name] = () => { throw new Error(i.name); };
const instance = await WebAssembly.instantiate(module, { ...wasi.getImportObject(), env });
// The SDK's `_initialize` export (a reactor's) would make node refuse `_start`.
const { memory, _start } = instance.exports;
wasi.start({ exports: { memory, _start } });
JS
count() { # instructions of one run
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$native" "$@" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
printf '%-14s %14s %12s\n' mode "instr/iter" "V8 ns/iter"
for mode in "${modes[@]}"; do
  case $mode in verify-* | keys-*) k=$((n / 20 + 1)) ;; *) k=$n ;; esac
  base=$(count "$mode" 0)
  full=$(count "$mode" "$k")
  best=
  for _ in 1 2 3; do
    ns=$(node --no-warnings "$runner" "$wasm" "$mode" "$((k * 5))" | sed -n 's/.*, \([0-9]*\) ns each/\1/p')
    [[ -z $best || $ns -lt $best ]] && best=$ns
  done
  printf '%-14s %14d %12d\n' "$mode" $(((full - base) / k)) "$best"
done
