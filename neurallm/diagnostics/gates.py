"""nlm diagnose gates: how a trained model's gates sit over a corpus, and what chosen units
respond to over a passage (in the spirit of Karpathy, Johnson & Fei-Fei 2015, "Visualizing and
understanding recurrent networks").

Saturation (their fig. 3): a gate is left-saturated at a step when its activation is below 0.1
(it blocks) and right-saturated above 0.9 (it passes); per unit, the fraction of steps spent in
each. A forget (LSTM) or update (GRU) gate right-saturated most of the time keeps its unit's
memory over long spans; one that rarely saturates mixes the new input in at every step.

The heat map colours each token of a passage by a unit's activation after reading it: the cell
tanh(c) of an LSTM, h of a GRU or an RNN.

The model reads the text step by step through the written-out equations of ``cells.py`` with its
own weights, and the stack's connections between layers applied as ``RecurrentStack.forward``
applies them (eval mode: no dropout), so the gates are those of the fused kernels' computation.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from neurallm import checkpoint
from neurallm.data import corpora
from neurallm.diagnostics import common
from neurallm.errors import NlmError
from neurallm.models import cells

# The gates measured, by name: their index in cells.lstm_gates (i, f, g, o) or cells.gru_gates (r, z, n).
GATES = {"lstm": {"input": 0, "forget": 1, "output": 3}, "gru": {"reset": 0, "update": 1}}
LEFT, RIGHT = 0.1, 0.9  # saturation thresholds (Karpathy et al. 2015)
BINS = 50  # of the gate value histograms over 0..1
ROW = 500  # measured tokens per row: the corpus is read as rows in parallel (one matrix product a step)
WARMUP = 100  # tokens each row reads before its measured part, so that no figure comes from a fresh state
CHUNK = 100  # steps traced at once: bounds the memory the records take
AUTO_UNITS = 5  # units drawn when --units is not given
COLUMNS = 80  # heat map rows, in characters


@torch.no_grad()
def trace(model, ids: torch.Tensor, state: torch.Tensor | None = None):
    """Read ``ids`` (batch, time), each row a stream, step by step. -> per layer a dict of
    (batch, time, hidden) tensors: the gates by name, "c" (LSTM) and "h" (the layer's output
    before any connection); and the stack's state after the last step as ``model`` keeps it,
    (layers, parts, 1, batch, hidden)."""
    stack = model.stack
    state = model.init_state(ids.size(0)) if state is None else state
    below, records, finals = [model.embed(ids)], [], []
    for i, layer in enumerate(stack.layers):
        inp = stack.layer_input(below)
        record, final = trace_layer(stack.cell, layer.weights(0), inp, state[i, :, 0])
        records.append(record)
        finals.append(final.unsqueeze(1))  # (parts, 1 direction, batch, hidden)
        below.append(stack.join(i, record["h"], inp))
    return records, torch.stack(finals)


def trace_layer(cell: str, weights, x: torch.Tensor, state: torch.Tensor):
    """One layer over x (batch, time, input) from ``state`` (parts, batch, hidden) -> its records, final state."""
    w_ih, w_hh, b_ih, b_hh = weights
    gx = x @ w_ih.t() + b_ih  # the input's projection, every step at once
    gates_of = GATES.get(cell, {})
    kept = {name: [] for name in [*gates_of, *(["c"] if cell == "lstm" else []), "h"]}
    h, c = state[0], state[-1]
    for t in range(x.size(1)):
        gh = torch.addmm(b_hh, h, w_hh.t())
        if cell == "lstm":
            gates = cells.lstm_gates(gx[:, t], gh)
            h, c = cells.lstm_state(gates, c)
            kept["c"].append(c)
        elif cell == "gru":
            gates = cells.gru_gates(gx[:, t], gh)
            h = cells.gru_state(gates, h)
        else:
            h = cells.update(cell, gx[:, t], gh, h.unsqueeze(0))[0]
        for name, k in gates_of.items():
            kept[name].append(gates[k])
        kept["h"].append(h)
    final = torch.stack((h, c)) if cell == "lstm" else h.unsqueeze(0)
    return {name: torch.stack(values, dim=1) for name, values in kept.items()}, final


class Tally:
    """One gate of one layer over a corpus, added chunk by chunk: the sum of its values, per
    unit the steps it spent saturated, and a histogram of all values."""

    def __init__(self, units: int):
        self.steps, self.total = 0, 0.0
        self.left, self.right = torch.zeros(units), torch.zeros(units)
        self.counts = torch.zeros(BINS)

    def add(self, values: torch.Tensor) -> None:
        """values (time, units), each in 0..1."""
        self.steps += values.size(0)
        self.total += values.double().sum().item()
        self.left += (values < LEFT).sum(0)
        self.right += (values > RIGHT).sum(0)
        self.counts += torch.histc(values, BINS, 0, 1)

    def unit_left(self) -> torch.Tensor:
        """Per unit, the fraction of steps below LEFT."""
        return self.left / max(self.steps, 1)

    def unit_right(self) -> torch.Tensor:
        return self.right / max(self.steps, 1)

    def figures(self) -> dict:
        """Fractions over all units and steps; units saturated more than half the steps."""
        n = max(self.steps * self.left.numel(), 1)
        return {"mean": self.total / n, "left_saturated": self.left.sum().item() / n,
                "right_saturated": self.right.sum().item() / n,
                "mostly_left": int((self.unit_left() > 0.5).sum()), "mostly_right": int((self.unit_right() > 0.5).sum())}


def cut_rows(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The stream cut into rows read in parallel, about ROW measured tokens each, each preceded by
    the tokens before it as warm-up (the first row's warm-up is the stream's start). -> (rows,
    warm-up + length), warm-up; the few tokens past the last whole row are left out."""
    warmup = min(WARMUP, ids.numel() // 2)
    measured = ids.numel() - warmup
    length = measured // max(measured // ROW, 1)
    return ids[:warmup + measured // length * length].unfold(0, warmup + length, length), warmup


def measure(model, data: torch.Tensor, warmup: int, state: torch.Tensor) -> list[dict[str, Tally]]:
    """Per layer, a tally of each gate over the rows ``data`` (rows, time) past their first
    ``warmup`` steps, read CHUNK steps at a time from ``state``."""
    stack = model.stack
    tallies = [{name: Tally(stack.hidden_size) for name in GATES[stack.cell]} for _ in stack.layers]
    for start in range(0, data.size(1), CHUNK):
        records, state = trace(model, data[:, start:start + CHUNK], state)
        skip = max(warmup - start, 0)
        for tally, record in zip(tallies, records):
            for name, gate in tally.items():
                gate.add(record[name][:, skip:].reshape(-1, stack.hidden_size))
    return tallies


def gate_figures(tallies: list[dict[str, Tally]]) -> dict:
    """JSON figures per gate: over all layers (each layer weighs its units equally), and per layer."""
    result = {}
    for name in tallies[0]:
        per_layer = [t[name].figures() for t in tallies]
        overall = {key: sum(f[key] for f in per_layer) / len(per_layer)
                   for key in ("mean", "left_saturated", "right_saturated")}
        result[name] = {**overall, "per_layer": per_layer}
    return result


def layer_index(layer: int, layers: int) -> int:
    if not -layers <= layer < layers:
        raise NlmError(f"--layer {layer}: the model has {layers} layer{'s' * (layers > 1)} "
                       f"(0 .. {layers - 1}, or -1 for the top)")
    return layer % layers


def choose_units(text: str | None, activity: torch.Tensor, layer: int) -> list[int]:
    """--units, checked against the layer's size; or the units whose activation varies most over the passage."""
    hidden = activity.size(1)
    if text is None:
        return activity.var(0, unbiased=False).argsort(descending=True)[:AUTO_UNITS].tolist()
    units = common.int_list(text, "--units", minimum=0)
    if units[-1] >= hidden:
        raise NlmError(f"--units: unit {units[-1]} is out of range (layer {layer} has {hidden} units, 0 .. {hidden - 1})")
    return units


def passage(args, recipe, tokenizer) -> tuple[torch.Tensor, str]:
    """The ids of the passage drawn (at most --chars tokens) and where it comes from."""
    if args.text is not None and args.file:
        raise NlmError("--text and --file: give one passage, not both")
    if args.text is None and not args.file:
        ids = common.text_ids(recipe.data, "valid", tokenizer, args.chars)
        return ids, f"the start of {recipe.data.corpus}/valid"
    if args.text is not None:
        source, text = "--text", args.text[::-1] if recipe.data.reverse else args.text
    else:
        source, text = args.file, corpora.text_of(recipe.data, "valid", args.file)
    ids = tokenizer.encode(text, source=source)
    if not ids:
        raise NlmError(f"{source}: no tokens to draw")
    cut = f" (its first {args.chars} of {len(ids)} tokens)" if len(ids) > args.chars else ""
    return torch.tensor(ids[:args.chars], dtype=torch.long), source + cut


def pieces(tokenizer, ids: torch.Tensor) -> list[tuple[str, str]]:
    """Each token as the passage shows it: (the spaces before it, its text), so that a colour
    marks the word and not the gap before it."""
    write, out = tokenizer.stream(), []
    for i in ids.tolist():
        piece = write(i)
        word = piece.lstrip(" ") or piece
        out.append((piece[:len(piece) - len(word)], word))
    return out


def colour(value: float) -> str:
    """-1 blue .. 0 white .. +1 red (matplotlib's bwr), clipped; not a number is white."""
    value = max(-1.0, min(1.0, value)) if value == value else 0.0
    fade = round(255 * (1 - abs(value)))
    return f"rgb(255,{fade},{fade})" if value > 0 else f"rgb({fade},{fade},255)"


@dataclass
class Heat:
    """What a heat map shows: the passage's tokens (as ``pieces`` gives them), one layer's
    activation over them (tokens, units), the units drawn; ``what`` names the activation."""

    title: str
    what: str
    shown: list[tuple[str, str]]
    activity: torch.Tensor
    units: list[int]


def write_html(path, heat: Heat, source: str):
    """One self-contained page: a block per unit, each token a span coloured by the unit's value."""
    title, blocks = f"{heat.title} over {source}", []
    for u in heat.units:
        spans = "".join(f'{html.escape(lead)}<span style="background:{colour(v)}" '
                        f'title="unit {u}: {v:+.3f}">{html.escape(word)}</span>'
                        for (lead, word), v in zip(heat.shown, heat.activity[:, u].tolist()))
        blocks.append(f"<h2>unit {u}</h2>\n<pre>{spans}</pre>\n")
    page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            "<style>body { font-family: sans-serif; } pre { font-size: 14px; line-height: 1.6; "
            "white-space: pre-wrap; }</style>\n</head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>Each token coloured by the unit's activation after reading it: "
            f'<span style="background:{colour(-1.0)};color:white">-1</span> .. 0 (white) .. '
            f'<span style="background:{colour(1.0)};color:white">+1</span>; hover a token for its value.</p>\n'
            + "".join(blocks) + "</body></html>\n")
    checkpoint.atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def layout(shown: list[tuple[str, str]]) -> list[tuple[int, int, int, str]]:
    """Where each token sits in a grid COLUMNS wide: (row, column, width, text). A line end takes
    one empty cell and starts a new row; a token that would pass the edge starts one too."""
    places, row, col = [], 0, 0
    for lead, word in shown:
        if word == "\n":
            places.append((row, col, 1, ""))
            row, col = row + 1, 0
            continue
        width = max(len(word), 1)
        if col and col + len(lead) + width > COLUMNS:
            row, col = row + 1, 0
        elif col:
            col += len(lead)
        places.append((row, col, width, word))
        col += width
    return places


def plot_heatmap(plt, heat: Heat):
    """A panel per unit: the passage in a grid of character cells, each token's cells coloured by
    the unit's value. Each row's text is one string in a monospaced font (thousands of
    single-character texts take seconds to draw), and a cell is one character's advance wide."""
    places, units = layout(heat.shown), heat.units
    rows = max(r for r, _, _, _ in places) + 1
    lines = [[" "] * COLUMNS for _ in range(rows)]
    for r, c, _, text in places:
        lines[r][c:c + len(text)] = text
    fig, axes = plt.subplots(len(units), 1, figsize=(COLUMNS * 0.1 + 1.5, len(units) * (rows * 0.2 + 0.5) + 0.6),
                             squeeze=False, dpi=100)
    for ax, u in zip(axes[:, 0], units):
        grid = torch.full((rows, COLUMNS), float("nan"))
        for (r, c, w, _), v in zip(places, heat.activity[:, u].tolist()):
            grid[r, c:c + w] = v
        image = ax.imshow(grid.numpy(), cmap="bwr", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set(xticks=[], yticks=[], ylabel=f"unit {u}")
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label=f"{heat.what} (-1 .. 1)")
    axes[0, 0].set_title(f"{heat.title} of chosen units, token by token")
    fig.tight_layout()  # the axes' final width, which the font follows
    size, cells = fit_font(fig, axes[0, 0])
    for ax in axes[:, 0]:
        ax.set_xlim(-0.5, cells - 0.5)
        for r, line in enumerate(lines):
            ax.text(-0.5, r, "".join(line).rstrip(), ha="left", va="center", fontsize=size, family="monospace",
                    in_layout=False)
    return fig


def fit_font(fig, ax) -> tuple[float, float]:
    """A monospaced font size at which COLUMNS characters fit the axes' width, and how many of its
    characters the width holds (the renderer rounds each advance to whole pixels, so it is measured)."""
    renderer = fig.canvas.get_renderer()
    width = ax.get_window_extent(renderer).width

    def advance(size: float) -> float:
        probe = fig.text(0, 0, "M" * COLUMNS, fontsize=size, family="monospace")
        pixels = probe.get_window_extent(renderer).width / COLUMNS
        probe.remove()
        return pixels

    size = 10 * width / COLUMNS / advance(10)
    while advance(size) * COLUMNS > width:
        size *= 0.97
    return size, width / advance(size)


def plot_gates(plt, tallies: list[dict[str, Tally]], title: str):
    """Per gate: the histogram of all values (top) and each unit's left- against right-saturation (bottom)."""
    names = list(tallies[0])
    fig, axes = plt.subplots(2, len(names), figsize=(4.5 * len(names), 8.5), squeeze=False)
    edges = torch.linspace(0, 1, BINS + 1).numpy()
    for k, name in enumerate(names):
        top, bottom = axes[0, k], axes[1, k]
        for layer, tally in enumerate(tallies):
            gate = tally[name]
            top.stairs((gate.counts / gate.counts.sum().clamp(min=1)).numpy(), edges, color=f"C{layer}",
                       label=f"layer {layer}")
            bottom.scatter(gate.unit_left().numpy(), gate.unit_right().numpy(), s=10, alpha=0.6, color=f"C{layer}",
                           label=f"layer {layer}")
        top.set_yscale("log")
        top.set(xlim=(0, 1), xlabel=f"{name} gate activation (0..1)", ylabel="fraction of unit-steps per bin",
                title=f"{name} gate: values")
        bottom.plot([0, 1], [1, 0], color="grey", lw=0.8, ls=":", label="always saturated")
        bottom.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=f"fraction of steps < {LEFT} (left-saturated)",
                   ylabel=f"fraction of steps > {RIGHT} (right-saturated)", title=f"{name} gate: saturation per unit")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_activations(plt, records: list[dict], title: str):
    """A gateless RNN: the histogram of each layer's h over the passage."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for layer, record in enumerate(records):
        ax.hist(record["h"].flatten().numpy(), bins=BINS, histtype="step", color=f"C{layer}", label=f"layer {layer}")
    ax.set_yscale("log")
    ax.set(xlabel="activation h (unitless)", ylabel="count of unit-steps", title=title)
    ax.legend()
    return fig


def table(tallies: list[dict[str, Tally]]) -> list[str]:
    lines = [f"{'layer':>5}  {'gate':8} {'mean':>6} {'<' + str(LEFT):>6} {'>' + str(RIGHT):>6}"
             f"  {'units mostly <' + str(LEFT):>18} {'>' + str(RIGHT):>5}"]
    for layer, tally in enumerate(tallies):
        for name, gate in tally.items():
            f = gate.figures()
            lines.append(f"{layer:>5}  {name:8} {f['mean']:6.3f} {f['left_saturated']:6.3f} {f['right_saturated']:6.3f}"
                         f"  {f['mostly_left']:>18} {f['mostly_right']:>5}")
    return lines


def start_state(model, tokenizer, batch: int) -> torch.Tensor:
    """The state after the boundary token, where every stream the model read in training starts."""
    return trace(model, torch.full((batch, 1), tokenizer.boundary))[1]


def corpus_gates(model, recipe, tokenizer, tokens: int) -> tuple[dict, list[dict[str, Tally]], list[str]]:
    """The gates over ``tokens`` of the validation text -> (JSON figures, tallies, lines)."""
    data, warmup = cut_rows(common.text_ids(recipe.data, "valid", tokenizer, tokens + WARMUP))
    tallies = measure(model, data, warmup, start_state(model, tokenizer, data.size(0)))
    n, measured = data.size(0), data.size(0) * (data.size(1) - warmup)
    figures = {"tokens": measured, "rows": n, "warmup": warmup, "gates": gate_figures(tallies)}
    lines = [f"gates over {measured} tokens of {recipe.data.corpus}/valid, {n} row{'s' * (n > 1)} read in parallel "
             f"after {warmup} tokens of warm-up each", "(fractions of unit-steps; units saturated more than half "
             "the steps):", *table(tallies)]
    return figures, tallies, lines


def plots(plt, out, heat: Heat, records: list[dict], tallies: list[dict[str, Tally]], tokens: int, cell: str) -> dict:
    """heatmap.png, and gates.png (the saturation) or, for an RNN, activations.png (h's histogram)."""
    name = common.SHORT[cell]
    files = {"heatmap": common.save_figure(plot_heatmap(plt, heat), out / "heatmap.png")}
    if tallies:
        files["gates"] = common.save_figure(plot_gates(plt, tallies, f"{name} gates over {tokens} validation tokens"),
                                            out / "gates.png")
    else:
        fig = plot_activations(plt, records, f"{name}: h over the {heat.activity.size(0)} tokens of the passage")
        files["activations"] = common.save_figure(fig, out / "activations.png")
    return files


def command(args) -> tuple[dict, list[str]]:
    model, recipe, tokenizer = common.load_lm(args.checkpoint)
    cell, hidden, layers = model.stack.cell, model.stack.hidden_size, model.stack.num_layers
    layer = layer_index(args.layer, layers)
    ids, source = passage(args, recipe, tokenizer)
    records, _ = trace(model, ids.unsqueeze(0), start_state(model, tokenizer, 1))
    what = "tanh(c)" if cell == "lstm" else "h"
    activity = (torch.tanh(records[layer]["c"]) if cell == "lstm" else records[layer]["h"])[0]
    units = choose_units(args.units, activity, layer)
    if cell in GATES:
        figures, tallies, gate_lines = corpus_gates(model, recipe, tokenizer, args.tokens)
    else:
        figures, tallies = {"tokens": 0, "gates": {}}, []
        gate_lines = [f"{cell} has no gates: nothing saturates; drawn: the heat map and the histogram of h"]

    out = common.out_dir(args, "gates")
    heat = Heat(f"{common.SHORT[cell]} layer {layer}: {what}", what, pieces(tokenizer, ids), activity, units)
    files = {"html": write_html(out / "gates.html", heat, source)}
    plt = common.pyplot()
    if plt is not None:
        files.update(plots(plt, out, heat, records, tallies, figures["tokens"], cell))
    files["json"] = out / "gates.json"
    result = {"checkpoint": str(args.checkpoint), "cell": cell, "layers": layers, "hidden": hidden, "layer": layer,
              **figures, "activation": what, "units": units,
              "unit_variance": activity[:, units].var(0, unbiased=False).tolist(), "passage": source,
              "passage_tokens": ids.numel(), "files": {key: str(path) for key, path in files.items()}}
    common.save_json(files["json"], result)

    how = "as chosen" if args.units is not None else f"the {len(units)} of {hidden} whose {what} varies most"
    lines = [f"{common.SHORT[cell]}, {layers} layer{'s' * (layers > 1)} x {hidden} units ({args.checkpoint})",
             *gate_lines, f"heat map: layer {layer}, units {', '.join(map(str, units))} ({how}), "
             f"over {ids.numel()} tokens of {source}", *([] if plt else [common.NO_PLOTS]),
             "wrote " + ", ".join(str(path) for path in files.values())]
    return result, lines
