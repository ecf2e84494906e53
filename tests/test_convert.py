"""tools/convert_llama.py on a tiny random stock Llama written to disk."""

import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from landmark_llama.tools.convert_llama import convert_llama, main
from landmark_llama.tools.tiny_llama import build_tiny_llama


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("stock") / "llama")


def test_conversion_adds_tokens_and_keeps_the_stock_model(stock_folder, tmp_path):
    out = convert_llama(stock_folder, tmp_path / "landmark", block_size=6, retrieval_top_k=3)
    config = json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    stock_tokenizer = AutoTokenizer.from_pretrained(stock_folder)
    assert config["model_type"] == "landmark_llama" and config["block_size"] == 6 and config["retrieval_top_k"] == 3
    assert config["use_cache"] is True  # generation uses the block-retrieval cache
    assert tokenizer.convert_ids_to_tokens(config["landmark_token_id"]) == "<landmark>"
    assert tokenizer.pad_token == "<pad>" and config["pad_token_id"] == tokenizer.pad_token_id
    assert config["vocab_size"] == len(tokenizer) == len(stock_tokenizer) + 2
    assert sorted(p.name for p in out.glob("*.py")) == [
        "block_copy.py", "block_selection.py", "cache_landmark_llama.py", "chunk_write.py",
        "configuration_landmark_llama.py", "landmark_attention.py", "modeling_landmark_llama.py",
        "retrieval_attention.py", "slot_assignment.py"]

    weights = load_file(out / "model.safetensors")
    stock_weights = load_file(stock_folder / "model.safetensors")
    old = len(stock_tokenizer)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(weights[name][:old], stock_weights[name], atol=0, rtol=0)
        for new_row in weights[name][old:]:
            torch.testing.assert_close(new_row, stock_weights[name].mean(0))
    assert {k for k in weights if k not in ("model.embed_tokens.weight", "lm_head.weight")} == {
        k for k in stock_weights if k not in ("model.embed_tokens.weight", "lm_head.weight")}

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    stock = LlamaForCausalLM.from_pretrained(stock_folder).eval()
    ids = tokenizer("the sky is blue", return_tensors="pt").input_ids  # 4 tokens: shorter than one block
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :old], stock(ids).logits, atol=1e-5, rtol=1e-5)
        long_ids = tokenizer(" ".join(["the green grass and the blue sky"] * 4), return_tensors="pt").input_ids
        assert model(long_ids).logits.isfinite().all()


def test_an_existing_token_can_serve_as_landmark(stock_folder, tmp_path):
    out = convert_llama(stock_folder, tmp_path / "landmark", landmark_token_id=7)
    assert json.loads((out / "config.json").read_text())["landmark_token_id"] == 7


def test_bad_inputs_are_refused(stock_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        convert_llama(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="no config.json"):
        convert_llama(tmp_path, tmp_path / "out")

    not_llama = tmp_path / "mistral"
    not_llama.mkdir()
    (not_llama / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="not a Llama checkpoint: config.json has model_type='mistral'"):
        convert_llama(not_llama, tmp_path / "out")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((stock_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle files can run code"):
        convert_llama(pickled, tmp_path / "out")

    with pytest.raises(ValueError, match="outside the vocabulary"):
        convert_llama(stock_folder, tmp_path / "out", landmark_token_id=10_000)
    assert not (tmp_path / "out").exists()


def test_existing_model_is_kept_unless_overwrite(stock_folder, tmp_path):
    out = convert_llama(stock_folder, tmp_path / "landmark", block_size=6)
    before = (out / "config.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a model"):
        convert_llama(stock_folder, out, block_size=12)
    assert (out / "config.json").read_text() == before
    convert_llama(stock_folder, out, block_size=12, overwrite=True)
    assert json.loads((out / "config.json").read_text())["block_size"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["landmark"]  # no staging folders left behind


def test_a_failed_write_leaves_nothing_half_written(stock_folder, tmp_path, monkeypatch):
    out = convert_llama(stock_folder, tmp_path / "landmark", block_size=6)
    before = sorted(p.name for p in out.iterdir())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_llama(stock_folder, out, block_size=12, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        convert_llama(stock_folder, tmp_path / "fresh")
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "config.json").read_text())["block_size"] == 6
    assert [p.name for p in tmp_path.iterdir()] == ["landmark"]


def test_folders_that_hold_anything_but_a_conversion_are_never_replaced(stock_folder, tmp_path):
    """Issue 16.6: --overwrite used to delete a non-empty folder of unrelated files."""
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "thesis.txt").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds no landmark-llama model"):
            convert_llama(stock_folder, unrelated, block_size=6, overwrite=overwrite)
    assert [p.name for p in unrelated.iterdir()] == ["thesis.txt"]

    out = convert_llama(stock_folder, tmp_path / "landmark", block_size=6)
    (out / "my_results.json").write_text("{}")  # a user's file inside an earlier conversion
    with pytest.raises(FileExistsError, match="my_results.json"):
        convert_llama(stock_folder, out, block_size=12, overwrite=True)
    assert (out / "my_results.json").exists() and json.loads((out / "config.json").read_text())["block_size"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landmark", "notes"]


def test_converted_folders_get_the_usual_permissions(stock_folder, tmp_path):
    """Issue 16.6: the staging folder's mode 0700 used to become the model folder's."""
    import os

    umask = os.umask(0o022)
    try:
        out = convert_llama(stock_folder, tmp_path / "landmark", block_size=6)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755


def test_literal_landmark_text_is_never_the_landmark_token(stock_folder, tmp_path):
    """Issue 16.7: a document about this model that contains "<landmark>" must tokenize as text."""
    out = convert_llama(stock_folder, tmp_path / "landmark", block_size=6)
    tokenizer = AutoTokenizer.from_pretrained(out)
    landmark_id = json.loads((out / "config.json").read_text())["landmark_token_id"]
    ids = tokenizer("the sky is blue <landmark> the sea is deep").input_ids
    assert landmark_id not in ids and len(ids) == 9  # "<landmark>" is one unknown word for this word-level model
    assert tokenizer.convert_tokens_to_ids("<landmark>") == landmark_id  # the token itself still exists
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        model(torch.tensor([ids]))  # the model accepts what its tokenizer makes of the text


def test_command_line_errors_print_the_message_alone(stock_folder, tmp_path, capsys):
    """Issue 16.10: the command printed a traceback; the function still raises."""
    not_llama = tmp_path / "mistral"
    not_llama.mkdir()
    (not_llama / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    taken = convert_llama(stock_folder, tmp_path / "taken", block_size=6)
    capsys.readouterr()
    for argv, message in [
        ([str(tmp_path / "missing"), str(tmp_path / "out")], "is not a folder"),
        ([str(not_llama), str(tmp_path / "out")], "not a Llama checkpoint: config.json has model_type='mistral'"),
        ([str(stock_folder), str(taken)], "already holds a model; pass overwrite=True (--overwrite)"),
        ([str(stock_folder), str(tmp_path / "out"), "--block_size", "1"], "block_size must be at least 2"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    with pytest.raises(StrictDataclassClassValidationError, match="block_size must be at least 2"):
        convert_llama(stock_folder, tmp_path / "out", block_size=1)
    assert not (tmp_path / "out").exists()


def test_a_config_error_prints_one_line_not_the_validator_chain(stock_folder, tmp_path):
    """A value the config refuses raised inside the config's validator: the command shows that error's message."""
    result = subprocess.run(
        [sys.executable, "-m", "landmark_llama.tools.convert_llama", str(stock_folder), str(tmp_path / "out"),
         "--block_size", "1"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "error: block_size must be at least 2 (one regular token and the landmark), got 1.")
    assert "Traceback" not in result.stderr and "validation error" not in result.stderr
