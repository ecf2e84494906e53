"""The block-retrieval cache (`cache_landmark_llama.py`) on CPU: the invariant against the training form, padded
batches against rows alone, every generate mode, hand-written loops, remote code, and bad inputs."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from landmark_llama.cache_landmark_llama import LandmarkRetrievalCache, top_blocks
from landmark_llama.modeling_landmark_llama import _CACHE_FIELD as CACHE
from tiny_models import BLOCK_PROJECT_IMPORTS, LANDMARK_ID, PAD_ID, random_ids, tiny_landmark_model

BLOCK = 8  # tiny_landmark_config's block size: 7 user tokens a block


def full_cache(model, **settings):
    """A cache that retrieves every block at its true position: the inference form equals the training form."""
    return LandmarkRetrievalCache(model.config, retrieval_top_k=1000, retrieval_positions="true", **settings)


def left_padded(lengths, seed=0):
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD_ID)
    mask = torch.zeros_like(ids)
    rows = [random_ids(1, n, seed=seed + n)[0] for n in lengths]
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    return ids, mask, rows


@pytest.mark.parametrize("chunk_length", [1, 2, 5, 8, 13, 40])
def test_full_retrieval_at_true_positions_equals_the_training_form(chunk_length):
    model = tiny_landmark_model()
    ids = random_ids(2, 80)  # 11 complete blocks and a tail
    with torch.no_grad():
        reference = model(ids).logits  # no cache: the training form over the whole input
        out = model(ids, **{CACHE: full_cache(model, prefill_chunk_length=chunk_length)})
        torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=1e-5)
        # the same tokens fed in pieces of any size, continuing one cache
        cache, pieces, start = full_cache(model, prefill_chunk_length=chunk_length), [], 0
        for size in (6, 1, 1, 9, 21, 1, 41):
            pieces.append(model(ids[:, start : start + size], **{CACHE: cache}).logits)
            start += size
    torch.testing.assert_close(torch.cat(pieces, 1), reference, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 80 and cache.internal_lengths.tolist() == [80 + 80 // 7] * 2


def test_stingy_positions_with_every_block_retrieved_are_the_true_positions():
    model = tiny_landmark_model()
    ids = random_ids(1, 60)
    with torch.no_grad():
        stingy = LandmarkRetrievalCache(model.config, retrieval_top_k=30, prefill_chunk_length=12)
        torch.testing.assert_close(model(ids, **{CACHE: stingy}).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_retrieval_with_few_blocks_differs_from_the_training_form():
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)  # chunks of 40 positions
    ids = random_ids(1, 120)
    with torch.no_grad():
        reference = model(ids).logits
        retrieved = model(ids, use_cache=True).logits
    first_chunk = 40 - 40 // BLOCK  # user tokens of the first chunk: plain landmark attention, no retrieval yet
    torch.testing.assert_close(retrieved[:, :first_chunk], reference[:, :first_chunk], atol=1e-5, rtol=1e-5)
    assert (retrieved[:, first_chunk:] - reference[:, first_chunk:]).abs().max() > 1e-2


def test_greedy_generate_equals_a_greedy_loop_over_full_forwards():
    model = tiny_landmark_model()
    prompt = random_ids(1, 30)
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=25, do_sample=False, retrieval_top_k=1000, retrieval_positions="true",
            prefill_chunk_length=9,
        )
        sequence = prompt
        for _ in range(25):
            logits = model(sequence).logits[:, -1]
            logits[:, LANDMARK_ID] = float("-inf")
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("granularity", ["token", "chunk"])
@pytest.mark.parametrize("positions", ["stingy", "true"])
def test_left_padded_batch_equals_each_prompt_alone(granularity, positions):
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    settings = dict(retrieval_granularity=granularity, retrieval_positions=positions)
    ids, mask, rows = left_padded([75, 40, 9, 1])
    width = ids.shape[1]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, **{CACHE: LandmarkRetrievalCache(model.config, **settings)}).logits
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD_ID, output_scores=True,
            return_dict_in_generate=True, **settings,
        )
        for r, row in enumerate(rows):
            alone = model(row[None], **{CACHE: LandmarkRetrievalCache(model.config, **settings)}).logits[0]
            torch.testing.assert_close(batched[r, mask[r].bool()], alone, atol=1e-5, rtol=1e-5)
            single = model.generate(
                row[None], max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True,
                **settings,
            )
            assert generated.sequences[r, width:].tolist() == single.sequences[0, len(row):].tolist()
            for step_batched, step_alone in zip(generated.scores, single.scores):
                finite = step_alone[0].isfinite()
                torch.testing.assert_close(step_batched[r, finite], step_alone[0, finite], atol=1e-5, rtol=1e-5)


def test_beam_search_reorders_the_cache():
    """With every block retrieved at its true position, cached beam search must equal uncached beam search."""
    model = tiny_landmark_model()
    prompt = random_ids(2, 26)
    settings = dict(retrieval_top_k=1000, retrieval_positions="true", prefill_chunk_length=10)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=15, num_beams=4, num_return_sequences=3, do_sample=False,
                                **settings)
        uncached = model.generate(prompt, max_new_tokens=15, num_beams=4, num_return_sequences=3, do_sample=False,
                                  use_cache=False)
    assert cached.shape == (6, 26 + 15)
    assert torch.equal(cached, uncached)


def test_sampling_with_a_seed_and_several_return_sequences():
    model = tiny_landmark_model()
    prompt = random_ids(1, 33)
    settings = dict(retrieval_top_k=1000, retrieval_positions="true", prefill_chunk_length=16)
    runs = []
    with torch.no_grad():
        for extra in (settings, settings, {"use_cache": False}):
            torch.manual_seed(123)
            runs.append(model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=0, num_return_sequences=3,
                                       **extra))
    assert runs[0].shape == (3, 45) and not torch.equal(runs[0][0], runs[0][1])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_streamer_receives_every_token_and_the_cache_is_returned():
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.flatten().tolist())

        def end(self):
            self.tokens.append("end")

    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    prompt = random_ids(1, 50)
    streamer = Collect()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=9, do_sample=False, streamer=streamer, output_scores=True,
                             return_dict_in_generate=True)
    assert streamer.tokens[0] == prompt[0].tolist() and streamer.tokens[-1] == "end"
    assert [t[0] for t in streamer.tokens[1:-1]] == out.sequences[0, 50:].tolist()
    assert len(out.scores) == 9
    cache = getattr(out, CACHE)
    assert isinstance(cache, LandmarkRetrievalCache) and cache.get_seq_length() == 58  # the last token is not fed


def test_hand_written_loop_gets_the_cache_back_and_continues_like_generate():
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    prompt = random_ids(1, 66)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = getattr(out, CACHE)
        assert isinstance(cache, LandmarkRetrievalCache)
        tokens = []
        for _ in range(10):
            logits = out.logits[:, -1]
            logits[:, LANDMARK_ID] = float("-inf")
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token.item())
            out = model(token, **{CACHE: cache})
        generated = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert tokens == generated[0, 66:].tolist()


def test_top_blocks_breaks_ties_for_the_earlier_block():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5 * (1 + 1e-7), 0.1, float("-inf")]])
    for k, expected in ((1, [1]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (5, [0, 1, 2, 3, 4])):
        indices, picked = top_blocks(scores, k)  # 0.5 at blocks 0, 2, 3 are equal up to rounding
        assert indices.tolist() == [expected] and picked.all()
    indices, picked = top_blocks(scores, 6)
    assert indices[picked].tolist() == [0, 1, 2, 3, 4] and picked.sum() == 5  # -inf: no block there
    assert top_blocks(torch.tensor([[0.2, 0.3, 0.25]]), 2)[0].tolist() == [[1, 2]]
    ties = torch.full((2, 3, 50), 0.25)
    ties[..., 7] = 0.3
    assert top_blocks(ties, 3)[0].tolist() == [[[0, 1, 7]] * 3] * 2


def test_generate_from_remote_code_in_a_fresh_process(tmp_path):
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert (folder / "cache_landmark_llama.py").exists()
    prompt = random_ids(1, 90)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=12, do_sample=False, retrieval_granularity="chunk")
    script = BLOCK_PROJECT_IMPORTS + textwrap.dedent(
        """
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        prompt = torch.tensor(json.loads(sys.argv[2]))
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=12, do_sample=False, retrieval_granularity="chunk",
                                 return_dict_in_generate=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        print(json.dumps({"tokens": out.sequences.tolist(), "cache": type(cache).__module__}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), json.dumps(prompt.tolist())], cwd=tmp_path, capture_output=True,
        text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["tokens"] == expected.tolist()
    assert answer["cache"].startswith("transformers_modules.")


@pytest.mark.parametrize("settings,message", [
    ({"retrieval_top_k": 0}, "retrieval_top_k must be an integer of at least 1"),
    ({"retrieval_top_k": 7}, "leaves no room for a chunk"),  # 8 blocks of 8 fill the context of 64
    ({"prefill_chunk_length": 60}, "cannot fit the retrieval window"),
    ({"prefill_chunk_length": 0}, "cannot fit the retrieval window"),
    ({"retrieval_granularity": "head"}, "retrieval_granularity must be one of"),
    ({"retrieval_positions": "absolute"}, "retrieval_positions must be one of"),
])
def test_bad_retrieval_settings_get_clear_errors(settings, message):
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    prompt = random_ids(1, 10)
    with pytest.raises(ValueError, match=message):
        model.generate(prompt, max_new_tokens=2, **settings)
    with pytest.raises(ValueError, match=message):
        LandmarkRetrievalCache(model.config, **settings)


def test_bad_caches_get_clear_errors():
    model = tiny_landmark_model()
    prompt = random_ids(2, 10)
    with pytest.raises(TypeError, match="needs a LandmarkRetrievalCache, got DynamicCache"):
        model(prompt, **{CACHE: DynamicCache()})
    with pytest.raises(TypeError, match="needs a LandmarkRetrievalCache"):
        model.generate(prompt, max_new_tokens=2, **{CACHE: DynamicCache()})
    cache = LandmarkRetrievalCache(model.config, retrieval_top_k=2)
    with torch.no_grad():
        model(prompt, **{CACHE: cache})
        with pytest.raises(ValueError, match="the cache holds 2 rows but the input has 1"):
            model(prompt[:1], **{CACHE: cache})
        with pytest.raises(ValueError, match="retrieval_top_k=3 differs from the cache's 2"):
            model.generate(prompt, max_new_tokens=2, retrieval_top_k=3, **{CACHE: cache})
        with pytest.raises(ValueError, match="attention_mask covers 7 tokens"):
            model(prompt, attention_mask=torch.ones(2, 7, dtype=torch.long), **{CACHE: cache})
    for field, value in (("retrieval_granularity", "block"), ("retrieval_positions", "exact")):
        with pytest.raises(Exception, match=f"{field} must be one of"):  # config validation wraps the ValueError
            tiny_landmark_model(**{field: value})


def test_generate_from_inputs_embeds_equals_generate_from_ids():
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    ids = random_ids(2, 50)
    with torch.no_grad():
        from_ids = model.generate(ids, max_new_tokens=8, do_sample=False)
        from_embeds = model.generate(inputs_embeds=model.model.embed_tokens(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 50:])  # generate returns only the new tokens for embeddings


@pytest.mark.parametrize("granularity, positions, cuda_graphs, offload, pass_positions, length", [
    ("chunk", "true", True, False, None, 60), ("token", "stingy", False, False, None, 60),
    ("token", "stingy", True, True, None, 60), ("token", "stingy", True, False, None, 60),
    ("token", "true", False, False, 80, 110),  # passes of 80 and 45 positions: two chunks of 40, then one and 5
])
def test_retrieval_kernel_serves_the_cache_like_the_eager_path(monkeypatch, granularity, positions, cuda_graphs,
                                                               offload, pass_positions, length):
    """With the kernels on (here under TRITON_INTERPRET), every chunk and decoding step runs on the retrieval kernel,
    which reads the cache in place, in static passes (cuda_graphs on: static bounds, no host reads) and in exact
    ones, and with the store offloaded (the local part from the ring or, during a prompt's layer-by-layer passes, the
    staged layer; retrieved blocks from the slots or the staged layer): logits and greedy tokens equal the eager
    path's, padded batches too. With per-token retrieval the prefill runs as wide passes of several chunks (all of a
    short prompt in one, or `PREFILL_PASS_POSITIONS` at a time), which compute what the eager path's passes of one
    chunk compute."""
    import landmark_llama.modeling_landmark_llama as modeling

    if pass_positions is not None:
        monkeypatch.setattr(modeling, "PREFILL_PASS_POSITIONS", pass_positions)
    # two query heads over one key/value head (the interpreter's time grows with heads); chunks of 40 positions
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2, hidden_size=32, intermediate_size=64,
                                num_attention_heads=2, num_key_value_heads=1)
    settings = dict(retrieval_granularity=granularity, retrieval_positions=positions, cuda_graphs=cuda_graphs,
                    offload_to_cpu=offload)
    chunk_length = LandmarkRetrievalCache(model.config, **settings).settings.prefill_chunk_length
    ids = random_ids(1, length)
    padded, mask, _ = left_padded([length, 41])

    def run():
        with torch.no_grad():
            cache = LandmarkRetrievalCache(model.config, **settings)
            steps = [model(ids, **{CACHE: cache}).logits]
            for _ in range(3):  # decoding steps continuing the same cache
                steps.append(model(steps[-1][:, -1:].argmax(-1), **{CACHE: cache}).logits)
            cache = LandmarkRetrievalCache(model.config, **settings)
            padded_logits = model(padded, attention_mask=mask, **{CACHE: cache}).logits
        tokens = torch.cat([step[:, -1].argmax(-1) for step in steps])
        return torch.cat(steps, 1), tokens, padded_logits * mask[..., None]

    eager = run()
    widths = []
    kernel = modeling.retrieval_triton_attention
    monkeypatch.setattr(modeling, "_use_triton", lambda config, device, head_dim, dropout: True)
    monkeypatch.setattr(modeling, "retrieval_triton_attention",
                        lambda *args, **kwargs: widths.append(args[0].shape[2]) or kernel(*args, **kwargs))
    on_kernel = run()
    torch.testing.assert_close(on_kernel[0], eager[0], atol=2e-5, rtol=2e-5)
    assert torch.equal(on_kernel[1], eager[1])
    torch.testing.assert_close(on_kernel[2], eager[2], atol=2e-5, rtol=2e-5)
    internal = length + length // (model.config.block_size - 1)  # the prompt with its landmarks
    wide = granularity == "token"
    pass_length = chunk_length * (min(modeling.PREFILL_PASS_POSITIONS // chunk_length, -(-internal // chunk_length))
                                  if wide else 1)
    passes = {min(pass_length, internal - begin) for begin in range(0, internal, pass_length)}
    assert passes | {2 if cuda_graphs else 1} <= set(widths)  # every prefill pass and the decoding steps
    assert max(widths) == max(passes)


@pytest.mark.parametrize("granularity", ["chunk", "token"])
def test_chunks_of_one_position_decode_the_same_with_static_passes(granularity):
    """With prefill_chunk_length=1 a decoding step's token and landmark slot are two chunks, each selecting on its
    own: the static passes (cuda_graphs on) give the scores of exact ones."""
    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    ids, mask, _ = left_padded([40, 23])
    scores = []
    with torch.no_grad():
        for cuda_graphs in (True, False):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD_ID,
                                 output_scores=True, return_dict_in_generate=True, prefill_chunk_length=1,
                                 retrieval_granularity=granularity, cuda_graphs=cuda_graphs)
            scores.append(torch.stack(out.scores, 1))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)


def test_step_graphs_warm_capture_and_replay_like_plain_passes(monkeypatch):
    """The CUDA-graph bookkeeping on the CPU, with a stand-in graph whose replay runs the captured pass on its static
    inputs: a pass whose buffers are new runs plainly, the next is captured and replayed, a store that grows starts
    the cycle again; the tokens equal those of exact passes (cuda_graphs=False)."""
    import types

    import landmark_llama.modeling_landmark_llama as modeling

    events = []

    def capture(self, step, inputs, lengths):
        self.inputs, self.lengths, self.output = inputs.clone(), lengths.clone(), None

        def replay():
            events.append("replay")
            result = step(self.inputs, self.lengths)
            self.output = result if self.output is None else self.output.copy_(result)

        events.append("capture")
        self.graph = types.SimpleNamespace(replay=replay)

    model = tiny_landmark_model(train_context_length=64, retrieval_top_k=2)
    prompt = random_ids(2, 200)  # six prefill chunks: five of 40 positions, the first before the stores exist
    with torch.no_grad():
        exact = model.generate(prompt, max_new_tokens=300, min_new_tokens=300, do_sample=False, cuda_graphs=False)
        monkeypatch.setattr(modeling, "_graph_blocker", lambda model, cache, inputs: "none")
        monkeypatch.setattr(modeling.StepGraph, "_capture", capture)
        cache = LandmarkRetrievalCache(model.config)
        graphed = model.generate(prompt, max_new_tokens=300, min_new_tokens=300, do_sample=False, **{CACHE: cache})
    assert torch.equal(graphed, exact)
    decoding = cache.step_graphs[("decode", (2, 1, model.config.hidden_size))]
    prefill = cache.step_graphs[("chunk", (2, 40, model.config.hidden_size))]
    assert decoding.graph is not None and prefill.graph is not None
    # 300 tokens outgrow the decoding headroom: the stores grew and the decoding step was captured again
    assert events.count("capture") == 3 and events.count("replay") > 290


@pytest.mark.parametrize("offload", [False, True])
def test_the_kernel_write_equals_writing_whole_local_blocks(offload):
    """The kernel path's cache write (`write_with_kernel`: new positions only, one Triton kernel, here under the
    interpreter) leaves the stores and the landmark keys of complete blocks as the eager path's (whole [tail | chunk]
    blocks rewritten), and rotates the query as the eager path does, over passes of several widths that start
    mid-block, with rows of different lengths and GQA."""
    from landmark_llama.cache_landmark_llama import (
        BlockStager, ChunkPositions, LandmarkCacheLayer, OffloadedCacheLayer, apply_rope,
    )

    block_size, q_heads, kv_heads, head_dim = 8, 4, 2, 6
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    generator = torch.Generator().manual_seed(4)

    def layer():
        if offload:
            return OffloadedCacheLayer(block_size, ring_blocks=4, slots=4, stager=BlockStager())
        return LandmarkCacheLayer(block_size)

    eager, kernel = layer(), layer()
    for cache_layer in (eager, kernel):
        cache_layer.reserve(20)
    start = torch.tensor([0, 3])
    for index, (width, lengths) in enumerate([(5, [5, 2]), (2, [2, 2]), (13, [13, 9]), (1, [1, 0]), (2, [1, 2])]):
        length = torch.tensor(lengths)
        chunk = ChunkPositions(start.clone(), length, int((start // block_size).max()), block_size - 1,
                               torch.tensor(index))
        query = torch.randn(2, q_heads, width, head_dim, generator=generator)
        keys = torch.randn(2, kv_heads, width, head_dim, generator=generator)
        values = torch.randn(2, kv_heads, width, head_dim, generator=generator)
        eager.update(keys, values, chunk, inv_freq)
        chunk.shared.clear()
        rotated = kernel.write_with_kernel(query, keys, values, chunk, inv_freq)
        positions = (start[:, None] + torch.arange(width))[:, None]
        torch.testing.assert_close(rotated, apply_rope(query, positions, inv_freq), atol=1e-6, rtol=1e-6)
        start = start + length
        complete = (start // block_size).tolist()
        for name in eager.STORES:
            if name in getattr(eager, "HOST", ()) or "landmarks" in name:  # written for complete blocks only
                for row, blocks in enumerate(complete):
                    torch.testing.assert_close(getattr(kernel, name)[row, :blocks], getattr(eager, name)[row, :blocks],
                                               atol=1e-6, rtol=1e-6, msg=name)
            else:
                torch.testing.assert_close(getattr(kernel, name), getattr(eager, name), atol=1e-6, rtol=1e-6,
                                           msg=name)
