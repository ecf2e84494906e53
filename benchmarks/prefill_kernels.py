"""Time the inference kernels of one wide prefill pass on their own, in each candidate launch setting (the data behind
the settings the kernels ship with).

    python benchmarks/prefill_kernels.py --out OUT_DIR [--prompt 32768] [--width 4096] [--kv-heads 32]

Llama 2 7B attention (32 query heads of 128, bf16), block 64, top-k 4, stingy positions: a pass of `--width`
internal positions (chunks of 192) at the end of a `--prompt`-token cache of random keys. The selection runs on the
kernels (its blocks come from random scores: every query picks its own; the attention reads each retrieved block
once for all the queries that picked it); a second table gives every query of a chunk the same blocks (a trained
model's queries agree far more than random ones). Each setting's output is checked against the first's.
Writes OUT_DIR/prefill_kernels.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.block_selection as selection  # noqa: E402
import kernels.retrieval_attention as retrieval  # noqa: E402

Q_HEADS, HEAD_DIM, BLOCK_SIZE, TOP_K, CHUNK = 32, 128, 64, 4, 192


def queries_per_block(table, kv_heads):
    """Mean number of (query, head) entries naming each retrieved (key/value head, block): the reuse a block read
    once for all its queries gets."""
    batch, heads, n, k = table.shape
    owner = torch.arange(heads, device=table.device)[None, :, None, None] // (heads // kv_heads)
    named = (owner * table.max().clamp(min=0) + owner + table)[table >= 0]
    return float(named.numel() / max(named.unique().numel(), 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--kv-heads", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = "cuda", torch.bfloat16
    capacity = args.prompt // (BLOCK_SIZE - 1) + 2
    row_start = torch.tensor([(capacity - 1) * BLOCK_SIZE - args.width], device=device)
    keys = torch.randn(1, capacity, args.kv_heads, BLOCK_SIZE, HEAD_DIM, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    landmarks = keys[:, :, :, -1].contiguous()
    query = torch.randn(1, Q_HEADS, args.width, HEAD_DIM, device=device, dtype=dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    num_blocks = int(row_start) // BLOCK_SIZE + (args.width - 1) // CHUNK * CHUNK // BLOCK_SIZE + 1
    scale = HEAD_DIM ** -0.5

    def select():
        return selection.select_blocks(query, landmarks, keys[:, :, :, -1], row_start, num_blocks, BLOCK_SIZE,
                                       TOP_K, True, inv_freq, scale, 1e-5, CHUNK)

    results = []
    reference = None
    for per_warp in (256, 512, 1024, 4096):
        selection.TOP_K_BLOCKS_PER_WARP["prefill"] = per_warp
        picked = select()
        if reference is None:
            reference = picked
        same = all(torch.equal(a, b) for a, b in zip(picked, reference))
        ms = do_bench(select, warmup=5, rep=30, return_mode="median")
        results.append(dict(kernel="select_blocks", top_k_blocks_per_warp=per_warp, ms=ms, same=same))
        print(json.dumps(results[-1]), flush=True)
    selected, valid, starts = reference
    random_table = torch.where(valid, selected, -1)
    # every query of a chunk takes the blocks its chunk's first query took
    chunk_of = torch.arange(args.width, device=device) // CHUNK * CHUNK
    agreeing = random_table[:, :, chunk_of], starts[:, :, chunk_of]
    tables = {"random picks": (random_table, starts), "a chunk's queries agree": agreeing}

    for name, (table, table_starts) in tables.items():
        print(f"{name}: {queries_per_block(table, args.kv_heads):.1f} queries a retrieved block", flush=True)
        expected = None
        for warps in (4, 8):
            for pairs in (16, 32, 64):
                retrieval.TILES_WARPS, retrieval.SHARE_PAIRS = warps, dict(dense=pairs, sparse=pairs)

                def attend():
                    return retrieval.retrieval_attention(query, keys, values, table, table_starts, row_start,
                                                         inv_freq, scale, chunk_length=CHUNK)

                try:
                    out = attend()
                except Exception as error:  # a setting that does not compile (registers, shared memory)
                    print(f"  warps {warps} pairs {pairs}: {type(error).__name__}")
                    continue
                expected = out if expected is None else expected
                ms = do_bench(attend, warmup=5, rep=30, return_mode="median")
                results.append(dict(kernel="retrieval_tiles", table=name, warps=warps, share_pairs=pairs, ms=ms,
                                    max_diff=float((out - expected).abs().max())))
                print(json.dumps(results[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, prompt=args.prompt, width=args.width,
                kv_heads=args.kv_heads, command=" ".join(sys.argv))
    (args.out / "prefill_kernels.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))


if __name__ == "__main__":
    main()
