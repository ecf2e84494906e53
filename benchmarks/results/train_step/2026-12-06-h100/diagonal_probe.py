"""Timing probe of 2026-12-06 (kept with its results, not part of the benchmarks): the whole backward with the dK/dV
kernel as shipped and without its masked (diagonal) loop, on each dK/dV tile config, dQ on its first config.

Beside this file: shipped.py (kernels/landmark_attention.py at 657f231) and fastonly.py (the same with
fastonly.patch applied; its results are wrong, only its time counts).

    python diagonal_probe.py OUT.json      # every config at 16 x 520, 4 x 2,080, 1 x 8,320 positions
    python diagonal_probe.py --one         # one backward of each at 4 x 2,080 on 64/64/4/3 (to run under ncu)
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ["LANDMARK_ATTN_AUTOTUNE"] = "0"  # each launch takes the first config of its list: the one set below

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

SHAPES = ((16, 520), (4, 2080), (1, 8320))  # batch, positions (512, 2,048 and 8,192 tokens with block 64's landmarks)


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


def main():
    variants = {name: load(name) for name in ("shipped", "fastonly")}
    if sys.argv[1] == "--one":
        for module in variants.values():
            q, k, v, do = inputs(4, 2080)
            o, lse = module.landmark_attn_fwd(q, k, v, 64)
            module._dkdv_tuned.configs = [module._cfg(64, 64, 4, 3)]
            module.landmark_attn_bwd(do, q, k, v, o, lse, 64)
        torch.cuda.synchronize()
        return
    rows = []
    for batch, n in SHAPES:
        q, k, v, do = inputs(batch, n)
        for module in variants.values():
            configs = module._DKDV_CONFIGS + [module._cfg(64, 64, 4, 4), module._cfg(128, 64, 8, 3)]
            for config in [c for c in configs if c.kwargs["BLOCK_N"] % 64 == 0]:
                module._dkdv_tuned.configs = [config]
                o, lse = module.landmark_attn_fwd(q, k, v, 64)
                ms = do_bench(lambda: module.landmark_attn_bwd(do, q, k, v, o, lse, 64), warmup=10, rep=80,
                              return_mode="median")
                rows.append(dict(variant=module.__name__, batch=batch, n=n, cfg=str(config), ms=ms))
                print(json.dumps(rows[-1]), flush=True)
    Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
