#!/usr/bin/env bash
# The test command of the README: installs lmf with its test extras (CPU torch) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pytest -q "$@"
