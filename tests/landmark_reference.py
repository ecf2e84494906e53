"""Float64 reference for landmark attention, written straight from the definition (paper section 3.1).

It is deliberately slow and literal: one softmax over the query's own block and the landmarks of earlier
blocks, then, block by block, that block's gate spread over its regular tokens by a softmax local to the
block. Every fast path of the project (eager attention in the model, the Triton kernel) is tested against it.
"""

import math

import torch


def landmark_attention_reference(q, k, v, block_size, sm_scale=None, return_weights=False):
    """q: [batch, q_heads, n_q, head_dim]; k, v: [batch, kv_heads, n_k, head_dim], n_k >= n_q.

    The queries are the last n_q of the n_k positions; the key at position j is a landmark when
    j % block_size == block_size - 1. Returns the output [batch, q_heads, n_q, head_dim] in float64
    (and the weights [batch, q_heads, n_q, n_k] when asked).
    """
    n_q, n_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.double(), k.transpose(-1, -2)) * scale

    query_pos = torch.arange(n_k - n_q, n_k)[:, None]
    key_pos = torch.arange(n_k)[None, :]
    query_block, key_block = query_pos // block_size, key_pos // block_size
    key_is_landmark = key_pos % block_size == block_size - 1

    local = (key_block == query_block) & (key_pos <= query_pos) & ~key_is_landmark
    gates = (key_block < query_block) & key_is_landmark
    visible = local | gates
    shared = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).masked_fill(~visible, 0.0)

    weights = shared * local
    for block in range(n_k // block_size):  # only complete blocks carry a landmark
        start, landmark = block * block_size, (block + 1) * block_size - 1
        within = torch.softmax(scores[..., start:landmark], dim=-1)
        gate = shared[..., landmark : landmark + 1]  # zero for queries that do not see this block
        spread = torch.zeros_like(weights)
        spread[..., start:landmark] = gate * within
        weights = weights + spread
    out = torch.matmul(weights, v)
    return (out, weights) if return_weights else out
