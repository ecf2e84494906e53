"""Attention of queries to the cache blocks they retrieved (landmark-llama's inference form) as one Triton kernel.

Paper: A. Mohtashami and M. Jaggi, NeurIPS 2023, arXiv:2305.16300, section 3.2.

What is computed. Each query retrieved up to k blocks of the block-retrieval cache (its own with `"token"`
granularity, its head's for the whole chunk with `"chunk"`), each assigned a start position. The store keeps a
block's keys rotated by their offset in the block only, so the query is rotated back by the block's start instead
(<q at m, key at start + o> = <q rotated by m - start, key rotated by o>). Per block c, with scaled scores s_cj:
the landmark score g_c (slot block_size - 1) is the block's gate, and the block's regular keys give
o_c = softmax_j(s_cj) . v_c. The kernel returns the gated mix and its log-normaliser,
  out = sum_c exp(g_c - lse) o_c,    lse = logsumexp_c g_c    (out = 0, lse = -inf without a block),
which is the retrieved share of the grouped softmax: the caller merges it with the part over [tail | chunk] like
flash decoding merges the pieces of a split key range.

Layout. One program per query and head: each selected block is read straight from the store through the block
table (no gathered per-query copies), from the query head's key/value head (GQA without repeating keys). Scores
and softmax in fp32; keys and values in any float dtype. head_dim must be even (RoPE rotates pairs).
"""

import torch

try:  # guarded like landmark_attention.py: the remote-code import check must not demand Triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("retrieval_attention needs Triton (pip install triton); the eager path works without it."
                      ) from error

__all__ = ["retrieved_block_attention", "MAX_HEAD_DIM", "MAX_BLOCK_SIZE"]

MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 128


# ---------------------------------------------------------------------------------------------------------
# Layer 1: the Triton kernel
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _retrieved_attention_kernel(
    q, keys, values, table, starts, inv_freq, out, lse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kc, stride_kh, stride_ko,
    stride_vb, stride_vc, stride_vh, stride_vo,
    stride_tb, stride_th, stride_tn,
    stride_ob, stride_oh, stride_on,
    q_heads, top_k, sm_scale,
    KV_GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_b = tl.program_id(1) // q_heads
    i_h = tl.program_id(1) % q_heads
    i_kv = i_h // KV_GROUP
    d = tl.arange(0, HALF_PAD)
    in_half = d < HALF
    slot = tl.arange(0, BLOCK_PAD)
    in_block = slot < BLOCK_SIZE
    regular = slot < BLOCK_SIZE - 1
    tile_mask = in_block[:, None] & in_half[None, :]

    # the query in its two RoPE halves: rotate_half pairs dimension i with i + HALF
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + i_n.to(tl.int64) * stride_qn
    q1 = tl.load(p_q + d, mask=in_half, other=0.0).to(tl.float32)
    q2 = tl.load(p_q + HALF + d, mask=in_half, other=0.0).to(tl.float32)
    freq = tl.load(inv_freq + d, mask=in_half, other=0.0)
    p_table = i_b.to(tl.int64) * stride_tb + i_h * stride_th + i_n.to(tl.int64) * stride_tn
    p_keys = keys + i_b.to(tl.int64) * stride_kb + i_kv * stride_kh + slot[:, None] * stride_ko + d[None, :]
    p_values = values + i_b.to(tl.int64) * stride_vb + i_kv * stride_vh + slot[:, None] * stride_vo + d[None, :]

    gate_max = -float("inf")
    gate_sum = 0.0
    acc1 = tl.zeros([HALF_PAD], dtype=tl.float32)
    acc2 = tl.zeros([HALF_PAD], dtype=tl.float32)
    for j in range(0, top_k):
        block = tl.load(table + p_table + j)
        if block >= 0:
            # rotate the query back by the block's start (the store's keys are rotated by their offset only)
            angle = -tl.load(starts + p_table + j).to(tl.float32) * freq
            cos, sin = tl.cos(angle), tl.sin(angle)
            r1 = q1 * cos - q2 * sin
            r2 = q2 * cos + q1 * sin
            p_k = p_keys + block.to(tl.int64) * stride_kc
            k1 = tl.load(p_k, mask=tile_mask, other=0.0).to(tl.float32)
            k2 = tl.load(p_k + HALF, mask=tile_mask, other=0.0).to(tl.float32)
            scores = (tl.sum(k1 * r1[None, :], 1) + tl.sum(k2 * r2[None, :], 1)) * sm_scale
            gate = tl.sum(tl.where(slot == BLOCK_SIZE - 1, scores, 0.0), 0)
            scores = tl.where(regular, scores, -float("inf"))
            weights = tl.exp(scores - tl.max(scores, 0))
            weights = weights / tl.sum(weights, 0)
            p_v = p_values + block.to(tl.int64) * stride_vc
            v1 = tl.load(p_v, mask=tile_mask, other=0.0).to(tl.float32)
            v2 = tl.load(p_v + HALF, mask=tile_mask, other=0.0).to(tl.float32)
            # online softmax over the gates of the blocks seen so far
            new_max = tl.maximum(gate_max, gate)
            rescale = tl.exp(gate_max - new_max)
            share = tl.exp(gate - new_max)
            gate_sum = gate_sum * rescale + share
            acc1 = acc1 * rescale + share * tl.sum(weights[:, None] * v1, 0)
            acc2 = acc2 * rescale + share * tl.sum(weights[:, None] * v2, 0)
            gate_max = new_max

    has_blocks = gate_sum > 0
    norm = tl.where(has_blocks, gate_sum, 1.0)
    p_out = out + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + i_n.to(tl.int64) * stride_on
    tl.store(p_out + d, acc1 / norm, mask=in_half)
    tl.store(p_out + HALF + d, acc2 / norm, mask=in_half)
    p_lse = lse + (i_b.to(tl.int64) * q_heads + i_h) * tl.num_programs(0) + i_n
    tl.store(p_lse, tl.where(has_blocks, gate_max + tl.log(norm), -float("inf")))


# ---------------------------------------------------------------------------------------------------------
# Layer 2: the launcher (validate, allocate, build the grid) and the public function
# ---------------------------------------------------------------------------------------------------------
def _check_inputs(query, keys, values, table, starts, inv_freq):
    if query.dim() != 4 or keys.dim() != 5 or values.shape != keys.shape:
        raise ValueError(
            "retrieved_block_attention: query must be [batch, q_heads, n, head_dim] and keys, values the cache's "
            f"[batch, capacity, kv_heads, block_size, head_dim], got {tuple(query.shape)}, {tuple(keys.shape)}, "
            f"{tuple(values.shape)}."
        )
    batch, q_heads, n, head_dim = query.shape
    kv_heads, block_size = keys.shape[2], keys.shape[3]
    if keys.shape[0] != batch or keys.shape[-1] != head_dim or q_heads % kv_heads:
        raise ValueError(
            f"retrieved_block_attention: keys {tuple(keys.shape)} do not match the query {tuple(query.shape)} "
            "(batch and head_dim equal, q_heads a multiple of kv_heads)."
        )
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"retrieved_block_attention: head_dim must be even and at most {MAX_HEAD_DIM}, got "
                         f"{head_dim}; use the eager retrieval path.")
    if not 2 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"retrieved_block_attention: block_size must be 2..{MAX_BLOCK_SIZE}, got {block_size}; use "
                         "the eager retrieval path.")
    if table.dim() != 4 or table.shape[:2] != (batch, q_heads) or table.shape[2] not in (1, n):
        raise ValueError(f"retrieved_block_attention: the block table must be [batch, q_heads, n or 1, k], got "
                         f"{tuple(table.shape)} for a query of {tuple(query.shape)}.")
    if starts.shape != table.shape or inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"retrieved_block_attention: starts {tuple(starts.shape)} must match the table "
                         f"{tuple(table.shape)} and inv_freq be [{head_dim // 2}], got {tuple(inv_freq.shape)}.")


def _unit_inner_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def retrieved_block_attention(query, keys, values, table, starts, inv_freq, sm_scale):
    """The retrieved share of the grouped softmax, read through a block table (see the module docstring).

    query: [batch, q_heads, n, head_dim], rotated to its positions (RoPE attention scaling already applied).
    keys, values: the cache store, [batch, capacity, kv_heads, block_size, head_dim], keys rotated by their offset
        in the block.
    table: [batch, q_heads, n or 1 (one selection per chunk), k] integer block indices; -1 where no block was picked.
    starts: like `table`, the position assigned to each block.
    inv_freq: [head_dim // 2] RoPE frequencies.
    Returns (out [batch, q_heads, n, head_dim] fp32, lse [batch, q_heads, n] fp32).
    """
    _check_inputs(query, keys, values, table, starts, inv_freq)
    query, keys, values = (_unit_inner_stride(t) for t in (query, keys, values))
    batch, q_heads, n, head_dim = query.shape
    kv_heads, block_size = keys.shape[2], keys.shape[3]
    table, starts = table.contiguous(), starts.contiguous()
    out = torch.empty(batch, q_heads, n, head_dim, device=query.device, dtype=torch.float32)
    lse = torch.empty(batch, q_heads, n, device=query.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    table_stride_n = 0 if table.shape[2] == 1 else table.stride(2)
    half = head_dim // 2
    _retrieved_attention_kernel[(n, batch * q_heads)](
        query, keys, values, table, starts, inv_freq.float().contiguous(), out, lse,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        values.stride(0), values.stride(1), values.stride(2), values.stride(3),
        table.stride(0), table.stride(1), table_stride_n,
        out.stride(0), out.stride(1), out.stride(2),
        q_heads, table.shape[3], float(sm_scale),
        KV_GROUP=q_heads // kv_heads, BLOCK_SIZE=block_size, BLOCK_PAD=triton.next_power_of_2(block_size),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), num_warps=4 if block_size * half <= 4096 else 8,
    )
    return out, lse
