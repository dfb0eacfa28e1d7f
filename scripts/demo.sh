#!/usr/bin/env bash
# The main job: build Citadel, write the example stack's config, render its
# hardened units and validate them with systemd's own tools.
# Run as root from the repository's top directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --workspace --quiet
bin=target/debug
root=$(mktemp -d /tmp/citadel-demo.XXXXXX)
echo "demo root: $root"
$bin/citadel-systemd --root "$root" init
$bin/citadel-systemd --root "$root" render
$bin/citadel-systemd --root "$root" validate
