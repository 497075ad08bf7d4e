#!/usr/bin/env bash
# The test command of the README: installs lmf with its test extras (CPU torch) and runs the whole suite.
# LMF_TEST_PINS="transformers==5.19.* ..." installs those versions on top (the compatibility runs of .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
if [ -n "${LMF_TEST_PINS:-}" ]; then
    # shellcheck disable=SC2086
    python -m pip install -q $LMF_TEST_PINS
    python -c "import transformers, peft, datasets, tokenizers as t; print('testing with transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'tokenizers', t.__version__)"
fi
python -m pytest -q "$@"
