"""Model-level checks on a CUDA GPU (skipped without one): the Triton backend against the eager path, and memory."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from landmark_llama.modeling_landmark_llama import _use_triton, landmark_triton_attention
from tiny_models import random_ids, tiny_landmark_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or landmark_triton_attention is None, reason="needs CUDA and Triton"
    ),
]

# head_dim 64: the kernel's sizes; two layers so errors compound as in a real stack.
GPU_MODEL = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1024)


def _loss_and_grads(model, ids, mask=None):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits.float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("block_size,length", [(64, 1000), (32, 777), (128, 1500), (51, 900)])
def test_triton_backend_matches_eager_within_bf16_noise(block_size, length):
    model = tiny_landmark_model(block_size=block_size, **GPU_MODEL).cuda().train()
    ids = random_ids(2, length).cuda()
    exact_logits, exact_grads = _loss_and_grads(model, ids)  # fp32 eager: the yardstick
    model.to(torch.bfloat16)
    results = {}
    for backend in ("eager", "triton"):
        model.config.attention_backend = backend
        results[backend] = _loss_and_grads(model, ids)
    eager_logits, eager_grads = results["eager"]
    triton_logits, triton_grads = results["triton"]
    # The kernel may not be worse than the bf16 eager path by more than 2x (plus a floor for tiny gradients).
    assert _error(triton_logits, exact_logits) <= 2 * _error(eager_logits, exact_logits) + 1e-2
    for name, exact in exact_grads.items():
        floor = 1e-2 * exact.abs().max().item() + 1e-6
        assert _error(triton_grads[name], exact) <= 2 * _error(eager_grads[name], exact) + floor, name


def test_auto_backend_picks_the_kernel_on_cuda_and_padding_still_matches_rows():
    model = tiny_landmark_model(block_size=64, attention_backend="auto", **GPU_MODEL).cuda().to(torch.bfloat16).eval()
    assert _use_triton(model.config, torch.device("cuda"), 64, 0.0)
    lengths = [300, 129, 64]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, -n:], mask[r, -n:] = random_ids(1, n, seed=n)[0].cuda(), 1  # left padding
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for r, n in enumerate(lengths):
            torch.testing.assert_close(batched[r, -n:], model(ids[r : r + 1, -n:]).logits[0], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_training_step_peak_memory_no_worse_than_stock_eager_llama(backend):
    length = 4096
    ids = random_ids(1, length).cuda()
    model = tiny_landmark_model(block_size=64, attention_backend=backend, **GPU_MODEL).cuda().to(torch.bfloat16)
    fields = {k: v for k, v in model.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    stock = LlamaForCausalLM(LlamaConfig(**fields)).cuda().to(torch.bfloat16)
    stock.set_attn_implementation("eager")

    def peak(m):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        m(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        m.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - start

    assert peak(model) <= peak(stock)


def test_retrieval_cache_on_cuda_keeps_the_invariant():
    """Every block retrieved at its true position: the inference form on CUDA equals the training form (fp32)."""
    from landmark_llama.cache_landmark_llama import LandmarkRetrievalCache
    from landmark_llama.modeling_landmark_llama import _CACHE_FIELD

    model = tiny_landmark_model(block_size=16, **GPU_MODEL).cuda()
    ids = random_ids(2, 700).cuda()
    with torch.no_grad():
        reference = model(ids).logits
        for chunk_length in (1, 37, 200):
            cache = LandmarkRetrievalCache(model.config, retrieval_top_k=1000, retrieval_positions="true",
                                           prefill_chunk_length=chunk_length)
            cached = model(ids[:, :500], **{_CACHE_FIELD: cache}).logits
            continued = model(ids[:, 500:], **{_CACHE_FIELD: cache}).logits
            error = _error(torch.cat([cached, continued], 1), reference)
            print(f"retrieval cache on CUDA, chunks of {chunk_length}: vs training form {error:.2e}")
            assert error < 1e-4 and cache.layers[0].keys.is_cuda


@pytest.mark.parametrize("granularity", ["token", "chunk"])
def test_retrieval_cache_on_cuda_follows_the_cpu(granularity):
    """With top-k retrieval, CUDA and CPU agree except where float rounding flips a near-tie of the selection (each
    query token of each head selects with "token" granularity, so a few flips are expected): fp32 logits of at
    least 98% of the tokens agree to 1e-3; bf16 generation runs (its agreement with fp32 is printed)."""
    from landmark_llama.cache_landmark_llama import LandmarkRetrievalCache
    from landmark_llama.modeling_landmark_llama import _CACHE_FIELD

    model = tiny_landmark_model(block_size=16, train_context_length=256, retrieval_top_k=3, **GPU_MODEL)
    settings = dict(retrieval_granularity=granularity)
    ids = random_ids(2, 900)
    mask = torch.ones_like(ids)
    mask[1, :300] = 0
    with torch.no_grad():
        cpu_cache = LandmarkRetrievalCache(model.config, **settings)
        cpu_logits = model(ids, attention_mask=mask, **{_CACHE_FIELD: cpu_cache}).logits
        cpu_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, **settings)
        model.cuda()
        gpu_logits = model(ids.cuda(), attention_mask=mask.cuda(), **{_CACHE_FIELD: LandmarkRetrievalCache(
            model.config, **settings)}).logits.cpu()
        gpu_tokens = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, do_sample=False,
                                    **settings).cpu()
        bf16_tokens = model.to(torch.bfloat16).generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24,
                                                        do_sample=False, **settings).cpu()
    real = mask.bool()
    errors = (gpu_logits[real] - cpu_logits[real]).abs().amax(-1)
    agreeing = (errors < 1e-3).float().mean().item()
    tokens = (gpu_tokens[:, 900:] == cpu_tokens[:, 900:]).float().mean().item()
    bf16 = (bf16_tokens[:, 900:] == cpu_tokens[:, 900:]).float().mean().item()
    print(f"retrieval cache, {granularity}: fp32 CUDA vs CPU: {agreeing:.1%} of tokens within 1e-3 (median "
          f"{errors.median().item():.1e}), generated tokens equal {tokens:.0%}; bf16 tokens equal {bf16:.0%}")
    assert agreeing >= 0.98 and errors.median() < 1e-5
    assert bf16_tokens.shape == cpu_tokens.shape


def test_wide_prefill_passes_equal_passes_of_one_chunk(monkeypatch):
    """On the kernels, a prefill runs as passes of several chunks (`PREFILL_PASS_POSITIONS`): fp32 logits equal those
    of one chunk a pass up to the rounding of longer matrix products (which may flip a rare near-tie of the
    selection), and greedy decoding continues with the same tokens, the padded row too."""
    import landmark_llama.modeling_landmark_llama as modeling
    from landmark_llama.cache_landmark_llama import LandmarkRetrievalCache

    model = tiny_landmark_model(block_size=16, train_context_length=256, retrieval_top_k=3, attention_backend="auto",
                                **GPU_MODEL).cuda()
    ids = random_ids(2, 2000).cuda()
    mask = torch.ones_like(ids)
    mask[1, :700] = 0

    def run():
        with torch.no_grad():
            cache = LandmarkRetrievalCache(model.config)
            logits = model(ids, attention_mask=mask, **{modeling._CACHE_FIELD: cache}).logits
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
        return logits, tokens[:, ids.shape[1]:], cache

    widths = []
    pass_length = modeling.LandmarkLlamaModel._prefill_pass_length
    monkeypatch.setattr(modeling.LandmarkLlamaModel, "_prefill_pass_length",
                        lambda *args: widths.append(pass_length(*args)) or widths[-1])
    chunk_length = LandmarkRetrievalCache(model.config).settings.prefill_chunk_length
    monkeypatch.setattr(modeling, "PREFILL_PASS_POSITIONS", 3 * chunk_length)  # passes of one width that repeat
    wide = run()
    assert widths[0] == 3 * chunk_length
    captured = [graph.graph is not None for (kind, shape), graph in wide[2].step_graphs.items() if kind == "chunk"]
    assert any(captured)  # the third wide pass of the prompt replays the second's graph
    monkeypatch.setattr(modeling, "PREFILL_PASS_POSITIONS", 1)  # one chunk a pass
    widths.clear()
    narrow = run()
    assert widths[0] == chunk_length
    real = mask.bool()
    errors = (wide[0][real] - narrow[0][real]).abs().amax(-1)
    print(f"wide prefill passes vs one chunk a pass: {(errors < 1e-3).float().mean().item():.2%} of tokens within "
          f"1e-3 (median {errors.median().item():.1e}); generated tokens equal "
          f"{(wide[1] == narrow[1]).float().mean().item():.0%}")
    assert (errors < 1e-3).float().mean() >= 0.99 and errors.median() < 1e-5
    assert torch.equal(wide[1], narrow[1])


def test_trainer_bf16_step_on_the_kernel_path(tmp_path):
    """Issue 16.1: the Trainer's --bf16 (fp32 weights under bf16 autocast) used to crash the Triton kernel with mixed
    q/k/v dtypes; two steps must run and follow the eager path's losses."""
    import math

    from transformers import Trainer, TrainingArguments

    ids = random_ids(4, 300)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    losses = {}
    for backend in ("triton", "eager"):
        model = tiny_landmark_model(block_size=64, attention_backend=backend, **GPU_MODEL).cuda().train()
        args = TrainingArguments(output_dir=str(tmp_path / backend), bf16=True, max_steps=2, report_to="none",
                                 per_device_train_batch_size=2, logging_steps=1, save_strategy="no", seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
        losses[backend] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"bf16 Trainer losses: triton {losses['triton']}, eager {losses['eager']}")
    assert len(losses["triton"]) == 2 and all(math.isfinite(x) for x in losses["triton"])
    assert all(abs(a - b) < 0.05 for a, b in zip(losses["triton"], losses["eager"]))


def _two_rows(length, padding):
    """Two prompts of `length` columns, the second left-padded by `padding`."""
    ids = random_ids(2, length)
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0
    return ids, mask


def _greedy(model, ids, mask, **settings):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **settings)
    return out.sequences.cpu(), torch.stack(out.scores, 1).float().cpu()


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("granularity", ["token", "chunk"])
def test_graph_captured_decoding_equals_plain_steps_and_the_cpu(backend, granularity):
    """Greedy generation of a small fp32 model with padded rows: decoding steps replayed from CUDA graphs give the
    tokens of plain steps on the GPU and of the CPU eager path (with the kernels on: the fused retrieval kernel in
    every step); a hand-written loop shows the graph captured and replayed. bf16 with kernels and graphs stays
    within bf16 noise of fp32 until its tokens first differ."""
    from landmark_llama.cache_landmark_llama import LandmarkRetrievalCache
    from landmark_llama.modeling_landmark_llama import _CACHE_FIELD

    model = tiny_landmark_model(block_size=16, train_context_length=256, retrieval_top_k=3,
                                attention_backend=backend, **GPU_MODEL)
    settings = dict(retrieval_granularity=granularity)
    ids, mask = _two_rows(600, 200)
    with torch.no_grad():
        cpu_tokens, cpu_scores = _greedy(model, ids, mask, **settings)
        model.cuda()
        ids, mask = ids.cuda(), mask.cuda()
        plain_tokens, plain_scores = _greedy(model, ids, mask, cuda_graphs=False, **settings)
        graph_tokens, graph_scores = _greedy(model, ids, mask, **settings)

        cache = LandmarkRetrievalCache(model.config, **settings)
        logits = model(ids, attention_mask=mask, **{_CACHE_FIELD: cache}).logits
        for _ in range(6):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, **{_CACHE_FIELD: cache}).logits
        graphs = cache.step_graphs  # the prefill passes (one a width) and the decoding steps, the latter captured
        assert len(graphs) >= 2 and all(graph.blocker is None for graph in graphs.values())
        assert [graph.graph is not None for (kind, _), graph in graphs.items() if kind == "decode"] == [True]

        model.to(torch.bfloat16)
        bf16_tokens, bf16_scores = _greedy(model, ids, mask, **settings)
        model.config.attention_backend = "eager"
        bf16_eager_tokens, bf16_eager_scores = _greedy(model, ids, mask, cuda_graphs=False, **settings)
    assert torch.equal(graph_tokens, plain_tokens)
    torch.testing.assert_close(graph_scores, plain_scores, atol=1e-5, rtol=1e-5)
    finite = graph_scores.isfinite()  # the landmark id is suppressed (-inf) at every step
    agree = (graph_tokens == cpu_tokens).float().mean().item()
    print(f"{backend}, {granularity}: GPU graphs vs CPU eager tokens equal {agree:.1%}, score error "
          f"{(graph_scores - cpu_scores)[finite].abs().max().item():.1e}")
    assert torch.equal(graph_tokens, cpu_tokens)
    # bf16 noise: bf16 with this path's kernels and graphs strays from fp32 no more than bf16 eager plain steps do,
    # over the steps before either one's tokens first differ from fp32's
    equal = (bf16_tokens == graph_tokens) & (bf16_eager_tokens == graph_tokens)
    same = equal[:, 600:].all(0).long().cumprod(0).sum().item()
    kept = finite[:, :same]
    error = (bf16_scores[:, :same] - graph_scores[:, :same])[kept].abs().max().item()
    eager_error = (bf16_eager_scores[:, :same] - graph_scores[:, :same])[kept].abs().max().item()
    print(f"bf16 (kernels {backend == 'auto'}, graphs) vs fp32: {same} steps equal; score error {error:.2e}, bf16 "
          f"eager plain steps {eager_error:.2e}")
    assert same >= 5 and error <= 1.5 * eager_error + 1e-3


@pytest.mark.parametrize("granularity", ["token", "chunk"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_offloaded_cache_on_cuda_gives_the_tokens_of_the_cpu(granularity, cuda_graphs):
    """Host offload on the GPU with the kernels: pinned host stores written and read in place by the block-copy
    kernel, a prompt run layer by layer with each layer's blocks held on the GPU, decoding steps fetching into the
    slots (more blocks than slots). Greedy tokens of a small fp32 model equal the CPU eager path's without offload; in
    bf16, the tokens and scores of the cache kept on the GPU."""
    from landmark_llama.cache_landmark_llama import LandmarkRetrievalCache
    from landmark_llama.modeling_landmark_llama import _CACHE_FIELD

    model = tiny_landmark_model(block_size=16, train_context_length=256, retrieval_top_k=3, attention_backend="auto",
                                **GPU_MODEL)
    settings = dict(retrieval_granularity=granularity, cuda_graphs=cuda_graphs)
    ids, mask = _two_rows(1200, 300)  # 80 blocks a row: more than the 48 slots of a key/value head
    with torch.no_grad():
        cpu_tokens, cpu_scores = _greedy(model, ids, mask, **settings)
        model.cuda()
        ids, mask = ids.cuda(), mask.cuda()
        cache = LandmarkRetrievalCache(model.config, offload_to_cpu=True, **settings)
        tokens, scores = _greedy(model, ids, mask, **{_CACHE_FIELD: cache}, **settings)
        layer = cache.layers[0]
        assert layer.keys.device.type == "cpu" and layer.keys.is_pinned() and layer.ring_keys.is_cuda
        assert int(cache.internal_lengths.max()) // 16 > layer.slots
        if cuda_graphs:
            assert any(graph.graph is not None for graph in cache.step_graphs.values())
        model.to(torch.bfloat16)
        on_device = _greedy(model, ids, mask, **settings)
        offloaded = _greedy(model, ids, mask, offload_to_cpu=True, **settings)
    finite = scores.isfinite()
    print(f"offload {granularity}, graphs {cuda_graphs}: score error against the CPU "
          f"{(scores - cpu_scores)[finite].abs().max().item():.1e}")
    assert torch.equal(tokens, cpu_tokens)
    assert torch.equal(offloaded[0], on_device[0])
    torch.testing.assert_close(offloaded[1], on_device[1], atol=1e-2, rtol=1e-2)
