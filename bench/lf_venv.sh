#!/usr/bin/env bash
# Create bench/.lf-venv: an isolated venv holding the reference implementation (LLaMA-Factory 0.9.5)
# that bench/compare_lf.py measures lmf against. LLaMA-Factory is never a dependency of lmf.
#
#   bash bench/lf_venv.sh            # create (or reuse) bench/.lf-venv
#   LF_PYTHON=python3.12 bash bench/lf_venv.sh
#
# torch is installed first, pinned (CPU wheel where one is available locally), so that resolving
# llamafactory's own pins (transformers, peft, datasets, ...) never swaps in a CUDA torch.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${LF_VENV:-$HERE/.lf-venv}"
PY="${LF_PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LF_VERSION="${LF_VERSION:-0.9.5}"

if [ -x "$VENV/bin/llamafactory-cli" ] && "$VENV/bin/python" -c "import llamafactory, sys; sys.exit(llamafactory.__version__ != '$LF_VERSION')" 2>/dev/null; then
    echo "lf_venv: $VENV already has llamafactory $LF_VERSION"
    exit 0
fi

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# 1. torch first; the CPU build if pip can see it, else whatever torch==X the indexes offer.
"$VENV/bin/python" -m pip install "torch==$TORCH_VERSION" \
    || "$VENV/bin/python" -m pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
# 2. llamafactory with torch held at the installed version (a constraints file keeps pip from replacing it).
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -m pip freeze | grep -i '^torch==' > "$CONSTRAINTS" || echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
"$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "llamafactory==$LF_VERSION"
"$VENV/bin/llamafactory-cli" version
echo "lf_venv: ready at $VENV"
