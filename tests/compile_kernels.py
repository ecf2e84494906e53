"""Compile the landmark kernels (training form: every shipped tile config; inference: the retrieval attention, block
selection and block copy kernels) for a Hopper GPU (sm_90) with the installed Triton, without a GPU.

    python tests/compile_kernels.py     (prints one JSON line per compiled kernel)

The CPU tests run the kernels through TRITON_INTERPRET=1, which never enters Triton's compiler; this script
runs the whole pipeline (TTIR, TTGIR, LLVM, PTX, cubin) for every shipped tile config, as a launch on an H100
would specialise it (16-byte aligned pointers and strides, the launcher's compile options). It must run in a
process without TRITON_INTERPRET: test_kernel_compile.py starts it.
"""

import json
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import landmark_llama.kernels.block_copy as block_copy
import landmark_llama.kernels.block_selection as block_selection
import landmark_llama.kernels.chunk_write as chunk_write
import landmark_llama.kernels.landmark_attention as lk
import landmark_llama.kernels.retrieval_attention as retrieval
import landmark_llama.kernels.slot_assignment as slot_assignment

TARGET = GPUTarget("cuda", 90, 32)
TENSOR_ARGS = {"q", "k", "v", "o", "do", "dq", "dk", "dv"}
FP32_TENSOR_ARGS = {"lse", "delta"}
KERNELS = {
    "fwd": (lk._landmark_fwd_kernel, lk._FWD_CONFIGS),
    "dkdv": (lk._landmark_bwd_dkdv_kernel, lk._DKDV_CONFIGS),
    "dq": (lk._landmark_bwd_dq_kernel, lk._DQ_CONFIGS),
}
# (dtype, head_dim, block_size (the slot), block_tokens, q_heads, kv_heads, every config?)
# (fp32 is left out: its IEEE dots unroll into scalar FMA loops that take minutes to compile)
CASES = [
    ("bf16", 128, 64, 64, 32, 32, True),
    ("fp16", 80, 128, 128, 8, 2, False),
    ("bf16", 64, 16, 16, 32, 8, False),
    ("bf16", 128, 64, 51, 32, 8, False),  # the paper's block 51 in slots of 64
]


def compile_one(fn, dtype, head_dim, block_size, constants, num_warps, num_stages):
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in TENSOR_ARGS or name in FP32_TENSOR_ARGS:
            signature[name] = "*" + (dtype if name in TENSOR_ARGS else "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride"):
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name.startswith(("n_", "tune_")) or name == "q_start":
            signature[name] = "i32"  # lengths, positions and the autotuner's size buckets are never specialised on
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "constexpr"
    d_pad = max(16, triton.next_power_of_2(head_dim))
    constants = dict(constants, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, UPCAST_DOT=False,
                     BLOCK_TOKENS=constants.get("BLOCK_TOKENS", block_size),
                     DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(source, target=TARGET,
                          options=dict(num_warps=num_warps, num_stages=num_stages, **lk.COMPILE_OPTIONS))


def report(kernel, dtype, head_dim, block_size, block_tokens, config, compiled):
    print(json.dumps(dict(kernel=kernel, dtype=dtype, head_dim=head_dim, block_size=block_size,
                          block_tokens=block_tokens, config=config,
                          cubin_bytes=len(compiled.asm["cubin"]), fma=compiled.asm["ptx"].count("fma.rn.f32"),
                          shared=compiled.metadata.shared)), flush=True)


# The inference kernels at the Llama 3 8B shape (bf16, 32 query heads over 8 of 128, block 64, top-k 4): pointer
# element types by argument (the rest are i32, or fp32 where named), and the constants a launch passes.
FLOAT_ARGS = {"sm_scale", "scale", "tie_tolerance"}


def _block_scores(num_warps, **constants):
    """The landmark scoring kernel at the Llama 3 8B shape with stingy positions and bf16 keys, in one layout."""
    pointers = dict(q="bf16", landmarks="bf16", in_block="bf16", row_start="i64", inv_freq="fp32", scratch="fp32",
                    tile_stats="fp32")
    constants = dict(KV_GROUP=4, STINGY=True, BLOCK_SIZE=64, HALF=64, SPLIT=True, UPCAST_DOT=False, **constants)
    return block_selection._landmark_scores_kernel, pointers, constants, num_warps


INFERENCE_KERNELS = {
    "retrieval_attention": (
        retrieval._retrieval_attention_kernel,
        dict(q="bf16", keys="bf16", values="bf16", local_keys="bf16", local_values="bf16", table="i64", starts="i64",
             row_start="i64", inv_freq="fp32", out="bf16", partial="bf16"),
        dict(KV_GROUP=4, BLOCK_SIZE=64, BLOCK_PAD=64, HALF=64, HALF_PAD=64, SPLITS=1), 8),
    "retrieval_attention_spread": (  # a decoding step: each query's blocks over 8 programs, then merged
        retrieval._retrieval_attention_kernel,
        dict(q="bf16", keys="bf16", values="bf16", local_keys="bf16", local_values="bf16", table="i64", starts="i64",
             row_start="i64", inv_freq="fp32", out="bf16", partial="fp32"),
        dict(KV_GROUP=4, BLOCK_SIZE=64, BLOCK_PAD=64, HALF=64, HALF_PAD=64, SPLITS=8), 8),
    "retrieval_attention_tiles": (  # a prefill pass: tiles of 16 queries on the tensor cores, per-query shares
        retrieval._retrieval_attention_tiles_kernel,
        dict(q="bf16", keys="bf16", values="bf16", local_keys="bf16", local_values="bf16", table="i64", starts="i64",
             row_start="i64", inv_freq="fp32", out="bf16", gates="fp32", mixes="fp32"),
        dict(KV_GROUP=4, BLOCK_SIZE=64, BLOCK_PAD=64, HALF=64, HALF_PAD=64, BLOCK_M=retrieval.QUERY_TILE,
             SHARES=True, DOT_PRECISION="tf32", UPCAST_DOT=False, STAGES=retrieval.TILES_STAGES), 4),
    "retrieval_attention_tiles_one_row": (  # a prefill chunk of per-chunk retrieval: the table's one row
        retrieval._retrieval_attention_tiles_kernel,
        dict(q="bf16", keys="bf16", values="bf16", local_keys="bf16", local_values="bf16", table="i64", starts="i64",
             row_start="i64", inv_freq="fp32", out="bf16", gates="bf16", mixes="bf16"),
        dict(KV_GROUP=4, BLOCK_SIZE=64, BLOCK_PAD=64, HALF=64, HALF_PAD=64, BLOCK_M=retrieval.QUERY_TILE,
             SHARES=False, DOT_PRECISION="tf32", UPCAST_DOT=False, STAGES=retrieval.TILES_STAGES), 4),
    "retrieved_shares": (  # the per-query retrieved blocks of a prefill pass, block by block
        retrieval._retrieved_shares_kernel,
        dict(q="bf16", keys="bf16", values="bf16", order="i64", sorted_segment="i64", firsts="i64", starts="i64",
             inv_freq="fp32", gates="fp32", mixes="fp32"),
        dict(BLOCK_SIZE=64, BLOCK_PAD=64, HALF=64, HALF_PAD=64, PAIRS=retrieval.SHARE_PAIRS["dense"],
             DOT_PRECISION="tf32", UPCAST_DOT=False), retrieval.TILES_WARPS),
    "retrieval_merge": (
        retrieval._merge_splits_kernel, dict(partial="fp32", out="bf16"), dict(HALF=64, HALF_PAD=64, SPLITS=8), 1),
    "block_scores": _block_scores(  # a pass of 3-15 queries a head
        block_selection.ONE_HEAD_DECODE[1], HEADS=1, BLOCK_M=16, TILE=32, DK=8, USE_DOT=False, NATIVE_DOT=False,
        LOOP_TILES=True),
    "block_scores_decoding": _block_scores(  # two queries a head, the settings shipped
        block_selection.ONE_HEAD_DECODE[1], HEADS=1, BLOCK_M=2, TILE=block_selection.ONE_HEAD_DECODE[0], DK=64,
        USE_DOT=False, NATIVE_DOT=False, LOOP_TILES=True),
    "block_scores_decoding_tensor_cores": _block_scores(  # two queries of a group's four heads together
        block_selection.SCORE_WARPS["decoding"], HEADS=4, BLOCK_M=16, TILE=block_selection.DECODE_SCORE_TILE, DK=64,
        USE_DOT=True, NATIVE_DOT=True, LOOP_TILES=True),
    "block_scores_tensor_cores": _block_scores(  # a prefill pass
        block_selection.SCORE_WARPS["prefill"], HEADS=1, BLOCK_M=64, TILE=64, DK=64, USE_DOT=True, NATIVE_DOT=True,
        LOOP_TILES=False),
    "block_top_k": (
        block_selection._top_blocks_kernel,
        dict(scratch="fp32", tile_stats="fp32", row_start="i64", selected="i64", valid="i1", starts="i64"),
        dict(STINGY=True, BLOCK_SIZE=64, K_PAD=4, TILE=64, NUM_TILES=64, GROUP_TILES=8, ONE_PASS=True), 1),
    "chunk_probabilities": (  # per-chunk selection: each query's softmax and the blocks' highest probability
        block_selection._chunk_probabilities_kernel,
        dict(scratch="fp32", row_start="i64", lengths="i64", norms="fp32", chunk_scores="fp32", chunk_stats="fp32"),
        dict(BLOCK_SIZE=64, TILE=block_selection.DECODE_SCORE_TILE, WIDE=block_selection.CHUNK_WIDE_BLOCKS), 4),
    "query_norms": (  # per-chunk selection: a query's softmax normaliser
        block_selection._query_norms_kernel, dict(scratch="fp32", row_start="i64", lengths="i64", norms="fp32"),
        dict(BLOCK_SIZE=64, WIDE=block_selection.CHUNK_WIDE_BLOCKS), 4),
    "chunk_write": (
        chunk_write._write_chunk_kernel,
        dict(q="bf16", k="bf16", v="bf16", q_out="bf16", key_store="bf16", value_store="bf16", landmarks="bf16",
             in_block="bf16", row_start="i64", inv_freq="fp32"),
        dict(KV_GROUP=4, BLOCK_SIZE=64, HALF=64, HALF_PAD=64, POSITIONS=2, IN_BLOCK=True), 4),
    "block_copy": (
        block_copy._copy_blocks_kernel,
        dict(src="bf16", dst="bf16", src_blocks="i64", dst_blocks="i64"),
        dict(BLOCK_ELEMENTS=64 * 128, TILE=block_copy.TILE), 4),
    "slot_assignment": (  # a decoding step's 32 picks a key/value head over its 64 slots
        slot_assignment._assign_slots_kernel,
        dict(selected="i64", valid="i8", length="i64", slot_blocks="i64", slot_used="i64", stamp="i64",
             slot_out="i64", valid_out="i8", source_out="i64", victim_out="i64"),
        dict(GROUP=4, RETRIEVERS=2, K=4, W_PAD=32, S_PAD=64), 4),
}


def compile_inference_kernel(fn, pointers, constants, num_warps, maxnreg=None):
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return triton.compile(ASTSource(fn, signature, constants), target=TARGET,
                          options=dict(num_warps=num_warps, num_stages=1, enable_fp_fusion=True, maxnreg=maxnreg))


def main():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"
    for dtype, head_dim, block_size, block_tokens, q_heads, kv_heads, every_config in CASES:
        heads = dict(Q_HEADS=q_heads, KV_HEADS=kv_heads, KV_GROUP=q_heads // kv_heads, BLOCK_TOKENS=block_tokens)
        for name, (fn, configs) in KERNELS.items():
            valid = lk._prune(configs, {}, BLOCK_SIZE=block_size)
            for cfg in valid if every_config else valid[:1]:
                compiled = compile_one(fn, dtype, head_dim, block_size, dict(heads, **cfg.kwargs), cfg.num_warps,
                                       cfg.num_stages)
                report(name, dtype, head_dim, block_size, block_tokens, str(cfg), compiled)
        compiled = compile_one(lk._landmark_bwd_preprocess_kernel, dtype, head_dim, block_size,
                               dict(Q_HEADS=q_heads, BLOCK_M=64), 4, 2)
        report("preprocess", dtype, head_dim, block_size, block_tokens, "BLOCK_M: 64", compiled)
    for name, (fn, pointers, constants, num_warps) in INFERENCE_KERNELS.items():
        compiled = compile_inference_kernel(fn, pointers, constants, num_warps)
        print(json.dumps(dict(kernel=name, cubin_bytes=len(compiled.asm["cubin"]), shared=compiled.metadata.shared)),
              flush=True)


if __name__ == "__main__":
    main()
