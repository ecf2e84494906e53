"""LandmarkLlama model behaviour on CPU: stock equivalence, landmark insertion, padding, loss, dtypes, errors."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM
from landmark_llama import modeling_landmark_llama as modeling
from landmark_llama.modeling_landmark_llama import LandmarkLayout
from tiny_models import LANDMARK_ID, PAD_ID, random_ids, tiny_landmark_config, tiny_landmark_model


def _stock_twin(model):
    fields = {k: v for k, v in model.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    stock = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    stock.load_state_dict(model.state_dict())
    return stock


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": True},
                                       {"rope_parameters": LLAMA3_ROPE}, {"head_dim": 32}],
                         ids=["base", "tied", "bias", "llama3-rope", "head-dim-32"])
def test_matches_stock_llama_below_one_block(overrides):
    model = tiny_landmark_model(**overrides)
    stock = _stock_twin(model)
    ids = random_ids(2, model.config.block_size - 1)  # the first landmark would follow the last token
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-5)
    # With a landmark in play the two models must differ: landmark attention is really used.
    ids = random_ids(2, 3 * model.config.block_size)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, stock(ids).logits, atol=1e-3)


def test_internal_sequence_matches_a_manual_landmark_insertion():
    """Feeding the stock stack the hand-built internal sequence gives the same logits at the token positions."""
    model = tiny_landmark_model()
    block = model.config.block_size
    ids = random_ids(1, 3 * (block - 1) + 4)
    pieces = []
    for start in range(0, ids.shape[1], block - 1):
        chunk = ids[:, start : start + block - 1]
        pieces.append(chunk)
        if chunk.shape[1] == block - 1:
            pieces.append(torch.tensor([[LANDMARK_ID]]))
    internal = torch.cat(pieces, dim=1)
    token_positions = (internal != LANDMARK_ID)[0]
    with torch.no_grad():
        hidden = super(type(model.model), model.model).forward(input_ids=internal).last_hidden_state
        expected = model.lm_head(hidden[:, token_positions])
        torch.testing.assert_close(model(ids).logits, expected)
    assert LandmarkLayout.build(None, 1, ids.shape[1], block, ids.device).internal_length == internal.shape[1]


def test_appending_tokens_never_changes_earlier_logits():
    model = tiny_landmark_model()
    ids = random_ids(2, 45)
    with torch.no_grad():
        full = model(ids).logits
        for cut in (1, 7, 8, 14, 30):
            torch.testing.assert_close(model(ids[:, :cut]).logits, full[:, :cut], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_per_row_runs(side):
    model = tiny_landmark_model()
    lengths = [37, 20, 8, 1]
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD_ID)
    mask = torch.zeros_like(ids)
    rows = [random_ids(1, n, seed=n)[0] for n in lengths]
    for r, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[r, span], mask[r, span] = row, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for r, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batched[r][mask[r].bool()], alone, atol=1e-5, rtol=1e-5)


def test_loss_is_stock_shifted_cross_entropy_over_user_tokens():
    model = tiny_landmark_model()
    ids = random_ids(2, 30)
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    shifted_logits, shifted_labels = out.logits[:, :-1], labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]),
                                                 shifted_labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (2, 30, model.config.vocab_size)


def test_hidden_states_line_up_with_user_tokens():
    model = tiny_landmark_model()
    ids = random_ids(1, 20)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (1, 20, model.config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 40)
    grads = []
    for checkpointing in (False, True):
        model = tiny_landmark_model().train()
        if checkpointing:  # transformers 5.23 renamed it and warns on the old name
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
            assert model.is_gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    assert grads[0]["model.embed_tokens.weight"][LANDMARK_ID].abs().sum() > 0  # the landmark embedding learns


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.15), (torch.float16, 0.02)], ids=["bf16", "fp16"])
def test_half_precision_follows_fp32(dtype, atol):
    model = tiny_landmark_model()
    ids = random_ids(2, 40)
    with torch.no_grad():
        reference = model(ids).logits
        low = model.to(dtype)(ids).logits
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), reference, atol=atol, rtol=0)


def test_generate_never_emits_the_landmark_and_matches_greedy_forward():
    model = tiny_landmark_model()
    # Make the landmark the most likely token everywhere: generation must still skip it.
    with torch.no_grad():
        model.lm_head.weight[LANDMARK_ID] = 10 * model.lm_head.weight.abs().max()
    prompt = random_ids(1, 12)
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert (generated != LANDMARK_ID).all()
    sequence = prompt
    with torch.no_grad():
        for _ in range(10):
            logits = model(sequence).logits[:, -1]
            logits[:, LANDMARK_ID] = float("-inf")
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(generated, sequence)


def test_bad_inputs_get_clear_errors():
    model = tiny_landmark_model()
    ids = random_ids(1, 10)
    with pytest.raises(ValueError, match="contain the landmark token"):
        model(torch.cat([ids, torch.tensor([[LANDMARK_ID]])], 1))
    with pytest.raises(ValueError, match="custom position_ids"):
        model(ids, position_ids=torch.arange(10)[None] + 3)
    model(ids, position_ids=torch.arange(10)[None])  # the default positions are accepted
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        model.set_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="cannot run here"):
        tiny_landmark_model(attention_backend="triton")(ids)


@pytest.mark.parametrize("overrides,message", [
    ({"landmark_token_id": 101}, "outside the vocabulary"),
    ({"landmark_token_id": PAD_ID}, "also the pad_token_id"),
    ({"block_size": 1}, "block_size must be at least 2"),
    ({"train_context_length": 0}, "train_context_length must be positive"),
    ({"attention_backend": "flash"}, "attention_backend must be one of"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_landmark_config(**overrides)


def test_from_pretrained_overrides_are_validated(tmp_path):
    tiny_landmark_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        LandmarkLlamaForCausalLM.from_pretrained(tmp_path, block_size=1)


def test_config_round_trip_keeps_landmark_fields(tmp_path):
    config = tiny_landmark_config(block_size=51, retrieval_top_k=5, train_context_length=1024)
    config.save_pretrained(tmp_path)
    loaded = LandmarkLlamaConfig.from_pretrained(tmp_path)
    assert (loaded.block_size, loaded.retrieval_top_k, loaded.train_context_length) == (51, 5, 1024)
    assert loaded.num_key_value_heads == 2 and loaded.landmark_token_id == LANDMARK_ID


@pytest.mark.parametrize("block_size, length", [(4, 23), (7, 40), (51, 130)])
def test_training_form_on_the_kernel_matches_eager(block_size, length, monkeypatch):
    """Loss, logits and every parameter's gradient of the training forward on the Triton kernel (under the
    interpreter) against the eager path; block sizes that are no power of two run with their keys and values in
    power-of-two slots and their queries in place."""
    if modeling.landmark_triton_attention is None:
        pytest.skip("Triton is not installed")
    ids = random_ids(2, length)
    results = []
    for use_kernel in (False, True):
        monkeypatch.setattr(modeling, "_use_triton", lambda config, device, head_dim, dropout: use_kernel)
        model = tiny_landmark_model(block_size=block_size).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager_loss, eager_logits, eager_grads), (loss, logits, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
