"""Random small configurations through every generation path of the retrieval cache, each compared with another
path that must give the same answer: full retrieval against the training form, offloaded against device-resident,
static passes against plain ones, a padded batch against each row alone, a prompt fed in pieces against one
forward. Block sizes, head layouts, top k, granularity, positions, prefill chunk lengths and padding vary by seed
(the two bugs that this comparison first found were in corners no hand-written case reached)."""

import random

import pytest
import torch

from landmark_llama.cache_landmark_llama import default_chunk_length
from landmark_llama.modeling_landmark_llama import _CACHE_FIELD  # the cache's keyword in this transformers
from test_retrieval_cache import full_cache, left_padded
from tiny_models import PAD_ID, tiny_landmark_model

SETTINGS = [(granularity, positions) for granularity in ("token", "chunk") for positions in ("stingy", "true")]


def random_configuration(seed):
    """A model, cache settings and a left-padded batch that the cache accepts. Every granularity and positions pair
    comes up once in four seeds, each with the default chunk length, chunks of one position and a random length."""
    draw = random.Random(seed)
    granularity, positions = SETTINGS[seed % len(SETTINGS)]
    block_size = draw.choice([2, 3, 4, 5, 8, 9, 16])
    query_heads, key_value_heads = draw.choice([(2, 1), (4, 2), (4, 4), (6, 2)])
    head_dim = draw.choice([8, 12, 16])
    top_k = draw.randint(1, 5)
    # stingy positions need the window of top_k + 1 blocks and at least one more block within the context
    context_length = block_size * (top_k + 1 + draw.randint(1, 5))
    model = tiny_landmark_model(
        seed=seed, block_size=block_size, num_attention_heads=query_heads, num_key_value_heads=key_value_heads,
        hidden_size=query_heads * head_dim, head_dim=head_dim, train_context_length=context_length,
        retrieval_top_k=top_k,
    )
    settings = dict(retrieval_granularity=granularity, retrieval_positions=positions)
    longest = default_chunk_length(block_size, context_length, top_k) if positions == "stingy" else 3 * block_size
    # chunks of one position make a decoding step's token and landmark slot two chunks
    chunk_length = [None, 1, draw.randint(1, longest)][seed // len(SETTINGS) % 3]
    if chunk_length is not None:
        settings["prefill_chunk_length"] = chunk_length
    lengths = [draw.randint(1, 12 * block_size) for _ in range(draw.randint(1, 3))]
    ids, mask, rows = left_padded(lengths, seed=seed * 31)
    return model, settings, rows, ids, mask, draw


def greedy(model, ids, mask, new_tokens, **settings):
    """The generated tokens and their scores. min_new_tokens keeps EOS out, so every row generates all its tokens
    on every path."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=PAD_ID, output_scores=True, return_dict_in_generate=True,
                         **settings)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def assert_same_generation(got, expected):
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(20))
def test_generation_paths_agree_on_random_configurations(seed):
    model, settings, rows, ids, mask, draw = random_configuration(seed)
    real = mask.bool()
    chunking = {key: settings[key] for key in settings.keys() & {"prefill_chunk_length"}}
    with torch.no_grad():
        training_form = model(ids, attention_mask=mask).logits
        served = model(ids, attention_mask=mask, **{_CACHE_FIELD: full_cache(model, **chunking)}).logits
        torch.testing.assert_close(served[real], training_form[real], rtol=1e-4, atol=1e-4)

        if ids.shape[1] > 1:  # the prompt in two pieces continuing one cache equals it in one forward
            cut = draw.randint(1, ids.shape[1] - 1)
            cache = full_cache(model, **chunking)
            first = model(ids[:, :cut], attention_mask=mask[:, :cut], **{_CACHE_FIELD: cache}).logits
            second = model(ids[:, cut:], attention_mask=mask, **{_CACHE_FIELD: cache}).logits
            torch.testing.assert_close(torch.cat([first, second], 1)[real], served[real], rtol=1e-4, atol=1e-4)

        new_tokens = draw.randint(1, 12)
        generated = greedy(model, ids, mask, new_tokens, **settings)
        assert_same_generation(greedy(model, ids, mask, new_tokens, offload_to_cpu=True, **settings), generated)
        assert_same_generation(greedy(model, ids, mask, new_tokens, cuda_graphs=False, **settings),
                               greedy(model, ids, mask, new_tokens, cuda_graphs=True, **settings))
        for i, row in enumerate(rows):
            alone = greedy(model, row[None], torch.ones_like(row[None]), new_tokens, **settings)
            assert_same_generation(alone, (generated[0][i : i + 1], generated[1][i : i + 1]))
