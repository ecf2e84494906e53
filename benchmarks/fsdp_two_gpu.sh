#!/usr/bin/env bash
# FSDP across two GPUs against one GPU, through train.finetune and the stock Trainer.
#
#   bash benchmarks/fsdp_two_gpu.sh [OUT_DIR]        (default: benchmarks/results/fsdp_two_gpu; STEPS=60)
#
# A small landmark model (4 layers, hidden 512, 8 heads of 64, block 64: shapes the Triton kernel takes) trains on
# a synthetic counting corpus for $STEPS steps, four times: two processes (torchrun --nproc_per_node 2) with FSDP
# full sharding over LlamaDecoderLayer, gradient checkpointing and 4 windows each, and one process on one GPU with
# 8 windows, each in fp32 and in bf16. Both see the same 8 windows a step, so the loss curves must agree step by
# step (fp32: within 1e-3, bf16: within 2% of the loss); the folder FSDP saved must reload with
# AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) and give the one-GPU model's logits (fp32,
# within 1e-2). Writes OUT_DIR/fsdp_two_gpu.json and .md (device, versions, date, command, curves, verdicts) and
# exits non-zero when a check fails.
#
# Not completed yet. On 2026-11-23 one attempt ran on nvidia-h200-x2 (torch 2.11, transformers 5.17; datasets, dill
# and multiprocess carried as wheels; `python` provided as a wrapper script around the image's python3). It ran past
# the 560 s limit of the call, and nothing came back (no output, no files), so the cause is unknown. Next try: STEPS=20
# first, and tee each run's log into OUT_DIR so a slow or hung stage shows. On CPU, the same comparison runs with two
# gloo processes (tests/test_train.py::test_fsdp_on_two_processes_matches_one_process).
set -euo pipefail
cd "$(dirname "$0")/.."
# importable as landmark_llama without an install (as in gpu_check.sh)
mkdir -p /tmp/landmark_pkg && ln -sfn "$PWD" /tmp/landmark_pkg/landmark_llama
export PYTHONPATH=/tmp/landmark_pkg${PYTHONPATH:+:$PYTHONPATH}

OUT=${1:-benchmarks/results/fsdp_two_gpu}
STEPS=${STEPS:-60}
WORK=$(mktemp -d)
mkdir -p "$OUT"

python - "$WORK" <<'PY'
import random, sys
from pathlib import Path

from landmark_llama.tools.convert_llama import convert_llama
from landmark_llama.tools.tiny_llama import build_tiny_llama

work = Path(sys.argv[1])
stock = build_tiny_llama(work / "stock", hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)
convert_llama(stock, work / "landmark", block_size=64, train_context_length=1024)
digits = "zero one two three four five six seven eight nine".split()
rng = random.Random(0)
with open(work / "corpus.txt", "w") as corpus:
    for _ in range(20000):
        start, length = rng.randrange(10), rng.randrange(10, 200)
        corpus.write(" ".join(digits[(start + i) % 10] for i in range(length)) + "\n")
PY

COMMON=(--model_name_or_path "$WORK/landmark" --train_file "$WORK/corpus.txt" --max_steps "$STEPS"
        --learning_rate 1e-3 --warmup_steps 0.1 --lr_scheduler_type cosine --weight_decay 0.1
        --logging_steps 1 --save_strategy no --report_to none --seed 0 --dataloader_num_workers 0 --disable_tqdm true)
FSDP=(--fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --activation_checkpointing)

for precision in fp32 bf16; do
    flags=()
    if [ "$precision" = bf16 ]; then flags=(--bf16); fi
    torchrun --standalone --nproc_per_node 2 -m landmark_llama.train.finetune "${COMMON[@]}" "${FSDP[@]}" "${flags[@]}" \
        --per_device_train_batch_size 4 --output_dir "$WORK/fsdp_$precision"
    CUDA_VISIBLE_DEVICES=0 python -m landmark_llama.train.finetune "${COMMON[@]}" "${flags[@]}" \
        --per_device_train_batch_size 8 --output_dir "$WORK/single_$precision"
done

# A fresh interpreter that never imports landmark_llama: the folders load from their own code files.
python - "$WORK" "$OUT" "$STEPS" <<'PY'
import datetime, json, platform, sys
from pathlib import Path

import accelerate, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

work, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def losses(run):
    history = json.loads((work / run / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


curves = {run: losses(run) for run in ("fsdp_fp32", "single_fp32", "fsdp_bf16", "single_bf16")}
fp32_gap = max(abs(a - b) for a, b in zip(curves["fsdp_fp32"], curves["single_fp32"]))
bf16_gap = max(abs(a - b) / b for a, b in zip(curves["fsdp_bf16"], curves["single_bf16"]))

models = {}
for run in ("fsdp_fp32", "single_fp32"):
    models[run] = AutoModelForCausalLM.from_pretrained(work / run, trust_remote_code=True).cuda().eval()
    assert type(models[run]).__module__.startswith("transformers_modules"), type(models[run]).__module__
tokenizer = AutoTokenizer.from_pretrained(work / "fsdp_fp32", trust_remote_code=True)
text = " ".join(["three four five six seven eight nine zero one two"] * 60)
ids = tokenizer(text, return_tensors="pt").input_ids.cuda()
with torch.no_grad():
    logit_gap = (models["fsdp_fp32"](ids).logits - models["single_fp32"](ids).logits).abs().max().item()

checks = {
    "fp32 loss curves, max |fsdp - single| <= 1e-3": [fp32_gap, fp32_gap <= 1e-3],
    "bf16 loss curves, max |fsdp - single| / single <= 0.02": [bf16_gap, bf16_gap <= 0.02],
    "fp32 FSDP-saved folder reloaded, max |logit - one-GPU logit| <= 1e-2": [logit_gap, logit_gap <= 1e-2],
}
result = {
    "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}",
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                 "accelerate": accelerate.__version__, "python": platform.python_version()},
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": f"bash benchmarks/fsdp_two_gpu.sh {out} (STEPS={steps})",
    "checks": checks,
    "loss_curves": curves,
}
(out / "fsdp_two_gpu.json").write_text(json.dumps(result, indent=2))
rows = "\n".join(f"| {step + 1} | " + " | ".join(f"{curves[run][step]:.5f}" for run in curves) + " |"
                 for step in range(len(curves["fsdp_fp32"])))
(out / "fsdp_two_gpu.md").write_text(
    f"# FSDP on two GPUs vs one GPU\n\n{result['device']}, {result['versions']}, {result['date']}\n\n"
    f"`{result['command']}`\n\n"
    + "\n".join(f"- {name}: {value:.3g} ({'ok' if passed else 'FAIL'})" for name, (value, passed) in checks.items())
    + "\n\n| step | " + " | ".join(curves) + " |\n|" + " --- |" * (len(curves) + 1) + "\n" + rows + "\n"
)
print((out / "fsdp_two_gpu.md").read_text())
sys.exit(0 if all(passed for _, passed in checks.values()) else 1)
PY
