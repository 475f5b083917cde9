"""Train a recipe for a wall-clock budget, then measure it on the test (or valid) split.

    python benchmarks/quality.py ptb-small --minutes 30
    python benchmarks/quality.py shakespeare-char --minutes 30 --split valid
    python benchmarks/quality.py wikitext2 --minutes 30

Writes benchmarks/results/quality-RECIPE.json.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import run_json, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. --model.dropout=0.3 (after --)")
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-{args.recipe}")
    shutil.rmtree(out, ignore_errors=True)
    train_cmd = ["nlm", "train", args.recipe, "--out", str(out), "--max-minutes", str(args.minutes), "--json",
                 *args.overrides]
    trained = run_json(train_cmd)
    eval_cmd = ["nlm", "eval", str(out), "--split", args.split, "--json"]
    measured = run_json(eval_cmd)
    write(f"quality-{args.recipe}", {"recipe": args.recipe, "budget_minutes": args.minutes,
                                     "train_command": " ".join(train_cmd), "eval_command": " ".join(eval_cmd),
                                     "train": trained, f"{args.split}": measured})


if __name__ == "__main__":
    main()
