"""Copies of whole cache blocks between stores whose block indices live on the device, as one Triton kernel.

The offloaded retrieval cache (`cache_landmark_llama.OffloadedCacheLayer`) keeps the keys and values of complete
blocks in host memory and moves blocks whose indices the GPU computed (the blocks a decoding step retrieved, the
blocks a pass completed). A copy that the host had to plan would first read those indices back, which a captured
CUDA graph cannot do; this kernel reads them on the device and moves the blocks itself, reading or writing pinned
host memory through unified virtual addressing (no staging copy, no host read).

Stores are [batch, blocks, heads, block_size, head_dim] with each block's [block_size, head_dim] contiguous; the
index tensors are [batch, heads, pairs]: pair p of row b and head h copies source block `src_blocks[b, h, p]` to
destination block `dst_blocks[b, h, p]`, or nothing where the source index is -1.
"""

try:  # guarded like landmark_attention.py: the remote-code import check must not demand Triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("block_copy needs Triton (pip install triton); the CPU path copies with PyTorch.") from error

__all__ = ["copy_blocks"]

TILE = 1024  # elements a program moves (a block takes several programs)


# ---------------------------------------------------------------------------------------------------------
# Layer 1: the Triton kernel
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _copy_blocks_kernel(
    src, dst, src_blocks, dst_blocks,
    stride_sb, stride_sc, stride_sh,
    stride_db, stride_dc, stride_dh,
    stride_ib, stride_ih,
    heads, BLOCK_ELEMENTS: tl.constexpr, TILE: tl.constexpr,
):
    """Tile program_id(2) of pair program_id(0) of row and head program_id(1): each program moves one tile, so that
    all of a block's reads are in flight at once (reads of host memory over PCIe wait microseconds each)."""
    i_p = tl.program_id(0)
    i_b = tl.program_id(1) // heads
    i_h = tl.program_id(1) % heads
    p_index = i_b.to(tl.int64) * stride_ib + i_h * stride_ih + i_p
    source = tl.load(src_blocks + p_index)
    if source >= 0:
        target = tl.load(dst_blocks + p_index)
        p_src = src + i_b.to(tl.int64) * stride_sb + source * stride_sc + i_h * stride_sh
        p_dst = dst + i_b.to(tl.int64) * stride_db + target * stride_dc + i_h * stride_dh
        offsets = tl.program_id(2) * TILE + tl.arange(0, TILE)
        inside = offsets < BLOCK_ELEMENTS
        tl.store(p_dst + offsets, tl.load(p_src + offsets, mask=inside), mask=inside)


# ---------------------------------------------------------------------------------------------------------
# Layer 2: the launcher and the public function
# ---------------------------------------------------------------------------------------------------------
def _check_inputs(src, dst, src_blocks, dst_blocks):
    if src.dim() != 5 or dst.dim() != 5 or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
        raise ValueError(
            "copy_blocks: stores must be [batch, blocks, heads, block_size, head_dim] alike but for their block "
            f"counts, got {tuple(src.shape)} and {tuple(dst.shape)}."
        )
    if src.dtype != dst.dtype:
        raise ValueError(f"copy_blocks: stores must share a dtype, got {src.dtype} and {dst.dtype}.")
    for name, store in (("src", src), ("dst", dst)):
        if store.stride(4) != 1 or store.stride(3) != store.shape[4]:
            raise ValueError(f"copy_blocks: each block of {name} must be contiguous (strides {store.stride()}).")
    expected = (src.shape[0], src.shape[2])
    if src_blocks.shape != dst_blocks.shape or src_blocks.dim() != 3 or tuple(src_blocks.shape[:2]) != expected:
        raise ValueError(
            f"copy_blocks: src_blocks and dst_blocks must both be [batch, heads, pairs] = [{expected[0]}, "
            f"{expected[1]}, pairs], got {tuple(src_blocks.shape)} and {tuple(dst_blocks.shape)}."
        )


def copy_blocks(src, dst, src_blocks, dst_blocks):
    """dst[b, dst_blocks[b, h, p], h] = src[b, src_blocks[b, h, p], h] for every pair whose source index is not -1.

    src, dst: [batch, blocks, heads, block_size, head_dim] stores on the device or in pinned host memory.
    src_blocks, dst_blocks: [batch, heads, pairs] integer block indices on the device; no two pairs may share a
    destination block. Indices are not bounds-checked on the device: the caller computes them inside its stores.
    """
    _check_inputs(src, dst, src_blocks, dst_blocks)
    src_blocks, dst_blocks = src_blocks.long().contiguous(), dst_blocks.long().contiguous()
    batch, _, heads, block_size, head_dim = src.shape
    pairs = src_blocks.shape[2]
    if batch * heads * pairs == 0:
        return
    elements = block_size * head_dim
    tile = min(TILE, triton.next_power_of_2(elements))
    _copy_blocks_kernel[(pairs, batch * heads, triton.cdiv(elements, tile))](
        src, dst, src_blocks, dst_blocks,
        src.stride(0), src.stride(1), src.stride(2),
        dst.stride(0), dst.stride(1), dst.stride(2),
        src_blocks.stride(0), src_blocks.stride(1),
        heads, BLOCK_ELEMENTS=elements, TILE=tile, num_warps=4,
        enable_fp_fusion=True,  # explicit: Triton 3.10 turns the default off
    )
