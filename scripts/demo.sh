#!/usr/bin/env bash
# Install lmf (CPU torch) and run the demo LoRA SFT on the bundled tiny model and demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[plot]"
lmf sft examples/demo_lora_sft.yaml "$@"
