#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, build, unit/integration tests
# (including the booted-systemd sandbox tests), then the end-to-end tiers.
# Run as root from the repository's top directory.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }

step "set-up"
bash scripts/setup-dev.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

step "build"
cargo build --workspace --all-targets

step "tests"
cargo test --workspace --no-fail-fast

step "done"
