#!/usr/bin/env bash
# Set up everything distexec needs on a fresh machine: system packages
# (toolchains, sandbox), a virtual environment in .venv, the project and its
# test dependencies.  Safe to run again; it only adds what is missing.
# --tests: also the system packages only the tests need (scripts/apt-packages-tests.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

lists=scripts/apt-packages.txt
[ "${1:-}" = "--tests" ] && lists="$lists scripts/apt-packages-tests.txt"
want=$(cat $lists | grep -v '^\s*#' | grep -v '^\s*$' || true)
if [ -n "$want" ] && command -v apt-get >/dev/null; then
  missing=$(for p in $want; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing system packages: $missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
# Our modules' bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (as on the machines
# this was measured on), every master and slave start would compile them again (docs/performance.md,
# "Start-up": first result 1.59 s compiled at each start against 0.89 s cached).
.venv/bin/python -m compileall -q distexec_kernel master slave >/dev/null
.venv/bin/python -c "import distexec_kernel, master, slave, tornado, ipywidgets, jupyterlab, playwright.sync_api" \
  || { echo "setup: the Python environment is incomplete" >&2; exit 1; }
echo "setup: ready (.venv)"
