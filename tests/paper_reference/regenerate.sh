#!/usr/bin/env bash
# Regenerate tests/data/paper_llama_mem.safetensors (retrieval inference) and tests/data/paper_diff/ (their weight-diff
# format) from the authors' code, in a throwaway virtual environment with their library versions (never a dependency
# of this project).
#   bash tests/paper_reference/regenerate.sh PATH/TO/landmark-attention   (a checkout of epfml/landmark-attention)
set -euo pipefail
repo="$(cd "$1" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PAPER_VENV:-$(mktemp -d)/venv}"
if [ ! -x "$venv/bin/python" ]; then
    python -m venv "$venv"
    # their train.py and weight_diff.py import datasets and fire; 4.28's device_map needs accelerate
    "$venv/bin/pip" install -q torch==2.13.0 transformers==4.28.1 safetensors "datasets<2.20" fire "numpy<2" \
        accelerate==0.20.3 "setuptools<70"
fi
cd "$here"
"$venv/bin/python" make_expectations.py "$repo" ../data/paper_llama_mem.safetensors
"$venv/bin/python" make_paper_diff.py "$repo" ../data/paper_diff
