#!/usr/bin/env bash
# The test command of the README: installs lmf with its test extras (CPU torch) and runs the whole suite on both
# cores (pytest-xdist, -n 2; a `slow` multi-process test has the machine to itself: tests/conftest.py).
# scripts/install.sh installs: CPU torch with pip, the rest with uv (pip if uv fails), bytecode compiled.
# LMF_TEST_PINS="transformers==5.19.* ..." installs those versions on top (the compatibility runs of .ci/run).
# LMF_TEST_WORKERS: xdist workers (default 2; 0 runs in one process). LMF_CI_TIMES=FILE (set by .ci/run) appends
# "<LMF_CI_PHASE> install|tests <seconds> <exit code>" lines to FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
phase="${LMF_CI_PHASE:-suite}"
record() {  # record STEP START RC
    if [ -n "${LMF_CI_TIMES:-}" ]; then
        printf '%s\t%s\t%s\t%s\n' "$phase" "$1" "$(( $(date +%s) - $2 ))" "$3" >> "$LMF_CI_TIMES"
    fi
}
start=$(date +%s)
# shellcheck disable=SC2086
bash scripts/install.sh "$(python -c 'import sys; print(sys.executable)')" -e ".[test]" ${LMF_TEST_PINS:-}  # one resolution: the pins and what they need
if [ -n "${LMF_TEST_PINS:-}" ]; then
    python -c "import transformers, peft, datasets, tokenizers as t; print('testing with transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'tokenizers', t.__version__)"
fi
record install "$start" 0
start=$(date +%s)
set +e
python -m pytest -q -n "${LMF_TEST_WORKERS:-2}" "$@"
rc=$?
set -e
record tests "$start" "$rc"
exit "$rc"
