"""Host offload of the retrieval cache (`offload_to_cpu`, `OffloadedCacheLayer`) on the CPU: the same tokens and
scores as the cache without offload in every mode, the device slots that keep recently retrieved blocks against a
direct reading of the host store, blocks written once, beams, and the block-copy kernel under TRITON_INTERPRET."""

import pytest
import torch

import landmark_llama.cache_landmark_llama as cache_module
from landmark_llama.cache_landmark_llama import (
    ChunkPositions, LandmarkRetrievalCache, OFFLOAD_SLOTS_PER_PICK, OffloadedCacheLayer,
)
from landmark_llama.kernels.block_copy import copy_blocks
from landmark_llama.kernels.slot_assignment import assign_slots as assign_slots_triton
from landmark_llama.modeling_landmark_llama import _CACHE_FIELD as CACHE
from test_retrieval_cache import left_padded
from tiny_models import PAD_ID, random_ids, tiny_landmark_model


def _generate(model, ids, mask, **settings):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=PAD_ID,
                         output_scores=True, return_dict_in_generate=True, **settings)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("granularity", ["token", "chunk"])
@pytest.mark.parametrize("positions", ["stingy", "true"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_offloaded_cache_generates_what_the_device_cache_does(monkeypatch, granularity, positions, cuda_graphs):
    """A padded batch of long prompts (prefill passes on the staged layer, which fetch nothing) and 60 decoding
    steps, in which per-token retrieval fetches more blocks into the slots than they hold (per-chunk retrieval, one
    selection a step, fetches fewer: `test_fetch_reads_the_selected_blocks_and_keeps_recent_ones` reuses slots under
    both)."""
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2, num_attention_heads=4,
                                num_key_value_heads=2)
    ids, mask, _ = left_padded([190, 77, 5])
    settings = dict(retrieval_granularity=granularity, retrieval_positions=positions, cuda_graphs=cuda_graphs)
    fetches = []  # blocks fetched into the slots of the first row and head, per call
    real_copy = cache_module.copy_blocks

    def record(src, dst, source, target):
        if any(layer.is_initialized and dst.data_ptr() == layer.slot_keys.data_ptr() for layer in cache.layers):
            fetches.append(int((source[0, 0] >= 0).sum()))
        return real_copy(src, dst, source, target)

    monkeypatch.setattr(cache_module, "copy_blocks", record)
    with torch.no_grad():
        tokens, scores = _generate(model, ids, mask, **settings)
        cache = LandmarkRetrievalCache(model.config, offload_to_cpu=True, **settings)
        offloaded_tokens, offloaded_scores = _generate(model, ids, mask, **{CACHE: cache}, **settings)
    assert torch.equal(offloaded_tokens, tokens)
    torch.testing.assert_close(offloaded_scores, scores, atol=1e-5, rtol=1e-5)
    layer = cache.layers[0]
    assert isinstance(layer, OffloadedCacheLayer) and layer.slots == OFFLOAD_SLOTS_PER_PICK * 2 * 2
    assert sum(fetches) > 0
    if granularity == "token":
        assert sum(fetches) / len(cache.layers) / 2 > layer.slots  # (keys and values) slots were reused


def test_offloaded_stores_grow_past_the_decoding_headroom():
    """300 new tokens outgrow the planned host and device stores (32 blocks of headroom): grown in place of the old
    ones, with the same tokens as the cache kept on the device."""
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    prompt = random_ids(2, 50)
    settings = dict(max_new_tokens=300, min_new_tokens=300, do_sample=False)
    with torch.no_grad():
        on_device = model.generate(prompt, **settings)
        cache = LandmarkRetrievalCache(model.config, offload_to_cpu=True)
        offloaded = model.generate(prompt, **{CACHE: cache}, **settings)
    assert torch.equal(offloaded, on_device)
    planned = (50 + 50 // 7 + 40) // 8 + 2 + 32  # what the prompt planned (LandmarkRetrievalCache.reserve)
    assert cache.layers[0].keys.shape[1] > planned and cache.layers[0].landmarks.shape[1] > planned


def test_offloaded_beam_search_equals_the_device_cache():
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    prompt = random_ids(2, 90)
    settings = dict(max_new_tokens=20, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        on_device = model.generate(prompt, **settings)
        offloaded = model.generate(prompt, offload_to_cpu=True, **settings)
    assert torch.equal(offloaded, on_device)


def test_offloaded_prompt_runs_layer_by_layer_and_continues_like_the_device_cache():
    """Prompts that continue an offloaded cache run layer by layer (the layer's blocks of the first forward reloaded
    once), an input of padding alone adds nothing; asking for per-layer hidden states runs chunk by chunk instead.
    All equal the cache kept on the device."""
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    first, second = random_ids(2, 130), random_ids(2, 95, seed=5)
    with torch.no_grad():
        results = []
        for offload in (False, True):
            cache = LandmarkRetrievalCache(model.config, offload_to_cpu=offload)
            model(first, **{CACHE: cache})
            model(first[:, :3], attention_mask=torch.zeros(2, 3, dtype=torch.long), **{CACHE: cache})  # all padding
            out = model(second, **{CACHE: cache}, output_hidden_states=True)
            layer_major = model(random_ids(2, 50, seed=9), **{CACHE: cache}).logits
            results.append((out.logits, out.hidden_states, layer_major))
    (logits, hidden, later), (offloaded_logits, offloaded_hidden, offloaded_later) = results
    torch.testing.assert_close(offloaded_logits, logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(offloaded_hidden, hidden, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(offloaded_later, later, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["token", "chunk"])
def test_host_memory_no_block_was_written_to_is_never_read(monkeypatch, granularity):
    """Host stores start uninitialised (here: NaN, as reused memory may hold). A padded batch whose short rows have
    fewer complete blocks than others, as inputs of one chunk each (their passes read the layer's blocks through the
    stager) and as a longer one (layer by layer): the logits stay finite and equal the cache kept on the device."""
    real_host_empty = cache_module.host_empty
    monkeypatch.setattr(cache_module, "host_empty",
                        lambda *args, **kwargs: real_host_empty(*args, **kwargs).fill_(float("nan")))
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2, num_attention_heads=4,
                                num_key_value_heads=2)
    first, first_mask, _ = left_padded([30, 4, 1])  # one chunk: 4 complete blocks, none, none
    second, second_mask, _ = left_padded([20, 25, 2], seed=3)
    third, third_mask, _ = left_padded([120, 9, 60], seed=4)
    with torch.no_grad():
        results = []
        for offload in (False, True):
            cache = LandmarkRetrievalCache(model.config, offload_to_cpu=offload, retrieval_granularity=granularity)
            results.append([model(ids, attention_mask=mask, **{CACHE: cache}).logits * mask[..., None]
                            for ids, mask in ((first, first_mask), (second, second_mask), (third, third_mask))])
    for on_device, offloaded in zip(*results, strict=True):
        assert offloaded.isfinite().all()
        torch.testing.assert_close(offloaded, on_device, atol=1e-5, rtol=1e-5)


def _slot_layer(batch, kv_heads, capacity, block_size, head_dim, slots):
    layer = OffloadedCacheLayer(block_size, ring_blocks=2, slots=slots, stager=None)
    layer.planned_blocks = capacity
    layer.lazy_initialization(torch.zeros(batch, kv_heads, 1, head_dim), torch.zeros(batch, kv_heads, 1, head_dim))
    layer.keys.copy_(torch.randn(layer.keys.shape))
    layer.values.copy_(torch.randn(layer.values.shape))
    return layer


def test_fetch_reads_the_selected_blocks_and_keeps_recent_ones(monkeypatch):
    """Random selections over many steps: every valid pick reads its block of the host store through the slots;
    blocks held from earlier steps are not fetched again; a block travels only when no slot holds it."""
    batch, q_heads, kv_heads, capacity, block_size, head_dim, k = 2, 4, 2, 30, 4, 6, 3
    group = q_heads // kv_heads
    slots = OFFLOAD_SLOTS_PER_PICK * group * k
    layer = _slot_layer(batch, kv_heads, capacity, block_size, head_dim, slots)
    fetched = []
    real_copy = cache_module.copy_blocks
    monkeypatch.setattr(cache_module, "copy_blocks", lambda src, dst, s, d: fetched.append(s.clone())
                        or real_copy(src, dst, s, d))
    generator = torch.Generator().manual_seed(3)
    previous = {}
    for step in range(40):
        retrievers = 2 if step % 2 else 1  # decoding steps of two queries, and per-chunk selections
        hot = torch.randint(0, capacity, (8,), generator=generator)  # a working set that recurs, and the rest
        choice = torch.randint(0, 8, (batch, q_heads, retrievers, k), generator=generator)
        selected = torch.where(torch.rand(choice.shape, generator=generator) < 0.7, hot[choice],
                               torch.randint(0, capacity, choice.shape, generator=generator))
        valid = torch.rand(selected.shape, generator=generator) < 0.9
        length = torch.tensor([retrievers, 1])  # the second row's second query is padding
        chunk = ChunkPositions(torch.zeros(batch, dtype=torch.long), length, capacity, 0, torch.tensor(step))
        starts = torch.zeros_like(selected)
        before = layer.slot_blocks.clone()
        retrieved = layer.retrieved(selected, valid, starts, chunk)
        keys, values = retrieved.gathered
        rows = torch.arange(batch)[:, None, None, None]
        heads = (torch.arange(q_heads) // group)[None, :, None, None]
        wanted = retrieved.valid
        assert torch.equal(keys[wanted], layer.keys[rows, selected, heads][wanted])
        assert torch.equal(values[wanted], layer.values[rows, selected, heads][wanted])
        if retrievers == 2:
            assert not retrieved.valid[1, :, 1].any()
        # a block is fetched exactly when it is wanted and no slot held it, once; the slots least recently used
        # give way, so last step's picks stay beside this step's (together they fit the slots)
        source = fetched[-2]
        assert torch.equal(fetched[-1], source)
        picks = {}
        for b in range(batch):
            for h in range(kv_heads):
                heads_of_h = slice(h * group, (h + 1) * group)
                picks[b, h] = set(selected[b, heads_of_h][wanted[b, heads_of_h]].tolist())
                moved = source[b, h][source[b, h] >= 0].tolist()
                assert len(moved) == len(set(moved))
                assert set(moved) == picks[b, h] - set(before[b, h].tolist())
                held = set(layer.slot_blocks[b, h].tolist())
                assert picks[b, h] | previous.get((b, h), set()) <= held
        previous = picks


def test_blocks_go_to_host_memory_once_when_they_complete(monkeypatch):
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    written = []
    real_copy = cache_module.copy_blocks

    def record(src, dst, source, target):
        if dst.data_ptr() == cache.layers[0].keys.data_ptr():
            written.extend(target[0, 0][source[0, 0] >= 0].tolist())  # row 0, head 0
        return real_copy(src, dst, source, target)

    monkeypatch.setattr(cache_module, "copy_blocks", record)
    cache = LandmarkRetrievalCache(model.config, offload_to_cpu=True)
    with torch.no_grad():
        model.generate(random_ids(1, 100), max_new_tokens=30, do_sample=False, **{CACHE: cache})
    complete = int(cache.internal_lengths[0]) // 8
    assert sorted(written) == list(range(complete))  # every complete block, once


@pytest.mark.parametrize("dtype,block_size,head_dim", [(torch.float32, 8, 16), (torch.bfloat16, 7, 80),
                                                       (torch.bfloat16, 64, 40)])  # three programs a block
def test_block_copy_kernel_equals_indexing(dtype, block_size, head_dim):
    batch, heads, pairs = 2, 3, 5
    src = torch.randn(batch, 9, heads, block_size, head_dim).to(dtype)
    dst = torch.randn(batch, 6, heads, block_size, head_dim).to(dtype)
    source = torch.randint(0, 9, (batch, heads, pairs))
    source[torch.rand(source.shape) < 0.3] = -1
    target = torch.stack([torch.stack([torch.randperm(6)[:pairs] for _ in range(heads)]) for _ in range(batch)])
    expected = dst.clone()
    for b in range(batch):
        for h in range(heads):
            for p in range(pairs):
                if source[b, h, p] >= 0:
                    expected[b, target[b, h, p], h] = src[b, source[b, h, p], h]
    copy_blocks(src, dst, source, target)
    assert torch.equal(dst, expected)
    with pytest.raises(ValueError, match="must be contiguous"):
        copy_blocks(src.transpose(3, 4), dst.transpose(3, 4), source, target)
    with pytest.raises(ValueError, match=r"must both be \[batch, heads, pairs\]"):
        copy_blocks(src, dst, source[:, :1], target[:, :1])


@pytest.mark.parametrize("q_heads, kv_heads, retrievers, k", [(4, 2, 2, 3), (2, 2, 1, 4), (6, 2, 2, 1)])
def test_slot_assignment_kernel_equals_the_pytorch_form(q_heads, kv_heads, retrievers, k):
    """The slot assignment CUDA runs (`kernels/slot_assignment.py`, here under TRITON_INTERPRET) against the PyTorch
    form the CPU runs, over steps whose picks recur, repeat within a step, are invalid or belong to padding queries
    (a row of no real query too): the same slots for every pick, blocks fetched into the same slots, and the same slot
    tables after each step."""
    batch, capacity = 3, 80
    slots = OFFLOAD_SLOTS_PER_PICK * q_heads // kv_heads * retrievers * k - 3  # not a power of two
    tables = [(torch.full((batch, kv_heads, slots), -1), torch.full((batch, kv_heads, slots), -1)) for _ in range(2)]
    generator = torch.Generator().manual_seed(q_heads * 10 + k)
    hot = torch.randint(0, capacity, (6,), generator=generator)
    evictions = 0
    for step in range(30):
        shape = (batch, q_heads, retrievers, k)
        selected = torch.where(torch.rand(shape, generator=generator) < 0.6,
                               hot[torch.randint(0, 6, shape, generator=generator)],
                               torch.randint(0, capacity, shape, generator=generator))
        valid = torch.rand(shape, generator=generator) < 0.85
        length = torch.tensor([retrievers, 1, 0])
        stamp = torch.tensor(step)
        (slot_blocks, slot_used), (kernel_blocks, kernel_used) = tables
        before = slot_blocks.clone()
        expected = cache_module.assign_slots(selected, valid, length, slot_blocks, slot_used, stamp)
        got = assign_slots_triton(selected, valid, length, kernel_blocks, kernel_used, stamp)
        for name, a, b in zip(("slot", "valid", "source", "victim"), got, expected, strict=True):
            assert torch.equal(a, b), (step, name)
        assert torch.equal(kernel_blocks, slot_blocks) and torch.equal(kernel_used, slot_used), step
        evictions += int(((before >= 0) & (slot_blocks != before)).sum())
    assert evictions > 0  # slots held blocks that gave way
    with pytest.raises(ValueError, match="need at least as many slots"):
        assign_slots_triton(selected, valid, length, slot_blocks[..., :2].contiguous(),
                            slot_used[..., :2].contiguous(), stamp)


def test_bad_offload_setting_gets_a_clear_error():
    model = tiny_landmark_model()
    with pytest.raises(ValueError, match="offload_to_cpu must be True or False"):
        LandmarkRetrievalCache(model.config, offload_to_cpu="yes")
