#!/usr/bin/env bash
# The paper's Llama 7B recipe (train/recipes/llama7b_fsdp_8gpu.sh) on one GPU with LoRA: the same data, windows,
# block size and 128 windows a step (8 x 16 accumulation), LoRA rank 16 on every projection, the landmark's (and
# the added pad token's) embedding and output rows trained in full, a LoRA learning rate of 2e-4, gradient
# checkpointing. Writes the adapter to $OUT and the merged model, loadable with trust_remote_code=True, to
# $OUT/merged. The weights stay float32 under bf16 autocast (about 27 GB for 7B); on a GPU of less than 40 GB
# add --model_dtype bfloat16. One GPU does the work of eight here: shorten with --max_steps N.
#
#   MODEL=path/to/llama-7b DATA='path/to/redpajama-sample/*.jsonl' OUT=out/landmark-llama-7b-lora \
#       bash train/recipes/llama7b_lora_1gpu.sh [more train.finetune options]
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${MODEL:?set MODEL to a Llama checkpoint folder}"
: "${DATA:?set DATA to the training text (.txt, .jsonl, or a glob of them)}"
OUT=${OUT:-out/landmark-llama-7b-lora}

python -m landmark_llama.train.finetune \
    --model_name_or_path "$MODEL" --block_size 51 --train_context_length 512 \
    --train_file "$DATA" --preprocessing_num_workers 16 \
    --output_dir "$OUT" \
    --lora_r 16 --lora_alpha 32 \
    --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --merge_lora \
    --max_steps 15000 --per_device_train_batch_size 8 --gradient_accumulation_steps 16 \
    --learning_rate 2e-4 --weight_decay 0.0 --warmup_steps 0.03 \
    --lr_scheduler_type cosine --lr_scheduler_kwargs '{"num_cycles": 0.4}' \
    --bf16 --tf32 true --activation_checkpointing \
    --save_strategy steps --save_steps 1000 --save_total_limit 2 --logging_steps 1 \
    "$@"
