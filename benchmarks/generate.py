"""Long-prompt generation on one GPU: landmark-llama's retrieval cache against stock transformers Llama, one run.

    PYTHONPATH=DIR_WITH_landmark_llama python benchmarks/generate.py --out OUT_DIR --shape llama2-7b \
        --lengths 8192 32768 [--paths landmark stock-dynamic stock-static] [--batch 1] [--new_tokens 64]
    python benchmarks/generate.py --report OUT_DIR [MORE_DIRS ...]   (table, JSON and plot of every run found)
    python benchmarks/generate.py --out OUT_DIR --profile decode|prefill --lengths 32768 [--paths landmark-offload]

Shapes, bf16, random weights (the same draw for both models: stock Llama's weights are loaded into landmark-llama,
whose one extra vocabulary row is the landmark): `llama2-7b` (hidden 4096, 32 layers, 32 heads of 128, MHA,
vocabulary 32,000) and `llama3-8b` (32 query heads over 8 key/value heads, SwiGLU 14,336, vocabulary 128,256, RoPE
theta 500,000). Paths:
- `landmark`: landmark-llama with its block-retrieval cache (block 64, context 512, top-k 4, per-token retrieval,
  stingy positions) and graph-captured decoding steps, as `generate` runs it by default;
- `landmark-offload`: the same with `offload_to_cpu=True` (keys and values of complete blocks in pinned host
  memory);
- `stock-dynamic`: stock Llama (SDPA) with its default dynamic cache;
- `stock-static`: stock Llama with the static cache and generate's automatic compile
  (`cache_implementation="static"`).
Each path is timed after a warm-up generate at the timed shape (where the compiled path compiles and our kernels
compile the layouts the prompt reaches; `--warmup_prompt N`: our paths warm up at N tokens). Decode time per token
is the median gap between host timestamps of consecutive new tokens (a streamer whose put() copies the token to the
host); prefill is the time to the first new token. Peak GPU memory: torch.cuda.max_memory_allocated of the timed
run; host: the process's peak resident memory so far. Each run writes OUT_DIR/generate-<shape>-<batch>.json;
--report merges them into generate.{json,md,png}.
"""

import argparse
import datetime
import gc
import json
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}
PATHS = {"landmark": {}, "landmark-offload": {"offload_to_cpu": True}, "stock-dynamic": {},
         "stock-static": {"cache_implementation": "static"}}
LABELS = {"landmark": "landmark-llama, retrieval cache", "landmark-offload": "landmark-llama, cache offloaded to host",
          "stock-dynamic": "stock, dynamic cache", "stock-static": "stock, static cache + compile"}


class Stamps(BaseStreamer):
    """Host time of every put(): the prompt first, then each new token once it is on the host."""

    def __init__(self):
        self.times = []

    def put(self, value):
        value.cpu()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def host_gib():
    """The process's peak resident memory so far (an offloaded cache is freed by the time generate returns)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "host_gib": host_gib()}


def build_models(shape):
    """Stock Llama with random bf16 weights, and landmark-llama sharing those weights (its embedding and head carry
    one row more, the landmark, so those two are copies). Returns (stock, landmark, bytes held only by each)."""
    from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM

    fields = dict(SHAPES[shape], max_position_embeddings=1 << 20, bos_token_id=1, eos_token_id=2)
    vocab = fields["vocab_size"]
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        stock = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))
        fields["vocab_size"] = vocab + 1
        config = LandmarkLlamaConfig(landmark_token_id=vocab, block_size=64, train_context_length=512,
                                     retrieval_top_k=4, **fields)
        with torch.device("meta"):
            landmark = LandmarkLlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    stock_parameters = dict(stock.named_parameters())
    own = 0
    for name, parameter in list(landmark.named_parameters()):
        source = stock_parameters[name]
        if parameter.shape == source.shape:
            tensor = source.data
        else:  # the landmark row: the mean of the others, as convert_llama sets it
            tensor = torch.cat([source.data, source.data.mean(0, keepdim=True)])
            own += tensor.nbytes
        module_name, _, attribute = name.rpartition(".")
        setattr(landmark.get_submodule(module_name), attribute, torch.nn.Parameter(tensor, requires_grad=False))
    for name, buffer in stock.named_buffers():  # RoPE frequencies
        module_name, _, attribute = name.rpartition(".")
        landmark.get_submodule(module_name).register_buffer(attribute, buffer.clone(), persistent=False)
    stock_own = stock.model.embed_tokens.weight.nbytes + stock.lm_head.weight.nbytes
    return stock.eval(), landmark.eval(), {"stock": stock_own, "landmark": own}


def run(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"generate-{args.shape}-{args.batch}.json"
    rows = json.loads(record.read_text())["rows"] if record.exists() else []
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
            "command": shlex.join(["python", *sys.argv])}
    stock, landmark, own_bytes = build_models(args.shape)
    models = {"stock-dynamic": stock, "stock-static": stock, "landmark": landmark, "landmark-offload": landmark}
    vocab = SHAPES[args.shape]["vocab_size"]
    for path in args.paths:
        for length in args.lengths:
            prompt = torch.randint(3, vocab, (args.batch, length), device="cuda", generator=None)
            kwargs = PATHS[path]
            try:
                # a run at the timed prompt first: stock's static cache compiles at the timed shape, and our kernels
                # compile the layouts a prompt of this length reaches (a shorter warm-up left their JIT to the
                # timed prefill: 2.9 s for 8k on a fresh device, 0.68 s warm)
                warmup = prompt if path == "stock-static" or not args.warmup_prompt else prompt[:, :args.warmup_prompt]
                timed(models[path], warmup, args.new_tokens if path == "stock-static" else 8, **kwargs)
                result = timed(models[path], prompt, args.new_tokens, **kwargs)
                # the other model's own tensors (embedding and head) stay allocated; they are not this path's
                result["peak_gib"] -= own_bytes["landmark" if path.startswith("stock") else "stock"] / 2**30
            except torch.OutOfMemoryError as error:
                result = {"error": f"out of memory: {str(error).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
            row = {"shape": args.shape, "path": path, "prompt": length, "batch": args.batch,
                   "new_tokens": args.new_tokens, **result, **meta}
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["path"], r["prompt"]) != (path, length)] + [row]
            record.write_text(json.dumps({"rows": rows}, indent=1))


def profile(args):
    """Where our path's GPU and host time goes: `--profile decode`, the kernels of a few plain (not graph-captured)
    decoding steps after a prompt of the first length; `--profile prefill`, that prompt's prefill (CPU and CUDA
    activity: an offloaded prefill is bound by the host). The first of --paths that is ours (`landmark` or
    `landmark-offload`) -> OUT_DIR/profile-<shape>[-prefill][-offload].txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from landmark_llama import LandmarkRetrievalCache
    from landmark_llama.modeling_landmark_llama import _CACHE_FIELD

    path = next(p for p in args.paths + ["landmark"] if p.startswith("landmark"))
    _, landmark, _ = build_models(args.shape)
    prompt = torch.randint(3, SHAPES[args.shape]["vocab_size"], (args.batch, args.lengths[0]), device="cuda")

    def new_cache():
        return LandmarkRetrievalCache(landmark.config, cuda_graphs=args.profile == "prefill", **PATHS[path])

    steps = 4
    with torch.no_grad():
        if args.profile == "prefill":
            landmark(prompt, **{_CACHE_FIELD: new_cache()}, logits_to_keep=1)  # compiles every layout it reaches
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
                landmark(prompt, **{_CACHE_FIELD: new_cache()}, logits_to_keep=1)
                torch.cuda.synchronize()
            per = 1
            what = f"prefill ({time.perf_counter() - start:.2f} s under the profiler)"
        else:
            cache = new_cache()
            token = landmark(prompt, **{_CACHE_FIELD: cache}).logits[:, -1:].argmax(-1)
            token = landmark(token, **{_CACHE_FIELD: cache}).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as trace:
                for _ in range(steps):
                    token = landmark(token, **{_CACHE_FIELD: cache}).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
            per = steps
            what = "decoding step"
    averages = trace.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=40)
    if args.profile == "prefill":
        table = averages.table(sort_by="self_cpu_time_total", row_limit=25) + "\n" + table
    kernels = [event for event in trace.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(event.device_time for event in kernels) / per / 1e3
    summary = (f"{args.shape}, {path}, prompt {args.lengths[0]}, batch {args.batch}: {len(kernels) // per} kernels "
               f"per {what}, {busy:.2f} ms of kernel time each\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("-prefill" if args.profile == "prefill" else "") + ("-offload" if path == "landmark-offload" else "")
    (out / f"profile-{args.shape}{suffix}.txt").write_text(summary + table)
    print(summary + table)


def report(folders):
    from landmark_llama.tools.report import length_plot

    rows = [row for folder in folders for record in sorted(Path(folder).glob("generate-*.json"))
            for row in json.loads(record.read_text())["rows"]]
    rows.sort(key=lambda r: (r["shape"], r["batch"], r["path"], r["prompt"]))
    out = Path(folders[0])
    (out / "generate.json").write_text(json.dumps({"rows": rows}, indent=1))

    header = ["shape", "batch", "path", "prompt", "prefill s", "ms / new token", "tokens / s", "peak GPU GiB",
              "host GiB", "note"]
    table = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        if "error" in r:
            cells = ["-"] * 5 + [r["error"]]
        else:
            host = "-" if r["host_gib"] is None else f"{r['host_gib']:.1f}"
            tokens_per_s = f"{1e3 * r['batch'] / r['ms_per_token']:.0f}"
            cells = [f"{r['prefill_s']:.2f}", f"{r['ms_per_token']:.1f}", tokens_per_s, f"{r['peak_gib']:.1f}", host,
                     r.get("note", "")]
        table.append("| " + " | ".join([r["shape"], str(r["batch"]), LABELS[r["path"]], str(r["prompt"])] + cells)
                     + " |")
    runs = sorted({(r["date"], r["device"], r["versions"], r["command"]) for r in rows})
    lines = ["# Long-prompt generation", ""] + [f"- {d}, {dev}, {v}: `{c}`" for d, dev, v, c in runs] + ["", *table]
    (out / "generate.md").write_text("\n".join(lines) + "\n")
    for field, label, name in (("ms_per_token", "ms per new token", "ms"), ("peak_gib", "peak GPU GiB", "gib")):
        series = {}
        for r in rows:
            if "error" not in r and r["batch"] == 1:
                series.setdefault(f"{LABELS[r['path']]} ({r['shape']})", {})[r["prompt"]] = r[field]
        length_plot(series, out / f"generate_{name}.png", f"Decode, batch 1: {label}", "prompt tokens", label,
                    log_y=True)
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--report", nargs="+", help="folders of earlier runs to merge into one table and plot")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--warmup_prompt", type=int,
                        help="our paths warm up at this prompt length instead of the timed one (an offloaded 128k "
                             "prefill takes minutes; what it compiles past this length is then timed with it)")
    parser.add_argument("--profile", choices=["decode", "prefill"], help="profile our path instead of timing")
    args = parser.parse_args()
    if args.report:
        report(args.report)
    elif args.profile and args.out:
        profile(args)
    elif args.out:
        run(args)
    else:
        parser.error("pass --out OUT_DIR to run, or --report DIR ... to merge runs")


if __name__ == "__main__":
    main()
