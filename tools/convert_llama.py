"""Turn a stock Llama checkpoint folder into a landmark-llama folder.

    python -m landmark_llama.tools.convert_llama path/to/llama path/to/landmark-llama --block_size 64

Adds `<landmark>` as a special token (and `<pad>` when the tokenizer has no pad token), grows the embeddings with
new rows set to the mean of the existing ones, and writes config (with `auto_map`), code, tokenizer and
safetensors weights. The output folder is written beside its destination and moved into place only when
complete, so a failure never leaves a half-written model.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer

from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM
from landmark_llama.tools.cli import exit_with_message
from landmark_llama.tools.folders import publish, staging_folder


LANDMARK_TOKEN = "<landmark>"
PAD_TOKEN = "<pad>"


def _read_llama_config(source):
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{source} is not a Llama checkpoint: it has no config.json.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type == LandmarkLlamaConfig.model_type:
        raise ValueError(f"{source} is already a landmark-llama checkpoint; load it directly.")
    if model_type != "llama":
        raise ValueError(f"{source} is not a Llama checkpoint: config.json has model_type={model_type!r}.")
    if not any(source.glob("*.safetensors")):
        pickled = sorted(path.name for path in source.glob("*.bin"))
        hint = ""
        if pickled:
            hint = f" It has {pickled}: pickle files can run code and are not read; save them as safetensors first."
        raise ValueError(f"{source} has no safetensors weights.{hint}")
    return config


def _is_conversion(folder):
    """Whether `folder` holds a landmark-llama model (what an earlier conversion wrote)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == LandmarkLlamaConfig.model_type


def _check_destination(source, destination, overwrite):
    """A new or empty folder, or with `overwrite` one that holds an earlier conversion; never anything else."""
    if destination.resolve() == source.resolve():
        raise ValueError("The output folder must differ from the input folder.")
    if not destination.exists():
        return
    if not destination.is_dir():
        raise FileExistsError(f"{destination} exists and is not a folder.")
    if not any(destination.iterdir()):
        return
    if not _is_conversion(destination):
        raise FileExistsError(
            f"{destination} is not empty and holds no landmark-llama model; choose a new or empty folder (it is never "
            "replaced, even with --overwrite)."
        )
    if not overwrite:
        raise FileExistsError(f"{destination} already holds a model; pass overwrite=True (--overwrite) to replace it.")


def _add_tokens(tokenizer, landmark_token_id):
    """Adds `<landmark>` (unless an existing id is named) and `<pad>` when missing; returns the landmark id."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if landmark_token_id is None:
        tokenizer.add_tokens([AddedToken(LANDMARK_TOKEN, special=True, normalized=False)], special_tokens=True)
        return tokenizer.convert_tokens_to_ids(LANDMARK_TOKEN)
    if not 0 <= landmark_token_id < len(tokenizer):
        raise ValueError(
            f"landmark_token_id {landmark_token_id} is outside the vocabulary (0..{len(tokenizer) - 1}). Leave it "
            f"unset to add a new {LANDMARK_TOKEN} token."
        )
    return landmark_token_id


@torch.no_grad()
def _mean_init_rows(model, old_vocab_size, new_ids):
    """New vocabulary rows (input and output embeddings) start at the mean of the existing rows."""
    matrices = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        matrices.append(model.get_output_embeddings().weight)
    keep = torch.ones(old_vocab_size, dtype=torch.bool)
    keep[[i for i in new_ids if i < old_vocab_size]] = False
    for weight in matrices:
        mean = weight[:old_vocab_size][keep].float().mean(0).to(weight.dtype)
        weight[new_ids] = mean


def convert_llama(
    source,
    destination,
    block_size=64,
    train_context_length=512,
    retrieval_top_k=4,
    landmark_token_id=None,
    overwrite=False,
):
    """Convert the stock Llama folder `source` into a landmark-llama folder `destination`; returns its path."""
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder.")
    llama_config = _read_llama_config(source)
    _check_destination(source, destination, overwrite)

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens_before = len(tokenizer)
    landmark_token_id = _add_tokens(tokenizer, landmark_token_id)
    new_ids = list(range(tokens_before, len(tokenizer)))
    old_vocab_size = llama_config["vocab_size"]
    config_fields = {k: v for k, v in llama_config.items() if k in LandmarkLlamaConfig.__dataclass_fields__}
    # The landmark id is set once the vocabulary has grown to hold it.
    config = LandmarkLlamaConfig(
        **config_fields,
        block_size=block_size,
        train_context_length=train_context_length,
        retrieval_top_k=retrieval_top_k,
    )
    model = LandmarkLlamaForCausalLM.from_pretrained(source, config=config, dtype="auto")
    if len(tokenizer) > old_vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _mean_init_rows(model, old_vocab_size, new_ids)
    model.config.landmark_token_id = landmark_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.validate_architecture()

    # A literal "<landmark>" (or "</s>") in text is read as text, never as the control token: the model inserts
    # landmarks itself and refuses them in input_ids.
    tokenizer.split_special_tokens = True
    tokenizer.init_kwargs["split_special_tokens"] = True

    staging = staging_folder(destination)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish(staging, destination)  # an earlier conversion holding a user's file is refused there
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="stock Llama folder (config.json, safetensors weights, tokenizer)")
    parser.add_argument("destination", help="landmark-llama folder to write")
    parser.add_argument("--block_size", type=int, default=64, help="positions per block, landmark included")
    parser.add_argument("--train_context_length", type=int, default=512)
    parser.add_argument("--retrieval_top_k", type=int, default=4)
    parser.add_argument("--landmark_token_id", type=int, default=None, help="reuse this existing token id")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in destination")
    args = parser.parse_args(argv)
    with exit_with_message():
        destination = convert_llama(**vars(args))
    print(f"wrote {destination}")


if __name__ == "__main__":
    main()
