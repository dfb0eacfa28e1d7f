#!/usr/bin/env bash
# Installs what building and testing Citadel needs on Debian 12 / Ubuntu 22.04+.
# (dpkg-dev, binutils: `cargo xtask deb` builds the package; lintian and man-db:
# `cargo xtask e2e-deb` checks it.)
# Idempotent and quick when everything is present. Run as root (or with sudo).
set -euo pipefail

need_apt=()
for pkg in systemd-container systemd util-linux iproute2 python3 python3-venv python3-dev wrk ca-certificates curl gcc g++ cmake make tmux dpkg-dev binutils lintian man-db; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Debian's prometheus package: promtool checks and unit-tests monitoring/, and the
# real-Prometheus e2e runs its server. Its own service is disabled when we install
# it: the test sandboxes are overlays of / and would each start one on :9090.
if ! dpkg -s prometheus >/dev/null 2>&1; then
  echo "setup: installing prometheus (promtool; its own service left disabled)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  systemctl disable prometheus.service >/dev/null 2>&1 || true
  if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
    systemctl stop prometheus.service >/dev/null 2>&1 || true
  fi
fi

# Debian's nginx: `cargo xtask bench-gateway` runs it as a plain proxy_pass
# beside the gateway (issue 11, item 1). Its own service (port 80) is disabled.
# linux-perf (Debian; Ubuntu: linux-tools-generic) profiles the gateway under load.
if ! dpkg -s nginx >/dev/null 2>&1; then
  echo "setup: installing nginx (for bench-gateway; its own service left disabled)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nginx >/dev/null
  systemctl disable nginx.service >/dev/null 2>&1 || true
  if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
    systemctl stop nginx.service >/dev/null 2>&1 || true
  fi
fi
if ! command -v perf >/dev/null 2>&1 && apt-cache show linux-perf >/dev/null 2>&1; then
  echo "setup: installing linux-perf (profiling)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends linux-perf >/dev/null || true
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: Rust is installed in ~/.cargo/bin; add it to PATH (source ~/.cargo/env)"
  else
    echo "setup: installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi

# The test command runs `cargo fmt --check` and `cargo clippy`; rustup's minimal
# profile has neither. A distribution's cargo without rustup cannot build this
# workspace anyway (rust-version in Cargo.toml is newer than Debian 12's 1.63).
rustup=$(command -v rustup || true)
if [ -z "$rustup" ] && [ -x "$HOME/.cargo/bin/rustup" ]; then
  rustup=$HOME/.cargo/bin/rustup   # installed just now, or not on PATH yet
fi
if [ -n "$rustup" ]; then
  need_components=()
  installed=$("$rustup" component list --installed 2>/dev/null || true)
  for c in rustfmt clippy; do
    grep -q "^$c-" <<<"$installed" || need_components+=("$c")
  done
  if [ "${#need_components[@]}" -gt 0 ]; then
    echo "setup: adding Rust components ${need_components[*]}"
    "$rustup" component add "${need_components[@]}"
  fi
elif ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  echo "setup: cargo fmt and cargo clippy are needed; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
echo "setup: ok"
