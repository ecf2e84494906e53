"""Probe of 2026-12-06 (kept with its results, not part of the benchmarks): the whole backward as shipped (autotuned)
against dQ accumulated inside the dK/dV kernel by bulk tensor (TMA) reduce-adds into an fp32 buffer, no dQ kernel,
on several tile configs; each fused result is compared with the shipped one.

Beside this file: shipped.py (kernels/landmark_attention.py at 657f231) and fused.py (the same with tma_dq.patch
applied, which adds `landmark_attn_bwd_fused`).

    python tma_dq_probe.py OUT.json
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

SHAPES = ((16, 520), (4, 2080), (1, 8320))  # batch, positions (512, 2,048 and 8,192 tokens with block 64's landmarks)


def load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    shipped, fused = load("shipped"), load("fused")
    configs = [fused._cfg(*tiles) for tiles in ((64, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 1),
                                                (128, 64, 8, 3), (64, 64, 4, 4), (64, 128, 8, 2))]
    rows = []
    for batch, n in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(batch, 32, n, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, 8, n, 64, device="cuda", dtype=torch.bfloat16)
        v, do = torch.randn_like(k), torch.randn_like(q)
        o, lse = shipped.landmark_attn_fwd(q, k, v, 64)
        reference = shipped.landmark_attn_bwd(do, q, k, v, o, lse, 64)
        ms = do_bench(lambda: shipped.landmark_attn_bwd(do, q, k, v, o, lse, 64), warmup=10, rep=80,
                      return_mode="median")
        rows.append(dict(variant="shipped", batch=batch, n=n, ms=ms))
        print(json.dumps(rows[-1]), flush=True)
        for config in configs:
            out = fused.landmark_attn_bwd_fused(do, q, k, v, o, lse, 64, config)
            ms = do_bench(lambda: fused.landmark_attn_bwd_fused(do, q, k, v, o, lse, 64, config), warmup=10, rep=80,
                          return_mode="median")
            rows.append(dict(variant="fused", batch=batch, n=n, cfg=str(config)[:60], ms=ms,
                             rel_dq_dk_dv=[rel(a, b) for a, b in zip(out, reference)]))
            print(json.dumps(rows[-1]), flush=True)
    Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
