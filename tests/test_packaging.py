"""The wheel installs one top-level package, `landmark_llama`, and nothing generic (`kernels`, `tools`, `train`)."""

import subprocess
import sys
import zipfile
from pathlib import Path

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
