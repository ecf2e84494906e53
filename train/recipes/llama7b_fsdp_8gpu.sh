#!/usr/bin/env bash
# The paper's Llama 7B fine-tune (Mohtashami & Jaggi 2023, and the authors' `llama/train.py` command) on 8 GPUs:
# 15,000 steps, windows of 512 tokens with a landmark after every 50 (block 51), 128 windows a step
# (8 GPUs x 2 x 8 accumulation), AdamW lr 2e-5, weight decay 0.1, 3% warmup, cosine decay to about 10% of the peak
# (num_cycles 0.4, as the authors' scheduler), bf16, TF32, FSDP full sharding with one unit per LlamaDecoderLayer.
#
#   MODEL=path/to/llama-7b DATA='path/to/redpajama-sample/*.jsonl' OUT=out/landmark-llama-7b \
#       bash train/recipes/llama7b_fsdp_8gpu.sh [more train.finetune options]
#
# MODEL: a stock Llama folder (safetensors; converted into $OUT/landmark-llama-init first) or a landmark-llama one.
# DATA: the paper's RedPajama sample as local jsonl files, e.g.
#   hf download togethercomputer/RedPajama-Data-1T-Sample --repo-type dataset --local-dir data/redpajama-sample
# Resume an interrupted run: the same command plus --resume_from_checkpoint last.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${MODEL:?set MODEL to a Llama checkpoint folder}"
: "${DATA:?set DATA to the training text (.txt, .jsonl, or a glob of them)}"
OUT=${OUT:-out/landmark-llama-7b}

torchrun --nproc_per_node 8 -m landmark_llama.train.finetune \
    --model_name_or_path "$MODEL" --block_size 51 --train_context_length 512 \
    --train_file "$DATA" --preprocessing_num_workers 32 \
    --output_dir "$OUT" \
    --max_steps 15000 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --learning_rate 2e-5 --weight_decay 0.1 --warmup_steps 0.03 \
    --lr_scheduler_type cosine --lr_scheduler_kwargs '{"num_cycles": 0.4}' \
    --bf16 --tf32 true \
    --fsdp --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
    --save_strategy steps --save_steps 2000 --save_total_limit 2 --logging_steps 1 \
    "$@"
