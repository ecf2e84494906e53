"""Training data for landmark-llama: documents read, tokenized, joined with EOS and packed into fixed windows.

The windows hold plain tokens only: the model inserts a `<landmark>` after every `block_size - 1` of them itself,
so a window of `train_context_length` tokens runs as `train_context_length + train_context_length // (block_size
- 1)` positions inside the model. Putting landmarks here as well would be refused by the model.
"""

import glob
from pathlib import Path

import torch


FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json"}


def pack_documents(documents, eos_token_id, context_length):
    """Join tokenized documents into one stream, each followed by EOS, and cut it into windows of `context_length`.

    documents: lists of token ids. A document that already ends with EOS gets no second one. The tail shorter than
    a window is dropped, as the stock `run_clm` grouping does. Returns a list of windows (lists of token ids).
    """
    if context_length <= 0:
        raise ValueError(
            f"train_context_length must be positive, got {context_length}; pass --train_context_length N."
        )
    stream = []
    for document in documents:
        stream.extend(document)
        if not document or document[-1] != eos_token_id:
            stream.append(eos_token_id)
    usable = len(stream) - len(stream) % context_length
    return [stream[start : start + context_length] for start in range(0, usable, context_length)]


def tokenize_and_pack(batch, tokenizer, text_column, context_length):
    """`datasets.map` function (batched): text documents -> {"input_ids": windows}. Empty documents are skipped;
    each map batch (1,000 documents by default) is packed on its own, so each drops its own short tail.

    `split_special_tokens=True` reads a literal "<landmark>" or "</s>" in the text as text, never as the control
    token, so no corpus can smuggle a landmark into the windows.
    """
    texts = [text for text in batch[text_column] if text and text.strip()]
    documents = tokenizer(texts, split_special_tokens=True)["input_ids"]
    return {"input_ids": pack_documents(documents, tokenizer.eos_token_id, context_length)}


def load_documents(train_file=None, dataset_name=None, dataset_config_name=None, split="train", text_column="text"):
    """The training documents as a `datasets.Dataset` whose one column, `text_column`, holds strings.

    train_file: a local `.txt` file (one document a line) or `.json`/`.jsonl` file (one object a line), or a glob
    of such files. dataset_name: any `datasets.load_dataset` name instead (needs a reachable hub for remote names).
    """
    import datasets  # here, so that packing and collating need only torch

    if (train_file is None) == (dataset_name is None):
        raise ValueError("Pass exactly one of --train_file (local text or jsonl) and --dataset_name.")
    if train_file is not None:
        files = sorted(glob.glob(train_file))
        if not files:
            raise FileNotFoundError(
                f"--train_file {train_file}: no such file. Pass a .txt file with one document a line or a .jsonl "
                f"file with a '{text_column}' field (a glob such as 'data/*.jsonl' also works)."
            )
        suffixes = {Path(file).suffix for file in files}
        if len(suffixes) > 1 or not suffixes <= FILE_BUILDERS.keys():
            raise ValueError(
                f"--train_file {train_file}: files end in {sorted(suffixes)}; use one kind of {sorted(FILE_BUILDERS)}."
            )
        # One file at a time, keeping only the text: other fields (RedPajama's `meta`) differ between files.
        builder = FILE_BUILDERS[suffixes.pop()]
        parts = [datasets.load_dataset(builder, data_files=file, split="train") for file in files]
    else:
        parts = [datasets.load_dataset(dataset_name, dataset_config_name, split=split)]
    for part in parts:
        if text_column not in part.column_names:
            raise ValueError(
                f"The training data has columns {part.column_names}, no '{text_column}'; name the text column with "
                "--text_column."
            )
    return datasets.concatenate_datasets([part.select_columns([text_column]) for part in parts])


def collate_windows(windows):
    """Trainer collator: equal-length windows -> input_ids and labels (the same tokens; the model shifts them).

    Labels are not masked at padding ids: packed windows hold no padding, and a tokenizer whose pad id is its EOS
    id would otherwise lose every document boundary from the loss.
    """
    input_ids = torch.tensor([window["input_ids"] for window in windows], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids}
