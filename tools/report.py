"""Records, tables and plots of a measure against length, shared by the evaluation tools (passkey, perplexity)."""

import json
from pathlib import Path


def write_record(folder, name, runs, **fields):
    """`fields` and the runs ({label: {length: result}}) as folder/name.json (the folder made if needed); returns
    the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = {label: {str(n): result for n, result in per_length.items()} for label, per_length in runs.items()}
    (folder / f"{name}.json").write_text(json.dumps(dict(fields, results=results), indent=1) + "\n")
    return folder


def markdown_table(runs, cell):
    """A markdown table with one row per run ({label: {length: result}}) and one column per length; `cell` formats
    a result, and lengths a run lacks show as '-'."""
    lengths = sorted({length for results in runs.values() for length in results})
    lines = ["| model | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for label, results in runs.items():
        lines.append(f"| {label} | " + " | ".join(cell(results[n]) if n in results else "-" for n in lengths) + " |")
    return "\n".join(lines)


def length_plot(runs, path, title, xlabel, ylabel, value=float, log_y=False, ylim=None, marker_x=None,
                marker_label=None):
    """One line per run ({label: {length: result}}) of `value(result)` against length on a log2 x axis, saved as a
    PNG at `path`; `marker_x` draws a dotted vertical line (e.g. the training context)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.6))
    for label, results in runs.items():
        lengths = sorted(results)
        axes.plot(lengths, [value(results[n]) for n in lengths], marker="o", label=label)
    if marker_x is not None:
        axes.axvline(marker_x, color="grey", linestyle=":", label=marker_label)
    axes.set_xscale("log", base=2)
    if log_y:
        axes.set_yscale("log")
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
