"""Registers, spills and shared memory of each inference kernel compiled for an H100 (sm_90), read from ptxas without
a GPU, and how many of its programs a multiprocessor can hold at once: what bounds a latency-bound kernel such as a
decoding step's landmark scoring.

    python benchmarks/kernel_registers.py --out OUT_DIR [--max-registers 64 128]   (-> OUT_DIR/kernel_registers.*)

The kernels and their launch constants are those of `tests/compile_kernels.py` (the Llama 3 8B shape, bf16); each
again with its registers capped (the launch option `maxnreg`) at every `--max-registers`, where that is below what
it takes.
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import triton
from triton.runtime.errors import PTXASError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from compile_kernels import INFERENCE_KERNELS, compile_inference_kernel  # noqa: E402

# an sm_90 multiprocessor: 64K registers (allocated per warp in units of 256), 64 warps, 32 thread blocks, 227 KiB of
# shared memory a block can use
REGISTERS, WARPS, BLOCKS, SHARED = 65536, 64, 32, 232448


def ptxas_path():
    from triton.backends.nvidia import compiler
    return compiler.get_ptxas(90).path


def resources(ptx):
    """(registers a thread, spill store bytes, spill load bytes, stack bytes) from `ptxas -v`."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        report = subprocess.run([ptxas_path(), "-v", "--gpu-name", "sm_90a", source.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr

    def number(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return (number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"),
            number(r"(\d+) bytes spill loads"), number(r"(\d+) bytes stack frame"))


def programs_per_multiprocessor(registers, warps, shared):
    """Thread blocks of the kernel one multiprocessor holds at once: the least of the register, warp, block and
    shared-memory bounds."""
    per_warp = -(-registers * 32 // 256) * 256
    bounds = [REGISTERS // (per_warp * warps), WARPS // warps, BLOCKS]
    if shared:
        bounds.append(SHARED // shared)
    return min(bounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-registers", type=int, nargs="*", default=[])
    args = parser.parse_args()
    rows = []
    for name, (fn, pointers, constants, num_warps) in INFERENCE_KERNELS.items():
        for cap in [None] + sorted(args.max_registers, reverse=True):
            if cap is not None and cap >= rows[-1]["registers"]:
                continue
            try:
                compiled = compile_inference_kernel(fn, pointers, constants, num_warps, maxnreg=cap)
            except PTXASError:  # ptxas cannot allocate within the cap (wgmma's accumulators)
                print(f"{name}: no allocation within {cap} registers", flush=True)
                continue
            registers, spill_stores, spill_loads, stack = resources(compiled.asm["ptx"])
            shared = compiled.metadata.shared
            rows.append(dict(kernel=name, warps=num_warps, max_registers=cap, registers=registers,
                             spill_stores=spill_stores, spill_loads=spill_loads, stack=stack, shared=shared,
                             programs_per_sm=programs_per_multiprocessor(registers, num_warps, shared)))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(target="sm_90a", triton=triton.__version__, date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                command=shlex.join(["python", *sys.argv]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_registers.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = [f"# Inference kernels on sm_90, from ptxas (Triton {meta['triton']}, {meta['date']})", "",
             f"`{meta['command']}`", "",
             "| kernel | warps | cap | registers | spill stores B | spill loads B | stack B | shared B | "
             "programs / SM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kernel']} | {r['warps']} | {r['max_registers'] or '-'} | {r['registers']} | "
              f"{r['spill_stores']} | {r['spill_loads']} | {r['stack']} | {r['shared']} | {r['programs_per_sm']} |"
              for r in rows]
    (args.out / "kernel_registers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
