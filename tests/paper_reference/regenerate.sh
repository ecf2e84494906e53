#!/usr/bin/env bash
# Regenerate tests/data/paper_llama_mem.safetensors from the authors' code, in a throwaway virtual environment with
# their library versions (never a dependency of this project).
#   bash tests/paper_reference/regenerate.sh PATH/TO/landmark-attention   (a checkout of epfml/landmark-attention)
set -euo pipefail
repo="$(cd "$1" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PAPER_VENV:-$(mktemp -d)/venv}"
if [ ! -x "$venv/bin/python" ]; then
    python -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0 transformers==4.28.1 safetensors
fi
"$venv/bin/python" "$here/make_expectations.py" "$repo" "$here/../data/paper_llama_mem.safetensors"
