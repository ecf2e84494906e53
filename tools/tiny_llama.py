"""A tiny stock Llama checkpoint (random weights, word-level tokenizer) built locally, for tests and demos.

Nothing is downloaded: the tokenizer is a `tokenizers` word-level model over a fixed word list, and the weights
are a random `LlamaForCausalLM`. The folder has the layout of a real Hub Llama checkpoint (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), so the conversion tool treats it like one.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


WORDS = (
    "the a of and to in is was he she it they we you that for on with as his her at by from this not but be "
    "are or have had one all were there when what which their an if so up out about who them then time can "
    "grass green sky blue sun yellow sea deep night dark pass key remember number is what here there go "
    "zero one two three four five six seven eight nine . , ? !"
).split()


def build_tokenizer():
    """Word-level tokenizer with Llama's special tokens `<unk>`, `<s>`, `</s>` (no pad, like Llama)."""
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama_config(vocab_size, **overrides):
    """A Llama config small enough for CPU tests: GQA on, 2 layers, head_dim 16."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_llama(folder, seed=0, **config_overrides):
    """Write a tiny random stock Llama checkpoint with its tokenizer to `folder`; returns the folder."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **config_overrides))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
