"""tools/hub.py against a local HTTP server speaking the Hub's API (tests/hub_server.py): the real huggingface_hub
client uploads a weight diff, downloads it and recovers the model bit for bit; private repos, branches, commit
messages; the token is sent but never shown; bad folders, busy destinations and wrong tokens are refused with
nothing half-written."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file

from landmark_llama.tools import hub, weight_diff
from landmark_llama.tools.convert_llama import convert_llama
from landmark_llama.tools.tiny_llama import build_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402


TOKEN = "hf_test_token_c0ffee_do_not_print"
_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny stock base, the landmark model converted from it, and the diff of the two."""
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_llama(root / "base")
    tuned = convert_llama(base, root / "tuned", block_size=8)
    diff = weight_diff.make(base, tuned, root / "diff")
    return base, tuned, diff


@pytest.fixture
def hub_server():
    with HubServer(token=TOKEN) as server:
        yield server
    assert server.unknown == [], f"the client called routes the test Hub does not serve: {server.unknown}"


@pytest.fixture
def hub_env(monkeypatch, tmp_path, hub_server):
    """Endpoint and token in the environment, a fresh HF_HOME, telemetry off, online; returns the environment."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # huggingface_hub reads these at import: point the already imported copy at the fresh home too
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return dict(os.environ)


def _weights(folder):
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _files(folder):
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def _assert_same_model(recovered, tuned):
    got, expected = _weights(recovered), _weights(tuned)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
    assert (Path(recovered) / "config.json").read_bytes() == (Path(tuned) / "config.json").read_bytes()


def _leftovers(parent, name):
    return sorted(path.name for path in Path(parent).glob(f".{name}.*"))


@pytest.mark.parametrize("xet_pipeline", [True, False], ids=["pipelined-upload", "single-commit-upload"])
def test_diff_round_trip_recovers_the_model_bit_for_bit(models, hub_env, hub_server, tmp_path, monkeypatch,
                                                        xet_pipeline):
    # huggingface_hub 2.x streams uploads through its pipeline when hf_xet is installed and falls back to one
    # create_commit otherwise (the 1.x path): serve both
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", not xet_pipeline)
    base, tuned, diff = models
    url = hub.upload(diff, "user/tiny-landmark-diff")
    assert url.startswith(f"{hub_server.url}/user/tiny-landmark-diff/commit/")

    downloaded = hub.download("user/tiny-landmark-diff", tmp_path / "downloaded")
    assert downloaded == tmp_path / "downloaded"
    assert _files(downloaded) == _files(diff)  # no .cache left behind, every file byte for byte
    assert _leftovers(tmp_path, "downloaded") == []

    recovered = weight_diff.recover(base, downloaded, tmp_path / "recovered")
    _assert_same_model(recovered, tuned)
    commits = [request for request in hub_server.requests if "/commit/" in request.path]
    assert commits and all(request.headers.get("authorization") == f"Bearer {TOKEN}" for request in commits)


def test_private_repo_needs_the_token(models, hub_env, hub_server, tmp_path, monkeypatch):
    _, _, diff = models
    hub.upload(diff, "user/private-diff", private=True)
    assert hub_server.repos["user/private-diff"].private

    monkeypatch.delenv("HF_TOKEN")  # anonymous: no env token and no stored login in the fresh HF_HOME
    with pytest.raises(HfHubHTTPError) as error:
        hub.download("user/private-diff", tmp_path / "anonymous")
    assert error.value.response.status_code == 401
    assert not (tmp_path / "anonymous").exists() and _leftovers(tmp_path, "anonymous") == []

    downloaded = hub.download("user/private-diff", tmp_path / "with-token", token=TOKEN)
    assert _files(downloaded) == _files(diff)


def test_branch_upload_and_download_with_commit_message(models, hub_env, hub_server, tmp_path):
    _, tuned, diff = models
    hub.upload(tuned, "user/branched")  # main holds the full model
    url = hub.upload(diff, "user/branched", revision="diff-v1", commit_message="Add the weight diff, take 1")
    repo = hub_server.repos["user/branched"]
    assert set(repo.branches) == {"main", "diff-v1"}
    head = repo.commits[repo.branches["diff-v1"]]
    assert head.message == "Add the weight diff, take 1"
    assert url.endswith(f"/commit/{repo.branches['diff-v1']}")
    assert repo.commits[repo.branches["main"]].message == "Upload landmark-llama model"

    branch = hub.download("user/branched", tmp_path / "branch", revision="diff-v1")
    assert weight_diff.MANIFEST in _files(branch)
    assert _files(branch) == {**_files(tuned), **_files(diff)}  # the branch started from main
    main = hub.download("user/branched", tmp_path / "main")
    assert _files(main) == _files(tuned)

    hub.upload(diff, "user/branched", revision="diff-v1", commit_message="take 2")  # the branch exists: reused
    assert repo.commits[repo.branches["diff-v1"]].message == "take 2"


def test_full_landmark_folder_uploads(models, hub_env, hub_server, tmp_path):
    _, tuned, _ = models
    hub.upload(tuned, "user/tiny-landmark")
    downloaded = hub.download("user/tiny-landmark", tmp_path / "model")
    _assert_same_model(downloaded, tuned)
    assert _files(downloaded) == _files(tuned)


def test_token_is_sent_but_never_shown(models, hub_env, hub_server, tmp_path, caplog):
    _, _, diff = models
    cli = [sys.executable, "-m", "landmark_llama.tools.hub"]
    uploaded = subprocess.run(
        [*cli, "upload", str(diff), "--repo-id", "user/cli-diff", "--private", "--commit-message", "from the CLI"],
        env=hub_env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert uploaded.returncode == 0, uploaded.stderr
    downloaded = subprocess.run(
        [*cli, "download", "--repo-id", "user/cli-diff", "--out", str(tmp_path / "cli-out")],
        env=hub_env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert downloaded.returncode == 0, downloaded.stderr
    for run in (uploaded, downloaded):
        assert TOKEN not in run.stdout and TOKEN not in run.stderr
    assert uploaded.stdout.strip().startswith(f"{hub_server.url}/user/cli-diff/commit/")
    assert downloaded.stdout.strip() == str(tmp_path / "cli-out")
    assert _files(tmp_path / "cli-out") == _files(diff)
    assert hub_server.repos["user/cli-diff"].private

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hub.upload(diff, "user/logged", commit_message="logged")
    hub.download("user/logged", tmp_path / "logged")
    assert caplog.records  # the client and the server did log at DEBUG
    assert TOKEN not in caplog.text
    assert f"Bearer {TOKEN}" in hub_server.authorizations()


def test_plain_folder_is_refused(hub_env, hub_server, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="neither a weight diff .* nor a landmark-llama model folder"):
        hub.upload(plain, "user/plain")
    assert hub_server.requests == []  # refused before anything was sent


def test_download_into_non_empty_folder_is_refused(models, hub_env, hub_server, tmp_path):
    _, _, diff = models
    hub.upload(diff, "user/diff")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        hub.download("user/diff", busy)
    assert _files(busy) == {"mine.txt": b"keep me"}
    assert _leftovers(tmp_path, "busy") == []

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _files(hub.download("user/diff", empty)) == _files(diff)  # an empty folder is fine


def test_wrong_token_is_refused_and_nothing_is_left(models, hub_env, hub_server, tmp_path, monkeypatch):
    _, _, diff = models
    with pytest.raises(HfHubHTTPError) as error:
        hub.upload(diff, "user/diff", token="hf_wrong")
    assert error.value.response.status_code == 401
    assert hub_server.repos == {}

    hub.upload(diff, "user/diff")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HfHubHTTPError) as error:
        hub.download("user/diff", tmp_path / "out")
    assert error.value.response.status_code == 401
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []

    with pytest.raises(HfHubHTTPError):  # a repo that does not exist: same, nothing written
        hub.download("user/missing", tmp_path / "missing", token=TOKEN)
    assert not (tmp_path / "missing").exists() and _leftovers(tmp_path, "missing") == []


def test_cli_reports_errors_without_traceback(hub_env, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    result = subprocess.run([sys.executable, "-m", "landmark_llama.tools.hub", "upload", str(plain), "--repo-id",
                             "user/plain"], env=hub_env, capture_output=True, text=True, cwd=_ROOT, timeout=300)
    assert result.returncode == 1
    assert result.stdout == "" and "neither a weight diff" in result.stderr and TOKEN not in result.stderr
