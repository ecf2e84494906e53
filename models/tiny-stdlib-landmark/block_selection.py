"""Block selection of the block-retrieval cache for per-token retrieval, as one Triton kernel: each query's landmark
scores, its top k blocks with the cache's tie rule, and the positions the retrieval assigns them.

Paper: A. Mohtashami and M. Jaggi, NeurIPS 2023, arXiv:2305.16300, section 3.2 (3.2.1 for stingy positions).

It computes what `cache_landmark_llama.LandmarkCacheLayer.retrieve` computes with PyTorch for
`retrieval_granularity="token"`, in one launch instead of some forty small kernels a layer:
  * score of complete block c for a query q: <q, landmark of c at its true position> * scale; with stingy positions
    the blocks older than the row's k most recent are scored at the landmark slot of the stingy window's first
    block: <q rotated back by the window's start, landmark rotated by its offset alone> * scale;
  * the k highest in block order, where scores within `tie_tolerance` times the row's largest magnitude of the k-th
    highest count as equal to it and the earliest of them fill the places left (`top_blocks`);
  * stingy starts: older picks packed from the window's left, recent ones one block further right; true starts:
    the block's own.

Layout. One program per query and head; its scores go to a scratch row, which later passes read back (4 bytes a
block instead of a landmark key): the k-th highest by k counting passes, then the blocks above it and the ties in
block order.
"""

import torch

try:  # guarded like landmark_attention.py: the remote-code import check must not demand Triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("block_selection needs Triton (pip install triton); the eager path works without it."
                      ) from error

from .retrieval_attention import _rotate_back  # the rotation the attention kernel applies

__all__ = ["select_blocks"]

TILE = 128  # blocks scored per step of a program's loop


# ---------------------------------------------------------------------------------------------------------
# Layer 1: the Triton kernel
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _select_blocks_kernel(
    q, landmarks, in_block, blocks, inv_freq, scratch, selected, valid, starts,
    stride_qb, stride_qh, stride_qn,
    stride_lb, stride_lc, stride_lh,
    stride_ib, stride_ic, stride_ih,
    q_heads, n, num_blocks, k, top_k, scale, tie_tolerance,
    KV_GROUP: tl.constexpr, STINGY: tl.constexpr, BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, K_PAD: tl.constexpr, TILE: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_b = tl.program_id(1) // q_heads
    i_h = tl.program_id(1) % q_heads
    i_kv = i_h // KV_GROUP
    d = tl.arange(0, HALF_PAD)
    in_half = d < HALF
    tile = tl.arange(0, TILE)
    row = (i_b.to(tl.int64) * q_heads + i_h) * n + i_n  # this program's row of scratch and outputs
    p_scratch = scratch + row * num_blocks

    p_q = q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + i_n.to(tl.int64) * stride_qn
    q1 = tl.load(p_q + d, mask=in_half, other=0.0).to(tl.float32)
    q2 = tl.load(p_q + HALF + d, mask=in_half, other=0.0).to(tl.float32)
    complete = tl.load(blocks + i_b)
    row_k = tl.minimum(complete, top_k)
    recent_from = complete - row_k  # blocks before it are older than the row's k most recent
    window_start = (complete - row_k - 1) * BLOCK_SIZE
    if STINGY:
        r1, r2 = _rotate_back(q1, q2, tl.load(inv_freq + d, mask=in_half, other=0.0), window_start)

    # 1. scores of every block (-inf past the row's complete ones), and the largest magnitude
    largest = 0.0
    p_l = landmarks + i_b.to(tl.int64) * stride_lb + i_kv * stride_lh + d[None, :]
    p_i = in_block + i_b.to(tl.int64) * stride_ib + i_kv * stride_ih + d[None, :]
    for start in range(0, num_blocks, TILE):
        c = start + tile
        exists = c < complete
        mask = exists[:, None] & in_half[None, :]
        l1 = tl.load(p_l + c[:, None].to(tl.int64) * stride_lc, mask=mask, other=0.0).to(tl.float32)
        l2 = tl.load(p_l + HALF + c[:, None].to(tl.int64) * stride_lc, mask=mask, other=0.0).to(tl.float32)
        score = tl.sum(l1 * q1[None, :], 1) + tl.sum(l2 * q2[None, :], 1)
        if STINGY:
            older = c < recent_from
            old_mask = (older & exists)[:, None] & in_half[None, :]
            i1 = tl.load(p_i + c[:, None].to(tl.int64) * stride_ic, mask=old_mask, other=0.0).to(tl.float32)
            i2 = tl.load(p_i + HALF + c[:, None].to(tl.int64) * stride_ic, mask=old_mask, other=0.0).to(tl.float32)
            score = tl.where(older, tl.sum(i1 * r1[None, :], 1) + tl.sum(i2 * r2[None, :], 1), score)
        score = tl.where(exists, score * scale, -float("inf"))
        largest = tl.maximum(largest, tl.max(tl.where(exists, tl.abs(score), 0.0), 0))
        tl.store(p_scratch + c, score, mask=c < num_blocks)
    tl.debug_barrier()

    # 2. the k-th highest score, duplicates counted (as topk's values): highest values one at a time with counts
    cutoff = -float("inf")
    below = float("inf")
    remaining = k
    for _ in range(0, k):
        value = -float("inf")
        count = 0
        for start in range(0, num_blocks, TILE):
            c = start + tile
            score = tl.load(p_scratch + c, mask=c < num_blocks, other=-float("inf"))
            score = tl.where(score < below, score, -float("inf"))
            tile_max = tl.max(score, 0)
            tile_count = tl.sum(((score == tile_max) & (c < num_blocks)).to(tl.int32), 0)
            count = tl.where(tile_max > value, tile_count, tl.where(tile_max == value, count + tile_count, count))
            value = tl.maximum(value, tile_max)
        cutoff = tl.where(remaining > 0, value, cutoff)
        remaining -= count
        below = value
    margin = tie_tolerance * largest

    # 3. how many are above the tie band
    above_count = 0
    for start in range(0, num_blocks, TILE):
        c = start + tile
        score = tl.load(p_scratch + c, mask=c < num_blocks, other=-float("inf"))
        above_count += tl.sum((score > cutoff + margin).to(tl.int32), 0)

    # 4. blocks above, and the earliest ties in the places left, in block order
    slot = tl.arange(0, K_PAD)
    p_out = row * k + slot
    tl.store(selected + p_out, tl.zeros([K_PAD], dtype=tl.int64), mask=slot < k)
    tl.debug_barrier()
    ties_seen = 0
    chosen_count = 0
    for start in range(0, num_blocks, TILE):
        c = start + tile
        score = tl.load(p_scratch + c, mask=c < num_blocks, other=-float("inf"))
        above = score > cutoff + margin
        tied = tl.abs(score - cutoff) <= margin  # false where both are -inf (NaN)
        chosen = above | (tied & (ties_seen + tl.cumsum(tied.to(tl.int32), 0) <= k - above_count))
        rank = chosen_count + tl.cumsum(chosen.to(tl.int32), 0)
        tl.store(selected + row * k + rank - 1, c.to(tl.int64), mask=chosen)
        ties_seen += tl.sum(tied.to(tl.int32), 0)
        chosen_count += tl.sum(chosen.to(tl.int32), 0)
    tl.debug_barrier()

    # 5. validity and the positions the retrieval assigns
    picked = tl.load(selected + p_out, mask=slot < k, other=0)
    tl.store(valid + p_out, slot < chosen_count, mask=slot < k)
    if STINGY:
        place = window_start + (slot + (picked >= recent_from).to(tl.int64)) * BLOCK_SIZE
    else:
        place = picked * BLOCK_SIZE
    tl.store(starts + p_out, place, mask=slot < k)


# ---------------------------------------------------------------------------------------------------------
# Layer 2: the launcher and the public function
# ---------------------------------------------------------------------------------------------------------
def select_blocks(query, landmarks, in_block_landmarks, blocks, num_blocks, block_size, top_k, stingy, inv_freq,
                  scale, tie_tolerance):
    """Per-token block selection (see the module docstring).

    query: [batch, q_heads, n, head_dim], rotated to its true positions (RoPE attention scaling applied).
    landmarks: [batch, capacity, kv_heads, head_dim] landmark keys at their true positions.
    in_block_landmarks: [batch, capacity or more, kv_heads, head_dim] landmark keys rotated by their offset alone
        (any strides but a unit last one; a view of the key store works).
    blocks: [batch] complete blocks of each row; num_blocks: the static bound scored (at least blocks.max()).
    block_size: positions per block; stingy: stingy positions (else true ones).
    top_k: the retrieval's k; k = min(top_k, num_blocks) places are returned.
    Returns (selected [batch, q_heads, n, k] int64 in block order, 0 where unpicked; valid [batch, q_heads, n, k] bool;
    starts [batch, q_heads, n, k] int64).
    """
    batch, q_heads, n, head_dim = query.shape
    kv_heads = landmarks.shape[2]
    if head_dim % 2 or q_heads % kv_heads or landmarks.shape[-1] != head_dim or num_blocks > landmarks.shape[1]:
        raise ValueError(
            f"select_blocks: query {tuple(query.shape)} (even head_dim, q_heads a multiple of kv_heads) does not fit "
            f"landmarks {tuple(landmarks.shape)} for {num_blocks} blocks."
        )
    if landmarks.stride(-1) != 1 or in_block_landmarks.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("select_blocks: query and landmark keys need a unit last stride.")
    k = min(top_k, num_blocks)
    shape = (batch, q_heads, n, k)
    selected = torch.empty(shape, dtype=torch.long, device=query.device)
    valid = torch.empty(shape, dtype=torch.bool, device=query.device)
    starts = torch.empty(shape, dtype=torch.long, device=query.device)
    if selected.numel() == 0:
        return selected, valid, starts
    scratch = torch.empty(batch * q_heads * n, num_blocks, dtype=torch.float32, device=query.device)
    half = head_dim // 2
    _select_blocks_kernel[(n, batch * q_heads)](
        query, landmarks, in_block_landmarks, blocks.long().contiguous(), inv_freq.float().contiguous(), scratch,
        selected, valid, starts,
        query.stride(0), query.stride(1), query.stride(2),
        landmarks.stride(0), landmarks.stride(1), landmarks.stride(2),
        in_block_landmarks.stride(0), in_block_landmarks.stride(1), in_block_landmarks.stride(2),
        q_heads, n, num_blocks, k, top_k, float(scale), float(tie_tolerance),
        KV_GROUP=q_heads // kv_heads, STINGY=bool(stingy), BLOCK_SIZE=block_size, HALF=half,
        HALF_PAD=triton.next_power_of_2(half), K_PAD=triton.next_power_of_2(k), TILE=TILE, num_warps=4,
        enable_fp_fusion=True,  # explicit: Triton 3.10 turns the default off
    )
    return selected, valid, starts
