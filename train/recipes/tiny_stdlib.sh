#!/usr/bin/env bash
# The shipped model's recipe (train/recipes/tiny_stdlib.py), both runs at once on one GPU: the landmark model and
# its stock-attention baseline, from one tokenizer and one random initialisation.
#
#   bash train/recipes/tiny_stdlib.sh OUT_DIR [more tiny_stdlib options, given to both runs]
#
# -> OUT_DIR/tiny-stdlib-landmark, OUT_DIR/tiny-stdlib-stock (model folders with training.json), OUT_DIR/*.log
set -euo pipefail
out_dir=${1:?usage: bash train/recipes/tiny_stdlib.sh OUT_DIR [options]}
shift
recipe=(python -m landmark_llama.train.recipes.tiny_stdlib --work "$out_dir/work")
mkdir -p "$out_dir"
"${recipe[@]}" --output "$out_dir/tiny-stdlib-landmark" --prepare_only "$@"
"${recipe[@]}" --output "$out_dir/tiny-stdlib-landmark" --attention landmark "$@" > "$out_dir/landmark.log" 2>&1 &
landmark=$!
"${recipe[@]}" --output "$out_dir/tiny-stdlib-stock" --attention stock "$@" > "$out_dir/stock.log" 2>&1 &
stock=$!
status=0
wait $landmark || { echo "landmark run failed (see $out_dir/landmark.log)"; status=1; }
wait $stock || { echo "stock run failed (see $out_dir/stock.log)"; status=1; }
exit $status
