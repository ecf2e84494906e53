"""Triton landmark attention (kernels/landmark_attention.py) against the float64 reference.

CPU: `pytest tests/test_kernels.py` runs the kernels through TRITON_INTERPRET=1 (set by conftest.py) on small
shapes. GPU: the same tests run on CUDA tensors, and `-m cuda` selects the real-size bf16 checks.
"""

import contextlib

import pytest
import torch
from landmark_reference import landmark_attention_reference

import landmark_llama.kernels.landmark_attention as kernel_module
from landmark_llama.kernels.landmark_attention import landmark_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances per dtype, on the error relative to the reference's scale:
#   rel_rms = ||x - ref|| / ||ref||  and  max_err = max|x - ref| / max|ref|.
# fp32 runs IEEE fp32 dots; fp16/bf16 round the weights and score gradients to the input dtype before the
# matrix products (as flash attention does), which gives relative errors of about 2**-9 (fp16) / 2**-7 (bf16)
# per rounded value, averaged down by the sums.
TOLERANCES = {
    torch.float32: dict(rel_rms=1e-5, max_err=1e-5),
    torch.float16: dict(rel_rms=2e-3, max_err=4e-3),
    torch.bfloat16: dict(rel_rms=1.5e-2, max_err=3e-2),
}


def assert_close(name, actual, expected, dtype):
    """Relative RMS and max errors against the float64 reference, with a message saying where they differ."""
    tol = TOLERANCES[dtype]
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite values"
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-12)
    rel_rms = float(err.norm() / expected.norm().clamp_min(1e-12))
    max_err = float(err.max() / scale)
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    msg = (f"{name} ({dtype}): rel_rms {rel_rms:.2e} (tol {tol['rel_rms']:.1e}), max_err {max_err:.2e} "
           f"(tol {tol['max_err']:.1e}) at index {where}: {float(actual[where]):.6g} vs {float(expected[where]):.6g}")
    print(msg)  # shown with `pytest -rP` (the GPU runs report their error levels this way)
    assert rel_rms <= tol["rel_rms"] and max_err <= tol["max_err"], msg


@contextlib.contextmanager
def poisoned_allocations():
    """Make every torch.empty / torch.empty_like inside the block return NaN-filled memory, so an output
    element that the kernels never write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty, torch.empty_like = nan_empty, nan_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def make_inputs(batch, q_heads, kv_heads, n_q, n_k, head_dim, dtype, layout="bhnd", device=DEVICE):
    """Random q [b, hq, n_q, d], k/v [b, hkv, n_k, d]; layout "bnhd" gives transposed views of [b, n, h, d]
    tensors, as the model passes them."""
    def rand(heads, n):
        if layout == "bnhd":
            return torch.randn(batch, n, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)

    return rand(q_heads, n_q), rand(kv_heads, n_k), rand(kv_heads, n_k)


def reference_outputs(q, k, v, do, block_size, sm_scale=None):
    """Output and dq, dk, dv of the float64 reference (on the CPU, where it was written to run)."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out = landmark_attention_reference(q, k, v, block_size, sm_scale)
    out.backward(do.detach().cpu().double())
    return out.detach(), q.grad, k.grad, v.grad


def kernel_outputs(q, k, v, do, block_size, sm_scale=None):
    """Output and dq, dk, dv of the kernel, every allocation poisoned with NaN."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with poisoned_allocations():
        out = landmark_attention(q, k, v, block_size, sm_scale)
        out.backward(do)
    assert out.dtype == q.dtype and q.grad.dtype == q.dtype and k.grad.dtype == q.dtype
    return out.detach(), q.grad, k.grad, v.grad


def assert_all_close(outputs, expected, dtype):
    for name, actual, ref in zip(("out", "dq", "dk", "dv"), outputs, expected):
        assert_close(name, actual.cpu(), ref, dtype)


def check_against_reference(q, k, v, block_size, sm_scale=None):
    """Forward and dq, dk, dv of the kernel vs the reference's autograd, one shared random dO."""
    do = torch.randn_like(q)
    expected = reference_outputs(q, k, v, do, block_size, sm_scale)
    assert_all_close(kernel_outputs(q, k, v, do, block_size, sm_scale), expected, q.dtype)


# (batch, q_heads, kv_heads, n_q, n_k, head_dim, block_size, dtype)
CASES = [
    pytest.param(1, 2, 2, 37, 37, 16, 4, torch.float32, id="tiny-odd-B4-fp32"),
    pytest.param(1, 1, 1, 33, 33, 16, 2, torch.float32, id="B2-fp32"),
    pytest.param(2, 4, 2, 70, 100, 80, 16, torch.float32, id="gqa-prefix-d80-B16-fp32"),
    pytest.param(1, 2, 2, 150, 150, 64, 16, torch.bfloat16, id="odd-B16-bf16"),
    pytest.param(1, 4, 2, 100, 163, 32, 32, torch.bfloat16, id="gqa-prefix-B32-bf16"),
    pytest.param(1, 2, 2, 130, 130, 64, 64, torch.bfloat16, id="B64-bf16"),
    pytest.param(1, 2, 1, 97, 301, 64, 128, torch.float16, id="gqa-prefix-B128-fp16"),
    pytest.param(2, 2, 2, 200, 200, 96, 64, torch.float16, id="d96-B64-fp16"),
    pytest.param(1, 2, 2, 129, 290, 64, 128, torch.float32, id="prefix-B128-fp32"),
    pytest.param(1, 2, 2, 1, 77, 64, 16, torch.float32, id="one-query-fp32"),
    pytest.param(1, 4, 1, 45, 45, 128, 8, torch.bfloat16, id="mqa-d128-B8-bf16"),
    # block sizes that are no power of two: each block in a power-of-two slot with masked phantom keys
    pytest.param(1, 2, 2, 37, 37, 16, 3, torch.float32, id="phantom-B3-fp32"),
    pytest.param(2, 4, 2, 61, 95, 32, 5, torch.float32, id="phantom-gqa-prefix-B5-fp32"),
    pytest.param(1, 2, 2, 140, 140, 64, 51, torch.bfloat16, id="phantom-B51-bf16"),
    pytest.param(1, 2, 1, 1, 50, 16, 7, torch.float32, id="phantom-one-query-B7-fp32"),
    pytest.param(1, 2, 2, 102, 102, 16, 51, torch.float32, id="phantom-B51-ends-on-landmark-fp32"),
]


@pytest.mark.parametrize("batch, q_heads, kv_heads, n_q, n_k, head_dim, block_size, dtype", CASES)
def test_matches_reference(batch, q_heads, kv_heads, n_q, n_k, head_dim, block_size, dtype):
    q, k, v = make_inputs(batch, q_heads, kv_heads, n_q, n_k, head_dim, dtype)
    check_against_reference(q, k, v, block_size)


def test_transposed_inputs_and_scale():
    """q/k/v as transposes of [b, n, h, d] projections (strided, not contiguous) and a custom sm_scale."""
    q, k, v = make_inputs(2, 4, 2, 60, 90, 64, torch.float32, layout="bnhd")
    assert not q.is_contiguous()
    check_against_reference(q, k, v, 16, sm_scale=0.3)


def test_follows_autocast_like_sdpa():
    """Issue 16.1: under bf16 autocast, fp32 q and k (RoPE promotes them) and a bf16 v used to be refused."""
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 4, 2, 40, 40, 32, torch.float32))
    with torch.autocast(q.device.type, dtype=torch.bfloat16):
        out = landmark_attention(q, k, v.to(torch.bfloat16), 8)
    assert out.dtype == torch.bfloat16
    expected = landmark_attention_reference(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), 8)
    torch.testing.assert_close(out.detach().cpu().double(), expected, atol=3e-2, rtol=0)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0


def test_landmark_values_unused_and_rows_sum_to_one():
    """Paper appendix A: equal scores, B = 3 is not a power of two here, so use the structure directly: with
    v = 1 everywhere but landmark rows set to 1e6, the output stays 1 (weights sum to 1, landmarks get 0)."""
    block_size, n = 8, 40
    q = torch.randn(1, 2, n, 16, device=DEVICE)
    k = torch.randn(1, 2, n, 16, device=DEVICE)
    v = torch.ones(1, 2, n, 16, device=DEVICE)
    v[:, :, block_size - 1::block_size] = 1e6
    out = landmark_attention(q, k, v, block_size)
    torch.testing.assert_close(out, torch.ones_like(out), atol=1e-5, rtol=1e-5)


def test_equal_scores_match_paper_example():
    """Paper appendix A, adapted to B = 4: all scores equal, 12 tokens, query at position 9 (block 2).
    Earlier blocks 0 and 1 each get one gate out of (2 gates + 2 local keys) = 1/4, spread over their 3 regular
    tokens (1/12 each); the local tokens 8 and 9 get 1/4 each; landmarks and the future get 0."""
    n, block_size = 12, 4
    q = torch.zeros(1, 1, n, 16, device=DEVICE)
    k = torch.zeros(1, 1, n, 16, device=DEVICE)
    v = torch.eye(n, 16, device=DEVICE)[None, None]  # one-hot values read the weights back
    out = landmark_attention(q, k, v, block_size)
    expected = torch.tensor([1 / 12] * 3 + [0] + [1 / 12] * 3 + [0] + [1 / 4, 1 / 4, 0, 0], device=DEVICE)
    torch.testing.assert_close(out[0, 0, 9, :n], expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------
def _good(dtype=torch.float32, **kw):
    shape = dict(batch=1, q_heads=2, kv_heads=2, n_q=8, n_k=8, head_dim=16)
    shape.update(kw)
    return make_inputs(shape["batch"], shape["q_heads"], shape["kv_heads"], shape["n_q"], shape["n_k"],
                       shape["head_dim"], dtype)


@pytest.mark.parametrize("make, block_size, error, match", [
    pytest.param(lambda: _good(head_dim=160), 4, ValueError, "head_dim 160 is not supported", id="head-dim"),
    pytest.param(lambda: _good(torch.float64), 4, TypeError, "dtype torch.float64 is not supported", id="dtype"),
    pytest.param(lambda: (lambda q, k, v: (q, k.half(), v))(*_good()), 4, TypeError, "share one dtype",
                 id="dtype-mismatch"),
    pytest.param(lambda: _good(), 1, ValueError, "between 2 and 128", id="block-1"),
    pytest.param(lambda: _good(), 256, ValueError, "between 2 and 128", id="block-too-large"),
    pytest.param(lambda: _good(), 4.0, TypeError, "block_size must be an int", id="block-float"),
    pytest.param(lambda: _good(q_heads=3, kv_heads=2), 4, ValueError, "multiple of kv_heads", id="gqa-heads"),
    pytest.param(lambda: _good(n_q=9, n_k=8), 4, ValueError, "at least as many as the queries", id="nk-lt-nq"),
    pytest.param(lambda: (lambda q, k, v: (q[0], k, v))(*_good()), 4, ValueError, "must be 4-D", id="rank"),
])
def test_errors(make, block_size, error, match):
    q, k, v = make()
    with pytest.raises(error, match=match):
        landmark_attention(q, k, v, block_size)


def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_inputs(1, 2, 2, 8, 8, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="needs GPU tensors"):
        landmark_attention(q, k, v, 4)


# ------------------------------------------------------------------------------------------------------
# GPU, real sizes (bf16)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("q_heads, kv_heads, n_q, n_k, block_size", [
    pytest.param(32, 32, 2048, 2048, 64, id="mha-2k-B64"),
    pytest.param(32, 8, 1500, 2500, 64, id="gqa-32-8-prefix-B64"),
    pytest.param(32, 32, 1000, 1000, 16, id="mha-1k-B16"),
    pytest.param(16, 16, 1200, 1200, 128, id="mha-B128"),
    pytest.param(32, 8, 2000, 2000, 51, id="gqa-32-8-B51-phantom"),
])
def test_real_size_bf16(q_heads, kv_heads, n_q, n_k, block_size):
    q, k, v = make_inputs(1, q_heads, kv_heads, n_q, n_k, 128, torch.bfloat16, layout="bnhd")
    check_against_reference(q, k, v, block_size)


def _valid_configs(configs, block_size):
    return [c for c in configs if c.kwargs["BLOCK_N"] % block_size == 0]


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["fwd", "dkdv", "dq"])
def test_every_config_bf16(which, monkeypatch):
    """Whatever the autotuner picks must be right: run each config of one kernel on its own."""
    tuned = {"fwd": kernel_module._fwd_tuned, "dkdv": kernel_module._dkdv_tuned, "dq": kernel_module._dq_tuned}[which]
    block_size = 64
    q, k, v = make_inputs(1, 8, 2, 700, 1000, 128, torch.bfloat16, layout="bnhd")
    do = torch.randn_like(q)
    expected = reference_outputs(q, k, v, do, block_size)
    for cfg in _valid_configs(tuned.configs, block_size):
        monkeypatch.setattr(tuned, "configs", [cfg])
        monkeypatch.setattr(tuned, "cache", {})
        assert_all_close(kernel_outputs(q, k, v, do, block_size), expected, torch.bfloat16)


@pytest.mark.cuda
def test_backward_is_deterministic():
    q, k, v = make_inputs(1, 8, 2, 1024, 1024, 128, torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    grads = []
    for _ in range(5):
        q.grad = k.grad = v.grad = None
        landmark_attention(q, k, v, 64).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            assert torch.equal(a, b)


def test_autotune_keys_on_powers_of_two():
    assert [kernel_module._tune_bucket(n) for n in (0, 1, 2, 3, 512, 513, 8322, 32768)] == [
        1, 1, 2, 4, 512, 1024, 16384, 32768]


@pytest.mark.cuda
def test_autotuner_tunes_each_size_bucket_once():
    """16 x 512 and 1 x 4096 tokens get their own tuning; another length in a bucket reuses it."""
    tuned = kernel_module._fwd_tuned
    for batch, n in ((16, 500), (1, 4000), (16, 510), (1, 3000)):
        q, k, v = make_inputs(batch, 4, 4, n, n, 48, torch.bfloat16)  # a head_dim no other test uses
        kernel_module.landmark_attn_fwd(q, k, v, 32)
    keys = [key for key in tuned.cache if key[:3] == (48, 32, 1)]
    assert sorted(key[3:5] for key in keys) == [(512, 64), (4096, 4)]


@pytest.mark.cuda
def test_no_recompilation_across_lengths(monkeypatch):
    """Only lengths change: the JIT cache of the forward kernel must not grow (autotuning off: a new size
    bucket may choose other tiles, which is a compile the autotuner asks for, not a specialisation)."""
    monkeypatch.setenv("LANDMARK_ATTN_AUTOTUNE", "0")
    jit = kernel_module._landmark_fwd_kernel
    caches = getattr(jit, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version keeps its JIT cache elsewhere")

    def compiled():
        return sum(len(c[0]) for c in caches.values())

    for n in (300, 517):  # warm both specialisations of the strides (multiples of 16 or not)
        q, k, v = make_inputs(1, 4, 4, n, n, 64, torch.bfloat16)
        landmark_attention(q, k, v, 16)
    before = compiled()
    for n_q, n_k in ((300, 300), (301, 333), (1000, 1029), (17, 4000)):
        q, k, v = make_inputs(1, 4, 4, n_q, n_k, 64, torch.bfloat16)
        landmark_attention(q, k, v, 16)
    assert compiled() == before
