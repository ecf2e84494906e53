"""train/finetune.py end to end on CPU: tiny models, a learnable synthetic corpus, the stock Trainer.

Every run goes through `main(argv)`, the same code `python -m landmark_llama.train.finetune` runs. FSDP runs as two
CPU processes on the gloo backend (there is no GPU here); see `test_fsdp_on_two_processes_matches_one_process`.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoTokenizer, GPT2Config, TrainerCallback

from landmark_llama import LandmarkLlamaForCausalLM
from landmark_llama.tools.convert_llama import convert_llama
from landmark_llama.tools.tiny_llama import build_tiny_llama
from landmark_llama.train import finetune
from tiny_models import BLOCK_PROJECT_IMPORTS

DIGITS = "zero one two three four five six seven eight nine".split()
BLOCK, CONTEXT = 8, 32  # a window of 32 tokens spans 5 landmark blocks


def write_counting_corpus(path, documents, seed=0):
    """Documents that count on from a random digit: next-token prediction learns them quickly."""
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        start, length = rng.randrange(10), rng.randrange(10, 40)
        lines.append(" ".join(DIGITS[(start + i) % 10] for i in range(length)))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    stock = build_tiny_llama(root / "stock")
    landmark = convert_llama(stock, root / "landmark", block_size=BLOCK, train_context_length=CONTEXT)
    return {
        "stock": stock,
        "landmark": landmark,
        "corpus": write_counting_corpus(root / "corpus.txt", 200),
        "small_corpus": write_counting_corpus(root / "small.txt", 25),  # 22 windows: 6 steps an epoch
    }


def arguments(folders, output_dir, *extra, model="landmark", corpus="corpus"):
    return [
        "--model_name_or_path", str(folders[model]), "--train_file", str(folders[corpus]),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]


def run(folders, output_dir, *extra, model="landmark", corpus="corpus"):
    return finetune.main(arguments(folders, output_dir, *extra, model=model, corpus=corpus))


def logged_losses(log_history):
    """{step: loss} from a Trainer's log history."""
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


def some_ids(folder, batch=2):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = " ".join(DIGITS * 5)
    return torch.tensor([tokenizer(text)["input_ids"][:45]] * batch)


# A fresh interpreter that cannot import this package: the folder must load from its own code files.
REMOTE_CODE_LOGITS = BLOCK_PROJECT_IMPORTS + textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder, ids_file, logits_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        save_file({"logits": model(load_file(ids_file)["ids"]).logits.contiguous()}, logits_file)
    """
)


def remote_code_logits(folder, ids, scratch):
    """Logits of `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` in a clean process."""
    scratch.mkdir(exist_ok=True)
    save_file({"ids": ids}, scratch / "ids.safetensors")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, "-c", REMOTE_CODE_LOGITS, str(folder), str(scratch / "ids.safetensors"),
               str(scratch / "logits.safetensors")]
    result = subprocess.run(command, cwd=scratch, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(scratch / "logits.safetensors")["logits"]


def test_stock_llama_converts_trains_and_reloads_as_remote_code(folders, tmp_path):
    trainer = run(folders, tmp_path, "--max_steps", "40", "--block_size", str(BLOCK),
                  "--train_context_length", str(CONTEXT), model="stock")
    losses = list(logged_losses(trainer.state.log_history).values())
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses  # ln(85) = 4.44 at the start; counting is learnable

    assert (tmp_path / "landmark-llama-init" / "config.json").exists()  # the stock folder was converted first
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["block_size"] == BLOCK and config["train_context_length"] == CONTEXT and "auto_map" in config
    assert not list(tmp_path.glob("*.bin")) or [p.name for p in tmp_path.glob("*.bin")] == ["training_args.bin"]

    ids = some_ids(tmp_path)
    with torch.no_grad():
        trained = trainer.model.eval()(ids).logits
    torch.testing.assert_close(remote_code_logits(tmp_path, ids, tmp_path / "scratch"), trained, rtol=0, atol=1e-6)


class StopAt(TrainerCallback):
    """Ends training after `step`, as a crash right after a checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_resume_continues_exactly(folders, tmp_path, monkeypatch):
    # Cosine schedule with warmup, weight decay, and an epoch boundary (after step 6) in the resumed half.
    schedule = ["--max_steps", "10", "--save_steps", "5", "--save_strategy", "steps", "--warmup_steps", "0.2",
                "--lr_scheduler_type", "cosine", "--weight_decay", "0.1"]
    whole = run(folders, tmp_path / "whole", *schedule, corpus="small_corpus")

    class InterruptedTrainer(finetune.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[StopAt(5)], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(finetune, "Trainer", InterruptedTrainer)
        stopped = run(folders, tmp_path / "resumed", *schedule, corpus="small_corpus")
    assert stopped.state.global_step == 5 and (tmp_path / "resumed" / "checkpoint-5").is_dir()
    resumed = run(folders, tmp_path / "resumed", *schedule, "--resume_from_checkpoint", "last", corpus="small_corpus")

    expected = logged_losses(whole.state.log_history)
    got = logged_losses(resumed.state.log_history)
    assert sorted(got) == sorted(expected) == list(range(1, 11))
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    final_whole, final_resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(
        tmp_path / "resumed" / "model.safetensors")
    for name, tensor in final_whole.items():
        assert torch.equal(final_resumed[name], tensor), name


def test_lora_trains_the_landmark_rows_saves_an_adapter_and_a_merged_folder(folders, tmp_path):
    trainer = run(folders, tmp_path, "--max_steps", "20", "--learning_rate", "1e-2", "--lora_r", "4",
                  "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj", "--merge_lora",
                  "--gradient_checkpointing")
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert not (tmp_path / "model.safetensors").exists()
    losses = list(logged_losses(trainer.state.log_history).values())
    assert losses[-1] < losses[0]

    base_state = load_file(folders["landmark"] / "model.safetensors")
    merged_state = load_file(tmp_path / "merged" / "model.safetensors")
    config = json.loads((folders["landmark"] / "config.json").read_text())
    landmark, pad = config["landmark_token_id"], config["pad_token_id"]
    frozen_rows = torch.ones(config["vocab_size"], dtype=torch.bool)
    frozen_rows[[landmark, pad]] = False
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(merged_state[name][landmark], base_state[name][landmark]), name
        assert torch.equal(merged_state[name][frozen_rows], base_state[name][frozen_rows]), name
    assert not torch.equal(merged_state["model.layers.0.self_attn.q_proj.weight"],
                           base_state["model.layers.0.self_attn.q_proj.weight"])
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(merged_state[name], base_state[name]), name  # not a LoRA target

    ids = some_ids(tmp_path)
    adapted = PeftModel.from_pretrained(LandmarkLlamaForCausalLM.from_pretrained(folders["landmark"]), tmp_path).eval()
    with torch.no_grad():
        expected = adapted(ids).logits
    torch.testing.assert_close(remote_code_logits(tmp_path / "merged", ids, tmp_path / "scratch"), expected,
                               rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def folder_without_landmark_token(folders, tmp_path_factory):
    folder = tmp_path_factory.mktemp("no_landmark") / "model"
    shutil.copytree(folders["landmark"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the stock tokenizer beside the converted model
        shutil.copy(folders["stock"] / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra,error,message", [
    (["--train_file", "/nonexistent/corpus.txt"], FileNotFoundError,
     r"--train_file /nonexistent/corpus.txt: no such file. Pass a .txt file"),
    (["--train_context_length", "0"], ValueError, r"--train_context_length must be positive, got 0"),
    (["--train_context_length", "-8"], ValueError, r"--train_context_length must be positive, got -8"),
    (["--block_size", "1"], ValueError, r"block_size must be at least 2"),
    (["--model_name_or_path", "<stock>", "--block_size", "1"], StrictDataclassClassValidationError,
     r"block_size must be at least 2"),  # raised inside the config's validator, during the conversion
    (["--model_name_or_path", "<gpt2>"], ValueError,
     r"holds a 'gpt2' model; pass a landmark-llama folder or a stock Llama one"),
    (["--load_best_model_at_end", "--eval_strategy", "steps"], ValueError,
     r"requires the save and eval strategy to match"),  # TrainingArguments' own check, while parsing
    (["--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "FooLayer"], ValueError,
     r"no module of class FooLayer in the model; the decoder layer class is LlamaDecoderLayer"),
    (["--fsdp", "--fsdp_config", '{"transformer_layer_cls_to_wrap": ["FooLayer"]}'], ValueError,
     r"no module of class FooLayer in the model; the decoder layer class is LlamaDecoderLayer"),
    (["--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"], ValueError, r"needs --fsdp"),
    (["--model_name_or_path", "<no landmark>"], ValueError,
     r"has no landmark token \(the model's landmark_token_id is 84, the tokenizer has 83 tokens\).*convert_llama"),
], ids=["missing-file", "context-0", "context-negative", "block-size-1", "block-size-1-converting", "not-llama",
        "training-arguments", "fsdp-wrap-class", "fsdp-config-wrap-class", "wrap-class-without-fsdp",
        "tokenizer-without-landmark"])
def test_bad_inputs_get_clear_errors(folders, folder_without_landmark_token, gpt2_folder, tmp_path, capsys, extra,
                                     error, message):
    """The functions raise; the command prints the message alone and exits 1 (issue 16.10: it printed tracebacks,
    a config error under the validator's chain)."""
    placeholders = {"<no landmark>": folder_without_landmark_token, "<stock>": folders["stock"], "<gpt2>": gpt2_folder}
    argv = arguments(folders, tmp_path, "--max_steps", "1", *[str(placeholders.get(arg, arg)) for arg in extra])
    with pytest.raises(error, match=message):
        finetune.build_trainer(*finetune.parse_arguments(argv))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        finetune.main(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert re.search(f"^error: .*{message}", err, re.MULTILINE)
    assert "Traceback" not in err and "validation error" not in err
    assert not (tmp_path / "model.safetensors").exists()


# accelerate 1.15 enters FSDP only on GPU-like devices: with several CPU processes it silently falls back to DDP.
# This launcher lifts exactly that gate (what accelerate does for MULTI_GPU, done for MULTI_CPU) and then runs the
# unchanged train.finetune.main; everything after it (fully_shard, gathering the full state dict, saving) is stock.
FSDP_ON_CPU = textwrap.dedent(
    """
    import json, sys
    import accelerate.state
    from accelerate.utils import DistributedType

    init = accelerate.state.AcceleratorState.__init__

    def init_with_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
        # Each later AcceleratorState() re-reads PartialState's MULTI_CPU: keep FSDP while a plugin is set.
        if getattr(self, "fsdp_plugin", None) is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP

    accelerate.state.AcceleratorState.__init__ = init_with_cpu_fsdp

    from landmark_llama.train.finetune import main

    trainer = main(sys.argv[2:])
    if trainer.args.process_index == 0:
        sharded = sorted({type(m).__name__ for m in trainer.model.modules() if type(m).__name__.startswith("FSDP")})
        with open(sys.argv[1], "w") as report:
            json.dump({"fsdp_enabled": trainer.is_fsdp_enabled, "sharded": sharded,
                       "world_size": trainer.args.world_size, "global_step": trainer.state.global_step}, report)
    # Every output is on disk now. End the process without the interpreter's finalization: there, objects that
    # still hold the gloo group (the model's device mesh) were destroyed while gloo's threads ran, and a rank
    # aborted now and then ("terminate called without an active exception"), with or without destroy_process_group.
    import os
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def launch_two_processes(argv, report):
    """train.finetune through the FSDP_ON_CPU launcher on two CPU processes (gloo); returns the launcher's report."""
    launcher = report.parent / "fsdp_on_cpu.py"
    launcher.write_text(FSDP_ON_CPU)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(launcher), str(report), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its Python stack
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(report.read_text())


def launch_fsdp(folders, output_dir, report, *extra):
    """FSDP2 full sharding of LlamaDecoderLayer on two processes, batch 2 each, 12 steps, a checkpoint at 6."""
    return launch_two_processes([
        "--model_name_or_path", str(folders["landmark"]), "--train_file", str(folders["corpus"]),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "2", "--learning_rate", "3e-3",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0",
        "--disable_tqdm", "true", "--seed", "0", "--max_steps", "12", "--save_steps", "6",
        "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
        "--activation_checkpointing", *extra,  # the current name (the LoRA test passes the old one)
    ], report)


def test_fsdp_on_two_processes_matches_one_process(folders, tmp_path):
    """Two processes with batch 2 against one with batch 4: the same windows in each step, so losses and weights
    agree up to float summation order. Then a resume of the FSDP run from its step-6 checkpoint."""
    single = run(folders, tmp_path / "single", "--max_steps", "12")
    facts = launch_fsdp(folders, tmp_path / "fsdp", tmp_path / "report.json")
    assert facts["fsdp_enabled"] and facts["world_size"] == 2
    assert "FSDPLlamaDecoderLayer" in facts["sharded"], facts  # the decoder layers really are sharded units

    fsdp_losses = logged_losses(json.loads((tmp_path / "fsdp" / "trainer_state.json").read_text())["log_history"])
    single_losses = logged_losses(single.state.log_history)
    assert sorted(fsdp_losses) == sorted(single_losses) == list(range(1, 13))
    differences = [abs(fsdp_losses[step] - single_losses[step]) for step in single_losses]
    assert max(differences) < 1e-5, differences

    fsdp_state = load_file(tmp_path / "fsdp" / "model.safetensors")  # a full state dict, gathered on rank 0
    single_state = load_file(tmp_path / "single" / "model.safetensors")
    assert sorted(fsdp_state) == sorted(single_state)
    for name, tensor in fsdp_state.items():
        torch.testing.assert_close(tensor, single_state[name], rtol=0, atol=1e-4, msg=name)
    ids = some_ids(tmp_path / "fsdp")
    with torch.no_grad():
        expected = single.model.eval()(ids).logits
    torch.testing.assert_close(remote_code_logits(tmp_path / "fsdp", ids, tmp_path / "scratch"), expected,
                               rtol=0, atol=1e-4)

    launch_fsdp(folders, tmp_path / "fsdp_resumed", tmp_path / "report_resumed.json",
                "--resume_from_checkpoint", str(tmp_path / "fsdp" / "checkpoint-6"))
    resumed_losses = logged_losses(
        json.loads((tmp_path / "fsdp_resumed" / "trainer_state.json").read_text())["log_history"])
    assert all(abs(resumed_losses[step] - fsdp_losses[step]) <= 1e-6 for step in range(7, 13)), resumed_losses
    resumed_state = load_file(tmp_path / "fsdp_resumed" / "model.safetensors")
    assert all(torch.equal(resumed_state[name], tensor) for name, tensor in fsdp_state.items())


def test_bf16_autocast_training_follows_fp32(folders, tmp_path):
    """--bf16 (autocast over fp32 weights, the recipes' precision) on the eager attention path: it trains, and its
    first losses stay within bf16 noise of the fp32 run's."""
    bf16 = logged_losses(run(folders, tmp_path / "bf16", "--max_steps", "3", "--bf16").state.log_history)
    fp32 = logged_losses(run(folders, tmp_path / "fp32", "--max_steps", "3").state.log_history)
    assert sorted(bf16) == [1, 2, 3]
    assert all(abs(bf16[step] - fp32[step]) < 0.05 for step in fp32), (bf16, fp32)


RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"


@pytest.mark.parametrize("recipe", ["llama7b_fsdp_8gpu.sh", "llama7b_lora_1gpu.sh"])
def test_recipe_options_train_the_tiny_model(folders, tmp_path, recipe):
    """Each recipe's exact option list (captured by stub launchers), run on the tiny stock Llama for 2 steps on CPU
    with only the scale and --tf32 (GPU only) overridden: the options parse and train, bf16 included."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for launcher in ("torchrun", "python"):
        (stubs / launcher).write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\n')
        (stubs / launcher).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "RECORD": str(tmp_path / "argv"),
           "MODEL": str(folders["stock"]), "DATA": str(folders["corpus"]), "OUT": str(tmp_path / "out")}
    subprocess.run(["bash", str(RECIPES / recipe)], env=env, check=True, timeout=60)
    argv = (tmp_path / "argv").read_text().splitlines()
    argv = argv[argv.index("landmark_llama.train.finetune") + 1:]
    assert "--block_size" in argv and argv[argv.index("--block_size") + 1] == "51"

    scale = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
             "--preprocessing_num_workers", "1", "--use_cpu", "--tf32", "false",
             "--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    if "--fsdp" in argv:  # FSDP needs several processes: two gloo ones stand in for the 8 GPUs
        facts = launch_two_processes(argv + scale, tmp_path / "report.json")
        assert facts["fsdp_enabled"] and "FSDPLlamaDecoderLayer" in facts["sharded"] and facts["global_step"] == 2
    else:
        assert finetune.main(argv + scale).state.global_step == 2
    out = tmp_path / "out"
    saved = out / "merged" if "--lora_r" in argv else out
    config = json.loads((saved / "config.json").read_text())
    assert config["block_size"] == 51 and config["train_context_length"] == 512
