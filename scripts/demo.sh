#!/usr/bin/env bash
# The main job: build Citadel and bring the demo stack up for real - the spec's
# four models (served by engine simulators, so no GPU is needed) and the gateway
# on port 8000 - then show its status, health and one chat completion.
#
# Where systemd is PID 1 this installs into /opt/citadel and /etc/systemd/system
# of this machine (undo with `/opt/citadel/bin/citadel-systemd uninstall --purge`).
# Elsewhere (containers, CI, this kind of build machine) it does the same inside
# a throw-away sandbox with systemd as PID 1, torn down at the end.
# Run as root from the repository's top directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --workspace --quiet
bin=$PWD/target/debug

if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ] && [ -d /run/systemd/system ]; then
  bash scripts/demo-stack.sh "$bin"
else
  echo "systemd is not PID 1 here: running the demo inside a sandbox (cargo xtask sandbox)"
  # The sandbox sees the host's files, except below /tmp (a fresh tmpfs inside),
  # where this clone may live: stage what the demo runs under /var/tmp.
  stage=$(mktemp -d /var/tmp/citadel-demo.XXXXXX)
  trap 'rm -rf "$stage"' EXIT
  cp "$bin"/citadel-systemd "$bin"/citadel-model "$bin"/citadel-gateway "$bin"/citadel-engine-sim scripts/demo-stack.sh "$stage"/
  chmod 755 "$stage"
  cargo xtask sandbox --name demo run -- bash "$stage/demo-stack.sh" "$stage"
fi
