"""Tiny landmark models for CPU tests."""

import torch

from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM
from landmark_llama.tools.tiny_llama import tiny_llama_config

VOCAB = 101
LANDMARK_ID = 100
PAD_ID = 0


def tiny_landmark_config(**overrides):
    settings = dict(landmark_token_id=LANDMARK_ID, pad_token_id=PAD_ID, block_size=8, attention_backend="eager")
    settings.update(overrides)
    llama = tiny_llama_config(VOCAB).to_dict()
    derived = {"head_dim"}  # follows hidden_size / num_attention_heads unless overridden
    fields = {k: v for k, v in llama.items() if k in LandmarkLlamaConfig.__dataclass_fields__ and k not in settings.keys() | derived}
    return LandmarkLlamaConfig(**fields, **settings)


def tiny_landmark_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LandmarkLlamaForCausalLM(tiny_landmark_config(**overrides)).eval()


def random_ids(batch, length, seed=1):
    """Plain token ids: never the landmark, never the pad id."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, LANDMARK_ID, (batch, length), generator=generator)
