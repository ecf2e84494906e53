"""Configuration of landmark-llama: a Llama config plus the landmark-attention fields."""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


ATTENTION_BACKENDS = ("auto", "eager", "triton")
RETRIEVAL_GRANULARITIES = ("token", "chunk")
RETRIEVAL_POSITIONS = ("stingy", "true")


def check_choice(name, value, choices):
    """ValueError naming the field and its allowed values when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


@strict
class LandmarkLlamaConfig(LlamaConfig):
    r"""
    Configuration of a Llama model with landmark attention (Mohtashami & Jaggi, NeurIPS 2023). Every
    [`LlamaConfig`] argument keeps its meaning (GQA, `head_dim`, `rope_parameters`, tied embeddings, biases);
    the arguments below are added.

    Args:
        landmark_token_id (`int`):
            Vocabulary id of the `<landmark>` token. The model inserts it after every `block_size - 1` regular
            tokens; users never put it in `input_ids` themselves.
        block_size (`int`, *optional*, defaults to 64):
            Positions per landmark block, the landmark included (the paper's Llama run used 51).
        train_context_length (`int`, *optional*, defaults to 512):
            Context length (in user tokens) the model was fine-tuned at. Bounds the distances the block-retrieval
            cache lets a query see.
        retrieval_top_k (`int`, *optional*, defaults to 4):
            Number of cached blocks each query retrieves at inference (block-retrieval cache).
        retrieval_granularity (`str`, *optional*, defaults to `"token"`):
            `"token"`: every head and query token selects its own blocks (the paper's default); `"chunk"`: every head
            selects once per chunk (softmax over the landmarks, then max over the chunk's tokens).
        retrieval_positions (`str`, *optional*, defaults to `"stingy"`):
            `"stingy"`: retrieved blocks are rotated into a window of `retrieval_top_k + 1` blocks right before the
            current block, so no distance exceeds the training context (paper 3.2.1); `"true"`: no remapping.
        prefill_chunk_length (`int`, *optional*):
            Internal positions (landmarks included) a long prompt is processed in per pass. Default:
            `train_context_length - train_context_length % block_size - (retrieval_top_k + 1) * block_size`.
        cuda_graphs (`bool`, *optional*, defaults to `True`):
            Whether passes through the stack with the retrieval cache (decoding steps, prefill chunks) run with
            static shapes and no host reads and, on CUDA, replay captured CUDA graphs (one launch instead of
            thousands). Where capture cannot work, plain static passes run and the reason is logged once. `False`:
            every pass runs with the exact shapes of its rows.
        offload_to_cpu (`bool`, *optional*, defaults to `False`):
            Whether the retrieval cache keeps the keys and values of complete blocks in host memory (pinned on CUDA),
            each block copied once, when it completes. The landmark keys, the blocks around the current position and
            the recently retrieved blocks stay on the device; a decoding step fetches only the retrieved blocks it
            does not hold, by device-side copies a CUDA graph can capture. Same results as without offload.
        attention_backend (`str`, *optional*, defaults to `"auto"`):
            `"eager"` (plain PyTorch, any device), `"triton"` (the fused kernel, CUDA only) or `"auto"` (the kernel
            on CUDA where it supports the shapes, eager elsewhere). This replaces `attn_implementation`, which
            selects softmax attention kernels that cannot compute landmark attention.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether `generate` runs with the block-retrieval cache (`LandmarkRetrievalCache`). A forward call runs the
            training form over its whole input unless it is given a cache or `use_cache=True`.

    ```python
    >>> from landmark_llama import LandmarkLlamaConfig, LandmarkLlamaForCausalLM
    >>> config = LandmarkLlamaConfig(vocab_size=32001, landmark_token_id=32000, block_size=64)
    >>> model = LandmarkLlamaForCausalLM(config)
    ```"""

    model_type = "landmark_llama"

    landmark_token_id: int | None = None
    block_size: int = 64
    train_context_length: int = 512
    retrieval_top_k: int = 4
    retrieval_granularity: str = "token"
    retrieval_positions: str = "stingy"
    prefill_chunk_length: int | None = None
    cuda_graphs: bool = True
    offload_to_cpu: bool = False
    attention_backend: str = "auto"
    use_cache: bool = True

    def validate_architecture(self):
        """Part of `@strict` validation: the landmark fields must describe a model that can run."""
        super().validate_architecture()
        if self.block_size < 2:
            raise ValueError(
                f"block_size must be at least 2 (one regular token and the landmark), got {self.block_size}."
            )
        if self.train_context_length <= 0:
            raise ValueError(f"train_context_length must be positive, got {self.train_context_length}.")
        if self.retrieval_top_k < 1:
            raise ValueError(f"retrieval_top_k must be at least 1, got {self.retrieval_top_k}.")
        check_choice("retrieval_granularity", self.retrieval_granularity, RETRIEVAL_GRANULARITIES)
        check_choice("retrieval_positions", self.retrieval_positions, RETRIEVAL_POSITIONS)
        if self.prefill_chunk_length is not None and self.prefill_chunk_length < 1:
            raise ValueError(f"prefill_chunk_length must be positive or None, got {self.prefill_chunk_length}.")
        check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.landmark_token_id is not None:
            if not 0 <= self.landmark_token_id < self.vocab_size:
                raise ValueError(
                    f"landmark_token_id {self.landmark_token_id} is outside the vocabulary (size {self.vocab_size}). "
                    "Add a `<landmark>` token to the tokenizer and resize the embeddings "
                    "(tools/convert_llama.py does both)."
                )
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                ids = getattr(self, name)
                if self.landmark_token_id in (ids if isinstance(ids, list) else [ids]):
                    raise ValueError(
                        f"landmark_token_id {self.landmark_token_id} is also the {name}; "
                        "the landmark needs an id of its own."
                    )


__all__ = ["LandmarkLlamaConfig", "ATTENTION_BACKENDS", "RETRIEVAL_GRANULARITIES", "RETRIEVAL_POSITIONS"]
