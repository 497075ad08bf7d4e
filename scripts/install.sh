#!/usr/bin/env bash
# One way to install into a venv, used by scripts/test.sh, scripts/ci_prebuild.sh and scripts/test_vllm.sh:
# usage: install.sh PYTHON REQUIREMENT...   (PYTHON: the venv's interpreter; requirements as pip takes them)
# 1. torch==2.13.0 with pip, unless that version is there: pip takes this machine's CPU build from its wheel folder
#    (pip's configuration); uv does not look there and would resolve a CUDA build.
# 2. The requirements with uv (installed into the venv by pip, ~2 s), which resolves and installs in parallel: the
#    suite's extras in ~30 s instead of pip's ~85 s, and the background builds of .ci/run take that much less CPU
#    from the suite beside them. torch, already there, satisfies every range and is left alone. uv compiles the
#    bytecode (--compile-bytecode) as pip does: the CI machine sets PYTHONDONTWRITEBYTECODE, so a module not compiled
#    at install is compiled again by every process that imports it.
# 3. If uv cannot be installed or fails, pip installs the same requirements (same resolution rules, slower).
# The exit code is the installer's.
set -uo pipefail
python="$1"
shift
have_torch=$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${have_torch%%+*}" != "2.13.0" ]; then
    "$python" -m pip install -q torch==2.13.0 || exit $?
fi
[ "$#" -gt 0 ] || exit 0
uv="$(dirname "$python")/uv"
if [ -x "$uv" ] || "$python" -m pip install -q uv >/dev/null 2>&1; then
    if "$uv" pip install --python "$python" -q --compile-bytecode "$@"; then
        exit 0
    fi
    echo "install.sh: uv could not install $*; trying pip" >&2
fi
"$python" -m pip install -q "$@"
