#!/usr/bin/env bash
# Start a local cluster (a master and two slaves), run the quickstart notebook
# against it and print what each cell showed; then keep the cluster up until
# Ctrl-C.  `--lab` also opens JupyterLab on notebooks/.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/demo.py "$@"
