"""Landmark attention (training form) as fused Triton kernels: forward, and a parallel backward.

Paper: A. Mohtashami and M. Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
Transformers", NeurIPS 2023, arXiv:2305.16300, section 3.1 (original code: github.com/epfml/landmark-attention).

What is computed. The keys are cut into blocks of `block_size` positions; the last position of every
block (position j with j % block_size == block_size - 1) holds a landmark. For query i (block b(i)) and
scaled scores s_ij = sm_scale * q_i . k_j:
  * local group: the regular (non-landmark) keys of the query's own block with j <= i;
  * gates: the landmark keys of the complete earlier blocks c < b(i), with logit g_ic = s_i,lm(c);
  * one softmax over local keys and gates; a regular key of an earlier block c gets the weight of the
    gate of c times a softmax, local to block c, of s_ij over the block's regular keys;
  * landmark values get weight 0; every row of weights sums to 1.

Algorithm. The grouped softmax is one ordinary softmax over modified scores:
  t_ij = s_ij                         for local keys,
  t_ij = s_ij + g_ic - lse_ic         for regular keys of an earlier block c,
  t_ij = -inf                         otherwise (landmarks, the own landmark, the future),
where lse_ic is the logsumexp of s_i. over the regular keys of block c: the keys of block c then carry
exp(g_ic) in total, the same as the gate. The key tile width BLOCK_N is a multiple of block_size, so a
tile holds whole blocks: the per-block maximum, sum and landmark logit are reduced on chip (a
[BLOCK_M, BLOCK_N // block_size, block_size] view of the score tile), and the kernel is a flash-attention
style online softmax with one exp2 per score (memory linear in the length, nothing of size
[n_q, n_blocks] in HBM). The backward recomputes the weights w from the saved logsumexp and uses, with
dp_ij = dO_i . v_j, D_i = dO_i . O_i, u_ij = softmax over block c of s_ij, G_ic = exp(g_ic - LSE_i) the
gate weight and Pbar_ic = sum_{j in c} u_ij dp_ij:
  ds_ij = w_ij (dp_ij - D_i)              local keys,
  ds_ij = w_ij (dp_ij - Pbar_ic)          regular keys of an earlier block c,
  ds_i,lm(c) = G_ic (Pbar_ic - D_i)        landmark key of an earlier block c,
then dq = scale * ds k, dk = scale * ds^T q, dv = w^T dO. It runs as three kernels: a preprocess
(D = rowsum(dO * O)), one over key tiles for dK/dV (no atomics: the program of a key tile loops over all
query heads of its key/value head and all query tiles, so the result is deterministic), one over query
tiles for dQ. Every kernel works on [queries x keys] score tiles, so the per-block reductions stay inside
a warp; dK/dV accumulate transposed (dK^T += q^T ds) so that w and ds feed the tensor cores from shared
memory without a register transpose. Tiles whose blocks all lie before every query of the tile take a
path without causal/bounds masks; only the diagonal tiles pay for them.

Layout contract: q [batch, q_heads, n_q, head_dim]; k, v [batch, kv_heads, n_k, head_dim] with n_k >= n_q;
the queries are the LAST n_q positions (query i sits at position n_k - n_q + i), so the same call
covers full-sequence training (n_q == n_k) and a chunk of queries over a history. Arbitrary strides are
accepted (e.g. q as the transpose of a [batch, n, heads, head_dim] projection), only the head dimension
must be contiguous (it is made so otherwise). q_heads must be a multiple of kv_heads (grouped-query
attention, without materialising repeated K/V). No mask argument: landmark counting starts at
position 0 of every row, so rows must be packed left-aligned and padded only at the end, where
causality hides the padding from every real token.

Supported: fp16, bf16 (fast path, fp32 scores and softmax statistics, fp32 accumulation) and fp32
(IEEE fp32 dots, no tf32: slow, for checking); head_dim from 1 to 128 (non-powers of two are padded to
the next power of two in registers and masked on load/store: head_dim 80 and 96 cost as much as 128);
any block_size from 2 to 128; any n_q <= n_k (incomplete last block, history not ending on a block
boundary). A block size that is no power of two (the paper's 51) runs with each block in a slot of the
next power of two: its regular tokens first, its landmark last, phantom positions between, which the
kernels mask out like landmarks (BLOCK_TOKENS real positions in a slot of BLOCK_SIZE). Only the keys and values
are laid out so (64/51 = 1.25x the key positions for block 51): the queries stay as they are, and the kernels
find a query's slot from its position. Lengths are not specialised
on (no recompilation when only lengths change); the autotuner keys on head_dim, block_size, the GQA
group, the dtypes and the size in powers of two (key length, batch * q_heads), so a length tunes once per
power of two (LANDMARK_ATTN_AUTOTUNE=0 takes the first valid config of each list instead, e.g. in tests). GPUs:
written and tuned on an H100 (sm_90), run there with triton 3.6; every config is compiled for sm_90 by the
CPU tests (tests/compile_kernels.py) with whatever Triton is installed (3.6 and 3.9 checked); other NVIDIA
GPUs that Triton supports are untested. Also runs on the CPU under TRITON_INTERPRET=1 (slow; for the tests).

Speed (H100 SXM, bf16, batch 1, 32 heads of 128, block_size 64; benchmarks/results/attention_h100.md):
forward 400-455 TFLOP/s at 8k-32k tokens (torch SDPA flash 310-350, cuDNN 550-610); forward+backward
310-330 TFLOP/s, level with SDPA flash and about 1.6-1.75x the time of cuDNN. Peak memory is linear in
the length (the saved logsumexp and D are [batch, q_heads, n_q] fp32). H200 at fine-tuning sizes (16 x 512,
4 x 2k, 1 x 2k, MHA and GQA 32/8; benchmarks/results/attention_h200/): forward+backward level with or up to 1.4x
faster than SDPA flash, about 1.3-2x the time of cuDNN.

Limitations: head_dim > 128 and block_size > 128 are refused (register pressure; use the eager path);
sm_scale must be positive; no dropout; no attention mask; no cache/retrieval (this is the training form
of section 1 of the spec). The backward recomputes scores in both the dK/dV and the dQ kernel (7 matrix
products instead of 5; adding dQ atomically from the dK/dV kernel instead was measured slower, up to 2x at
32k tokens, from the atomic traffic: benchmarks/results/tile_sweep_h100.md), and without warp specialisation
the softmax-like work of a tile does not overlap the tensor-core work of the next: that, not memory, bounds
the backward.
"""

import math
import os

import torch


# Guarded so that transformers' remote-code import check (which skips try blocks) does not demand Triton on
# machines that only run the eager path; the model catches this ImportError and falls back.
try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("landmark_attention needs Triton (pip install triton); the eager path works without it."
                      ) from error

__all__ = ["landmark_attention", "landmark_attn_fwd", "landmark_attn_bwd", "LandmarkAttnFunction", "MAX_HEAD_DIM"]

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
_MAX_BLOCK_SIZE = 128


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------
# Layer 1: Triton kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST_DOT is set only under TRITON_INTERPRET=1 for bf16 inputs: the
    interpreter stores bf16 as uint16 and its dot multiplies the bit patterns (2026-11, triton 3.9;
    https://github.com/triton-lang/triton/issues/11584, "not supported yet"). bf16 products are exact in
    fp32, so upcasting computes what the GPU's bf16 tensor-core dot computes."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_tile(p, o_r, n_r, stride_r, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """[len(o_r), D_PAD] tile of rows o_r (row stride stride_r, unit column stride), zero outside; the row mask
    (o_r < n_r) and the head-dim mask are emitted only where they can cut anything (fewer predicated loads)."""
    o_d = tl.arange(0, D_PAD)
    p_t = p + o_r[:, None] * stride_r + o_d[None, :]
    if MASK_ROWS:
        if HEAD_DIM == D_PAD:
            b_t = tl.load(p_t, mask=(o_r < n_r)[:, None], other=0.0)
        else:
            b_t = tl.load(p_t, mask=(o_r < n_r)[:, None] & (o_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == D_PAD:
            b_t = tl.load(p_t)
        else:
            b_t = tl.load(p_t, mask=(o_d < HEAD_DIM)[None, :], other=0.0)
    return b_t


@triton.jit
def _load_row_stats(p_lse, p_delta, o_i, n_q, MASK_ROWS: tl.constexpr):
    """[len(o_i)] row logsumexp and rowsum(dO * O) of the backward; rows past n_q (MASK_ROWS) get lse = +inf,
    hence zero weights."""
    if MASK_ROWS:
        b_lse = tl.load(p_lse + o_i, mask=o_i < n_q, other=float("inf"))
        b_delta = tl.load(p_delta + o_i, mask=o_i < n_q, other=0.0)
    else:
        b_lse = tl.load(p_lse + o_i)
        b_delta = tl.load(p_delta + o_i)
    return b_lse, b_delta


@triton.jit
def _store_tile(p, o_r, n_r, stride_r, b_t, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Store the [len(o_r), D_PAD] tile b_t, cast to p's element type, to the rows o_r < n_r and columns < HEAD_DIM."""
    o_d = tl.arange(0, D_PAD)
    tl.store(p + o_r[:, None] * stride_r + o_d[None, :], b_t.to(p.dtype.element_ty),
             mask=(o_r < n_r)[:, None] & (o_d < HEAD_DIM)[None, :])


@triton.jit
def _head(p, i_b, i_h, stride_b, stride_h):
    """Pointer to the [n, head_dim] matrix of batch i_b, head i_h (64-bit offsets: large tensors overflow int32)."""
    return p + i_b.to(tl.int64) * stride_b + i_h.to(tl.int64) * stride_h


@triton.jit
def _slot_of(p, BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr):
    """Key slot of real position p: blocks of BLOCK_TOKENS positions each take a slot of BLOCK_SIZE, regular tokens
    first and the landmark last (the identity where the two are equal)."""
    if BLOCK_TOKENS == BLOCK_SIZE:
        return p
    else:
        offset = p % BLOCK_TOKENS
        return p // BLOCK_TOKENS * BLOCK_SIZE + offset + (offset == BLOCK_TOKENS - 1).to(tl.int32) * (
            BLOCK_SIZE - BLOCK_TOKENS)


@triton.jit
def _first_position_from(x, BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr):
    """The first real position whose slot is x or later, for x at the start of a slot (a multiple of BLOCK_SIZE)."""
    return x // BLOCK_SIZE * BLOCK_TOKENS


@triton.jit
def _query_tile(q, k, v, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_vb, stride_vh, n_q, n_k,
                q_start, Q_HEADS: tl.constexpr, KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where the program of a query-tile kernel (forward, dQ) works: grid (batch * q_heads, query tiles), the
    heaviest (last) query tiles first for all heads, so the causal tail does not straggle.

    Returns the (batch * q_heads) index, batch and query head, the tile's query rows o_i and their key
    slots, the split of its key range ([0, n_lo) holds whole blocks earlier than the block of the tile's
    first query: no masks; [n_lo, n_hi) is the diagonal: causal, own-block and bounds masks), the pointers to
    its key/value head and its [BLOCK_M, D_PAD] query tile.
    """
    i_bh = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    i_b, i_h = i_bh // Q_HEADS, i_bh % Q_HEADS
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_lo = _slot_of(q_start + i_m * BLOCK_M, BLOCK_SIZE, BLOCK_TOKENS) // BLOCK_SIZE * BLOCK_SIZE // BLOCK_N * BLOCK_N
    n_hi = tl.minimum(_slot_of(q_start + (i_m + 1) * BLOCK_M - 1, BLOCK_SIZE, BLOCK_TOKENS) + 1, n_k)
    i_hk = i_h // KV_GROUP
    p_k = _head(k, i_b, i_hk, stride_kb, stride_kh)
    p_v = _head(v, i_b, i_hk, stride_vb, stride_vh)
    b_q = _load_tile(_head(q, i_b, i_h, stride_qb, stride_qh), o_i, n_q, stride_qn, True, HEAD_DIM, D_PAD)
    return i_bh, i_b, i_h, o_i, _slot_of(q_start + o_i, BLOCK_SIZE, BLOCK_TOKENS), n_lo, n_hi, p_k, p_v, b_q


@triton.jit
def _diagonal_masks(b_s3, o_pos, i_n, BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Block structure of a tile that may hold the queries' own blocks or lie past them (the diagonal).

    b_s3: [BLOCK_M, NG, BLOCK_SIZE] scores seen block by block; o_pos: [BLOCK_M] query positions; i_n: first key
    position of the tile. Returns [BLOCK_M, NG] masks of the blocks earlier than each query's block (gated) and
    of its own block (local), and the scores of the visible regular keys (-inf for landmarks, phantom slots, the
    future and other blocks).
    """
    NG: tl.constexpr = BLOCK_N // BLOCK_SIZE
    o_t = tl.arange(0, BLOCK_SIZE)
    i_blk = i_n // BLOCK_SIZE + tl.arange(0, NG)
    q_blk = o_pos // BLOCK_SIZE
    m_early = i_blk[None, :] < q_blk[:, None]
    m_own = i_blk[None, :] == q_blk[:, None]
    # [NG, BLOCK_SIZE] key positions
    o_k3 = i_n + tl.arange(0, NG)[:, None] * BLOCK_SIZE + o_t[None, :]
    m_reg = (m_early[:, :, None] | (m_own[:, :, None] & (o_k3[None, :, :] <= o_pos[:, None, None])))
    m_reg = m_reg & (o_t < BLOCK_TOKENS - 1)[None, None, :]
    return m_early, m_own, tl.where(m_reg, b_s3, float("-inf"))


@triton.jit
def _key_tile(b_q, p_k, p_v, i_n, n_k, stride_kn, stride_vn, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
              D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key and value tiles [BLOCK_N, D_PAD] at key position i_n (rows past n_k zero where MASKED) and the raw
    fp32 products q.k [BLOCK_M, BLOCK_N] of a query-tile kernel."""
    o_k = i_n + tl.arange(0, BLOCK_N)
    b_k = _load_tile(p_k, o_k, n_k, stride_kn, MASKED, HEAD_DIM, D_PAD)
    b_v = _load_tile(p_v, o_k, n_k, stride_vn, MASKED, HEAD_DIM, D_PAD)
    return b_k, b_v, _dot(b_q, tl.trans(b_k), DOT_PRECISION, UPCAST_DOT)


@triton.jit
def _fwd_weights(b_s, qk_scale, b_m, o_pos, i_n, MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unnormalised weights of one score tile for the online softmax.

    b_s: [BLOCK_M, BLOCK_N] raw products q.k (times qk_scale = sm_scale * log2(e) they are the scores in log2
    units: maxima are taken on the raw values and scaled per block, and each exp2 argument is one fused
    multiply-add); b_m: [BLOCK_M] running maximum (log2 units); o_pos: [BLOCK_M] query
    positions; i_n: first key position of the tile. MASKED=False is the fast path for tiles whose blocks
    are all complete and earlier than every query of the tile (no causal or bounds mask).
    Returns the weights p [BLOCK_M, BLOCK_N] relative to the new maximum, the new maximum and the sum of p.
    """
    NG: tl.constexpr = BLOCK_N // BLOCK_SIZE
    o_t = tl.arange(0, BLOCK_SIZE)
    # [1, 1, BLOCK_SIZE]: the last column of each block is its landmark, the first BLOCK_TOKENS - 1 its regular
    # keys; the columns between are phantom slots (block sizes that are no power of two), never attended to
    m_lm = (o_t == BLOCK_SIZE - 1)[None, None, :]
    m_key = (o_t < BLOCK_TOKENS - 1)[None, None, :]
    # [BLOCK_M, NG, BLOCK_SIZE]: the tile seen block by block (a view, no data movement on the GPU)
    b_s3 = tl.reshape(b_s, [BLOCK_M, NG, BLOCK_SIZE])
    # [BLOCK_M, NG] landmark logit (gate) of each block
    b_g = tl.max(tl.where(m_lm, b_s3, float("-inf")), 2) * qk_scale
    if MASKED:
        m_early, m_own, b_sr = _diagonal_masks(b_s3, o_pos, i_n, BLOCK_SIZE, BLOCK_TOKENS, BLOCK_M, BLOCK_N)
        # [BLOCK_M, NG] per-block maximum over visible regular keys
        b_gm = tl.max(b_sr, 2) * qk_scale
        # largest exponent a block contributes: its gate (earlier) or its maximum (own)
        b_h = tl.where(m_early, b_g, tl.where(m_own, b_gm, float("-inf")))
        b_m_new = tl.maximum(b_m, tl.max(b_h, 1))
        b_gm = tl.where(b_gm == float("-inf"), 0.0, b_gm)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_e3 = tl.exp2(b_sr * qk_scale - b_gm[:, :, None])
        # [BLOCK_M, NG] per-block sum, >= 1 for any visible block
        b_z = tl.sum(b_e3, 2)
        b_r = tl.where(m_early, tl.exp2(b_g - b_m_safe[:, None]) / tl.maximum(b_z, 1.0),
                       tl.where(m_own, tl.exp2(b_gm - b_m_safe[:, None]), 0.0))
    else:
        b_sr = tl.where(m_key, b_s3, float("-inf"))
        b_gm = tl.max(b_sr, 2) * qk_scale
        b_m_new = tl.maximum(b_m, tl.max(b_g, 1))
        b_e3 = tl.exp2(b_sr * qk_scale - b_gm[:, :, None])
        b_z = tl.sum(b_e3, 2)
        b_r = tl.exp2(b_g - b_m_new[:, None]) / b_z
    # [BLOCK_M, BLOCK_N]
    b_p = tl.reshape(b_e3 * b_r[:, :, None], [BLOCK_M, BLOCK_N])
    b_l = tl.sum(b_r * b_z, 1)
    return b_p, b_m_new, b_l


@triton.jit
def _fwd_step(b_acc, b_m, b_l, b_q, p_k, p_v, i_n, n_k, stride_kn, stride_vn, qk_scale, o_pos, MASKED: tl.constexpr,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile of the online softmax: returns the updated accumulator, running maximum and running sum."""
    # raw q.k products, scaled inside _fwd_weights
    b_k, b_v, b_s = _key_tile(b_q, p_k, p_v, i_n, n_k, stride_kn, stride_vn, MASKED, HEAD_DIM, D_PAD, DOT_PRECISION,
                              UPCAST_DOT, BLOCK_N)
    b_p, b_m_new, b_l_new = _fwd_weights(b_s, qk_scale, b_m, o_pos, i_n, MASKED, BLOCK_SIZE, BLOCK_TOKENS, BLOCK_M,
                                         BLOCK_N)
    if MASKED:
        # a row that has seen no visible key yet keeps its empty state
        b_alpha = tl.where(b_m_new == float("-inf"), 1.0, tl.exp2(b_m - b_m_new))
    else:
        b_alpha = tl.exp2(b_m - b_m_new)
    b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, DOT_PRECISION, UPCAST_DOT)
    return b_acc, b_m_new, b_l * b_alpha + b_l_new


@triton.jit(do_not_specialize=["n_q", "n_k", "q_start", "tune_length", "tune_rows"])
def _landmark_fwd_kernel(
    q, k, v, o, lse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    n_q, n_k, q_start, qk_scale, tune_length, tune_rows,
    Q_HEADS: tl.constexpr, KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_bh, i_b, i_h, o_i, o_pos, n_lo, n_hi, p_k, p_v, b_q = _query_tile(
        q, k, v, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_vb, stride_vh, n_q, n_k, q_start,
        Q_HEADS, KV_GROUP, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_TOKENS, BLOCK_M, BLOCK_N)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for i_n in range(0, n_lo, BLOCK_N):
        b_acc, b_m, b_l = _fwd_step(b_acc, b_m, b_l, b_q, p_k, p_v, i_n, n_k, stride_kn, stride_vn, qk_scale, o_pos,
                                    False, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_TOKENS, DOT_PRECISION, UPCAST_DOT,
                                    BLOCK_M, BLOCK_N)
    for i_n in range(n_lo, n_hi, BLOCK_N):
        b_acc, b_m, b_l = _fwd_step(b_acc, b_m, b_l, b_q, p_k, p_v, i_n, n_k, stride_kn, stride_vn, qk_scale, o_pos,
                                    True, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_TOKENS, DOT_PRECISION, UPCAST_DOT,
                                    BLOCK_M, BLOCK_N)
    # epilogue: normalise, store the output and the log2-sum-exp of the rows
    _store_tile(_head(o, i_b, i_h, stride_ob, stride_oh), o_i, n_q, stride_on, b_acc / b_l[:, None], HEAD_DIM, D_PAD)
    tl.store(lse + i_bh.to(tl.int64) * n_q + o_i, b_m + tl.log2(b_l), mask=o_i < n_q)


@triton.jit(do_not_specialize=["n_q"])
def _landmark_bwd_preprocess_kernel(
    o, do, delta,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    n_q,
    Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    i_bh, i_m = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Q_HEADS, i_bh % Q_HEADS
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # [BLOCK_M, D_PAD]
    b_o = _load_tile(_head(o, i_b, i_h, stride_ob, stride_oh), o_i, n_q, stride_on, True, HEAD_DIM, D_PAD)
    b_do = _load_tile(_head(do, i_b, i_h, stride_dob, stride_doh), o_i, n_q, stride_don, True, HEAD_DIM, D_PAD)
    b_o, b_do = b_o.to(tl.float32), b_do.to(tl.float32)
    tl.store(delta + i_bh.to(tl.int64) * n_q + o_i, tl.sum(b_o * b_do, 1), mask=o_i < n_q)


@triton.jit
def _bwd_weights(b_s, qk_scale, b_dp, b_lse, b_delta, o_pos, i_n, MASKED: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weights w and score gradients ds of one [BLOCK_M, BLOCK_N] tile (queries x keys), for dK/dV and dQ.

    b_s: raw products q.k (scaled by qk_scale as in `_fwd_weights`); b_dp: dO v^T; b_lse: [BLOCK_M] row
    log2-sum-exp2; b_delta: [BLOCK_M] rowsum(dO * O).
    """
    NG: tl.constexpr = BLOCK_N // BLOCK_SIZE
    o_t = tl.arange(0, BLOCK_SIZE)
    m_lm = (o_t == BLOCK_SIZE - 1)[None, None, :]
    m_key = (o_t < BLOCK_TOKENS - 1)[None, None, :]
    # [BLOCK_M, NG, BLOCK_SIZE]
    b_s3 = tl.reshape(b_s, [BLOCK_M, NG, BLOCK_SIZE])
    b_dp3 = tl.reshape(b_dp, [BLOCK_M, NG, BLOCK_SIZE])
    # [BLOCK_M, NG]
    b_g = tl.max(tl.where(m_lm, b_s3, float("-inf")), 2) * qk_scale
    b_gate = tl.exp2(b_g - b_lse[:, None])
    if MASKED:
        m_early, m_own, b_sr = _diagonal_masks(b_s3, o_pos, i_n, BLOCK_SIZE, BLOCK_TOKENS, BLOCK_M, BLOCK_N)
        b_gm = tl.max(b_sr, 2) * qk_scale
        b_gm = tl.where(b_gm == float("-inf"), 0.0, b_gm)
        b_e3 = tl.exp2(b_sr * qk_scale - b_gm[:, :, None])
        b_z = tl.maximum(tl.sum(b_e3, 2), 1.0)
        # [BLOCK_M, NG] Pbar: mean of dp under the in-block softmax
        b_pbar = tl.sum(b_e3 * b_dp3, 2) / b_z
        b_r = tl.where(m_early, b_gate / b_z, tl.where(m_own, tl.exp2(b_gm - b_lse[:, None]), 0.0))
        b_base = tl.where(m_early, b_pbar, b_delta[:, None])
        b_dlm = tl.where(m_early, b_gate * (b_pbar - b_delta[:, None]), 0.0)
    else:
        b_sr = tl.where(m_key, b_s3, float("-inf"))
        b_gm = tl.max(b_sr, 2) * qk_scale
        b_e3 = tl.exp2(b_sr * qk_scale - b_gm[:, :, None])
        b_z = tl.sum(b_e3, 2)
        b_pbar = tl.sum(b_e3 * b_dp3, 2) / b_z
        b_r = b_gate / b_z
        b_base = b_pbar
        b_dlm = b_gate * (b_pbar - b_delta[:, None])
    b_w3 = b_e3 * b_r[:, :, None]
    b_ds3 = tl.where(m_lm, b_dlm[:, :, None], b_w3 * (b_dp3 - b_base[:, :, None]))
    return tl.reshape(b_w3, [BLOCK_M, BLOCK_N]), tl.reshape(b_ds3, [BLOCK_M, BLOCK_N])


@triton.jit
def _dkdv_step(b_dkt, b_dvt, b_kt, b_vt, p_q, p_do, p_lse, p_delta, i_m, i_n, n_q, q_start, qk_scale, stride_qn,
               stride_don, MASKED: tl.constexpr, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
               UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile's contribution to the (transposed) dK/dV accumulators of a key tile. The score tile is
    [BLOCK_M, BLOCK_N] (queries x keys), so the per-block reductions run along a row, inside one warp; the
    products are taken as dV^T += dO^T w and dK^T += q^T ds, so that w and ds enter the tensor cores as the
    shared-memory operand (no transpose of a register tile) and dO^T, q^T are views of tiles already there."""
    o_i = i_m + tl.arange(0, BLOCK_M)
    # [BLOCK_M, D_PAD]
    b_q = _load_tile(p_q, o_i, n_q, stride_qn, MASK_ROWS, HEAD_DIM, D_PAD)
    b_do = _load_tile(p_do, o_i, n_q, stride_don, MASK_ROWS, HEAD_DIM, D_PAD)
    # [BLOCK_M]
    b_lse, b_delta = _load_row_stats(p_lse, p_delta, o_i, n_q, MASK_ROWS)
    # [BLOCK_M, BLOCK_N]
    b_s = _dot(b_q, b_kt, DOT_PRECISION, UPCAST_DOT)
    b_dp = _dot(b_do, b_vt, DOT_PRECISION, UPCAST_DOT)
    o_pos = _slot_of(q_start + o_i, BLOCK_SIZE, BLOCK_TOKENS)
    b_w, b_ds = _bwd_weights(b_s, qk_scale, b_dp, b_lse, b_delta, o_pos, i_n, MASKED, BLOCK_SIZE, BLOCK_TOKENS,
                             BLOCK_M, BLOCK_N)
    # [D_PAD, BLOCK_N]
    b_dvt += _dot(tl.trans(b_do), b_w.to(b_do.dtype), DOT_PRECISION, UPCAST_DOT)
    b_dkt += _dot(tl.trans(b_q), b_ds.to(b_q.dtype), DOT_PRECISION, UPCAST_DOT)
    return b_dkt, b_dvt


@triton.jit(do_not_specialize=["n_q", "n_k", "q_start", "tune_length", "tune_rows"])
def _landmark_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    n_q, n_k, q_start, qk_scale, sm_scale, tune_length, tune_rows,
    KV_HEADS: tl.constexpr, KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_bh, i_n_tile = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // KV_HEADS, i_bh % KV_HEADS
    i_n = i_n_tile * BLOCK_N

    o_k = i_n + tl.arange(0, BLOCK_N)
    # [BLOCK_N, D_PAD]
    b_k = _load_tile(_head(k, i_b, i_hk, stride_kb, stride_kh), o_k, n_k, stride_kn, True, HEAD_DIM, D_PAD)
    b_v = _load_tile(_head(v, i_b, i_hk, stride_vb, stride_vh), o_k, n_k, stride_vn, True, HEAD_DIM, D_PAD)
    # [D_PAD, BLOCK_N], transposed once here so that the loop only reads them
    b_kt, b_vt = tl.trans(b_k), tl.trans(b_v)
    # [D_PAD, BLOCK_N]
    b_dkt = tl.zeros([D_PAD, BLOCK_N], dtype=tl.float32)
    b_dvt = tl.zeros([D_PAD, BLOCK_N], dtype=tl.float32)

    # query tiles: [i_lo, i_mid) see this key tile on their diagonal (masked path), [i_mid, n_q) only see
    # complete earlier blocks in it (fast path); queries before i_lo cannot see it (causality)
    i_lo = tl.maximum(_first_position_from(i_n, BLOCK_SIZE, BLOCK_TOKENS) - q_start, 0) // BLOCK_M * BLOCK_M
    n_q_ceil = tl.cdiv(n_q, BLOCK_M) * BLOCK_M
    i_after = _first_position_from(i_n + BLOCK_N, BLOCK_SIZE, BLOCK_TOKENS) - q_start
    i_mid = tl.minimum(tl.maximum(tl.cdiv(i_after, BLOCK_M) * BLOCK_M, i_lo), n_q_ceil)
    i_full = n_q // BLOCK_M * BLOCK_M
    for i_g in range(KV_GROUP):
        i_h = i_hk * KV_GROUP + i_g
        i_bhq = i_b * (KV_HEADS * KV_GROUP) + i_h
        p_q = _head(q, i_b, i_h, stride_qb, stride_qh)
        p_do = _head(do, i_b, i_h, stride_dob, stride_doh)
        p_lse = lse + i_bhq.to(tl.int64) * n_q
        p_delta = delta + i_bhq.to(tl.int64) * n_q
        for i_m in range(i_lo, i_mid, BLOCK_M):
            b_dkt, b_dvt = _dkdv_step(b_dkt, b_dvt, b_kt, b_vt, p_q, p_do, p_lse, p_delta, i_m, i_n, n_q, q_start,
                                      qk_scale, stride_qn, stride_don, True, True, HEAD_DIM, D_PAD, BLOCK_SIZE,
                                      BLOCK_TOKENS, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N)
        for i_m in range(i_mid, i_full, BLOCK_M):
            b_dkt, b_dvt = _dkdv_step(b_dkt, b_dvt, b_kt, b_vt, p_q, p_do, p_lse, p_delta, i_m, i_n, n_q, q_start,
                                      qk_scale, stride_qn, stride_don, False, False, HEAD_DIM, D_PAD, BLOCK_SIZE,
                                      BLOCK_TOKENS, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N)
        # the last, partial query tile (if it is not on the diagonal)
        for i_m in range(tl.maximum(i_full, i_mid), n_q, BLOCK_M):
            b_dkt, b_dvt = _dkdv_step(b_dkt, b_dvt, b_kt, b_vt, p_q, p_do, p_lse, p_delta, i_m, i_n, n_q, q_start,
                                      qk_scale, stride_qn, stride_don, False, True, HEAD_DIM, D_PAD, BLOCK_SIZE,
                                      BLOCK_TOKENS, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N)

    # [BLOCK_N, D_PAD]
    _store_tile(_head(dk, i_b, i_hk, stride_dkb, stride_dkh), o_k, n_k, stride_dkn, tl.trans(b_dkt * sm_scale),
                HEAD_DIM, D_PAD)
    _store_tile(_head(dv, i_b, i_hk, stride_dvb, stride_dvh), o_k, n_k, stride_dvn, tl.trans(b_dvt), HEAD_DIM, D_PAD)


@triton.jit
def _dq_step(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, i_n, n_k, stride_kn, stride_vn, qk_scale, o_pos,
             MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             BLOCK_TOKENS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """One key tile's contribution to the (unscaled) dQ accumulator of a query tile."""
    b_k, b_v, b_s = _key_tile(b_q, p_k, p_v, i_n, n_k, stride_kn, stride_vn, MASKED, HEAD_DIM, D_PAD, DOT_PRECISION,
                              UPCAST_DOT, BLOCK_N)
    # [BLOCK_M, BLOCK_N]
    b_dp = _dot(b_do, tl.trans(b_v), DOT_PRECISION, UPCAST_DOT)
    _, b_ds = _bwd_weights(b_s, qk_scale, b_dp, b_lse, b_delta, o_pos, i_n, MASKED, BLOCK_SIZE, BLOCK_TOKENS, BLOCK_M,
                           BLOCK_N)
    return b_dq + _dot(b_ds.to(b_k.dtype), b_k, DOT_PRECISION, UPCAST_DOT)


@triton.jit(do_not_specialize=["n_q", "n_k", "q_start", "tune_length", "tune_rows"])
def _landmark_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    n_q, n_k, q_start, qk_scale, sm_scale, tune_length, tune_rows,
    Q_HEADS: tl.constexpr, KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_TOKENS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_bh, i_b, i_h, o_i, o_pos, n_lo, n_hi, p_k, p_v, b_q = _query_tile(
        q, k, v, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_vb, stride_vh, n_q, n_k, q_start,
        Q_HEADS, KV_GROUP, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_TOKENS, BLOCK_M, BLOCK_N)
    b_do = _load_tile(_head(do, i_b, i_h, stride_dob, stride_doh), o_i, n_q, stride_don, True, HEAD_DIM, D_PAD)
    # [BLOCK_M]
    b_lse, b_delta = _load_row_stats(lse + i_bh.to(tl.int64) * n_q, delta + i_bh.to(tl.int64) * n_q, o_i, n_q, True)
    b_dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for i_n in range(0, n_lo, BLOCK_N):
        b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, i_n, n_k, stride_kn, stride_vn, qk_scale, o_pos,
                        False, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_TOKENS, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N)
    for i_n in range(n_lo, n_hi, BLOCK_N):
        b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, i_n, n_k, stride_kn, stride_vn, qk_scale, o_pos,
                        True, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_TOKENS, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N)
    _store_tile(_head(dq, i_b, i_h, stride_dqb, stride_dqh), o_i, n_q, stride_dqn, b_dq * sm_scale, HEAD_DIM, D_PAD)


# ---------------------------------------------------------------------------------------------------------
# Autotuning: small, visible config lists. BLOCK_N must be a multiple of block_size (a tile holds whole
# landmark blocks), so configs with a narrower BLOCK_N are pruned. Keyed on head_dim, block_size and the GQA
# group (the autotuner adds the dtypes of the tensor arguments), and on the problem's size in powers of two:
# the key length and batch * q_heads, which the kernels take as `tune_length` and `tune_rows` and otherwise
# ignore. The best tiles differ between 16 x 512 and 1 x 32k tokens (benchmarks/results/tile_sweep_h200.md);
# lengths themselves are never specialised on, so a new size costs one tuning, and a compile only where it
# picks a config not compiled yet.
# ---------------------------------------------------------------------------------------------------------
def _cfg(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Each list keeps the configs that won somewhere in benchmarks/results/tile_sweep_h100.md (H100, head_dim 128,
# block_size 64, 8k and 32k tokens), fastest first (the first valid one is what LANDMARK_ATTN_AUTOTUNE=0 takes),
# then those that won at fine-tuning sizes on the H200 (16 x 512 to 4 x 2k; benchmarks/results/tile_sweep_h200.md).
_FWD_CONFIGS = [
    _cfg(128, 128, 8, 3),
    _cfg(128, 64, 8, 3),
    _cfg(64, 64, 4, 3),
]
# dK/dV holds two [head_dim, BLOCK_N] fp32 accumulators; BLOCK_N = 128 with BLOCK_M >= 64 spills on sm_90
_DKDV_CONFIGS = [
    _cfg(128, 64, 8, 2),
    _cfg(64, 64, 4, 3),
    _cfg(128, 32, 8, 2),
    _cfg(32, 128, 8, 2),  # for block_size 128 (the only width that holds a block without spilling much)
    _cfg(64, 64, 4, 2),
    _cfg(128, 64, 8, 1),
]
_DQ_CONFIGS = [
    _cfg(128, 64, 8, 3),
    _cfg(64, 64, 4, 2),
    _cfg(64, 64, 4, 3),
    _cfg(64, 128, 8, 2),  # for block_size 128
    _cfg(128, 128, 8, 2),
]
# Used under TRITON_INTERPRET=1 (CPU tests): small tiles, no autotuning.
_INTERPRET_BLOCK_M = 16
_INTERPRET_BLOCK_N = 16


def _prune(configs, named_args, **kwargs):
    block_size = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] % block_size == 0]
    return kept or [_cfg(64, block_size, 4, 2)]


_TUNE_KEY = ["HEAD_DIM", "BLOCK_SIZE", "KV_GROUP", "tune_length", "tune_rows"]
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
    _landmark_fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
    _landmark_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
    _landmark_bwd_dq_kernel)


def _autotune_enabled():
    # LANDMARK_ATTN_AUTOTUNE=0 takes the first valid config of each list without benchmarking (tests)
    return os.environ.get("LANDMARK_ATTN_AUTOTUNE", "1") != "0"


# Compile options of every launch. The exp2 arguments are written as one multiply-add each (see _fwd_weights);
# Triton 3.9 warns that its default for fusing them into FMAs turns off in 3.10, so it is asked for explicitly.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _tune_bucket(size):
    """The power of two at or above `size`: the autotuner's key for a length or a count of rows."""
    return 1 << max(int(size) - 1, 0).bit_length()


def _tune_sizes(n_k, rows):
    """The size part of the autotuner's key, as the kernels' `tune_length` and `tune_rows` keywords."""
    return {"tune_length": _tune_bucket(n_k), "tune_rows": _tune_bucket(rows)}


# The config each autotuned kernel chose, by its key, with the autotuner's cache it came from. The autotuner's
# own dispatch (a key built from every argument on every call) costs about 50 us of host time a launch, as much
# as the GPU time of a small tile loop; once it has chosen, the kernel is launched with that config directly.
_CHOSEN = {}


def _launch(kernel, tuned, grid_fn, args, **kwargs):
    """Launch `tuned` (autotuned) on GPUs, or `kernel` with fixed tiles under the interpreter or when
    autotuning is switched off. `kwargs` carry the autotuner's key (constexprs and the size buckets)."""
    if _interpreting():
        meta = {"BLOCK_M": _INTERPRET_BLOCK_M, "BLOCK_N": max(_INTERPRET_BLOCK_N, kwargs["BLOCK_SIZE"])}
        kernel[grid_fn(meta)](*args, **kwargs, **meta)
        return
    if not _autotune_enabled():
        cfg = _prune(tuned.configs, {}, BLOCK_SIZE=kwargs["BLOCK_SIZE"])[0]
    else:
        key = (tuned, args[0].dtype, *(kwargs[name] for name in tuned.keys))
        cache, cfg = _CHOSEN.get(key, (None, None))
        if cache is not tuned.cache:  # not chosen yet, or the autotuner was reset (tests, benchmarks/tile_sweep.py)
            tuned[grid_fn](*args, **kwargs, **COMPILE_OPTIONS)
            _CHOSEN[key] = (tuned.cache, tuned.best_config)
            return
    kernel[grid_fn(cfg.kwargs)](*args, **kwargs, **cfg.all_kwargs(), **COMPILE_OPTIONS)


# ---------------------------------------------------------------------------------------------------------
# Layer 2: launchers (validate, allocate, build the grid)
# ---------------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, block_size, sm_scale, block_tokens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"landmark_attention: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(f"landmark_attention: {name} must be 4-D [batch, heads, seq_len, head_dim], got shape "
                             f"{tuple(t.shape)}.")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"landmark_attention: dtype {q.dtype} is not supported; cast q, k, v to torch.bfloat16, "
                        "torch.float16 or torch.float32.")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"landmark_attention: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v "
                        f"{v.dtype}; cast them to the same dtype.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"landmark_attention: q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}.")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError("landmark_attention: the Triton kernel needs GPU tensors (got CPU tensors); move q, k, v "
                         "to a CUDA device, use the eager landmark attention, or set TRITON_INTERPRET=1 before "
                         "importing triton to run the kernel (slowly) on the CPU.")
    _check_block_size(block_tokens)
    if block_size & (block_size - 1) or not block_tokens <= block_size <= _MAX_BLOCK_SIZE:
        raise ValueError(f"landmark_attention: the slot of a block must be a power of two from block_tokens "
                         f"({block_tokens}) to {_MAX_BLOCK_SIZE}, got {block_size}.")
    batch, q_heads, n_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"landmark_attention: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}.")
    kv_batch, kv_heads, n_k, kv_head_dim = k.shape
    if kv_batch != batch:
        raise ValueError(f"landmark_attention: q has batch {batch} but k/v have batch {kv_batch}.")
    if kv_head_dim != head_dim:
        raise ValueError(f"landmark_attention: q has head_dim {head_dim} but k/v have {kv_head_dim}; they must match.")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"landmark_attention: head_dim {head_dim} is not supported; the kernel handles head_dim "
                         f"1..{MAX_HEAD_DIM}. Use the eager path for larger heads.")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"landmark_attention: q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}) for "
                         "grouped-query attention.")
    if n_k < n_q:
        raise ValueError(f"landmark_attention: the keys ({n_k}) must be at least as many as the queries ({n_q}): "
                         "the queries are the last n_q of the n_k positions. Pass the history with k and v.")
    if sm_scale is not None and (isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float))):
        raise TypeError(f"landmark_attention: sm_scale must be a float or None, got {type(sm_scale).__name__}.")
    if sm_scale is not None and not sm_scale > 0:
        raise ValueError(f"landmark_attention: sm_scale must be positive (the kernel takes maxima of unscaled "
                         f"scores), got {sm_scale}.")


def _check_block_size(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"landmark_attention: block_size must be an int, got {type(block_size).__name__}.")
    if not 2 <= block_size <= _MAX_BLOCK_SIZE:
        raise ValueError(f"landmark_attention: block_size must be between 2 and {_MAX_BLOCK_SIZE}, got {block_size}; "
                         "use the eager path for larger blocks.")


def _inner_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _query_start(n_q, n_k, block_size, block_tokens):
    """Real position of the first query: the queries are the last n_q of the real positions whose keys fill the
    n_k slots (the last slot holds the last position)."""
    last = n_k - 1
    n_real = last // block_size * block_tokens + min(last % block_size, block_tokens - 1) + 1
    if n_real < n_q:
        raise ValueError(f"landmark_attention: the {n_k} key slots hold {n_real} positions, fewer than the {n_q} "
                         "queries; the queries are the last n_q positions, so pass the keys of all of them.")
    return n_real - n_q


def _dims(q, k):
    head_dim = q.shape[-1]
    d_pad = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    upcast = _interpreting() and q.dtype == torch.bfloat16
    return head_dim, d_pad, q.shape[1] // k.shape[1], precision, upcast


def landmark_attn_fwd(q, k, v, block_size, sm_scale=None, block_tokens=None):
    """Forward launcher.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D], laid out in blocks of `block_size` positions (a power of two) of
    which the first `block_tokens - 1` (default: all but the last) are regular keys and the last the landmark.
    With block_tokens < block_size the keys are in slots and the queries are not: q holds the last Tq real
    positions. Returns o [B, Hq, Tq, D] (q's dtype; same memory layout as q
    where q is dense) and lse [B, Hq, Tq] float32, the base-2 logsumexp of the rows' scaled scores
    (log2-sum-exp2 of sm_scale * log2(e) * q.k), which the backward needs.
    """
    block_tokens = block_size if block_tokens is None else block_tokens
    _check_inputs(q, k, v, block_size, sm_scale, block_tokens)
    q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
    batch, q_heads, n_q, _ = q.shape
    n_k = k.shape[2]
    head_dim, d_pad, kv_group, precision, upcast = _dims(q, k)
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    o = torch.empty_like(q)
    lse = torch.empty((batch, q_heads, n_q), device=q.device, dtype=torch.float32)
    if n_q == 0 or batch * q_heads == 0:
        return o, lse

    def grid(meta):
        return (batch * q_heads, triton.cdiv(n_q, meta["BLOCK_M"]))

    _launch(_landmark_fwd_kernel, _fwd_tuned, grid,
            (q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], n_q, n_k,
             _query_start(n_q, n_k, block_size, block_tokens), sm_scale * _LOG2E),
            **_tune_sizes(n_k, batch * q_heads),
            Q_HEADS=q_heads, KV_GROUP=kv_group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
            BLOCK_TOKENS=block_tokens, DOT_PRECISION=precision, UPCAST_DOT=upcast)
    return o, lse


def landmark_attn_bwd(do, q, k, v, o, lse, block_size, sm_scale=None, block_tokens=None):
    """Backward launcher: dO [B, Hq, Tq, D] and the forward's tensors -> dq [B, Hq, Tq, D], dk, dv [B, Hkv, Tk, D].

    Three launches: D = rowsum(dO * O) [B, Hq, Tq] float32; dK/dV over key tiles (each program loops over
    the query heads of its key/value head, no atomics); dQ over query tiles.
    """
    block_tokens = block_size if block_tokens is None else block_tokens
    do = _inner_contiguous(do)
    q, k, v, o = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v), _inner_contiguous(o)
    batch, q_heads, n_q, _ = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    head_dim, d_pad, kv_group, precision, upcast = _dims(q, k)
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if n_q == 0 or batch * q_heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)

    pre_block = 64
    _landmark_bwd_preprocess_kernel[(batch * q_heads, triton.cdiv(n_q, pre_block))](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], n_q,
        Q_HEADS=q_heads, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=pre_block, **COMPILE_OPTIONS)

    sizes = _tune_sizes(n_k, batch * q_heads)
    q_start = _query_start(n_q, n_k, block_size, block_tokens)

    def grid_dkdv(meta):
        return (batch * kv_heads, triton.cdiv(n_k, meta["BLOCK_N"]))

    _launch(_landmark_bwd_dkdv_kernel, _dkdv_tuned, grid_dkdv,
            (q, k, v, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
             *dk.stride()[:3], *dv.stride()[:3], n_q, n_k, q_start, sm_scale * _LOG2E, sm_scale),
            **sizes,
            KV_HEADS=kv_heads, KV_GROUP=kv_group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
            BLOCK_TOKENS=block_tokens, DOT_PRECISION=precision, UPCAST_DOT=upcast)

    def grid_dq(meta):
        return (batch * q_heads, triton.cdiv(n_q, meta["BLOCK_M"]))

    _launch(_landmark_bwd_dq_kernel, _dq_tuned, grid_dq,
            (q, k, v, do, lse, delta, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
             *dq.stride()[:3], n_q, n_k, q_start, sm_scale * _LOG2E, sm_scale),
            **sizes,
            Q_HEADS=q_heads, KV_GROUP=kv_group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
            BLOCK_TOKENS=block_tokens, DOT_PRECISION=precision, UPCAST_DOT=upcast)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# Layer 3: autograd
# ---------------------------------------------------------------------------------------------------------
class LandmarkAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_size, sm_scale, block_tokens=None):
        o, lse = landmark_attn_fwd(q, k, v, block_size, sm_scale, block_tokens)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.block_size, ctx.sm_scale, ctx.block_tokens = block_size, sm_scale, block_tokens
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = landmark_attn_bwd(do, q, k, v, o, lse, ctx.block_size, ctx.sm_scale, ctx.block_tokens)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Layer 4: public function
# ---------------------------------------------------------------------------------------------------------
def landmark_attention(q, k, v, block_size, sm_scale=None):
    """Landmark attention, training form (grouped softmax of Mohtashami & Jaggi 2023, section 3.1).

    Args:
        q: [batch, q_heads, n_q, head_dim] queries, the last n_q of the n_k positions.
        k, v: [batch, kv_heads, n_k, head_dim]; the key at position j is a landmark iff
            j % block_size == block_size - 1. q_heads must be a multiple of kv_heads.
        block_size: positions per landmark block, landmark included, 2..128. A size that is no power of two runs
            with each block in a slot of the next power of two, phantom keys between its tokens and its landmark
            masked out (51 in slots of 64: 1.25x the key positions; the queries keep theirs).
        sm_scale: score scale, default 1 / sqrt(head_dim).

    Returns:
        [batch, q_heads, n_q, head_dim] in q's dtype. Differentiable in q, k and v.

    Inside an autocast region q, k and v are cast to its dtype first, as SDPA does (RoPE in fp32 promotes q and k
    while v stays in bf16, so the Trainer's --bf16 hands over mixed dtypes); the output is then in that dtype.
    """
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    _check_block_size(block_size)
    slot_size = 1 << (block_size - 1).bit_length()
    if slot_size == block_size:
        return LandmarkAttnFunction.apply(q, k, v, block_size, sm_scale)
    _check_inputs(q, k, v, slot_size, sm_scale, block_size)
    if q.shape[2] == 0:
        return q.clone()
    key_slots, n_key_slots = _key_slots(k.shape[2], block_size, slot_size, q.device)
    return LandmarkAttnFunction.apply(q, _to_slots(k, key_slots, n_key_slots), _to_slots(v, key_slots, n_key_slots),
                                      slot_size, sm_scale, block_size)


def _key_slots(n_k, block_size, slot_size, device):
    """Where the n_k key positions go when each block of `block_size` takes a slot of `slot_size`: its regular tokens
    first, its landmark last, phantom positions between. Returns the slots and their count (through the last key's)."""
    # the count from a Python int, so that it needs no device sync
    return _slot(torch.arange(n_k, device=device), block_size, slot_size), _slot(n_k - 1, block_size, slot_size) + 1


def _slot(position, block_size, slot_size):
    """`_slot_of` on the host: the slot of a position (a Python int or a tensor of them)."""
    offset = position % block_size
    return position // block_size * slot_size + offset + (offset == block_size - 1) * (slot_size - block_size)


def _to_slots(x, slots, length):
    """x [batch, heads, n, head_dim] scattered to rows `slots` of a zero [batch, heads, length, head_dim]."""
    return x.new_zeros(*x.shape[:2], length, x.shape[3]).index_copy_(2, slots, x)
