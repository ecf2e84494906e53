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
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import can_return_tuple, logging

from .cache_landmark_llama import LandmarkRetrievalCache, apply_rope, check_cache_type, rope_rotation
from .configuration_landmark_llama import LandmarkLlamaConfig


try:
    from .kernels.landmark_attention import MAX_HEAD_DIM as TRITON_MAX_HEAD_DIM
    from .kernels.landmark_attention import landmark_attention as landmark_triton_attention
    from .kernels.retrieval_attention import retrieval_attention as retrieval_triton_attention
except ImportError:  # no Triton (a CPU-only install): the eager path serves every device
    landmark_triton_attention, retrieval_triton_attention, TRITON_MAX_HEAD_DIM = None, None, 0


logger = logging.get_logger(__name__)

LANDMARK_ATTENTION = "landmark_attention"
# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`; both are served.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# ---------------------------------------------------------------------------------------------------------------
# Attention


def _block_structure(query_pos, num_blocks, block_size):
    """Masks for queries at positions `query_pos` [..., n_q] over keys 0 .. num_blocks * block_size - 1: which blocks
    are earlier than each query's ([..., n_q, num_blocks]) and which keys it attends to ([..., n_q, keys])."""
    device = query_pos.device
    key_pos = torch.arange(num_blocks * block_size, device=device)
    query_pos = query_pos[..., None]
    query_block, key_block = query_pos // block_size, key_pos // block_size
    earlier_block = torch.arange(num_blocks, device=device) < query_block
    regular_key = key_pos % block_size != block_size - 1
    own_block_visible = (key_block == query_block) & (key_pos <= query_pos)
    return earlier_block, regular_key & ((key_block < query_block) | own_block_visible)


def _gate_blocks(scores, earlier_block, block_size):
    """In place, over [..., blocks * block_size] scores: each regular key of an earlier block gets its score plus the
    block landmark's score minus the logsumexp of the block's regular scores. One softmax then gives the block its
    landmark's share of the shared softmax, spread by the softmax within the block (the paper's grouped softmax)."""
    blocks = scores.unflatten(-1, (-1, block_size))
    shift = (blocks[..., -1] - torch.logsumexp(blocks[..., :-1], dim=-1)).masked_fill_(~earlier_block, 0.0)
    blocks.add_(shift[..., None])


def _training_structure(n_q, n_k, block_size, device):
    """`_block_structure` of the training form: the queries are the last n_q of n_k positions from 0."""
    return _block_structure(torch.arange(n_k - n_q, n_k, device=device), -(-n_k // block_size), block_size)


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
            earlier_block, visible = _training_structure(query.shape[-2], n_k, block_size, query.device)
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scaling)
            _gate_blocks(scores, earlier_block, block_size)
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
            earlier_block, _ = _training_structure(query.shape[-2], ctx.n_k, block_size, query.device)
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


def landmark_retrieval_attention(query, key, value, cache, layer_idx, scaling, use_kernel=False):
    """The inference form (paper 3.2): a chunk's queries attend to [retrieved blocks | tail | chunk] in one grouped
    softmax. Only the landmarks of retrieved blocks (and of complete blocks inside [tail | chunk]) gate.

    query [batch, q_heads, width, head_dim], key and value [batch, kv_heads, width, head_dim], unrotated (the stack
    runs at position 0 while the cache is in use); the chunk is written into `cache.layers[layer_idx]`. Returns
    [batch, width, q_heads, head_dim]. Scores and softmax in fp32. With `use_kernel`, Triton kernels write the cache
    and rotate the query (`LandmarkCacheLayer.write_with_kernel`), select per-token blocks, and run the attention
    (`retrieval_triton_attention`, which reads the retrieved blocks and [tail | chunk] straight from the cache).
    """
    layer, chunk, block_size = cache.layers[layer_idx], cache.chunk, cache.block_size
    batch, q_heads, width, head_dim = query.shape
    kv_heads = key.shape[1]
    if use_kernel:  # the cache write, the landmark keys and the query rotation in one kernel
        query = layer.write_with_kernel(query, key, value, chunk, cache.inv_freq)
        retrieved = layer.retrieve(query, chunk, cache.settings, cache.inv_freq, scaling, use_kernel)
        local = layer.local_keys, layer.local_values
        if retrieved is None:  # nothing to retrieve yet: an empty table
            table = starts = torch.full((batch, q_heads, 1, 1), -1, dtype=torch.long, device=query.device)
            keys, values = local
        else:
            table, starts, keys, values = retrieved.table(), retrieved.starts, retrieved.keys, retrieved.values
        output = retrieval_triton_attention(query, keys, values, table, starts, chunk.start, cache.inv_freq, scaling,
                                            *local, chunk_length=chunk.chunk_length)
        return output.transpose(1, 2)
    if chunk.spans_chunks(width):
        raise ValueError(f"a pass of {width} positions in chunks of {chunk.chunk_length} needs the retrieval kernels; "
                         "the eager path runs one chunk a pass.")

    offsets = torch.arange(width, device=query.device)
    rotation = chunk.once(("query rotation", query.dtype), lambda: rope_rotation(
        (chunk.start[:, None] + offsets)[:, None], cache.inv_freq, query.dtype))
    query = apply_rope(query, None, None, rotation)
    local_keys, local_values = layer.update(key, value, chunk, cache.inv_freq)
    retrieved = layer.retrieve(query, chunk, cache.settings, cache.inv_freq, scaling)
    local_length = local_keys.shape[2]

    def block_start_rotation():  # the cache keeps keys rotated by their offset: the block's start completes them
        in_local = torch.arange(local_length, device=query.device)
        block_starts = chunk.start[:, None] - chunk.start[:, None] % block_size + in_local - in_local % block_size
        return rope_rotation(block_starts[:, None], cache.inv_freq, local_keys.dtype)

    local_keys = apply_rope(local_keys, None, None, chunk.once(("block start rotation", local_keys.dtype),
                                                               block_start_rotation))
    grouped_query = query.float().unflatten(1, (kv_heads, q_heads // kv_heads))
    local_scores = torch.matmul(grouped_query, local_keys.float()[:, :, None].transpose(-1, -2)).mul_(scaling)
    earlier_block, visible = chunk.once("local structure", lambda: _block_structure(  # positions in [tail | chunk]
        (chunk.start % block_size)[:, None] + offsets, local_length // block_size, block_size))
    _gate_blocks(local_scores, earlier_block[:, None, None], block_size)
    local_scores = local_scores.masked_fill_(~visible[:, None, None], float("-inf")).flatten(1, 2)
    local_values = local_values.float()[:, :, None]
    if retrieved is None:
        scores = local_scores
    else:
        # [batch, q_heads, width, k * block_size]
        retrieved_scores = retrieved.scores(query, cache.inv_freq).mul_(scaling)
        _gate_blocks(retrieved_scores, retrieved.valid, block_size)
        is_landmark = torch.arange(block_size, device=query.device) == block_size - 1
        hidden = ~retrieved.valid[..., None] | is_landmark  # landmarks only gate; missing blocks are absent
        retrieved_scores = retrieved_scores.unflatten(-1, (-1, block_size)).masked_fill_(hidden, float("-inf"))
        scores = torch.cat([retrieved_scores.flatten(-2), local_scores], dim=-1)

    weights = torch.softmax(scores, dim=-1)
    local_weights = weights[..., -local_length:].unflatten(1, (kv_heads, -1))
    output = torch.matmul(local_weights, local_values).flatten(1, 2)
    if retrieved is not None:
        output = output + retrieved.mix(weights[..., :-local_length])
    return output.to(value.dtype).transpose(1, 2)


def _use_triton(config, device, head_dim, dropout):
    """Which path `landmark_attention_forward` takes, by `config.attention_backend`."""
    if config.attention_backend == "eager":
        return False
    problems = []
    if landmark_triton_attention is None:
        problems.append("Triton is not installed")
    if device.type != "cuda":
        problems.append(f"the tensors are on {device.type}, the kernel needs CUDA")
    if head_dim > TRITON_MAX_HEAD_DIM:
        problems.append(f"head_dim {head_dim} is above the kernel's {TRITON_MAX_HEAD_DIM}")
    if config.block_size > 128:
        problems.append(f"block_size {config.block_size} is above the kernel's 128")
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


def landmark_attention_forward(
    module, query, key, value, attention_mask, scaling, dropout=0.0, retrieval_cache=None, **kwargs
):
    """Softmax replacement for the stock `LlamaAttention` (registered as `attn_implementation="landmark_attention"`).

    `query`, `key`, `value` arrive as [batch, heads, n, head_dim] over the internal sequence built by
    `LandmarkLlamaModel`; returns ([batch, n, q_heads, head_dim], weights or None) like the stock functions.
    `attention_mask` is always None: rows are packed left-aligned, so causality already hides the padding tail.
    With `retrieval_cache` (passed by the model while a `LandmarkRetrievalCache` is in use) the chunk runs the
    inference form against the cache (`landmark_retrieval_attention`); otherwise the training form.
    """
    config = module.config
    # also refuses a backend that cannot run, in both forms
    use_triton = _use_triton(config, query.device, query.shape[-1], dropout)
    if retrieval_cache is not None:
        output = landmark_retrieval_attention(
            query, key, value, retrieval_cache, module.layer_idx, scaling, use_kernel=use_triton
        )
        return output, None
    if use_triton:
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

    token_positions: [batch, n] internal position of every user token, counted from each row's start (or, when
        continuing a cache, from the end of what the row already holds); padding tokens point at the scratch slot
        `internal_length`, which is dropped.
    lengths: [batch] internal positions of each row, landmarks after its last tokens included.
    internal_length: the longest row's length.
    """

    token_positions: torch.LongTensor
    lengths: torch.LongTensor
    internal_length: int

    @classmethod
    def build(cls, attention_mask, batch, length, block_size, device, tokens_seen=None):
        """Rows are packed left-aligned from their first real token, whichever side the padding is on.

        `tokens_seen` [batch]: user tokens each row already holds in a cache; the landmark phase continues from it.
        """
        regular_per_block = block_size - 1
        if attention_mask is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            real = attention_mask.bool()
        seen = torch.zeros(batch, dtype=torch.long, device=device) if tokens_seen is None else tokens_seen
        index = seen[:, None] + real.long().cumsum(-1) - 1  # each token's index among its row's user tokens
        end = seen + real.sum(-1)
        start = seen + seen // regular_per_block
        lengths = end + end // regular_per_block - start
        if attention_mask is None and tokens_seen is None:
            internal_length = length + length // regular_per_block  # no host sync on the training path
        else:
            internal_length = int(lengths.max()) if batch else 0
        positions = (index + index // regular_per_block - start[:, None]).masked_fill(~real, internal_length)
        return cls(positions, lengths, internal_length)

    def insert(self, token_embeds, landmark_embed):
        """[batch, n, hidden] user embeddings -> [batch, internal_length, hidden] with landmarks in between."""
        batch, _, hidden = token_embeds.shape
        internal = landmark_embed.to(token_embeds.dtype).expand(batch, self.internal_length + 1, hidden)
        index = self.token_positions[..., None].expand(-1, -1, hidden)
        return internal.scatter(1, index, token_embeds)[:, : self.internal_length]

    def extract(self, internal_states):
        """[batch, internal_length, hidden] -> [batch, n, hidden]; padding positions get zeros. (No padded copy of
        the internal states: a long prompt's are gigabytes.)"""
        batch, internal_length, hidden = internal_states.shape
        if internal_length == 0:
            return internal_states.new_zeros(batch, self.token_positions.shape[1], hidden)
        index = self.token_positions.clamp(max=internal_length - 1)[..., None].expand(-1, -1, hidden)
        states = internal_states.gather(1, index)
        return states.masked_fill_((self.token_positions == internal_length)[..., None], 0.0)


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

    @property
    def is_gradient_checkpointing(self):
        """transformers 5.23 renamed this to `is_activation_checkpointing` and warns on the old name, which PEFT still
        reads when it wraps a model; the old name answers with the current one, without the warning."""
        if hasattr(LlamaPreTrainedModel, "is_activation_checkpointing"):
            return self.is_activation_checkpointing
        return super().is_gradient_checkpointing

    @classmethod
    def _supports_default_dynamic_cache(cls):
        """A stock DynamicCache cannot hold landmark blocks: `prepare_inputs_for_generation` builds the retrieval
        cache instead (the way transformers' recurrent models supply theirs)."""
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


PREFILL_PASS_POSITIONS = 4096  # internal positions a prefill pass on the kernels holds at most (whole chunks)
PREFILL_SCRATCH_BYTES = 1 << 30  # the fp32 scratch of such a pass: the selection's scores [batch, heads, positions,
# blocks] and the retrieval's shares [batch, heads, positions, top k, head_dim + 1]


class LandmarkLlamaModel(LandmarkLlamaPreTrainedModel, LlamaModel):
    """`LlamaModel` that inserts landmarks before the stack and drops them after it.

    Without a cache the whole input runs in the training form. With a `LandmarkRetrievalCache` (passed, or built for
    `use_cache=True`, which `generate` passes) it runs the inference form: the new tokens continue each row of the
    cache, in chunks of `prefill_chunk_length` internal positions, and the cache is returned.
    """

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if cache is not None and past_key_values is not None:
            raise ValueError("Pass the cache once, as `cache` or as `past_key_values`.")
        cache = cache if cache is not None else past_key_values
        check_cache_type(cache)
        if cache is None and use_cache:  # None (the default) keeps the training form: only asking builds a cache
            cache = LandmarkRetrievalCache(self.config)
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
        attention_mask = _new_token_mask(attention_mask, length, cache)
        tokens_seen = None if cache is None else cache.tokens_per_row(batch, inputs_embeds.device)
        _check_default_positions(position_ids, attention_mask, batch, length, tokens_seen)

        kwargs["return_dict"] = True
        if cache is not None:
            _set_cache_rope(cache, self.rotary_emb)
        per_layer_outputs = any(kwargs.get(name, getattr(self.config, name, False))
                                for name in ("output_hidden_states", "output_attentions"))
        static = cache is not None and cache.settings.cuda_graphs and not per_layer_outputs
        # a decoding step: the token and its landmark slot, one chunk (a chunk length of 1 runs them as two passes)
        if static and length == 1 and cache.settings.prefill_chunk_length > 1:
            outputs = BaseModelOutputWithPast(last_hidden_state=self._decode_step(inputs_embeds, attention_mask, cache,
                                                                                  **kwargs))
        else:
            layout = LandmarkLayout.build(
                attention_mask, batch, length, self.config.block_size, inputs_embeds.device, tokens_seen
            )
            internal_embeds = layout.insert(inputs_embeds, self._landmark_embedding(inputs_embeds.device))
            inputs_embeds = None  # (a long prompt's embeddings are gigabytes)
            if cache is None:
                internal_positions = torch.arange(layout.internal_length, device=internal_embeds.device)[None]
                outputs = super().forward(
                    inputs_embeds=internal_embeds, position_ids=internal_positions, use_cache=False, **kwargs
                )
            else:
                outputs = self._forward_chunks(internal_embeds, layout.lengths, cache, static, per_layer_outputs,
                                               **kwargs)
            outputs.last_hidden_state = layout.extract(outputs.last_hidden_state)
            if outputs.hidden_states is not None:
                outputs.hidden_states = tuple(layout.extract(states) for states in outputs.hidden_states)
            # outputs.attentions stay over the internal sequence (landmark positions included).
        if cache is not None:
            cache.seen_tokens += length
        setattr(outputs, _CACHE_FIELD, cache)
        return outputs

    def _landmark_embedding(self, device):
        """[1, hidden]; the id tensor is filled on the device (no host copy, which a CUDA graph could not hold)."""
        return self.embed_tokens(torch.full((1,), self.config.landmark_token_id, device=device))

    def _decode_step(self, inputs_embeds, attention_mask, cache, **kwargs):
        """One new token per row (generate's decoding steps), [batch, 1, hidden] -> [batch, 1, hidden], as a static
        pass of two internal positions: every row adds its token and a landmark, which counts only where the token
        completes a block (elsewhere it is padding that never enters the cache). Only the token's hidden state is
        returned (zeros for a padding token, as `LandmarkLayout` gives)."""
        batch, _, hidden = inputs_embeds.shape
        if attention_mask is None:
            real = torch.ones(batch, dtype=torch.long, device=inputs_embeds.device)
        else:
            real = attention_mask[:, 0].long().to(inputs_embeds.device)
        most_blocks = cache.plan_static_pass(2, decoding=True)

        def step(inputs_embeds, real):
            landmark = self._landmark_embedding(inputs_embeds.device).to(inputs_embeds.dtype)
            internal_embeds = torch.cat([inputs_embeds, landmark.expand(batch, 1, hidden)], dim=1)
            states = self._static_pass(internal_embeds, cache.decoding_lengths(real), cache, most_blocks, **kwargs)
            return torch.where(real.bool()[:, None, None], states[:, :1], 0.0)

        return self._step_graph(cache, "decode", inputs_embeds)(step, inputs_embeds, real, cache.buffers())

    def _static_pass(self, internal_embeds, lengths, cache, most_blocks, chunk_length=None, **kwargs):
        """The stock stack over [batch, width, hidden] internal positions adding `lengths` [batch] to each row (in
        chunks of `chunk_length`), with static shapes and no host reads (`LandmarkRetrievalCache.begin_static_pass`):
        what a CUDA graph captures."""
        cache.begin_static_pass(lengths, most_blocks, chunk_length)
        return self._stack_pass(internal_embeds, cache, **kwargs).last_hidden_state

    def _stack_pass(self, internal_embeds, cache, **kwargs):
        """The stock stack over the pass the cache has begun, at position 0 (RoPE is the identity there: the retrieval
        attention rotates queries and keys itself); ends the pass. Returns the stack's output."""
        at_zero = torch.zeros(1, internal_embeds.shape[1], dtype=torch.long, device=internal_embeds.device)
        outputs = LlamaModel.forward(
            self, inputs_embeds=internal_embeds, position_ids=at_zero, use_cache=False, retrieval_cache=cache, **kwargs
        )
        cache.end_chunk()
        return outputs

    def _step_graph(self, cache, kind, inputs_embeds):
        """The cache's `StepGraph` for passes of this kind and shape."""
        if cache.graph_blocker is None:
            cache.graph_blocker = _graph_blocker(self, cache, inputs_embeds)
        key = (kind, tuple(inputs_embeds.shape))
        if key not in cache.step_graphs:
            cache.step_graphs[key] = StepGraph(None if cache.graph_blocker == "none" else cache.graph_blocker)
        return cache.step_graphs[key]

    def _forward_chunks(self, internal_embeds, lengths, cache, static, per_layer_outputs, **kwargs):
        """The stock stack over [batch, internal positions, hidden] in chunks that continue `cache` row by row.

        The stack runs at position 0 (RoPE is the identity there): the retrieval attention rotates queries and keys
        itself, to the positions each chunk's retrieval assigns them. `static`: passes with static bounds, replayed
        from CUDA graphs where they can be (`_static_pass`), else with the exact bounds read per chunk. Returns the
        stitched stack output.
        """
        if kwargs.get("output_attentions"):
            raise NotImplementedError(
                "output_attentions is not available with the retrieval cache; pass use_cache=False."
            )
        chunk_length = cache.settings.prefill_chunk_length
        total = internal_embeds.shape[1]
        cache.reserve(total + chunk_length)  # the stores are allocated once for the whole input
        if not cache.settings.offload_to_cpu:
            pass_length = self._prefill_pass_length(cache, internal_embeds)
        elif total > chunk_length and not per_layer_outputs:
            return self._forward_layer_major(internal_embeds, lengths, cache, **kwargs)
        else:  # one chunk (exact decoding steps), or chunk by chunk through every layer, each chunk staging anew
            pass_length = chunk_length
        last_hidden, hidden_states = [], []
        for begin in range(0, total, pass_length):
            chunk = internal_embeds[:, begin : begin + pass_length]
            width = chunk.shape[1]
            chunk_lengths = (lengths - begin).clamp(0, width)
            if static:  # no host reads: the passes of one width replay one captured graph
                step = partial(self._static_pass, cache=cache, most_blocks=cache.plan_static_pass(width),
                               chunk_length=chunk_length, **kwargs)
                graph = self._step_graph(cache, "chunk", chunk)
                last_hidden.append(graph(step, chunk, chunk_lengths, cache.buffers()))
                continue
            cache.begin_chunk(chunk_lengths, width, chunk_length)
            outputs = self._stack_pass(chunk, cache, **kwargs)
            last_hidden.append(outputs.last_hidden_state)
            hidden_states.append(outputs.hidden_states)
        if not last_hidden:  # every new token was padding
            return BaseModelOutputWithPast(last_hidden_state=internal_embeds)
        if static:  # (exact passes among them have no per-layer outputs either)
            return BaseModelOutputWithPast(last_hidden_state=torch.cat(last_hidden, 1))
        outputs.last_hidden_state = torch.cat(last_hidden, 1)
        if outputs.hidden_states is not None:
            outputs.hidden_states = tuple(torch.cat(per_layer, 1) for per_layer in zip(*hidden_states))
        return outputs

    def _prefill_pass_length(self, cache, internal_embeds):
        """Internal positions per pass through the stack: one chunk, or on the retrieval kernels with per-token
        retrieval as many chunks as `PREFILL_PASS_POSITIONS` holds (a pass of several chunks computes what passes of
        one chunk compute, `ChunkPositions.chunk_length`, with long matrix products and a few launches a layer
        instead of a few per chunk), as far as the selection's scratch scores stay within
        `PREFILL_SCRATCH_BYTES`."""
        chunk_length, settings = cache.settings.prefill_chunk_length, cache.settings
        config = self.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if settings.retrieval_granularity != "token" or not _use_triton(config, internal_embeds.device, head_dim, 0.0):
            return chunk_length
        batch, total = internal_embeds.shape[:2]
        # per query and head: a score per block, and a gate and mix per retrieved block (the retrieval's shares)
        per_query = cache.layers[0].capacity + settings.retrieval_top_k * (head_dim + 1)
        scratch_per_chunk = batch * config.num_attention_heads * chunk_length * per_query * 4
        chunks = min(PREFILL_PASS_POSITIONS // chunk_length, PREFILL_SCRATCH_BYTES // scratch_per_chunk,
                     -(-total // chunk_length))
        return chunk_length * max(chunks, 1)

    def _forward_layer_major(self, internal_embeds, lengths, cache, **kwargs):
        """The stack over an input continuing an offloaded cache, layer by layer: every pass through one layer before
        the next, which gives each pass what the pass-by-pass order gives it (a layer's pass depends on the layer
        below at that pass and on its own earlier passes). Passes are as wide as on the device
        (`_prefill_pass_length`). One layer's blocks are on the device at a time (`BlockStager`, the held layer's
        local store), so a prompt's keys and values travel to the host once and never back."""
        chunk_length = cache.settings.prefill_chunk_length
        pass_length = self._prefill_pass_length(cache, internal_embeds)
        passes = cache.plan_chunks(lengths, pass_length, internal_embeds.shape[1], chunk_length)
        if not passes:  # every new token was padding
            return BaseModelOutputWithPast(last_hidden_state=internal_embeds)
        at_zero = torch.zeros(1, pass_length, dtype=torch.long, device=internal_embeds.device)
        starts = cache.internal_lengths.clone()
        ends, rotations = starts + lengths, {}
        # one buffer of the input's hidden states, overwritten pass by pass: a layer's later passes read only their own
        hidden = internal_embeds
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            cache.stager.hold(cache.layers[decoder_layer.self_attn.layer_idx], passes[0][1].most_blocks, starts,
                              local_store=True)
            for begin, chunk in passes:
                states = hidden[:, begin : begin + pass_length]
                width = states.shape[1]
                if width not in rotations:  # RoPE at position 0: the retrieval attention rotates by itself
                    rotations[width] = self.rotary_emb(states, at_zero[:, :width])
                cache.chunk = chunk
                hidden[:, begin : begin + width] = decoder_layer(
                    states, attention_mask=None, position_ids=at_zero[:, :width], position_embeddings=rotations[width],
                    retrieval_cache=cache, **kwargs,
                )
            cache.stager.settle(ends)
        cache.finish_chunks(lengths, len(passes))
        # the final norm in place, a pass at a time: its fp32 copies of a whole prompt were the prefill's peak
        for begin in range(0, hidden.shape[1], pass_length):
            hidden[:, begin : begin + pass_length] = self.norm(hidden[:, begin : begin + pass_length])
        return BaseModelOutputWithPast(last_hidden_state=hidden)


def _set_cache_rope(cache, rotary_emb):
    """The retrieval cache rotates queries and keys itself, with the model's fixed RoPE frequencies."""
    rope_type = getattr(rotary_emb, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(
            f"rope_type {rope_type!r} rescales RoPE with the sequence length; the retrieval cache rotates blocks "
            "with fixed frequencies. Use use_cache=False (the training form) with this model."
        )
    cache.inv_freq = rotary_emb.inv_freq


def _graph_blocker(model, cache, inputs_embeds):
    """Why passes cannot be captured as CUDA graphs here: "none" where they can, "off" where they are not wanted
    (cuda_graphs off, tensors not on CUDA), or the reason, logged once."""
    if not cache.settings.cuda_graphs or not inputs_embeds.is_cuda or torch.compiler.is_compiling():
        return "off"  # (torch.compile makes its own graphs)
    if torch.is_grad_enabled():
        reason = "gradients are enabled (decode under torch.no_grad(), as generate does)"
    elif any(hasattr(module, "_hf_hook") for module in model.modules()):
        reason = "accelerate hooks move weights during the forward (device_map offloading)"
    else:
        return "none"
    logger.warning_once(f"landmark-llama: passes through the stack run without CUDA graphs: {reason}.")
    return reason


class StepGraph:
    """One kind of static pass (a decoding step, or prefill chunks of one width) of one cache, captured as a CUDA
    graph.

    A pass whose buffers have not been seen runs plainly (it warms up Triton's compiler, cuBLAS and the allocator);
    the next pass with the same buffers is captured and then replayed, until a buffer moves (a store grows, the batch
    changes) and the cycle starts again. With a `blocker` (see `_graph_blocker`), or after a capture fails (logged
    once), every pass runs plainly.
    """

    def __init__(self, blocker=None):
        self.blocker = blocker
        self.graph = self.key = self.warmed = None

    def __call__(self, step, inputs, lengths, buffers):
        if self.blocker is not None:
            return step(inputs, lengths)
        key = tuple(t.data_ptr() for t in buffers)
        if key != self.key:
            self.graph = None
            if key != self.warmed:
                self.warmed = key
                return step(inputs, lengths)
            try:
                self._capture(step, inputs, lengths)
            except RuntimeError as error:
                self.blocker = f"capture failed ({error})"
                logger.warning_once(f"landmark-llama: passes run without CUDA graphs: {self.blocker}.")
                return step(inputs, lengths)
            self.key = key
        self.inputs.copy_(inputs)
        self.lengths.copy_(lengths)
        self.graph.replay()
        return self.output.clone()

    def _capture(self, step, inputs, lengths):
        self.inputs, self.lengths = inputs.clone(), lengths.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records without running: the replay that follows runs the pass
            self.output = step(self.inputs, self.lengths)
        self.graph = graph


def _new_token_mask(attention_mask, length, cache):
    """The [batch, length] 0/1 mask of the new tokens: `attention_mask` may also cover what the cache holds."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, length] of 0/1, got shape {tuple(attention_mask.shape)}.")
    held = 0 if cache is None else cache.get_seq_length()
    if attention_mask.shape[1] == held + length:
        return attention_mask[:, held:]
    if attention_mask.shape[1] == length:
        return attention_mask
    raise ValueError(
        f"attention_mask covers {attention_mask.shape[1]} tokens; expected the {length} new tokens, or those and the "
        f"{held} the cache already holds."
    )


def _check_default_positions(position_ids, attention_mask, batch, length, tokens_seen=None):
    """Positions are internal indices derived from the landmark layout; only the default ones may be passed."""
    if position_ids is None:
        return
    device = position_ids.device
    if attention_mask is None:
        real = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        real = attention_mask.bool().to(device)
    expected = real.long().cumsum(-1) - 1
    if tokens_seen is not None:
        expected = expected + tokens_seen.to(device)[:, None]
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
        self,
        input_ids,
        next_sequence_length=None,
        inputs_embeds=None,
        retrieval_top_k=None,
        retrieval_granularity=None,
        retrieval_positions=None,
        prefill_chunk_length=None,
        cuda_graphs=None,
        offload_to_cpu=None,
        **kwargs,
    ):
        """Stock inputs, and the block-retrieval cache: built at the first step with the retrieval settings given to
        `generate` (each defaults to the config field of the same name), then continued with the new tokens only."""
        kwargs.pop("position_ids", None)  # derived from the landmark layout
        settings = dict(
            retrieval_top_k=retrieval_top_k,
            retrieval_granularity=retrieval_granularity,
            retrieval_positions=retrieval_positions,
            prefill_chunk_length=prefill_chunk_length,
            cuda_graphs=cuda_graphs,
            offload_to_cpu=offload_to_cpu,
        )
        cache = kwargs.get(_CACHE_FIELD)
        if cache is None and kwargs.get("use_cache") is not False:
            kwargs[_CACHE_FIELD] = LandmarkRetrievalCache(self.config, **settings)
        elif cache is not None:
            check_cache_type(cache)
            cache.check_settings(**settings)
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, inputs_embeds=inputs_embeds, **kwargs
        )

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
    files, pending = {}, [("modeling_landmark_llama", Path(__file__))]
    while pending:  # the modeling file and every file it imports, directly or through another
        name, path = pending.pop()
        files[f"{name}.py"] = text = _KERNEL_IMPORT.sub(r"\1\2", path.read_text(encoding="utf-8"))
        for imported in _RELATIVE_IMPORT.findall(text):
            if f"{imported}.py" in files:
                continue
            candidates = [p for p in (here / f"{imported}.py", here / "kernels" / f"{imported}.py") if p.exists()]
            if not candidates:
                raise FileNotFoundError(f"{name} imports .{imported}, but {imported}.py is not beside it or in "
                                        "kernels/.")
            pending.append((imported, candidates[0]))
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
