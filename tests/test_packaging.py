"""How the project installs and is documented: the wheel holds one top-level package, `landmark_llama`, and nothing
generic (`kernels`, `tools`, `train`); the documented commands run from any directory; the README's Quick start
scores only real tokens; the test summary says why the GPU tests skip."""

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from landmark_llama.tools.convert_llama import convert_llama
from landmark_llama.tools.tiny_llama import build_tiny_llama

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_landmark_llama_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("landmark_llama-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"landmark_llama"}
    for module in ("modeling_landmark_llama.py", "configuration_landmark_llama.py", "cache_landmark_llama.py",
                   "kernels/landmark_attention.py", "tools/convert_llama.py"):
        assert f"landmark_llama/{module}" in names
    assert not any(name.startswith("landmark_llama/tests/") for name in names)


def test_documented_commands_name_the_installed_package():
    """Issue 16.11: `python -m tools.x` works only from the repository root, `python -m landmark_llama.tools.x`
    anywhere."""
    documents = [ROOT / "README.md", *ROOT.glob("tools/*.py"), *ROOT.glob("train/**/*.py"),
                 *ROOT.glob("train/**/*.sh")]
    root_only = [f"{path.relative_to(ROOT)}: {match.group()}" for path in documents
                 for match in re.finditer(r"-m (tools|train)\.\w+", path.read_text(encoding="utf-8"))]
    assert root_only == []


def test_commands_run_from_outside_the_repository(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # only the installed package
    result = subprocess.run([sys.executable, "-m", "landmark_llama.tools.convert_llama", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_the_repository_root_does_not_hide_other_kernels_packages(tmp_path):
    """Run from the repository root (where `python -m pytest` and `python -m landmark_llama.tools.x` put it first on
    sys.path), our `kernels/` folder must not shadow another top-level `kernels` package: transformers >= 5.25
    imports Hugging Face's `kernels` as it loads Llama. A stand-in package on PYTHONPATH plays it here, so this holds
    whether or not the real one is installed."""
    stand_in = tmp_path / "site" / "kernels"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("THE_OTHER_ONE = True\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    for code in ("import kernels; assert getattr(kernels, 'THE_OTHER_ONE', False), kernels",
                 "import transformers.models.llama.modeling_llama, landmark_llama.modeling_landmark_llama; "
                 "from landmark_llama.kernels.landmark_attention import landmark_attention"):
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env if "THE_OTHER" in code else None,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]


def quick_start_code():
    """The Python block of the README's Quick start."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_quick_start_loss_scores_only_real_tokens(tmp_path):
    """Issue 16.12: the snippet scored its padding. Run on a tiny model whose tokenizer pads on the left, as Llama's
    does, its loss must be that of each row alone (in fp32, to compare closely)."""
    folder = convert_llama(build_tiny_llama(tmp_path / "llama"), tmp_path / "landmark", block_size=4)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": "left"}))
    assert AutoTokenizer.from_pretrained(folder).padding_side == "left"
    code = quick_start_code().replace('"path/to/landmark-llama"', repr(str(folder)))
    code = code.replace("torch.bfloat16", "torch.float32")
    snippet = {}
    exec(code, snippet)

    model, inputs = snippet["model"], snippet["inputs"]
    assert (inputs.attention_mask == 0).any()  # the batch is padded
    total, targets = 0.0, 0
    for ids, mask in zip(inputs.input_ids, inputs.attention_mask):
        row = ids[mask.bool()][None]
        if row.shape[1] > 1:  # a single token predicts nothing
            with torch.no_grad():
                total += model(row, labels=row).loss.item() * (row.shape[1] - 1)
            targets += row.shape[1] - 1
    assert snippet["out"].loss.item() == pytest.approx(total / targets, abs=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run here")
def test_the_summary_says_why_gpu_tests_skip(pytester):
    """Issue 16.13: the project's pytest configuration and conftest on a test marked `cuda`."""
    pytester.makefile(".cfg", setup=(ROOT / "setup.cfg").read_text(encoding="utf-8"))
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(
        test_gpu="import pytest\n\n\n@pytest.mark.cuda\ndef test_on_the_gpu():\n    pass\n",
        # as tests/test_gpu_model.py: the module's own condition must not hide the reason
        test_gpu_module=textwrap.dedent(
            """
            import pytest

            pytestmark = [pytest.mark.cuda, pytest.mark.skipif(True, reason="needs CUDA and Triton")]


            def test_on_the_gpu():
                pass
            """
        ),
    )
    result = pytester.runpytest_subprocess("test_gpu.py", "test_gpu_module.py")
    result.assert_outcomes(skipped=2)
    reason = "needs a CUDA GPU (run `python -m pytest -m cuda` on a machine with one)"
    result.stdout.fnmatch_lines([f"SKIPPED * test_gpu.py:*: {reason}", f"SKIPPED * test_gpu_module.py:*: {reason}"])
