"""The shipped model, its recipe and the long-context tools (tools/passkey.py, tools/perplexity.py) on CPU."""

import json
import random
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from landmark_llama.modeling_landmark_llama import export_remote_code
from landmark_llama.tools import passkey, perplexity
from landmark_llama.train.recipes import tiny_stdlib


SHIPPED = passkey.SHIPPED_MODEL


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(SHIPPED, trust_remote_code=True)


@pytest.fixture(scope="module")
def shipped():
    return passkey.load_model(SHIPPED, "cpu", torch.float32)


@pytest.fixture(scope="module")
def mute_model(tokenizer, tmp_path_factory):
    """A stock Llama whose logits are all zero: greedy decoding repeats token 0 (`<s>`), so it never answers."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    folder = tmp_path_factory.mktemp("mute")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_shipped_folder_is_small_self_contained_and_current(tmp_path):
    files = {path.name: path.stat().st_size for path in SHIPPED.iterdir()}
    assert sum(files.values()) <= 25 * 2**20, files
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "landmark_llama" and config["auto_map"]
    # The folder's remote code is what the package would export now: a change to the model code must refresh it.
    export_remote_code(tmp_path)
    for path in tmp_path.iterdir():
        assert path.read_text() == (SHIPPED / path.name).read_text(), (
            f"{SHIPPED / path.name} is stale; refresh it with export_remote_code('{SHIPPED}')"
        )
    with safe_open(SHIPPED / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}


def test_shipped_tokenizer_never_makes_the_landmark_from_text(tokenizer):
    landmark = tokenizer.convert_tokens_to_ids("<landmark>")
    ids = tokenizer("the <landmark> token and </s> in text")["input_ids"]
    assert landmark not in ids and ids.count(tokenizer.eos_token_id) == 0
    # digits are single tokens, so a pass key is copied digit by digit
    assert tokenizer.tokenize(" 40123") == ["Ġ", "4", "0", "1", "2", "3"]


@pytest.mark.parametrize("seed", range(6))
def test_prompt_builder_places_the_key_where_asked(tokenizer, seed):
    rng = random.Random(seed)
    length, key, depth = rng.randint(200, 6000), rng.randint(1, passkey.LARGEST_KEY), rng.choice([0, 1, rng.random()])
    prompt = passkey.build_prompt(tokenizer, length, key, depth)
    ids = prompt.input_ids
    per_repeat = len(tokenizer(passkey.FILLER, add_special_tokens=False)["input_ids"]) + 1
    assert length - per_repeat < len(ids) <= length  # as long as whole filler sentences allow
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith(passkey.TASK) and text.endswith(passkey.QUESTION)
    assert text.count(str(key)) == 2
    # the key line begins at key_start, `depth` of the way through the filler (within one repeat)
    line = tokenizer.decode(ids[prompt.key_start:], skip_special_tokens=True)
    assert line.lstrip().startswith(passkey.key_line(key))
    before = tokenizer.decode(ids[:prompt.key_start], skip_special_tokens=True)
    repeats = text.count(passkey.FILLER)
    assert abs(before.count(passkey.FILLER) - depth * repeats) <= 0.5 + 1e-9


def test_prompt_builder_refuses_what_cannot_fit(tokenizer):
    with pytest.raises(ValueError, match="at least .* tokens"):
        passkey.build_prompt(tokenizer, 20, 123, 0.5)
    with pytest.raises(ValueError, match="depth"):
        passkey.build_prompt(tokenizer, 500, 123, 1.5)
    with pytest.raises(ValueError, match="pass key must be in"):
        passkey.build_prompt(tokenizer, 500, 0, 0.5)


def test_first_integer():
    assert passkey.first_integer(" 4512. Remember") == 4512
    assert passkey.first_integer("is the 12 and 13") == 12
    assert passkey.first_integer(" the pass key") is None


def test_a_model_that_never_answers_scores_zero(mute_model):
    model, tokenizer = passkey.load_model(mute_model, "cpu", torch.float32)
    results = passkey.evaluate(model, tokenizer, [300], trials=3, batch_size=2, progress=False)
    assert results[300]["correct"] == 0 and results[300]["accuracy"] == 0.0
    assert all(passkey.first_integer(case["answer"]) is None for case in results[300]["answers"])


def test_shipped_model_finds_the_key_past_its_training_context(shipped):
    model, tokenizer = shipped
    results = passkey.evaluate(model, tokenizer, [1500], trials=4, seed=7, batch_size=4, progress=False)
    assert results[1500]["correct"] >= 3, results[1500]["answers"]


def test_passkey_command_writes_table_json_and_plot(mute_model, tmp_path, capsys):
    passkey.main(["--lengths", "300", "700", "--trials", "2", "--batch_size", "2", "--baseline", str(mute_model),
                  "--output", str(tmp_path)])
    record = json.loads((tmp_path / "passkey.json").read_text())
    assert (tmp_path / "passkey.png").stat().st_size > 1000
    (landmark, landmark_results), (stock, stock_results) = record["results"].items()
    assert "landmark" in landmark and "stock" in stock
    assert set(landmark_results) == set(stock_results) == {"300", "700"}
    assert all(result["accuracy"] == 0 for result in stock_results.values())
    assert record["settings"][str(SHIPPED)]["retrieval_top_k"] == 4
    table = capsys.readouterr().out
    assert re.search(r"\| tiny-stdlib-landmark \(landmark\) \| \d+% \(2\) \| \d+% \(2\) \|", table)


def test_retrieval_perplexity_feeds_pieces_exactly(shipped, monkeypatch):
    """With every block retrieved at true positions the cache path is the training form (the cache's invariant), so
    per-token NLL fed in pieces that do not divide the window equals one training-form pass over it."""
    model, tokenizer = shipped
    stream = perplexity.token_stream(tokenizer, perplexity.held_out_texts(), 1024)
    monkeypatch.setattr(model.config, "retrieval_top_k", 64)
    monkeypatch.setattr(model.config, "retrieval_positions", "true")
    pieces = perplexity.stream_nll(model, stream, 1024, piece=300)
    whole = perplexity.stream_nll(model, stream, 1024)
    assert pieces.isnan().sum() == whole.isnan().sum() == 1
    torch.testing.assert_close(pieces, whole, atol=2e-4, rtol=1e-4, equal_nan=True)
    # and the reference NLL is plain cross entropy of the training form's logits
    with torch.no_grad():
        logits = model(input_ids=stream[None]).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits, stream[1:], reduction="none")
    torch.testing.assert_close(whole[1:], reference, atol=1e-5, rtol=1e-5)


def test_perplexity_averages_every_token_but_the_window_starts():
    nll = torch.rand(2048, dtype=torch.float64) * 3
    nll[::512] = float("nan")  # the first token of each 512 window has no NLL
    scored = [value for position, value in enumerate(nll.tolist()) if position % 512]
    assert perplexity.perplexity(nll, 512) == pytest.approx(2.718281828459045 ** (sum(scored) / len(scored)))
    nll[700] = float("nan")
    with pytest.raises(RuntimeError, match="multiples of the training context"):
        perplexity.perplexity(nll, 512)


def test_perplexity_command_writes_table_json_and_plot(mute_model, tokenizer, tmp_path, capsys):
    perplexity.main(["--lengths", "512", "1024", "--tokens", "1024", "--baseline", str(mute_model),
                     "--output", str(tmp_path)])
    record = json.loads((tmp_path / "perplexity.json").read_text())
    assert (tmp_path / "perplexity.png").stat().st_size > 1000
    rows = record["results"]
    retrieval, truncated, full = (rows[label] for label in rows)
    assert truncated["512"] == truncated["1024"] and 1 < retrieval["512"] < 100
    # the mute model's logits are all zero: every token costs ln(vocab)
    assert full["512"] == pytest.approx(len(tokenizer), rel=1e-4)
    assert "truncated to 512" in capsys.readouterr().out


def test_commands_refuse_bad_input_with_the_message(tmp_path, capsys):
    for command, argv, message in [
        (perplexity, ["--lengths", "700", "--tokens", "1400"], "multiples of the training context 512"),
        (perplexity, ["--lengths", "512", "--tokens", "512", "--text_file", str(tmp_path / "none.txt")],
         "No such file"),
        (perplexity, ["--lengths", "512", "--tokens", "10240000"], "fewer than --tokens 10240000"),
        (passkey, ["--lengths", "30", "--trials", "1"], "length 30 is too short"),
        (passkey, ["--lengths", "600", "--trials", "1", "--retrieval_top_k", "0"], "retrieval_top_k"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            command.main([*argv, "--output", str(tmp_path / "out")])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err


def test_recipe_splits_by_path_and_builds_passkey_windows(tokenizer):
    assert tiny_stdlib.is_held_out("json/decoder.py") == tiny_stdlib.is_held_out("json/decoder.py")
    share = sum(tiny_stdlib.is_held_out(f"pkg/module_{i}.py") for i in range(4000)) / 4000
    assert 0.03 < share < 0.08  # about 13/256
    rng = random.Random(3)
    filler = list(range(10, 600))
    window = tiny_stdlib.passkey_window(tokenizer, filler, 512, rng)
    assert len(window) == 512
    eos = window.index(tokenizer.eos_token_id)
    text = tokenizer.decode(window[:eos], skip_special_tokens=True)
    key = re.search(r"The pass key is (\d+)\.", text).group(1)
    assert text.startswith(passkey.TASK) and text.endswith(f"{passkey.QUESTION} {key}.")
    assert window[eos + 1:] == filler[:512 - eos - 1]


def test_recipe_trains_and_saves_a_loadable_model(tmp_path):
    library = tmp_path / "lib"
    for index in range(40):
        (library / f"pkg{index % 4}").mkdir(parents=True, exist_ok=True)
        body = "\n".join(f"def function_{index}_{line}(x):\n    return x * {line} + {index}\n" for line in range(30))
        (library / f"pkg{index % 4}" / f"module_{index}.py").write_text(body)
    (library / "site-packages").mkdir()
    (library / "site-packages" / "foreign.py").write_text("never read\n")
    (library / "latin1.py").write_bytes(b"caf\xe9 = 1\n")  # not UTF-8: skipped
    output = tmp_path / "model"
    command = [sys.executable, "-m", "landmark_llama.train.recipes.tiny_stdlib", "--output", str(output),
               "--stdlib", str(library), "--cpu", "--max_steps", "3", "--batch_size", "2", "--layers", "1",
               "--hidden_size", "64", "--intermediate_size", "64", "--vocab_size", "400", "--context_length", "128",
               "--block_size", "16"]
    subprocess.run(command, check=True, capture_output=True)
    record = json.loads((output / "training.json").read_text())
    assert record["steps"] == 3 and record["train_files"] + record["held_out_files"] == 40
    model, tokenizer = passkey.load_model(output, "cpu", torch.float32)
    assert type(model).__name__ == "LandmarkLlamaForCausalLM" and model.config.block_size == 16
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    # the baseline run reuses the tokenizer and initial weights of the first run
    subprocess.run([*command[:4], str(tmp_path / "stock"), *command[5:], "--attention", "stock",
                    "--work", f"{output}-work"], check=True, capture_output=True)
    stock, stock_tokenizer = passkey.load_model(tmp_path / "stock", "cpu", torch.float32)
    assert type(stock).__name__ == "LlamaForCausalLM"
    assert stock_tokenizer.get_vocab().items() <= tokenizer.get_vocab().items()
