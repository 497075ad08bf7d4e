#!/usr/bin/env bash
# Download, on a machine WITH internet, the wheels that LLaMA-Factory 0.9.5 needs to run LoRA SFT
# (`bench/compare_lf.py --sections gpu`) on a GPU machine WITHOUT internet that already has python 3.12
# and a CUDA torch. Output: ./.whl (git-ignored). Install there as shown at the top of bench/compare_lf.py.
#
#   bash bench/fetch_gpu_wheels.sh                  # all of them (~120 MiB; torch is never downloaded)
#   bash bench/fetch_gpu_wheels.sh gpu-freeze.txt   # skip what `pip freeze` on the GPU machine already has
#
# The list is not llamafactory's full dependency tree (gradio, av, scipy, matplotlib, modelscope, ...
# ~250 MiB): it is what `llamafactory-cli train` actually imports for text SFT, found by recording the
# distributions behind sys.modules after a LoRA SFT run in bench/.lf-venv, then checked by training in a
# venv holding only torch + this list. Versions are those bench/lf_venv.sh resolved (LLaMA-Factory's own
# pins), so the GPU run uses the same software as the CPU comparison.
# With a freeze file (`python -m pip freeze` run on the GPU machine), a package the GPU machine already
# has is skipped -- at any version for the general-purpose libraries (numpy, pandas, pyarrow, requests,
# ...; LLaMA-Factory's bounds on them are loose, e.g. the preprocessing digest is identical with pandas
# 3.1.1 instead of 2.3.3), at exactly the pinned version for the CORE packages that define LLaMA-Factory's
# behaviour. The LF venv there is created with --system-site-packages, so it sees the skipped ones.
set -euo pipefail
DEST="${WHEEL_DIR:-.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
FREEZE="${1:-}"

PINS="
llamafactory==0.9.5
transformers==5.6.0
tokenizers==0.22.2
safetensors==0.8.0
huggingface_hub==1.33.0
hf-xet==1.8.0
accelerate==1.11.0
peft==0.18.1
trl==0.24.0
datasets==4.0.0
pyarrow==26.0.1
pandas==2.3.3
numpy==2.4.6
python-dateutil==4.0.0
pytz==2026.6
tzdata==2026.6
dill==0.3.8
multiprocess==0.70.16
xxhash==4.1.0
fsspec==2025.3.0
omegaconf==2.4.0
torchaudio==2.11.0
torchdata==0.11.0
regex==2026.11.15
tqdm==4.70.1
packaging==26.3
PyYAML==6.0.3
psutil==7.2.2
requests==2.34.2
urllib3==2.8.0
idna==3.20
certifi==2026.10.18
charset-normalizer==3.5.2
httpx==0.28.1
httpcore==1.0.9
h11==0.16.0
anyio==4.16.0
"

CORE=" llamafactory transformers tokenizers huggingface-hub accelerate peft trl datasets dill multiprocess fsspec omegaconf torchaudio torchdata "

normalize() { awk -F'==' '{ n = tolower($1); gsub(/[_.]/, "-", n); print n "==" $2 }'; }  # PEP 503 names
have=""
if [ -n "$FREEZE" ]; then
    have="$(grep -E '^[A-Za-z0-9_.-]+==' "$FREEZE" | normalize || true)"
fi
already_there() {  # $1 = name==version (normalized)
    local name="${1%%==*}"
    if [[ "$CORE" == *" $name "* ]]; then
        grep -qx "$1" <<<"$have"
    else
        grep -q "^$name==" <<<"$have"
    fi
}

mkdir -p "$DEST"
for pin in $PINS; do
    norm="$(echo "$pin" | normalize)"
    if [ -n "$have" ] && already_there "$norm"; then
        echo "skip $pin (the GPU machine has $(grep "^${norm%%==*}==" <<<"$have"))"
        continue
    fi
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST" "$pin"
done
total_kib=$(du -sk "$DEST" | cut -f1)
echo "wheels in $DEST: $(ls "$DEST" | wc -l) files, $((total_kib / 1024)) MiB"
if [ "$total_kib" -gt $((60 * 1024)) ]; then
    echo "note: more than 60 MiB. The biggest are pyarrow (~42 MiB), numpy (~16 MiB), pandas (~12 MiB),"
    echo "transformers (~12 MiB): pass the GPU machine's \`pip freeze\` to skip those it already has."
fi
