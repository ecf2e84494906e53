"""Block selection of the block-retrieval cache as Triton kernels: each query's landmark scores, its top k blocks with
the cache's tie rule, and the positions the retrieval assigns them (`select_blocks`, per-token retrieval); or, for
per-chunk retrieval (`select_chunk_blocks`), the top k of each block's highest softmax probability among the chunk's
queries.

Paper: A. Mohtashami and M. Jaggi, NeurIPS 2023, arXiv:2305.16300, section 3.2 (3.2.1 for stingy positions).

It computes what `cache_landmark_llama.LandmarkCacheLayer.retrieve` computes with PyTorch for
`retrieval_granularity="token"`, in two launches instead of some forty small kernels a layer:
  * score of complete block c for a query q: <q, landmark of c at its true position> * scale; with stingy positions
    the blocks older than the row's k most recent are scored at the landmark slot of the stingy window's first
    block: <q rotated back by the window's start, landmark rotated by its offset alone> * scale;
  * the k highest in block order, where scores within `tie_tolerance` times the row's largest magnitude of the k-th
    highest count as equal to it and the earliest of them fill the places left (`top_blocks`);
  * stingy starts: older picks packed from the window's left, recent ones one block further right; true starts:
    the block's own.

A wide prefill pass selects for several chunks of `chunk_length` queries at once: each query among the blocks
complete at its own chunk's start, with that chunk's stingy window, as if each chunk ran as a pass of its own.

Layout. Two kernels, so that a decoding step (two queries a head) still spreads over the GPU:
  * scores: one program per tile of queries of one head (or of the heads of a key/value group) and tile of blocks.
    The queries of a tile share each landmark key they load (a prefill chunk's 16), and each block is read from the
    one store that scores it; the scores go to a scratch row per query and head. A decoding step's programs may each
    loop over several tiles of blocks.
  * top k: one program per scratch row. The scoring also wrote each query's highest score and largest magnitude
    a tile; the k tiles of the highest maxima hold k scores at least the k-th of those maxima, so every pick and
    every tie lies in a tile whose maximum reaches it less the tie margin. Those tiles' scores, in block order and
    held in registers (a group of them at a time where near ties make many), give the k-th highest by k counting
    passes, then the blocks above it and the ties in block order.
Per-chunk selection puts two kernels between them: each real query's softmax normaliser over its scratch row, then
each block's highest probability among the chunk's queries, written as one row per head with its tile maxima.
Scores are as exact as fp32 products, like the PyTorch selection's: summed on the CUDA cores (a decoding step of
MHA); on the tensor cores (a prefill pass, a decoding step of grouped heads), 16-bit keys against 16-bit queries as
they are (exact products) and against fp32 (rotated) queries in three 16-bit parts, fp32 keys through 3xTF32.
"""

import torch

try:  # guarded like landmark_attention.py: the remote-code import check must not demand Triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("block_selection needs Triton (pip install triton); the eager path works without it."
                      ) from error

from .landmark_attention import _dot, _interpreting  # tl.dot as the training kernel runs it, interpreter included
from .retrieval_attention import _chunk_first_block, _cos_sin, _turn  # as the attention kernel computes them

__all__ = ["select_blocks", "select_chunk_blocks"]

# the top k of a row reads the score tiles that can hold its picks in groups of at least this many blocks (at least
# twice k tiles), the first held in registers: one group in all but rows of near ties
CANDIDATE_BLOCKS = 512
# the top k of a row takes a warp per this many blocks of a group, 1 to 8 (benchmarks/inference_kernels.py, the 7B
# shape at 128k: a prefill pass's selection 2.68 ms at 512, 2.81 at 256, 3.92 at 64; a decoding step's 16.7 us a layer
# at 256, 16.3-17.8 from 64 to 512)
TOP_K_BLOCKS_PER_WARP = dict(decoding=256, prefill=512)
# a decoding step scores tiles of this many blocks a program; a scoring program's warps (inference_kernels.py
# --decode, Llama 3 8B attention on an H100, 2026-12-06: selection 12.0 / 21.3 us a layer at 32k / 512k with a group's
# heads on the tensor cores in tiles of 64 and 2 warps, against 15.8 / 73.5 with one head's on the CUDA cores in tiles
# of 32 and 1 warp; tiles of 32 or 128, 1 or 4 warps, fewer looping programs and register caps were slower)
DECODE_SCORE_TILE = 64
SCORE_WARPS = dict(decoding=2, prefill=4)
# (tile of blocks, warps) of a decoding step that scores one head's queries on the CUDA cores (MHA, or tensor cores
# off), also the warps of passes of 3-15 queries (the 7B shape at 128k, 2026-12-03: 16.7 us a layer at (32, 1), 18.3 at
# tiles of 64, 22.4 at 4 warps)
ONE_HEAD_DECODE = (32, 1)
# a prefill pass (at least 64 queries) scores tiles of this many queries of a head against this many blocks
PREFILL_SCORE_TILES = (64, 64)
# a decoding step of grouped heads (GQA) scores the heads of a key/value group together on the tensor cores; a step
# of MHA scores one head's queries on the CUDA cores. At most DECODE_SCORE_PROGRAMS scoring programs in all, each
# looping over tiles of blocks (None: a program a tile), and a cap on their registers a thread: candidates the sweep
# measures (neither helped)
DECODE_ON_TENSOR_CORES = True
DECODE_SCORE_PROGRAMS = None
DECODE_SCORE_MAX_REGISTERS = None
# per-chunk selection reads score rows this many blocks a step (a power of two): a query's normaliser, then the
# blocks' highest probability, a program a slice of this many blocks of a row
CHUNK_WIDE_BLOCKS = 1024
# sizes that change with the prompt and the pass, never specialised on (a new prompt length compiles nothing new)
SCORE_SIZES = ["q_heads", "n", "chunk_length", "num_blocks", "top_k"]


# ---------------------------------------------------------------------------------------------------------
# Layer 1: the Triton kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _fp32_scores(a1, a2, b1, b2, USE_DOT: tl.constexpr, SPLIT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """fp32 queries [BLOCK_M, DK] (both halves) against landmark keys [TILE, DK] -> [BLOCK_M, TILE] fp32, as exact
    as fp32 products: on the CUDA cores, or on the tensor cores with 16-bit keys against the queries in three 16-bit
    parts (SPLIT: each product exact, 24 bits of the query kept) or fp32 keys through 3xTF32."""
    if USE_DOT:
        if SPLIT:
            hi1, hi2 = a1.to(b1.dtype), a2.to(b1.dtype)
            rest1, rest2 = a1 - hi1.to(tl.float32), a2 - hi2.to(tl.float32)
            mid1, mid2 = rest1.to(b1.dtype), rest2.to(b1.dtype)
            lo1, lo2 = (rest1 - mid1.to(tl.float32)).to(b1.dtype), (rest2 - mid2.to(tl.float32)).to(b1.dtype)
            score = _native_scores(hi1, hi2, b1, b2, UPCAST_DOT)
            score += _native_scores(mid1, mid2, b1, b2, UPCAST_DOT)
            score += _native_scores(lo1, lo2, b1, b2, UPCAST_DOT)
        else:
            score = (_dot(a1, tl.trans(b1), "tf32x3", False) + _dot(a2, tl.trans(b2), "tf32x3", False))
    else:
        b1, b2 = b1.to(tl.float32), b2.to(tl.float32)
        score = tl.sum(a1[:, None, :] * b1[None, :, :], 2) + tl.sum(a2[:, None, :] * b2[None, :, :], 2)
    return score


@triton.jit
def _native_scores(a1, a2, b1, b2, UPCAST_DOT: tl.constexpr):
    """16-bit queries against 16-bit keys on the tensor cores: exact products, fp32 sums."""
    return _dot(a1, tl.trans(b1), "tf32", UPCAST_DOT) + _dot(a2, tl.trans(b2), "tf32", UPCAST_DOT)


@triton.jit(do_not_specialize=SCORE_SIZES)
def _landmark_scores_kernel(
    q, landmarks, in_block, row_start, inv_freq, scratch, tile_stats,
    stride_qb, stride_qh, stride_qn,
    stride_lb, stride_lc, stride_lh,
    stride_ib, stride_ic, stride_ih,
    q_heads, n, chunk_length, num_blocks, top_k, scale, row_stride, stats_stride, stats_rows,
    KV_GROUP: tl.constexpr, HEADS: tl.constexpr, STINGY: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr, DK: tl.constexpr, USE_DOT: tl.constexpr,
    SPLIT: tl.constexpr, NATIVE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, LOOP_TILES: tl.constexpr,
):
    """Scores of a tile of BLOCK_M (query, head) rows against tiles of TILE blocks -> scratch rows of `row_stride`
    (num_blocks rounded up to a multiple of 16, so that the rows stay aligned for vector stores and loads whatever
    the block count), and each row's highest score and largest magnitude in each tile -> tile_stats [2, rows,
    stats_stride]. The rows are BLOCK_M // HEADS queries of HEADS heads that share a key/value head (a decoding
    step's few queries: the heads share each landmark key they load). Only a query's complete blocks are written: the
    top k reads no further."""
    QUERIES: tl.constexpr = BLOCK_M // HEADS
    i_b = tl.program_id(2) // (q_heads // HEADS)
    first_head = tl.program_id(2) % (q_heads // HEADS) * HEADS
    i_kv = first_head // KV_GROUP
    tile = tl.arange(0, BLOCK_M)
    rows = tl.program_id(0) * QUERIES + tile % QUERIES
    row_in = rows < n
    # complete blocks each query selects among: those before the start of its chunk
    complete = tl.where(row_in, _chunk_first_block(tl.load(row_start + i_b), rows, chunk_length, BLOCK_SIZE), 0)
    most = tl.max(complete, 0)
    if HEADS == 1:  # one head's queries: its offsets are scalars
        head = first_head
        p_q = q + i_b.to(tl.int64) * stride_qb + head * stride_qh + rows[:, None].to(tl.int64) * stride_qn
    else:
        head = first_head + tile // QUERIES
        p_q = q + i_b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + rows[:, None].to(tl.int64) * stride_qn
    row_head = i_b * q_heads + head  # each row's head among all rows' (batch, head)
    if LOOP_TILES:  # tiles j, j + the programs of axis 1, ... for its program j
        for i_t in range(tl.program_id(1), tl.cdiv(most, TILE), tl.num_programs(1)):
            _score_tile(i_t, p_q, landmarks, in_block, inv_freq, scratch, tile_stats, i_b, i_kv, row_head, n, rows,
                        row_in, complete, most, stride_lb, stride_lc, stride_lh, stride_ib, stride_ic, stride_ih,
                        num_blocks, top_k, scale, row_stride, stats_stride, stats_rows, STINGY, BLOCK_SIZE, HALF,
                        BLOCK_M, TILE, DK, USE_DOT, SPLIT, NATIVE_DOT, UPCAST_DOT)
    elif tl.program_id(1) * TILE < most:  # tile j for program j (a prefill pass: straight-line code spills less)
        _score_tile(tl.program_id(1), p_q, landmarks, in_block, inv_freq, scratch, tile_stats, i_b, i_kv, row_head,
                    n, rows, row_in, complete, most, stride_lb, stride_lc, stride_lh, stride_ib, stride_ic, stride_ih,
                    num_blocks, top_k, scale, row_stride, stats_stride, stats_rows, STINGY, BLOCK_SIZE, HALF, BLOCK_M,
                    TILE, DK, USE_DOT, SPLIT, NATIVE_DOT, UPCAST_DOT)


@triton.jit
def _score_tile(
    i_t, p_q, landmarks, in_block, inv_freq, scratch, tile_stats, i_b, i_kv, row_head, n, rows, row_in, complete,
    most, stride_lb, stride_lc, stride_lh, stride_ib, stride_ic, stride_ih, num_blocks, top_k, scale, row_stride,
    stats_stride, stats_rows, STINGY: tl.constexpr, BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE: tl.constexpr, DK: tl.constexpr, USE_DOT: tl.constexpr, SPLIT: tl.constexpr,
    NATIVE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Tile i_t of blocks of `_landmark_scores_kernel`'s rows, which some row has."""
    first = i_t * TILE
    c = first + tl.arange(0, TILE)
    recent_from = complete - tl.minimum(complete, top_k)  # blocks before it are older than the k most recent
    exists = c[None, :] < complete[:, None]
    if STINGY:
        recent = exists & (c[None, :] >= recent_from[:, None])
        older = c[None, :] < recent_from[:, None]
        window_start = ((recent_from - 1) * BLOCK_SIZE)[:, None]
        older_bound = tl.max(recent_from, 0)  # no query of the tile scores an older block from here on
        any_older = first < older_bound
        least_recent = tl.min(tl.where(row_in, recent_from, most), 0)
        # the queries of a tile within one chunk share its window: one angle a dimension, not one a query
        most_recent = tl.max(tl.where(row_in, recent_from, 0), 0)
        one_window = least_recent == most_recent
        shared_start = (most_recent - 1) * BLOCK_SIZE
    else:  # every complete block is scored at its true position
        recent = exists
        least_recent = 0
    any_recent = first + TILE > least_recent  # some query of the tile scores a block of it at its true position
    recent_any = (c < most) & (c >= least_recent)
    p_l = landmarks + i_b.to(tl.int64) * stride_lb + i_kv * stride_lh + c[:, None].to(tl.int64) * stride_lc
    p_i = in_block + i_b.to(tl.int64) * stride_ib + i_kv * stride_ih + c[:, None].to(tl.int64) * stride_ic

    # a block is scored by one landmark key per query: true-position and window products apart, then picked
    true_score = tl.zeros([BLOCK_M, TILE], dtype=tl.float32)
    window_score = tl.zeros([BLOCK_M, TILE], dtype=tl.float32)
    for d0 in range(0, HALF, DK):  # the dimensions in slices, as [BLOCK_M, TILE, DK] products
        d = d0 + tl.arange(0, DK)
        in_half = d < HALF
        q_mask = row_in[:, None] & in_half[None, :]
        q1 = tl.load(p_q + d[None, :], mask=q_mask, other=0.0)
        q2 = tl.load(p_q + HALF + d[None, :], mask=q_mask, other=0.0)
        if any_recent:
            mask = recent_any[:, None] & in_half[None, :]
            l1 = tl.load(p_l + d[None, :], mask=mask, other=0.0)
            l2 = tl.load(p_l + HALF + d[None, :], mask=mask, other=0.0)
            if NATIVE_DOT:  # queries in the keys' 16-bit dtype: exact products as they are
                true_score += _native_scores(q1, q2, l1, l2, UPCAST_DOT)
            else:
                true_score += _fp32_scores(q1.to(tl.float32), q2.to(tl.float32), l1, l2, USE_DOT, SPLIT,
                                           UPCAST_DOT)
        if STINGY:
            if any_older:  # the tile holds older blocks, scored in each query's window
                freq = tl.load(inv_freq + d, mask=in_half, other=0.0)[None, :]
                if one_window:
                    cos, sin = _cos_sin(-(shared_start * 1.0) * freq)
                    cos, sin = tl.broadcast_to(cos, [BLOCK_M, DK]), tl.broadcast_to(sin, [BLOCK_M, DK])
                else:
                    cos, sin = _cos_sin(-(window_start * 1.0) * freq)
                r1, r2 = _turn(q1.to(tl.float32), q2.to(tl.float32), cos, sin)
                mask = (c < older_bound)[:, None] & in_half[None, :]
                i1 = tl.load(p_i + d[None, :], mask=mask, other=0.0)
                i2 = tl.load(p_i + HALF + d[None, :], mask=mask, other=0.0)
                window_score += _fp32_scores(r1, r2, i1, i2, USE_DOT, SPLIT, UPCAST_DOT)
    if STINGY:
        score = tl.where(recent, true_score, tl.where(older, window_score, -float("inf")))
    else:
        score = tl.where(recent, true_score, -float("inf"))
    score = score * scale
    row = row_head.to(tl.int64) * n + rows  # the scratch row of each
    tl.store(scratch + row[:, None] * row_stride + c[None, :], score,
             mask=row_in[:, None] & (c < num_blocks)[None, :])
    # the tile's highest score and largest magnitude a query: where the top k looks, and its tie margin
    p_stats = tile_stats + row * stats_stride + i_t
    tl.store(p_stats, tl.max(score, 1), mask=row_in)
    tl.store(p_stats + stats_rows * stats_stride, tl.max(tl.where(score == -float("inf"), 0.0, tl.abs(score)), 1),
             mask=row_in)


@triton.jit
def _max_and_count(value_a, count_a, value_b, count_b):
    """Combine of a reduction to (the highest value, the weight it carries): one pass instead of a max and a sum."""
    value = tl.maximum(value_a, value_b)
    count = tl.where(value_a == value_b, count_a + count_b, tl.where(value_a > value_b, count_a, count_b))
    return value, count


@triton.jit
def _highest_below(score, weight, below, ONE_PASS: tl.constexpr):
    """(the highest score under `below`, the weight of the scores equal to it): in one reduction, or (ONE_PASS off,
    for the interpreter, which runs a reduction of a jit function element by element in Python) a max and a sum."""
    score = tl.where(score < below, score, -float("inf"))
    if ONE_PASS:
        return tl.reduce((score, weight.to(tl.int32)), 0, _max_and_count)
    highest = tl.max(score, 0)
    return highest, tl.sum(tl.where(score == highest, weight.to(tl.int32), 0), 0)


@triton.jit
def _kth_highest(score, weight, k, ONE_PASS: tl.constexpr):
    """The k-th highest of the weighted scores, duplicates counted (as topk's values); -inf where fewer than k."""
    cutoff = -float("inf")
    below = float("inf")
    remaining = k
    for _ in range(0, k):
        value, count = _highest_below(score, weight, below, ONE_PASS)
        cutoff = tl.where(remaining > 0, value, cutoff)
        remaining -= count
        below = value
    return cutoff


@triton.jit
def _candidate_group(p_scratch, limit, rank, candidate, n_candidates, tiles, group,
                     GROUP_TILES: tl.constexpr, TILE: tl.constexpr):
    """The scores of a row's candidate score tiles group*GROUP_TILES onwards, GROUP_TILES of them, flat in block
    order: (scores, block indices, whether each is one of the row's blocks)."""
    wanted = group * GROUP_TILES + tl.arange(0, GROUP_TILES) + 1  # the candidates' ranks
    tile_of = tl.sum(tl.where((rank[None, :] == wanted[:, None]) & candidate[None, :], tiles[None, :], 0), 1)
    block = tile_of[:, None] * TILE + tl.arange(0, TILE)[None, :]
    exists = (wanted <= n_candidates)[:, None] & (block < limit)
    score = tl.load(p_scratch + block, mask=exists, other=-float("inf"))
    return (tl.reshape(score, [GROUP_TILES * TILE]), tl.reshape(block, [GROUP_TILES * TILE]),
            tl.reshape(exists, [GROUP_TILES * TILE]))


@triton.jit
def _held_or_group(p_scratch, limit, rank, candidate, n_candidates, tiles, group, held_score, held_block,
                   held_exists, GROUP_TILES: tl.constexpr, TILE: tl.constexpr):
    """A group of candidates: the one held in registers when the row has one."""
    if n_candidates <= GROUP_TILES:
        score, block, exists = held_score, held_block, held_exists
    else:
        score, block, exists = _candidate_group(p_scratch, limit, rank, candidate, n_candidates, tiles, group,
                                                GROUP_TILES, TILE)
    return score, block, exists


@triton.jit(do_not_specialize=["rows_per_batch", "n", "chunk_length", "num_blocks", "k", "top_k"])
def _top_blocks_kernel(
    scratch, tile_stats, row_start, selected, valid, starts,
    rows_per_batch, n, chunk_length, num_blocks, k, top_k, tie_tolerance, row_stride, stats_stride, stats_rows,
    STINGY: tl.constexpr, BLOCK_SIZE: tl.constexpr, K_PAD: tl.constexpr, TILE: tl.constexpr,
    NUM_TILES: tl.constexpr, GROUP_TILES: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """The top k of one scratch row with the tie rule, and the starts, read from the score tiles that can hold
    them: those whose highest score reaches the k-th highest tile maximum less the tie margin (the k tiles of the
    highest maxima hold k scores at least that high, so every pick and tie lies in such a tile)."""
    row = tl.program_id(0).to(tl.int64)
    complete = _chunk_first_block(tl.load(row_start + row // rows_per_batch), row % n, chunk_length, BLOCK_SIZE)
    limit = tl.minimum(complete, num_blocks)  # the row's scores: its complete blocks
    recent_from = complete - tl.minimum(complete, top_k)
    window_start = (recent_from - 1) * BLOCK_SIZE
    p_scratch = scratch + row * row_stride

    # 1. the tie margin (the largest magnitude of the row's scores) and the candidate tiles, from the tiles' maxima
    tiles = tl.arange(0, NUM_TILES)
    tile_exists = tiles * TILE < limit
    p_stats = tile_stats + row * stats_stride + tiles
    tile_max = tl.load(p_stats, mask=tile_exists, other=-float("inf"))
    margin = tie_tolerance * tl.max(tl.load(p_stats + stats_rows * stats_stride, mask=tile_exists, other=0.0), 0)
    candidate = tile_exists & (tile_max >= _kth_highest(tile_max, tile_exists, k, ONE_PASS) - margin)
    rank = tl.cumsum(candidate.to(tl.int32), 0)
    n_candidates = tl.sum(candidate.to(tl.int32), 0)
    groups = tl.cdiv(n_candidates, GROUP_TILES)
    held_score, held_block, held_exists = _candidate_group(p_scratch, limit, rank, candidate, n_candidates, tiles, 0,
                                                           GROUP_TILES, TILE)

    # 2. the k-th highest score, duplicates counted: the highest values one at a time, with their counts
    cutoff = -float("inf")
    below = float("inf")
    remaining = k
    for _ in range(0, k):
        value = -float("inf")
        count = 0
        for group in range(0, groups):
            score, block, exists = _held_or_group(p_scratch, limit, rank, candidate, n_candidates, tiles, group,
                                                  held_score, held_block, held_exists, GROUP_TILES, TILE)
            group_max, group_count = _highest_below(score, exists, below, ONE_PASS)
            count = tl.where(group_max > value, group_count, tl.where(group_max == value, count + group_count, count))
            value = tl.maximum(value, group_max)
        cutoff = tl.where(remaining > 0, value, cutoff)
        remaining -= count
        below = value

    # 3. how many are above the tie band
    above_count = 0
    for group in range(0, groups):
        score, block, exists = _held_or_group(p_scratch, limit, rank, candidate, n_candidates, tiles, group,
                                              held_score, held_block, held_exists, GROUP_TILES, TILE)
        above_count += tl.sum((score > cutoff + margin).to(tl.int32), 0)

    # 4. blocks above, and the earliest ties in the places left, in block order
    slot = tl.arange(0, K_PAD)
    p_out = row * k + slot
    tl.store(selected + p_out, tl.zeros([K_PAD], dtype=tl.int64), mask=slot < k)
    tl.debug_barrier()
    ties_seen = 0
    chosen_count = 0
    for group in range(0, groups):
        score, block, exists = _held_or_group(p_scratch, limit, rank, candidate, n_candidates, tiles, group,
                                              held_score, held_block, held_exists, GROUP_TILES, TILE)
        above = score > cutoff + margin
        tied = tl.abs(score - cutoff) <= margin  # false where both are -inf (NaN)
        chosen = above | (tied & (ties_seen + tl.cumsum(tied.to(tl.int32), 0) <= k - above_count))
        place = chosen_count + tl.cumsum(chosen.to(tl.int32), 0)
        tl.store(selected + row * k + place - 1, block.to(tl.int64), mask=chosen)
        ties_seen += tl.sum(tied.to(tl.int32), 0)
        chosen_count += tl.sum(chosen.to(tl.int32), 0)
    tl.debug_barrier()

    # 5. validity and the positions the retrieval assigns
    picked = tl.load(selected + p_out, mask=slot < k, other=0)
    tl.store(valid + p_out, slot < chosen_count, mask=slot < k)
    if STINGY:
        start = window_start + (slot + (picked >= recent_from).to(tl.int64)) * BLOCK_SIZE
    else:
        start = picked * BLOCK_SIZE
    tl.store(starts + p_out, start, mask=slot < k)


@triton.jit(do_not_specialize=["q_heads", "n", "num_blocks"])
def _query_norms_kernel(scratch, row_start, lengths, norms, q_heads, n, num_blocks, row_stride,
                        BLOCK_SIZE: tl.constexpr, WIDE: tl.constexpr):
    """Per-chunk selection, a real query's scratch row: the highest score and the sum of exponentials over the
    chunk's complete blocks (its softmax's normaliser) -> norms[row]."""
    row = tl.program_id(0).to(tl.int64)
    i_b = row // (q_heads * n)
    if row % n < tl.minimum(tl.load(lengths + i_b), n):
        complete = tl.minimum(tl.load(row_start + i_b) // BLOCK_SIZE, num_blocks)
        p_row = scratch + row * row_stride + tl.arange(0, WIDE)
        top = tl.full([WIDE], -float("inf"), tl.float32)
        for j in range(0, complete, WIDE):
            inside = j + tl.arange(0, WIDE) < complete
            top = tl.maximum(top, tl.load(p_row + j, mask=inside, other=-float("inf")))
        highest = tl.max(top, 0)
        total = tl.zeros([WIDE], tl.float32)
        for j in range(0, complete, WIDE):
            inside = j + tl.arange(0, WIDE) < complete
            total += tl.where(inside, tl.exp(tl.load(p_row + j, mask=inside, other=0.0) - highest), 0.0)
        tl.store(norms + 2 * row, highest)
        tl.store(norms + 2 * row + 1, tl.sum(total, 0))


@triton.jit(do_not_specialize=["q_heads", "n", "num_blocks"])
def _chunk_probabilities_kernel(
    scratch, row_start, lengths, norms, chunk_scores, chunk_stats,
    q_heads, n, num_blocks, row_stride, stats_stride, stats_rows,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, WIDE: tl.constexpr,
):
    """Per-chunk selection, blocks program_id(1) * WIDE onwards of row (batch, head) program_id(0): each block's
    highest softmax probability among the chunk's real queries (their n scratch rows) -> chunk_scores; each tile's
    highest and largest magnitude -> chunk_stats, as the scoring kernel writes them for the top k."""
    row = tl.program_id(0).to(tl.int64)
    i_b = row // q_heads
    complete = tl.minimum(tl.load(row_start + i_b) // BLOCK_SIZE, num_blocks)
    first = tl.program_id(1) * WIDE
    if first < complete:
        c = first + tl.arange(0, WIDE)
        exists = c < complete
        highest = tl.full([WIDE], -float("inf"), tl.float32)
        for q in range(0, tl.minimum(tl.load(lengths + i_b), n)):
            query_row = row * n + q
            score = tl.load(scratch + query_row * row_stride + c, mask=exists, other=-float("inf"))
            probability = tl.exp(score - tl.load(norms + 2 * query_row)) / tl.load(norms + 2 * query_row + 1)
            highest = tl.maximum(highest, tl.where(exists, probability, -float("inf")))
        tl.store(chunk_scores + row * row_stride + c, highest, mask=c < num_blocks)
        tiles = tl.reshape(highest, [WIDE // TILE, TILE])
        index = first // TILE + tl.arange(0, WIDE // TILE)
        p_stats = chunk_stats + row * stats_stride + index
        in_stats = index < stats_stride
        tl.store(p_stats, tl.max(tiles, 1), mask=in_stats)
        tl.store(p_stats + stats_rows * stats_stride, tl.max(tl.where(tiles == -float("inf"), 0.0, tiles), 1),
                 mask=in_stats)


# ---------------------------------------------------------------------------------------------------------
# Layer 2: the launcher and the public function
# ---------------------------------------------------------------------------------------------------------
DOT_FROM = 16  # passes of at least this many queries (prefill chunks) score on the tensor cores


def _score_tiles(n, half, kv_group):
    """(BLOCK_M, HEADS, TILE, DK, on the tensor cores) of the scoring kernel: a prefill pass scores tiles of
    PREFILL_SCORE_TILES queries of a head and blocks (16 queries and 64 blocks for a short one) on the tensor cores,
    the whole half at once; a decoding step (one or two queries a head) scores the queries of the heads that share a
    key/value head together (HEADS of them, a power of two), so that each landmark key is loaded once for all, on
    the tensor cores too, or (MHA, or DECODE_ON_TENSOR_CORES off) one head's queries on the CUDA cores, a tile of
    ONE_HEAD_DECODE blocks loaded whole. Passes in between take tiles of up to 16 queries that share each landmark
    key they load, the dimensions in slices of 8."""
    if n >= DOT_FROM:
        queries, tile = PREFILL_SCORE_TILES if n >= 64 else (16, 64)
        return queries, 1, tile, max(16, triton.next_power_of_2(half)), True
    queries = triton.next_power_of_2(n)
    if queries <= 2 and DECODE_ON_TENSOR_CORES and kv_group > 1:
        heads = kv_group & -kv_group  # the largest power of two that divides the group
        heads = min(heads, 64 // queries)
        return max(16, heads * queries), heads, DECODE_SCORE_TILE, max(16, triton.next_power_of_2(half)), True
    block_m = min(16, queries)
    if block_m <= 2:
        return block_m, 1, ONE_HEAD_DECODE[0], triton.next_power_of_2(half), False
    return block_m, 1, 32 if block_m == 16 else 64, 8, False


def select_blocks(query, landmarks, in_block_landmarks, row_start, num_blocks, block_size, top_k, stingy, inv_freq,
                  scale, tie_tolerance, chunk_length=None):
    """Per-token block selection (see the module docstring).

    query: [batch, q_heads, n, head_dim], rotated to its true positions (RoPE attention scaling applied).
    landmarks: [batch, capacity, kv_heads, head_dim] landmark keys at their true positions.
    in_block_landmarks: [batch, capacity or more, kv_heads, head_dim] landmark keys rotated by their offset alone
        (any strides but a unit last one; a view of the key store works).
    row_start: [batch] internal position of each row's first query. The queries run in chunks of `chunk_length`
        (default: all n in one): the query at offset i selects among the blocks complete at row_start + i //
        chunk_length * chunk_length, with that chunk's stingy window, as if each chunk were a pass of its own.
    num_blocks: the static bound scored (at least every query's complete blocks).
    block_size: positions per block; stingy: stingy positions (else true ones).
    top_k: the retrieval's k; k = min(top_k, num_blocks) places are returned.
    Returns (selected [batch, q_heads, n, k] int64 in block order, 0 where unpicked; valid [batch, q_heads, n, k] bool;
    starts [batch, q_heads, n, k] int64).
    """
    batch, q_heads, n, _ = query.shape
    chunk_length = max(n, 1) if chunk_length is None else chunk_length
    outputs = _selection_outputs((batch, q_heads, n, min(top_k, num_blocks)), query.device)
    if outputs[0].numel() == 0:
        return outputs
    row_start = _check_selection_inputs(query, landmarks, in_block_landmarks, row_start, num_blocks, chunk_length)
    scratch, tile_stats, tile = _launch_scores(query, landmarks, in_block_landmarks, row_start, num_blocks,
                                               block_size, top_k, stingy, inv_freq, scale, chunk_length)
    _launch_top_k(scratch, tile_stats, tile, row_start, outputs, q_heads * n, n, chunk_length, num_blocks,
                  block_size, top_k, stingy, tie_tolerance, "prefill" if n >= DOT_FROM else "decoding")
    return outputs


def select_chunk_blocks(query, landmarks, in_block_landmarks, row_start, lengths, num_blocks, block_size, top_k,
                        stingy, inv_freq, scale, tie_tolerance):
    """Per-chunk block selection (`retrieval_granularity="chunk"`): the blocks the chunk's queries reach together.

    Each real query's landmark scores (as `select_blocks` computes them, all n queries one chunk) become softmax
    probabilities over its row's complete blocks; a block's score for the chunk is its highest probability among the
    row's first `lengths` [batch] queries; the top k of those with the tie rule, and the starts. Other arguments as
    `select_blocks`'s. Returns (selected, valid, starts), each [batch, q_heads, 1, k]."""
    batch, q_heads, n, _ = query.shape
    outputs = _selection_outputs((batch, q_heads, 1, min(top_k, num_blocks)), query.device)
    if outputs[0].numel() == 0 or n == 0:
        return tuple(t.fill_(0) for t in outputs)
    if lengths.shape != (batch,):
        raise ValueError(f"select_chunk_blocks: lengths must be [{batch}], got {tuple(lengths.shape)}.")
    row_start = _check_selection_inputs(query, landmarks, in_block_landmarks, row_start, num_blocks, n)
    scratch, _, tile = _launch_scores(query, landmarks, in_block_landmarks, row_start, num_blocks, block_size,
                                      top_k, stingy, inv_freq, scale, n)
    chunk_scores = torch.empty(batch * q_heads, scratch.shape[1], dtype=torch.float32, device=query.device)
    chunk_stats = torch.empty(2, batch * q_heads, triton.cdiv(num_blocks, tile), dtype=torch.float32,
                              device=query.device)
    norms = torch.empty(batch * q_heads * n, 2, dtype=torch.float32, device=query.device)
    lengths = lengths.long().contiguous()
    wide = max(tile, CHUNK_WIDE_BLOCKS)  # (not from the block count: no new compile as a prompt grows)
    _query_norms_kernel[(batch * q_heads * n,)](
        scratch, row_start, lengths, norms, q_heads, n, num_blocks, scratch.shape[1], BLOCK_SIZE=block_size,
        WIDE=wide, num_warps=4,
    )
    _chunk_probabilities_kernel[(batch * q_heads, triton.cdiv(num_blocks, wide))](
        scratch, row_start, lengths, norms, chunk_scores, chunk_stats,
        q_heads, n, num_blocks, scratch.shape[1], chunk_stats.stride(1), chunk_stats.shape[1],
        BLOCK_SIZE=block_size, TILE=tile, WIDE=wide, num_warps=4,
    )
    _launch_top_k(chunk_scores, chunk_stats, tile, row_start, outputs, q_heads, 1, 1, num_blocks, block_size, top_k,
                  stingy, tie_tolerance, "decoding")
    return outputs


def _selection_outputs(shape, device):
    """(selected, valid, starts), uninitialised, of `shape`."""
    return (torch.empty(shape, dtype=torch.long, device=device), torch.empty(shape, dtype=torch.bool, device=device),
            torch.empty(shape, dtype=torch.long, device=device))


def _check_selection_inputs(query, landmarks, in_block_landmarks, row_start, num_blocks, chunk_length):
    """The checks of both public functions; returns row_start as contiguous int64."""
    batch, q_heads, n, head_dim = query.shape
    kv_heads = landmarks.shape[2]
    if head_dim % 2 or q_heads % kv_heads or landmarks.shape[-1] != head_dim or num_blocks > landmarks.shape[1]:
        raise ValueError(
            f"select_blocks: query {tuple(query.shape)} (even head_dim, q_heads a multiple of kv_heads) does not fit "
            f"landmarks {tuple(landmarks.shape)} for {num_blocks} blocks."
        )
    if landmarks.stride(-1) != 1 or in_block_landmarks.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("select_blocks: query and landmark keys need a unit last stride.")
    if chunk_length < 1 or row_start.shape != (batch,):
        raise ValueError(f"select_blocks: row_start must be [{batch}] and chunk_length positive, got "
                         f"{tuple(row_start.shape)} and {chunk_length}.")
    if in_block_landmarks.dtype != landmarks.dtype:
        raise ValueError("select_blocks: both landmark keys need one dtype, got "
                         f"{landmarks.dtype} and {in_block_landmarks.dtype}.")
    return row_start.long().contiguous()


def _launch_scores(query, landmarks, in_block_landmarks, row_start, num_blocks, block_size, top_k, stingy, inv_freq,
                   scale, chunk_length):
    """The scoring kernel: returns (scratch [rows, row_stride] scores, tile_stats [2, rows, tiles], TILE)."""
    batch, q_heads, n, head_dim = query.shape
    kv_heads = landmarks.shape[2]
    row_stride = -(-num_blocks // 16) * 16
    scratch = torch.empty(batch * q_heads * n, row_stride, dtype=torch.float32, device=query.device)
    block_m, heads, tile, dk, use_dot = _score_tiles(n, head_dim // 2, q_heads // kv_heads)
    tile_stats = torch.empty(2, batch * q_heads * n, triton.cdiv(num_blocks, tile), dtype=torch.float32,
                             device=query.device)
    sixteen_bit = landmarks.dtype in (torch.bfloat16, torch.float16)
    step = "prefill" if n >= DOT_FROM else "decoding"  # the launch settings' kind of pass
    groups = batch * q_heads // heads  # programs of one tile of blocks
    tile_programs = triton.cdiv(num_blocks, tile)
    if step == "decoding" and DECODE_SCORE_PROGRAMS is not None:  # fewer programs, each looping over tiles
        tile_programs = min(tile_programs, triton.cdiv(DECODE_SCORE_PROGRAMS, groups))
    _landmark_scores_kernel[(triton.cdiv(n, block_m // heads), tile_programs, groups)](
        query, landmarks, in_block_landmarks, row_start, inv_freq.float().contiguous(), scratch, tile_stats,
        query.stride(0), query.stride(1), query.stride(2),
        landmarks.stride(0), landmarks.stride(1), landmarks.stride(2),
        in_block_landmarks.stride(0), in_block_landmarks.stride(1), in_block_landmarks.stride(2),
        q_heads, n, chunk_length, num_blocks, top_k, float(scale), row_stride, tile_stats.stride(1),
        tile_stats.shape[1],
        KV_GROUP=q_heads // kv_heads, HEADS=heads, STINGY=bool(stingy), BLOCK_SIZE=block_size, HALF=head_dim // 2,
        BLOCK_M=block_m, TILE=tile, DK=dk, USE_DOT=use_dot, SPLIT=sixteen_bit,
        NATIVE_DOT=use_dot and sixteen_bit and query.dtype == landmarks.dtype,
        UPCAST_DOT=_interpreting() and landmarks.dtype == torch.bfloat16, LOOP_TILES=step == "decoding",
        num_warps=SCORE_WARPS[step] if use_dot else ONE_HEAD_DECODE[1],
        maxnreg=DECODE_SCORE_MAX_REGISTERS if step == "decoding" else None,
        enable_fp_fusion=True,  # explicit: Triton 3.10 turns the default off
    )
    return scratch, tile_stats, tile


def _launch_top_k(scores, tile_stats, tile, row_start, outputs, rows_per_batch, n, chunk_length, num_blocks,
                  block_size, top_k, stingy, tie_tolerance, step):
    """The top-k kernel over score rows [batch * rows_per_batch, row_stride] (n of a head) into `outputs`."""
    selected, valid, starts = outputs
    k = selected.shape[-1]
    # score tiles a row, held as a power of two that changes with the block count's (no new compile a prompt)
    num_tiles = max(1, triton.next_power_of_2(num_blocks) // tile)
    group_tiles = min(num_tiles, max(triton.next_power_of_2(2 * k), CANDIDATE_BLOCKS // tile))
    _top_blocks_kernel[(scores.shape[0],)](
        scores, tile_stats, row_start, selected, valid, starts,
        rows_per_batch, n, chunk_length, num_blocks, k, top_k, float(tie_tolerance), scores.shape[1],
        tile_stats.stride(1), tile_stats.shape[1],
        STINGY=bool(stingy), BLOCK_SIZE=block_size, K_PAD=triton.next_power_of_2(k), TILE=tile, NUM_TILES=num_tiles,
        GROUP_TILES=group_tiles, ONE_PASS=not _interpreting(),
        num_warps=min(8, max(1, group_tiles * tile // TOP_K_BLOCKS_PER_WARP[step])),
        enable_fp_fusion=True,
    )
