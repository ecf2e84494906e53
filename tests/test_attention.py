"""Eager landmark attention against the float64 definition in landmark_reference.py."""

import math

import pytest
import torch

from landmark_llama.modeling_landmark_llama import landmark_eager_attention
from landmark_reference import landmark_attention_reference

# (dtype, atol, rtol): the eager path computes scores and softmax in fp32; bf16/fp16 tolerances cover the
# rounding of inputs, of the weights before the value product, and of the output.
DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 4e-2, 4e-2, id="bf16"),
    pytest.param(torch.float16, 5e-3, 5e-3, id="fp16"),
]
SHAPES = [
    # batch, q_heads, kv_heads, n_q, n_k, head_dim, block_size
    pytest.param(2, 4, 4, 64, 64, 16, 8, id="whole-blocks"),
    pytest.param(2, 4, 2, 61, 61, 16, 8, id="incomplete-last-block-gqa"),
    pytest.param(1, 2, 1, 263, 263, 8, 3, id="87-blocks"),
    pytest.param(1, 4, 2, 29, 101, 16, 16, id="prefix-history"),
    pytest.param(1, 2, 2, 40, 40, 8, 51, id="shorter-than-a-block"),
]


def _inputs(batch, q_heads, kv_heads, n_q, n_k, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)

    def make(heads, n):
        return torch.randn(batch, heads, n, head_dim, generator=generator).to(dtype).requires_grad_()

    return make(q_heads, n_q), make(kv_heads, n_k), make(kv_heads, n_k)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("batch,q_heads,kv_heads,n_q,n_k,head_dim,block_size", SHAPES)
def test_eager_matches_reference_with_gradients(
    batch, q_heads, kv_heads, n_q, n_k, head_dim, block_size, dtype, atol, rtol
):
    q, k, v = _inputs(batch, q_heads, kv_heads, n_q, n_k, head_dim, dtype, seed=n_q * 31 + block_size)
    out, _ = landmark_eager_attention(q, k, v, block_size, 1 / math.sqrt(head_dim))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = landmark_attention_reference(q64, k64, v64, block_size)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())

    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        scale = expected_grad.abs().max().item()  # gradients sum many terms: compare relative to their size
        torch.testing.assert_close(
            grad.double(), expected_grad, atol=atol * max(scale, 1.0), rtol=rtol, msg=f"d{name}"
        )


def test_paper_worked_example():
    """Appendix A: 9 tokens, block 3, equal scores; query 6 gives 1/6 to tokens 0, 1, 3, 4 and 1/3 to itself."""
    zeros = torch.zeros(1, 1, 9, 4)
    _, weights = landmark_eager_attention(zeros, zeros, zeros, block_size=3, scaling=0.5)
    expected = torch.tensor([1 / 6, 1 / 6, 0, 1 / 6, 1 / 6, 0, 1 / 3, 0, 0])
    torch.testing.assert_close(weights[0, 0, 6], expected)
    _, reference_weights = landmark_attention_reference(zeros, zeros, zeros, 3, return_weights=True)
    torch.testing.assert_close(reference_weights[0, 0, 6], expected.double())


def test_weights_are_a_distribution_that_ignores_landmark_values():
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 50, 50, 8, torch.float32, seed=5))
    _, weights = landmark_eager_attention(q, k, v, 5, 0.3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 50))
    landmarks = torch.arange(50) % 5 == 4
    assert (weights[..., landmarks] == 0).all()
    assert (weights.triu(1) == 0).all()  # causal
    v_changed = v.clone()
    v_changed[:, :, landmarks] = 1e3
    out, _ = landmark_eager_attention(q, k, v, 5, 0.3)
    out_changed, _ = landmark_eager_attention(q, k, v_changed, 5, 0.3)
    torch.testing.assert_close(out, out_changed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_keeps_no_more_for_backward_than_stock_eager_attention(dtype):
    """Memory no worse than transformers' eager attention: bytes autograd holds between forward and backward."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    class StockModule(torch.nn.Module):
        num_key_value_groups = 2

    def saved_bytes(run):
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            run()
        return sum(storages.values())

    for length in (256, 640):
        q, k, v = _inputs(1, 8, 4, length, length, 32, dtype, seed=length)
        causal = torch.full((length, length), float("-inf"), dtype=dtype).triu(1)[None, None]
        stock = saved_bytes(lambda: eager_attention_forward(StockModule().eval(), q, k, v, causal, 0.2))
        landmark = saved_bytes(lambda: landmark_eager_attention(q, k, v, 64, 0.2))
        assert landmark <= stock, (length, landmark, stock)


def test_scores_stay_fp32_under_bf16_autocast():
    """Mixed-precision training runs the model under autocast; the eager path must still score in fp32."""
    q, k, v = _inputs(1, 2, 1, 70, 70, 16, torch.bfloat16, seed=3)
    plain, _ = landmark_eager_attention(q, k, v, 8, 0.25)
    plain_grads = torch.autograd.grad(plain, (q, k, v), torch.ones_like(plain))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, weights = landmark_eager_attention(q, k, v, 8, 0.25)
    mixed_grads = torch.autograd.grad(mixed, (q, k, v), torch.ones_like(mixed))
    assert weights.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, atol=0, rtol=0)
    for grad, plain_grad in zip(mixed_grads, plain_grads):
        torch.testing.assert_close(grad, plain_grad, atol=0, rtol=0)
