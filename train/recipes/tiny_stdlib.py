"""Train a small Llama from scratch on the Python standard library's own source, with landmark attention or, for
the baseline, with stock attention: the recipe of the model this project ships (models/tiny-stdlib-landmark).

    python -m landmark_llama.train.recipes.tiny_stdlib --output out/tiny-landmark --attention landmark
    python -m landmark_llama.train.recipes.tiny_stdlib --output out/tiny-stock --attention stock

Both runs see the same tokenizer, initial weights (but for the landmark's embedding row), windows and order, so the
baseline differs in the attention alone.

- Data: every `.py` file of the running Python's standard library (no site-packages), read as UTF-8 (files that
  are not are skipped). A file is held out when the first byte of the sha256 of its path inside the library is
  below 13 (about 5%): a rule that needs no list and picks the same files on any Python version.
  `tools/perplexity.py` evaluates on the held-out files.
- Tokenizer: byte-level BPE with digits split one a token (as Llama's), trained here on the training files, with
  `<s>`, `</s>`; the conversion to landmark-llama then adds `<landmark>` and `<pad>`.
- Windows: the training files tokenized, joined with EOS and cut into windows of `--context_length` tokens (512).
- Pass key windows (the recipe's documented choice): a share (`--passkey_share`, 0.25) of extra windows open with
  a pass key prompt of the paper's format (tools/passkey.py), shorter than the window, answered, then EOS and a
  piece of code to fill the window. The model so learns the task inside its training window only; the test asks
  for it at up to 64 times that length.
- Model: Llama with 8 layers, hidden 256 (4 heads of 64), SwiGLU 768, tied embeddings, vocabulary 8192, RoPE
  base 10000; landmark blocks of 64 (63 tokens and the landmark).
- Training: the stock `Trainer`, AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1, 200 warmup steps, cosine),
  windows of 512 x 32 a step, bf16 autocast on fp32 weights, gradient clipping at 1. The result is saved in
  bfloat16 (half the size; load with dtype=torch.float32 to run in fp32).
"""

import argparse
import hashlib
import json
import logging
import random
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments, set_seed,
)

from landmark_llama.tools.convert_llama import convert_llama
from landmark_llama.tools.passkey import FILLER, LARGEST_KEY, passkey_text
from landmark_llama.train.data import collate_windows, pack_documents


logger = logging.getLogger(__name__)
HELD_OUT_BELOW = 13  # of 256: the first sha256 byte of a held-out file's path
LONGEST_PROMPT = 2**20


def stdlib_files(root=None):
    """(path inside the library, text) of every readable `.py` file of the standard library, sorted by path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative or "dist-packages" in relative:
            continue
        try:
            files.append((relative, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
            continue
    if not files:
        raise FileNotFoundError(f"No Python source files under {root}; pass --stdlib PATH.")
    return files


def is_held_out(relative_path):
    return hashlib.sha256(relative_path.encode()).digest()[0] < HELD_OUT_BELOW


def split_files(files):
    train = [text for path, text in files if not is_held_out(path)]
    held_out = [text for path, text in files if is_held_out(path)]
    return train, held_out


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE (digits split one a token), `<s>` prepended to every encoding like Llama's tokenizer."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def passkey_window(tokenizer, filler_window, context_length, rng):
    """A training window that opens with an answered pass key prompt of random length and depth, then EOS and
    tokens of `filler_window` (code) up to `context_length`."""
    key = rng.randint(1, LARGEST_KEY)
    shortest = len(tokenizer(passkey_text(key, 0, 0) + f" {key}.")["input_ids"])
    per_repeat = len(tokenizer(FILLER + " ")["input_ids"])
    repeats = rng.randint(0, max(0, (context_length - 1 - shortest) // per_repeat))
    before = rng.randint(0, repeats)
    while True:
        ids = tokenizer(passkey_text(key, before, repeats - before) + f" {key}.")["input_ids"]
        if len(ids) < context_length or repeats == 0:
            break
        repeats, before = repeats - 1, min(before, repeats - 1)
    ids = ids[: context_length - 1] + [tokenizer.eos_token_id]
    return ids + filler_window[: context_length - len(ids)]


class Windows(torch.utils.data.Dataset):
    """Code windows, then `passkey_count` pass key windows made from a seeded generator for each index."""

    def __init__(self, code_windows, passkey_count, tokenizer, context_length, seed):
        self.code_windows, self.passkey_count = code_windows, passkey_count
        self.tokenizer, self.context_length, self.seed = tokenizer, context_length, seed

    def __len__(self):
        return len(self.code_windows) + self.passkey_count

    def __getitem__(self, index):
        if index < len(self.code_windows):
            return {"input_ids": self.code_windows[index]}
        rng = random.Random(self.seed * 1_000_003 + index)
        filler = self.code_windows[rng.randrange(len(self.code_windows))]
        return {"input_ids": passkey_window(self.tokenizer, filler, self.context_length, rng)}


class TimeLimit(TrainerCallback):
    """Stops training after `seconds` of it (a safety net for time-limited machines), and says so."""

    def __init__(self, seconds):
        self.seconds, self.start, self.stopped_at = seconds, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds and time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True
            self.stopped_at = state.global_step


def build_initial_models(folder, tokenizer, args):
    """The stock Llama with random weights (the baseline's start) and its landmark-llama conversion."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64, max_position_embeddings=args.context_length,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        rope_theta=10000.0,
    )
    set_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(folder / "stock-init")
    tokenizer.save_pretrained(folder / "stock-init")
    convert_llama(folder / "stock-init", folder / "landmark-init", block_size=args.block_size,
                  train_context_length=args.context_length, retrieval_top_k=4, overwrite=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the trained model")
    parser.add_argument("--attention", choices=["landmark", "stock"], default="landmark")
    parser.add_argument("--stdlib", default=None, help="standard library folder (default: the running Python's)")
    parser.add_argument("--work", default=None, help="folder for the tokenizer and initial models (default: "
                                                     "<output>-work); two runs sharing it share them")
    parser.add_argument("--max_steps", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--context_length", type=int, default=512)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--intermediate_size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--passkey_share", type=float, default=0.25, help="pass key windows per code window")
    parser.add_argument("--time_limit", type=float, default=0, help="stop after this many seconds (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU in fp32 (for tests)")
    parser.add_argument("--prepare_only", action="store_true",
                        help="write the tokenizer and initial models to --work and stop (before parallel runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    train_texts, held_out = split_files(stdlib_files(args.stdlib))
    work = Path(args.work or f"{args.output}-work")
    if not (work / "landmark-init" / "config.json").is_file():
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
        build_initial_models(work, tokenizer, args)
    if args.prepare_only:
        return
    init = work / ("landmark-init" if args.attention == "landmark" else "stock-init")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(init)

    documents = tokenizer(train_texts, split_special_tokens=True)["input_ids"]
    code_windows = pack_documents(documents, tokenizer.eos_token_id, args.context_length)
    dataset = Windows(code_windows, int(args.passkey_share * len(code_windows)), tokenizer, args.context_length,
                      args.seed)
    logger.info(f"{len(train_texts)} training files, {len(held_out)} held out; {len(code_windows)} code windows "
                f"and {dataset.passkey_count} pass key windows of {args.context_length} tokens")

    model_class = LlamaForCausalLM
    if args.attention == "landmark":
        from landmark_llama import LandmarkLlamaForCausalLM as model_class
    model = model_class.from_pretrained(init, dtype=torch.float32)
    if args.attention == "stock":
        model.config._attn_implementation = "sdpa"
    time_limit = TimeLimit(args.time_limit)
    training_args = TrainingArguments(
        output_dir=f"{args.output}-checkpoints", max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, warmup_steps=min(200, args.max_steps // 10), lr_scheduler_type="cosine",
        max_grad_norm=1.0, bf16=not args.cpu, use_cpu=args.cpu, logging_steps=50, save_strategy="no",
        report_to="none", seed=args.seed, dataloader_num_workers=0 if args.cpu else 2,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate_windows,
                      callbacks=[time_limit])
    start = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - start

    model = trainer.model.to(torch.bfloat16)
    if args.attention == "landmark":
        # generate caps a call without max_new_tokens at max_position_embeddings; the retrieval cache keeps every
        # position inside the training window, so the cap would only cut long prompts short
        model.config.max_position_embeddings = LONGEST_PROMPT
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    record = dict(
        attention=args.attention, steps=result.global_step, planned_steps=args.max_steps,
        stopped_by_time_limit=time_limit.stopped_at is not None, seconds=round(seconds, 1),
        final_loss=next((entry["loss"] for entry in reversed(trainer.state.log_history) if "loss" in entry), None),
        tokens_seen=result.global_step * args.batch_size * args.context_length,
        parameters=sum(p.numel() for p in model.parameters()), train_files=len(train_texts),
        held_out_files=len(held_out), code_windows=len(code_windows), passkey_windows=dataset.passkey_count,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu",
        stdlib=str(args.stdlib or sysconfig.get_paths()["stdlib"]),
        torch=torch.__version__, python_stdlib=sysconfig.get_python_version(), arguments=vars(args),
        log=trainer.state.log_history,
    )
    (Path(args.output) / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    logger.info(f"trained {result.global_step} steps in {seconds:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
