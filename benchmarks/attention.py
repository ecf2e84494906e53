"""Attention benchmark: the Triton landmark kernel against an eager landmark path and torch SDPA (flash, cuDNN).

    python benchmarks/attention.py --out OUT_DIR [--shapes 16x512 4x2048 1x2048 1x4096 ... 1x32768]

Setting (fixed): bf16, 32 query heads of 128, block_size 64; every batch x length shape with 32 kv heads (MHA) and
with 8 kv heads (GQA 32/8). The default shapes are the fine-tuning ones (16 x 512, 4 x 2k) and batch 1 from 2k to
32k. Each provider is timed with triton.testing.do_bench (median ms, CUDA events) for the
forward and for forward+backward, with its peak memory (torch.cuda.max_memory_allocated above the inputs).

FLOPs (causal attention, the usual convention, landmark attention counted like causal attention):
    forward  = 2 * 2 * batch * q_heads * n^2 * head_dim / 2     (QK^T and PV over the causal half)
    backward = 2.5 * forward                                      (five matrix products instead of two)
    fwd+bwd  = 3.5 * forward
The landmark kernel's own backward runs seven products (dK/dV and dQ recompute the scores), so its TFLOP/s
figure counts useful work, not executed work.

Writes OUT_DIR/attention.md (markdown table), OUT_DIR/attention.json and, with matplotlib, OUT_DIR/attention.png.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import landmark_llama.kernels.landmark_attention as landmark_kernels
from landmark_llama.kernels.landmark_attention import landmark_attention

Q_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 128, 64, torch.bfloat16
SHAPES = ["16x512", "4x2048", "1x2048", "1x4096", "1x8192", "1x16384", "1x32768"]
EAGER_MAX_LEN = 4096  # the eager path keeps [b, h, n, n] fp32 weights: 2 GiB at 4k, 8 GiB at 8k (times a few)


def _load_eager():
    """The model's eager landmark attention (modeling_landmark_llama.landmark_eager_attention), or None where it
    cannot be imported."""
    try:
        from landmark_llama.modeling_landmark_llama import landmark_eager_attention
        return landmark_eager_attention
    except Exception as exc:  # noqa: BLE001 - a missing eager path only drops one column
        print(f"eager landmark attention not available: {exc!r}")
        return None


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel(chosen):
            gqa = q.shape[1] != k.shape[1]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    return run


def make_providers():
    providers = {"landmark-triton": lambda q, k, v: landmark_attention(q, k, v, BLOCK_SIZE)}
    eager = _load_eager()
    if eager is not None:
        scale = 1.0 / math.sqrt(HEAD_DIM)
        providers["landmark-eager"] = lambda q, k, v: eager(q, k, v, BLOCK_SIZE, scale)[0]
    providers["sdpa-flash"] = _sdpa("flash")
    providers["sdpa-cudnn"] = _sdpa("cudnn")
    return providers


def causal_flops(batch, n, mode):
    fwd = 2 * 2 * batch * Q_HEADS * n * n * HEAD_DIM / 2
    return fwd if mode == "fwd" else 3.5 * fwd


def host_ms(step, calls=20):
    """Host time a call takes to enqueue its work (no synchronisation inside the loop): where it exceeds the GPU
    time, the call is bound by Python and launch overhead, and so is do_bench's figure."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def measure(fn, q, k, v, do, mode):
    """Median ms, host ms per call and peak memory (MiB above what was allocated before) of one provider in one
    mode."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v)
    else:
        def step():
            fn(q, k, v).backward(do)

    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    for t in (q, k, v):
        t.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
    return ms, host_ms(step), peak


def parse_shape(text):
    """'16x512' -> (16, 512)."""
    batch, _, n = text.partition("x")
    try:
        return int(batch), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxLENGTH, like 16x512; got {text!r}") from None


def run(shapes):
    providers = make_providers()
    results = []
    for kv_heads in (Q_HEADS, 8):
        for batch, n in shapes:
            q, k, v = (torch.randn(batch, h, n, HEAD_DIM, device="cuda", dtype=DTYPE).requires_grad_()
                       for h in (Q_HEADS, kv_heads, kv_heads))
            do = torch.randn_like(q)
            for name, fn in providers.items():
                if name == "landmark-eager" and batch * n > EAGER_MAX_LEN:
                    continue
                for mode in ("fwd", "fwd+bwd"):
                    row = dict(provider=name, kv_heads=kv_heads, batch=batch, n=n, mode=mode)
                    try:
                        ms, host, peak = measure(fn, q, k, v, do, mode)
                        row.update(ms=ms, host_ms=host, tflops=causal_flops(batch, n, mode) / ms * 1e-9,
                                   peak_mib=peak)
                    except Exception as exc:  # noqa: BLE001 - an unsupported backend is reported, not fatal
                        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    torch.cuda.empty_cache()
                    results.append(row)
                    print(json.dumps(row), flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()
    return results


def tuned_configs():
    out = {}
    for name, tuned in (("fwd", landmark_kernels._fwd_tuned), ("dkdv", landmark_kernels._dkdv_tuned),
                        ("dq", landmark_kernels._dq_tuned)):
        out[name] = {str(key): str(cfg) for key, cfg in getattr(tuned, "cache", {}).items()}
    return out


def write(results, out_dir, command):
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=command,
        setting=f"{DTYPE}, {Q_HEADS} q heads of {HEAD_DIM}, block_size {BLOCK_SIZE}",
        autotuned=tuned_configs(),
    )
    (out_dir / "attention.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))

    lines = [f"# Attention benchmark on {meta['device']}", "",
             f"- torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, {meta['date']}",
             f"- setting: {meta['setting']}; causal FLOPs: fwd = 4*b*h*n^2*d/2, fwd+bwd = 3.5 x fwd",
             f"- command: `{command}`", ""]
    providers = list(dict.fromkeys(r["provider"] for r in results))
    for kv_heads in sorted({r["kv_heads"] for r in results}, reverse=True):
        title = "MHA 32/32" if kv_heads == Q_HEADS else f"GQA {Q_HEADS}/{kv_heads}"
        for mode in ("fwd", "fwd+bwd"):
            lines += [f"## {title}, {mode}: median ms / TFLOP/s / peak MiB / host ms a call", "",
                      "| batch x n | " + " | ".join(providers) + " |", "|---:|" + "---:|" * len(providers)]
            for batch, n in sorted({(r["batch"], r["n"]) for r in results}, key=lambda shape: (shape[1], -shape[0])):
                cells = []
                for p in providers:
                    row = next((r for r in results if (r["provider"], r["kv_heads"], r["batch"], r["n"], r["mode"])
                                == (p, kv_heads, batch, n, mode)), None)
                    if row is None:
                        cells.append("-")
                    elif "error" in row:
                        cells.append("n/a")
                    else:
                        cells.append(f"{row['ms']:.3f} / {row['tflops']:.0f} / {row['peak_mib']:.0f} / "
                                     f"{row['host_ms']:.3f}")
                lines.append(f"| {batch} x {n} | " + " | ".join(cells) + " |")
            lines.append("")
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["Not measured:", ""] + [f"- {r['provider']} {r['mode']} {r['batch']}x{r['n']} kv={r['kv_heads']}: "
                                          f"{r['error']}" for r in errors] + [""]
    lines += ["Autotuned configs (key: head_dim, block_size, kv_group, dtypes):", ""]
    for name, cfgs in meta["autotuned"].items():
        for key, cfg in cfgs.items():
            lines.append(f"- {name} {key}: {cfg}")
    (out_dir / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for p in providers:
            for kv_heads, style in ((Q_HEADS, "-"), (8, "--")):
                pts = sorted((r["n"], r["tflops"]) for r in results if r["provider"] == p and r["mode"] == mode
                             and r["kv_heads"] == kv_heads and r["batch"] == 1 and "tflops" in r)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{p} kv={kv_heads}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}, {meta['device']}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "attention.png", dpi=120)


def profile_host(path, calls=50):
    """Where the host time of a small landmark forward+backward goes: the two launchers called from this thread
    (the autograd engine runs backward on a thread of its own, which cProfile does not follow), by own time."""
    import cProfile
    import io
    import pstats

    q, k, v = (torch.randn(1, h, 2048, HEAD_DIM, device="cuda", dtype=DTYPE) for h in (Q_HEADS, 8, 8))
    do = torch.randn_like(q)

    def launchers():
        o, lse = landmark_kernels.landmark_attn_fwd(q, k, v, BLOCK_SIZE)
        landmark_kernels.landmark_attn_bwd(do, q, k, v, o, lse, BLOCK_SIZE)

    launchers()
    per_call = host_ms(launchers, calls)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        launchers()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    text.write(f"landmark_attn_fwd + landmark_attn_bwd, 1 x 2048, GQA 32/8: {per_call:.3f} host ms a call\n")
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    path.write_text(text.getvalue())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for attention.md/.json/.png")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in SHAPES],
                        help="BATCHxLENGTH shapes (default: %(default)s)")
    parser.add_argument("--host-profile", action="store_true",
                        help="cProfile 50 landmark forward+backward calls at 1 x 2k, GQA: OUT_DIR/host_profile.txt")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    command = shlex.join(["python", *sys.argv])
    results = run(args.shapes)
    write(results, args.out, command)
    if args.host_profile:
        profile_host(args.out / "host_profile.txt")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")
    main()
