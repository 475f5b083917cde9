"""Print the README's results table from benchmarks/results/*.json.

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import RESULTS


def load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def measured(r: dict) -> str:
    """The commit a result was measured at (results from before commits were recorded: the date),
    and on which CPU: the project's machines have not all been the same."""
    when = f"`{r['commit']}`" if r.get("commit") else r["date"][:16].replace("T", " ")
    cpu = r["machine"]["cpu"].replace("(R)", "").replace(" Processor", "")
    return f"{when}, {cpu}, {r['machine']['cores']} cores"


def quality_rows() -> list[str]:
    rows = []
    for recipe, split, anchor in (("ptb-small", "test", "target ≤ 105; pytorch/examples 2×200 tied 110.4, Zaremba small 114.5"),
                                  ("shakespeare-char", "valid", "target ≤ 1.40 nats; xz -9e 1.746; nanoGPT char (A100) 1.47"),
                                  ("wikitext2", "test", "AWD-LSTM 65.8 after days on a GPU")):
        r = load(f"quality-{recipe}")
        if r is None:
            continue
        m, t = r[split], r["train"]
        seconds = t.get("elapsed_seconds") or t["seconds"]  # the training loop's wall-clock, validation included
        figure = f"{m['nll']:.3f} nats/char ({m['bpc']:.3f} bpc)" if "bpc" in m else f"perplexity {m['perplexity']:.1f}"
        rows.append(f"| `{recipe}` | {split}: **{figure}** | {t['seconds'] / 60:.1f} min, {t['steps']} steps, "
                    f"{t['tokens'] / seconds:.0f} tok/s, peak RSS {t['peak_rss_mb']:.0f} MB | {anchor} | {measured(r)} | "
                    f"`python benchmarks/quality.py {recipe} --minutes {r['budget_minutes']:g}"
                    f"{' --split valid' if split == 'valid' else ''}` |")
    return rows


REFERENCE_MODEL = "2×200 LSTM, untied, full softmax, dropout 0.2"


def describe(recipe: str) -> str:
    """What nlm trains for a recipe, in the words of the reference's description."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from neurallm import config

    m = config.load_recipe(recipe).model
    head = "adaptive softmax" if m.softmax == "adaptive" else "full softmax"
    return (f"{m.num_layers}×{m.hidden_size} {m.cell.upper()}, {'tied' if m.tie_weights else 'untied'}, {head}, "
            f"dropout {m.dropout:g}")


def speed_rows() -> list[str]:
    rows = []
    for corpus in ("ptb", "wikitext-2"):
        r = load(f"speed-{corpus}")
        if r is None:
            continue
        ref, ours = r["reference"], r["nlm"]
        rows.append(f"| {corpus} (`{r['recipe']}`) | {REFERENCE_MODEL} / {describe(r['recipe'])} | {ref['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} | "
                    f"**{r['speedup_tokens_per_s']:.2f}×** | {ref['valid_perplexity']:.1f} → {ours['valid_perplexity']:.1f} | "
                    f"{ref['peak_rss_mb']:.0f} / {ours['peak_rss_mb']:.0f} MB | "
                    f"{r['generate']['tokens_per_s']:.0f} tok/s, {r['generate']['peak_rss_mb']:.0f} MB | {measured(r)} | "
                    f"`python benchmarks/speed.py {corpus} --recipe {r['recipe']} --minutes {r['minutes_each']:g}` |")
    return rows


def demo_row() -> list[str]:
    r = load("demo")
    if r is None:
        return []
    return [f"| `{r['recipe']}` | {r['steps']} steps in {r['train_minutes']:.1f} min | valid **{r['valid_nats_per_char']:.3f} "
            f"nats/char ({r['valid_bpc']:.3f} bpc)** | {100 * r['real_word_share']:.0f}% of {r['sample_words']} | "
            f"{measured(r)} | `python benchmarks/demo.py` |"]


def main() -> None:
    print("| recipe | training | result | real words in the sample | measured at | command |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(demo_row()))
    print()
    print("| recipe | result | training | anchor | measured at | command |\n| --- | --- | --- | --- | --- | --- |")
    print("\n".join(quality_rows()))
    print()
    print("| corpus | model (reference / nlm) | reference tok/s | nlm tok/s | speed-up "
          "| valid ppl after same minutes (reference → nlm) | training peak RSS (reference / nlm) | nlm generate "
          "| measured at | command |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(speed_rows()))


if __name__ == "__main__":
    main()
