"""Tiny landmark models for CPU tests, and the import blocker for fresh-interpreter checks."""

import textwrap

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
    skip = settings.keys() | derived
    fields = {k: v for k, v in llama.items() if k in LandmarkLlamaConfig.__dataclass_fields__ and k not in skip}
    return LandmarkLlamaConfig(**fields, **settings)


def tiny_landmark_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LandmarkLlamaForCausalLM(tiny_landmark_config(**overrides)).eval()


def random_ids(batch, length, seed=1):
    """Plain token ids: never the landmark, never the pad id."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, LANDMARK_ID, (batch, length), generator=generator)


# Starts every script run in a fresh interpreter to prove a saved folder is self-contained: `landmark_llama` is
# installed (editable), so it is blocked there and every class must come from the folder's own code files.
BLOCK_PROJECT_IMPORTS = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "landmark_llama":
                raise ImportError(f"{name} is blocked: the folder must load from its own code files")

    sys.meta_path.insert(0, BlockProject())
    """
)
