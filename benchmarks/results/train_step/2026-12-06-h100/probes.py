"""Probes of 2026-12-06 (kept with their results, not part of the benchmarks). Beside this file: shipped.py
(kernels/landmark_attention.py at 657f231), fastonly.py (the same with fastonly.patch applied: the dK/dV kernel
without its masked loop; wrong results, only its time counts) and fused.py (with tma_dq.patch applied: dQ accumulated
inside the dK/dV kernel by bulk tensor reduce-adds into an fp32 buffer, no dQ kernel).

    python probes.py diagonal OUT.json   # whole backward, shipped and fastonly, on each dK/dV config (dQ on its first)
    python probes.py one                 # one backward of each at 4 x 2,080 on 64/64/4/3 (to run under ncu)
    python probes.py tma_dq OUT.json     # whole backward, shipped (autotuned) and fused on several configs, compared
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

SHAPES = ((16, 520), (4, 2080), (1, 8320))  # batch, positions (512, 2,048 and 8,192 tokens with block 64's landmarks)
FUSED_TILES = ((64, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 1), (128, 64, 8, 3), (64, 64, 4, 4),
               (64, 128, 8, 2))


def load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(batch, n):
    torch.manual_seed(0)
    q = torch.randn(batch, 32, n, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, 8, n, 64, device="cuda", dtype=torch.bfloat16)
    return q, k, torch.randn_like(k), torch.randn_like(q)


def timed(fn):
    return do_bench(fn, warmup=10, rep=80, return_mode="median")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def diagonal(rows):
    variants = [load("shipped"), load("fastonly")]
    for batch, n in SHAPES:
        q, k, v, do = inputs(batch, n)
        for module in variants:
            configs = module._DKDV_CONFIGS + [module._cfg(64, 64, 4, 4), module._cfg(128, 64, 8, 3)]
            for config in [c for c in configs if c.kwargs["BLOCK_N"] % 64 == 0]:
                module._dkdv_tuned.configs = [config]
                o, lse = module.landmark_attn_fwd(q, k, v, 64)
                rows.append(dict(variant=module.__name__, batch=batch, n=n, cfg=str(config),
                                 ms=timed(lambda: module.landmark_attn_bwd(do, q, k, v, o, lse, 64))))
                print(json.dumps(rows[-1]), flush=True)


def one():
    for module in (load("shipped"), load("fastonly")):
        q, k, v, do = inputs(4, 2080)
        o, lse = module.landmark_attn_fwd(q, k, v, 64)
        module._dkdv_tuned.configs = [module._cfg(64, 64, 4, 3)]
        module.landmark_attn_bwd(do, q, k, v, o, lse, 64)
    torch.cuda.synchronize()


def tma_dq(rows):
    os.environ["LANDMARK_ATTN_AUTOTUNE"] = "1"  # the shipped backward on its autotuned tiles
    shipped, fused = load("shipped"), load("fused")
    for batch, n in SHAPES:
        q, k, v, do = inputs(batch, n)
        o, lse = shipped.landmark_attn_fwd(q, k, v, 64)
        reference = shipped.landmark_attn_bwd(do, q, k, v, o, lse, 64)
        rows.append(dict(variant="shipped", batch=batch, n=n,
                         ms=timed(lambda: shipped.landmark_attn_bwd(do, q, k, v, o, lse, 64))))
        print(json.dumps(rows[-1]), flush=True)
        for config in [fused._cfg(*tiles) for tiles in FUSED_TILES]:
            out = fused.landmark_attn_bwd_fused(do, q, k, v, o, lse, 64, config)
            rows.append(dict(variant="fused", batch=batch, n=n, cfg=str(config)[:60],
                             ms=timed(lambda: fused.landmark_attn_bwd_fused(do, q, k, v, o, lse, 64, config)),
                             rel_dq_dk_dv=[rel(a, b) for a, b in zip(out, reference)]))
            print(json.dumps(rows[-1]), flush=True)


def main():
    # the diagonal probe's launches take the first config of each list: the one it sets
    os.environ["LANDMARK_ATTN_AUTOTUNE"] = "0"
    if sys.argv[1] == "one":
        return one()
    rows = []
    {"diagonal": diagonal, "tma_dq": tma_dq}[sys.argv[1]](rows)
    Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
