"""The demo, measured: train the demo recipe (a fixed number of steps), evaluate it on the
validation split, sample from it, and count how many sampled words are real words.

    python benchmarks/demo.py
    python benchmarks/demo.py --recipe shakespeare-char-small -- --train.max_steps=1000   # a tuning try

A "word" is a maximal run of letters; it is real when the training text holds the same
run (case-sensitive). Writes benchmarks/results/demo.json (or demo-try.json with overrides).
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

from common import run_json, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neurallm.data import corpora  # noqa: E402

# The sample the demo prints (scripts/demo.sh runs the same command).
SAMPLE = ["--prompt", "ROMEO:", "--max-tokens", "400", "--temperature", "0.8", "--seed", "1"]


def real_word_share(sample: str, training_text: str) -> tuple[float, int]:
    known = set(re.findall(r"[A-Za-z]+", training_text))
    words = re.findall(r"[A-Za-z]+", sample)
    return (sum(w in known for w in words) / len(words) if words else 0.0), len(words)


def xz_nats_per_char(train: str, valid: str) -> float:
    """What xz (-9e) spends on the validation text once it has read the training text, per character."""
    import lzma

    def size(text: str) -> int:
        return len(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))

    return (size(train + valid) - size(train)) * 8 * math.log(2) / len(valid)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="shakespeare-char-small")
    parser.add_argument("--out", default="runs/bench-demo")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. --train.lr=0.004 (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    train_cmd = ["nlm", "train", args.recipe, "--out", str(out), "--json", "--no-progress", *args.overrides]
    trained = run_json(train_cmd)
    eval_cmd = ["nlm", "eval", str(out), "--split", "valid", "--json"]
    valid = run_json(eval_cmd)
    generate_cmd = ["nlm", "generate", str(out), *SAMPLE]
    sample = subprocess.run(generate_cmd, capture_output=True, text=True, check=True).stdout
    train_text = corpora.split_text("tinyshakespeare", "train")
    share, words = real_word_share(sample, train_text)
    print(sample)
    write("demo" if not args.overrides else "demo-try", {
        "recipe": args.recipe, "overrides": args.overrides,
        "train_command": " ".join(train_cmd), "eval_command": " ".join(eval_cmd),
        "generate_command": " ".join(generate_cmd),
        "train_minutes": trained["seconds"] / 60, "steps": trained["steps"],
        "valid_nats_per_char": valid["nll"], "valid_bpc": valid["bpc"],
        "sample": sample, "sample_words": words, "real_word_share": share,
        "xz_valid_nats_per_char": xz_nats_per_char(train_text, corpora.split_text("tinyshakespeare", "valid")),
        "train": trained, "valid": valid})


if __name__ == "__main__":
    main()
