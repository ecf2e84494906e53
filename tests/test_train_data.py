"""train/data.py: packing, tokenization, reading local files, the collator (pure functions, no training)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from landmark_llama.tools.convert_llama import convert_llama
from landmark_llama.tools.tiny_llama import build_tiny_llama
from landmark_llama.train.data import collate_windows, load_documents, pack_documents, tokenize_and_pack

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    folder = convert_llama(build_tiny_llama(root / "stock"), root / "landmark", block_size=8)
    return AutoTokenizer.from_pretrained(folder)


def test_documents_are_joined_with_eos_and_cut_into_full_windows():
    documents = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]
    # stream: 10 11 12 E 13 E 14 15 16 17 18 E (12 tokens)
    assert pack_documents(documents, EOS, 4) == [[10, 11, 12, EOS], [13, EOS, 14, 15], [16, 17, 18, EOS]]
    assert pack_documents(documents, EOS, 5) == [[10, 11, 12, EOS, 13], [EOS, 14, 15, 16, 17]]  # tail of 2 dropped
    assert pack_documents(documents, EOS, 13) == []


def test_a_document_ending_in_eos_gets_no_second_one():
    assert pack_documents([[10, EOS], [11], []], EOS, 2) == [[10, EOS], [11, EOS]]  # the empty one adds one EOS
    assert pack_documents([[10, EOS], [11], []], EOS, 1) == [[10], [EOS], [11], [EOS], [EOS]]


@pytest.mark.parametrize("length", [0, -4])
def test_context_length_must_be_positive(length):
    with pytest.raises(ValueError, match="train_context_length must be positive.*--train_context_length"):
        pack_documents([[1, 2, 3]], EOS, length)


def test_tokenize_and_pack_keeps_order_skips_empty_documents_and_never_emits_the_landmark(tokenizer):
    landmark = tokenizer.convert_tokens_to_ids("<landmark>")
    batch = {"text": ["the sky is blue", "", "   ", "grass <landmark> green"]}
    windows = tokenize_and_pack(batch, tokenizer, "text", 4)["input_ids"]
    # A literal "<landmark>" in the text reads as text (an unknown word here), never as the control token.
    grass, green = tokenizer.convert_tokens_to_ids(["grass", "green"])
    stream = tokenizer("the sky is blue")["input_ids"] + [EOS, grass, tokenizer.unk_token_id, green, EOS]
    assert windows == [stream[:4], stream[4:8]]  # 9 tokens: two windows, the last EOS dropped
    assert landmark not in stream


def test_local_text_and_jsonl_files_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nsecond document\n")
    lines = [json.dumps({"body": text, "meta": {"i": i}}) for i, text in enumerate("xyz")]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "w", "meta": {"j": "s"}}))
    assert load_documents(str(tmp_path / "a.txt"))["text"] == ["first document", "second document"]
    documents = load_documents(str(tmp_path / "*.jsonl"), text_column="body")  # `meta` differs between the files
    assert documents.column_names == ["body"] and documents["body"] == ["x", "y", "z", "w"]


def test_bad_data_arguments_get_clear_errors(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    (tmp_path / "c.csv").write_text("text\nz\n")
    with pytest.raises(FileNotFoundError, match="--train_file .*missing.txt: no such file"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="exactly one of --train_file"):
        load_documents()
    with pytest.raises(ValueError, match="exactly one of --train_file"):
        load_documents(str(tmp_path / "a.txt"), dataset_name="somewhere/else")
    with pytest.raises(ValueError, match="use one kind of"):
        load_documents(str(tmp_path / "[ab].*"))
    with pytest.raises(ValueError, match="use one kind of"):
        load_documents(str(tmp_path / "c.csv"))
    with pytest.raises(ValueError, match="no 'body'; name the text column with --text_column"):
        load_documents(str(tmp_path / "b.jsonl"), text_column="body")


def test_collator_gives_labels_equal_to_input_ids_even_at_the_pad_id():
    batch = collate_windows([{"input_ids": [5, 0, 7]}, {"input_ids": [0, 2, 2]}])
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], torch.tensor([[5, 0, 7], [0, 2, 2]]))
