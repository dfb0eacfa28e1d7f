#!/usr/bin/env bash
# Installs and starts Citadel's demo stack on THIS machine, whose PID 1 must be
# systemd, then shows status, health and one chat completion through the gateway.
# Usage: demo-stack.sh BIN_DIR   (the directory holding the built binaries)
set -euo pipefail
bin=${1:?usage: demo-stack.sh BIN_DIR}
cfg=/opt/citadel/config/citadel.toml

if [ ! -f "$cfg" ]; then
  "$bin/citadel-systemd" init --example sim
fi
"$bin/citadel-systemd" validate --bin-dir "$bin"
"$bin/citadel-systemd" install --bin-dir "$bin"
ctl=/opt/citadel/bin/citadel-systemd
"$ctl" start
"$ctl" status
# The gateway probes its models every few seconds: wait (bounded) until it sees them all.
for _ in $(seq 50); do "$ctl" health >/dev/null 2>&1 && break; sleep 0.2; done
"$ctl" health
key=$(grep -v '^#' /etc/citadel/credentials/api-keys | head -n 1)
echo
echo "POST /v1/chat/completions (model mixtral) through the gateway on 127.0.0.1:8000:"
curl -sS --fail-with-body -m 10 http://127.0.0.1:8000/v1/chat/completions \
  -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -d '{"model":"mixtral","messages":[{"role":"user","content":"Hello, Citadel!"}],"max_tokens":12}'
echo
