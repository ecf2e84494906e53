"""tools/weight_diff.py: make -> recover round trips bit for bit, memory stays near a tensor, bad inputs are refused
with nothing half-written."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from landmark_llama.tools import weight_diff
from landmark_llama.tools.convert_llama import convert_llama
from landmark_llama.tools.tiny_llama import build_tiny_llama


def _weights(folder):
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _pair(root, dtype, seed=0, shard="60KB", **config):
    """A stock base in `dtype` and a landmark model tuned from it (converted, then every weight nudged)."""
    base = build_tiny_llama(root / "base-build", seed=seed, **config)
    stock = LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    stock.save_pretrained(root / "base", max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "base" / name).write_bytes((base / name).read_bytes())
    (root / "base" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny base\n")
    landmark = convert_llama(root / "base", root / "landmark", block_size=8)
    model = AutoModelForCausalLM.from_pretrained(landmark, trust_remote_code=True, dtype=dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-2)
    model.save_pretrained(root / "tuned", max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "tuned" / name).write_bytes((landmark / name).read_bytes())
    return root / "base", root / "tuned"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_make_then_recover_is_bit_exact(tmp_path, dtype):
    base, tuned = _pair(tmp_path, dtype)
    assert len(list(tuned.glob("*.safetensors"))) > 2  # several shards
    diff = weight_diff.make(base, tuned, tmp_path / "diff")
    manifest = json.loads((diff / weight_diff.MANIFEST).read_text())
    embed = manifest["tensors"]["model.embed_tokens.weight"]
    assert embed["diff"] == "xor" and embed["added_rows"] == 2  # <landmark> and <pad>, stored whole
    assert not list(diff.glob("model*.safetensors"))  # nothing a loader would take for weights
    assert not any(torch.equal(t, _weights(tuned).get(n, torch.empty(0))) for n, t in _weights(diff).items())

    out = weight_diff.recover(base, diff, tmp_path / "recovered")
    expected, recovered = _weights(tuned), _weights(out)
    assert expected.keys() == recovered.keys()
    for name, tensor in expected.items():
        assert recovered[name].dtype == tensor.dtype
        assert torch.equal(recovered[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert json.loads((out / "config.json").read_text()) == json.loads((tuned / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (tuned / "tokenizer.json").read_bytes()
    ids = torch.randint(3, 80, (1, 40))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=dtype)(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(tuned, trust_remote_code=True, dtype=dtype)(ids).logits
    assert torch.equal(logits, reference)


def test_model_card_says_what_it_is_and_how_to_recover(tmp_path):
    base, tuned = _pair(tmp_path, torch.float32)
    card = ModelCard.load(weight_diff.make(base, tuned, tmp_path / "diff") / "README.md")
    assert card.data.base_model and card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert "weight-diff" in card.data.tags and "tools.weight_diff recover" in card.text


MEASURE = textwrap.dedent(
    """
    import json, os, sys, threading
    import torch
    from landmark_llama.tools import weight_diff

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    command, warm, *paths = sys.argv[1:]
    warm_paths = [warm + "/" + name for name in (("base", "tuned", "diff") if command == "make" else ("base", "diff",
                  "out"))]
    getattr(weight_diff, command)(*warm_paths)  # the same command on a tiny model first: lazy imports and kernels
    before, peak, done = rss(), [0], threading.Event()

    def sample():  # the process's resident memory, polled while the command runs
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    getattr(weight_diff, command)(*paths)
    done.set()
    sampler.join()
    print(json.dumps(max(peak[0], rss()) - before))
    """
)


def test_memory_stays_below_two_shards(tmp_path):
    shard = 24 * 1024**2
    base, tuned = _pair(tmp_path, torch.float32, shard=f"{shard // 1024**2}MB", hidden_size=768,
                        intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=4)
    sizes = [path.stat().st_size for path in tuned.glob("*.safetensors")]
    assert len(sizes) >= 4 and max(sizes) <= shard
    warm = tmp_path / "warm"
    _pair(warm, torch.float32)
    growth = {}
    for command, paths in (("make", (base, tuned, tmp_path / "diff")),
                           ("recover", (base, tmp_path / "diff", tmp_path / "out"))):
        # A fixed mmap threshold: glibc otherwise serves later large buffers from its heap and keeps freed ones
        # resident, which would count the allocator's cache, not live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1024**2)}
        result = subprocess.run([sys.executable, "-c", MEASURE, command, str(warm), *map(str, paths)],
                                capture_output=True, text=True, timeout=600, check=True, env=env)
        growth[command] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"peak memory growth: make {growth['make'] / 2**20:.0f} MiB, recover {growth['recover'] / 2**20:.0f} MiB; "
          f"largest shard {max(sizes) / 2**20:.0f} MiB")
    assert all(value < 2 * max(sizes) for value in growth.values()), growth


def _nothing_half_written(folder):
    assert not folder.exists() or not any(folder.iterdir())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]  # no staging left


def test_bad_inputs_are_refused_and_nothing_is_half_written(tmp_path):
    base, tuned = _pair(tmp_path / "a", torch.float32)
    diff = weight_diff.make(base, tuned, tmp_path / "diff")
    out = tmp_path / "out"

    other_base, _ = _pair(tmp_path / "b", torch.float32, seed=1)
    with pytest.raises(ValueError, match="wrong base checkpoint"):
        weight_diff.recover(other_base, diff, out)
    _nothing_half_written(out)

    bf16_base = tmp_path / "bf16-base"
    LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(bf16_base)
    with pytest.raises(TypeError, match="use the base checkpoint in float32"):
        weight_diff.recover(bf16_base, diff, out)
    with pytest.raises(TypeError, match="save the tuned model in the base's dtype"):
        weight_diff.make(bf16_base, tuned, tmp_path / "diff2")
    _nothing_half_written(tmp_path / "diff2")

    with pytest.raises(FileNotFoundError, match="is not a weight diff"):
        weight_diff.recover(base, tuned, out)

    shard = sorted(diff.glob("*.safetensors"))[1]
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        weight_diff.recover(base, diff, out)
    _nothing_half_written(out)
    edited = bytearray(original)
    edited[-5] ^= 0xFF  # a flipped byte inside the last tensor's data
    shard.write_bytes(bytes(edited))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        weight_diff.recover(base, diff, out)
    _nothing_half_written(out)
    shard.write_bytes(original)

    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "thesis.txt").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not empty"):
            weight_diff.recover(base, diff, unrelated, overwrite=overwrite)
    assert [p.name for p in unrelated.iterdir()] == ["thesis.txt"]
    weight_diff.recover(base, diff, out)  # the intact diff still recovers
    with pytest.raises(FileExistsError, match="--overwrite"):
        weight_diff.recover(base, diff, out)
    (out / "my_eval.json").write_text("{}")
    with pytest.raises(FileExistsError, match="my_eval.json"):
        weight_diff.recover(base, diff, out, overwrite=True)
    assert (out / "my_eval.json").exists()


def test_command_line(tmp_path):
    base, tuned = _pair(tmp_path, torch.float16)
    for argv in (["make", "--base", base, "--tuned", tuned, "--out", tmp_path / "diff"],
                 ["recover", "--base", base, "--diff", tmp_path / "diff", "--out", tmp_path / "out"]):
        subprocess.run([sys.executable, "-m", "landmark_llama.tools.weight_diff", *map(str, argv)], check=True,
                       capture_output=True, timeout=300)
    assert _weights(tmp_path / "out").keys() == _weights(tuned).keys()


def test_command_line_errors_print_the_message_alone(tmp_path, capsys, monkeypatch):
    """Issue 16.10: the command printed a traceback; the functions still raise (tested above), and an error that is
    no fault of the input keeps its traceback."""
    base, tuned = _pair(tmp_path, torch.float32)
    bf16_base = tmp_path / "bf16-base"
    LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(bf16_base)
    capsys.readouterr()
    for argv, message in [
        (["recover", "--base", base, "--diff", tuned, "--out", tmp_path / "out"], "is not a weight diff"),
        (["make", "--base", tmp_path / "missing", "--tuned", tuned, "--out", tmp_path / "diff"],
         "has no safetensors weights"),
        (["make", "--base", bf16_base, "--tuned", tuned, "--out", tmp_path / "diff"],
         "save the tuned model in the base's dtype"),
        (["import-paper", "--base", base, "--diff", tuned, "--out", tmp_path / "out"], "not a diff in the paper's"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            weight_diff.main([str(arg) for arg in argv])
        assert stopped.value.code == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    _nothing_half_written(tmp_path / "diff")

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(weight_diff, "make", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        weight_diff.main(["make", "--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "diff")])
