"""Weight diffs of a landmark-llama folder against its base checkpoint, for sharing models whose base weights may not
be redistributed (as the paper released its Llama 7B).

    python -m landmark_llama.tools.weight_diff make --base BASE --tuned TUNED --out DIFF
    python -m landmark_llama.tools.weight_diff recover --base BASE --diff DIFF --out TUNED

`make` writes DIFF: safetensors shards holding, for every tensor the tuned model shares with the base, its
difference from the base, and whole the tensors (or the added vocabulary rows) the base does not have; config, code
files, tokenizer, a model card, and `weight_diff.json`, a manifest with the sha256 of every tensor to recover and of
every base tensor it needs. The difference is bitwise (XOR of the two tensors' bit patterns): recovery is exact for
every dtype, which a floating-point subtraction is not, and useless without the base. Both commands stream one
tensor at a time and write a shard whenever it is full, so memory stays near one shard.

`recover` checks the base against the manifest before it writes anything, and every recovered tensor after; a wrong
base, a corrupt or truncated diff and a dtype mismatch are refused with the tensor and the fix named. Output folders
are written beside their destination and moved into place only when complete; a folder that holds anything else is
never replaced.
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from landmark_llama.tools.cli import exit_with_message
from landmark_llama.tools.folders import check_new_folder, publish, staging_folder


MANIFEST = "weight_diff.json"
FORMAT = "landmark-llama-weight-diff"
ADDED_ROWS = ".added_rows"  # suffix of the tensor holding a grown vocabulary's new rows whole
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# What a model folder holds besides weights; copied from the tuned folder into the diff and from the diff out.
_CARRIED = ("*.json", "*.py", "*.model", "*.txt", "*.jinja", "*.tiktoken")


class DtypeMismatchError(TypeError):
    """A base, tuned or diff tensor is not in the dtype the other side needs: the user's files, not a bug."""


def _nbytes(dtype, shape):
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def sha256(tensor):
    """sha256 of a tensor's bytes (contiguous, row-major), the same for a tensor and its safetensors copy."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _bits(tensor):
    return tensor.contiguous().view(_BIT_VIEWS[tensor.element_size()])


def bitwise_diff(tuned, base):
    """XOR of the bit patterns, in the tensors' dtype: `bitwise_diff(bitwise_diff(t, b), b)` is `t`, bit for bit."""
    if tuned.dtype != base.dtype:
        raise TypeError(f"dtypes differ: {tuned.dtype} and {base.dtype}")
    return torch.bitwise_xor(_bits(tuned), _bits(base)).view(tuned.dtype)


class _Weights:
    """A model folder's safetensors weights, read one tensor at a time with plain file reads (no memory map, whose
    pages would count against the process), every header checked against the file's size."""

    def __init__(self, folder, role):
        self.folder, self.role = Path(folder), role
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(path.name for path in self.folder.glob("*.safetensors"))
        if not files:
            pickled = sorted(path.name for path in self.folder.glob("*.bin"))
            hint = f" ({', '.join(pickled)} are pickle files, which can run code and are not read)" if pickled else ""
            raise FileNotFoundError(f"{role} folder {self.folder} has no safetensors weights{hint}.")
        self.location, self.entries = {}, {}
        for file in files:
            for name, entry in self._header(file).items():
                self.location[name], self.entries[name] = file, entry

    def _corrupt(self, file, why):
        return ValueError(f"{self.role} file {self.folder / file} is corrupt or truncated ({why}); download or copy "
                          "it again.")

    def _header(self, file):
        path = self.folder / file
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                raise self._corrupt(file, "the header runs past the end of the file")
            try:
                header = json.loads(handle.read(length))
            except ValueError as error:
                raise self._corrupt(file, f"unreadable header: {error}") from None
        header.pop("__metadata__", None)
        data_start, dtypes = 8 + length, {value: key for key, value in _SAFETENSORS_DTYPES.items()}
        entries = {}
        for name, info in header.items():
            begin, finish = info["data_offsets"]
            dtype = dtypes.get(info["dtype"])
            if dtype is None:
                raise self._corrupt(file, f"tensor {name} has the unknown dtype {info['dtype']}")
            expected = _nbytes(dtype, info["shape"])
            if finish - begin != expected or data_start + finish > size:
                raise self._corrupt(file, f"tensor {name} runs past the end of the file")
            entries[name] = (dtype, list(info["shape"]), data_start + begin, expected)
        return entries

    def __contains__(self, name):
        return name in self.location

    def header(self, name):
        """(dtype, shape) of a tensor, from the file header alone."""
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def get(self, name):
        dtype, shape, offset, size = self.entries[name]
        buffer = bytearray(size)
        with open(self.folder / self.location[name], "rb") as handle:
            handle.seek(offset)
            if handle.readinto(buffer) != size:
                raise self._corrupt(self.location[name], f"tensor {name} is cut short")
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors(path, entries):
    """Write a safetensors file one tensor at a time: `entries` is a list of (name, dtype, shape, make) where make()
    returns the tensor, called only when its bytes are due, so memory holds one tensor, never the file."""
    offset, header = 0, {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, _ in entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for name, dtype, shape, make in entries:
            tensor = make()
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{name}: made {tensor.dtype} {tuple(tensor.shape)}, announced {dtype} {shape}")
            file.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)


def _copy_carried(source, target, skip=()):
    for pattern in _CARRIED:
        for path in source.glob(pattern):
            if path.name not in skip and path.name != "model.safetensors.index.json" and path.is_file():
                shutil.copy2(path, target / path.name)


def _write_index(folder, weight_map, total_size):
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _model_card(base, manifest):
    from huggingface_hub import ModelCard, ModelCardData

    base_config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    base_name = base_config.get("_name_or_path") or Path(base).name
    license_name = None
    base_card = Path(base) / "README.md"
    if base_card.is_file():
        license_name = ModelCard.load(base_card).data.to_dict().get("license")
    data = ModelCardData(
        base_model=base_name, library_name="transformers", license=license_name,
        tags=["landmark-attention", "landmark-llama", "weight-diff"],
    )
    text = f"""---
{data.to_yaml()}
---

# Weight diff of a landmark-llama model against `{base_name}`

This folder is not a model by itself: it holds the bitwise difference of a landmark-llama model (landmark attention,
Mohtashami & Jaggi 2023) from its base checkpoint, so that the base weights are not redistributed. Recover the model
with the base weights and the landmark-llama package:

```bash
python -m landmark_llama.tools.weight_diff recover --base path/to/{Path(base).name} --diff path/to/this-folder \\
    --out landmark-llama
```

then load it with `AutoModelForCausalLM.from_pretrained("landmark-llama", trust_remote_code=True)`.
`{MANIFEST}` lists the sha256 of each of the {len(manifest["base"])} base tensors recovery needs and of each of the
{len(manifest["tensors"])} tensors it writes; a wrong base is refused before anything is written.
"""
    return ModelCard(text)


def make(base, tuned, out, overwrite=False):
    """Write the diff of the model folder `tuned` against `base` to the new folder `out`; returns its path.

    The diff has one shard per shard of the tuned model, written one tensor at a time."""
    base, tuned, out = Path(base), Path(tuned), Path(out)
    check_new_folder(out, MANIFEST, overwrite)
    base_weights, tuned_weights = _Weights(base, "base"), _Weights(tuned, "tuned")
    manifest = {"format": FORMAT, "version": 1, "encoding": "xor", "tensors": {}, "base": {}, "diff_files": {}}
    plan = {}  # tuned shard -> entries for write_safetensors
    for name in sorted(tuned_weights.location):
        file = tuned_weights.location[name]
        dtype, shape = tuned_weights.header(name)
        entry = {"dtype": _dtype_name(dtype), "shape": shape, "file": file}
        entries = plan.setdefault(file, [])
        if name not in base_weights:
            entry["diff"] = "whole"
            entries.append((name, dtype, shape, _recorded(tuned_weights.get, name, entry)))
            manifest["tensors"][name] = entry
            continue
        base_dtype, base_shape = base_weights.header(name)
        if base_dtype != dtype:
            raise DtypeMismatchError(
                f"tensor {name} is {base_dtype} in the base and {dtype} in the tuned model; save the tuned model in "
                "the base's dtype (or convert the base) before making a diff."
            )
        grown = len(shape) == len(base_shape) > 0 and shape[1:] == base_shape[1:] and shape[0] > base_shape[0]
        if base_shape != shape and not grown:
            raise ValueError(
                f"tensor {name} has shape {tuple(base_shape)} in the base and {tuple(shape)} in the tuned model: the "
                "tuned model was not made from this base."
            )
        entry["diff"] = "xor"
        manifest["base"][name] = {"dtype": entry["dtype"], "shape": base_shape}
        rows = base_shape[0] if grown else None

        def diff(name=name, rows=rows, entry=entry):
            tensor, reference = tuned_weights.get(name), base_weights.get(name)
            entry["sha256"], manifest["base"][name]["sha256"] = sha256(tensor), sha256(reference)
            return bitwise_diff(tensor[:rows] if rows is not None else tensor, reference)

        entries.append((name, dtype, base_shape, diff))
        if grown:  # new vocabulary rows (landmark, pad): nothing to diff against, stored whole
            entry["added_rows"] = shape[0] - rows
            added = [entry["added_rows"], *shape[1:]]
            entries.append((name + ADDED_ROWS, dtype, added, lambda n=name, r=rows: tuned_weights.get(n)[r:]))
        manifest["tensors"][name] = entry

    staging = staging_folder(out)
    try:
        for number, (_, entries) in enumerate(tqdm(sorted(plan.items()), desc="writing the diff", unit="shard"), 1):
            # named so that no loader mistakes the diff for weights
            file = f"weight_diff-{number:05d}-of-{len(plan):05d}.safetensors"
            write_safetensors(staging / file, entries)
            manifest["diff_files"].update({name: file for name, *_ in entries})
        _copy_carried(tuned, staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _model_card(base, manifest).save(staging / "README.md")
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _recorded(get, name, entry):
    """make() for a tensor stored whole: the tensor, its sha256 noted in the manifest entry on the way."""
    def make():
        tensor = get(name)
        entry["sha256"] = sha256(tensor)
        return tensor

    return make


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _read_manifest(diff):
    path = Path(diff) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{diff} is not a weight diff: it has no {MANIFEST}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path} is corrupt ({error}); download the diff again.") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise ValueError(f"{path} is not a {FORMAT} version 1 manifest; update landmark-llama to read it.")
    return manifest


def check_base(base, manifest):
    """Refuse a base whose tensors are not the ones the diff was made against (before anything is written)."""
    base_weights = _Weights(base, "base")
    for name, expected in tqdm(sorted(manifest["base"].items()), desc="checking the base", unit="tensor"):
        if name not in base_weights:
            raise ValueError(f"the base {base} has no tensor {name}; this diff needs the base it was made from.")
        tensor = base_weights.get(name)
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != expected["dtype"]:
            raise DtypeMismatchError(
                f"base tensor {name} is {dtype}, the diff was made against {expected['dtype']}; use the base "
                f"checkpoint in {expected['dtype']} (as published), not a converted copy."
            )
        if list(tensor.shape) != expected["shape"] or sha256(tensor) != expected["sha256"]:
            raise ValueError(
                f"base tensor {name} differs from the one the diff was made against (sha256 mismatch); this is the "
                "wrong base checkpoint or a modified copy of it."
            )
    return base_weights


def recover(base, diff, out, overwrite=False):
    """Recover the tuned model from `base` and the diff folder `diff` into the new folder `out`; returns its path."""
    base, diff, out = Path(base), Path(diff), Path(out)
    manifest = _read_manifest(diff)
    check_new_folder(out, "config.json", overwrite)
    base_weights = check_base(base, manifest)
    diff_weights = _Weights(diff, "diff")
    missing = sorted(set(manifest["diff_files"]) - set(diff_weights.location))
    if missing:
        raise ValueError(f"the diff {diff} lacks tensors {missing[:3]}: it is incomplete; download it again.")
    for name, file in manifest["diff_files"].items():
        expected = manifest["tensors"].get(name.removesuffix(ADDED_ROWS), {}).get("dtype")
        dtype, _ = diff_weights.header(name)
        if _dtype_name(dtype) != expected:
            raise DtypeMismatchError(
                f"diff tensor {name} is {_dtype_name(dtype)}, the manifest says {expected}: the diff is corrupt; "
                "download it again."
            )

    def recovered(name, entry):
        stored = diff_weights.get(name)
        if entry["diff"] == "xor":
            tensor = bitwise_diff(stored, base_weights.get(name))
            if "added_rows" in entry:
                tensor = torch.cat([tensor, diff_weights.get(name + ADDED_ROWS)])
        else:
            tensor = stored
        if list(tensor.shape) != entry["shape"] or sha256(tensor) != entry["sha256"]:
            raise ValueError(
                f"recovered tensor {name} does not match the manifest (sha256 mismatch): the diff is corrupt or was "
                "edited; download it again."
            )
        return tensor

    plan = {}
    for name, entry in sorted(manifest["tensors"].items()):
        dtype = getattr(torch, entry["dtype"])
        plan.setdefault(entry["file"], []).append(
            (name, dtype, entry["shape"], lambda name=name, entry=entry: recovered(name, entry))
        )
    staging = staging_folder(out)
    try:
        weight_map, total_size = {}, 0
        for file, entries in tqdm(sorted(plan.items()), desc="recovering", unit="shard"):
            write_safetensors(staging / file, entries)
            for name, dtype, shape, _ in entries:
                weight_map[name] = file
                total_size += _nbytes(dtype, shape)
        _write_index(staging, weight_map, total_size)
        _copy_carried(diff, staging, skip={MANIFEST, "README.md"})
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


PAPER_MODEL_TYPE = "llama_with_landmark"


def _load_paper_weights(folder):
    """The paper's diff weights: safetensors, or the pytorch_model*.bin its transformers 4.28 wrote, read with
    torch's weights-only unpickler (tensors only: no code in the file can run)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return {name: tensor for file in files for name, tensor in load_file(file).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder} has no weights (safetensors or pytorch_model*.bin).")
    state = {}
    for file in files:
        try:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as error:  # the weights-only unpickler refuses anything but tensors
            raise ValueError(f"{file} is not a plain tensor checkpoint ({error}); it is refused unread.") from None
    return state


def import_paper(base, diff, out, overwrite=False):
    """Recover a model released in the paper's format (Alpaca-style: tuned minus base, the base first resized with
    `[PAD]` and `<landmark>` rows at the mean of its rows; config `llama_with_landmark` with `mem_id`, `mem_freq`) and
    write it as a landmark-llama folder: `block_size = mem_freq + 1`, the landmark id kept. Needs the model's memory
    in fp32, as the authors' own recovery does."""
    from transformers import AutoTokenizer

    from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM

    base, diff, out = Path(base), Path(diff), Path(out)
    config = json.loads((diff / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != PAPER_MODEL_TYPE or "mem_freq" not in config:
        raise ValueError(f"{diff} is not a diff in the paper's format: its config is not {PAPER_MODEL_TYPE!r} with "
                         "mem_id and mem_freq.")
    check_new_folder(out, "config.json", overwrite)
    base_weights = _Weights(base, "base")
    tuned = _load_paper_weights(diff)
    recovered = {}
    for name, difference in tqdm(sorted(tuned.items()), desc="recovering", unit="tensor"):
        if name not in base_weights:
            raise ValueError(f"the base {base} has no tensor {name}; use the Llama checkpoint the diff was made from.")
        reference = base_weights.get(name).float()
        added = difference.shape[0] - reference.shape[0] if difference.dim() else 0
        if added > 0 and name.endswith(("embed_tokens.weight", "lm_head.weight")):  # their resize of the base
            reference = torch.cat([reference, reference.mean(0, keepdim=True).expand(added, -1)])
        if reference.shape != difference.shape:
            raise ValueError(f"tensor {name} is {tuple(difference.shape)} in the diff and {tuple(reference.shape)} in "
                             "the base: the diff was not made from this base.")
        recovered[name] = difference.float() + reference
    checksum = diff / "checksum_psum.txt"
    if checksum.is_file():  # the authors' integrity check: the sum of every recovered weight
        expected, total = float(checksum.read_text()), sum(t.sum().item() for t in recovered.values())
        if abs(total - expected) > 1e-2:  # their tolerance
            raise ValueError(f"the recovered weights sum to {total}, the diff's checksum_psum.txt says {expected}: "
                             "the base is the wrong checkpoint or a file is corrupt.")
    # RoPE buffers their transformers saved (and summed above); recomputed by ours
    recovered = {name: tensor for name, tensor in recovered.items() if "rotary_emb" not in name}

    llama_fields = {k: v for k, v in config.items() if k in LandmarkLlamaConfig.__dataclass_fields__ and k not in (
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map",
        "train_context_length", "use_cache")}
    landmark_config = LandmarkLlamaConfig(
        **llama_fields, landmark_token_id=config["mem_id"], block_size=config["mem_freq"] + 1,
        train_context_length=config.get("train_context_length", 512), attention_backend="auto",
    )
    model = LandmarkLlamaForCausalLM(landmark_config)
    model.load_state_dict(recovered, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(diff)
    tokenizer.split_special_tokens = True  # a literal "<landmark>" in text stays text
    tokenizer.init_kwargs["split_special_tokens"] = True
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.validate_architecture()
    staging = staging_folder(out)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="write the diff of a tuned folder against its base")
    make_parser.add_argument("--base", required=True)
    make_parser.add_argument("--tuned", required=True)
    make_parser.add_argument("--out", required=True)
    make_parser.add_argument("--overwrite", action="store_true", help="replace an earlier diff in --out")
    recover_parser = commands.add_parser("recover", help="rebuild the tuned folder from the base and a diff")
    recover_parser.add_argument("--base", required=True)
    recover_parser.add_argument("--diff", required=True)
    recover_parser.add_argument("--out", required=True)
    recover_parser.add_argument("--overwrite", action="store_true", help="replace an earlier recovery in --out")
    paper_parser = commands.add_parser("import-paper", help="recover a diff in the paper's format as landmark-llama")
    paper_parser.add_argument("--base", required=True)
    paper_parser.add_argument("--diff", required=True)
    paper_parser.add_argument("--out", required=True)
    paper_parser.add_argument("--overwrite", action="store_true", help="replace an earlier output in --out")
    args = vars(parser.parse_args(argv))
    command = {"make": make, "recover": recover, "import-paper": import_paper}[args.pop("command")]
    with exit_with_message(DtypeMismatchError):
        written = command(**args)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
