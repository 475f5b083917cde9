"""Taggers and classifiers on the standard data sets: train, pick the checkpoint on dev, score
dev and test, measure prediction speed; results/tasks.json keeps one entry per (setting, seed)
and a summary per setting (mean and standard deviation over its seeds).

    python benchmarks/tasks.py run ud-upos --seed 1            # train (bounded by the setting's minutes), score
    python benchmarks/tasks.py score ud-upos --seed 1          # score a finished run again
    python benchmarks/tasks.py run ud-upos --seed 1 --rerun-because "why"   # afresh; the old run stays on record
    python benchmarks/tasks.py report                          # the summary table
    python benchmarks/tasks.py unseen                          # NER's dev and test entities never seen in train

A setting is a recipe plus overrides (SETTINGS below); each run trains on one thread, so two can
share this 2-core machine. Runs live in runs/bench-tasks/SETTING-sSEED.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench-tasks"

# Character LMs for contextual features (Akbik et al. 2018), trained on the words of a tagging data
# set's own training split (one sentence a line; `text` below writes it), forward and backward.
CHAR_LM = ["--model.hidden_size=512", "--model.emb_size=64", "--train.max_steps=0", "--train.epochs=50"]
UD_FEATURES = [f"--task.lm_features={RUNS}/ud-charlm-fwd-s1,{RUNS}/ud-charlm-bwd-s1"]
# The same within UPOS's 30-minute budget: each seed's own two LMs, 8 minutes side by side (one core
# each), then its tagger 20 minutes ("{seed}" is the run's seed).
UD_FEATURES_30 = [f"--task.lm_features={RUNS}/ud-charlm-fwd-30-s{{seed}},{RUNS}/ud-charlm-bwd-30-s{{seed}}"]

# NER's bigger tagger: two BiLSTM layers, a character BiLSTM of 50 units a direction over 50-wide letters.
NER_BIG = ["--model.num_layers=2", "--task.char_size=50", "--task.char_emb_size=50"]
# The conll2003-ner recipe is ner-crf-wd's tagger (NER_BIG with embedding dropout); the settings measured
# before it was start from its first form (one BiLSTM layer, 25-wide letters), or, built on NER_BIG
# (ner-crf-vd), from the recipe without its embedding dropout.
NER_V1 = ["--model.num_layers=1", "--task.char_size=25", "--task.char_emb_size=25", "--model.dropout_emb=0"]

# The sst2 recipe is sst2-2l's classifier; the settings measured before it was start from its first
# form: one BiLSTM layer, the weights themselves kept, validated at each epoch's end.
SST2_V1 = ["--model.num_layers=1", "--train.ema=0", "--train.valid_every=0"]

# name: (verb, recipe, overrides, minutes of training)
SETTINGS = {
    "ud-charlm-fwd": ("lm", "shakespeare-char-small", ["--data.corpus=TEXT:ud-english-ewt", *CHAR_LM], 14),
    "ud-charlm-bwd": ("lm", "shakespeare-char-small", ["--data.corpus=TEXT:ud-english-ewt", "--data.reverse=true",
                                                       *CHAR_LM], 14),
    "ud-charlm-fwd-30": ("lm", "shakespeare-char-small", ["--data.corpus=TEXT:ud-english-ewt", *CHAR_LM], 8),
    "ud-charlm-bwd-30": ("lm", "shakespeare-char-small", ["--data.corpus=TEXT:ud-english-ewt", "--data.reverse=true",
                                                          *CHAR_LM], 8),
    "ud-upos": ("tag", "ud-ewt-upos", [], 28),
    "ud-upos-charlm-30": ("tag", "ud-ewt-upos", UD_FEATURES_30, 20),
    "ud-upos-charlm": ("tag", "ud-ewt-upos", UD_FEATURES, 20),
    "ner-crf": ("tag", "conll2003-ner", NER_V1, 35),
    "ner-softmax": ("tag", "conll2003-ner", [*NER_V1, "--task.decoder=softmax"], 35),  # the CRF ablation
    "ner-charlm": ("tag", "conll2003-ner", [*NER_V1, *UD_FEATURES], 35),  # the character LMs of UD's web text, on news
    # ner-charlm's tagger with the embedding dropout of the recipe (ner-crf-wd's gain without features).
    "ner-charlm-wd": ("tag", "conll2003-ner", [*NER_V1, "--model.dropout_emb=0.1", *UD_FEATURES], 35),
    "ner-charlm-big": ("tag", "conll2003-ner", [*NER_V1, *NER_BIG, *UD_FEATURES], 35),  # the same with ner-crf-big's tagger
    "ner-crf-2l": ("tag", "conll2003-ner", [*NER_V1, "--model.num_layers=2"], 35),  # two BiLSTM layers (Reimers & Gurevych 2017)
    "ner-crf-char50": ("tag", "conll2003-ner", [*NER_V1, "--task.char_size=50", "--task.char_emb_size=50"], 35),  # wider letters
    "ner-crf-big": ("tag", "conll2003-ner", [*NER_V1, *NER_BIG], 35),  # both
    "ner-crf-cased": ("tag", "conll2003-ner", [*NER_V1, "--task.lowercase=false"], 35),  # Lample et al.'s cased word table
    # ner-crf-big with whole word types dropped from the table (AWD-LSTM's embedding dropout): 46% of test's
    # entity mentions (32% of dev's) never occur as one in train, so the tagger must read names from letters and
    # context. The recipe itself since.
    "ner-crf-wd": ("tag", "conll2003-ner", [], 35),
    # ner-crf-big with variational dropout: one mask per sentence, also between the two layers (Reimers & Gurevych 2017).
    "ner-crf-vd": ("tag", "conll2003-ner", ["--model.dropout_emb=0", "--model.locked_dropout=true", "--model.dropout_hidden=0.5"], 35),
    # Character LMs of encyclopaedic text (WikiText-2's training text: cased, full of names; no CoNLL
    # text, so the features of the tagger's training words are no better than those of its test words).
    "wt2-charlm-fwd": ("lm", "shakespeare-char-small", ["--data.corpus=wikitext-2", *CHAR_LM], 14),
    "wt2-charlm-bwd": ("lm", "shakespeare-char-small", ["--data.corpus=wikitext-2", "--data.reverse=true", *CHAR_LM], 14),
    "ner-charlm-wt2": ("tag", "conll2003-ner", [*NER_V1, f"--task.lm_features={RUNS}/wt2-charlm-fwd-s1,{RUNS}/wt2-charlm-bwd-s1"], 35),
    "sst2": ("classify", "sst2", SST2_V1, 25),
    # Character features of each word (a CNN): 5.7% of dev's words (in 59% of its sentences) never occur in train.
    "sst2-char": ("classify", "sst2", [*SST2_V1, "--task.char=cnn"], 25),
    # Variational dropout (one mask per sentence) and whole word types dropped from the embedding (AWD-LSTM).
    "sst2-vd": ("classify", "sst2", [*SST2_V1, "--model.locked_dropout=true", "--model.dropout_emb=0.1"], 25),
    "sst2-attention": ("classify", "sst2", [*SST2_V1, "--task.pooling=attention"], 25),
    "sst2-wd": ("classify", "sst2", [*SST2_V1, "--model.dropout_emb=0.1"], 25),  # whole word types dropped alone
    # The recipe with one BiLSTM layer: a moving average of the weights (train.ema 0.998, a horizon of ~500 of an
    # epoch's 1,053 steps), validated 4 times an epoch.
    "sst2-ema": ("classify", "sst2", ["--model.num_layers=1"], 25),
    "sst2-2l": ("classify", "sst2", [], 25),  # sst2-ema with two BiLSTM layers: the recipe itself since
    "sst2-dense": ("classify", "sst2", [*SST2_V1, "--train.valid_every=250"], 25),  # the model chosen on dev 4 times an epoch
    "sst5": ("classify", "sst5", [], 15),
    # ULMFiT's second stage on our own: a word LM of SST-2's training phrases (their text only; 5% held
    # out for its validation), whose embedding and layer start the classifier's encoder.
    "sst2-lm": ("lm", "ptb-small", ["--data.corpus=PHRASES:sst2", "--model.num_layers=1", "--model.emb_size=300",
                                    "--model.hidden_size=300", "--model.dropout=0.4", "--train.max_steps=0",
                                    "--train.epochs=100"], 12),
    "sst2-transfer": ("classify", "sst2", [*SST2_V1, f"--task.init_from={RUNS}/sst2-lm-s1", "--task.unfreeze_steps=500"], 25),
    # ULMFiT's first stage instead: a word LM of general text (WikiText-2's 2M words), 75 minutes on one core.
    "wt2-lm": ("lm", "wikitext2-small", ["--model.num_layers=1", "--model.emb_size=300", "--model.hidden_size=300",
                                         "--model.dropout=0.3", "--model.dropout_input=0.3", "--train.schedule=cosine",
                                         "--train.max_steps=0", "--train.epochs=100"], 75),
    "sst2-transfer-wt2": ("classify", "sst2", [*SST2_V1, f"--task.init_from={RUNS}/wt2-lm-s1", "--task.unfreeze_steps=500"], 25),
}


def run_dir(name: str, seed: int) -> Path:
    return RUNS / f"{name}-s{seed}"


def text(corpus: str) -> Path:
    """A folder corpus of a tagging data set's words, one sentence a line: train from its train split,
    valid from its dev split (what a character LM for its features reads)."""
    from neurallm.tasks import tagging
    from neurallm.tasks.common import split_file

    out = RUNS / f"text-{corpus}"
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    for split, file in (("train", "train.txt"), ("dev", "valid.txt")):
        sentences = tagging.read(split_file(corpus, split), "")
        lines = "".join(" ".join(s.words) + "\n" for s in sentences)
        seen = seen or set(lines)
        # A letter train never shows would stop a character LM's validation: it reads as a space, as
        # the tagger's features read it (models/lmfeatures.py).
        (out / file).write_text("".join(c if c in seen else " " for c in lines), encoding="utf-8")
    return out


def phrases(corpus: str) -> Path:
    """A folder corpus of a classification data set's training text, one example a line (each distinct
    text once): 95% to train a word LM on, the rest to validate it; no dev or test text."""
    from neurallm.tasks import classification
    from neurallm.tasks.common import split_file

    out = RUNS / f"phrases-{corpus}"
    out.mkdir(parents=True, exist_ok=True)
    texts = list(dict.fromkeys(e.text.strip() for e in classification.read(split_file(corpus, "train"))))
    cut = len(texts) * 95 // 100
    (out / "train.txt").write_text("".join(t + "\n" for t in texts[:cut]), encoding="utf-8")
    (out / "valid.txt").write_text("".join(t + "\n" for t in texts[cut:]), encoding="utf-8")
    return out


def train(name: str, seed: int, extra: list[str]) -> dict:
    verb, recipe, overrides, minutes = SETTINGS[name]
    out = run_dir(name, seed)
    made = {"TEXT": text, "PHRASES": phrases}  # folder corpora made from a labelled data set
    overrides = [f"--data.corpus={made[o.split('=')[1].split(':')[0]](o.split(':', 1)[1])}"
                 if o.startswith(("--data.corpus=TEXT:", "--data.corpus=PHRASES:")) else o for o in overrides]
    cmd = ["nlm", *([verb] if verb != "lm" else []), "train", recipe, "--out", str(out), "--max-minutes", str(minutes), "--no-progress", "--json",
           f"--train.seed={seed}", *(o.replace("{seed}", str(seed)) for o in overrides), *extra]
    if (out / "resume").exists():
        cmd.append("--resume")  # a run cut short goes on where it stopped
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"training failed ({proc.returncode})")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def lm_entry(name: str, seed: int) -> dict:
    """A feature LM's own figures: what it cost and how well it predicts the dev text."""
    summary = json.loads((run_dir(name, seed) / "summary.json").read_text())
    return {"setting": name, "seed": seed, "command": f"python benchmarks/tasks.py run {name} --seed {seed}",
            "recipe": SETTINGS[name][1], "overrides": SETTINGS[name][2], "train_minutes": summary["elapsed_seconds"] / 60,
            "steps": summary["steps"], "epochs_completed": summary.get("epochs_completed"),
            "valid_bpc": summary.get("valid_bpc"), "valid_perplexity": summary.get("valid_perplexity")}


def score(name: str, seed: int) -> dict:
    """Dev and test figures of the kept checkpoint, and prediction speed on test at batch 64."""
    import torch

    torch.set_num_threads(1)
    module = _module(SETTINGS[name][0])
    out = run_dir(name, seed)
    from neurallm.tasks.common import split_file

    model, recipe, vocab = module.load(out)
    figures = {}
    for split in ("dev", "test"):
        path = split_file(recipe.data.corpus, split)
        words, labels, lines = module.read_labelled(path, recipe.task)
        figures[split] = module.score(model, vocab, recipe, words, labels, path, lines)
    start = time.perf_counter()
    module.predict(model, vocab, words, batch_size=64)  # the test split, bucketed
    seconds = time.perf_counter() - start
    tokens = sum(len(w) for w in words)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    lms = [Path(p.strip()) / "summary.json" for p in (getattr(recipe.task, "lm_features", "") or "").split(",") if p.strip()]
    lm_minutes = [json.loads(p.read_text())["elapsed_seconds"] / 60 for p in lms if p.is_file()]
    return {"setting": name, "seed": seed, "command": f"python benchmarks/tasks.py run {name} --seed {seed}",
            "recipe": SETTINGS[name][1], "overrides": SETTINGS[name][2],
            "train_minutes": summary.get("elapsed_seconds", 0) / 60, "steps": summary.get("steps"),
            "epochs_completed": summary.get("epochs_completed"), "dev": figures["dev"], "test": figures["test"],
            "predict_tokens_per_s": tokens / seconds, "predict_batch_size": 64, "predict_threads": 1,
            **({"feature_lm_minutes": lm_minutes} if lm_minutes else {})}


def speed(name: str, seed: int, threads: int) -> dict:
    """Prediction speed of a trained model on its test split: in-process (bucketed batches of 64), and
    `nlm tag|classify predict` on the split's text as a file (start-up, streaming and writing included)."""
    import torch

    torch.set_num_threads(threads)
    verb = SETTINGS[name][0]
    module = _module(verb)
    from neurallm.tasks.common import split_file

    out = run_dir(name, seed)
    model, recipe, vocab = module.load(out)
    words = module.read_labelled(split_file(recipe.data.corpus, "test"), recipe.task)[0]
    tokens = sum(len(w) for w in words)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        module.predict(model, vocab, words, batch_size=64)
        runs.append(tokens / (time.perf_counter() - start))
    text = out / "test-input.txt"
    text.write_text("".join(" ".join(w) + "\n" for w in words), encoding="utf-8")
    start = time.perf_counter()
    subprocess.run(["nlm", verb, "predict", str(out), "--file", str(text), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    command = tokens / (time.perf_counter() - start)
    text.unlink()
    return {"threads": threads, "batch_size": 64, "tokens": tokens, "in_process_tokens_per_s": statistics.median(runs),
            "command_tokens_per_s": command}


def _module(verb: str):
    if verb == "tag":
        from neurallm.tasks import tagging

        return tagging
    from neurallm.tasks import classification

    return classification


def unseen(corpus: str = "conll2003") -> dict:
    """The share of dev's and test's entity mentions whose words never form an entity in train."""
    from neurallm.data.conll import spans
    from neurallm.tasks import tagging
    from neurallm.tasks.common import split_file

    def mentions(split):
        return [tuple(s.words[a:b]) for s in tagging.read(split_file(corpus, split), "") for _, a, b in spans(s.tags)]

    train = set(mentions("train"))
    out = {}
    for split in ("dev", "test"):
        found = mentions(split)
        missing = sum(m not in train for m in found)
        out[split] = {"mentions": len(found), "unseen": missing, "unseen_percent": round(100 * missing / len(found), 1)}
    return out


def main_figure(entry: dict, split: str) -> float:
    return entry[split].get("f1", entry[split]["accuracy"])


def summarise(runs: dict) -> dict:
    settings = {}
    for entry in runs.values():
        if "dev" not in entry:
            continue  # a feature LM: its cost is counted with the tagger that reads it
        settings.setdefault(entry["setting"], []).append(entry)
    out = {}
    for name, entries in sorted(settings.items()):
        row = {"seeds": sorted(e["seed"] for e in entries)}
        for split in ("dev", "test"):
            values = [100 * main_figure(e, split) for e in entries]
            row[split] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                          "metric": "f1" if "f1" in entries[0][split] else "accuracy"}
        row["train_minutes"] = statistics.mean(e["train_minutes"] for e in entries)
        row["predict_tokens_per_s"] = statistics.mean(e["predict_tokens_per_s"] for e in entries)
        out[name] = row
    return out


def table(summary: dict) -> str:
    lines = ["| setting | seeds | dev | test | training (min) | predict (tokens/s) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in summary.items():
        cell = lambda s: f"{row[s]['mean']:.2f}" + (f" ± {row[s]['std']:.2f}" if row[s]["std"] is not None else "")  # noqa: E731
        lines.append(f"| {name} ({row['dev']['metric']}) | {len(row['seeds'])} | {cell('dev')} | {cell('test')} | "
                     f"{row['train_minutes']:.1f} | {row['predict_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def record(entry: dict, rerun_because: str | None = None) -> None:
    """Keep ``entry`` as its (setting, seed)'s run; a rerun moves the run it replaces to ``superseded``."""
    import fcntl

    path = RESULTS / "tasks.json"
    with open(RUNS / ".tasks.lock", "w") as lock:  # two runs side by side may finish together
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {}
        runs = data.get("runs", {})
        key = f"{entry['setting']}-s{entry['seed']}"
        superseded = data.get("superseded", [])
        if rerun_because:
            entry = {**entry, "supersedes": rerun_because}
            if key in runs:
                superseded.append({**runs[key], "superseded_by_rerun_because": rerun_because})
        runs[key] = entry
        write("tasks", {"runs": runs, "summary": summarise(runs), **({"superseded": superseded} if superseded else {})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "score", "speed", "report", "unseen"])
    parser.add_argument("setting", nargs="?", choices=sorted(SETTINGS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rerun-because", metavar="REASON",
                        help="run: train this seed afresh (its old folder kept as NAME-sS-superseded), and keep the "
                             "run it replaces in tasks.json's superseded list with REASON")
    parser.add_argument("--threads", type=int, default=2, help="speed: torch threads (this machine has 2 cores)")
    args, extra = parser.parse_known_args()
    if args.action == "report":
        data = json.loads((RESULTS / "tasks.json").read_text())
        print(table(data["summary"]))
        return
    if args.action == "unseen":  # how many of NER's dev and test entities train never shows
        print(json.dumps(unseen(), indent=1))
        return
    if args.setting is None:
        parser.error("name a setting")
    if args.action == "speed":  # run alone: nothing else on the machine
        data = json.loads((RESULTS / "tasks.json").read_text())
        entry = data["runs"][f"{args.setting}-s{args.seed}"]
        entry["predict_speed"] = speed(args.setting, args.seed, args.threads)
        record(entry)
        return
    if args.action == "run":
        if args.rerun_because:
            old = run_dir(args.setting, args.seed)
            kept = old.with_name(old.name + "-superseded")
            if old.exists() and kept.exists():
                sys.exit(f"{kept} already holds a superseded run: move it away first")
            if old.exists():
                old.rename(kept)
        train(args.setting, args.seed, extra)
    entry = score(args.setting, args.seed) if SETTINGS[args.setting][0] != "lm" else lm_entry(args.setting, args.seed)
    record(entry, args.rerun_because if args.action == "run" else None)


if __name__ == "__main__":
    main()
