"""save_pretrained, then AutoModelForCausalLM.from_pretrained(trust_remote_code=True) where the project is NOT
importable."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from tiny_models import BLOCK_PROJECT_IMPORTS, random_ids, tiny_landmark_model

# Runs in a fresh interpreter: the project's import names are blocked, so every class must come from the folder.
LOADER = BLOCK_PROJECT_IMPORTS + textwrap.dedent(
    """
    import importlib.util, json, sys
    try:
        importlib.util.find_spec("landmark_llama")
        raise SystemExit("the project is importable; the test would prove nothing")
    except ImportError:
        pass
    for generic in ("kernels", "tools", "train", "modeling_landmark_llama", "tiny_models"):
        spec = importlib.util.find_spec(generic)
        assert spec is None or sys.argv[5] not in str(spec.origin), f"{generic} resolves into the project"

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder, resaved, result = sys.argv[1:4]
    ids = torch.tensor(json.loads(sys.argv[4]))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    for obj in (config, base, model):
        assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
    print(type(config).__name__, type(base).__name__, type(model).__name__)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(resaved)  # a remote-code model saves a folder that loads again
    again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True)
    with torch.no_grad():
        save_file({"logits": logits, "again": again(ids).logits, "hidden": base(ids).last_hidden_state}, result)
    """
)


def test_saved_folder_loads_as_remote_code_in_a_clean_process(tmp_path):
    model = tiny_landmark_model(block_size=4)
    ids = random_ids(2, 23)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_landmark_llama.LandmarkLlamaForCausalLM"
    assert "from .kernels" not in (folder / "modeling_landmark_llama.py").read_text()
    assert (folder / "landmark_attention.py").exists() and not list(folder.glob("*.bin"))

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = tmp_path / "logits.safetensors"
    run = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(tmp_path / "resaved"), str(result), json.dumps(ids.tolist()),
         str(Path(__file__).resolve().parents[1])],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LandmarkLlamaConfig LandmarkLlamaModel LandmarkLlamaForCausalLM" in run.stdout

    loaded = load_file(result)
    with torch.no_grad():
        expected = model(ids)
    assert torch.equal(loaded["logits"], expected.logits)
    assert torch.equal(loaded["again"], expected.logits)
    torch.testing.assert_close(loaded["hidden"], model.model(ids).last_hidden_state, atol=0, rtol=0)


def test_hub_import_check_does_not_demand_triton(tmp_path):
    """transformers checks a downloaded folder's top-level imports; Triton must stay optional (CPU machines)."""
    from transformers.dynamic_module_utils import get_imports

    tiny_landmark_model().save_pretrained(tmp_path)
    required = set().union(*(get_imports(path) for path in tmp_path.glob("*.py")))
    assert "triton" not in required
    assert {"torch", "transformers"} <= required
