#!/usr/bin/env bash
# Installs everything swarm-node needs into ./.venv on a Debian machine with Python 3.11 (apt + PyPI reachable).
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# fastecdsa (a py-libp2p dependency) compiles against GMP.
if ! dpkg -s libgmp-dev >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libgmp-dev gcc python3-dev >/dev/null
fi

# Chromium + its WebDriver for the dashboard's browser test (tests/test_dashboard.py); optional: without root (or
# sudo) or apt the step is skipped with a note, and that test then skips saying why (on CI it fails instead).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
        { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
            || echo "note: could not install chromium (the dashboard's browser test will skip)" >&2
    else
        echo "note: no root or apt: chromium not installed (the dashboard's browser test will skip)" >&2
    fi
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,tensorboard,wandb]'
echo "swarm-node installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
