"""The Triton kernels compile for sm_90 (H100) with the installed Triton, every shipped config of the training
kernels and the inference kernels at a real shape, on a machine without a GPU. The interpreter tests check what the
kernels compute; this checks that the compiler pipeline accepts them (a newer Triton that rejects a construct the
interpreter allows fails here, not on a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import landmark_llama.kernels.landmark_attention as kernel_module

SCRIPT = Path(__file__).with_name("compile_kernels.py")


def test_every_config_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    inference = {row["kernel"]: row for row in rows if "dtype" not in row}
    assert set(inference) == {"retrieval_attention", "retrieval_attention_spread", "retrieval_attention_tiles",
                              "retrieval_attention_tiles_one_row", "retrieved_shares", "retrieval_merge",
                              "block_scores", "block_scores_decoding", "block_scores_decoding_tensor_cores",
                              "block_scores_tensor_cores", "block_top_k", "query_norms", "chunk_probabilities",
                              "chunk_write", "block_copy", "slot_assignment"}
    assert all(row["cubin_bytes"] > 0 for row in inference.values())
    rows = [row for row in rows if "dtype" in row]
    for row in rows:
        assert row["cubin_bytes"] > 0, row
        # the exp2 arguments are multiply-adds: COMPILE_OPTIONS keeps them fused into FMAs
        assert row["fma"] > 0, row

    def case_of(row):
        return row["dtype"], row["head_dim"], row["block_size"], row["block_tokens"]

    cases = {case_of(r) for r in rows}
    assert len(cases) == 4 and ("bf16", 128, 64, 51) in cases  # the last: phantom slots (block 51 in 64)
    for case in cases:
        assert {r["kernel"] for r in rows if case_of(r) == case} == {
            "fwd", "dkdv", "dq", "preprocess"}
    for name, configs in (("fwd", kernel_module._FWD_CONFIGS), ("dkdv", kernel_module._DKDV_CONFIGS),
                          ("dq", kernel_module._DQ_CONFIGS)):
        full = [r for r in rows if r["kernel"] == name and case_of(r) == ("bf16", 128, 64, 64)]
        assert len(full) == len(kernel_module._prune(configs, {}, BLOCK_SIZE=64)), name
