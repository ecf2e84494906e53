"""Slot assignment of the offloaded retrieval cache, as one Triton kernel: which device slot serves each block a pass
picked, which blocks must travel from host memory, and the slot tables' update.

The offloaded cache (`cache_landmark_llama.OffloadedCacheLayer.fetch`) keeps recently retrieved blocks in device
slots. For each row and key/value head, the blocks its query heads picked (valid picks of real queries) are served
by the slot that holds them; a block no slot holds is fetched once, into the least recently used slot that no pick
of this pass holds (ties: the lower slot). The PyTorch form of this takes some twenty small kernels a layer and
decoding step; this kernel takes one program per row and key/value head, the picks and slots in registers.
"""

import torch

try:  # guarded like landmark_attention.py: the remote-code import check must not demand Triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("slot_assignment needs Triton (pip install triton); the CPU path assigns with PyTorch."
                      ) from error

__all__ = ["assign_slots"]


# ---------------------------------------------------------------------------------------------------------
# Layer 1: the Triton kernel
# ---------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["slots"])
def _assign_slots_kernel(
    selected, valid, length, slot_blocks, slot_used, stamp, slot_out, valid_out, source_out, victim_out,
    slots, kv_heads, GROUP: tl.constexpr, RETRIEVERS: tl.constexpr, K: tl.constexpr, W_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
):
    i_b = tl.program_id(0) // kv_heads
    i_h = tl.program_id(0) % kv_heads
    picks: tl.constexpr = GROUP * RETRIEVERS * K  # a key/value head's picks: its query heads', retrievers', k's
    w = tl.arange(0, W_PAD)
    in_w = w < picks
    retriever = w // K % RETRIEVERS
    offsets = (i_b * kv_heads + i_h).to(tl.int64) * picks + w  # [batch, q_heads, retrievers, k] flat
    ok = (tl.load(valid + offsets, mask=in_w, other=0) != 0) & in_w
    if RETRIEVERS > 1:  # per-token picks: padding queries fetch nothing
        ok = ok & (retriever < tl.load(length + i_b))
    wanted = tl.where(ok, tl.load(selected + offsets, mask=in_w, other=0), -1)

    s = tl.arange(0, S_PAD)
    in_s = s < slots
    row = (i_b * kv_heads + i_h).to(tl.int64) * slots
    held_block = tl.load(slot_blocks + row + s, mask=in_s, other=-1)
    used = tl.load(slot_used + row + s, mask=in_s, other=0)

    held = (wanted[:, None] == held_block[None, :]) & (wanted >= 0)[:, None] & in_s[None, :]  # [picks, slots]
    hit = tl.max(held.to(tl.int32), 1) > 0
    hit_slot = tl.min(tl.where(held, s[None, :], S_PAD), 1)
    # the first pick of each block fetches it; its repeats take the same slot
    first = tl.min(tl.where((wanted[:, None] == wanted[None, :]) & in_w[None, :], w[None, :], W_PAD), 1)
    new = (first == w) & ~hit & (wanted >= 0)
    # slots in order of last use (slots held by this pass's picks, then padding, last; ties by slot): the n-th new
    # block goes to the n-th
    last = tl.where(tl.max(held.to(tl.int32), 0) > 0, 0x7FFFFFFFFFFFFFFF, used)
    last = tl.where(in_s, last, 0x7FFFFFFFFFFFFFFF)
    earlier = (last[None, :] < last[:, None]) | ((last[None, :] == last[:, None]) & (s[None, :] < s[:, None]))
    order = tl.sum(earlier.to(tl.int32), 1)  # [slots]
    new_rank = tl.maximum(tl.cumsum(new.to(tl.int32), 0) - 1, 0)
    victim = tl.sum(tl.where(order[None, :] == new_rank[:, None], s[None, :], 0), 1)  # [picks]
    victim_of_first = tl.sum(tl.where(w[None, :] == first[:, None], victim[None, :], 0), 1)
    slot = tl.where(hit, hit_slot, victim_of_first)

    tl.store(slot_out + offsets, slot.to(tl.int64), mask=in_w)
    tl.store(valid_out + offsets, ok.to(tl.int8), mask=in_w)
    p_pairs = (i_b * kv_heads + i_h).to(tl.int64) * picks + w  # [batch, kv_heads, picks]
    tl.store(source_out + p_pairs, tl.where(new, wanted, -1), mask=in_w)
    tl.store(victim_out + p_pairs, victim.to(tl.int64), mask=in_w)
    tl.debug_barrier()  # every lane has read the tables
    tl.store(slot_blocks + row + victim, wanted, mask=new)
    tl.store(slot_used + row + slot, tl.load(stamp) + tl.zeros_like(wanted), mask=wanted >= 0)


# ---------------------------------------------------------------------------------------------------------
# Layer 2: the public function
# ---------------------------------------------------------------------------------------------------------
def assign_slots(selected, valid, length, slot_blocks, slot_used, stamp):
    """Slots for the picks of one pass, and the blocks to fetch; updates the slot tables in place.

    selected, valid: [batch, q_heads, retrievers, k] block picks and whether each counts (int64, bool).
    length: [batch] real queries of each row (with several retrievers, the picks of retriever r count only where r is
        below it).
    slot_blocks, slot_used: [batch, kv_heads, slots] int64, the block each slot holds (-1: none) and the pass that
        last read it; both updated: fetched blocks take their slots, and every slot a pick reads takes `stamp`.
    stamp: a one-element int64 tensor, the pass's index.
    Returns (slot [batch, q_heads, retrievers, k]: the slot serving each pick; valid, with padding queries' picks
    off; source, victim [batch, kv_heads, group * retrievers * k]: `copy_blocks` pairs from the host store into the
    slots, source -1 where nothing travels).
    """
    batch, q_heads, retrievers, k = selected.shape
    kv_heads, slots = slot_blocks.shape[1:]
    if q_heads % kv_heads or slot_used.shape != slot_blocks.shape or slot_blocks.shape[0] != batch:
        raise ValueError(f"assign_slots: picks {tuple(selected.shape)} do not fit slot tables "
                         f"{tuple(slot_blocks.shape)} and {tuple(slot_used.shape)}.")
    group = q_heads // kv_heads
    picks = group * retrievers * k
    if picks > slots:
        raise ValueError(f"assign_slots: {picks} picks a key/value head need at least as many slots, got {slots}.")
    for name, table in (("slot_blocks", slot_blocks), ("slot_used", slot_used)):
        if table.dtype != torch.long or not table.is_contiguous():
            raise ValueError(f"assign_slots: {name} must be a contiguous int64 tensor.")
    selected, length = selected.long().contiguous(), length.long().contiguous()
    valid_in = valid.contiguous().view(torch.int8) if valid.dtype == torch.bool else valid.to(torch.int8)
    slot = torch.empty_like(selected)
    valid_out = torch.empty(selected.shape, dtype=torch.int8, device=selected.device)
    source = torch.empty(batch, kv_heads, picks, dtype=torch.long, device=selected.device)
    victim = torch.empty_like(source)
    if batch * kv_heads:
        _assign_slots_kernel[(batch * kv_heads,)](
            selected, valid_in, length, slot_blocks, slot_used, stamp.long().reshape(1), slot, valid_out, source,
            victim, slots, kv_heads, GROUP=group, RETRIEVERS=retrievers, K=k,
            W_PAD=triton.next_power_of_2(picks), S_PAD=triton.next_power_of_2(slots), num_warps=4,
        )
    return slot, valid_out.view(torch.bool), source, victim
