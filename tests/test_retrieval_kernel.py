"""The retrieval kernel (`kernels/retrieval_attention.py`) against a float64 reference that rotates every key
forward to its position (the kernel rotates the query back instead) and spells the grouped softmax out as one
softmax over shifted scores, in each of the kernel's layouts (`layout`). Runs under TRITON_INTERPRET=1 on the CPU;
the `cuda` cases at real sizes."""

import pytest
import torch
import triton
import triton.language as tl

from landmark_llama.kernels import retrieval_attention as retrieval_module
from landmark_llama.kernels.retrieval_attention import retrieval_attention


@pytest.fixture(params=["one_program", "spread", "tiles"])
def layout(request, monkeypatch):
    """Every pass in one layout whatever its size: a program per query and head, each query's blocks spread over
    programs (as decoding steps run), or tiles of queries on the tensor cores (as prefill chunks run)."""
    never = 1 << 40
    monkeypatch.setattr(retrieval_module, "SPREAD_BELOW", never if request.param == "spread" else 0)
    monkeypatch.setattr(retrieval_module, "TILES_FROM", 1 if request.param == "tiles" else never)
    return request.param


def rotate(x, positions, inv_freq):
    """RoPE of x [..., n, d] to `positions` [..., n] in float64, from fp32 angles as stock Llama's RoPE makes them."""
    angles = (positions[..., None].float() * inv_freq.float()).double()
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference(query, keys, values, table, starts, row_start, inv_freq, scale, queries=None, chunk_length=None):
    """[batch, q_heads, n, head_dim] float64; only at the query indices `queries` (all by default), zeros elsewhere.
    The queries run in chunks of `chunk_length` (default: one chunk), each one's local blocks from the block that
    holds its chunk's first position."""
    batch, q_heads, n, head_dim = query.shape
    group = q_heads // keys.shape[2]
    block_size = keys.shape[3]
    chunk_length = chunk_length or n
    out = torch.zeros(batch, q_heads, n, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            store_keys, store_values = keys[b, :, h // group].double(), values[b, :, h // group].double()
            for i in range(n) if queries is None else queries:
                position = int(row_start[b]) + i
                own = position // block_size
                r = i if table.shape[2] == n else 0
                gated = [(int(c), int(start)) for c, start in zip(table[b, h, r], starts[b, h, r]) if c >= 0]
                chunk_first = int(row_start[b]) + i // chunk_length * chunk_length
                gated += [(c, c * block_size) for c in range(chunk_first // block_size, own)]
                shifted, mixed = [], []
                for block, start in gated:  # regular scores shifted by the landmark's minus their logsumexp
                    key = rotate(store_keys[block], torch.full((block_size,), start), inv_freq)
                    scores = key @ query[b, h, i].double() * scale
                    shifted.append(scores[:-1] + scores[-1] - torch.logsumexp(scores[:-1], 0))
                    mixed.append(store_values[block, :-1])
                visible = min(position % block_size + 1, block_size - 1)
                key = rotate(store_keys[own, :visible], torch.full((visible,), own * block_size), inv_freq)
                shifted.append(key @ query[b, h, i].double() * scale)
                mixed.append(store_values[own, :visible])
                out[b, h, i] = torch.softmax(torch.cat(shifted), 0) @ torch.cat(mixed)
    return out


def random_case(batch, q_heads, kv_heads, n, head_dim, block_size, capacity, top_k, per_chunk, dtype, device="cpu"):
    """A store of `capacity` blocks, chunks of n queries starting anywhere that leaves room for them, and retrieved
    blocks (some slots unpicked, one query's all) at random assigned starts."""
    query = torch.randn(batch, q_heads, n, head_dim, device=device).to(dtype)
    keys = torch.randn(batch, capacity, kv_heads, block_size, head_dim, device=device).to(dtype)
    values = torch.randn(batch, capacity, kv_heads, block_size, head_dim, device=device).to(dtype)
    row_start = torch.randint(0, capacity * block_size - n + 1, (batch,), device=device)
    table = torch.randint(0, capacity, (batch, q_heads, 1 if per_chunk else n, top_k), device=device)
    table[torch.rand(table.shape, device=device) < 0.2] = -1
    table[0, 0, 0] = -1
    starts = torch.randint(0, 5000, table.shape, device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    return query, keys, values, table, starts, row_start, inv_freq


@triton.jit
def _cos_sin_kernel(angle, cos, sin, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c, s = retrieval_module._cos_sin(tl.load(angle + i, mask=i < n, other=0.0))
    tl.store(cos + i, c, mask=i < n)
    tl.store(sin + i, s, mask=i < n)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cos_sin_of_rope_angles_to_2_pow_24_match_float64(device):
    """The kernels' cos and sin (whole turns taken off first) of the fp32 angles RoPE makes for positions up to 2**24,
    both signs (queries are rotated back), against float64 functions of the same fp32 angles."""
    positions = torch.cat([torch.randint(0, 1 << 24, (3000,)), torch.tensor([0, 1, 105615, 105616, (1 << 24) - 1])])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
    angle = (positions[:, None].float() * inv_freq).flatten()
    angle = torch.cat([angle, -angle, torch.rand(1000) * 8 - 4]).to(device)  # and small ones near the turn's halves
    cos, sin = torch.empty_like(angle), torch.empty_like(angle)
    _cos_sin_kernel[(triton.cdiv(angle.numel(), 1024),)](angle, cos, sin, angle.numel(), BLOCK=1024)
    exact = angle.double().cpu()
    torch.testing.assert_close(cos.double().cpu(), exact.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double().cpu(), exact.sin(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, n, head_dim, block_size, top_k, per_chunk",
    [
        (2, 4, 2, 3, 16, 8, 3, False),  # GQA, per token
        (1, 2, 2, 5, 16, 8, 2, True),  # per chunk
        (1, 3, 1, 9, 80, 7, 4, False),  # head_dim and block size no powers of two, chunk across blocks
        (2, 2, 1, 1, 32, 51, 2, False),  # the paper's block size, one decoded token
    ],
)
def test_retrieval_attention_equals_the_float64_reference(batch, q_heads, kv_heads, n, head_dim, block_size, top_k,
                                                          per_chunk, layout):
    case = random_case(batch, q_heads, kv_heads, n, head_dim, block_size, 6, top_k, per_chunk, torch.float32)
    scale = head_dim ** -0.5
    out = retrieval_attention(*case, scale)
    torch.testing.assert_close(out.double(), reference(*case, scale), atol=2e-5, rtol=2e-5)


def test_chunk_across_block_boundaries_sees_its_complete_local_blocks(layout):
    """A 20-query chunk starting mid-block spans three blocks: later queries gate the complete ones before theirs."""
    case = list(random_case(1, 2, 1, 20, 16, 8, 5, 2, False, torch.float32))
    case[5] = torch.tensor([13])
    out = retrieval_attention(*case, 0.3)
    torch.testing.assert_close(out.double(), reference(*case, 0.3), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("n, chunk_length, row_start", [(23, 7, 13), (40, 16, 5), (17, 9, 0)])
def test_pass_of_several_chunks_gives_each_chunk_its_own_local_blocks(layout, n, chunk_length, row_start):
    """A wide prefill pass: query i attends to the local blocks from its own chunk's tail (the chunk that holds
    i // chunk_length), as if each chunk ran as a pass of its own, with its own row of the table."""
    case = list(random_case(2, 2, 1, n, 16, 8, 8, 2, False, torch.float32))
    case[5] = torch.tensor([row_start, row_start + 11])
    out = retrieval_attention(*case, 0.3, chunk_length=chunk_length)
    expected = reference(*case, 0.3, chunk_length=chunk_length)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(expected, reference(*case, 0.3), atol=1e-3)  # one chunk would see other blocks


def test_local_blocks_read_from_a_ring_and_retrieved_ones_from_another_store(layout):
    """The offloaded cache's layout: [tail | chunk] in a ring of 3 blocks (block c at c % 3, the other entries
    garbage), the table pointing into a separate store of retrieved blocks."""
    query, keys, values, table, starts, row_start, inv_freq = random_case(2, 4, 2, 9, 16, 8, 7, 3, False,
                                                                          torch.float32)
    row_start = torch.tensor([13, 37])  # chunks over blocks 1-2 and 4-5
    ring_keys, ring_values = torch.randn(2, 3, 2, 8, 16), torch.randn(2, 3, 2, 8, 16)
    for b, start in enumerate(row_start.tolist()):
        for c in range(start // 8, (start + 9 - 1) // 8 + 1):
            ring_keys[b, c % 3], ring_values[b, c % 3] = keys[b, c], values[b, c]
    picked = torch.randn(2, 4, 2, 8, 16), torch.randn(2, 4, 2, 8, 16)  # a store of 4 retrieved blocks
    table = torch.where(table >= 0, table % 4, -1)
    out = retrieval_attention(query, *picked, table, starts, row_start, inv_freq, 0.3, ring_keys, ring_values)
    # the reference reads one store: the local blocks at their own places, the retrieved ones after them
    store_keys = torch.cat([keys, picked[0]], 1)
    store_values = torch.cat([values, picked[1]], 1)
    shifted = torch.where(table >= 0, table + keys.shape[1], -1)
    expected = reference(query, store_keys, store_values, shifted, starts, row_start, inv_freq, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def test_block_retrieved_by_many_queries_and_twice_by_some(layout):
    """Every query of the 4 heads of a key/value group retrieves block 2 (the tiles then score it for more queries
    than they take at once), each at its own start, some twice or with another block; the reference takes a block
    listed twice twice."""
    query, keys, values, table, starts, row_start, inv_freq = random_case(2, 4, 1, 40, 16, 8, 5, 3, False,
                                                                          torch.float32)
    table[:, :, :, 0] = 2
    table[:, :, ::3, 1] = 2
    out = retrieval_attention(query, keys, values, table, starts, row_start, inv_freq, 0.3)
    expected = reference(query, keys, values, table, starts, row_start, inv_freq, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    assert table.shape[1] * table.shape[2] > 2 * max(retrieval_module.SHARE_PAIRS.values())


def test_bfloat16_store_is_read_in_fp32(layout):
    case = random_case(1, 4, 2, 2, 32, 16, 6, 3, False, torch.bfloat16)
    out = retrieval_attention(*case, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(*case, 0.2), atol=1e-2, rtol=1e-2)  # bf16 output rounding


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: (c[0][..., :15],) + c[1:], "keys"),
        (lambda c: tuple(t[..., :15] for t in c[:3]) + c[3:6] + (c[6][:7],), "even"),
        (lambda c: c[:3] + (c[3][:, :, :, None],) + c[4:], "block table"),
        (lambda c: c[:4] + (c[4][..., :1],) + c[5:], "starts"),
        (lambda c: c[:5] + (c[5][None],) + c[6:], "row_start"),
    ],
)
def test_bad_inputs_get_clear_errors(change, message):
    case = random_case(1, 2, 1, 2, 16, 8, 4, 2, False, torch.float32)
    with pytest.raises(ValueError, match=message):
        retrieval_attention(*change(case), 0.25)
    one_selection = random_case(1, 2, 1, 6, 16, 8, 4, 2, True, torch.float32)
    with pytest.raises(ValueError, match="chunk_length"):  # a table of one row cannot serve chunks of their own
        retrieval_attention(*one_selection, 0.25, chunk_length=3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_chunk, n, chunk_length", [(False, 192, None), (True, 192, None), (False, 2, None),
                                                        (False, 700, 192)])
def test_retrieval_attention_on_the_gpu_at_real_sizes(dtype, per_chunk, n, chunk_length):
    """Llama 3 8B heads (32 over 8 of 128), block 64, a 192-query prefill chunk (tiles of queries), a wide pass of
    such chunks, or a decoding step's two queries (spread over programs) against 40 blocks."""
    case = random_case(1, 32, 8, n, 128, 64, 40, 4, per_chunk, dtype, device="cuda")
    out = retrieval_attention(*case, 128 ** -0.5, chunk_length=chunk_length)
    rows = [0, 1, 63, 191, 192, 450, n - 1] if n > 192 else [0, 1, 63, 191] if n > 2 else [0, 1]
    expected = reference(*(t.cpu() for t in case), 128 ** -0.5, queries=rows, chunk_length=chunk_length)[:, :, rows]
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[:, :, rows].double().cpu(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.cuda
def test_inference_kernels_compile_nothing_new_for_other_prompt_lengths():
    """Prompt lengths and pass widths change sizes and strides only: once each layout has run, passes of other
    widths over stores of other capacities (same size bucket of the top-k row) compile no new kernel."""
    from landmark_llama.kernels import block_selection, chunk_write

    kernels = [retrieval_module._retrieval_attention_kernel, retrieval_module._retrieval_attention_tiles_kernel,
               retrieval_module._retrieved_shares_kernel,
               retrieval_module._merge_splits_kernel, block_selection._landmark_scores_kernel,
               block_selection._top_blocks_kernel, chunk_write._write_chunk_kernel]
    if any(getattr(kernel, "device_caches", None) is None for kernel in kernels):
        pytest.skip("this triton version keeps its JIT cache elsewhere")

    def compiled():
        return sum(len(cache[0]) for kernel in kernels for cache in kernel.device_caches.values())

    def one_pass(n, capacity):  # Llama 3 8B heads, block 64, top-k 4: attention, selection and write
        case = random_case(1, 32, 8, n, 128, 64, capacity, 4, False, torch.bfloat16, device="cuda")
        query, keys, values, table, starts, row_start, inv_freq = case
        retrieval_attention(*case, 0.1, chunk_length=192)
        landmarks = torch.randn(1, capacity, 8, 128, device="cuda", dtype=torch.bfloat16)
        block_selection.select_blocks(query, landmarks, keys[:, :, :, 63], row_start, capacity - 1, 64, 4,
                                      True, inv_freq, 0.1, 1e-5, chunk_length=192)
        new = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        chunk_write.write_chunk(query, new, new, keys, values, landmarks, None, row_start, inv_freq)

    for n in (2, 192, 32):  # a decoding step (spread), a prefill chunk (tiles) dense and sparse in shared blocks
        one_pass(n, 70)
    before = compiled()
    for n, capacity in ((2, 100), (192, 100), (77, 90), (130, 127), (2, 66), (960, 127)):
        one_pass(n, capacity)
    torch.cuda.synchronize()
    assert compiled() == before
