"""Block-retrieval KV cache of landmark-llama: the inference form of landmark attention (paper section 3.2).

Each layer keeps the keys and values of its internal sequence (landmarks included) in blocks of `block_size`
positions; the last block of a row is the incomplete tail. Keys are kept rotated only by their offset in their block,
so a retrieved block can be moved to whatever position the retrieval assigns it by one rotation, which is applied to
the query instead of the keys. For each chunk (or decoded token) a layer scores every
complete block of the cache by its landmark key, takes the `retrieval_top_k` best per head, and the chunk attends
to [retrieved blocks | tail | chunk] with the grouped softmax of the training form (`modeling_landmark_llama`).

Rows are independent: each row of a batch has its own length, tail and selection. Exactly equal landmark scores
go to the earlier block.

With `offload_to_cpu=True` the layers are `OffloadedCacheLayer`s: the keys and values of complete blocks live in
host memory, and the device keeps the landmark keys, the recent blocks and the recently retrieved ones.

`generate` creates this cache by itself; a hand-written loop gets it back in the output's cache field
(`past_key_values`) or may build one: `LandmarkRetrievalCache(model.config, retrieval_top_k=2)`.
"""

import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

from .configuration_landmark_llama import RETRIEVAL_GRANULARITIES, RETRIEVAL_POSITIONS, check_choice


try:  # the device-side block copies and slot assignment of the offloaded cache, the fused selection and cache write;
    # the CPU runs PyTorch
    from .block_copy import copy_blocks as copy_blocks_triton
    from .block_selection import select_blocks as select_blocks_triton
    from .block_selection import select_chunk_blocks as select_chunk_blocks_triton
    from .chunk_write import write_chunk as write_chunk_triton
    from .slot_assignment import assign_slots as assign_slots_triton
except ImportError:
    copy_blocks_triton = select_blocks_triton = select_chunk_blocks_triton = write_chunk_triton = None
    assign_slots_triton = None


TIE_TOLERANCE = 1e-5  # relative: scores this close are equal (see `top_blocks`)
DECODE_HEADROOM_BLOCKS = 32  # blocks planned past each forward's positions, so that decoding rarely grows a store
OFFLOAD_SLOTS_PER_PICK = 4  # device slots of an offloaded layer per block a key/value head's queries pick at once


@dataclass(frozen=True)
class RetrievalSettings:
    """How the cache retrieves; every field has the name of the config field (and `generate` keyword) it comes from.

    retrieval_top_k: blocks retrieved per head (and per query token with `"token"` granularity).
    retrieval_granularity: `"token"`: each query token of each head selects its own blocks (the paper's default);
        `"chunk"`: each head selects once for the whole chunk (softmax over landmarks, then max over the chunk).
    retrieval_positions: `"stingy"`: retrieved blocks are rotated into a window of `retrieval_top_k + 1` blocks right
        before the tail, so no distance exceeds the training context (paper 3.2.1); `"true"`: keys keep their
        positions.
    prefill_chunk_length: internal positions (landmarks included) processed per pass through the stack.
    cuda_graphs: passes through the stack run with static shapes (decoding steps and prefill chunks) and, on CUDA,
        replay captured CUDA graphs.
    offload_to_cpu: keys and values of complete blocks live in host memory (`OffloadedCacheLayer`).
    """

    retrieval_top_k: int
    retrieval_granularity: str
    retrieval_positions: str
    prefill_chunk_length: int
    cuda_graphs: bool
    offload_to_cpu: bool

    @classmethod
    def resolve(cls, config, **overrides):
        """Config defaults, each replaced by the override of the same name unless it is None; validated."""
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown retrieval settings {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}.")
        values = {name: getattr(config, name) for name in cls.__dataclass_fields__}
        values.update({name: value for name, value in overrides.items() if value is not None})
        check_retrieval_settings(config.block_size, config.train_context_length, **values)
        if values["prefill_chunk_length"] is None:
            values["prefill_chunk_length"] = default_chunk_length(
                config.block_size,
                config.train_context_length,
                values["retrieval_top_k"],
                values["retrieval_positions"],
            )
        return cls(**values)


def default_chunk_length(block_size, train_context_length, retrieval_top_k, retrieval_positions="stingy"):
    """The paper's chunk length: the training context in whole blocks less the retrieval window of k + 1 blocks.

    With true positions no window has to fit; where the formula leaves nothing, chunks are the training context.
    """
    whole_blocks = train_context_length - train_context_length % block_size
    length = whole_blocks - (retrieval_top_k + 1) * block_size
    if length < 1 and retrieval_positions == "true":
        return max(whole_blocks, block_size)
    return length


def check_retrieval_settings(
    block_size, train_context_length, retrieval_top_k, retrieval_granularity, retrieval_positions,
    prefill_chunk_length, cuda_graphs=True, offload_to_cpu=False,
):
    """Raise a ValueError naming the fix for settings the retrieval cache cannot run with."""
    for name, flag in (("cuda_graphs", cuda_graphs), ("offload_to_cpu", offload_to_cpu)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}.")
    if isinstance(retrieval_top_k, bool) or not isinstance(retrieval_top_k, int) or retrieval_top_k < 1:
        raise ValueError(f"retrieval_top_k must be an integer of at least 1, got {retrieval_top_k!r}.")
    check_choice("retrieval_granularity", retrieval_granularity, RETRIEVAL_GRANULARITIES)
    check_choice("retrieval_positions", retrieval_positions, RETRIEVAL_POSITIONS)
    if retrieval_positions == "true":
        positive = isinstance(prefill_chunk_length, int) and prefill_chunk_length >= 1
        if prefill_chunk_length is not None and not positive:
            raise ValueError(f"prefill_chunk_length must be a positive integer, got {prefill_chunk_length!r}.")
        return
    window = (retrieval_top_k + 1) * block_size
    longest = default_chunk_length(block_size, train_context_length, retrieval_top_k)
    if longest < 1:
        raise ValueError(
            f"retrieval_top_k={retrieval_top_k} leaves no room for a chunk: its window of {retrieval_top_k} + 1 "
            f"blocks of {block_size} ({window} positions) fills train_context_length={train_context_length}. Lower "
            "retrieval_top_k, or use retrieval_positions='true'."
        )
    if prefill_chunk_length is not None and (
        not isinstance(prefill_chunk_length, int) or not 1 <= prefill_chunk_length <= longest
    ):
        raise ValueError(
            f"prefill_chunk_length={prefill_chunk_length!r} cannot fit the retrieval window: a chunk and the "
            f"{window} positions of the window must stay within train_context_length={train_context_length} "
            f"(in whole blocks), so the chunk length must be between 1 and {longest}. Pass a length in that range or "
            "None (the default)."
        )


def rope_rotation(positions, inv_freq, dtype):
    """(cos, sin) [..., n, head_dim] of RoPE at the integer `positions` [..., n], as stock Llama's RoPE makes them."""
    angles = positions[..., None].float() * inv_freq.float()
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, positions, inv_freq, rotation=None):
    """`x` [..., n, head_dim] rotated to the integer `positions` [..., n] (broadcast), or by a precomputed
    `rotation` (see `rope_rotation`).

    The stack runs at position 0 when the cache is in use (the identity rotation), so `x` arrives unrotated and
    already carries the RoPE type's attention scaling; only the rotation is applied here.
    """
    cos, sin = rope_rotation(positions, inv_freq, x.dtype) if rotation is None else rotation
    return x * cos + rotate_half(x) * sin


def top_blocks(scores, k, tie_tolerance=TIE_TOLERANCE):
    """The k highest of `scores` [..., blocks]: (indices [..., k] in block order, picked [..., k]); rows with fewer
    than k finite scores leave their last slots unpicked (index 0).

    Scores within `tie_tolerance` times the row's largest magnitude of the k-th highest count as equal to it, and the
    earliest of those blocks fill the places left: blocks with the same landmark key (every landmark of layer 0,
    scored at one position by stingy retrieval) tie whatever rounding the matrix product that made each key left in
    its last bits, so the choice does not depend on batch shapes or devices. Linear in the number of blocks.
    """
    num_blocks = scores.shape[-1]
    cutoff = scores.topk(k, dim=-1).values[..., -1:]
    margin = tie_tolerance * torch.nan_to_num(scores, neginf=0.0).abs().amax(dim=-1, keepdim=True)
    above = scores > cutoff + margin
    tied = (scores - cutoff).abs() <= margin  # NaN (never true) where both are -inf
    tied &= tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)
    chosen = above | tied  # at most k a row
    rank = chosen.cumsum(-1)  # each chosen block goes to slot rank - 1, in block order; the others to a spare slot
    slots = torch.where(chosen, rank - 1, k)
    index = torch.arange(num_blocks, device=scores.device).expand_as(slots)
    indices = slots.new_zeros(*slots.shape[:-1], k + 1).scatter_(-1, slots, index)[..., :k]
    return indices, torch.arange(k, device=scores.device) < rank[..., -1:]


@dataclass
class ChunkPositions:
    """Where one pass through the stack sits in each row's internal sequence.

    start: [batch] internal positions each row held before this chunk (complete blocks = start // block_size).
    length: [batch] new positions of each row in this chunk; slots past it are padding and never enter the cache.
    most_blocks, longest_tail: bounds of the rows' complete-block count and tail: read to the host once per chunk
        (`begin_chunk`), or static ones that hold for every pass of a width (`begin_static_pass`).
    index: [] the number of passes before this one (on the device).
    chunk_length: the pass runs as chunks of this many positions (None: one), each retrieving as if it were a pass
        of its own: a wide prefill pass on the kernels, which computes what passes of one chunk compute, with long
        matrix products and few launches (`LandmarkLlamaModel._forward_chunks`).
    """

    start: torch.LongTensor
    length: torch.LongTensor
    most_blocks: int
    longest_tail: int
    index: torch.LongTensor
    chunk_length: int | None = None
    shared: dict = field(default_factory=dict, repr=False)

    def spans_chunks(self, width):
        """Whether a pass of `width` queries runs as several chunks (which only the kernels compute)."""
        return self.chunk_length is not None and width > self.chunk_length

    def selection_bound(self, width, block_size):
        """A static bound of the complete blocks any of the pass's `width` queries selects among: the pass's own
        `most_blocks`, and the blocks its earlier chunks complete."""
        if not self.spans_chunks(width):
            return self.most_blocks
        last_chunk_start = (width - 1) // self.chunk_length * self.chunk_length
        return self.most_blocks + (self.longest_tail + last_chunk_start) // block_size

    def once(self, name, make):
        """`make()`, made by the first layer and reused by the others: indices, masks and RoPE rotations depend on
        the chunk's positions alone (a decoding step then launches them once, not once per layer)."""
        if name not in self.shared:
            self.shared[name] = make()
        return self.shared[name]


@dataclass
class RetrievedBlocks:
    """Blocks selected for a chunk, one selection per query token (`"token"`) or per chunk (`"chunk"`): `blocks`
    [batch, q_heads, retrievers, k] indices into the layer's store, `valid` (rows with fewer than k complete blocks
    leave slots unpicked), `starts`, the position each block is assigned. `keys` and `values` (the store, see
    `LandmarkCacheLayer`) are read through the indices: `gathered()` copies the blocks out for the eager path; the
    fused kernel reads them in place."""

    blocks: torch.LongTensor
    valid: torch.Tensor
    starts: torch.LongTensor
    keys: torch.Tensor
    values: torch.Tensor

    @cached_property
    def gathered(self):
        """(keys, values) of the selected blocks, [batch, q_heads, retrievers, k, block_size, head_dim] each."""
        batch, q_heads = self.blocks.shape[:2]
        rows = torch.arange(batch, device=self.blocks.device)[:, None, None, None]
        kv_head = torch.arange(q_heads, device=self.blocks.device) // (q_heads // self.keys.shape[2])
        kv_head = kv_head[None, :, None, None]
        return self.keys[rows, self.blocks, kv_head], self.values[rows, self.blocks, kv_head]

    def table(self):
        """The block table of the fused kernel: `blocks` with -1 where no block was picked."""
        return torch.where(self.valid, self.blocks, -1)

    def scores(self, query, inv_freq):
        """Unscaled scores of the chunk's queries [batch, q_heads, width, head_dim] (rotated to their positions)
        against their k blocks, [batch, q_heads, width, k * block_size]. Each query is rotated back by the start of
        each of its blocks, rather than the k * block_size gathered keys forward:
        <q at m, key at start + o> = <q rotated by m - start, key rotated by o>."""
        queries = apply_rope(query.float()[:, :, :, None], -self.starts, inv_freq)  # [batch, q_heads, width, k, dim]
        keys = self.gathered[0].float()
        if keys.shape[2] == 1:  # one selection for the whole chunk: one product per head and block
            scores = torch.matmul(queries.transpose(2, 3), keys[:, :, 0].transpose(-1, -2)).transpose(2, 3)
        else:
            scores = torch.matmul(queries[..., None, :], keys.transpose(-1, -2)).squeeze(-2)
        return scores.flatten(-2)

    def mix(self, weights):
        """The values weighted by `weights` [batch, q_heads, width, k * block_size] -> [batch, q_heads, width, dim]."""
        values = self.gathered[1].flatten(-3, -2).float()
        if values.shape[2] == 1:
            return torch.matmul(weights, values[:, :, 0])
        return torch.matmul(weights[..., None, :], values).squeeze(-2)


class LandmarkCacheLayer(CacheLayerMixin):
    """One layer's blocks. `keys`, `values`: [batch, capacity, kv_heads, block_size, head_dim], keys rotated by their
    offset in the block only (so slot o of every block has the same rotation, whatever position the block takes);
    `landmarks`: [batch, capacity, kv_heads, head_dim], each block's landmark key rotated to its true position.

    Block i of a row is complete when i < start // block_size; block start // block_size holds the tail in its first
    start % block_size slots; slots past a row's tail hold scratch. The cache plans the capacity before a forward
    (`reserve`), so the stores are allocated once for a prompt and its decoding headroom; past that they grow by a
    quarter, never by doubling, so that a long prompt's cache never needs twice its size.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    STORES = ("keys", "values", "landmarks")  # every tensor of the layer, batch first
    GROWING = STORES  # those with one entry per block (dim 1), which grow with the capacity

    def __init__(self, block_size):
        super().__init__()
        self.block_size = block_size
        self.landmarks = None
        self.planned_blocks = 0

    @property
    def local_keys(self):
        """Where [tail | chunk] is written and read in full: block c of a row at index c % local_keys.shape[1]."""
        return self.keys

    @property
    def local_values(self):
        return self.values

    def in_block_landmarks(self, num_blocks):
        """[batch, num_blocks, kv_heads, head_dim] landmark keys rotated by their offset in the block alone."""
        return self.keys[:, :num_blocks, :, self.block_size - 1]

    def lazy_initialization(self, key_states, value_states):
        batch, kv_heads, _, head_dim = key_states.shape
        blocks = self.planned_blocks
        self.keys = key_states.new_zeros(batch, blocks, kv_heads, self.block_size, head_dim)
        self.values = value_states.new_zeros(batch, blocks, kv_heads, self.block_size, value_states.shape[-1])
        self.landmarks = key_states.new_zeros(batch, blocks, kv_heads, head_dim)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @property
    def capacity(self):
        return self.keys.shape[1] if self.is_initialized else self.planned_blocks

    def reserve(self, blocks):
        """Make room for `blocks` blocks per row: planned before the first write, grown (by a quarter at least)
        after it."""
        if not self.is_initialized:
            self.planned_blocks = max(self.planned_blocks, blocks)
            return
        capacity = self.keys.shape[1]
        if blocks <= capacity:
            return
        grow = max(blocks, capacity + capacity // 4) - capacity
        for name in self.GROWING:
            store = getattr(self, name)
            grown = self.new_store(name, (store.shape[0], capacity + grow, *store.shape[2:]), store)
            grown[:, :capacity].copy_(store)
            setattr(self, name, grown)

    def new_store(self, name, shape, like):
        """A store of `shape` for the tensor `name`, allocated like the tensor `like` (growth keeps its place)."""
        return like.new_zeros(shape)

    @property
    def separate_in_block_landmarks(self):
        """Where landmark keys rotated by their offset alone are kept apart from the key store (None: in it)."""
        return None

    def begin_write(self, key_states, value_states, chunk):
        """Make room for a pass's keys [batch, kv_heads, width, head_dim] behind each row's tail. Returns (rows
        [batch, 1], the blocks [tail | chunk] spans [batch, local_blocks], their index in the local store, the
        new positions' slots in [tail | chunk] [batch, 1, width, 1])."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        block_size = self.block_size
        batch, _, width, _ = key_states.shape
        tail_block, tail_length = chunk.start // block_size, chunk.start % block_size
        local_blocks = -(-(chunk.longest_tail + width) // block_size)
        self.reserve(chunk.most_blocks + local_blocks)

        def write_positions():
            rows = torch.arange(batch, device=self.device)[:, None]
            written = tail_block[:, None] + torch.arange(local_blocks, device=self.device)  # [batch, local_blocks]
            slots = (tail_length[:, None] + torch.arange(width, device=self.device))[:, None, :, None]
            return rows, written, slots

        rows, written, slots = chunk.once("write positions", write_positions)
        ring = self.local_keys.shape[1]
        if local_blocks > ring:
            raise ValueError(f"a pass of {width} positions spans {local_blocks} blocks; this cache's ring of recent "
                             f"blocks holds {ring} (sized for chunks of its prefill_chunk_length).")
        local_index = chunk.once(("local index", ring), lambda: written % ring)
        return rows, written, local_index, slots

    def update(self, key_states, value_states, chunk, inv_freq):
        """Write the chunk's keys and values [batch, kv_heads, width, head_dim] behind each row's tail.

        Returns the local part every query of the chunk attends to in full, [tail | chunk] laid out from the start of
        the tail's block: keys (rotated by their offset in the block) and values
        [batch, kv_heads, local_blocks * block_size, head_dim]. `key_states` arrive unrotated.
        """
        rows, written, local_index, slots = self.begin_write(key_states, value_states, chunk)
        block_size = self.block_size
        batch, kv_heads, width, _ = key_states.shape
        local_blocks = written.shape[1]
        rotation = chunk.once(("offset rotation", key_states.dtype),
                              lambda: rope_rotation(slots[..., 0] % block_size, inv_freq, key_states.dtype))
        key_states = apply_rope(key_states, None, None, rotation)
        local = []
        for store, states in ((self.local_keys, key_states), (self.local_values, value_states)):
            part = store[rows, local_index].permute(0, 2, 1, 3, 4).flatten(2, 3)  # [batch, kv, positions, dim]
            part = part.scatter(2, slots.expand(batch, kv_heads, width, states.shape[-1]), states.to(store.dtype))
            store[rows, local_index] = part.unflatten(2, (local_blocks, block_size)).permute(0, 2, 1, 3, 4)
            local.append(part)
        landmark_keys = local[0][:, :, block_size - 1 :: block_size]  # rotated by their offset alone
        if self.separate_in_block_landmarks is not None:
            self.separate_in_block_landmarks[rows, written] = landmark_keys.transpose(1, 2)
        # landmark keys at their true positions (their block's start on top of their offset), rotated once here
        rotation = chunk.once(("landmark rotation", landmark_keys.dtype),  # to their block's start: [batch, 1, blocks]
                              lambda: rope_rotation((written * block_size)[:, None], inv_freq, landmark_keys.dtype))
        landmarks = apply_rope(landmark_keys, None, None, rotation)
        self.landmarks[rows, written] = landmarks.transpose(1, 2)
        self.written(chunk, written, local_index)
        return local[0], local[1]

    def write_with_kernel(self, query, key_states, value_states, chunk, inv_freq):
        """`update` as the retrieval kernel needs it, in one Triton kernel (`write_chunk_triton`): only the new
        positions are written (the kernel reads [tail | chunk] from the store itself), and the landmark keys of the
        blocks they complete. Returns the chunk's `query` [batch, q_heads, width, head_dim] rotated to its
        positions."""
        _, written, local_index, _ = self.begin_write(key_states, value_states, chunk)
        query = write_chunk_triton(query, key_states, value_states, self.local_keys, self.local_values,
                                   self.landmarks, self.separate_in_block_landmarks, chunk.start, inv_freq)
        self.written(chunk, written, local_index)
        return query

    def written(self, chunk, written, local_index):
        """Called after a pass wrote the blocks `written` [batch, local_blocks] (at `local_index` of the local store)
        and their landmark keys."""

    def retrieve(self, query, chunk, settings, inv_freq, scaling, use_kernel=False):
        """Select blocks for the chunk's queries [batch, q_heads, width, head_dim] (rotated to their true positions).

        Returns None when no row has a complete block yet, else `RetrievedBlocks`. `use_kernel`: the selection runs
        as Triton kernels (`select_blocks_triton` per token: scores, then the top k; `select_chunk_blocks_triton`
        per chunk, with the probabilities' maximum between them), which compute the same.
        """
        block_size, top_k = self.block_size, settings.retrieval_top_k
        batch, q_heads, width, head_dim = query.shape
        num_blocks = chunk.selection_bound(width, block_size) if self.is_initialized else 0
        if num_blocks == 0:
            return None
        kv_heads = self.keys.shape[2]
        group = q_heads // kv_heads
        k = min(top_k, num_blocks)
        stingy = settings.retrieval_positions == "stingy"

        def block_masks():
            row_k = blocks.clamp(max=top_k)  # the paper's min(k, blocks), per row
            index = torch.arange(num_blocks, device=query.device)
            exists = index < blocks[:, None]  # [batch, num_blocks]
            older = index < (blocks - row_k)[:, None]  # outside the stingy window's k most recent
            window_start = ((blocks - row_k - 1) * block_size)[:, None, None, None]
            return row_k, exists, older, window_start

        if use_kernel and settings.retrieval_granularity == "token":
            selected, valid, block_start = select_blocks_triton(
                query, self.landmarks, self.in_block_landmarks(self.landmarks.shape[1]), chunk.start, num_blocks,
                block_size, top_k, stingy, inv_freq, scaling, TIE_TOLERANCE, chunk.chunk_length)
            return self.retrieved(selected, valid, block_start, chunk)
        if chunk.spans_chunks(width):
            raise ValueError("a pass of several chunks needs the kernels and per-token retrieval; "
                             "run one chunk a pass.")
        if use_kernel:  # per-chunk selection: the scores, each query's softmax and their maximum, the top k
            selected, valid, block_start = select_chunk_blocks_triton(
                query, self.landmarks, self.in_block_landmarks(self.landmarks.shape[1]), chunk.start, chunk.length,
                num_blocks, block_size, top_k, stingy, inv_freq, scaling, TIE_TOLERANCE)
            return self.retrieved(selected, valid, block_start, chunk)
        blocks = chunk.once("complete blocks", lambda: chunk.start // block_size)  # of each row
        row_k, exists, older, window_start = chunk.once("block masks", block_masks)

        # 1. score every complete block by its landmark key
        grouped_query = query.float().unflatten(1, (kv_heads, group))
        landmarks = self.landmarks[:, :num_blocks].transpose(1, 2)[:, :, None].float()  # [batch, kv, 1, blocks, dim]
        scores = torch.matmul(grouped_query, landmarks.transpose(-1, -2))
        if stingy:  # the k most recent keep their true positions; older landmarks are all scored at the landmark
            # slot of the window's first block, which starts at W: <q at p, landmark at W + block_size - 1> =
            # <q rotated back by W, landmark rotated by its offset alone>
            rotation = chunk.once("window rotation", lambda: rope_rotation(-window_start, inv_freq, torch.float32))
            older_query = apply_rope(grouped_query, None, None, rotation)
            in_block = self.in_block_landmarks(num_blocks).transpose(1, 2)[:, :, None].float()
            older_scores = torch.matmul(older_query, in_block.transpose(-1, -2))
            scores = torch.where(older[:, None, None, None], older_scores, scores)
        scores = scores.flatten(1, 2).mul_(scaling)  # [batch, q_heads, width, blocks]
        scores = scores.masked_fill_(~exists[:, None, None], float("-inf"))
        if settings.retrieval_granularity == "chunk":
            def selecting():  # [batch, 1, width, blocks]: real queries (not padding) and existing blocks
                query_valid = torch.arange(width, device=query.device) < chunk.length[:, None]  # [batch, width]
                return exists[:, None, None] & query_valid[:, None, :, None]

            probabilities = torch.softmax(scores, dim=-1)  # rows without blocks give NaN: replaced below
            valid = chunk.once("selecting", selecting)
            scores = torch.where(valid, probabilities, float("-inf")).amax(dim=2, keepdim=True)

        # 2. the top k in block order; equal scores go to the earlier block
        selected, valid = top_blocks(scores, k)  # [batch, q_heads, retrievers, k]
        row_blocks = blocks[:, None, None, None]

        # 3. positions: the stingy window, older picks packed from its left, recent ones one block to the right
        if stingy:
            is_recent = selected >= row_blocks - row_k[:, None, None, None]
            slot = torch.arange(k, device=query.device) + is_recent.long()
            block_start = window_start + slot * block_size
        else:
            block_start = selected * block_size

        return self.retrieved(selected, valid, block_start, chunk)

    def retrieved(self, selected, valid, starts, chunk):
        """The `RetrievedBlocks` of a selection: here read straight from the store."""
        return RetrievedBlocks(selected, valid, starts, self.keys, self.values)

    def get_seq_length(self):
        raise NotImplementedError("LandmarkRetrievalCache.get_seq_length counts input tokens for the whole cache.")

    def get_mask_sizes(self, query_length):
        raise NotImplementedError("landmark attention builds its own masks; the cache has no mask sizes.")

    def get_max_length(self):
        return -1

    def reorder_cache(self, beam_idx):
        """In place, so that a captured decoding step keeps reading the same buffers."""
        if self.is_initialized:
            for name in self.STORES:
                store = getattr(self, name)
                store.copy_(store.index_select(0, beam_idx.to(store.device)))

    def batch_select_indices(self, indices):
        self._rebuild_rows(lambda store: store.index_select(0, indices.to(store.device)))

    def batch_repeat_interleave(self, repeats):
        self._rebuild_rows(lambda store: store.repeat_interleave(repeats, dim=0))

    def _rebuild_rows(self, make):
        """Every store replaced by `make(store)` (other rows), allocated as the store was."""
        if self.is_initialized:
            for name in self.STORES:
                rows = make(getattr(self, name))
                store = self.new_store(name, rows.shape, getattr(self, name))
                store.copy_(rows)
                setattr(self, name, store)

    def reset(self):
        for name in self.STORES:
            setattr(self, name, None)
        self.is_initialized = False
        self.planned_blocks = 0

    def crop(self, tokens_to_remove):
        raise NotImplementedError(
            "The landmark retrieval cache cannot be cropped (landmarks of completed blocks cannot be taken back); "
            "assisted and speculative decoding are not supported."
        )


def host_empty(shape, dtype, pin):
    """An uninitialised host tensor; `pin`: page-locked and mapped into the GPU's address space, so that copies run
    asynchronously and kernels read it in place. Registered in place (`cudaHostRegister`) rather than taken from
    PyTorch's pinned allocator, which rounds every size up to a power of two (up to twice an offloaded cache)."""
    tensor = torch.empty(shape, dtype=dtype)
    if pin and tensor.numel():
        cudart, pointer = torch.cuda.cudart(), tensor.data_ptr()
        torch.cuda.check_error(cudart.cudaHostRegister(pointer, tensor.numel() * tensor.element_size(), 3))
        weakref.finalize(tensor, cudart.cudaHostUnregister, pointer)  # (portable | mapped) runs before the free
    return tensor


def copy_blocks(src, dst, src_blocks, dst_blocks):
    """dst[b, dst_blocks[b, h, p], h] = src[b, src_blocks[b, h, p], h] where src_blocks is not -1: by the Triton
    kernel on CUDA (device indices, pinned host memory read or written in place), by indexing on the CPU."""
    if src_blocks.is_cuda:
        if copy_blocks_triton is None:
            raise RuntimeError("offload_to_cpu on CUDA needs Triton (pip install triton) for its block copies.")
        copy_blocks_triton(src, dst, src_blocks, dst_blocks)
        return
    row, head, pair = torch.nonzero(src_blocks >= 0, as_tuple=True)
    dst[row, dst_blocks[row, head, pair], head] = src[row, src_blocks[row, head, pair], head]


class BlockStager:
    """The complete blocks of one offloaded layer on the device, for prefill passes whose queries select blocks of
    their own (any of a layer's blocks, so the whole layer is needed).

    Offloaded prompts run layer by layer (`LandmarkLlamaModel._forward_layer_major`), which `hold`s each layer, with
    the rows' starting lengths, while its passes run. The buffer is then the layer's local store
    (`OffloadedCacheLayer.local_keys`): the layer's blocks from earlier forwards are copied here once (complete ones
    from the host, each row's tail from the ring), the passes write their keys and values here (any width: the buffer
    holds every block), the blocks they complete go to the host from here (`writing_back`: on CUDA on a side stream,
    overlapping the passes that follow), and `settle` puts each row's tail back into the ring before the next layer
    is held. `release` frees the buffer when the forward ends.
    Chunk by chunk through every layer (when per-layer outputs are asked for), each layer's chunk reloads the layer
    through `blocks` and the ring stays the local store; the blocks the chunk completes are appended."""

    def __init__(self):
        self.layer = self.keys = self.values = self.starts = self.lengths = None
        self.loaded = 0
        self.ready = False
        self.copy_stream, self.copies_pending = None, False

    def hold(self, layer, blocks, lengths, local_store=False):
        """Keep `layer`'s blocks here from now on: its first `blocks` are copied when first needed (the layer's stores
        exist from its first write). `lengths` [batch]: the rows' internal lengths, whose complete blocks are on the
        host (a shorter row's blocks past them were never written there, and are zeroed here). `local_store`: the
        buffer is also the layer's local store for a forward from `lengths` on (see the class), holding each row's
        tail."""
        self.layer, self.loaded, self.ready, self.lengths = layer, blocks, False, lengths
        self.starts = lengths if local_store else None

    def is_local_store_of(self, layer):
        return self.starts is not None and self.layer is layer

    def blocks(self, layer, blocks, lengths):
        """(keys, values) [batch, blocks, kv_heads, block_size, head_dim]: the first `blocks` blocks of `layer`, whose
        rows hold `lengths` [batch] internal positions."""
        if self.layer is not layer:
            self.hold(layer, blocks, lengths)
        keys, values = self.buffers()
        return keys[:, :blocks], values[:, :blocks]

    def append(self, layer, source, target):
        """Blocks `layer` has just completed (`copy_blocks` indices from its ring), if it is held (and not written
        here directly)."""
        if self.layer is layer and self.starts is None:
            keys, values = self.buffers()
            copy_blocks(layer.ring_keys, keys, source, target)
            copy_blocks(layer.ring_values, values, source, target)

    @contextmanager
    def writing_back(self, source, target):
        """Around the copies of blocks a pass of the held layer completed, from this buffer to the host store
        (`source`, `target`: their `copy_blocks` indices). On CUDA they run on a side stream: their PCIe writes overlap
        the layer's later passes, which write only later blocks; the compute stream joins it before this buffer is
        refilled or freed, and so before anything reads the host store."""
        if not source.is_cuda:
            yield
            return
        if self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(source.device)
        self.copy_stream.wait_stream(torch.cuda.current_stream(source.device))  # the pass has written the blocks
        with torch.cuda.stream(self.copy_stream):
            yield
        for index in (source, target):  # (allocated on the compute stream, read there)
            index.record_stream(self.copy_stream)
        self.copies_pending = True

    def join_copies(self):
        """The compute stream waits for the copies `writing_back` started."""
        if self.copies_pending:
            torch.cuda.current_stream(self.copy_stream.device).wait_stream(self.copy_stream)
            self.copies_pending = False

    def settle(self, ends):
        """The held local store's tails (each row's block at `ends` [batch] // block_size) back into the layer's ring,
        where the passes after this forward read them."""
        self._tails(*self.buffers(), ends, to_ring=True)

    def buffers(self):
        """(keys, values): the held layer's blocks, [batch, capacity, kv_heads, block_size, head_dim]."""
        layer = self.layer
        if not self.ready:
            self.join_copies()  # the previous layer's blocks are read from here until then
            if self.keys is None or self.keys.shape != layer.keys.shape:
                self.keys = self.values = None  # (freed before the new ones are allocated)
                # zeros, then other layers' blocks: a local store's unwritten slots are read (with weight 0) and
                # must be finite
                self.keys, self.values = (torch.zeros(layer.keys.shape, dtype=layer.dtype, device=layer.device)
                                          for _ in range(2))
            for buffer, store in ((self.keys, layer.keys), (self.values, layer.values)):
                for row in range(store.shape[0]):  # contiguous rows: one asynchronous copy each
                    buffer[row, : self.loaded].copy_(store[row, : self.loaded], non_blocking=True)
            self.ready = True
            # a shorter row's blocks past its own complete ones were never written on the host: whatever the host
            # memory holds there (NaN too) is read with weight 0 by picks that are not valid
            complete = self.lengths // layer.block_size
            unwritten = torch.arange(self.loaded, device=layer.device) >= complete[:, None]
            for buffer in (self.keys, self.values):
                buffer[:, : self.loaded].masked_fill_(unwritten[..., None, None, None], 0.0)
            if self.starts is not None:
                self._tails(self.keys, self.values, self.starts, to_ring=False)
        if self.keys.shape != layer.keys.shape:
            raise RuntimeError("the offloaded layer grew while its blocks were held on the device; the cache plans "
                               "its capacity before a forward, so this is a bug: please report it.")
        return self.keys, self.values

    def _tails(self, keys, values, lengths, to_ring):
        """Each row's tail block (at `lengths` [batch] // block_size) between the held layer's ring and `keys`,
        `values` (this buffer)."""
        layer = self.layer
        tail = (lengths // layer.block_size)[:, None, None].expand(-1, keys.shape[2], 1)
        in_ring = tail % layer.ring_keys.shape[1]
        for here, ring in ((keys, layer.ring_keys), (values, layer.ring_values)):
            if to_ring:
                copy_blocks(here, ring, tail, in_ring)
            else:
                copy_blocks(ring, here, in_ring, tail)

    def release(self):
        self.join_copies()
        self.layer = self.keys = self.values = self.starts = self.lengths = None
        self.ready = False


class OffloadedCacheLayer(LandmarkCacheLayer):
    """A layer whose keys and values live in host memory (pinned where the model is on CUDA): `keys`, `values`
    [batch, capacity, kv_heads, block_size, head_dim], each block written once, when it completes (never a copy of
    the whole cache). On the device stay the landmark keys (`landmarks`, and `block_landmarks` rotated by offset
    alone), a ring of the recent blocks each pass writes and reads in full ([tail | chunk], `ring_keys`,
    `ring_values`: block c at c % ring), and the blocks retrieved by recent passes: `slot_keys`, `slot_values`
    [batch, slots, kv_heads, block_size, head_dim], `slot_blocks` [batch, kv_heads, slots] (the block each slot
    holds, -1 for none) and `slot_used` (the pass that last read it).

    A pass whose selections fit the slots (a decoding step, or a chunk with `"chunk"` granularity) keeps the blocks
    it picked that are already held and fetches the others into the least recently used slots (`fetch`), all on the
    device, so a captured CUDA graph can hold it; a prefill chunk whose queries select blocks of their own reads the
    layer's complete blocks from the cache's `BlockStager`.
    """

    STORES = ("keys", "values", "landmarks", "block_landmarks", "ring_keys", "ring_values", "slot_keys",
              "slot_values", "slot_blocks", "slot_used")
    GROWING = ("keys", "values", "landmarks", "block_landmarks")
    HOST = ("keys", "values")

    def __init__(self, block_size, ring_blocks, slots, stager):
        super().__init__(block_size)
        self.ring_blocks, self.slots, self.stager = ring_blocks, slots, stager

    def lazy_initialization(self, key_states, value_states):
        batch, kv_heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        block, zeros = (kv_heads, self.block_size, head_dim), key_states.new_zeros  # one block of a row
        self.keys, self.values = (self.new_store(name, (batch, self.planned_blocks, *block), key_states)
                                  for name in self.HOST)
        self.landmarks = zeros(batch, self.planned_blocks, kv_heads, head_dim)
        self.block_landmarks = torch.zeros_like(self.landmarks)
        self.ring_keys, self.ring_values = (zeros(batch, self.ring_blocks, *block) for _ in range(2))
        self.slot_keys, self.slot_values = (zeros(batch, self.slots, *block) for _ in range(2))
        self.slot_blocks = torch.full((batch, kv_heads, self.slots), -1, dtype=torch.long, device=self.device)
        self.slot_used = torch.full_like(self.slot_blocks, -1)
        self.is_initialized = True

    def new_store(self, name, shape, like):
        if name in self.HOST:
            return host_empty(shape, like.dtype, pin=self.device.type == "cuda")
        return super().new_store(name, shape, like)

    @property
    def local_keys(self):
        return self._local()[0]

    @property
    def local_values(self):
        return self._local()[1]

    @property
    def held_by_stager(self):
        """Whether a layer-major prefill holds this layer: the stager's copy of all its blocks is its local store."""
        return self.stager is not None and self.stager.is_local_store_of(self)

    def _local(self):
        return self.stager.buffers() if self.held_by_stager else (self.ring_keys, self.ring_values)

    def in_block_landmarks(self, num_blocks):
        return self.block_landmarks[:, :num_blocks]

    @property
    def separate_in_block_landmarks(self):
        return self.block_landmarks

    def written(self, chunk, written, local_index):
        """Blocks that this pass completes go to host memory (their landmark keys stay on the device)."""
        def completed():  # [batch, kv_heads, local_blocks] ring index of each completed block (-1 others), block
            done = written < ((chunk.start + chunk.length) // self.block_size)[:, None]
            heads = self.keys.shape[2]
            return (torch.where(done, local_index, -1)[:, None].expand(-1, heads, -1),
                    written[:, None].expand(-1, heads, -1))

        local_keys, local_values = self._local()
        source, target = chunk.once(("completed blocks", local_keys.shape[1]), completed)
        held = self.held_by_stager
        with self.stager.writing_back(source, target) if held else nullcontext():
            copy_blocks(local_keys, self.keys, source, target)
            copy_blocks(local_values, self.values, source, target)
        if not held:
            self.stager.append(self, source, target)

    def retrieved(self, selected, valid, starts, chunk):
        batch, q_heads, retrievers, k = selected.shape
        if self.held_by_stager:
            return RetrievedBlocks(selected, valid, starts, *self.stager.buffers())
        if q_heads // self.keys.shape[2] * retrievers * k <= self.slots:
            return self.fetch(selected, valid, starts, chunk)
        keys, values = self.stager.blocks(self, chunk.most_blocks, chunk.start)
        return RetrievedBlocks(selected, valid, starts, keys, values)

    def fetch(self, selected, valid, starts, chunk):
        """The selected blocks [batch, q_heads, retrievers, k] read from the slots; those not held are copied from
        host memory into the slots least recently used (and not wanted now). Static shapes, no host reads."""
        slot, valid, source, victim = assign_slots(selected, valid, chunk.length, self.slot_blocks, self.slot_used,
                                                   chunk.index)
        copy_blocks(self.keys, self.slot_keys, source, victim)
        copy_blocks(self.values, self.slot_values, source, victim)
        return RetrievedBlocks(slot, valid, starts, self.slot_keys, self.slot_values)


def assign_slots(selected, valid, length, slot_blocks, slot_used, stamp):
    """The slots serving a pass's picks [batch, q_heads, retrievers, k] (`OffloadedCacheLayer.fetch`): by the Triton
    kernel on CUDA (`kernels/slot_assignment.assign_slots`, whose docstring has the contract; one kernel instead of
    some twenty a layer), with PyTorch on the CPU. Updates the slot tables [batch, kv_heads, slots] in place; returns
    (slot, valid, source, victim)."""
    if selected.is_cuda and assign_slots_triton is not None:
        return assign_slots_triton(selected, valid, length, slot_blocks, slot_used, stamp)
    batch, q_heads, retrievers, k = selected.shape
    kv_heads, slots = slot_blocks.shape[1:]
    device = selected.device
    if retrievers > 1:  # per-token selections of padding queries fetch nothing
        real = torch.arange(retrievers, device=device) < length[:, None]
        valid = valid & real[:, None, :, None]
    wanted = torch.where(valid, selected, -1).reshape(batch, kv_heads, -1)  # a key/value head's query heads
    wanted_count = wanted.shape[-1]
    held = (wanted[..., :, None] == slot_blocks[..., None, :]) & (wanted >= 0)[..., None]  # [.., want, slot]
    hit = held.any(-1)
    first = (wanted[..., :, None] == wanted[..., None, :]).long().argmax(-1)  # first entry wanting that block
    new = (first == torch.arange(wanted_count, device=device)) & ~hit & (wanted >= 0)  # one fetch a block
    free = torch.where(held.any(-2), torch.iinfo(torch.long).max, slot_used)
    victims = free.argsort(dim=-1, stable=True)  # slots not wanted now, least recently used (or never) first
    victim = victims.gather(-1, (new.long().cumsum(-1) - 1).clamp(min=0))
    slot = torch.where(hit, held.long().argmax(-1), victim.gather(-1, first))
    spare = torch.full((batch, kv_heads, 1), -1, dtype=torch.long, device=device)
    pass_index = stamp.expand_as(slot)
    for table, index, value in ((slot_blocks, torch.where(new, victim, slots), wanted),
                                (slot_used, torch.where(wanted >= 0, slot, slots), pass_index)):
        table.copy_(torch.cat([table, spare], -1).scatter_(-1, index, value)[..., :slots])  # in place for graphs
    return slot.reshape(selected.shape), valid, torch.where(new, wanted, -1), victim


class LandmarkRetrievalCache(Cache):
    """The block-retrieval cache of a landmark-llama model: one `LandmarkCacheLayer` per decoder layer.

    Args:
        config (`LandmarkLlamaConfig`): the model's config; block size, context length and defaults come from it.
        retrieval_top_k, retrieval_granularity, retrieval_positions, prefill_chunk_length, cuda_graphs,
            offload_to_cpu: override the config field of the same name (see `RetrievalSettings`).

    `get_seq_length()` counts the input tokens processed (columns of `input_ids`, padding included), which is what
    `generate` slices new tokens by; each row's own length in internal positions is `internal_lengths`.
    """

    def __init__(self, config, **settings):
        if config.landmark_token_id is None:
            raise ValueError(
                "config.landmark_token_id is not set; convert the checkpoint with tools/convert_llama.py."
            )
        self.settings = RetrievalSettings.resolve(config, **settings)
        self.block_size = block_size = config.block_size
        if self.settings.offload_to_cpu:
            widest = max(self.settings.prefill_chunk_length, 2)  # a prefill chunk, or a decoding step
            group = config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads)
            slots = OFFLOAD_SLOTS_PER_PICK * group * self.settings.retrieval_top_k
            self.stager = BlockStager()
            ring = -(-(block_size - 1 + widest) // block_size)
            layers = [OffloadedCacheLayer(block_size, ring, slots, self.stager)
                      for _ in range(config.num_hidden_layers)]
        else:
            layers, self.stager = [LandmarkCacheLayer(block_size) for _ in range(config.num_hidden_layers)], None
        super().__init__(layers=layers)
        self.internal_lengths = None  # [batch] internal positions (landmarks included) of each row
        self.passes = None  # [] passes through the stack so far, on the device
        self.longest = 0  # the longest row's internal length, known on the host without a read
        self.seen_tokens = 0
        self.chunk = None  # the ChunkPositions of the pass through the stack in progress
        self.step_graphs = {}  # the model's captured passes by kind and width, tied to this cache's buffers
        self.graph_blocker = None  # why passes cannot be captured here ("off" where graphs are not wanted)

    def __repr__(self):
        return f"{type(self).__name__}({self.settings}, layers={len(self.layers)}, tokens={self.seen_tokens})"

    def check_settings(self, **settings):
        """Refuse settings that differ from the ones this cache was built with (they are fixed per cache)."""
        for name, value in settings.items():
            if value is not None and getattr(self.settings, name) != value:
                raise ValueError(
                    f"{name}={value!r} differs from the cache's {getattr(self.settings, name)!r}. Retrieval settings "
                    "are fixed when the cache is built: pass them to LandmarkRetrievalCache(config, ...) or let "
                    "generate build the cache."
                )

    def tokens_per_row(self, batch, device):
        """[batch] user tokens each row holds (padding excluded); checks the batch matches the cache."""
        if self.internal_lengths is None:
            self.internal_lengths = torch.zeros(batch, dtype=torch.long, device=device)
            self.passes = torch.zeros((), dtype=torch.long, device=device)
        if self.internal_lengths.shape[0] != batch:
            raise ValueError(
                f"the cache holds {self.internal_lengths.shape[0]} rows but the input has {batch}; use one cache per "
                "batch (generate expands beams and return sequences before it builds the cache)."
            )
        lengths = self.internal_lengths
        return lengths - lengths // self.block_size

    def reserve(self, positions):
        """Plan room for `positions` more internal positions on the longest row, and the decoding headroom."""
        blocks = (self.longest + positions) // self.block_size + 2 + DECODE_HEADROOM_BLOCKS  # + tail, scratch block
        for layer in self.layers:
            layer.reserve(blocks)

    def begin_chunk(self, lengths, width, chunk_length=None):
        """Announce a pass through the stack adding `lengths` [batch] internal positions to each row, of `width`
        at most (in chunks of `chunk_length`, see `ChunkPositions`); its exact bounds are read to the host."""
        start = self.internal_lengths
        summary = torch.stack([
            (start // self.block_size).max(), (start % self.block_size).max(), (start + lengths).max()
        ])
        most_blocks, longest_tail, self.longest = summary.tolist()  # one read to the host per chunk
        self.chunk = ChunkPositions(start, lengths, most_blocks, longest_tail, self.passes, chunk_length)

    def plan_static_pass(self, width, decoding=False):
        """Host side of a pass with static shapes (`begin_static_pass`), which reads nothing from the device: the
        longest row's length, known on the host as a bound, grows by `width` (or, `decoding`, by one token and
        maybe its landmark), and the stores make room. Returns the static complete-block bound of the pass."""
        block_size = self.block_size
        local_blocks = -(-(block_size - 1 + width) // block_size)  # the longest tail and the pass
        needed = self.longest // block_size + local_blocks
        if decoding:
            tokens = self.longest - self.longest // block_size + 1
            self.longest = tokens + tokens // (block_size - 1)
        else:
            self.longest += width
        for layer in self.layers:
            layer.reserve(needed)
        return self.layers[0].capacity - local_blocks

    def decoding_lengths(self, real):
        """Internal positions a decoding step adds to each row: its token (`real` [batch] 0/1: padding adds nothing)
        and, where the token completes a block, the landmark."""
        tokens = self.internal_lengths - self.internal_lengths // self.block_size
        completes = tokens % (self.block_size - 1) == self.block_size - 2
        return real.long() * (1 + completes.long())

    def begin_static_pass(self, lengths, most_blocks, chunk_length=None):
        """Announce a pass adding `lengths` [batch] positions to each row with the static bounds of
        `plan_static_pass` (every block count up to the capacity, any tail), so that every pass of one width has the
        same shapes and no host reads: it can be captured as a CUDA graph."""
        self.chunk = ChunkPositions(self.internal_lengths, lengths, most_blocks, self.block_size - 1, self.passes,
                                    chunk_length)

    def end_chunk(self):
        self.internal_lengths.add_(self.chunk.length)  # in place: a captured step keeps reading the same tensor
        self.passes.add_(1)
        self.chunk = None

    def buffers(self):
        """The tensors a captured pass reads and writes; it stays valid while none of them moves (a layer's stores
        appear once the first pass has written them)."""
        stores = [getattr(layer, name) for layer in self.layers if layer.is_initialized for name in layer.STORES]
        return [self.internal_lengths, self.passes] + stores

    def plan_chunks(self, lengths, pass_length, total, chunk_length=None):
        """The passes of an input of `total` internal positions adding `lengths` [batch] to the rows, `pass_length`
        positions each (in chunks of `chunk_length`, see `ChunkPositions`), with their exact bounds (one read to the
        host for all): [(begin, ChunkPositions)], to run the input layer by layer. `finish_chunks` then advances the
        rows."""
        begins = torch.arange(0, total, pass_length, device=lengths.device)
        pass_lengths = (lengths[None] - begins[:, None]).clamp(0, pass_length)  # [passes, batch]
        starts = self.internal_lengths + pass_lengths.cumsum(0) - pass_lengths
        bounds = torch.cat([(starts // self.block_size).amax(1), (starts % self.block_size).amax(1),
                            (self.internal_lengths + lengths).amax()[None]]).tolist()
        count = len(begins)
        self.longest = bounds[-1]
        return [(begin, ChunkPositions(starts[i], pass_lengths[i], bounds[i], bounds[count + i], self.passes + i,
                                       chunk_length))
                for i, begin in enumerate(range(0, total, pass_length))]

    def finish_chunks(self, lengths, count):
        """After `plan_chunks`' `count` passes ran through every layer."""
        self.internal_lengths.add_(lengths)
        self.passes.add_(count)
        self.chunk = None
        self.stager.release()

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    def get_mask_sizes(self, query_length, layer_idx=0):
        raise NotImplementedError("landmark attention builds its own masks; the cache has no mask sizes.")

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._release_stager()
        if self.internal_lengths is not None:
            lengths = self.internal_lengths
            lengths.copy_(lengths.index_select(0, beam_idx.to(lengths.device)))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._release_stager()
        if self.internal_lengths is not None:
            self.internal_lengths = self.internal_lengths.index_select(0, indices.to(self.internal_lengths.device))

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self._release_stager()
        if self.internal_lengths is not None:
            self.internal_lengths = self.internal_lengths.repeat_interleave(repeats)

    def _release_stager(self):
        if self.stager is not None:  # its copy of a layer's blocks no longer matches the rows
            self.stager.release()

    def reset(self):
        super().reset()
        self._release_stager()
        self.internal_lengths, self.passes, self.longest, self.seen_tokens, self.chunk = None, None, 0, 0, None
        self.step_graphs, self.graph_blocker = {}, None


def check_cache_type(cache):
    """The model can only continue from its own cache type."""
    if cache is not None and not isinstance(cache, LandmarkRetrievalCache):
        hint = " (generate builds the right cache by itself)" if isinstance(cache, DynamicCache) else ""
        raise TypeError(
            f"landmark-llama needs a LandmarkRetrievalCache, got {type(cache).__name__}: a plain KV cache cannot hold "
            f"landmark blocks. Pass LandmarkRetrievalCache(model.config) or no cache{hint}."
        )


__all__ = [
    "LandmarkRetrievalCache",
    "LandmarkCacheLayer",
    "OffloadedCacheLayer",
    "RetrievalSettings",
    "apply_rope",
    "rope_rotation",
    "check_cache_type",
    "default_chunk_length",
    "top_blocks",
]
