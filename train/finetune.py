"""Fine-tune a Llama checkpoint with landmark attention, using the stock transformers `Trainer`.

One GPU, LoRA (the landmark's embedding and output rows train with the adapters):

    python -m landmark_llama.train.finetune --model_name_or_path path/to/llama --block_size 51 \
        --train_context_length 512 --train_file data.jsonl --output_dir out/lora --lora_r 16 --merge_lora \
        --bf16 --activation_checkpointing --max_steps 1000 --learning_rate 2e-4

Many GPUs, full fine-tuning with FSDP sharding the decoder layers (the paper's run: train/recipes/):

    torchrun --nproc_per_node 8 -m landmark_llama.train.finetune --model_name_or_path path/to/llama --block_size 51 \
        --train_file data.jsonl --output_dir out/full --fsdp --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
        --bf16 ...

(`--fsdp` is FSDP2 with full sharding; the paper's spelling `--fsdp "full_shard auto_wrap"` means the same.)

Resume: the same command with `--resume_from_checkpoint out/full/checkpoint-2000` (or `last`).

`--model_name_or_path` is a landmark-llama folder, or a stock Llama folder that is converted first (with
`--block_size`) into `<output_dir>/landmark-llama-init`. Every `TrainingArguments` option works as usual. The
output folder loads with `AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)`; with LoRA it
holds the adapter, and `--merge_lora` writes the merged model to `<output_dir>/merged`.

Bad input (a missing file, a wrong option value, a folder that holds no Llama) ends the command with its message
and exit status 1; `build_trainer()` raises it.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed

from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM
from landmark_llama.tools.cli import exit_with_message
from landmark_llama.tools.convert_llama import LANDMARK_TOKEN, PAD_TOKEN, convert_llama
from landmark_llama.train.data import collate_windows, load_documents, tokenize_and_pack


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A landmark-llama folder, or a stock Llama folder (converted first, see --block_size)."}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Positions per landmark block, landmark included (the paper: 51). Default: the "
                          "landmark-llama config's value, or 64 when converting a stock Llama."},
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the weights are loaded in: float32 (master weights for --bf16 mixed precision) "
                          "or bfloat16 (halves memory, for LoRA on one GPU).",
                  "choices": ["float32", "bfloat16"]},
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get LoRA adapters."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "After LoRA training, also write the merged full model to <output_dir>/merged."},
    )
    fsdp_transformer_layer_cls_to_wrap: str | None = field(
        default=None,
        metadata={"help": "Class FSDP wraps as one unit (the paper's flag; same as fsdp_config's "
                          "transformer_layer_cls_to_wrap). Default: the model's decoder layer, LlamaDecoderLayer."},
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local .txt (one document a line) or .jsonl (a text field a line) file, or a glob of them."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets.load_dataset name instead."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    text_column: str = field(default="text", metadata={"help": "Field holding each document's text."})
    train_context_length: int | None = field(
        default=None,
        metadata={"help": "Plain tokens per training window (the paper: 512); landmarks come on top, inserted by "
                          "the model. Default: the config's train_context_length."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing and packing."}
    )


def _checkpointing_names(argv):
    """transformers 5.23 renamed --gradient_checkpointing(_kwargs) to --activation_checkpointing(_kwargs) and warns on
    the old name; either name works here, passed on under the one the installed version defines."""
    fields = TrainingArguments.__dataclass_fields__
    new_name = "activation_checkpointing" in fields
    old, current = ("gradient", "activation") if new_name else ("activation", "gradient")
    renamed = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if flag in (f"--{old}_checkpointing", f"--{old}_checkpointing_kwargs"):
            arg = flag.replace(old, current, 1) + sep + value
        renamed.append(arg)
    return renamed


def parse_arguments(argv):
    """The command line `argv` as (ModelArguments, DataArguments, TrainingArguments)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=_checkpointing_names(argv))


def main(argv=None):
    # Bad input is found before training starts (TrainingArguments checks its values while parsing): its message,
    # no traceback. An error during training keeps its traceback.
    with exit_with_message():
        model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else list(argv))
        trainer = build_trainer(model_args, data_args, training_args)
    return train(trainer, model_args)


def build_trainer(model_args, data_args, training_args):
    """The data read and packed, the model loaded (a stock Llama converted first), in a Trainer ready to train."""
    if data_args.train_context_length is not None and data_args.train_context_length <= 0:
        raise ValueError(
            f"--train_context_length must be positive, got {data_args.train_context_length} (the paper used 512)."
        )
    set_logging(training_args)
    set_seed(training_args.seed)  # before LoRA's random adapter init

    # The data first: a missing file fails in seconds, not after loading a 7B model.
    with training_args.main_process_first(desc="reading the training data"):
        documents = load_documents(
            data_args.train_file, data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_split,
            data_args.text_column,
        )

    model, tokenizer = load_model_and_tokenizer(model_args, data_args, training_args)
    set_fsdp_wrap_class(model, model_args, training_args)
    if model_args.lora_r > 0:
        model = add_lora(model, model_args, tokenizer)

    # Tokenized once by the main process; the other ranks read the datasets cache it leaves.
    context_length = model.config.train_context_length
    with training_args.main_process_first(desc="tokenizing and packing"):
        train_dataset = documents.map(
            tokenize_and_pack,
            batched=True,
            remove_columns=documents.column_names,
            num_proc=data_args.preprocessing_num_workers,
            fn_kwargs=dict(tokenizer=tokenizer, text_column=data_args.text_column, context_length=context_length),
            desc="tokenizing and packing",
        )
    if len(train_dataset) == 0:
        raise ValueError(
            f"The training data holds less than one window of {context_length} tokens; add documents or lower "
            "--train_context_length."
        )
    logger.info(f"{len(train_dataset)} training windows of {context_length} tokens")

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collate_windows,
        processing_class=tokenizer,
    )
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        logger.warning(
            f"--fsdp is set, but accelerate runs without FSDP here ({training_args.world_size} process(es) on "
            f"{training_args.device.type}): it shards only across several GPUs."
        )
    return trainer


def train(trainer, model_args):
    """Train (or resume), save the model, metrics and state, and with --merge_lora the merged model; returns the
    Trainer."""
    training_args = trainer.args
    resume = training_args.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    trainer.save_model()  # a full model folder (under FSDP gathered to a full state dict), or the LoRA adapter
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    if model_args.merge_lora and training_args.should_save:
        merge_lora(training_args.output_dir, Path(training_args.output_dir) / "merged", model_args.model_dtype)
    return trainer


def set_logging(training_args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)


def load_model_and_tokenizer(model_args, data_args, training_args):
    """The landmark-llama model and its tokenizer; a stock Llama folder is converted first."""
    folder = model_args.model_name_or_path
    overrides = {"block_size": model_args.block_size, "train_context_length": data_args.train_context_length}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in ("llama", LandmarkLlamaConfig.model_type):  # loaded anyway, it would be a default-size Llama
        raise ValueError(
            f"--model_name_or_path {folder} holds a {model_type!r} model; pass a landmark-llama folder or a stock "
            "Llama one (it is converted first)."
        )
    if model_type == "llama":
        source, folder = folder, Path(training_args.output_dir) / "landmark-llama-init"
        # Written where the Trainer writes (main process, or each node's with --save_on_each_node), read by all.
        with training_args.main_process_first(local=training_args.save_on_each_node, desc="conversion"):
            if training_args.should_save:
                convert_llama(source, folder, overwrite=True, **overrides)
                logger.info(f"converted {source} to landmark-llama in {folder}")
    model = LandmarkLlamaForCausalLM.from_pretrained(folder, dtype=model_args.model_dtype, **overrides)
    model.config.validate_architecture()  # the overrides above bypass the config's own checks
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_tokenizer(tokenizer, model.config, folder)
    return model, tokenizer


def check_tokenizer(tokenizer, config, folder):
    """The data pipeline and the model must agree on the landmark id; packing needs EOS."""
    landmark = config.landmark_token_id
    known = tokenizer.get_vocab().get(LANDMARK_TOKEN, landmark)
    if landmark is None or landmark >= len(tokenizer) or known != landmark:
        elsewhere = "" if known == landmark else f" and {LANDMARK_TOKEN} at id {known}"
        raise ValueError(
            f"The tokenizer in {folder} has no landmark token (the model's landmark_token_id is {landmark}, the "
            f"tokenizer has {len(tokenizer)} tokens{elsewhere}). Use the tokenizer tools/convert_llama.py saved with "
            "the model, or convert the stock Llama again."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer in {folder} has no EOS token; documents are joined with EOS.")


def set_fsdp_wrap_class(model, model_args, training_args):
    """Applies --fsdp_transformer_layer_cls_to_wrap and checks that the class FSDP wraps exists in the model.

    Without the check, a wrong name fails late inside accelerate, or wraps nothing and shards nothing.
    """
    wrap_class = model_args.fsdp_transformer_layer_cls_to_wrap
    if wrap_class and not training_args.fsdp:
        raise ValueError("--fsdp_transformer_layer_cls_to_wrap needs --fsdp (e.g. --fsdp 'full_shard auto_wrap').")
    if not training_args.fsdp:
        return
    if wrap_class:
        # TrainingArguments turned fsdp_config into accelerate's plugin arguments when parsed: update both.
        training_args.fsdp_config["transformer_layer_cls_to_wrap"] = [wrap_class]
        training_args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = wrap_class
    present = {type(module).__name__ for module in model.modules()}
    decoder_layer = type(model.model.layers[0]).__name__
    for name in training_args.fsdp_config.get("transformer_layer_cls_to_wrap") or []:
        if name not in present:
            raise ValueError(
                f"--fsdp_transformer_layer_cls_to_wrap {name}: no module of class {name} in the model; the decoder "
                f"layer class is {decoder_layer}."
            )


def add_lora(model, model_args, tokenizer):
    """LoRA adapters, plus full training of the embedding and output rows of the tokens the conversion added.

    The landmark row (and `<pad>`, when the conversion added it) starts as the mean of the other rows and carries
    the whole block summary: frozen there, the landmark could not learn. peft's `trainable_token_indices` trains
    only these rows; with tied embeddings the lm_head follows embed_tokens by itself.
    """
    rows = [model.config.landmark_token_id]
    if tokenizer.pad_token == PAD_TOKEN:
        rows.append(tokenizer.pad_token_id)
    trainable_rows = {"embed_tokens": rows}
    if not model.config.tie_word_embeddings:
        trainable_rows["lm_head"] = rows
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        trainable_token_indices=trainable_rows,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def merge_lora(adapter_folder, destination, dtype="float32"):
    """Saved adapter + its base model -> one full landmark-llama folder (code files included) at `destination`."""
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_folder, dtype=dtype).merge_and_unload()
    model.save_pretrained(destination)
    AutoTokenizer.from_pretrained(adapter_folder).save_pretrained(destination)
    logger.info(f"merged model written to {destination}")


if __name__ == "__main__":
    main()
