"""The paper's released weight-diff format, recovered and converted by tools/weight_diff.py.

`data/paper_diff/` was made by the authors' own code (`llama_mem.py`, `train.py`'s resize and `weight_diff.py` from
epfml/landmark-attention, with transformers 4.28.1): a tiny base Llama, the diff of a landmark model fine-tuned from
it, and that model's logits; `paper_reference/make_paper_diff.py` says how and `paper_reference/regenerate.sh` remakes
it. The diff's weights are a pytorch_model.bin, read with torch's weights-only unpickler.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from landmark_llama.tools import weight_diff

DATA = Path(__file__).parent / "data" / "paper_diff"


def test_the_papers_diff_recovers_to_a_landmark_llama_folder_with_their_logits(tmp_path):
    out = weight_diff.import_paper(DATA / "base", DATA / "diff", tmp_path / "model")
    with safe_open(DATA / "expected.safetensors", "pt") as f:
        prompt, expected, mem_id = f.get_tensor("prompt"), f.get_tensor("logits"), int(f.metadata()["mem_id"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "landmark_llama" and config["block_size"] == 8
    assert config["landmark_token_id"] == mem_id == AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(
        "<landmark>")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(prompt).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_a_wrong_base_or_a_stock_folder_is_refused(tmp_path):
    wrong_base = tmp_path / "base"
    shutil.copytree(DATA / "base", wrong_base)
    from safetensors.torch import load_file, save_file

    weights = load_file(wrong_base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 0.1
    save_file(weights, wrong_base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="checksum_psum.txt"):
        weight_diff.import_paper(wrong_base, DATA / "diff", tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="not a diff in the paper's format"):
        weight_diff.import_paper(DATA / "base", DATA / "base", tmp_path / "model")
