"""The retrieval cache against the paper's own code (`llama/llama_mem.py` of epfml/landmark-attention).

`data/paper_llama_mem.safetensors` holds a tiny random model built with the authors' classes and what their
inference computed with it (stingy positions, per-token and per-chunk retrieval, top-k 2 and 4, prompts ending on a
block boundary and not); `paper_reference/make_expectations.py` says how it was made and
`paper_reference/regenerate.sh` remakes it. Here the weights load into a landmark-llama model, which must give the
same prompt logits and greedy tokens through stock `generate`.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM
from landmark_llama.cache_landmark_llama import LandmarkRetrievalCache
from landmark_llama.modeling_landmark_llama import _CACHE_FIELD as CACHE

DATA = Path(__file__).parent / "data" / "paper_llama_mem.safetensors"


def _load():
    with safe_open(DATA, "pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return json.loads(metadata["config"]), json.loads(metadata["cases"]), tensors


PAPER_CONFIG, CASES, TENSORS = _load()


@pytest.fixture(scope="module")
def model():
    """The authors' config mapped onto ours: block_size = mem_freq + 1, landmark id = mem_id."""
    fields = dict(PAPER_CONFIG)
    mem_id, mem_freq = fields.pop("mem_id"), fields.pop("mem_freq")
    config = LandmarkLlamaConfig(
        **fields, num_key_value_heads=fields["num_attention_heads"], landmark_token_id=mem_id,
        block_size=mem_freq + 1, attention_backend="eager", tie_word_embeddings=False,
    )
    model = LandmarkLlamaForCausalLM(config).eval()
    weights = {name.removeprefix("weights."): t for name, t in TENSORS.items() if name.startswith("weights.")}
    model.load_state_dict(weights, strict=True)
    return model


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_prompt_logits_and_greedy_tokens_match_the_papers_code(model, case):
    assert {c["ends_on_block_boundary"] for c in CASES} == {True, False}
    name, top_k, granularity = case["name"], case["retrieval_top_k"], case["retrieval_granularity"]
    prompt = TENSORS[f"{name}.prompt"]
    blocks = prompt.shape[1] // (model.config.block_size - 1)
    assert blocks > top_k + 2  # retrieval really selects (and stingy positions really remap)
    with torch.no_grad():
        cache = LandmarkRetrievalCache(model.config, retrieval_top_k=top_k, retrieval_granularity=granularity)
        logits = model(prompt, **{CACHE: cache}).logits[0]
        torch.testing.assert_close(logits, TENSORS[f"{name}.prompt_logits"], atol=1e-4, rtol=1e-4)
        expected_tokens = TENSORS[f"{name}.tokens"]
        out = model.generate(
            prompt, max_new_tokens=len(expected_tokens), do_sample=False, retrieval_top_k=top_k,
            retrieval_granularity=granularity, output_scores=True, return_dict_in_generate=True,
        )
    assert out.sequences[0, prompt.shape[1]:].tolist() == expected_tokens.tolist()
    scores = torch.stack(out.scores, dim=1)[0]
    expected_scores = TENSORS[f"{name}.scores"]
    finite = expected_scores.isfinite()
    assert torch.equal(scores.isfinite(), finite)  # the landmark is suppressed on both sides
    torch.testing.assert_close(scores[finite], expected_scores[finite], atol=1e-4, rtol=1e-4)
