#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting and lints (cargo fmt,
# clippy with warnings as errors), build, unit/integration tests (including the
# tidy rules in xtask/src/tidy.rs, the property tests and the booted-systemd
# sandbox tests), the README's main job, then the real-engine tiers (vLLM,
# llama.cpp) and the Debian package's tier (e2e-deb). Ends with one line:
# "all tiers: N passed, M failed"; a failed step (fmt, clippy, ...) counts as
# one failure.
# Run as root from the repository's top directory.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
log=$(mktemp /tmp/citadel-test-all.XXXXXX)
trap 'rm -f "$log"' EXIT
failed_steps=()
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }
run() { # run NAME CMD...: run a step, keep going on failure, remember it
  local name=$1; shift
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || failed_steps+=("$name (exit $rc)")
  return 0
}

step "set-up"
bash scripts/setup-dev.sh || exit 2
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
sh scripts/setup-test-python.sh || exit 2   # the official `openai` client, for the gateway's client test

step "formatting (cargo fmt --check)"
run "fmt" cargo fmt --all --check

step "build"
cargo build --workspace --all-targets || exit 2

step "lints (clippy, warnings are errors)"
run "clippy" cargo clippy --workspace --all-targets -- -D warnings

step "tests (unit, integration, snapshots, property, tidy, monitoring assets with promtool, sandboxed systemd end-to-end, a real Prometheus)"
run "cargo test" cargo test --workspace --no-fail-fast

step "the README's main job (demo stack up, health, one chat completion)"
run "demo" bash scripts/demo.sh

step "real-engine tier: vLLM (CPU build, tiny local model) under Citadel's units in the sandbox"
run "e2e-vllm" cargo xtask e2e-vllm --bin-dir target/debug

step "real-engine tier: llama.cpp's llama-server (built from source, tiny local GGUF) under Citadel's units"
run "e2e-llama-cpp" cargo xtask e2e-llama-cpp --bin-dir target/debug

step "the Debian package: build (release), lintian, dpkg -i, upgrade under load, dpkg -r and -P in the sandbox"
run "e2e-deb" cargo xtask e2e-deb

step "done"
passed=$(grep -oE '^test result: [A-Za-z]+\. [0-9]+ passed' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '^test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$log" | grep -oE '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
# Tiers that are not cargo test report "NAME: N passed, M failed".
for tier in e2e-vllm e2e-llama-cpp e2e-deb; do
  read -r tp tf < <(grep -E "^$tier: [0-9]+ passed, [0-9]+ failed" "$log" | tail -n 1 \
    | sed -E "s/^$tier: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/"; echo)
  passed=$((passed + ${tp:-0})); failed=$((failed + ${tf:-0}))
done
for s in "${failed_steps[@]}"; do echo "FAILED step: $s"; failed=$((failed + 1)); done
echo "took $(( $(date +%s) - start ))s"
echo "all tiers: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
