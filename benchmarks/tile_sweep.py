"""Time every candidate tile config of each landmark kernel on its own (the data behind the autotune lists).

    python benchmarks/tile_sweep.py --out OUT_DIR [--shapes 1x8192] [--kv-heads 32 8] [--head-dim 128]

bf16, 32 query heads, block_size 64, every BATCHxLENGTH shape with each key/value head count. For the forward,
the config under test is the only one the autotuner may take; for dK/dV and dQ the other backward kernel keeps
its first listed config, so the backward time moves with the kernel under test alone. Each result
is checked against the default configs' output (relative difference) and the median ms is printed; configs
that do not compile (shared memory, registers) are reported as such. SDPA flash is timed beside (forward, and
backward as fwd+bwd minus fwd). Writes OUT_DIR/tile_sweep.json.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import landmark_llama.kernels.landmark_attention as lk

Q_HEADS, BLOCK_SIZE, DTYPE = 32, 64, torch.bfloat16

# candidates beyond the shipped lists: 16 warps (4 warpgroups, 128 registers a thread) with larger tiles, and wider
# key tiles for head_dim 64 (half the accumulator registers of 128)
EXTRA = {
    "fwd": [lk._cfg(256, 64, 16, 2), lk._cfg(128, 128, 16, 2), lk._cfg(256, 128, 16, 2), lk._cfg(128, 64, 8, 4),
            lk._cfg(128, 128, 4, 3), lk._cfg(64, 128, 4, 3)],
    "dkdv": [lk._cfg(256, 64, 16, 2), lk._cfg(128, 64, 16, 2), lk._cfg(128, 128, 16, 2), lk._cfg(64, 128, 8, 2),
             lk._cfg(256, 64, 16, 1), lk._cfg(64, 128, 16, 2), lk._cfg(128, 64, 8, 1), lk._cfg(64, 128, 4, 2),
             lk._cfg(128, 128, 8, 2), lk._cfg(64, 64, 4, 2)],
    "dq": [lk._cfg(256, 64, 16, 2), lk._cfg(128, 128, 16, 2), lk._cfg(128, 64, 16, 2), lk._cfg(256, 128, 16, 2),
           lk._cfg(128, 128, 8, 2), lk._cfg(64, 128, 4, 3)],
}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def flash_rows(q, k, v, do, shape):
    """SDPA flash on the same inputs: forward, and backward as fwd+bwd minus fwd."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    with torch.no_grad():
        fwd_ms = do_bench(fwd, warmup=10, rep=50, return_mode="median")
    both_ms = do_bench(lambda: fwd().backward(do), warmup=10, rep=50, grad_to_none=[q, k, v], return_mode="median")
    return [dict(kernel="flash-fwd", **shape, ms=fwd_ms), dict(kernel="flash-bwd", **shape, ms=both_ms - fwd_ms)]


def sweep(batch, n, kv_heads, head_dim):
    q, k, v = (torch.randn(batch, h, n, head_dim, device="cuda", dtype=DTYPE) for h in (Q_HEADS, kv_heads, kv_heads))
    do = torch.randn_like(q)
    shape = dict(batch=batch, n=n, kv_heads=kv_heads, head_dim=head_dim)

    tuned = {"fwd": lk._fwd_tuned, "dkdv": lk._dkdv_tuned, "dq": lk._dq_tuned}
    shipped = {name: list(t.configs) for name, t in tuned.items()}
    for name, t in tuned.items():  # reference: the first valid shipped config of each kernel
        t.configs, t.cache = lk._prune(shipped[name], {}, BLOCK_SIZE=BLOCK_SIZE)[:1], {}
    o_ref, lse = lk.landmark_attn_fwd(q, k, v, BLOCK_SIZE)
    grads_ref = lk.landmark_attn_bwd(do, q, k, v, o_ref, lse, BLOCK_SIZE)
    rows = flash_rows(q, k, v, do, shape)
    for row in rows:
        print(json.dumps(row), flush=True)
    for name in ("fwd", "dkdv", "dq"):
        candidates = lk._prune(shipped[name] + EXTRA[name], {}, BLOCK_SIZE=BLOCK_SIZE)
        for cfg in candidates:
            tuned[name].configs, tuned[name].cache = [cfg], {}
            row = dict(kernel=name, **shape, config=str(cfg), shipped=cfg in shipped[name])
            try:
                if name == "fwd":
                    o, _ = lk.landmark_attn_fwd(q, k, v, BLOCK_SIZE)
                    row["rel_diff"] = rel(o, o_ref)
                    row["ms"] = do_bench(lambda: lk.landmark_attn_fwd(q, k, v, BLOCK_SIZE), warmup=10, rep=50,
                                         return_mode="median")
                else:
                    def bwd():
                        return lk.landmark_attn_bwd(do, q, k, v, o_ref, lse, BLOCK_SIZE)

                    row["rel_diff"] = max(rel(a, b) for a, b in zip(bwd(), grads_ref))
                    row["ms"] = do_bench(bwd, warmup=10, rep=50, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        tuned[name].configs, tuned[name].cache = lk._prune(shipped[name], {}, BLOCK_SIZE=BLOCK_SIZE)[:1], {}
    for name, t in tuned.items():
        t.configs, t.cache = shipped[name], {}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["1x8192"], help="BATCHxLENGTH (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [row for shape in args.shapes for kv_heads in args.kv_heads
            for row in sweep(*map(int, shape.split("x")), kv_heads, args.head_dim)]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                command=shlex.join(["python", *sys.argv]))
    (args.out / "tile_sweep.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
