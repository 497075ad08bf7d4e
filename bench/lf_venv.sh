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
else
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # 1. torch first (the CPU build where pip's find-links/indexes hold one, as on the dev machines).
    "$VENV/bin/python" -m pip install "torch==$TORCH_VERSION"
    # 2. llamafactory with torch held at the installed version (a constraints file keeps pip from
    #    replacing it); llamafactory's own pins (transformers, peft, datasets, ...) resolve freely here.
    CONSTRAINTS="$(mktemp)"
    trap 'rm -f "$CONSTRAINTS"' EXIT
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"
    "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "llamafactory==$LF_VERSION"
fi
# 3. llamafactory requires torchvision and torchaudio; PyPI's Linux wheels of both are CUDA builds whose
#    compiled extensions cannot load next to a CPU torch (or a torch of another version):
#    - torchvision: text-only SFT never uses it, and transformers treats an absent torchvision as
#      "no image support", whereas a broken one makes `from transformers import PreTrainedModel` fail;
#    - torchaudio: llamafactory.data.mm_plugin imports it unconditionally; without its compiled
#      extension files it imports in pure-Python mode (audio I/O unavailable, unused here).
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    echo "lf_venv: torchvision cannot load against this torch; uninstalling it (unused by text SFT)"
    "$VENV/bin/python" -m pip uninstall -y -q torchvision
fi
if ! "$VENV/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
    echo "lf_venv: torchaudio's compiled extension cannot load against this torch; removing it (audio unused)"
    rm -f "$VENV"/lib/python3*/site-packages/torchaudio/lib/*.so
fi
"$VENV/bin/python" -c "import llamafactory.train.tuner" # smoke test: the training stack imports
"$VENV/bin/llamafactory-cli" version
echo "lf_venv: ready at $VENV"
