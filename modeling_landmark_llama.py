"""Landmark attention (Mohtashami & Jaggi, NeurIPS 2023, arXiv 2305.16300) on transformers' Llama.

What changes against stock Llama, and where:
- `LandmarkLlamaModel.forward` turns the user's tokens into the internal sequence (a `<landmark>` after every
  `block_size - 1` regular tokens of each row), runs the stock Llama stack on it, and drops the landmark
  positions again, so logits, hidden states and loss line up with the user's tokens.
- The stock `LlamaAttention` module stays; its softmax is replaced through transformers' attention registry by
  `landmark_attention_forward`, which picks the eager path below or the fused Triton kernel.
Parameter names equal stock Llama's, so a Llama state dict loads unchanged (apart from added vocabulary rows).
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import can_return_tuple

from .configuration_landmark_llama import LandmarkLlamaConfig


try:
    from .kernels.landmark_attention import MAX_HEAD_DIM as TRITON_MAX_HEAD_DIM
    from .kernels.landmark_attention import landmark_attention as landmark_triton_attention
except ImportError:  # no Triton (a CPU-only install): the eager path serves every device
    landmark_triton_attention, TRITON_MAX_HEAD_DIM = None, 0


LANDMARK_ATTENTION = "landmark_attention"


# ---------------------------------------------------------------------------------------------------------------
# Attention


def _block_structure(n_q, n_k, block_size, device):
    """Masks over [n_q queries, num_blocks * block_size keys]: which blocks are earlier, which keys are visible."""
    num_blocks = -(-n_k // block_size)
    query_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    key_pos = torch.arange(num_blocks * block_size, device=device)
    query_block, key_block = query_pos // block_size, key_pos // block_size
    earlier_block = torch.arange(num_blocks, device=device) < query_block  # [n_q, num_blocks]
    regular_key = key_pos % block_size != block_size - 1
    own_block_visible = (key_block == query_block) & (key_pos <= query_pos)
    return earlier_block, regular_key & ((key_block < query_block) | own_block_visible)


class LandmarkEagerAttention(torch.autograd.Function):
    """Grouped-softmax landmark attention with a closed-form backward.

    Forward: the paper's grouped softmax equals ONE softmax over shifted scores. A regular key j of an earlier block
    c gets t_ij = s_ij + s_i,landmark(c) - logsumexp_{j' in c} s_ij', so block c's mass sums to its landmark's;
    visible keys of the query's own block keep s_ij; landmarks and later keys get -inf. Then w = softmax(t).
    Backward, with a_ij = w_ij * dO_i.v_j, D_i = sum_j a_ij, and per earlier block c A_ic = sum_{j in c} a_ij,
    G_ic = sum_{j in c} w_ij: ds_ij = a_ij - w_ij D_i (own block), a_ij - w_ij A_ic / G_ic (earlier block),
    A_ic - G_ic D_i (landmark of an earlier block). Only q, k, v and the fp32 weights are kept for backward:
    less than stock eager attention keeps (fp32 softmax plus its low-precision copy and the mask).
    Tensors here: query [b, kv_heads, group, n_q, d]; key, value [b, kv_heads, 1, n_k padded to whole blocks, d].
    """

    @staticmethod
    def forward(ctx, query, key, value, n_k, block_size, scaling):
        with torch.autocast(query.device.type, enabled=False):  # fp32 scores even inside a bf16 autocast region
            earlier_block, visible = _block_structure(query.shape[-2], n_k, block_size, query.device)
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scaling)
            blocks = scores.unflatten(-1, (-1, block_size))
            shift = (blocks[..., -1] - torch.logsumexp(blocks[..., :-1], dim=-1)).masked_fill_(~earlier_block, 0.0)
            blocks.add_(shift[..., None])
            scores.masked_fill_(~visible, float("-inf"))  # every row sees at least one key: no empty softmax
            weights = scores.sub_(scores.amax(-1, keepdim=True)).exp_()  # softmax in place: no second fp32 tensor
            weights.div_(weights.sum(-1, keepdim=True))
            ctx.save_for_backward(query, key, value, weights)
            ctx.mark_non_differentiable(weights)
            ctx.n_k, ctx.block_size, ctx.scaling = n_k, block_size, scaling
            return torch.matmul(weights.to(value.dtype), value), weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, grad_weights):
        with torch.autocast(grad_output.device.type, enabled=False):
            query, key, value, weights = ctx.saved_tensors
            block_size = ctx.block_size
            earlier_block, _ = _block_structure(query.shape[-2], ctx.n_k, block_size, query.device)
            grad_output = grad_output.float()

            grad_value = torch.matmul(weights.transpose(-1, -2), grad_output).sum(2, keepdim=True)
            grad_scores = torch.matmul(grad_output, value.float().transpose(-1, -2)).mul_(weights)  # a_ij
            row_total = grad_scores.sum(-1, keepdim=True)[..., None]  # D_i
            blocks = grad_scores.unflatten(-1, (-1, block_size))
            weight_blocks = weights.unflatten(-1, (-1, block_size))
            block_total = blocks[..., :-1].sum(-1, keepdim=True)  # A_ic
            block_mass = weight_blocks[..., :-1].sum(-1, keepdim=True)  # G_ic
            block_mean = torch.where(block_mass > 0, block_total / block_mass, 0.0)
            earlier = earlier_block[..., None]
            blocks.addcmul_(weight_blocks, torch.where(earlier, block_mean, row_total), value=-1)
            blocks[..., -1:] = torch.where(earlier, block_total - block_mass * row_total, 0.0)

            grad_query = torch.matmul(grad_scores, key.float()).mul_(ctx.scaling)
            grad_key = torch.matmul(grad_scores.transpose(-1, -2), query.float()).sum(2, keepdim=True)
            grad_key.mul_(ctx.scaling)
            return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None, None


def landmark_eager_attention(query, key, value, block_size, scaling, dropout=0.0, training=False):
    """Landmark attention in plain PyTorch: the training form of the paper (section 3.1), exact for any length.

    query: [batch, q_heads, n_q, head_dim]; key, value: [batch, kv_heads, n_k, head_dim] with n_k >= n_q; the
    queries are the last n_q positions and the key at position j is a landmark when j % block_size ==
    block_size - 1. Returns (output [batch, q_heads, n_q, head_dim], weights [batch, q_heads, n_q, n_k] in fp32).
    Scores and softmax are fp32; any number of blocks; GQA without repeating K/V (see `LandmarkEagerAttention`).
    """
    if dropout > 0 and training:
        raise NotImplementedError("Landmark attention has no attention dropout; set config.attention_dropout = 0.")
    batch, q_heads, n_q, head_dim = query.shape
    kv_heads, n_k = key.shape[1], key.shape[2]
    padding = -n_k % block_size  # phantom keys closing the last block; always masked
    query = query.reshape(batch, kv_heads, q_heads // kv_heads, n_q, head_dim)
    key, value = (nn.functional.pad(t, (0, 0, 0, padding))[:, :, None] for t in (key, value))
    output, weights = LandmarkEagerAttention.apply(query, key, value, n_k, block_size, scaling)
    return output.reshape(batch, q_heads, n_q, head_dim), weights[..., :n_k].reshape(batch, q_heads, n_q, n_k)


def _use_triton(config, query, dropout):
    """Which path `landmark_attention_forward` takes, by `config.attention_backend`."""
    if config.attention_backend == "eager":
        return False
    problems = []
    if landmark_triton_attention is None:
        problems.append("Triton is not installed")
    if not query.is_cuda:
        problems.append(f"the tensors are on {query.device.type}, the kernel needs CUDA")
    if query.shape[-1] > TRITON_MAX_HEAD_DIM:
        problems.append(f"head_dim {query.shape[-1]} is above the kernel's {TRITON_MAX_HEAD_DIM}")
    if config.block_size & (config.block_size - 1) or config.block_size > 128:
        problems.append(f"block_size {config.block_size} is not a power of two up to 128")
    if dropout > 0:
        problems.append("the kernel has no attention dropout")
    if config.attention_backend == "auto":
        return not problems
    if problems:
        raise ValueError(
            "attention_backend='triton' cannot run here: " + "; ".join(problems) + ". Use attention_backend='auto' "
            "to fall back to the eager path where the kernel cannot run."
        )
    return True


def landmark_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax replacement for the stock `LlamaAttention` (registered as `attn_implementation="landmark_attention"`).

    `query`, `key`, `value` arrive after RoPE as [batch, heads, n, head_dim] over the internal sequence built by
    `LandmarkLlamaModel`; returns ([batch, n, q_heads, head_dim], weights or None) like the stock functions.
    `attention_mask` is always None: rows are packed left-aligned, so causality already hides the padding tail.

    The block-retrieval cache plugs in here: a landmark cache layer (a `CacheLayerMixin` subclass) returns, from
    `past_key_values.update`, the retrieved blocks and the current chunk, and this function routes them to a
    retrieval variant of the same grouped softmax; the training form below stays as it is.
    """
    config = module.config
    if _use_triton(config, query, dropout):
        output = landmark_triton_attention(query, key, value, config.block_size, sm_scale=scaling)
        weights = None
    else:
        output, weights = landmark_eager_attention(
            query, key, value, config.block_size, scaling, dropout=dropout, training=module.training
        )
        weights = weights.to(query.dtype)
    return output.transpose(1, 2), weights


AttentionInterface.register(LANDMARK_ATTENTION, landmark_attention_forward)


# ---------------------------------------------------------------------------------------------------------------
# Landmark insertion


@dataclass
class LandmarkLayout:
    """Where each user token sits in the internal (landmarks inserted) sequence.

    token_positions: [batch, n] internal position of every user token; padding tokens point at the scratch slot
        `internal_length`, which is dropped.
    internal_length: length of the internal sequence of the longest row.
    """

    token_positions: torch.LongTensor
    internal_length: int

    @classmethod
    def build(cls, attention_mask, batch, length, block_size, device):
        """Rows are packed left-aligned from their first real token, whichever side the padding is on."""
        regular_per_block = block_size - 1
        if attention_mask is None:
            rank = torch.arange(length, device=device).expand(batch, length)
            internal_length = length + length // regular_per_block
            return cls(rank + rank // regular_per_block, internal_length)
        real = attention_mask.bool()
        rank = real.long().cumsum(-1) - 1
        counts = real.sum(-1)
        internal_length = int((counts + counts // regular_per_block).max())
        positions = (rank + rank // regular_per_block).masked_fill(~real, internal_length)
        return cls(positions, internal_length)

    def insert(self, token_embeds, landmark_embed):
        """[batch, n, hidden] user embeddings -> [batch, internal_length, hidden] with landmarks in between."""
        batch, _, hidden = token_embeds.shape
        internal = landmark_embed.to(token_embeds.dtype).expand(batch, self.internal_length + 1, hidden)
        index = self.token_positions[..., None].expand(-1, -1, hidden)
        return internal.scatter(1, index, token_embeds)[:, : self.internal_length]

    def extract(self, internal_states):
        """[batch, internal_length, hidden] -> [batch, n, hidden]; padding positions get zeros."""
        hidden = internal_states.shape[-1]
        padded = nn.functional.pad(internal_states, (0, 0, 0, 1))
        return padded.gather(1, self.token_positions[..., None].expand(-1, -1, hidden))


# ---------------------------------------------------------------------------------------------------------------
# Models


class LandmarkLlamaPreTrainedModel(LlamaPreTrainedModel):
    config: LandmarkLlamaConfig
    config_class = LandmarkLlamaConfig
    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config, *args, **kwargs):
        config.validate_architecture()  # from_pretrained(..., block_size=1) sets fields after the config's own checks
        super().__init__(config, *args, **kwargs)

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        """Landmark attention is the model: every softmax implementation request resolves to it."""
        if requested_attention not in (None, "eager", "sdpa", LANDMARK_ATTENTION):
            raise ValueError(
                f"attn_implementation={requested_attention!r} computes plain softmax attention, not landmark "
                "attention. Leave attn_implementation unset and choose the kernel with config.attention_backend "
                "('auto', 'eager' or 'triton')."
            )
        return LANDMARK_ATTENTION

    @classmethod
    def _supports_default_dynamic_cache(cls):
        """A stock DynamicCache cannot hold landmark blocks: generate() runs without one (use_cache has no effect)."""
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Stock saving, plus `auto_map` and every code file the folder needs for `trust_remote_code=True`."""
        self.config.auto_map = {
            "AutoConfig": "configuration_landmark_llama.LandmarkLlamaConfig",
            "AutoModel": "modeling_landmark_llama.LandmarkLlamaModel",
            "AutoModelForCausalLM": "modeling_landmark_llama.LandmarkLlamaForCausalLM",
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            export_remote_code(save_directory)


class LandmarkLlamaModel(LandmarkLlamaPreTrainedModel, LlamaModel):
    """`LlamaModel` that inserts landmarks before the stack and drops them after it."""

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if past_key_values is not None:
            raise NotImplementedError(
                "landmark-llama has no KV cache yet (the block-retrieval cache is planned): a plain cache cannot "
                "hold landmark blocks. Call the model without past_key_values; generate() recomputes each step."
            )
        landmark_token_id = self.config.landmark_token_id
        if landmark_token_id is None:
            raise ValueError(
                "config.landmark_token_id is not set; convert the checkpoint with tools/convert_llama.py."
            )
        if input_ids is not None:
            if (input_ids == landmark_token_id).any():
                raise ValueError(
                    f"input_ids contain the landmark token (id {landmark_token_id}). Pass plain text tokens: the "
                    "model inserts landmarks itself."
                )
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [batch, length] of 0/1, got shape {tuple(attention_mask.shape)}."
            )
        _check_default_positions(position_ids, attention_mask, batch, length)

        layout = LandmarkLayout.build(attention_mask, batch, length, self.config.block_size, inputs_embeds.device)
        landmark_embed = self.embed_tokens(torch.tensor([landmark_token_id], device=inputs_embeds.device))
        internal_embeds = layout.insert(inputs_embeds, landmark_embed)
        internal_positions = torch.arange(layout.internal_length, device=inputs_embeds.device)[None]

        kwargs["return_dict"] = True
        outputs = super().forward(
            inputs_embeds=internal_embeds, position_ids=internal_positions, use_cache=False, **kwargs
        )
        outputs.last_hidden_state = layout.extract(outputs.last_hidden_state)
        if outputs.hidden_states is not None:
            outputs.hidden_states = tuple(layout.extract(states) for states in outputs.hidden_states)
        # outputs.attentions stay over the internal sequence (landmark positions included).
        return outputs


def _check_default_positions(position_ids, attention_mask, batch, length):
    """Positions are internal indices derived from the landmark layout; only the default ones may be passed."""
    if position_ids is None:
        return
    if attention_mask is None:
        expected = torch.arange(length, device=position_ids.device).expand(batch, length)
        real = torch.ones_like(expected, dtype=torch.bool)
    else:
        real = attention_mask.bool()
        expected = attention_mask.long().cumsum(-1) - 1
    if position_ids.shape[-1] != length or not torch.equal(position_ids.expand(batch, length)[real], expected[real]):
        raise ValueError(
            "landmark-llama derives position ids from the landmark layout; custom position_ids (packed sequences, "
            "offsets) are not supported. Pass position_ids=None."
        )


class LandmarkLlamaForCausalLM(LandmarkLlamaPreTrainedModel, LlamaForCausalLM):
    """`LlamaForCausalLM` over `LandmarkLlamaModel`; its forward (logits, loss, logits_to_keep) is the stock one."""

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LandmarkLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, past_key_values=None, inputs_embeds=None, **kwargs
    ):
        """Without a KV cache every step re-reads the whole sequence: stock inputs, never sliced to new tokens."""
        if inputs_embeds is not None:
            raise NotImplementedError("generate() from inputs_embeds needs the block-retrieval cache; pass input_ids.")
        kwargs.pop("position_ids", None)  # derived from the landmark layout
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    def generate(self, *args, generation_config=None, **kwargs):
        """Stock generation; the landmark token is never emitted (the model inserts landmarks itself)."""
        suppressed = kwargs.get("suppress_tokens") or (generation_config or self.generation_config).suppress_tokens
        suppressed = list(suppressed or [])
        if self.config.landmark_token_id not in suppressed:
            kwargs["suppress_tokens"] = suppressed + [self.config.landmark_token_id]
        return super().generate(*args, generation_config=generation_config, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Remote code export

_KERNEL_IMPORT = re.compile(r"^(\s*from\s+\.)kernels\.(\w+\s+import)", flags=re.MULTILINE)
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)


def export_remote_code(save_directory):
    """Write this model's code into `save_directory` as flat sibling files.

    transformers' remote-code loader follows only `from .x import y` with `x.py` beside the modeling file, so the
    development layout (`kernels/landmark_attention.py`) is flattened and its import rewritten. The folder is then
    self-contained: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` needs no install. Works
    from the development tree and from a module that was itself loaded from such a flat folder.
    """
    here = Path(__file__).parent
    files = {"modeling_landmark_llama.py": _KERNEL_IMPORT.sub(r"\1\2", Path(__file__).read_text(encoding="utf-8"))}
    for name in _RELATIVE_IMPORT.findall(files["modeling_landmark_llama.py"]):
        candidates = [path for path in (here / f"{name}.py", here / "kernels" / f"{name}.py") if path.exists()]
        if not candidates:
            raise FileNotFoundError(
                f"modeling_landmark_llama imports .{name}, but {name}.py is not beside it or in kernels/."
            )
        files[f"{name}.py"] = candidates[0].read_text(encoding="utf-8")
    for name, text in files.items():
        temporary = Path(save_directory) / f".{name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, Path(save_directory) / name)


__all__ = [
    "LandmarkLlamaPreTrainedModel",
    "LandmarkLlamaModel",
    "LandmarkLlamaForCausalLM",
    "LandmarkLayout",
    "landmark_eager_attention",
    "landmark_attention_forward",
    "export_remote_code",
]
