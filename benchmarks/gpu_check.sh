#!/usr/bin/env bash
# The GPU side of the project in one command: what it checks and what it times.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [tests] [bench] [sweep] [tiny]   (no step named: the first three)
#
#   tests  the CUDA-marked tests: kernels vs float64 at real sizes (training form, every tile config, determinism, no
#          recompilation; the fused retrieval kernel); model-level eager vs Triton (logits and gradients), padding,
#          peak memory, the retrieval cache and graph-captured decoding against the CPU; $TESTS_FILTER: pytest -k
#          -> OUT_DIR/tests.log                                                    (about 4.5 min on an H100)
#   bench  benchmarks/attention.py: fine-tuning shapes 16x512 and 4x2k, batch 1 at 2k-32k, MHA and GQA 32/8, against
#          SDPA flash and cuDNN
#          -> OUT_DIR/bench/attention.{md,json,png}, OUT_DIR/bench.log             (about 4 min)
#   sweep  benchmarks/tile_sweep.py (default at 1 x 8k, MHA and GQA; other shapes and head_dim in $SWEEP_OPTIONS):
#          every tile config of each kernel on its own, SDPA flash beside
#          -> OUT_DIR/sweep/tile_sweep.json, OUT_DIR/sweep.log                      (about 1.5 min)
#   train  benchmarks/train_step.py: a training step of the Llama 3.2 1B shape, stock Llama (SDPA) against
#          landmark-llama at block 64 and 51, at 16x512, 4x2k, 1x8k; options (--profile, --shapes, --models) in
#          $TRAIN_OPTIONS, as shell words (TRAIN_OPTIONS="--models stock 'landmark, block 64'")
#          -> OUT_DIR/train/, OUT_DIR/train.log                                    (about 3 min)
#   decode_kernels  benchmarks/inference_kernels.py --decode: a decoding step's selection and attention kernels in
#          every candidate launch setting, at $DECODE_PROMPTS (default 32768 131072 524288) with $DECODE_KV_HEADS
#          (default 8) key/value heads -> OUT_DIR/decode_kernels/<prompt>/decode_kernels.json    (about 1 min each)
#   prefill_kernels  benchmarks/inference_kernels.py: a 4,096-position prefill pass's selection (scoring tiles and
#          warps, the top k's warps) and retrieval tiles at the end of a $PREFILL_PROMPTS-token cache (default 32768
#          131072; the 7B shape) -> OUT_DIR/prefill_kernels/<prompt>/prefill_kernels.json         (about 1 min each)
#   generate  benchmarks/generate.py: long-prompt generation, landmark-llama's retrieval cache (kept on the GPU or
#          offloaded to host memory) against stock Llama's dynamic and static+compile caches; options in
#          $GENERATE_OPTIONS (shape, lengths, paths, batch)
#          -> OUT_DIR/generate/generate-<shape>-<batch>.json, OUT_DIR/generate.log; merge runs with --report
#   tiny   the shipped model's recipe (train/recipes/tiny_stdlib.sh), landmark and stock baseline trained at once,
#          then a pass key check of both on the GPU (20 prompts a length) -> OUT_DIR/tiny/, OUT_DIR/tiny.log,
#          OUT_DIR/tiny-passkey/; recipe options in $TINY_OPTIONS                   (about 6 min on an H200)
#   tiny_eval  the committed results of the shipped model: pass key (50 prompts a length, 512-32k; the baseline to
#          4k) and held-out perplexity (512-32k, 131072 tokens) of $TINY_MODEL (default: the shipped model) against
#          $TINY_BASELINE (default: OUT_DIR/tiny/tiny-stdlib-stock); data from $TINY_STDLIB (default: this Python's)
#          -> OUT_DIR/passkey/, OUT_DIR/perplexity/, OUT_DIR/tiny_eval.log            (about 4 min on an H200)
#
# With the device tool (10 minutes a command), run `tests` in one call and `bench sweep` in another:
#   bash benchmarks/gpu_check.sh $OUT tests
#   bash benchmarks/gpu_check.sh $OUT bench sweep
# Works without installing the package (the device image cannot install it editable): the repository is made
# importable as `landmark_llama` through a symlink, and `python` is provided where only `python3` exists.
set -uo pipefail
out_dir=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [tests] [bench] [sweep] [tiny]}
shift
steps=${*:-tests bench sweep}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$out_dir" /tmp/landmark_pkg /tmp/landmark_bin
ln -sfn "$root" /tmp/landmark_pkg/landmark_llama
export PYTHONPATH=/tmp/landmark_pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! command -v python >/dev/null; then
    printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/landmark_bin/python  # a symlink would lose a venv
    chmod +x /tmp/landmark_bin/python
    export PATH=/tmp/landmark_bin:$PATH
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out_dir/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" | tee -a "$out_dir/gpu.txt"
status=0
inference_kernels() {  # STEP PROMPTS SECONDS [options]: benchmarks/inference_kernels.py at the end of each prompt
    local step=$1 prompts=$2 seconds=$3
    shift 3
    for prompt in $prompts; do
        timeout "$seconds" python benchmarks/inference_kernels.py --out "$out_dir/$step/$prompt" --prompt "$prompt" \
            "$@" 2>&1 | tee -a "$out_dir/$step.log" || status=1
    done
}
for step in $steps; do
    case $step in
        tests) timeout 540 python -m pytest -q -m cuda -rA tests/test_kernels.py tests/test_retrieval_kernel.py \
                   tests/test_block_selection.py tests/test_gpu_model.py ${TESTS_FILTER:+-k "$TESTS_FILTER"} 2>&1 \
                   | tee "$out_dir/tests.log" || status=1 ;;
        decode_kernels) inference_kernels decode_kernels "${DECODE_PROMPTS:-32768 131072 524288}" 180 --decode \
                            --kv-heads "${DECODE_KV_HEADS:-8}" ;;
        prefill_kernels) inference_kernels prefill_kernels "${PREFILL_PROMPTS:-32768 131072}" 240 ;;
        generate) timeout 570 python benchmarks/generate.py --out "$out_dir/generate" ${GENERATE_OPTIONS:-} 2>&1 \
                   | tee -a "$out_dir/generate.log" || status=1 ;;
        bench) timeout 420 python benchmarks/attention.py --out "$out_dir/bench" 2>&1 | tee "$out_dir/bench.log" \
                   || status=1 ;;
        sweep) timeout 240 python benchmarks/tile_sweep.py --out "$out_dir/sweep" ${SWEEP_OPTIONS:-} 2>&1 \
                   | tee "$out_dir/sweep.log" || status=1 ;;
        train) eval "train_options=(${TRAIN_OPTIONS:-})"  # shell words, so that a model name can be quoted
               timeout 420 python benchmarks/train_step.py --out "$out_dir/train" "${train_options[@]}" 2>&1 \
                   | tee "$out_dir/train.log" || status=1 ;;
        tiny) { timeout 480 bash train/recipes/tiny_stdlib.sh "$out_dir/tiny" --time_limit 400 ${TINY_OPTIONS:-} && \
                timeout 100 python -m landmark_llama.tools.passkey --model "$out_dir/tiny/tiny-stdlib-landmark" \
                    --baseline "$out_dir/tiny/tiny-stdlib-stock" --baseline_lengths 512 1024 2048 4096 \
                    --lengths 512 2048 8192 32768 --trials 20 --batch_size 20 --output "$out_dir/tiny-passkey"; } \
                  2>&1 | tee "$out_dir/tiny.log" || status=1 ;;
        tiny_eval) model=${TINY_MODEL:-models/tiny-stdlib-landmark} baseline=${TINY_BASELINE:-$out_dir/tiny/tiny-stdlib-stock}
              { timeout 240 python -m landmark_llama.tools.passkey --model "$model" --baseline "$baseline" \
                    --lengths 512 1024 2048 4096 8192 16384 32768 --baseline_lengths 512 1024 2048 4096 \
                    --trials 50 --batch_size 50 --output "$out_dir/passkey" && \
                timeout 240 python -m landmark_llama.tools.perplexity --model "$model" --baseline "$baseline" \
                    ${TINY_STDLIB:+--stdlib "$TINY_STDLIB"} --tokens 131072 --output "$out_dir/perplexity"; } \
                  2>&1 | tee "$out_dir/tiny_eval.log" || status=1 ;;
        *) echo "unknown step '$step' (tests, bench, sweep, train, generate, decode_kernels, prefill_kernels, tiny, tiny_eval)"
           status=2 ;;
    esac
done
exit $status
