"""Long-distance dependencies on real text: how much a trained LM raises the probability of a
word that it saw d tokens earlier in the same document (a repeat, or copy, probe), binned by d.

For a position t whose word w_t last occurred d tokens earlier, d in the bin [lo, hi):

    gain(t) = log p(w_t | the whole stream before t) - log p(w_t | the last lo - 1 tokens only)

The cut context ends before the earlier occurrence, so the gain is what the model draws from
the text beyond lo - 1 tokens back, the earlier occurrence among it. More context helps any word
a little, so the same gain is measured at control positions: words with no occurrence in the
document within hi tokens before them. The repeat boost, repeat gain minus control gain, is what
the earlier occurrence itself is worth; a model that cannot carry information d steps (a vanilla
RNN whose gradient vanished in training) shows no boost at that distance.

Both readings start from a zero state after the tokenizer's boundary token, as ``nlm eval`` reads
a stream: the full one reads [boundary, w_0, ..., w_{t-1}] (one pass over the whole stream, state
carried), the cut one [boundary, w_{t-k}, ..., w_{t-1}] with k = lo - 1 (for the bin [1, 2) the
boundary token alone). A cut with k = t reads exactly what the full pass read, so it gives the
same probability (to float rounding): every gain is context the cut leaves out, not a difference in
how it is read. Repeated words are more often frequent ones than the controls are; the control is
not matched by frequency, so the boost also holds what that difference is worth.

A word model's tokens are PTB-style words; a character model's are characters (a "word" is then
a character, and most repeat at short distances). <unk> and the boundary token (<eos>, or the
line end of a character model) are no words the model saw, so they are neither repeats nor
controls. WikiText's articles (headings " = Title = ") are documents: a heading starts the search
for earlier occurrences afresh, the model still reads one stream. PTB has no document marks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from neurallm.data import corpora
from neurallm.diagnostics import common
from neurallm.errors import NlmError

LONGEST = 1024  # distances measured: bins up to [512, 1024); a cut window costs its length per position
CHUNK = 1 << 15  # tokens per cut forward pass (bounds the memory of long windows)
STRIDE = 1024  # tokens per forward call of the full pass (the state carried between)
DECODE = 1024  # positions per call of the output layer
UNIGRAM_TOKENS = 1_000_000  # training tokens counted for the unigram baseline (all of PTB's)
SYMLOG = 0.01  # the plot's y axis is linear within ±this many nats, logarithmic beyond


def is_heading(line: str) -> bool:
    """A WikiText article title " = Title = " (one '=' each side; sections have two or more)."""
    words = line.split()
    return len(words) >= 3 and words[0] == words[-1] == "=" and words[1] != "=" and words[-2] != "="


def token_count(tokenizer, text: str) -> int:
    """How many tokens ``common.text_ids`` makes of ``text`` (a character model leaves out what it does not know)."""
    if tokenizer.kind == "char":
        text = "".join(c for c in text if c in tokenizer.index)
    return len(tokenizer.encode(text))


def read(data, split: str, tokenizer, tokens: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``tokens`` ids of the split and the position where each document starts ([0]: one stream).

    Every tokenizer encodes line by line, so the tokens of the lines before a heading are the
    tokens of the stream before it."""
    ids = common.text_ids(data, split, tokenizer, tokens)
    lines = corpora.text_of(data, split).splitlines(keepends=True)
    starts, position, last = [0], 0, 0
    for i, line in enumerate(lines):
        if i and is_heading(line):
            position += token_count(tokenizer, "".join(lines[last:i]))
            last = i
            if position >= len(ids):
                break
            if len(starts) > 1 or "".join(lines[:i]).strip():  # not where only blank lines come before
                starts.append(position)
    return ids, starts


def distances(ids: list[int], starts: list[int], ignored: set[int]) -> torch.Tensor:
    """Per position, the distance back to the previous occurrence of its token in the same document:
    d > 0; 0 where there is none (a first occurrence); -1 for an ignored token."""
    out, last, begins = [0] * len(ids), {}, set(starts)
    for t, token in enumerate(ids):
        if t in begins:
            last = {}
        if token in ignored:
            out[t] = -1
            continue
        out[t] = t - last[token] if token in last else 0
        last[token] = t
    return torch.tensor(out, dtype=torch.long)


def bins(d: torch.Tensor) -> list[tuple[int, int]]:
    """[1, 2), [2, 4), ... up to the largest bin holding a repeat (and at most LONGEST)."""
    longest = int(d.max()) if d.numel() else 0
    out, lo = [], 1
    while lo <= longest and lo < LONGEST:
        out.append((lo, 2 * lo))
        lo *= 2
    return out


def sample(d: torch.Tensor, lo: int, hi: int, count: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` repeat positions (distance in [lo, hi)) and as many control positions (a word
    with no occurrence within hi tokens before it in its document, at least lo tokens into the stream)."""
    t = torch.arange(d.numel())
    repeats = ((d >= lo) & (d < hi)).nonzero().squeeze(1)
    controls = (((d == 0) | (d >= hi)) & (t >= lo)).nonzero().squeeze(1)

    def pick(positions):
        return positions[torch.randperm(positions.numel(), generator=generator)[:count]].sort().values

    return pick(repeats), pick(controls)


@torch.no_grad()
def full_logp(model, boundary: int, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """log p of ids[t] given [boundary, ids[0], ..., ids[t-1]], for each t in ``positions`` (NaN elsewhere):
    one pass over the stream, state carried, as ``nlm eval`` reads it. Only the asked positions go
    through the output layer, which would otherwise take most of the time (a 10k-word softmax a token)."""
    inputs = torch.cat([torch.tensor([boundary]), ids[:-1]])  # inputs[t] is read just before ids[t] is predicted
    wanted = torch.zeros(ids.numel(), dtype=torch.bool)
    wanted[positions] = True
    features, state = [], None
    for start in range(0, ids.numel(), STRIDE):
        out, state = model(inputs[start:start + STRIDE].unsqueeze(0), state)
        features.append(out[0, wanted[start:start + STRIDE]])
    asked = wanted.nonzero().squeeze(1)
    logp = torch.full((ids.numel(),), math.nan, dtype=torch.float64)
    logp[asked] = decode(model, torch.cat(features), ids[asked])
    return logp


def decode(model, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """features (n, F) -> log p of each target (n,), through the output layer a slice at a time
    (the logits of all at once would take n x vocabulary floats)."""
    out = [-model.loss(f.unsqueeze(0), y.unsqueeze(0), reduction="none")[0]
           for f, y in zip(features.split(DECODE), targets.split(DECODE))]
    return torch.cat(out).double() if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def cut_logp(model, boundary: int, ids: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """log p of ids[t] given only [boundary, ids[t-k], ..., ids[t-1]] read from a zero state, for each
    t in ``positions`` (each t >= k); the windows are read together, a chunk of rows at a time."""
    out = [torch.zeros(0, dtype=torch.float64)]
    for chunk in positions.split(max(1, CHUNK // (k + 1))):
        context = ids[chunk.unsqueeze(1) - k + torch.arange(k)]  # (n, k)
        x = torch.cat([torch.full((chunk.numel(), 1), boundary, dtype=torch.long), context], dim=1)
        features, _ = model(x)
        out.append(decode(model, features[:, -1], ids[chunk]))
    return torch.cat(out)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """The mean and its standard error (NaN where there are too few values)."""
    n = values.numel()
    if n == 0:
        return math.nan, math.nan
    return values.mean().item(), values.std().item() / math.sqrt(n) if n > 1 else math.nan


def unigram_logp(data, tokenizer) -> torch.Tensor:
    """log p of each token by its frequency in the training split (add-one smoothed)."""
    ids = common.text_ids(data, "train", tokenizer, UNIGRAM_TOKENS)
    counts = torch.bincount(ids, minlength=tokenizer.vocab_size).double() + 1
    return (counts / counts.sum()).log()


class Stream:
    """The text one tokenizer makes of the split: ids, documents, distances, the positions measured."""

    def __init__(self, data, split: str, tokenizer, tokens: int, per_bin: int, seed: int):
        self.ids, self.starts = read(data, split, tokenizer, tokens)
        ignored = {tokenizer.boundary} | ({tokenizer.unk} if tokenizer.kind == "word" else set())
        self.d = distances(self.ids.tolist(), self.starts, ignored)
        self.bins = bins(self.d)
        generator = torch.Generator().manual_seed(seed)
        self.samples = [sample(self.d, lo, hi, per_bin, generator) for lo, hi in self.bins]
        self.unigram = unigram_logp(data, tokenizer)


def measure_bin(model, tokenizer, stream: Stream, full: torch.Tensor, lo: int, hi: int,
                repeats: torch.Tensor, controls: torch.Tensor) -> dict:
    k = lo - 1
    repeat = full[repeats] - cut_logp(model, tokenizer.boundary, stream.ids, repeats, k)
    control = full[controls] - cut_logp(model, tokenizer.boundary, stream.ids, controls, k)
    (rg, rse), (cg, cse) = mean_se(repeat), mean_se(control)
    return {"lo": lo, "hi": hi, "n": repeats.numel(), "repeat_gain": rg, "repeat_se": rse,
            "control_n": controls.numel(), "control_gain": cg, "control_se": cse,
            "boost": rg - cg, "boost_se": math.hypot(rse, cse),
            "repeat_logp": mean_se(full[repeats])[0], "unigram_logp": mean_se(stream.unigram[stream.ids[repeats]])[0]}


def reach(rows: list[dict]) -> int | None:
    """The largest bin's lower edge whose boost is more than 2 standard errors above 0."""
    found = [r["lo"] for r in rows if math.isfinite(r["boost_se"]) and r["boost"] > 2 * r["boost_se"]]
    return max(found) if found else None


def load(paths: list[str]) -> list[tuple[str, Path, object, object, object]]:
    """(name, path, model, recipe, tokenizer) per checkpoint; a backward model is refused."""
    loaded = []
    for path in paths:
        model, recipe, tokenizer = common.load_lm(path)
        if recipe.data.reverse:
            raise NlmError(f"{path}: a backward model (data.reverse = true) reads the text right to left, so a "
                           f"word's earlier occurrence comes after it; this probe measures forward models")
        loaded.append([Path(path).name or str(path), Path(path), model, recipe, tokenizer])
    if len({entry[0] for entry in loaded}) < len(loaded):  # two folders of one name: tell them apart by path
        for entry in loaded:
            entry[0] = str(entry[1])
    if len({entry[0] for entry in loaded}) < len(loaded):
        raise NlmError(f"checkpoints: {' '.join(paths)} names one checkpoint twice")
    return [tuple(entry) for entry in loaded]


def command(args) -> tuple[dict, list[str]]:
    from tqdm import tqdm

    out = common.out_dir(args, "dependency")
    loaded = load(args.checkpoints)
    corpus = args.data or loaded[0][3].data.corpus
    keys = [json.dumps(tokenizer.to_json(), sort_keys=True) for *_, tokenizer in loaded]
    streams: dict[str, Stream] = {}  # one per distinct tokenizer: models that share one read the same positions
    for (_, _, _, recipe, tokenizer), key in zip(loaded, keys):
        if key not in streams:
            data = dataclasses.replace(recipe.data, corpus=corpus)
            streams[key] = Stream(data, args.split, tokenizer, args.tokens, args.per_bin, args.seed)
    first = streams[keys[0]]
    result = {"data": corpus, "split": args.split, "tokens": first.ids.numel(), "documents": len(first.starts),
              "per_bin": args.per_bin, "seed": args.seed, "same_tokens": len(streams) == 1, "models": {}}
    bar = tqdm(total=sum(len(streams[key].bins) + 1 for key in keys), desc="dependency", disable=None, leave=False)
    for (name, path, model, recipe, tokenizer), key in zip(loaded, keys):
        stream = streams[key]
        bar.set_postfix_str(f"{name}: full pass")
        full = full_logp(model, tokenizer.boundary, stream.ids, torch.cat([torch.cat(pair) for pair in stream.samples]))
        bar.update()
        rows = []
        for (lo, hi), (repeats, controls) in zip(stream.bins, stream.samples):
            bar.set_postfix_str(f"{name}: d in [{lo}, {hi})")
            rows.append(measure_bin(model, tokenizer, stream, full, lo, hi, repeats, controls))
            bar.update()
        m = recipe.model
        result["models"][name] = {"cell": common.SHORT.get(m.cell, m.cell), "checkpoint": str(path),
                                  "layers": m.num_layers, "hidden_size": m.hidden_size, "tokenizer": tokenizer.kind,
                                  "tokens": stream.ids.numel(), "documents": len(stream.starts),
                                  "bins": rows, "reach": reach(rows)}
    bar.close()
    plot = plot_boost(result, out / "dependency.png")
    result["files"] = {"json": str(out / "dependency.json"), "plot": str(plot) if plot else None}
    common.save_json(out / "dependency.json", result)
    lines = report(result)
    lines += [f"wrote {out / 'dependency.json'}" + (f" and {plot}" if plot else ""), *([] if plot else [common.NO_PLOTS])]
    return result, lines


def documents_note(count: int) -> str:
    return "1 stream" if count == 1 else f"{count} (WikiText articles; a heading restarts the search for repeats)"


def figure(value: float, se: float | None = None) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:+.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else "")


def report(result: dict) -> list[str]:
    lines = [f"repeat probe on {result['data']}/{result['split']}: first {result['tokens']} tokens, "
             f"documents: {documents_note(result['documents'])}",
             "gain: log p(word | whole history) - log p(word | last lo-1 tokens), nats; repeat: the word occurred "
             "d tokens earlier, d in [lo, hi); control: not within hi tokens; boost = repeat - control; "
             "log p repeat: the model's mean log p of the repeated words, unigram: theirs by their frequency in the "
             "training split"]
    if not result["same_tokens"]:
        lines.append("tokenizers differ: each model reads the text its own way, so the models' positions are "
                     "the same text only where their tokenizers match")
    for name, m in result["models"].items():
        kind = " (a token is a character)" if m["tokenizer"] == "char" else ""
        lines += ["", f"{name}: {m['cell']} {m['layers']} × {m['hidden_size']}, {m['tokenizer']} tokens{kind}"
                      + ("" if result["same_tokens"] else f", {m['tokens']} tokens, documents: {m['documents']}"),
                  f"{'d':>9} {'n':>5} {'repeat gain':>17} {'control gain':>17} {'boost':>17} "
                  f"{'log p repeat':>13} {'unigram':>8}"]
        for r in m["bins"]:
            span = str(r["lo"]) if r["hi"] - r["lo"] == 1 else f"{r['lo']}-{r['hi'] - 1}"
            lines.append(f"{span:>9} {r['n']:>5} {figure(r['repeat_gain'], r['repeat_se']):>17} "
                         f"{figure(r['control_gain'], r['control_se']):>17} {figure(r['boost'], r['boost_se']):>17} "
                         f"{figure(r['repeat_logp']):>13} {figure(r['unigram_logp']):>8}")
        lines.append(f"reach: {m['reach'] if m['reach'] is not None else 'none'} (the largest d whose boost "
                     f"is more than 2 standard errors above 0)")
    return lines


def plot_boost(result: dict, path: Path):
    plt = common.pyplot()
    if plt is None:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, m in result["models"].items():
        rows = [r for r in m["bins"] if math.isfinite(r["boost"])]
        x = [math.sqrt(r["lo"] * (r["hi"] - 1)) for r in rows]  # the bin's geometric centre
        bar = ax.errorbar(x, [r["boost"] for r in rows], yerr=[r["boost_se"] for r in rows], marker="o",
                          capsize=3, label=f"{name} ({m['cell']})")
        ax.plot(x, [r["control_gain"] for r in rows], linestyle="--", color=bar.lines[0].get_color(), linewidth=1)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_yscale("symlog", linthresh=SYMLOG)  # the boost falls by decades; it can be below 0
    ax.set_xlabel("distance d to the word's earlier occurrence (tokens, log scale)")
    ax.set_ylabel(f"log-probability gain (nats; symmetric log scale, linear within ±{SYMLOG:g})")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="grey", linestyle="--"))
    labels.append("control gain (dashed)")
    ax.legend(handles, labels, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"Repeat boost on {Path(result['data']).name}/{result['split']}: how much a word seen d tokens "
                 f"earlier is raised\n(solid: repeat gain - control gain, bars: ±1 standard error)", fontsize=10)
    return common.save_figure(fig, path)
