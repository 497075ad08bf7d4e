#!/usr/bin/env bash
# Prepares a compatibility venv of .ci/run while the suite runs: CPU torch, then lmf's dependencies and test extras
# (read from pyproject.toml) with the pins given, resolved in one call as scripts/test.sh resolves them, but not
# lmf itself (an editable build writes into the checkout, which the suite is using). scripts/test.sh then finds every
# requirement met and only adds lmf. A failure here costs nothing but time: test.sh installs what is missing.
# usage: ci_prebuild.sh VENV [PIN ...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$1"
shift
python3 -m venv "$venv"
mapfile -t requirements < <(python3 -c '
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))')
bash scripts/install.sh "$venv/bin/python" "${requirements[@]}" "$@"
