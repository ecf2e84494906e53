"""The paper's pass key test (Mohtashami & Jaggi 2023, section 4.2): find a number hidden in a long prompt.

    python -m landmark_llama.tools.passkey [--model FOLDER] [--baseline FOLDER] [--lengths 512 2048 8192]
        [--trials 10] [--output DIR]

Each prompt is a task line, filler of five short sentences repeated, "The pass key is N. Remember it. N is the
pass key." at a random depth, more filler, and "What is the pass key? The pass key is". N is random in
[1, 50000]; a trial is correct when the first integer the model generates (greedy) is N. Lengths count the
prompt's tokens; each prompt is as long as whole filler sentences allow without passing its length.

`--model` defaults to the model this project ships (models/tiny-stdlib-landmark), so the command runs with no
download. Any folder loads, landmark-llama (through the block-retrieval cache) or stock (with its own cache, for the
baseline). Prints a table and writes passkey.json and passkey.png (accuracy against length) to --output.
"""

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from landmark_llama.tools.report import length_plot, markdown_table, write_record


SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-stdlib-landmark"
TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
LARGEST_KEY = 50000


def key_line(key):
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_text(key, filler_before, filler_after):
    """The prompt's text with `filler_before` and `filler_after` repeats of the filler around the key line."""
    parts = [TASK, *[FILLER] * filler_before, key_line(key), *[FILLER] * filler_after, QUESTION]
    return " ".join(parts)


@dataclass
class PasskeyPrompt:
    input_ids: list
    key: int
    key_start: int  # index in input_ids of the key line's first token


def _count(tokenizer, text):
    return len(tokenizer(text, split_special_tokens=True)["input_ids"])


def build_prompt(tokenizer, length, key, depth):
    """The longest pass key prompt of at most `length` tokens, with the key line `depth` (0 to 1) of the way
    through the filler. Raises ValueError when not even the prompt without filler fits."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}.")
    if not 1 <= key <= LARGEST_KEY:
        raise ValueError(f"the pass key must be in [1, {LARGEST_KEY}], got {key}.")
    shortest = _count(tokenizer, passkey_text(key, 0, 0))
    if shortest > length:
        raise ValueError(f"a pass key prompt needs at least {shortest} tokens; length {length} is too short.")
    # Each repeat adds the same tokens (a space then the sentences): estimate, then correct by counting.
    per_repeat = _count(tokenizer, passkey_text(key, 1, 0)) - shortest
    repeats = max(0, (length - shortest) // max(per_repeat, 1))

    def split(total):
        before = round(depth * total)
        return before, total - before

    while repeats > 0 and _count(tokenizer, passkey_text(key, *split(repeats))) > length:
        repeats -= 1
    while _count(tokenizer, passkey_text(key, *split(repeats + 1))) <= length:
        repeats += 1
    before, after = split(repeats)
    input_ids = tokenizer(passkey_text(key, before, after), split_special_tokens=True)["input_ids"]
    # The key line starts where the text before it ends (the space before it begins its first token).
    key_start = _count(tokenizer, passkey_text(key, before, 0).rsplit(" " + key_line(key), 1)[0])
    return PasskeyPrompt(input_ids, key, key_start)


def first_integer(text):
    """The first run of digits in `text` as an int, or None."""
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


def load_model(folder, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
    return model, tokenizer


def is_landmark_model(model):
    """Whether `model` runs landmark attention (and so takes the retrieval settings), whatever loaded it."""
    return getattr(model.config, "landmark_token_id", None) is not None


@torch.no_grad()
def answer(model, tokenizer, prompts, max_new_tokens=8, **generate_kwargs):
    """Greedy continuations of a batch of token-id prompts (left-padded), decoded."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(prompt) for prompt in prompts)
    device = model.device
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        attention_mask[row, width - len(prompt):] = 1
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad_id, **generate_kwargs,
    )
    return tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)


def evaluate(model, tokenizer, lengths, trials, seed=0, batch_size=8, progress=True, **generate_kwargs):
    """Accuracy at each length: {length: {"accuracy", "correct", "trials", "prompt_tokens", "answers"}}.

    Keys and depths come from `random.Random(seed)` in order, so two models see the same prompts."""
    rng = random.Random(seed)
    results = {}
    bar = tqdm(total=len(lengths) * trials, desc="pass key", disable=not progress)
    for length in lengths:
        cases = [build_prompt(tokenizer, length, rng.randint(1, LARGEST_KEY), rng.random()) for _ in range(trials)]
        answers = []
        for start in range(0, trials, batch_size):
            batch = cases[start:start + batch_size]
            answers += answer(model, tokenizer, [case.input_ids for case in batch], **generate_kwargs)
            bar.update(len(batch))
        correct = [first_integer(text) == case.key for text, case in zip(answers, cases)]
        results[length] = dict(
            accuracy=sum(correct) / trials, correct=sum(correct), trials=trials,
            prompt_tokens=max(len(case.input_ids) for case in cases),
            answers=[dict(key=case.key, depth=case.key_start / len(case.input_ids), answer=text, correct=ok)
                     for case, text, ok in zip(cases, answers, correct)],
        )
        bar.set_postfix(length=length, accuracy=f"{results[length]['accuracy']:.2f}")
    bar.close()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="model folder (default: the shipped model)")
    parser.add_argument("--baseline", default=None, help="a second folder on the same prompts (e.g. stock Llama)")
    parser.add_argument("--baseline_lengths", type=int, nargs="+", default=None,
                        help="lengths for the baseline (default: --lengths)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--trials", type=int, default=5, help="prompts at each length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=5, help="prompts generated together")
    parser.add_argument("--retrieval_top_k", type=int, default=None, help="blocks retrieved (landmark models)")
    parser.add_argument("--retrieval_granularity", choices=["token", "chunk"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", default="out/passkey", help="folder for passkey.json and passkey.png")
    args = parser.parse_args(argv)
    if args.trials < 1 or any(length < 1 for length in args.lengths):
        parser.error("--trials and --lengths must be positive")

    if args.model == str(SHIPPED_MODEL) and not SHIPPED_MODEL.is_dir():
        parser.error(f"the shipped model is not at {SHIPPED_MODEL}: it lives in the repository's models/ folder, "
                     "which an install from a wheel leaves out. Install from a clone (pip install -e .) or pass "
                     "--model.")
    dtype = getattr(torch, args.dtype)
    runs, settings = {}, {}
    for role, folder, lengths in (("model", args.model, args.lengths),
                                  ("baseline", args.baseline, args.baseline_lengths or args.lengths)):
        if folder is None:
            continue
        model, tokenizer = load_model(folder, args.device, dtype)
        knobs = {}
        if is_landmark_model(model):
            knobs = {name: value for name in ("retrieval_top_k", "retrieval_granularity")
                     if (value := getattr(args, name)) is not None}
            settings[folder] = {name: knobs.get(name, getattr(model.config, name))
                                for name in ("retrieval_top_k", "retrieval_granularity", "block_size")}
        label = f"{Path(folder).name} ({'landmark' if is_landmark_model(model) else 'stock'})"
        print(f"{role}: {label}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"trained on {getattr(model.config, 'train_context_length', '?')} tokens")
        try:
            runs[label] = evaluate(model, tokenizer, lengths, args.trials, args.seed, args.batch_size, **knobs)
        except ValueError as error:  # a length too short for the prompt, a bad retrieval setting: say it, no trace
            parser.error(str(error))
        longest = runs[label][max(lengths)]
        example = longest["answers"][0]
        print(f"e.g. at {max(lengths)} tokens, key {example['key']} at depth {example['depth']:.2f}: "
              f"...{QUESTION!r} -> {example['answer']!r} ({'right' if example['correct'] else 'wrong'})")
        del model

    output = write_record(args.output, "passkey", runs, command=vars(args), settings=settings,
                          torch=torch.__version__)
    length_plot(runs, output / "passkey.png", f"pass key retrieval, {args.trials} prompts a length",
                "prompt length (tokens)", "pass key accuracy (%)", value=lambda r: 100 * r["accuracy"], ylim=(-3, 103))
    print(markdown_table(runs, lambda r: f"{100 * r['accuracy']:.0f}% ({r['trials']})"))
    print(f"wrote {output / 'passkey.json'} and {output / 'passkey.png'}")


if __name__ == "__main__":
    main()
