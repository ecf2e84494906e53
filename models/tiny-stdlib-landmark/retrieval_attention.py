"""The attention of a chunk of queries against the block-retrieval cache (landmark-llama's inference form) as one
Triton kernel.

Paper: A. Mohtashami and M. Jaggi, NeurIPS 2023, arXiv:2305.16300, section 3.2.

What is computed. The cache's store holds every block of a row, the chunk's own keys and values already written
behind the tail. A query at internal position p (block b = p // block_size; the chunk starts at position s, its
tail at block s // block_size) attends in one grouped softmax to
  * the blocks it retrieved (its own with `"token"` granularity, its head's for the chunk with `"chunk"`), each
    at the start position the retrieval assigned it, gated by its landmark;
  * the complete blocks of [tail | chunk] before its own, s // block_size .. b - 1, at their true positions, gated;
  * the regular keys of its own block up to p, directly.
A gated block c contributes its landmark score g_c as a gate and o_c = softmax_j(s_cj) . v_c over its regular
keys; the own block contributes its scores directly, which is a gate equal to their logsumexp. The output is
sum_c softmax(gates)_c o_c: the training form's grouped softmax, block by block.

A wide prefill pass runs several chunks of `chunk_length` queries at once: a query's tail is then its own chunk's
(s is the start of the chunk holding it), and its table row that chunk's selection, so that the pass computes what
passes of one chunk compute, with fewer launches and larger grids.

The store keeps a block's keys rotated by their offset in the block only, so the query is rotated back by each
block's start instead of rotating the keys forward (<q at m, key at start + o> = <q rotated by m - start, key
rotated by o>).

Layout. Three, by the pass's size, each an online softmax over blocks:
  * a prefill chunk runs in tiles of QUERY_TILE consecutive queries of one head on the tensor cores: each [tail |
    chunk] block is read once for the tile; retrieved blocks of a per-query table are read first block by block
    (`_retrieved_shares_kernel`: a program reads a block once for every query that picked it), and the tiles merge
    those shares; a table of one row has its blocks read once for the tile;
  * a decoding step spreads each query's blocks over several programs, whose shares of the softmax one more kernel
    merges;
  * otherwise, one program per query and head reads its blocks one after another.
Each block is read straight from the store
(retrieved ones through the block table: no gathered per-query copies), from the query head's key/value head (GQA
without repeating keys). [tail | chunk] may come from a store of its own: the offloaded cache keeps the recent
blocks in a ring on the device and the retrieved ones in slots. Scores and softmax in fp32 (the tiles' products
take the rotated queries and the weights in the store's dtype, as flash attention does; fp32 stores through
3xTF32); keys and values in any float dtype; head_dim must be even (RoPE rotates pairs).
"""

import torch

try:  # guarded like landmark_attention.py: the remote-code import check must not demand Triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("retrieval_attention needs Triton (pip install triton); the eager path works without it."
                      ) from error

from .landmark_attention import _dot, _interpreting  # tl.dot as the training kernel runs it, interpreter included

__all__ = ["retrieval_attention", "MAX_HEAD_DIM", "MAX_BLOCK_SIZE"]

MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 128
SPREAD_BELOW = 1024  # passes of fewer (query, head) pairs split each pair's blocks over several programs
# a spread program's warps: one per this many of its [block, half] tile (benchmarks/inference_kernels.py --decode,
# the 7B shape at 128k: 8.5 us a layer at 2048, 9.4 at 1024, 11.4 at 512)
SPREAD_ELEMENTS_PER_WARP = 2048
# sizes that change with the prompt or the pass, never specialised on, so that a new prompt length compiles nothing
# new (the stores' and queries' strides keep their multiples of 16 whatever the length, which vector loads need)
SIZE_ARGS = ["stride_tb", "stride_th", "q_heads", "top_k", "ring", "chunk_length"]
TILES_FROM = 16  # passes of at least this many queries (prefill chunks) run in tiles of QUERY_TILE queries
QUERY_TILE = 16
# launch settings of the tiles and the shares (benchmarks/inference_kernels.py: 4 warps, the tiles' loops over
# blocks pipelined in 2 stages; with the shares, 1.47 ms for a 4,096-query pass of the 7B shape with random picks at
# 4 warps, 2.21 ms at 8)
TILES_WARPS = 4
TILES_STAGES = 2
# queries of one stored block scored at once when retrieved blocks are read block by block: 64 where the blocks
# average at least SHARE_DENSE_FROM queries (benchmarks/inference_kernels.py, a 4,096-query pass of the 7B shape at
# 32k, 32 queries a block: 1.47 ms at 64, 2.45 ms at 16, 3.96 ms at 32; at 128k, 8 a block: 4.20 ms at 16, 5.20 at
# 64), 16 for sparse ones (a pass of one chunk)
SHARE_PAIRS = dict(dense=64, sparse=16)
SHARE_DENSE_FROM = 16


# ---------------------------------------------------------------------------------------------------------
# Layer 1: the Triton kernel
# ---------------------------------------------------------------------------------------------------------
# 2*pi in three fp32 parts, the first of 8 significant bits: a whole number of turns times it is exact in an fma
TURN_HI = tl.constexpr(6.28125)
TURN_MID = tl.constexpr(0.0019353071693331003)
TURN_LO = tl.constexpr(1.0253131677018246e-11)
INV_TURN = tl.constexpr(0.15915493667125702)


@triton.jit
def _cos_sin(angle):
    """cos and sin of fp32 angles up to 2**24 in magnitude, reduced by whole turns first: past about 1e5 (positions
    of a 128k prompt) the CUDA sin and cos fall to a slow reduction that a warp waits on whenever one lane needs it.
    The reduced angle is within an ulp of the exact one, so the result matches cos/sin of the same fp32 angle."""
    turns = tl.floor(angle * INV_TURN + 0.5)
    reduced = tl.math.fma(-turns, TURN_HI, angle)  # exact: the difference fits fp32's 24 bits
    reduced = tl.math.fma(-turns, TURN_LO, tl.math.fma(-turns, TURN_MID, reduced))
    return tl.cos(reduced), tl.sin(reduced)


@triton.jit
def _rotate_back(q1, q2, freq, start):
    """The query halves rotated by -start: into the frame of a block whose keys are rotated by their offset only."""
    cos, sin = _cos_sin(-(start * 1.0) * freq)  # positions up to 2**24 are exact in fp32
    return _turn(q1, q2, cos, sin)


@triton.jit
def _turn(q1, q2, cos, sin):
    """The query halves rotated by the angles of (cos, sin)."""
    return q1 * cos - q2 * sin, q2 * cos + q1 * sin


@triton.jit
def _block_tile(store, i_b, i_kv, stride_b, stride_h, stride_o, slot, d):
    """Addresses of a [slot, d] tile of block 0 of a store [batch, blocks, kv_heads, block_size, head_dim] for row
    i_b and key/value head i_kv: block c's are these plus c times the block stride."""
    return store + i_b.to(tl.int64) * stride_b + i_kv * stride_h + slot[:, None] * stride_o + d[None, :]


@triton.jit
def _chunk_first_block(chunk_start, query_index, chunk_length, BLOCK_SIZE: tl.constexpr):
    """The block holding the first position of a query's chunk (a pass runs its queries in chunks of
    `chunk_length`, each as if it were a pass of its own): where its [tail | chunk] begins, and how many complete
    blocks it selects among."""
    return (chunk_start + query_index // chunk_length * chunk_length) // BLOCK_SIZE


@triton.jit
def _block_share(q1, q2, freq, p_k, p_v, start, visible, sm_scale, slot, tile_mask, OWN: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr):
    """(gate, value mix in two halves) of one block at `start`. A gated block's gate is its landmark's score and its
    mix the softmax of its regular keys; the query's own block (OWN) enters the softmax directly: its gate is the
    logsumexp of its first `visible` regular scores."""
    r1, r2 = _rotate_back(q1, q2, freq, start)
    k1 = tl.load(p_k, mask=tile_mask, other=0.0).to(tl.float32)
    k2 = tl.load(p_k + HALF, mask=tile_mask, other=0.0).to(tl.float32)
    v1 = tl.load(p_v, mask=tile_mask, other=0.0).to(tl.float32)  # issued with the keys: one wait for the block
    v2 = tl.load(p_v + HALF, mask=tile_mask, other=0.0).to(tl.float32)
    scores = (tl.sum(k1 * r1[None, :], 1) + tl.sum(k2 * r2[None, :], 1)) * sm_scale
    keep = slot < BLOCK_SIZE - 1
    if OWN:
        keep = keep & (slot < visible)
    else:
        landmark = tl.sum(tl.where(slot == BLOCK_SIZE - 1, scores, 0.0), 0)
    scores = tl.where(keep, scores, -float("inf"))
    top = tl.max(scores, 0)
    weights = tl.exp(scores - top)
    total = tl.sum(weights, 0)
    weights = weights / total
    if OWN:
        gate = top + tl.log(total)
    else:
        gate = landmark
    return gate, tl.sum(weights[:, None] * v1, 0), tl.sum(weights[:, None] * v2, 0)


@triton.jit
def _merge(gate_max, gate_sum, acc1, acc2, gate, mix1, mix2):
    """Online softmax over the gates of the blocks seen so far."""
    new_max = tl.maximum(gate_max, gate)
    rescale = tl.exp(gate_max - new_max)
    share = tl.exp(gate - new_max)
    return new_max, gate_sum * rescale + share, acc1 * rescale + share * mix1, acc2 * rescale + share * mix2


@triton.jit(do_not_specialize=SIZE_ARGS)
def _retrieval_attention_kernel(
    q, keys, values, local_keys, local_values, table, starts, row_start, inv_freq, out, partial,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kc, stride_kh, stride_ko,
    stride_vb, stride_vc, stride_vh, stride_vo,
    stride_lkb, stride_lkc, stride_lkh, stride_lko,
    stride_lvb, stride_lvc, stride_lvh, stride_lvo,
    stride_tb, stride_th, stride_tn,
    stride_ob, stride_oh, stride_on,
    q_heads, top_k, ring, chunk_length, sm_scale,
    KV_GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, SPLITS: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_b = tl.program_id(1) // q_heads
    i_h = tl.program_id(1) % q_heads
    i_s = tl.program_id(2)  # with SPLITS > 1, the program takes every SPLITS-th of the query's blocks
    i_kv = i_h // KV_GROUP
    d = tl.arange(0, HALF_PAD)
    in_half = d < HALF
    slot = tl.arange(0, BLOCK_PAD)
    tile_mask = (slot < BLOCK_SIZE)[:, None] & in_half[None, :]

    # the query in its two RoPE halves (rotate_half pairs dimension i with i + HALF), at position `position`
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + i_n.to(tl.int64) * stride_qn
    q1 = tl.load(p_q + d, mask=in_half, other=0.0).to(tl.float32)
    q2 = tl.load(p_q + HALF + d, mask=in_half, other=0.0).to(tl.float32)
    freq = tl.load(inv_freq + d, mask=in_half, other=0.0)
    chunk_start = tl.load(row_start + i_b)
    position = chunk_start + i_n
    own_block = position // BLOCK_SIZE
    local_first = _chunk_first_block(chunk_start, i_n, chunk_length, BLOCK_SIZE)
    p_keys = _block_tile(keys, i_b, i_kv, stride_kb, stride_kh, stride_ko, slot, d)
    p_values = _block_tile(values, i_b, i_kv, stride_vb, stride_vh, stride_vo, slot, d)
    # [tail | chunk] from the local store, block c at c % ring (a ring of recent blocks where the store is offloaded)
    p_local_k = _block_tile(local_keys, i_b, i_kv, stride_lkb, stride_lkh, stride_lko, slot, d)
    p_local_v = _block_tile(local_values, i_b, i_kv, stride_lvb, stride_lvh, stride_lvo, slot, d)

    gate_max = -float("inf")
    gate_sum = 0.0
    acc1 = tl.zeros([HALF_PAD], dtype=tl.float32)
    acc2 = tl.zeros([HALF_PAD], dtype=tl.float32)
    # the query's blocks in one list: its top_k retrieved ones, then local_first .. own_block; this program's
    # are those whose index in the list is i_s modulo SPLITS
    # 1. the retrieved blocks, at the positions the retrieval assigned them
    p_table = i_b.to(tl.int64) * stride_tb + i_h * stride_th + i_n.to(tl.int64) * stride_tn
    for j in range(i_s, top_k, SPLITS):
        block = tl.load(table + p_table + j)
        if block >= 0:
            gate, mix1, mix2 = _block_share(
                q1, q2, freq, p_keys + block * stride_kc, p_values + block * stride_vc,
                tl.load(starts + p_table + j), 0, sm_scale, slot, tile_mask, False, BLOCK_SIZE, HALF)
            gate_max, gate_sum, acc1, acc2 = _merge(gate_max, gate_sum, acc1, acc2, gate, mix1, mix2)
    # 2. complete blocks of [tail | chunk] before the query's own, gated at their true positions
    for block in range(local_first + (i_s - top_k % SPLITS + SPLITS) % SPLITS, own_block, SPLITS):
        gate, mix1, mix2 = _block_share(
            q1, q2, freq, p_local_k + (block % ring) * stride_lkc, p_local_v + (block % ring) * stride_lvc,
            block * BLOCK_SIZE, 0, sm_scale, slot, tile_mask, False, BLOCK_SIZE, HALF)
        gate_max, gate_sum, acc1, acc2 = _merge(gate_max, gate_sum, acc1, acc2, gate, mix1, mix2)
    # 3. the query's own block: its regular keys up to the query, in the softmax directly
    if (top_k + own_block - local_first) % SPLITS == i_s:
        gate, mix1, mix2 = _block_share(
            q1, q2, freq, p_local_k + (own_block % ring) * stride_lkc, p_local_v + (own_block % ring) * stride_lvc,
            own_block * BLOCK_SIZE, position % BLOCK_SIZE + 1, sm_scale, slot, tile_mask, True, BLOCK_SIZE, HALF)
        gate_max, gate_sum, acc1, acc2 = _merge(gate_max, gate_sum, acc1, acc2, gate, mix1, mix2)

    if SPLITS == 1:
        p_out = out + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + i_n.to(tl.int64) * stride_on
        tl.store(p_out + d, (acc1 / gate_sum).to(out.dtype.element_ty), mask=in_half)
        tl.store(p_out + HALF + d, (acc2 / gate_sum).to(out.dtype.element_ty), mask=in_half)
    else:  # this program's share of the softmax: [gate max, gate sum, unnormalised mix] -> `_merge_splits_kernel`
        p_partial = partial + ((i_n * tl.num_programs(1) + tl.program_id(1)) * SPLITS + i_s).to(tl.int64) * (
            2 + 2 * HALF_PAD)
        tl.store(p_partial, gate_max)
        tl.store(p_partial + 1, gate_sum)
        tl.store(p_partial + 2 + d, acc1)
        tl.store(p_partial + 2 + HALF_PAD + d, acc2)


@triton.jit
def _load_block(p_k, p_v, mask, HALF: tl.constexpr):
    """A block's keys and values in halves ([BLOCK_PAD, HALF_PAD] each), zero where `mask` is off."""
    k1 = tl.load(p_k, mask=mask, other=0.0)
    k2 = tl.load(p_k + HALF, mask=mask, other=0.0)
    v1 = tl.load(p_v, mask=mask, other=0.0)
    v2 = tl.load(p_v + HALF, mask=mask, other=0.0)
    return k1, k2, v1, v2


@triton.jit
def _tile_share(r1, r2, k1, k2, v1, v2, sm_scale, slot, gated, visible, BLOCK_SIZE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """`_block_share` for a tile of queries, each rotated into the block's frame ([BLOCK_M, HALF_PAD] halves), on the
    tensor cores: rows `gated` take the block as a gated one, the others as their own block, whose first `visible`
    regular keys enter the softmax directly."""
    scores = (_dot(r1.to(k1.dtype), tl.trans(k1), DOT_PRECISION, UPCAST_DOT)
              + _dot(r2.to(k2.dtype), tl.trans(k2), DOT_PRECISION, UPCAST_DOT)) * sm_scale
    landmark = tl.sum(tl.where(slot[None, :] == BLOCK_SIZE - 1, scores, 0.0), 1)
    keep = (slot[None, :] < BLOCK_SIZE - 1) & (gated[:, None] | (slot[None, :] < visible[:, None]))
    scores = tl.where(keep, scores, -float("inf"))
    top = tl.max(scores, 1)
    top = tl.where(top == -float("inf"), 0.0, top)  # rows with no key here (they do not take the block)
    weights = tl.exp(scores - top[:, None])
    total = tl.sum(weights, 1)
    gate = tl.where(gated, landmark, top + tl.log(total))
    weights = weights / tl.where(total == 0.0, 1.0, total)[:, None]
    mix1 = _dot(weights.to(v1.dtype), v1, DOT_PRECISION, UPCAST_DOT)
    mix2 = _dot(weights.to(v2.dtype), v2, DOT_PRECISION, UPCAST_DOT)
    return gate, mix1, mix2


@triton.jit
def _merge_rows(gate_max, gate_sum, acc1, acc2, gate, mix1, mix2, take):
    """`_merge` for a tile of queries, of which the rows `take` take the block."""
    gate = tl.where(take, gate, -float("inf"))
    new_max = tl.maximum(gate_max, gate)
    safe = tl.where(new_max == -float("inf"), 0.0, new_max)
    rescale = tl.exp(gate_max - safe)
    share = tl.exp(gate - safe)
    return (new_max, gate_sum * rescale + share, acc1 * rescale[:, None] + share[:, None] * mix1,
            acc2 * rescale[:, None] + share[:, None] * mix2)


@triton.jit(do_not_specialize=["q_heads", "n", "top_k", "capacity", "kv_heads"])
def _retrieved_shares_kernel(
    q, keys, values, order, sorted_segment, firsts, starts, inv_freq, gates, mixes,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kc, stride_kh, stride_ko,
    stride_vb, stride_vc, stride_vh, stride_vo,
    q_heads, n, top_k, capacity, kv_heads, sm_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    PAIRS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The shares (gate, value mix) of one stored block for every query that retrieved it. `sorted_segment`: the
    table's entries' (batch row, key/value head, block) = (b * kv_heads + kv) * capacity + block, sorted, with
    `order` their flat indices into the table; this program's block is the one whose entries start at
    `firsts[program]` and end before `firsts[program + 1]`. The block is read once, and its queries scored PAIRS at a
    time on the tensor cores, each rotated into the block's frame by the start it assigned the block. Writes
    `gates` and `mixes` at the entries' indices."""
    first = tl.load(firsts + tl.program_id(0))
    last = tl.load(firsts + tl.program_id(0) + 1)
    if first < last:  # (programs past the last block find first == last)
        segment = tl.load(sorted_segment + first)
        block = segment % capacity
        i_kv = segment // capacity % kv_heads
        i_b = (segment // capacity // kv_heads).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        in_half = d < HALF
        slot = tl.arange(0, BLOCK_PAD)
        tile_mask = (slot < BLOCK_SIZE)[:, None] & in_half[None, :]
        p_k = _block_tile(keys, i_b, i_kv, stride_kb, stride_kh, stride_ko, slot, d) + block.to(tl.int64) * stride_kc
        p_v = _block_tile(values, i_b, i_kv, stride_vb, stride_vh, stride_vo, slot, d) + block.to(tl.int64) * stride_vc
        k1, k2, v1, v2 = _load_block(p_k, p_v, tile_mask, HALF)
        freq = tl.load(inv_freq + d, mask=in_half, other=0.0)[None, :]
        gated = tl.full([PAIRS], 1, tl.int1)
        unused = tl.zeros([PAIRS], dtype=tl.int32)  # a gated block's keys are all visible
        for listed in tl.range(first, last, PAIRS):
            entry = listed + tl.arange(0, PAIRS)
            in_segment = entry < last
            pair = tl.load(order + entry, mask=in_segment, other=0)
            start = tl.load(starts + pair, mask=in_segment, other=0)
            row = pair // top_k % n
            i_h = pair // top_k // n % q_heads
            p_q = q + i_b * stride_qb + i_h[:, None] * stride_qh + row[:, None] * stride_qn + d[None, :]
            q_mask = in_segment[:, None] & in_half[None, :]
            q1 = tl.load(p_q, mask=q_mask, other=0.0).to(tl.float32)
            q2 = tl.load(p_q + HALF, mask=q_mask, other=0.0).to(tl.float32)
            r1, r2 = _rotate_back(q1, q2, freq, start[:, None])
            gate, mix1, mix2 = _tile_share(r1, r2, k1, k2, v1, v2, sm_scale, slot, gated, unused, BLOCK_SIZE,
                                           DOT_PRECISION, UPCAST_DOT)
            tl.store(gates + pair, gate, mask=in_segment)
            p_mix = mixes + pair[:, None] * (2 * HALF) + d[None, :]
            tl.store(p_mix, mix1, mask=q_mask)
            tl.store(p_mix + HALF, mix2, mask=q_mask)


@triton.jit(do_not_specialize=SIZE_ARGS + ["n"])
def _retrieval_attention_tiles_kernel(
    q, keys, values, local_keys, local_values, table, starts, row_start, inv_freq, out, gates, mixes,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kc, stride_kh, stride_ko,
    stride_vb, stride_vc, stride_vh, stride_vo,
    stride_lkb, stride_lkc, stride_lkh, stride_lko,
    stride_lvb, stride_lvc, stride_lvh, stride_lvo,
    stride_tb, stride_th, stride_tn,
    stride_ob, stride_oh, stride_on,
    q_heads, n, top_k, ring, chunk_length, sm_scale,
    KV_GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, BLOCK_M: tl.constexpr, SHARES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, STAGES: tl.constexpr,
):
    """A tile of BLOCK_M consecutive queries of one head, on the tensor cores: each [tail | chunk] block any of them
    attends to is read once for the whole tile. Retrieved blocks: with SHARES, each query's own from their shares
    `gates` and `mixes` (laid out as the table, `mixes` with the head dimension last); else the table's one row, each
    block read once for the tile."""
    i_b = tl.program_id(1) // q_heads
    i_h = tl.program_id(1) % q_heads
    i_kv = i_h // KV_GROUP
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_in = rows < n
    d = tl.arange(0, HALF_PAD)
    in_half = d < HALF
    slot = tl.arange(0, BLOCK_PAD)
    tile_mask = (slot < BLOCK_SIZE)[:, None] & in_half[None, :]
    batch_row = i_b.to(tl.int64)

    p_q = q + batch_row * stride_qb + i_h * stride_qh + rows[:, None].to(tl.int64) * stride_qn + d[None, :]
    q_mask = row_in[:, None] & in_half[None, :]
    q1 = tl.load(p_q, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(p_q + HALF, mask=q_mask, other=0.0).to(tl.float32)
    freq = tl.load(inv_freq + d, mask=in_half, other=0.0)[None, :]
    chunk_start = tl.load(row_start + i_b)
    position = chunk_start + rows
    own_block = position // BLOCK_SIZE
    local_first = _chunk_first_block(chunk_start, rows, chunk_length, BLOCK_SIZE)
    p_keys = _block_tile(keys, batch_row, i_kv, stride_kb, stride_kh, stride_ko, slot, d)
    p_values = _block_tile(values, batch_row, i_kv, stride_vb, stride_vh, stride_vo, slot, d)
    p_local_k = _block_tile(local_keys, batch_row, i_kv, stride_lkb, stride_lkh, stride_lko, slot, d)
    p_local_v = _block_tile(local_values, batch_row, i_kv, stride_lvb, stride_lvh, stride_lvo, slot, d)

    gate_max = tl.full([BLOCK_M], -float("inf"), tl.float32)
    gate_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    gated = tl.full([BLOCK_M], 1, tl.int1)
    visible = position % BLOCK_SIZE + 1  # regular keys of its own block up to the query
    # 1. the retrieved blocks
    p_head = batch_row * stride_tb + i_h * stride_th
    p_table = p_head + rows.to(tl.int64) * stride_tn
    if SHARES:  # each query's own: their shares, computed block by block (`_retrieved_shares_kernel`)
        for j in range(0, top_k):
            taken = tl.load(table + p_table + j, mask=row_in, other=-1) >= 0
            gate = tl.load(gates + p_table + j, mask=taken, other=-float("inf"))
            p_mix = mixes + (p_table + j)[:, None] * (2 * HALF) + d[None, :]
            mix_mask = taken[:, None] & in_half[None, :]
            mix1 = tl.load(p_mix, mask=mix_mask, other=0.0)
            mix2 = tl.load(p_mix + HALF, mask=mix_mask, other=0.0)
            gate_max, gate_sum, acc1, acc2 = _merge_rows(gate_max, gate_sum, acc1, acc2, gate, mix1, mix2, taken)
    else:  # one table row for every query of the pass (a selection per chunk)
        for j in tl.range(0, top_k, num_stages=STAGES):
            block = tl.load(table + p_head + j)
            if block >= 0:
                k1, k2, v1, v2 = _load_block(p_keys + block * stride_kc, p_values + block * stride_vc, tile_mask,
                                             HALF)
                r1, r2 = _rotate_back(q1, q2, freq, tl.load(starts + p_head + j))
                gate, mix1, mix2 = _tile_share(r1, r2, k1, k2, v1, v2, sm_scale, slot, gated, visible, BLOCK_SIZE,
                                               DOT_PRECISION, UPCAST_DOT)
                gate_max, gate_sum, acc1, acc2 = _merge_rows(gate_max, gate_sum, acc1, acc2, gate, mix1, mix2,
                                                             row_in)
    # 2. [tail | chunk] of each query's chunk up to the tile's last own block, at true positions: gated for the
    # rows past it, their own block for the rows in it (regular keys up to the query)
    tile_rows = tl.minimum(n - first_row, BLOCK_M)
    last_block = (chunk_start + first_row + tile_rows - 1) // BLOCK_SIZE
    for block in tl.range(tl.min(local_first, 0), last_block + 1, num_stages=STAGES):
        r1, r2 = _rotate_back(q1, q2, freq, block * BLOCK_SIZE)
        k1, k2, v1, v2 = _load_block(p_local_k + (block % ring) * stride_lkc, p_local_v + (block % ring) * stride_lvc,
                                     tile_mask, HALF)
        gate, mix1, mix2 = _tile_share(r1, r2, k1, k2, v1, v2, sm_scale, slot, block < own_block, visible,
                                       BLOCK_SIZE, DOT_PRECISION, UPCAST_DOT)
        gate_max, gate_sum, acc1, acc2 = _merge_rows(gate_max, gate_sum, acc1, acc2, gate, mix1, mix2,
                                                     row_in & (block <= own_block) & (block >= local_first))

    p_out = out + batch_row * stride_ob + i_h * stride_oh + rows[:, None].to(tl.int64) * stride_on + d[None, :]
    total = tl.where(row_in, gate_sum, 1.0)[:, None]
    tl.store(p_out, (acc1 / total).to(out.dtype.element_ty), mask=q_mask)
    tl.store(p_out + HALF, (acc2 / total).to(out.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["q_heads"])
def _merge_splits_kernel(
    partial, out, stride_ob, stride_oh, stride_on, q_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, SPLITS: tl.constexpr,
):
    """The output of one query and head from its SPLITS programs' shares of the softmax over blocks."""
    i_n = tl.program_id(0)
    i_b = tl.program_id(1) // q_heads
    i_h = tl.program_id(1) % q_heads
    split = tl.arange(0, SPLITS)
    d = tl.arange(0, HALF_PAD)
    width = 2 + 2 * HALF_PAD
    p_partial = partial + ((i_n * tl.num_programs(1) + tl.program_id(1)) * SPLITS + split).to(tl.int64) * width
    gate_max = tl.load(p_partial)
    top = tl.max(gate_max, 0)
    rescale = tl.where(gate_max == -float("inf"), 0.0, tl.exp(gate_max - top))  # programs that had no block
    gate_sum = tl.sum(tl.load(p_partial + 1) * rescale, 0)
    acc1 = tl.sum(tl.load(p_partial[:, None] + 2 + d[None, :]) * rescale[:, None], 0)
    acc2 = tl.sum(tl.load(p_partial[:, None] + 2 + HALF_PAD + d[None, :]) * rescale[:, None], 0)
    p_out = out + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + i_n.to(tl.int64) * stride_on
    in_half = d < HALF
    tl.store(p_out + d, (acc1 / gate_sum).to(out.dtype.element_ty), mask=in_half)
    tl.store(p_out + HALF + d, (acc2 / gate_sum).to(out.dtype.element_ty), mask=in_half)


# ---------------------------------------------------------------------------------------------------------
# Layer 2: the launcher (validate, allocate, build the grid) and the public function
# ---------------------------------------------------------------------------------------------------------
def _check_inputs(query, keys, values, local_keys, local_values, table, starts, row_start, inv_freq):
    if query.dim() != 4 or keys.dim() != 5 or values.shape != keys.shape:
        raise ValueError(
            "retrieval_attention: query must be [batch, q_heads, n, head_dim] and keys, values the cache's "
            f"[batch, capacity, kv_heads, block_size, head_dim], got {tuple(query.shape)}, {tuple(keys.shape)}, "
            f"{tuple(values.shape)}."
        )
    if local_values.shape != local_keys.shape or local_keys.shape[:1] + local_keys.shape[2:] != (
        keys.shape[:1] + keys.shape[2:]
    ):
        raise ValueError(
            f"retrieval_attention: local_keys and local_values {tuple(local_keys.shape)}, "
            f"{tuple(local_values.shape)} must match the store {tuple(keys.shape)} but for their block count."
        )
    batch, q_heads, n, head_dim = query.shape
    kv_heads, block_size = keys.shape[2], keys.shape[3]
    if keys.shape[0] != batch or keys.shape[-1] != head_dim or q_heads % kv_heads:
        raise ValueError(
            f"retrieval_attention: keys {tuple(keys.shape)} do not match the query {tuple(query.shape)} "
            "(batch and head_dim equal, q_heads a multiple of kv_heads)."
        )
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"retrieval_attention: head_dim must be even and at most {MAX_HEAD_DIM}, got {head_dim}; "
                         "use the eager retrieval path.")
    if not 2 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"retrieval_attention: block_size must be 2..{MAX_BLOCK_SIZE}, got {block_size}; use the "
                         "eager retrieval path.")
    if table.dim() != 4 or table.shape[:2] != (batch, q_heads) or table.shape[2] not in (1, n):
        raise ValueError(f"retrieval_attention: the block table must be [batch, q_heads, n or 1, k], got "
                         f"{tuple(table.shape)} for a query of {tuple(query.shape)}.")
    if starts.shape != table.shape or row_start.shape != (batch,) or inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"retrieval_attention: starts {tuple(starts.shape)} must match the table "
                         f"{tuple(table.shape)}, row_start be [{batch}] and inv_freq [{head_dim // 2}], got "
                         f"{tuple(row_start.shape)} and {tuple(inv_freq.shape)}.")


def _splits(n, rows, top_k, block_size):
    """Programs per query and head: a pass with few queries (a decoding step) spreads each query's blocks over as
    many programs as it has blocks at most, so that the GPU is not left to a few programs reading blocks one after
    another; wider passes have programs enough."""
    if n * rows >= SPREAD_BELOW:
        return 1
    most_local = -(-(block_size - 1 + n) // block_size)  # the tail's block to the last query's
    return triton.next_power_of_2(top_k + most_local)


def _retrieved_shares(query, keys, values, table, starts, inv_freq, sm_scale, strides, settings):
    """(gates, mixes) of every entry of a per-query table [batch, q_heads, n, k]: the table's entries sorted by the
    stored block they name, so that one program reads each block once for all the queries that retrieved it
    (random picks leave a tile of consecutive queries almost nothing to share; a block, all the queries it serves).
    Only device work: no host read, so that a captured prefill pass replays it."""
    batch, q_heads, n, k = table.shape
    capacity, kv_heads = keys.shape[1], keys.shape[2]
    segments = batch * kv_heads * capacity  # one per (row, key/value head, block); empty entries sort past them
    device = query.device
    owner = (torch.arange(batch, device=device)[:, None] * kv_heads
             + torch.arange(q_heads, device=device)[None, :] // (q_heads // kv_heads)) * capacity
    sorted_segment, order = torch.sort(torch.where(table >= 0, owner[:, :, None, None] + table, segments).flatten())
    # where each retrieved block's entries start, in block order, then the count of entries; a program per block at
    # most (the grid is static: no host read)
    programs = min(sorted_segment.numel(), segments)
    named = sorted_segment < segments
    opens = named.clone()  # the first entry of its block
    opens[1:] &= sorted_segment[1:] != sorted_segment[:-1]
    firsts = named.sum().expand(programs + 2).clone()  # (the last place takes the other entries' writes)
    firsts.scatter_(0, torch.where(opens, opens.cumsum(0) - 1, programs + 1),
                    torch.arange(sorted_segment.numel(), device=device))
    gates = torch.empty(table.shape, dtype=torch.float32, device=device)
    mixes = torch.empty(*table.shape, query.shape[-1], dtype=torch.float32, device=device)
    _retrieved_shares_kernel[(programs,)](
        query, keys, values, order, sorted_segment, firsts, starts, inv_freq, gates, mixes, *strides,
        q_heads, n, k, capacity, kv_heads, float(sm_scale), **settings,
        PAIRS=SHARE_PAIRS["dense" if sorted_segment.numel() >= SHARE_DENSE_FROM * programs else "sparse"],
        num_warps=TILES_WARPS, enable_fp_fusion=True,
    )
    return gates, mixes


def _unit_inner_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def retrieval_attention(query, keys, values, table, starts, row_start, inv_freq, sm_scale, local_keys=None,
                        local_values=None, chunk_length=None):
    """A chunk's retrieval attention read from the cache's store (see the module docstring).

    query: [batch, q_heads, n, head_dim], rotated to its positions row_start + 0 .. n - 1 (RoPE attention scaling
        already applied).
    keys, values: the blocks the table indexes, [batch, blocks, kv_heads, block_size, head_dim], keys rotated by
        their offset in the block.
    table: [batch, q_heads, n or 1 (one selection per chunk), k] integer block indices; -1 where no block was picked.
    starts: like `table`, the position assigned to each block.
    row_start: [batch] internal position of each row's first query (its tail starts at the block boundary before).
    inv_freq: [head_dim // 2] RoPE frequencies.
    local_keys, local_values: where [tail | chunk] is read, already holding the chunk: block c of a row at index
        c % local_keys.shape[1] (a ring of recent blocks; the whole store, as by default, has every block at its own
        index). Default: `keys`, `values`.
    chunk_length: the queries run in chunks of this many (default: all n in one), each attending to its own
        [tail | chunk] as if it were a pass of its own: the query at offset i from the tail of the block that holds
        row_start + i // chunk_length * chunk_length (the table holds each chunk's own selection).
    Returns [batch, q_heads, n, head_dim] in the query's dtype, laid out as [batch, n, q_heads, head_dim] in memory.
    """
    local_keys = keys if local_keys is None else local_keys
    local_values = values if local_values is None else local_values
    _check_inputs(query, keys, values, local_keys, local_values, table, starts, row_start, inv_freq)
    query, keys, values, local_keys, local_values = (
        _unit_inner_stride(t) for t in (query, keys, values, local_keys, local_values)
    )
    batch, q_heads, n, head_dim = query.shape
    kv_heads, block_size = keys.shape[2], keys.shape[3]
    # int64 indices: block * the store's block stride can pass 2**31 (a 7B store of 512k positions)
    table, starts, row_start = (t.long().contiguous() for t in (table, starts, row_start))
    # [batch, q_heads, n, head_dim] laid out as [batch, n, q_heads, head_dim]: what the attention module reshapes
    out = query.new_empty(batch, n, q_heads, head_dim).transpose(1, 2)
    if out.numel() == 0:
        return out
    chunk_length = max(n, 1) if chunk_length is None else chunk_length
    if chunk_length < 1 or (table.shape[2] == 1 and chunk_length < n):
        raise ValueError(f"retrieval_attention: chunk_length must be positive, and cover the pass with one selection "
                         f"per chunk (a table of one row), got {chunk_length} for {n} queries.")
    table_stride_n = 0 if table.shape[2] == 1 else table.stride(2)
    strides = (
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        values.stride(0), values.stride(1), values.stride(2), values.stride(3),
        local_keys.stride(0), local_keys.stride(1), local_keys.stride(2), local_keys.stride(3),
        local_values.stride(0), local_values.stride(1), local_values.stride(2), local_values.stride(3),
        table.stride(0), table.stride(1), table_stride_n,
        out.stride(0), out.stride(1), out.stride(2),
    )
    inv_freq = inv_freq.float().contiguous()
    half = head_dim // 2
    if n >= TILES_FROM:  # a prefill chunk: tiles of queries on the tensor cores
        settings = dict(BLOCK_SIZE=block_size, BLOCK_PAD=max(16, triton.next_power_of_2(block_size)), HALF=half,
                        HALF_PAD=max(16, triton.next_power_of_2(half)),
                        DOT_PRECISION="tf32x3" if keys.dtype == torch.float32 else "tf32",
                        UPCAST_DOT=_interpreting() and keys.dtype == torch.bfloat16)
        shares = table.shape[2] > 1  # each query its own blocks: their shares block by block first
        gates, mixes = (_retrieved_shares(query, keys, values, table, starts, inv_freq, sm_scale,
                                          strides[:11],  # the query's and the store's
                                          settings) if shares else (out, out))
        _retrieval_attention_tiles_kernel[(triton.cdiv(n, QUERY_TILE), batch * q_heads)](
            query, keys, values, local_keys, local_values, table, starts, row_start, inv_freq, out, gates, mixes,
            *strides,
            q_heads, n, table.shape[3], local_keys.shape[1], chunk_length, float(sm_scale),
            KV_GROUP=q_heads // kv_heads, BLOCK_M=QUERY_TILE, SHARES=shares, STAGES=TILES_STAGES, **settings,
            num_warps=TILES_WARPS, enable_fp_fusion=True,
        )
        return out
    half_pad = triton.next_power_of_2(half)
    splits = _splits(n, batch * q_heads, table.shape[3], block_size)
    partial = out if splits == 1 else torch.empty(n * batch * q_heads * splits * (2 + 2 * half_pad),
                                                  dtype=torch.float32, device=query.device)
    _retrieval_attention_kernel[(n, batch * q_heads, splits)](
        query, keys, values, local_keys, local_values, table, starts, row_start, inv_freq, out, partial, *strides,
        q_heads, table.shape[3], local_keys.shape[1], chunk_length, float(sm_scale),
        KV_GROUP=q_heads // kv_heads, BLOCK_SIZE=block_size, BLOCK_PAD=triton.next_power_of_2(block_size),
        HALF=half, HALF_PAD=half_pad, SPLITS=splits,
        num_warps=min(8, max(1, triton.next_power_of_2(block_size) * half_pad // SPREAD_ELEMENTS_PER_WARP)),
        enable_fp_fusion=True,  # explicit: Triton 3.10 turns the default off
    )
    if splits > 1:
        _merge_splits_kernel[(n, batch * q_heads)](
            partial, out, out.stride(0), out.stride(1), out.stride(2), q_heads,
            HALF=half, HALF_PAD=half_pad, SPLITS=splits, num_warps=1, enable_fp_fusion=True,
        )
    return out
