"""The cache write of one pass through the stack (a decoding step or a prefill chunk) as one Triton kernel: the new
keys and values into the block store, the landmark keys of the blocks they complete, and the queries rotated to their
positions.

Paper: A. Mohtashami and M. Jaggi, NeurIPS 2023, arXiv:2305.16300, section 3.2.

It computes what `cache_landmark_llama.LandmarkCacheLayer.update` and the query rotation of
`modeling_landmark_llama.landmark_retrieval_attention` compute with PyTorch, in one launch instead of about twenty
small kernels a layer. For new position p = row_start + i of a row (block p // block_size, offset o = p % block_size):
  * the key, rotated by o alone, and the value go to the store at block (p // block_size) % ring, slot o (the whole
    store, or the offloaded cache's ring of recent blocks);
  * where o is the landmark slot (block_size - 1), the key completes its block: rotated further to the block's start,
    it is the block's landmark key at its true position (`landmarks`); the offloaded cache also keeps it rotated by
    o alone (`in_block`);
  * the query is rotated to p.
Every position of the pass is written, padding too: slots past a row's tail hold scratch. Rotations in fp32 from fp32
angles, as stock Llama's RoPE makes them; each result is rounded once to its store's dtype.
"""

import torch

try:  # guarded like landmark_attention.py: the remote-code import check must not demand Triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("chunk_write needs Triton (pip install triton); the eager path works without it.") from error

from .retrieval_attention import _rotate_back  # the rotation the attention kernel applies

__all__ = ["write_chunk"]


# ---------------------------------------------------------------------------------------------------------
# Layer 1: the Triton kernel
# ---------------------------------------------------------------------------------------------------------
# sizes that change with the prompt and the pass, never specialised on (a new prompt length compiles nothing new;
# the strides keep their multiples of 16 whatever the length, which vector loads need)
WRITE_SIZES = ["kv_heads", "width", "ring"]


@triton.jit(do_not_specialize=WRITE_SIZES)
def _write_chunk_kernel(
    q, k, v, q_out, key_store, value_store, landmarks, in_block, row_start, inv_freq,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_sb, stride_sc, stride_sh, stride_so,
    stride_wb, stride_wc, stride_wh, stride_wo,
    stride_lb, stride_lc, stride_lh,
    stride_ib, stride_ic, stride_ih,
    kv_heads, width, ring,
    KV_GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    POSITIONS: tl.constexpr, IN_BLOCK: tl.constexpr,
):
    i_b = tl.program_id(1) // kv_heads
    i_kv = tl.program_id(1) % kv_heads
    i = tl.program_id(0) * POSITIONS + tl.arange(0, POSITIONS)
    inside = i < width
    d = tl.arange(0, HALF_PAD)
    in_half = d < HALF
    mask = inside[:, None] & in_half[None, :]
    freq = tl.load(inv_freq + d, mask=in_half, other=0.0)[None, :]
    position = tl.load(row_start + i_b) + i
    block = position // BLOCK_SIZE
    offset = (position % BLOCK_SIZE)[:, None]
    rows = i_b.to(tl.int64)

    # keys rotated by their offset in the block, and values, into the store
    p_k = k + rows * stride_kb + i_kv * stride_kh + i[:, None] * stride_kn + d[None, :]
    k1, k2 = _rotate_back(tl.load(p_k, mask=mask, other=0.0).to(tl.float32),
                          tl.load(p_k + HALF, mask=mask, other=0.0).to(tl.float32), freq, -offset)
    k1, k2 = k1.to(key_store.dtype.element_ty), k2.to(key_store.dtype.element_ty)
    p_store = (key_store + rows * stride_sb + (block % ring)[:, None].to(tl.int64) * stride_sc + i_kv * stride_sh
               + offset * stride_so + d[None, :])
    tl.store(p_store, k1, mask=mask)
    tl.store(p_store + HALF, k2, mask=mask)
    p_v = v + rows * stride_vb + i_kv * stride_vh + i[:, None] * stride_vn + d[None, :]
    p_value_store = (value_store + rows * stride_wb + (block % ring)[:, None].to(tl.int64) * stride_wc
                     + i_kv * stride_wh + offset * stride_wo + d[None, :])
    tl.store(p_value_store, tl.load(p_v, mask=mask, other=0.0), mask=mask)
    tl.store(p_value_store + HALF, tl.load(p_v + HALF, mask=mask, other=0.0), mask=mask)

    # the landmark keys of the blocks these positions complete, from the keys as stored
    completes = mask & (offset == BLOCK_SIZE - 1)
    l1, l2 = _rotate_back(k1.to(tl.float32), k2.to(tl.float32), freq, -(block * BLOCK_SIZE)[:, None])
    p_landmark = landmarks + rows * stride_lb + block[:, None].to(tl.int64) * stride_lc + i_kv * stride_lh + d[None, :]
    tl.store(p_landmark, l1.to(landmarks.dtype.element_ty), mask=completes)
    tl.store(p_landmark + HALF, l2.to(landmarks.dtype.element_ty), mask=completes)
    if IN_BLOCK:
        p_in_block = (in_block + rows * stride_ib + block[:, None].to(tl.int64) * stride_ic + i_kv * stride_ih
                      + d[None, :])
        tl.store(p_in_block, k1.to(in_block.dtype.element_ty), mask=completes)
        tl.store(p_in_block + HALF, k2.to(in_block.dtype.element_ty), mask=completes)

    # the queries of this key/value head's query heads, rotated to their positions
    for g in tl.static_range(KV_GROUP):
        head = i_kv * KV_GROUP + g
        p_q = q + rows * stride_qb + head * stride_qh + i[:, None] * stride_qn + d[None, :]
        q1, q2 = _rotate_back(tl.load(p_q, mask=mask, other=0.0).to(tl.float32),
                              tl.load(p_q + HALF, mask=mask, other=0.0).to(tl.float32), freq, -position[:, None])
        p_out = q_out + rows * stride_ob + head * stride_oh + i[:, None] * stride_on + d[None, :]
        tl.store(p_out, q1.to(q_out.dtype.element_ty), mask=mask)
        tl.store(p_out + HALF, q2.to(q_out.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Layer 2: the launcher and the public function
# ---------------------------------------------------------------------------------------------------------
def write_chunk(query, key_states, value_states, key_store, value_store, landmarks, in_block, row_start, inv_freq):
    """Write a pass's keys and values and its landmark keys (see the module docstring); returns the rotated query.

    query [batch, q_heads, width, head_dim], key_states and value_states [batch, kv_heads, width, head_dim]: the
        pass's, unrotated.
    key_store, value_store: [batch, ring, kv_heads, block_size, head_dim], block c at c % ring.
    landmarks: [batch, capacity, kv_heads, head_dim] landmark keys at their true positions; in_block: the same
        rotated by offset alone, or None where the key store keeps them.
    row_start: [batch] internal position of each row's first new position. inv_freq: [head_dim // 2].
    """
    batch, q_heads, width, head_dim = query.shape
    kv_heads, block_size = key_store.shape[2], key_store.shape[3]
    if (key_states.shape != (batch, kv_heads, width, head_dim) or value_states.shape != key_states.shape
            or key_store.shape[-1] != head_dim or value_store.shape != key_store.shape or head_dim % 2
            or q_heads % kv_heads):
        raise ValueError(
            f"write_chunk: query {tuple(query.shape)}, keys {tuple(key_states.shape)}, values "
            f"{tuple(value_states.shape)} do not fit the store {tuple(key_store.shape)} (even head_dim, q_heads a "
            "multiple of kv_heads)."
        )
    for name, store in (("key_store", key_store), ("value_store", value_store), ("landmarks", landmarks),
                        ("in_block", in_block)):
        if store is not None and store.stride(-1) != 1:
            raise ValueError(f"write_chunk: {name} needs a unit last stride, got strides {store.stride()}.")
    query, key_states, value_states = (t if t.stride(-1) == 1 else t.contiguous()
                                       for t in (query, key_states, value_states))
    rotated = torch.empty_like(query, memory_format=torch.contiguous_format)
    if rotated.numel() == 0:
        return rotated
    in_block_store = landmarks if in_block is None else in_block  # (not written without IN_BLOCK)
    half = head_dim // 2
    positions = min(32, triton.next_power_of_2(width))
    _write_chunk_kernel[(triton.cdiv(width, positions), batch * kv_heads)](
        query, key_states, value_states, rotated, key_store, value_store, landmarks, in_block_store,
        row_start.long().contiguous(), inv_freq.float().contiguous(),
        query.stride(0), query.stride(1), query.stride(2),
        key_states.stride(0), key_states.stride(1), key_states.stride(2),
        value_states.stride(0), value_states.stride(1), value_states.stride(2),
        rotated.stride(0), rotated.stride(1), rotated.stride(2),
        key_store.stride(0), key_store.stride(1), key_store.stride(2), key_store.stride(3),
        value_store.stride(0), value_store.stride(1), value_store.stride(2), value_store.stride(3),
        landmarks.stride(0), landmarks.stride(1), landmarks.stride(2),
        in_block_store.stride(0), in_block_store.stride(1), in_block_store.stride(2),
        kv_heads, width, key_store.shape[1],
        KV_GROUP=q_heads // kv_heads, BLOCK_SIZE=block_size, HALF=half, HALF_PAD=triton.next_power_of_2(half),
        POSITIONS=positions, IN_BLOCK=in_block is not None, num_warps=4,
        enable_fp_fusion=True,  # explicit: Triton 3.10 turns the default off
    )
    return rotated
