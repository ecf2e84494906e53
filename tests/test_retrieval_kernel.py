"""The fused retrieval kernel (`kernels/retrieval_attention.py`) against a float64 reference that rotates the
retrieved keys forward to their assigned positions (the kernel rotates the query back instead) and spells the
grouped softmax out block by block. Runs under TRITON_INTERPRET=1 on the CPU; the `cuda` cases at real sizes."""

import pytest
import torch

from landmark_llama.kernels.retrieval_attention import retrieved_block_attention


def rotate(x, positions, inv_freq):
    """RoPE of x [..., n, d] to `positions` [..., n] in float64."""
    angles = positions[..., None].double() * inv_freq.double()
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference(query, keys, values, table, starts, inv_freq, scale):
    batch, q_heads, n, head_dim = query.shape
    group = q_heads // keys.shape[2]
    block_size = keys.shape[3]
    out = torch.zeros(batch, q_heads, n, head_dim, dtype=torch.float64)
    lse = torch.full((batch, q_heads, n), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(n):
                r = i if table.shape[2] == n else 0
                gates, mixes = [], []
                for j in range(table.shape[3]):
                    block = int(table[b, h, r, j])
                    if block < 0:
                        continue
                    start = torch.full((block_size,), int(starts[b, h, r, j]))
                    key = rotate(keys[b, block, h // group].double(), start, inv_freq)  # to start + its offset
                    scores = key @ query[b, h, i].double() * scale
                    gates.append(scores[-1])
                    mixes.append(torch.softmax(scores[:-1], 0) @ values[b, block, h // group, :-1].double())
                if gates:
                    gates = torch.stack(gates)
                    lse[b, h, i] = torch.logsumexp(gates, 0)
                    out[b, h, i] = torch.softmax(gates, 0) @ torch.stack(mixes)
    return out, lse


def random_case(batch, q_heads, kv_heads, n, head_dim, block_size, capacity, top_k, per_chunk, dtype, device="cpu"):
    query = torch.randn(batch, q_heads, n, head_dim, device=device).to(dtype)
    keys = torch.randn(batch, capacity, kv_heads, block_size, head_dim, device=device).to(dtype)
    values = torch.randn(batch, capacity, kv_heads, block_size, head_dim, device=device).to(dtype)
    retrievers = 1 if per_chunk else n
    table = torch.randint(0, capacity, (batch, q_heads, retrievers, top_k), device=device)
    table[torch.rand(table.shape, device=device) < 0.2] = -1  # unpicked slots
    table[0, 0, 0] = -1  # a query without any block
    starts = torch.randint(0, 5000, table.shape, device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    return query, keys, values, table, starts, inv_freq


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, n, head_dim, block_size, top_k, per_chunk",
    [
        (2, 4, 2, 3, 16, 8, 3, False),  # GQA, per token
        (1, 2, 2, 5, 16, 8, 2, True),  # per chunk
        (1, 3, 1, 2, 80, 7, 4, False),  # head_dim and block size no powers of two
        (2, 2, 1, 1, 32, 51, 2, False),  # the paper's block size, one decoded token
    ],
)
def test_retrieved_attention_equals_the_float64_reference(batch, q_heads, kv_heads, n, head_dim, block_size, top_k,
                                                          per_chunk):
    case = random_case(batch, q_heads, kv_heads, n, head_dim, block_size, 6, top_k, per_chunk, torch.float32)
    scale = head_dim ** -0.5
    out, lse = retrieved_block_attention(*case, scale)
    expected_out, expected_lse = reference(*[t.cpu() for t in case], scale)
    torch.testing.assert_close(out.double(), expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=2e-5)
    assert lse[0, 0, 0] == float("-inf") and out[0, 0, 0].abs().max() == 0  # no block: no share


def test_bfloat16_store_is_read_in_fp32():
    case = random_case(1, 4, 2, 2, 32, 16, 6, 3, False, torch.bfloat16)
    out, lse = retrieved_block_attention(*case, 0.2)
    expected_out, expected_lse = reference(*case, 0.2)  # from the same bf16 values
    torch.testing.assert_close(out.double(), expected_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: (c[0][..., :15],) + c[1:], "keys"),
        (lambda c: tuple(t[..., :15] for t in c[:3]) + c[3:5] + (c[5][:7],), "even"),
        (lambda c: c[:3] + (c[3][:, :, :, None],) + c[4:], "block table"),
        (lambda c: c[:4] + (c[4][..., :1],) + c[5:], "starts"),
    ],
)
def test_bad_inputs_get_clear_errors(change, message):
    case = random_case(1, 2, 1, 2, 16, 8, 4, 2, False, torch.float32)
    with pytest.raises(ValueError, match=message):
        retrieved_block_attention(*change(case), 0.25)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_chunk", [False, True])
def test_retrieved_attention_on_the_gpu_at_real_sizes(dtype, per_chunk):
    """Llama 3 8B heads (32 over 8 of 128), block 64, a 192-query prefill chunk against 40 blocks."""
    case = random_case(1, 32, 8, 192, 128, 64, 40, 4, per_chunk, dtype, device="cuda")
    out, lse = retrieved_block_attention(*case, 128 ** -0.5)
    rows = [0, 1, 63, 191]  # the float64 reference of every head at a few queries
    picked = (case[0][:, :, rows],) + case[1:3] + tuple(t[:, :, rows] if not per_chunk else t for t in case[3:5])
    expected_out, expected_lse = reference(*[t.cpu() for t in picked], case[5].cpu(), 128 ** -0.5)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out[:, :, rows].double().cpu(), expected_out, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse[:, :, rows].double().cpu(), expected_lse, atol=tolerance, rtol=tolerance)
