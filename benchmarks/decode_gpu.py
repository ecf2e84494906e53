"""Long-prompt decode on one GPU: the block-retrieval cache (eager) against stock Llama, in one run.

    PYTHONPATH=DIR_WITH_landmark_llama python benchmarks/decode_gpu.py --out OUT_DIR [--lengths 8192 32768]

Llama 2 7B shape (hidden 4096, 32 layers, 32 heads of 128, MHA), bf16, random weights. Paths, each timed after a
warm-up generate (of the timed shape for the compiled path, of a 1k prompt for the others):
- landmark-llama with its retrieval cache (block 64, context 512, top-k 4, per-token retrieval, stingy positions),
- stock Llama with its default dynamic cache (SDPA),
- stock Llama with the static cache and generate's compile (`cache_implementation="static"`).
Decode time per token comes from host timestamps of each new token (a streamer whose put() copies the token to the
host); prefill is the time to the first new token. Peak memory: torch.cuda.max_memory_allocated of the timed run.
Writes OUT_DIR/decode_gpu.json and OUT_DIR/decode_gpu.md. The baseline for issue 15 (fused retrieval decode).
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=131072, bos_token_id=1, eos_token_id=2)


class Stamps(BaseStreamer):
    def __init__(self):
        self.times = []

    def put(self, value):
        value.cpu()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def timed(model, prompt, new_tokens, **kwargs):
    stamps = Stamps()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=stamps, pad_token_id=0, **kwargs)
    steps = [b - a for a, b in zip(stamps.times[1:], stamps.times[2:])]
    return {"prefill_s": stamps.times[1] - start, "ms_per_token": 1e3 * statistics.median(steps),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def build(kind):
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        if kind == "landmark":
            config = LandmarkLlamaConfig(vocab_size=32001, landmark_token_id=32000, block_size=64,
                                         train_context_length=512, retrieval_top_k=4, **SHAPE)
            model = LandmarkLlamaForCausalLM(config)
        else:
            model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, **SHAPE, attn_implementation="sdpa"))
        torch.set_default_dtype(torch.float32)
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    paths = [("landmark, retrieval cache", "landmark", {}), ("stock, dynamic cache", "stock", {}),
             ("stock, static cache + compile", "stock", {"cache_implementation": "static"})]
    models = {}
    for label, kind, kwargs in paths:
        models.setdefault(kind, build(kind))
        for length in args.lengths:
            prompt = torch.randint(3, 32000, (1, length), device="cuda")
            if kwargs:  # the compiled static path warms up (and compiles) at the timed shape
                timed(models[kind], prompt, args.new_tokens, **kwargs)
            else:
                timed(models[kind], prompt[:, :1024], 4)
            row = {"path": label, "prompt": length, **timed(models[kind], prompt, args.new_tokens, **kwargs)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            (out / "decode_gpu.json").write_text(json.dumps({"rows": rows}, indent=1))
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
            "command": "python benchmarks/decode_gpu.py " + " ".join(sys.argv[1:])}
    (out / "decode_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Long-prompt decode, {meta['device']} ({meta['date']})", "",
             f"{meta['versions']}; `{meta['command']}`",
             "", "| path | prompt | prefill s | ms / new token | peak GiB |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['path']} | {r['prompt']} | {r['prefill_s']:.2f} | {r['ms_per_token']:.1f} | {r['peak_gib']:.1f} |"
              for r in rows]
    (out / "decode_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
