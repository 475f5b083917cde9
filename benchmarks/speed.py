"""Training speed side by side: nlm train against the plain-PyTorch reference loop, same run.

    python benchmarks/speed.py ptb --recipe ptb-small --minutes 2
    python benchmarks/speed.py wikitext-2 --recipe wikitext2-small --minutes 4

Both train for the same wall-clock budget on the same machine, one after the other;
the result gives tokens/s of each, the ratio, validation perplexity after that budget,
peak memory (RSS) of training, and decoding speed and peak RSS of nlm generate.
Writes benchmarks/results/speed-CORPUS.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import run_json, write

SPLITS = {"ptb": ("ptb.train.txt", "ptb.valid.txt"), "wikitext-2": ("train.txt", "valid.txt")}

GENERATE = """
import json, resource, sys, time, torch
from neurallm import checkpoint
from neurallm.generate import Sampling, generate
model, _, tok = checkpoint.load(sys.argv[1])
start = time.perf_counter()
n = sum(1 for _ in generate(model, [tok.boundary], int(sys.argv[2]), Sampling(), torch.Generator().manual_seed(0)))
seconds = time.perf_counter() - start
print(json.dumps({"tokens": n, "tokens_per_s": n / seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus", choices=sorted(SPLITS))
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--minutes", type=float, default=2.0)
    args = parser.parse_args()
    data = Path(os.environ.get("NLM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    train_file, valid_file = SPLITS[args.corpus]
    reference = run_json([sys.executable, str(Path(__file__).parent / "reference_lm.py"), str(data / args.corpus),
                          "--train", train_file, "--valid", valid_file, "--minutes", str(args.minutes)])
    out = Path(f"runs/speed-{args.recipe}")
    shutil.rmtree(out, ignore_errors=True)
    ours = run_json(["nlm", "train", args.recipe, "--out", str(out), "--max-minutes", str(args.minutes), "--json",
                     "--no-progress"])
    decode = json.loads(subprocess.run([sys.executable, "-c", GENERATE, str(out), "2000"], capture_output=True,
                                       text=True, check=True).stdout)
    write(f"speed-{args.corpus}", {
        "minutes_each": args.minutes, "recipe": args.recipe,
        "reference": reference,
        "nlm": {k: ours[k] for k in ("tokens_per_s", "steps", "seconds", "train_loss", "valid_perplexity",
                                     "peak_rss_mb")},
        "speedup_tokens_per_s": ours["tokens_per_s"] / reference["tokens_per_s"],
        "valid_perplexity_same_wallclock": {"nlm": ours["valid_perplexity"], "reference": reference["valid_perplexity"]},
        "generate": decode,
    })


if __name__ == "__main__":
    main()
