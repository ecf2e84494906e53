"""Long-prompt generation on CPU: the block-retrieval cache against the uncached landmark path and stock Llama.

    python benchmarks/retrieval_cpu.py --out OUT_DIR [--lengths 500 2000 8000 32000] [--new_tokens 16]

Model (random weights, fp32): the tiny Llama of tools/tiny_llama.py (hidden 64, 2 layers, 4 query heads over 2 kv
heads of 16), converted with block_size 16 and train_context_length 512 (retrieval_top_k 4: prefill chunks of
432 internal positions). Each (path, prompt length) runs greedy `generate` in its own process, so peak memory is
that run's own (ru_maxrss):
- landmark, retrieval cache: `generate` as it runs by default (per-token retrieval, stingy positions),
- landmark, no cache: `use_cache=False` (what generate did before the cache existed: every step re-reads the whole
  sequence in the training form); only up to 8k, it needs O(n^2) memory,
- stock Llama with its DynamicCache and SDPA, same weights.
Decode time per token comes from host timestamps of each new token (a streamer whose put() reads the token on the
host), not from subtracting a prefill run; the first put() after the prompt marks the end of prefill.

Writes OUT_DIR/retrieval_cpu.md, OUT_DIR/retrieval_cpu.json and, with matplotlib, OUT_DIR/retrieval_cpu.png.
"""

import argparse
import datetime
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"retrieval": "landmark, retrieval cache", "no_cache": "landmark, no cache", "stock": "stock Llama, cache"}
NO_CACHE_LIMIT = 8000


def run_one(path, length, new_tokens, seed=0):
    """One measurement in this process: returns prefill seconds, per-token seconds, peak RSS in MiB."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from landmark_llama.tools.convert_llama import convert_llama
    from landmark_llama.tools.tiny_llama import build_tiny_llama

    torch.manual_seed(seed)
    folder = Path(tempfile.mkdtemp(prefix="retrieval-bench-"))
    stock_folder = build_tiny_llama(folder / "stock", max_position_embeddings=65536)
    source = stock_folder if path == "stock" else convert_llama(
        stock_folder, folder / "landmark", block_size=16, train_context_length=512
    )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    vocab = model.config.vocab_size - (0 if path == "stock" else 2)  # plain tokens only
    prompt = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            value.tolist()  # the token is on the host now
            self.times.append(time.perf_counter())

        def end(self):
            pass

    stamps = Stamps()
    extra = {"use_cache": False} if path == "no_cache" else {}
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=stamps, pad_token_id=0, **extra)
    times = stamps.times  # [prompt, token 1, token 2, ...]
    steps = [b - a for a, b in zip(times[1:], times[2:])]
    return {
        "prefill_s": times[1] - start,
        "per_token_s": statistics.median(steps),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[500, 2000, 8000, 32000])
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: PATH LENGTH, measured in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.new_tokens)))
        return

    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, n) for n in args.lengths for p in PATHS if p != "no_cache" or n <= NO_CACHE_LIMIT]
    rows = []
    for path, length in tqdm(jobs, desc="runs"):
        result = subprocess.run(
            [sys.executable, __file__, "--out", str(out), "--one", path, str(length), "--new_tokens",
             str(args.new_tokens)], capture_output=True, text=True, cwd=ROOT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{path} at {length} failed:\n{result.stderr[-3000:]}")
        rows.append({"path": path, "prompt": length, **json.loads(result.stdout.strip().splitlines()[-1])})

    import torch
    import transformers

    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "command": shlex.join(["python", *sys.argv]),
    }
    (out / "retrieval_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Long-prompt generation on CPU ({meta['date']})", "",
             f"{meta['machine']}; {meta['versions']}; `{meta['command']}`", "",
             "| path | prompt | prefill s | s / new token | peak MiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {PATHS[row['path']]} | {row['prompt']} | {row['prefill_s']:.2f} | "
                     f"{row['per_token_s']:.4f} | {row['peak_mib']:.0f} |")
    (out / "retrieval_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for path, label in PATHS.items():
        mine = [r for r in rows if r["path"] == path]
        axes[0].plot([r["prompt"] for r in mine], [r["per_token_s"] * 1e3 for r in mine], "o-", label=label)
        axes[1].plot([r["prompt"] for r in mine], [r["peak_mib"] for r in mine], "o-", label=label)
    for axis, title in zip(axes, ("ms per new token", "peak memory (MiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("prompt tokens")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("tiny model on CPU: greedy decode after a long prompt")
    fig.tight_layout()
    fig.savefig(out / "retrieval_cpu.png", dpi=120)


if __name__ == "__main__":
    main()
