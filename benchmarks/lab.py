"""The gradient lab's measurements, at each probe's default size (what the README quotes).

    python benchmarks/lab.py gradients    # RNN, LSTM, GRU at initialisation, and the compare runs' trained PTB models
    python benchmarks/lab.py depth
    python benchmarks/lab.py explode      # a tanh RNN at the defaults, and a ReLU one
    python benchmarks/lab.py memory       # three seeds
    python benchmarks/lab.py dependency   # the three PTB language models of `compare ptb`
    python benchmarks/lab.py gates        # the LSTM and GRU of `compare shakespeare`
    python benchmarks/lab.py compare ptb  # nlm compare, its report copied to docs/compare/ptb/

Each probe runs through `nlm diagnose` (one thread: the machine has 2 cores and these share it) with
its output in runs/lab/; the figures go to benchmarks/results/lab-PROBE.json and the plots to
docs/lab/ (compare reports to docs/compare/NAME/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import run_json, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "lab"
DOCS = ROOT / "docs"
COMPARE = ROOT / "runs" / "compare"

# name: (recipe, flags) of the compare runs (PTB: Adam for every cell, since the recipe's SGD at rate 20
# is tuned for LSTMs; the same settings for all three).
COMPARISONS = {
    "ptb": ("ptb-small", ["--steps", "1200", "--valid-every", "200", "--train.optimizer=adam", "--train.lr=0.002",
                          "--train.warmup_steps=50"]),
    "shakespeare": ("shakespeare-char-small", ["--steps", "1200", "--valid-every", "200"]),
}


def nlm(args: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return run_json(["nlm", *args, "--out", str(out), "--json"])


def keep_plots(source: Path, prefix: str) -> list[str]:
    (DOCS / "lab").mkdir(parents=True, exist_ok=True)
    kept = []
    for png in sorted([*source.glob("*.png"), *source.glob("*.html")]):
        target = DOCS / "lab" / (f"{prefix}{png.suffix}" if prefix.startswith(png.stem) else f"{prefix}-{png.name}")
        shutil.copyfile(png, target)
        kept.append(str(target.relative_to(ROOT)))
    return kept


def gradients() -> dict:
    figures = {}
    for cell in ("rnn", "lstm", "gru"):
        out = RUNS / f"gradients-{cell}"
        result = nlm(["diagnose", "gradients", "--cell", cell, "--layers", "2", "--data", "ptb"], out)
        figures[f"{cell}-initial"] = _gradient_figures(result, "initial") | {"plots": keep_plots(out, f"gradients-{cell}")}
    for cell in ("rnn", "lstm", "gru"):
        run = COMPARE / "ptb-small" / cell
        if (COMPARE / "ptb-small" / "compare.json").is_file():  # the comparison is finished
            out = RUNS / f"gradients-{cell}-trained"
            result = nlm(["diagnose", "gradients", str(run)], out)
            figures[f"{cell}-trained"] = _gradient_figures(result, "trained") | {
                "plots": keep_plots(out, f"gradients-{cell}-trained")}
    return figures


def _gradient_figures(result: dict, model: str) -> dict:
    m = result["models"][model]
    return {"decay_distance": m["decay_distance"], "rate_per_step": m["rate_per_step"],
            "layers": [{"decay_distance": layer["decay_distance"], "rate_per_step": layer["rate_per_step"],
                        "gradient_d0": layer["curve"][0]} for layer in m["layers"]],
            "recurrent": m["recurrent"], "length": result["length"], "rows": result["rows"]}


def probe(name: str, extra: list[str], tag: str | None = None) -> dict:
    out = RUNS / (tag or name)
    result = nlm(["diagnose", name, *extra], out)
    return {"result": result, "plots": keep_plots(out, tag or name)}


def compare(which: str) -> dict:
    recipe, flags = COMPARISONS[which]
    out = COMPARE / recipe
    resume = ["--resume"] if out.exists() else []
    report = nlm(["compare", recipe, *flags, "--no-progress", *resume], out)
    docs = DOCS / "compare" / which
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "compare.json", "curves.png", "gradients.png"):
        if (out / name).is_file():
            shutil.copyfile(out / name, docs / name)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["gradients", "depth", "explode", "memory", "dependency", "gates", "compare"])
    parser.add_argument("which", nargs="?", choices=sorted(COMPARISONS), help="compare: which comparison")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.probe == "gradients":
        figures = gradients()
    elif args.probe == "dependency":
        figures = probe("dependency", [str(COMPARE / "ptb-small" / c) for c in ("rnn", "lstm", "gru")])
    elif args.probe == "gates":
        figures = {cell: probe("gates", [str(COMPARE / "shakespeare-char-small" / cell)], f"gates-{cell}")
                   for cell in ("lstm", "gru")}
    elif args.probe == "explode":  # a tanh RNN (bounded states), and a ReLU one, whose states can overflow
        figures = {"rnn": probe("explode", []), "rnn_relu": probe("explode", ["--cell", "rnn_relu", "--steps", "150"],
                                                                   "explode-relu")}
    elif args.probe == "compare":
        if not args.which:
            parser.error("compare: name the comparison (" + ", ".join(COMPARISONS) + ")")
        figures = compare(args.which)
    elif args.probe == "memory":  # three seeds: a cell near the line at some distance can pass or fail by luck
        figures = probe("memory", ["--seeds", "3"])
    else:
        figures = probe(args.probe, [])
    write(f"lab-{args.probe}" + (f"-{args.which}" if args.which else ""), figures)


if __name__ == "__main__":
    main()
