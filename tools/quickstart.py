"""The main job on a default that needs no download: build, convert, save, reload as remote code, run.

    python -m landmark_llama.tools.quickstart [--output DIR]

1. writes a tiny random stock Llama checkpoint (tools/tiny_llama.py),
2. converts it to landmark-llama (tools/convert_llama.py),
3. reloads the folder in a separate Python process with only transformers, via
   `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`,
4. runs a forward pass over a prompt spanning several landmark blocks and a short greedy generation,
5. generates after a prompt of 10 times the training context through the block-retrieval cache.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from landmark_llama.tools.convert_llama import convert_llama
from landmark_llama.tools.tiny_llama import build_tiny_llama


RUN_FROM_FOLDER = textwrap.dedent(
    """
    import sys, time, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    prompt = " ".join(["the grass is green . the sky is blue ."] * 6)
    inputs = tokenizer(prompt, return_tensors="pt")
    n = inputs.input_ids.shape[1]
    with torch.no_grad():
        out = model(**inputs, labels=inputs.input_ids)
    print(f"loaded {type(model).__name__} from {type(model).__module__}")
    print(f"prompt: {n} tokens, {n // (model.config.block_size - 1)} landmark blocks of {model.config.block_size}")
    print(f"logits {tuple(out.logits.shape)}, loss {out.loss.item():.3f} (random weights: about ln(vocab) = "
          f"{torch.log(torch.tensor(float(model.config.vocab_size))).item():.3f})")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print("greedy continuation:", tokenizer.decode(generated[0, n:]))

    context = model.config.train_context_length
    long_prompt = tokenizer(" ".join(["the grass is green ."] * (2 * context)), return_tensors="pt").input_ids
    start = time.perf_counter()
    out = model.generate(long_prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    blocks = int(cache.internal_lengths[0]) // model.config.block_size
    print(f"long prompt: {long_prompt.shape[1]} tokens ({long_prompt.shape[1] // context}x the training context "
          f"of {context}); {type(cache).__name__} holds {blocks} blocks a layer and retrieved "
          f"{cache.settings.retrieval_top_k} per head and token; 8 new tokens in {seconds:.1f} s")
    """
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="where to write the models (default: a temporary folder)")
    parser.add_argument("--block_size", type=int, default=8, help="landmark block size of the demo model")
    args = parser.parse_args(argv)
    output = Path(args.output or tempfile.mkdtemp(prefix="landmark-quickstart-"))

    stock = build_tiny_llama(output / "tiny-llama")
    print(f"stock tiny Llama written to {stock}")
    landmark = convert_llama(stock, output / "tiny-landmark-llama", block_size=args.block_size, overwrite=True)
    print(f"landmark-llama folder written to {landmark}: {sorted(p.name for p in landmark.iterdir())}")

    # A clean interpreter in a clean directory: the folder's own code files are all it has.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    subprocess.run([sys.executable, "-c", RUN_FROM_FOLDER, str(landmark.resolve())], cwd=output, env=env, check=True)


if __name__ == "__main__":
    main()
