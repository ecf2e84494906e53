"""One training step end to end on one GPU: landmark-llama (block 64, and the paper's 51) against stock Llama.

    PYTHONPATH=DIR_WITH_landmark_llama python benchmarks/train_step.py --out OUT_DIR [--shapes 16x512 4x2048 1x8192]

Llama 3.2 1B shape (hidden 2048, 16 layers, 32 query heads over 8 key/value heads of 64, SwiGLU 8192, vocabulary
128,256, tied embeddings), random weights in bf16, fused AdamW, no activation checkpointing. A step is forward with
the loss, backward, optimizer step and zero_grad, timed with CUDA events over `--steps` steps after `--warmup`
(the first of which compile and autotune the kernels); the median step gives tokens/s. Models:
- stock Llama with SDPA (what a user picks for training; flash on Hopper),
- landmark-llama on its Triton kernel with block_size 64 (63 tokens and a landmark),
- landmark-llama with block_size 51 (the paper's Llama run), each block in a slot of 64 with masked phantom keys.
The landmark models see the same user tokens; their internal sequences are longer by the landmarks. Writes
OUT_DIR/train_step.json and OUT_DIR/train_step.md.
"""

import argparse
import datetime
import gc
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM

SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
             max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, rope_theta=500000.0)
LANDMARK_ID = 128255


def build(kind):
    with torch.device("cuda"):
        if kind == "stock":
            model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa"))
        else:
            block_size = int(kind.rsplit("block ", 1)[1])
            config = LandmarkLlamaConfig(**SHAPE, landmark_token_id=LANDMARK_ID, pad_token_id=0,
                                         block_size=block_size, attention_backend="triton", use_cache=False)
            model = LandmarkLlamaForCausalLM(config)
    return model.to(torch.bfloat16).train()


def train_step(model, optimizer, ids):
    """Forward with the loss, backward, optimizer step and zero_grad; returns the loss."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def profile_steps(model, optimizer, ids, path, steps=2):
    """CUDA time per kernel over `steps` training steps (torch.profiler): the top 40 as a table in `path`, every
    kernel's device ms a step in `path` with .json (to compare two models kernel by kernel)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(model, optimizer, ids)
        torch.cuda.synchronize()
    events = prof.key_averages()
    path.write_text(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))
    per_kernel = {e.key: dict(count=e.count, self_device_ms=getattr(e, "self_device_time_total", 0) / 1e3 / steps)
                  for e in events}
    path.with_suffix(".json").write_text(json.dumps(per_kernel, indent=1))


def time_steps(model, batch, length, warmup, steps, profile_path=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(1, LANDMARK_ID, (batch, length), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for index in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = train_step(model, optimizer, ids)
        end.record()
        end.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    if profile_path is not None:
        profile_steps(model, optimizer, ids, profile_path)
    return {"step_s": step, "tokens_per_s": batch * length / step, "peak_gib": peak, "loss": loss.item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["16x512", "4x2048", "1x8192"], help="batch x tokens")
    parser.add_argument("--models", nargs="+", default=["stock", "landmark, block 64", "landmark, block 51"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile 2 steps of each model and shape: "
                        "OUT_DIR/profile-<model>-<shape>.txt")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for kind in args.models:
        model = build(kind)
        for shape in args.shapes:
            batch, length = map(int, shape.split("x"))
            profile_path = (args.out / f"profile-{kind.replace(', ', '-').replace(' ', '')}-{shape}.txt"
                            if args.profile else None)
            row = dict(model=kind, batch=batch, tokens=length,
                       **time_steps(model, batch, length, args.warmup, args.steps, profile_path))
            results.append(row)
            print(json.dumps(row), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                date=datetime.date.today().isoformat(), command=shlex.join(["python", *sys.argv]))
    (args.out / "train_step.json").write_text(json.dumps(dict(meta, results=results), indent=1) + "\n")
    stock = {(r["batch"], r["tokens"]): r for r in results if r["model"] == "stock"}
    block64 = {(r["batch"], r["tokens"]): r for r in results if r["model"] == "landmark, block 64"}
    lines = [f"# Training step, Llama 3.2 1B shape, bf16 ({meta['date']})", "",
             f"{meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}; `{meta['command']}`", "",
             "| model | batch x tokens | step ms | tokens/s | vs stock | step vs block 64 | peak GiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        key = (r["batch"], r["tokens"])
        vs_stock = f"{r['tokens_per_s'] / stock[key]['tokens_per_s']:.3f}x" if key in stock else "-"
        vs_64 = f"{r['step_s'] / block64[key]['step_s']:.3f}x" if key in block64 else "-"
        lines.append(f"| {r['model']} | {r['batch']} x {r['tokens']} | {1e3 * r['step_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {vs_stock} | {vs_64} | {r['peak_gib']:.1f} |")
    (args.out / "train_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
