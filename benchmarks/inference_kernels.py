"""Time the inference kernels of one wide prefill pass, or of one decoding step, on their own in each candidate launch
setting (the data behind the settings the kernels ship with).

    python benchmarks/inference_kernels.py --out OUT_DIR [--prompt 32768] [--width 4096] [--kv-heads 32] [--decode]

Llama 2 7B attention (32 query heads of 128, bf16), block 64, top-k 4, stingy positions, a `--prompt`-token cache of
random keys. Prefill: a pass of `--width` internal positions (chunks of 192) at its end. The selection runs on the
kernels (the scoring's query and block tiles and warps swept; its blocks come from random scores: every query picks
its own; the attention reads each retrieved block once for all the queries that picked it); a second table gives
every query of a chunk the same blocks (a trained model's queries agree far more than random ones). `--decode`: two
queries a head and row (`--width` rows), the selection (on the tensor cores or not, scoring tile, programs, register
cap and warps, the top k's blocks a warp) and the spread attention (warps), timed in CUDA graphs as a captured
decoding step runs them. Each setting's output is checked against the first's.
Writes OUT_DIR/prefill_kernels.json or OUT_DIR/decode_kernels.json.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

import landmark_llama.kernels.block_selection as selection
import landmark_llama.kernels.retrieval_attention as retrieval

Q_HEADS, HEAD_DIM, BLOCK_SIZE, TOP_K, CHUNK = 32, 128, 64, 4, 192


def queries_per_block(table, kv_heads):
    """Mean number of (query, head) entries naming each retrieved (key/value head, block): the reuse a block read
    once for all its queries gets."""
    batch, heads, n, k = table.shape
    owner = torch.arange(heads, device=table.device)[None, :, None, None] // (heads // kv_heads)
    named = (owner * table.max().clamp(min=0) + owner + table)[table >= 0]
    return float(named.numel() / max(named.unique().numel(), 1))


def kernel_times(fn, runs=10):
    """{kernel: mean us a call of fn} from the profiler: where a setting's time goes."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as trace:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    return {e.key: round(e.device_time_total / runs, 1) for e in trace.key_averages() if e.device_time_total > 0}


def resources(kernel):
    """Registers, spills and shared memory of each compiled variant of a Triton kernel: what bounds its occupancy."""
    variants = [compiled for cache in getattr(kernel, "device_caches", {}).values() for compiled in cache[0].values()]
    return [dict(registers=getattr(c, "n_regs", None), spills=getattr(c, "n_spills", None),
                 shared=getattr(c.metadata, "shared", None), warps=getattr(c.metadata, "num_warps", None))
            for c in variants]


def record(results, **row):
    """One measured setting: kept for the JSON and printed as it comes."""
    results.append(row)
    print(json.dumps(row), flush=True)


def decode(args, store, results):
    """One decoding step of `--width` rows, two queries a head (a step's token and its landmark slot)."""
    query, keys, values, landmarks, inv_freq, row_start, num_blocks = store
    query = query[:, :, -2:].expand(args.width, -1, -1, -1).contiguous()
    keys, values, landmarks = (t.expand(args.width, *t.shape[1:]) for t in (keys, values, landmarks))
    row_start = row_start.expand(args.width).contiguous()
    scale = HEAD_DIM ** -0.5

    def select():
        return selection.select_blocks(query, landmarks, keys[:, :, :, -1], row_start, num_blocks, BLOCK_SIZE,
                                       TOP_K, True, inv_freq, scale, 1e-5)

    names = ("DECODE_ON_TENSOR_CORES", "DECODE_SCORE_PROGRAMS", "DECODE_SCORE_MAX_REGISTERS")
    one_head = not selection.DECODE_ON_TENSOR_CORES or args.kv_heads == Q_HEADS  # scored on the CUDA cores
    grouped = selection.DECODE_SCORE_TILE, selection.SCORE_WARPS["decoding"]
    tile, warps = selection.ONE_HEAD_DECODE if one_head else grouped
    shipped = (selection.DECODE_ON_TENSOR_CORES, tile, selection.DECODE_SCORE_PROGRAMS,
               selection.DECODE_SCORE_MAX_REGISTERS, warps, selection.TOP_K_BLOCKS_PER_WARP["decoding"])
    module_state = {name: getattr(selection, name) for name in (*names, "DECODE_SCORE_TILE", "ONE_HEAD_DECODE")}
    warps_state = dict(selection.SCORE_WARPS), dict(selection.TOP_K_BLOCKS_PER_WARP)

    def apply(setting):  # (tensor cores, scoring tile, programs, register cap, scoring warps, the top k's per warp)
        on_tensor_cores, tile, programs, cap, warps, per_warp = setting
        for name, value in zip(names, (on_tensor_cores, programs, cap)):
            setattr(selection, name, value)
        selection.DECODE_SCORE_TILE, selection.SCORE_WARPS["decoding"] = tile, warps
        selection.ONE_HEAD_DECODE = (tile, warps)
        selection.TOP_K_BLOCKS_PER_WARP["decoding"] = per_warp

    # the scoring's settings at the shipped top k (first: a head's queries on the CUDA cores, a program a tile), then
    # the top k's at the shipped scoring
    settings = [(False, 32, None, None, 1, shipped[5])]
    settings += [(False, 32, programs, cap, 1, shipped[5]) for programs in (None, 1024, 4096)
                 for cap in (None, 128, 96, 64) if programs or cap]
    settings += [(True, tile, programs, None, warps, shipped[5]) for tile in (32, 64, 128) for warps in (1, 2, 4)
                 for programs in (512, 1024, 4096, None)]
    settings += [(*shipped[:5], per_warp) for per_warp in (128, 256, 512)]
    reference = None
    for setting in settings:
        apply(setting)
        picked = select()
        reference = picked if reference is None else reference
        same = all(torch.equal(a, b) for a, b in zip(picked, reference))
        record(results, kernel="select_blocks", tensor_cores=setting[0], score_tile=setting[1],
               score_programs=setting[2], score_max_registers=setting[3], score_warps=setting[4],
               top_k_blocks_per_warp=setting[5], us=1e3 * do_bench_cudagraph(select), same=same)
    for name, value in module_state.items():  # the shipped settings
        setattr(selection, name, value)
    selection.SCORE_WARPS, selection.TOP_K_BLOCKS_PER_WARP = warps_state
    record(results, kernel="select_blocks", split=kernel_times(select),
           scoring_resources=resources(selection._landmark_scores_kernel))
    selected, valid, starts = reference
    table = torch.where(valid, selected, -1)
    expected = None
    for per_warp in (256, 512, 1024, 2048, 4096):
        retrieval.SPREAD_ELEMENTS_PER_WARP = per_warp

        def attend():
            return retrieval.retrieval_attention(query, keys, values, table, starts, row_start, inv_freq, scale)

        out = attend()
        expected = out if expected is None else expected
        record(results, kernel="retrieval_spread", elements_per_warp=per_warp, us=1e3 * do_bench_cudagraph(attend),
               max_diff=float((out - expected).abs().max()))


def prefill(args, store, results):
    """One wide prefill pass of `--width` positions."""
    query, keys, values, landmarks, inv_freq, row_start, num_blocks = store
    device, scale = query.device, HEAD_DIM ** -0.5

    def select():
        return selection.select_blocks(query, landmarks, keys[:, :, :, -1], row_start, num_blocks, BLOCK_SIZE,
                                       TOP_K, True, inv_freq, scale, 1e-5, CHUNK)

    reference = None
    shipped = selection.TOP_K_BLOCKS_PER_WARP["prefill"]
    for per_warp in (64, 128, 256, 512):
        selection.TOP_K_BLOCKS_PER_WARP["prefill"] = per_warp
        picked = select()
        reference = picked if reference is None else reference
        same = all(torch.equal(a, b) for a, b in zip(picked, reference))
        record(results, kernel="select_blocks", top_k_blocks_per_warp=per_warp,
               ms=do_bench(select, warmup=5, rep=30, return_mode="median"), same=same)
    selection.TOP_K_BLOCKS_PER_WARP["prefill"] = shipped
    record(results, kernel="select_blocks", split=kernel_times(select))

    def select_true_positions():  # no window scores: what the stingy window's rotated products cost
        return selection.select_blocks(query, landmarks, keys[:, :, :, -1], row_start, num_blocks, BLOCK_SIZE,
                                       TOP_K, False, inv_freq, scale, 1e-5, CHUNK)

    record(results, kernel="select_blocks", positions="true", split=kernel_times(select_true_positions))
    shipped = selection.PREFILL_SCORE_TILES, selection.SCORE_WARPS["prefill"]
    for tiles in ((64, 64), (128, 64), (64, 128), (128, 128), (64, 32), (32, 64)):
        for warps in (4, 8):
            selection.PREFILL_SCORE_TILES, selection.SCORE_WARPS["prefill"] = tiles, warps
            try:
                same = all(torch.equal(a, b) for a, b in zip(select(), reference))
            except Exception as error:  # a setting that does not compile (registers, shared memory)
                print(f"  score tiles {tiles} warps {warps}: {type(error).__name__}")
                continue
            record(results, kernel="select_blocks", score_tiles=tiles, score_warps=warps, split=kernel_times(select),
                   ms=do_bench(select, warmup=5, rep=30, return_mode="median"), same=same)
    selection.PREFILL_SCORE_TILES, selection.SCORE_WARPS["prefill"] = shipped
    for kernel in (selection._landmark_scores_kernel, selection._top_blocks_kernel):
        record(results, kernel=kernel.fn.__name__, compiled=resources(kernel))
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
                record(results, kernel="retrieval_tiles", table=name, warps=warps, share_pairs=pairs,
                       ms=do_bench(attend, warmup=5, rep=30, return_mode="median"),
                       max_diff=float((out - expected).abs().max()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--width", type=int, default=None,
                        help="prefill: positions of the pass (default 4096); decode: rows (default 1)")
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--decode", action="store_true", help="a decoding step instead of a prefill pass")
    args = parser.parse_args()
    args.width = args.width or (1 if args.decode else 4096)
    torch.manual_seed(0)
    device, dtype = "cuda", torch.bfloat16
    width = 2 if args.decode else args.width  # a decoding step: its token and landmark slot
    capacity = args.prompt // (BLOCK_SIZE - 1) + 2
    row_start = torch.tensor([(capacity - 1) * BLOCK_SIZE - width], device=device)
    keys = torch.randn(1, capacity, args.kv_heads, BLOCK_SIZE, HEAD_DIM, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    landmarks = keys[:, :, :, -1].contiguous()
    query = torch.randn(1, Q_HEADS, width, HEAD_DIM, device=device, dtype=dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    num_blocks = int(row_start) // BLOCK_SIZE + (width - 1) // CHUNK * CHUNK // BLOCK_SIZE + 1
    results = []
    (decode if args.decode else prefill)(args, (query, keys, values, landmarks, inv_freq, row_start, num_blocks),
                                         results)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, prompt=args.prompt, width=args.width,
                kv_heads=args.kv_heads, command=shlex.join(["python", *sys.argv]))
    name = "decode_kernels.json" if args.decode else "prefill_kernels.json"
    (args.out / name).write_text(json.dumps(dict(meta=meta, results=results), indent=1))


if __name__ == "__main__":
    main()
