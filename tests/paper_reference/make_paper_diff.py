"""A weight diff in the paper's released format, made by the authors' own code, for `tests/test_paper_diff.py`.

Runs in the throwaway environment of regenerate.sh (transformers 4.28.1), never in the project's:

    bash tests/paper_reference/regenerate.sh PATH/TO/landmark-attention

1. a tiny random stock Llama (the base) is saved with safetensors weights and a word-level tokenizer;
2. the tuned model is the authors' `llama_mem.LlamaForCausalLM` on the base weights, resized with their
   `smart_tokenizer_and_embedding_resize` for `[PAD]` and `<landmark>` (as their training does), every weight nudged
   as fine-tuning would, `mem_id` set, config `llama_with_landmark` with `mem_freq`;
3. their `weight_diff.make_diff` writes the diff (their format: the tuned model minus the resized base, saved by
   transformers 4.28 as pytorch_model.bin, with checksum_psum.txt and the tuned tokenizer);
4. their model's logits at every user token of a prompt (landmarks inserted by hand, the training form) are the
   expectation. Output: tests/data/paper_diff/{base,diff,expected.safetensors}.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from make_expectations import import_authors_code, with_landmarks


BLOCK_SIZE = 8


def word_level_tokenizer(folder):
    """A word-level fast tokenizer with Llama's special tokens (built with the tokenizers of this environment)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("landmark_repo")
    parser.add_argument("output")
    args = parser.parse_args()
    config_class, model_class = import_authors_code(args.landmark_repo)
    import train as authors_train  # their llama/train.py: smart_tokenizer_and_embedding_resize
    import transformers
    import weight_diff as authors_weight_diff

    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    base, tuned, diff = out / "base", out / "tuned", out / "diff"
    for folder in (base, tuned, diff):
        folder.mkdir(parents=True)

    tokenizer = word_level_tokenizer(base)
    torch.manual_seed(0)
    base_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=2048, rms_norm_eps=1e-6, initializer_range=0.15, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(base_config).save_pretrained(base, safe_serialization=True)

    tuned_tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    fields = {k: getattr(base_config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "rms_norm_eps", "initializer_range", "bos_token_id", "eos_token_id",
        "pad_token_id")}
    config = config_class(**fields, mem_id=None, mem_freq=BLOCK_SIZE - 1, train_context_length=64,
                          include_landmark_in_loss=False)
    model = model_class.from_pretrained(base, config=config)
    authors_train.smart_tokenizer_and_embedding_resize(
        special_tokens_dict=dict(pad_token="[PAD]", additional_special_tokens=["<landmark>"]),
        tokenizer=tuned_tokenizer, model=model,
    )
    model.set_mem_id(tuned_tokenizer.convert_tokens_to_ids("<landmark>"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(tuned)
    tuned_tokenizer.save_pretrained(tuned)

    authors_weight_diff.make_diff(path_raw=str(base), path_tuned=str(tuned), path_diff=str(diff))

    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, len(tokenizer), (1, 45), generator=generator)
    import make_expectations

    make_expectations.LANDMARK_ID = model.config.mem_id
    internal = with_landmarks(prompt, BLOCK_SIZE - 1)
    with torch.no_grad():
        logits = model.eval()(input_ids=internal).logits[0, (internal != model.config.mem_id)[0]]
    save_file({"prompt": prompt, "logits": logits.contiguous()}, out / "expected.safetensors",
              metadata={"made_with": f"torch {torch.__version__}, transformers {transformers.__version__}",
                        "mem_id": str(model.config.mem_id)})
    shutil.rmtree(tuned)  # the tuned model is what the test recovers; only base, diff and logits are kept
    print(f"wrote {out}: {sorted(p.name for p in diff.iterdir())}")
    print(json.dumps({"mem_id": model.config.mem_id, "vocab": model.config.vocab_size}))


if __name__ == "__main__":
    sys.exit(main())
