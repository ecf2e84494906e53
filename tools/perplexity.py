"""Held-out perplexity against context length: the paper's PG19 table, on this project's data.

    python -m landmark_llama.tools.perplexity [--model FOLDER] [--baseline FOLDER] [--lengths 512 2048 8192 32768]
        [--tokens 65536] [--output DIR]

The text is the held-out part of the Python standard library (the files `train/recipes/tiny_stdlib.py` never
trains on), or `--text_file`. Its documents are tokenized, joined with EOS, and the first `--tokens` tokens are cut
into windows of each length. Every row scores the same tokens: all but those at multiples of the training context
(the first token of each of its windows has nothing to be predicted from). Rows:

- a landmark model with retrieval: each window runs through the block-retrieval cache (`--retrieval_top_k`);
- the same model truncated to its training context: each training-context piece alone, in the training form (one
  figure, whatever the length);
- a stock model (the baseline): each window in one forward pass, as far as its RoPE carries it.

Prints a table and writes perplexity.json and perplexity.png to --output.
"""

import argparse
import inspect
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from landmark_llama.tools.passkey import SHIPPED_MODEL, is_landmark_model, load_model
from landmark_llama.tools.report import length_plot, markdown_table, write_record


def held_out_texts(stdlib=None):
    from landmark_llama.train.recipes.tiny_stdlib import split_files, stdlib_files

    return split_files(stdlib_files(stdlib))[1]


def token_stream(tokenizer, texts, tokens):
    """The first `tokens` tokens of the documents, each followed by EOS, as a LongTensor."""
    stream = []
    for ids in tokenizer(texts, split_special_tokens=True)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
        if len(stream) >= tokens:
            return torch.tensor(stream[:tokens])
    raise ValueError(f"The text holds {len(stream)} tokens, fewer than --tokens {tokens}; lower it.")


def _target_nll(logits, targets):
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(
        targets.shape
    )


@torch.no_grad()
def window_nll(model, windows, piece=None):
    """NLL of every token of `windows` [n, length] given the tokens before it in its window, [n, length] (NaN at
    the first). With `piece`, each window is fed `piece` tokens at a time through the block-retrieval cache;
    without, in one forward pass (the training form, or a stock model's own attention)."""
    nll = torch.full(windows.shape, float("nan"))
    windows = windows.to(model.device)
    if piece is None:
        logits = model(input_ids=windows).logits
        nll[:, 1:] = _target_nll(logits[:, :-1], windows[:, 1:]).cpu()
        return nll
    # transformers 5.24 renamed past_key_values to cache
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, last_logits = None, None
    for start in range(0, windows.shape[1], piece):
        ids = windows[:, start:start + piece]
        out = model(input_ids=ids, use_cache=True, **{cache_name: cache})
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        logits = out.logits if last_logits is None else torch.cat([last_logits, out.logits], dim=1)
        first = start if last_logits is None else start - 1
        targets = windows[:, first + 1:start + ids.shape[1]]
        nll[:, first + 1:start + ids.shape[1]] = _target_nll(logits[:, :targets.shape[1]], targets).cpu()
        last_logits = out.logits[:, -1:]
    return nll


def stream_nll(model, stream, length, piece=None, tokens_per_call=16384, progress=None):
    """Per-token NLL over `stream` cut into windows of `length`, a few windows a call."""
    windows = stream.view(-1, length)
    per_call = max(1, tokens_per_call // length)
    parts = []
    for start in range(0, windows.shape[0], per_call):
        parts.append(window_nll(model, windows[start:start + per_call], piece))
        if progress is not None:
            progress.update(parts[-1].numel())
    return torch.cat(parts).flatten()


def perplexity(nll, context_length):
    """exp of the mean NLL over the tokens every row scores (positions not at multiples of `context_length`)."""
    scored = torch.arange(nll.numel()) % context_length != 0
    if torch.isnan(nll[scored]).any():
        raise RuntimeError("a scored token has no NLL: the windows must be multiples of the training context")
    return math.exp(nll[scored].double().mean().item())


def evaluate(model, stream, lengths, context_length, piece=2048, tokens_per_call=16384, progress=True):
    """{row label: {length: perplexity}} for one model (two rows for a landmark model, one for a stock one)."""
    landmark = is_landmark_model(model)
    rows = {"retrieval": lengths, "truncated": [context_length]} if landmark else {"full": lengths}
    total = sum(len(row_lengths) for row_lengths in rows.values()) * stream.numel()
    results = {}
    with tqdm(total=total, desc="perplexity", unit="tok", unit_scale=True, disable=not progress) as bar:
        for row, row_lengths in rows.items():
            results[row] = {}
            for length in row_lengths:
                nll = stream_nll(model, stream, length, min(piece, length) if row == "retrieval" else None,
                                 tokens_per_call, bar)
                results[row][length] = perplexity(nll, context_length)
    if landmark:  # each piece alone, whatever the window: one figure for every length
        results["truncated"] = {length: results["truncated"][context_length] for length in lengths}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="model folder (default: the shipped model)")
    parser.add_argument("--baseline", default=None, help="a second folder on the same text (e.g. stock Llama)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens scored at every length")
    parser.add_argument("--stdlib", default=None, help="standard library folder (default: the running Python's)")
    parser.add_argument("--text_file", default=None, help="a UTF-8 text file to score instead of the stdlib")
    parser.add_argument("--retrieval_top_k", type=int, default=None)
    parser.add_argument("--retrieval_granularity", choices=["token", "chunk"], default=None)
    parser.add_argument("--piece", type=int, default=2048, help="tokens fed to the cache a call")
    parser.add_argument("--tokens_per_call", type=int, default=16384, help="windows are batched up to this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", default="out/perplexity", help="folder for perplexity.json and .png")
    args = parser.parse_args(argv)

    try:  # the text first: a missing file fails before any model loads
        texts = [Path(args.text_file).read_text(encoding="utf-8")] if args.text_file else held_out_texts(args.stdlib)
    except OSError as error:
        parser.error(str(error))
    runs, described, context_length = {}, {}, None
    for folder in filter(None, (args.model, args.baseline)):
        model, tokenizer = load_model(folder, args.device, getattr(torch, args.dtype))
        if context_length is None:  # the first model's training context decides which tokens every row scores
            config = model.config
            context_length = getattr(config, "train_context_length", None) or config.max_position_embeddings
            lengths = [*args.lengths, args.tokens]
            if any(n % context_length for n in lengths) or any(args.tokens % n for n in args.lengths):
                parser.error(f"--lengths and --tokens must be multiples of the training context {context_length}, "
                             "and --tokens of every length")
        for name in ("retrieval_top_k", "retrieval_granularity"):
            if getattr(args, name) is not None and is_landmark_model(model):
                setattr(model.config, name, getattr(args, name))
        try:  # each model's own tokenizer
            stream = token_stream(tokenizer, texts, args.tokens)
        except ValueError as error:  # too little text: the message, not a traceback
            parser.error(str(error))
        name = Path(folder).name
        for row, results in evaluate(model, stream, args.lengths, context_length, args.piece,
                                     args.tokens_per_call).items():
            k = getattr(model.config, "retrieval_top_k", None)
            label = {"retrieval": f"{name}, retrieval k={k}", "truncated": f"{name}, truncated to {context_length}",
                     "full": f"{name}, full attention"}[row]
            runs[label] = results
        described[name] = dict(context_length=context_length, dtype=args.dtype,
                               parameters=sum(p.numel() for p in model.parameters()))
        del model

    output = write_record(args.output, "perplexity", runs, command=vars(args), models=described,
                          torch=torch.__version__)
    length_plot(runs, output / "perplexity.png", f"held-out perplexity, {args.tokens} tokens scored",
                "context length (tokens)", "held-out perplexity", log_y=True, marker_x=context_length,
                marker_label="training context")
    print(markdown_table(runs, lambda value: f"{value:.3f}"))
    print(f"wrote {output / 'perplexity.json'} and {output / 'perplexity.png'}")


if __name__ == "__main__":
    main()
