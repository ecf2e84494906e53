"""The fused per-token block selection (`kernels/block_selection.py`) against the cache's PyTorch selection
(`LandmarkCacheLayer.retrieve`), which `test_retrieval_cache.py` checks against the training form and the paper's
code: the same blocks, validity and starts, for stingy and true positions, GQA, rows with no or fewer than k blocks,
exact ties, a static bound above every row's blocks, chunks of several query tiles and rows of several block tiles.
Runs under TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch
import triton
import triton.language as tl

from landmark_llama.kernels import block_selection
from landmark_llama.cache_landmark_llama import ChunkPositions, LandmarkCacheLayer, RetrievalSettings


def _layer(batch, kv_heads, capacity, block_size, head_dim, generator, dtype=torch.float32, like=None, device="cpu"):
    """A layer's stores of random keys, or of `like`'s keys in `dtype`."""
    layer = LandmarkCacheLayer(block_size)
    layer.planned_blocks = capacity
    empty = torch.zeros(batch, kv_heads, 1, head_dim, dtype=dtype, device=device)
    layer.lazy_initialization(empty, empty)
    layer.keys.copy_(torch.randn(layer.keys.shape, generator=generator) if like is None else like.keys)
    layer.landmarks.copy_(torch.randn(layer.landmarks.shape, generator=generator) if like is None else like.landmarks)
    return layer


@pytest.mark.parametrize("positions", ["stingy", "true"])
@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, width, head_dim, block_size, top_k, capacity, candidate_blocks, launch",
    [
        (3, 4, 2, 3, 16, 8, 3, 20, None, None),  # GQA; rows with 0, 2 (< k) and many blocks
        (2, 3, 1, 2, 80, 7, 4, 9, None, None),  # head_dim and block size no powers of two
        (1, 2, 2, 1, 32, 51, 2, 300, None, None),  # the paper's block size, one query, more blocks than a score tile
        (2, 2, 1, 21, 12, 4, 1, 150, 1, None),  # a chunk of two query tiles; rows of three score tiles, groups of two
        # decoding steps of GQA with fewer scoring programs than tiles of blocks: a group's heads scored together
        # on the tensor cores (4 of a group of 4, 2 of a group of 6), or a head's on the CUDA cores
        (2, 8, 2, 2, 16, 4, 3, 140, None, dict(DECODE_SCORE_PROGRAMS=3, DECODE_ON_TENSOR_CORES=True)),
        (1, 12, 2, 1, 8, 8, 2, 100, None, dict(DECODE_SCORE_PROGRAMS=1, DECODE_ON_TENSOR_CORES=True)),
        (2, 8, 2, 2, 16, 4, 3, 140, None, dict(DECODE_SCORE_PROGRAMS=5, DECODE_ON_TENSOR_CORES=False)),
        # a prefill pass in one tile of 128 queries, of which 70 are real, against tiles of 32 blocks
        (1, 2, 1, 70, 16, 4, 2, 100, None, dict(PREFILL_SCORE_TILES=(128, 32))),
    ],
)
def test_fused_selection_equals_the_pytorch_selection(positions, batch, q_heads, kv_heads, width, head_dim,
                                                      block_size, top_k, capacity, candidate_blocks, launch,
                                                      monkeypatch):
    if candidate_blocks is not None:  # groups of the fewest candidate tiles, at a size the interpreter runs quickly
        monkeypatch.setattr(block_selection, "CANDIDATE_BLOCKS", candidate_blocks)
    for name, value in (launch or {}).items():  # launch settings other than the shipped ones
        monkeypatch.setattr(block_selection, name, value)
    generator = torch.Generator().manual_seed(capacity + width)
    layer = _layer(batch, kv_heads, capacity, block_size, head_dim, generator)
    complete = torch.randint(capacity // 2, capacity - 1, (batch,), generator=generator)
    if batch == 3:
        complete[:2] = torch.tensor([0, 2])
    layer.keys[:, :4, :, block_size - 1] = layer.keys[:, 4:5, :, block_size - 1]  # stingy scores tie exactly
    layer.landmarks[:, 5:8] = layer.landmarks[:, 8:9]  # true scores tie exactly
    start = complete * block_size + torch.randint(0, block_size - 1, (batch,), generator=generator)
    bound = capacity - 1  # a static pass scores more blocks than any row has
    chunk = ChunkPositions(start, torch.full((batch,), width), bound, block_size - 1, torch.tensor(0))
    query = torch.randn(batch, q_heads, width, head_dim, generator=generator)
    settings = RetrievalSettings(top_k, "token", positions, 10, True, False)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    expected = layer.retrieve(query, chunk, settings, inv_freq, 0.3)
    fused = layer.retrieve(query, chunk, settings, inv_freq, 0.3, use_kernel=True)
    assert torch.equal(fused.valid, expected.valid)
    assert torch.equal(fused.blocks, expected.blocks)
    assert torch.equal(fused.starts, expected.starts)
    if batch == 3:  # the row without blocks picks none, the row with two picks both
        assert not expected.valid[0].any() and (expected.valid[1].sum(-1) == 2).all()


@pytest.mark.parametrize("positions", ["stingy", "true"])
@pytest.mark.parametrize("batch, q_heads, kv_heads, width, head_dim, block_size, top_k, capacity, wide", [
    (3, 4, 2, 5, 16, 8, 3, 20, None),  # GQA; rows with 0, 2 (< k) and many blocks; a row of padding alone
    # a decoding step (a group's heads scored together), rows of three slices of 64 blocks
    (2, 8, 2, 2, 16, 4, 1, 140, 64),  # (k of 1: the tiles' maxima decide which tiles the top k reads)
    # a prefill chunk on the tensor cores, head_dim and block size no powers of two, slices of two score tiles
    (2, 2, 1, 21, 12, 5, 1, 90, 128),
])
def test_fused_chunk_selection_equals_the_pytorch_selection(positions, batch, q_heads, kv_heads, width, head_dim,
                                                            block_size, top_k, capacity, wide, monkeypatch):
    """Per-chunk selection on the kernels (scores, each real query's softmax, the blocks' highest probability, the
    top k) against the PyTorch selection: the same blocks, validity and starts, padding queries left out."""
    if wide is not None:  # rows of several programs' slices
        monkeypatch.setattr(block_selection, "CHUNK_WIDE_BLOCKS", wide)
    generator = torch.Generator().manual_seed(capacity + width + 7)
    layer = _layer(batch, kv_heads, capacity, block_size, head_dim, generator)
    complete = torch.randint(capacity // 2, capacity - 1, (batch,), generator=generator)
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    if batch == 3:
        complete[:2] = torch.tensor([0, 2])
        lengths[2] = 0
    layer.landmarks[:, 5:8] = layer.landmarks[:, 8:9]  # exact ties
    start = complete * block_size + torch.randint(0, block_size - 1, (batch,), generator=generator)
    chunk = ChunkPositions(start, lengths, capacity - 1, block_size - 1, torch.tensor(0))
    query = torch.randn(batch, q_heads, width, head_dim, generator=generator)
    settings = RetrievalSettings(top_k, "chunk", positions, 10, True, False)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    expected = layer.retrieve(query, chunk, settings, inv_freq, 0.3)
    fused = layer.retrieve(query, chunk, settings, inv_freq, 0.3, use_kernel=True)
    assert torch.equal(fused.valid, expected.valid) and expected.valid.any()
    assert torch.equal(fused.blocks, expected.blocks)
    assert torch.equal(fused.starts, expected.starts)
    if batch == 3:  # no blocks, or no real query: nothing picked
        assert not expected.valid[0].any() and not expected.valid[2].any()


@triton.jit
def _highest_below_of(scores, weights, out, below, N: tl.constexpr, ONE_PASS: tl.constexpr):
    i = tl.arange(0, N)
    value, count = block_selection._highest_below(tl.load(scores + i), tl.load(weights + i) != 0, below, ONE_PASS)
    tl.store(out + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, value, count.to(tl.float32)))


@pytest.mark.parametrize("seed", range(4))
def test_highest_below_in_one_reduction_equals_a_max_and_a_count(seed):
    """The top k's (highest score under a bound, weight of the scores equal to it): the one-pass reduction the GPU
    runs, and the max and sum the interpreter runs in the selection tests, against PyTorch; with repeated scores,
    -inf, and no score under the bound."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (16,), generator=generator).float()
    scores[torch.randint(0, 16, (3,), generator=generator)] = float("-inf")
    weights = torch.randint(0, 2, (16,), generator=generator, dtype=torch.int32)
    for below in (float("inf"), 2.0, 0.0, -3.0, -4.0):
        masked = torch.where(scores < below, scores, float("-inf"))
        highest = masked.max()
        expected = torch.stack([highest, weights[masked == highest].sum().float()])
        for one_pass in (True, False):
            out = torch.empty(2)
            _highest_below_of[(1,)](scores, weights, out, below, N=16, ONE_PASS=one_pass)
            assert torch.equal(out, expected), (below, one_pass)


@pytest.mark.parametrize("positions", ["stingy", "true"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_rows_of_ties_in_every_score_tile_select_the_earliest_blocks(positions, top_k, monkeypatch):
    """Every block of a row ties (one landmark key for all): each score tile holds candidates, more than a group of
    them, and the top k reads them group by group in block order."""
    monkeypatch.setattr(block_selection, "CANDIDATE_BLOCKS", 1)  # groups of 2k tiles
    batch, q_heads, kv_heads, head_dim, block_size, capacity = 2, 2, 1, 16, 4, 200
    generator = torch.Generator().manual_seed(top_k)
    layer = _layer(batch, kv_heads, capacity, block_size, head_dim, generator)
    layer.keys[:, :, :, block_size - 1] = layer.keys[:, :1, :, block_size - 1]
    layer.landmarks[:] = layer.landmarks[:, :1]
    start = torch.tensor([capacity - 2, capacity // 2]) * block_size + 1
    chunk = ChunkPositions(start, torch.ones(batch, dtype=torch.long), capacity - 1, block_size - 1, torch.tensor(0))
    query = torch.randn(batch, q_heads, 1, head_dim, generator=generator)
    settings = RetrievalSettings(top_k, "token", positions, 10, True, False)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    expected = layer.retrieve(query, chunk, settings, inv_freq, 0.3)
    fused = layer.retrieve(query, chunk, settings, inv_freq, 0.3, use_kernel=True)
    assert torch.equal(fused.valid, expected.valid) and expected.valid.all()
    assert torch.equal(fused.blocks, expected.blocks)
    assert torch.equal(fused.starts, expected.starts)


@pytest.mark.parametrize("positions", ["stingy", "true"])
@pytest.mark.parametrize("width, chunk_length, block_size, top_k, dtype", [
    (23, 7, 4, 2, torch.float32), (40, 16, 8, 3, torch.float32), (70, 20, 8, 3, torch.bfloat16),
])
def test_pass_of_several_chunks_selects_as_passes_of_one_chunk(positions, width, chunk_length, block_size, top_k,
                                                               dtype):
    """A wide prefill pass: each chunk of `chunk_length` queries selects among the blocks complete at its own start,
    with its own stingy window, as the PyTorch selection does for that chunk run as a pass of its own. A bf16 cache
    (scored on the tensor cores in 16-bit parts) selects as the fp32 selection of the same values."""
    batch, q_heads, kv_heads, head_dim, capacity = 3, 2, 1, 16, 24
    generator = torch.Generator().manual_seed(width + block_size)
    layer = _layer(batch, kv_heads, capacity, block_size, head_dim, generator, dtype)
    start = torch.tensor([0, 5, 3 * block_size + 1])  # rows with no, one and several blocks before the pass
    query = torch.randn(batch, q_heads, width, head_dim, generator=generator).to(dtype)
    settings = RetrievalSettings(top_k, "token", positions, 10, True, False)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    lengths = torch.full((batch,), width)
    wide = ChunkPositions(start, lengths, int((start // block_size).max()), int((start % block_size).max()),
                          torch.tensor(0), chunk_length)
    fused = layer.retrieve(query, wide, settings, inv_freq, 0.3, use_kernel=True)
    layer, query = _layer(batch, kv_heads, capacity, block_size, head_dim, generator, like=layer), query.float()
    k = fused.valid.shape[-1]
    for begin in range(0, width, chunk_length):
        own_start = start + begin
        own = ChunkPositions(own_start, lengths.clamp(max=chunk_length), int((own_start // block_size).max()),
                             int((own_start % block_size).max()), torch.tensor(0))
        expected = layer.retrieve(query[:, :, begin : begin + chunk_length], own, settings, inv_freq, 0.3)
        rows = slice(begin, begin + chunk_length)
        if expected is None:  # no row has a complete block yet
            assert not fused.valid[:, :, rows].any()
            continue
        places = expected.valid.shape[-1]
        assert not fused.valid[:, :, rows, places:].any() and places <= k
        assert torch.equal(fused.valid[:, :, rows, :places], expected.valid)
        picked = expected.valid
        assert torch.equal(fused.blocks[:, :, rows, :places][picked], expected.blocks[picked])
        assert torch.equal(fused.starts[:, :, rows, :places][picked], expected.starts[picked])


def _selection_on_cuda_equals_the_pytorch_selection(dtype, kv_heads, width, granularity, lengths):
    """At the real shape (32 query heads of 128, block 64, top-k 4, 3,000 blocks a row) on the GPU, with `lengths`
    real queries in the two rows' chunks of `width`: the compiled kernels pick the blocks the PyTorch selection picks,
    for both stingy and true positions."""
    batch, q_heads, head_dim, block_size, capacity = 2, 32, 128, 64, 3000
    generator = torch.Generator().manual_seed(kv_heads + width)
    layer = _layer(batch, kv_heads, capacity, block_size, head_dim, generator, dtype, device="cuda")
    start = torch.tensor([capacity - 2, capacity // 3], device="cuda") * block_size + 5
    chunk = ChunkPositions(start, torch.tensor(lengths, device="cuda"), capacity - 1, block_size - 1,
                           torch.tensor(0, device="cuda"))
    query = torch.randn(batch, q_heads, width, head_dim, generator=generator).to("cuda", dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    for positions in ("stingy", "true"):
        settings = RetrievalSettings(4, granularity, positions, 10, True, False)
        expected = layer.retrieve(query, chunk, settings, inv_freq, head_dim ** -0.5)
        fused = layer.retrieve(query, chunk, settings, inv_freq, head_dim ** -0.5, use_kernel=True)
        assert torch.equal(fused.valid, expected.valid) and expected.valid.all()
        assert torch.equal(fused.blocks, expected.blocks)
        assert torch.equal(fused.starts, expected.starts)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv_heads, width", [(8, 2), (32, 2), (8, 1)])
@pytest.mark.parametrize("tensor_cores, programs", [(False, None), (True, 512)])
def test_decoding_selection_on_cuda_equals_the_pytorch_selection(dtype, kv_heads, width, tensor_cores, programs,
                                                                 monkeypatch):
    """A decoding step with a group's heads scored together on the tensor cores (shipped for GQA; MHA scores one
    head's on the CUDA cores either way) or one head's on the CUDA cores, a program a tile of blocks or programs
    looping over them."""
    monkeypatch.setattr(block_selection, "DECODE_ON_TENSOR_CORES", tensor_cores)
    monkeypatch.setattr(block_selection, "DECODE_SCORE_PROGRAMS", programs)
    _selection_on_cuda_equals_the_pytorch_selection(dtype, kv_heads, width, "token", [width, width])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv_heads, width", [(8, 192), (32, 64), (8, 2)])
def test_chunk_selection_on_cuda_equals_the_pytorch_selection(dtype, kv_heads, width):
    """Per-chunk selection for a prefill chunk of the paper's 192 positions, a narrower one, and a decoding step, with
    one row's chunk partly padding."""
    _selection_on_cuda_equals_the_pytorch_selection(dtype, kv_heads, width, "chunk", [width, max(width // 3, 1)])
