"""Expected outputs of the paper's own block-retrieval inference (`llama/llama_mem.py` of epfml/landmark-attention),
for `tests/test_paper_reference.py`.

Runs in a throwaway environment with the authors' library versions, never in the project's (see regenerate.sh):

    bash tests/paper_reference/regenerate.sh PATH/TO/landmark-attention

It builds a tiny random landmark Llama with the authors' classes, and for retrieval_top_k 2 and 4, prompts that
end on a block boundary and ones that do not, and both retrieval granularities (per token, their default; per chunk,
max over the chunk's tokens, which their code does when it offloads the cache), records
- the prompt's logits at every user token, the prompt fed in the authors' chunks (their forward keeps only the last
  chunk's logits, so each chunk is its own call, continuing the cache),
- greedy tokens and per-step scores from their `generate` (stingy positions, per-token retrieval, their defaults).
Their `topk` picks arbitrarily among equal scores, which happen in layer 0 (every landmark key is the same there and
stingy retrieval scores the older ones at one position); it is replaced here by the tie rule the project documents:
scores within 1e-5 (times the row's largest magnitude) of the k-th highest are equal to it, and the earliest of those
blocks are taken. The Triton
import of their module is stubbed out (CPU, no kernel). Output: weights and expectations in one safetensors file,
the cases in its metadata.
"""

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file


VOCAB, LANDMARK_ID, PAD_ID = 97, 96, 0
BLOCK_SIZE, TRAIN_CONTEXT = 8, 64  # chunk length 64 - 3 * 8 = 40 (k 2) and 64 - 5 * 8 = 24 (k 4)
PROMPT_LENGTHS = (91, 100)  # 91 = 13 blocks of 7 user tokens: ends on a block boundary; 100 ends 2 into a block
NEW_TOKENS = 24
TIE_TOLERANCE = 1e-5


def import_authors_code(repo):
    """Their llama/ folder on sys.path, with the Triton kernel module replaced by an empty stand-in."""
    stub = types.ModuleType("ltriton.flash_landmark_attention")
    stub.fused_landmark_attention = None
    sys.modules["ltriton"] = types.ModuleType("ltriton")
    sys.modules["ltriton.flash_landmark_attention"] = stub
    sys.path.insert(0, str(Path(repo) / "llama"))
    import llama_landmark_config
    import llama_mem

    return llama_landmark_config.LlamaLandmarkConfig, llama_mem.LlamaForCausalLM


def stable_topk(self, k, dim=-1, largest=True, sorted=True):
    """The documented tie rule in place of torch's topk (only their retrieval calls topk): scores within
    TIE_TOLERANCE times the row's largest magnitude of the k-th highest are equal to it, and the earliest of them
    fill the places left."""
    assert largest and dim in (-1, self.dim() - 1)
    n = self.shape[-1]
    cutoff = torch.sort(self, dim=-1, descending=True).values[..., k - 1 : k]
    margin = TIE_TOLERANCE * self.abs().amax(dim=-1, keepdim=True)
    above = self > cutoff + margin
    tied = (self - cutoff).abs() <= margin
    tied = tied & (tied.long().cumsum(-1) <= k - above.long().sum(-1, keepdim=True))
    index = torch.arange(n).expand_as(self)
    indices = torch.sort(torch.where(above | tied, index, n + index), dim=-1).values[..., :k]
    return torch.return_types.topk((self.gather(-1, indices), indices))


def with_landmarks(ids, regular_per_block):
    """The internal sequence: a landmark after every `regular_per_block` user tokens."""
    pieces = []
    for start in range(0, ids.shape[1], regular_per_block):
        piece = ids[:, start : start + regular_per_block]
        pieces.append(piece)
        if piece.shape[1] == regular_per_block:
            pieces.append(torch.full((ids.shape[0], 1), LANDMARK_ID))
    return torch.cat(pieces, dim=1)


def prompt_logits(model, prompt, top_k, offload):
    """Logits at the user tokens, the internal prompt fed in the authors' chunk length, one call per chunk."""
    internal = with_landmarks(prompt, BLOCK_SIZE - 1)
    chunk = TRAIN_CONTEXT - TRAIN_CONTEXT % BLOCK_SIZE - (top_k + 1) * BLOCK_SIZE
    past, logits = None, []
    for start in range(0, internal.shape[1], chunk):
        out = model(
            input_ids=internal[:, start : start + chunk], past_key_values=past, use_cache=True,
            cache_top_k=top_k, mem_freq=BLOCK_SIZE - 1, offload_cache_to_cpu=offload,
        )
        past = out.past_key_values
        logits.append(out.logits)
    logits = torch.cat(logits, dim=1)
    return logits[:, (internal != LANDMARK_ID)[0]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("landmark_repo", help="a checkout of github.com/epfml/landmark-attention")
    parser.add_argument("output", help="safetensors file to write")
    args = parser.parse_args()
    config_class, model_class = import_authors_code(args.landmark_repo)
    torch.Tensor.topk = stable_topk

    config = config_class(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=2048, rms_norm_eps=1e-6, initializer_range=0.15, pad_token_id=PAD_ID,
        bos_token_id=1, eos_token_id=2, mem_id=LANDMARK_ID, mem_freq=BLOCK_SIZE - 1,
        train_context_length=TRAIN_CONTEXT,
        include_landmark_in_loss=False,  # generation predicts from the token, never from an inserted landmark
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    weights = {name: value for name, value in model.state_dict().items() if "rotary" not in name}  # inv_freq
    tensors = {f"weights.{name}": value.contiguous() for name, value in weights.items()}
    generator = torch.Generator().manual_seed(1)
    cases = []
    for length in PROMPT_LENGTHS:
        prompt = torch.randint(3, LANDMARK_ID, (1, length), generator=generator)
        for top_k in (2, 4):
            for granularity in ("token", "chunk"):
                name = f"len{length}_k{top_k}_{granularity}"
                offload = granularity == "chunk"  # their per-chunk selection runs on the offloading path
                with torch.no_grad():
                    logits = prompt_logits(model, prompt, top_k, offload)
                    generated = model.generate(
                        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False,
                        cache_top_k=top_k, mem_freq=BLOCK_SIZE - 1, offload_cache_to_cpu=offload,
                        suppress_tokens=[LANDMARK_ID], pad_token_id=PAD_ID, output_scores=True,
                        return_dict_in_generate=True,
                    )
                tensors[f"{name}.prompt"] = prompt.clone()
                tensors[f"{name}.prompt_logits"] = logits[0].contiguous()
                tensors[f"{name}.tokens"] = generated.sequences[0, length:].contiguous()
                tensors[f"{name}.scores"] = torch.stack(generated.scores, dim=1)[0].contiguous()
                cases.append({"name": name, "prompt_length": length, "retrieval_top_k": top_k,
                              "retrieval_granularity": granularity,
                              "ends_on_block_boundary": length % (BLOCK_SIZE - 1) == 0})
    model_fields = {k: getattr(config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
        "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "mem_id", "mem_freq",
        "train_context_length")}
    import transformers

    metadata = {"config": json.dumps(model_fields), "cases": json.dumps(cases),
                "made_with": f"torch {torch.__version__}, transformers {transformers.__version__}"}
    save_file(tensors, args.output, metadata=metadata)
    print(f"wrote {args.output}: {len(cases)} cases")


if __name__ == "__main__":
    main()
