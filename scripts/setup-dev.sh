#!/usr/bin/env bash
# Installs what building and testing Citadel needs on Debian 12 / Ubuntu 22.04+.
# Idempotent and quick when everything is present. Run as root (or with sudo).
set -euo pipefail

need_apt=()
for pkg in systemd-container systemd util-linux iproute2 python3 python3-venv python3-dev wrk ca-certificates curl gcc g++ cmake make; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: Rust is installed in ~/.cargo/bin; add it to PATH (source ~/.cargo/env)"
  else
    echo "setup: installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi
echo "setup: ok"
