#!/bin/sh
# Creates the Python venv the gateway's `openai` client test uses
# (crates/gateway/tests/openai_client.rs runs crates/gateway/tests/openai_client.py).
#
#   scripts/setup-test-python.sh [VENV_DIR]
#
# VENV_DIR defaults to /var/cache/citadel-dev/pyclient; the test finds the
# interpreter at $CITADEL_TEST_PYTHON (default VENV_DIR/bin/python).
# Needs a Python 3 with the venv module (Debian: apt-get install python3-venv)
# and access to PyPI. Idempotent: re-running keeps an up-to-date venv.
set -eu

OPENAI_VERSION="${OPENAI_VERSION:-2.8.1}"
VENV="${1:-/var/cache/citadel-dev/pyclient}"

pick_python() {
    for py in "${CITADEL_SETUP_PYTHON:-}" /usr/bin/python3 python3; do
        [ -n "$py" ] || continue
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    echo "no Python 3 with the venv and ensurepip modules found; on Debian: apt-get install python3-venv" >&2
    return 1
}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
    echo "openai $OPENAI_VERSION already installed in $VENV"
    exit 0
fi

PY="$(pick_python)"
echo "creating $VENV with $PY"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
"$VENV/bin/python" -c 'import openai; print("openai", openai.__version__, "installed in", __import__("sys").prefix)'
