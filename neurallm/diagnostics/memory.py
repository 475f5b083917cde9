"""nlm diagnose memory: how far back can each cell carry what it read?

Each cell learns synthetic tasks whose answer is decided by one input ``d`` steps before the step
where it is read, for growing ``d``, at an equal parameter count and one fixed training budget:

copy     a symbol (one of 8) at step 0, noise symbols (8 others) at steps 1 .. d-1, a recall
         marker at step d; the answer, read at step d, is the symbol.
adding   (Hochreiter & Schmidhuber 1997) two channels, a value uniform in [0, 1] and a marker 0/1,
         over steps 0 .. d; the markers flag step 0 and one step drawn from 1 .. d; the answer, read
         at step d, is the sum of the two marked values.

The distance d is the number of steps between the input that decides the answer and the step
where it is read. The held-out sequences put that input exactly d steps back, as above; the
training sequences put it anywhere from 1 to d steps back (the symbol's own alphabet, or the
marker, says where), every cell alike. Trained on d alone, a gate at its initial value (σ(0) = 1/2 for the LSTM's forget gate)
passes almost nothing back over 50 steps, and in a budget of 1500 steps no cell learned the
copy task at d = 50; the shorter distances in each batch let the gates learn to hold first.

Solved: copy at >= 95% accuracy; adding at an MSE <= 5% of predicting the targets' mean. The
largest distance solved is each cell's ``max_distance``.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from neurallm.diagnostics import common
from neurallm.errors import NlmError
from neurallm.models.cells import GATES
from neurallm.models.stack import RecurrentStack

SYMBOLS, NOISE = 8, 8  # the copy task's alphabet: symbols to recall, then noise symbols, then the marker
RECALL = SYMBOLS + NOISE
TASKS = ("copy", "adding")
INPUTS = {"copy": RECALL + 1, "adding": 2}  # one-hot symbols; the value and marker channels
OUTPUTS = {"copy": SYMBOLS, "adding": 1}
SOLVED = 0.95  # copy is solved at this accuracy on the held-out sequences
RELATIVE_MSE = 0.05  # adding is solved at an MSE this fraction of predicting the targets' mean
TOLERANCE = 0.08  # an adding answer counts as right within this: 0.04 on H&S's target scale, which is half ours
CLIP = 1.0  # gradient norm clip, every cell alike
CHECK_EVERY = 100  # steps between the checks that may end a run early
CHECK_STREAM, HELD_OUT_STREAM = 1_000_003, 2_000_003  # seed offsets: these sequences never come from a training stream
TASK_TEXT = {
    "copy": f"a symbol (one of {SYMBOLS}) d steps before a recall marker, noise symbols ({NOISE} others) in between; "
            "answer the symbol at the marker",
    "adding": "values uniform in [0, 1] with a marker channel; answer, at the last step, the sum of the two marked "
              "values, the first of them d steps back",
}
RULE = (f"solved: copy accuracy >= {SOLVED:g}; adding MSE <= {RELATIVE_MSE:g} x that of predicting the mean "
        "(on the held-out sequences);\nmax d: the largest distance solved (0: none). Training sequences put "
        "the deciding input 1 .. d steps back, held-out ones exactly d;\na run ends early only when a check every "
        f"{CHECK_EVERY} steps, on sequences apart from the held-out ones, finds the task already solved.")


def first_steps(d: int, batch: int, generator: torch.Generator, spread: bool) -> torch.Tensor:
    """Each row's deciding step: 0 (distance d), or with ``spread`` drawn from 0 .. d-1 (distance 1 .. d)."""
    return torch.randint(d, (batch,), generator=generator) if spread else torch.zeros(batch, dtype=torch.long)


def copy_batch(d: int, batch: int, generator: torch.Generator, spread: bool = False):
    """-> ids (batch, d + 1), targets (batch,): noise symbols, the symbol to recall at the
    deciding step, the recall marker at step d."""
    ids = torch.randint(SYMBOLS, RECALL, (batch, d + 1), generator=generator)
    first = first_steps(d, batch, generator, spread)
    ids[torch.arange(batch), first] = torch.randint(SYMBOLS, (batch,), generator=generator)
    ids[:, d] = RECALL
    return ids, copy_answer(ids)


def copy_answer(ids: torch.Tensor) -> torch.Tensor:
    """The one symbol in each row of ids (batch, time) that is not noise or the marker."""
    return ids.gather(1, (ids < SYMBOLS).long().argmax(1, keepdim=True))[:, 0]


def adding_batch(d: int, batch: int, generator: torch.Generator, spread: bool = False):
    """-> inputs (batch, d + 1, 2), targets (batch,): a value uniform in [0, 1] at every step and
    a marker on the deciding step and on one later step drawn from those up to d."""
    rows = torch.arange(batch)
    first = first_steps(d, batch, generator, spread)
    values = torch.rand(batch, d + 1, generator=generator)
    second = first + 1 + (torch.rand(batch, generator=generator) * (d - first)).long()  # uniform in first+1 .. d
    markers = torch.zeros(batch, d + 1)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    inputs = torch.stack([values, markers], dim=2)
    return inputs, adding_answer(inputs)


def adding_answer(inputs: torch.Tensor) -> torch.Tensor:
    """The sum of the marked values of each row of inputs (batch, time, [value, marker])."""
    return (inputs[..., 0] * inputs[..., 1]).sum(1)


BATCHES = {"copy": copy_batch, "adding": adding_batch}


class Probe(nn.Module):
    """One recurrent layer and a linear head on its last step's output."""

    def __init__(self, cell: str, task: str, hidden: int):
        super().__init__()
        self.task = task
        self.stack = RecurrentStack(cell, INPUTS[task], hidden, 1)
        self.head = nn.Linear(hidden, OUTPUTS[task])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> logits (batch, symbols) for copy, the predicted sum (batch,) for adding."""
        if self.task == "copy":
            x = F.one_hot(x, INPUTS["copy"]).float()
        out = self.head(self.stack(x)[0][:, -1])
        return out if self.task == "copy" else out[:, 0]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self(x)
        return F.cross_entropy(out, y) if self.task == "copy" else F.mse_loss(out, y)


def param_count(cell: str, task: str, hidden: int) -> int:
    """Parameters of Probe(cell, task, hidden): the layer's weights and biases, and the head."""
    inputs, outputs = INPUTS[task], OUTPUTS[task]
    return GATES[cell] * hidden * (inputs + hidden + 2) + (hidden + 1) * outputs


def hidden_size(cell: str, task: str, params: int) -> int:
    """The hidden size whose parameter count lies closest to ``params``."""
    return min(range(1, math.isqrt(params) + 2), key=lambda h: abs(param_count(cell, task, h) - params))


def evaluate(model: Probe, x: torch.Tensor, y: torch.Tensor, chunk: int = 250) -> dict:
    """Accuracy on held-out sequences; for adding also the MSE, alone and relative to predicting
    the targets' mean (the trivial baseline, about 1/6)."""
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    model.train()
    if model.task == "copy":
        return {"accuracy": (out.argmax(1) == y).float().mean().item()}
    error = out - y
    mse = error.pow(2).mean().item()
    return {"accuracy": (error.abs() < TOLERANCE).float().mean().item(), "mse": mse,
            "relative_mse": mse / y.var(unbiased=False).item()}


def solved(task: str, scores: dict) -> bool:
    """The one rule per task, for the early stop and for max_distance alike."""
    return scores["accuracy"] >= SOLVED if task == "copy" else scores["relative_mse"] <= RELATIVE_MSE


def train(cell: str, task: str, d: int, hidden: int, seed: int, args, check: tuple) -> tuple[Probe, int]:
    """Adam on fresh training sequences every step, gradient norm clipped at CLIP, for args.steps
    steps; it stops early only when a check (every CHECK_EVERY steps, on the ``check`` sequences)
    finds the task already solved. -> (model, steps taken)."""
    torch.manual_seed(seed)
    model = Probe(cell, task, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, args.steps + 1):
        x, y = BATCHES[task](d, args.batch_size, generator, spread=True)
        optimizer.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        if step % CHECK_EVERY == 0 and step < args.steps and solved(task, evaluate(model, *check)):
            return model, step
    return model, args.steps


def parse(args) -> tuple[list[str], list[str], list[int]]:
    """--cells, --tasks, --distances (increasing) and --lr, checked before anything is made."""
    cells = common.cell_list(args.cells)
    tasks = common.name_list(args.tasks, "--tasks", TASKS)
    if len(set(tasks)) != len(tasks):
        raise NlmError(f"--tasks: {args.tasks!r} names a task twice")
    distances = common.int_list(args.distances, "--distances")
    if not args.lr > 0:
        raise NlmError(f"--lr: {args.lr} (expected a rate > 0)")
    return cells, tasks, distances


def command(args) -> tuple[dict, list[str]]:
    cells, tasks, distances = parse(args)
    out = common.out_dir(args, "memory")
    seeds = [args.seed + s for s in range(args.seeds)]
    sizes = {(cell, task): hidden_size(cell, task, args.params) for cell in cells for task in tasks}
    runs = {(cell, task, seed): {} for cell in cells for task in tasks for seed in seeds}  # d -> scores
    started = time.perf_counter()
    bar = tqdm(total=len(runs) * len(distances), desc="memory", unit="run", disable=None, leave=False)
    for task in tasks:
        for d in distances:
            # The same check and held-out sequences for every cell and seed (streams apart from training's).
            check = BATCHES[task](d, args.eval_size, torch.Generator().manual_seed(args.seed + CHECK_STREAM))
            held = BATCHES[task](d, args.eval_size, torch.Generator().manual_seed(args.seed + HELD_OUT_STREAM))
            for cell in cells:
                for seed in seeds:
                    bar.set_postfix_str(f"{common.SHORT[cell]} {task} d={d} seed {seed}")
                    model, steps = train(cell, task, d, sizes[cell, task], seed, args, check)
                    runs[cell, task, seed][d] = {**evaluate(model, *held), "steps": steps}
                    bar.update()
    bar.close()
    result = {common.SHORT[cell]: summarise_cell(cell, tasks, distances, seeds, sizes, runs) for cell in cells}
    result.update(budget={"params": args.params, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                          "optimizer": "Adam", "clip": CLIP, "check_every": CHECK_EVERY, "eval_size": args.eval_size,
                          "seeds": seeds},
                  rule=RULE, task_descriptions=TASK_TEXT, distances=distances,
                  seconds=round(time.perf_counter() - started, 1))
    lines = report(result, cells, tasks, distances, len(seeds))
    plot = plot_memory(result, cells, tasks, distances, out / "memory.png")
    result["files"] = {"json": str(out / "memory.json"), "plot": str(plot) if plot else None}
    common.save_json(out / "memory.json", result)
    lines += [f"wrote {out / 'memory.json'}" + (f" and {plot}" if plot else ""), *([] if plot else [common.NO_PLOTS])]
    return result, lines


def summarise_cell(cell: str, tasks: list[str], distances: list[int], seeds: list[int], sizes: dict,
                   runs: dict) -> dict:
    """One cell's figures per task (means over seeds, their spread, each seed's); the first task's
    max_distance and accuracy_by_distance also at the top."""
    per_task = {}
    for task in tasks:
        per_seed = [runs[cell, task, seed] for seed in seeds]
        figures = ["accuracy"] + (["mse", "relative_mse"] if task == "adding" else [])
        record = {"hidden_size": sizes[cell, task], "params": param_count(cell, task, sizes[cell, task])}
        best = [max([d for d in distances if solved(task, scores[d])], default=0) for scores in per_seed]
        record.update(max_distance=statistics.median_low(best), max_distance_by_seed=best)
        for figure in figures:
            record[f"{figure}_by_distance"] = {str(d): statistics.fmean(s[d][figure] for s in per_seed)
                                               for d in distances}
            record[f"{figure}_spread"] = {str(d): [min(s[d][figure] for s in per_seed),
                                                   max(s[d][figure] for s in per_seed)] for d in distances}
        record["seeds"] = [{"seed": seed, "max_distance": b,
                            **{f"{figure}_by_distance": {str(d): s[d][figure] for d in distances}
                               for figure in figures + ["steps"]}}
                           for seed, b, s in zip(seeds, best, per_seed)]
        per_task[task] = record
    first = per_task[tasks[0]]
    return {"hidden_size": first["hidden_size"], "params": first["params"], "max_distance": first["max_distance"],
            "accuracy_by_distance": first["accuracy_by_distance"], "tasks": per_task}


def report(result: dict, cells: list[str], tasks: list[str], distances: list[int], n_seeds: int) -> list[str]:
    budget = result["budget"]
    lines = [f"each cell sized to about {budget['params']} parameters, trained {budget['steps']} Adam steps "
             f"(lr {budget['lr']:g}, gradient norm clipped at {CLIP:g}) of {budget['batch_size']} fresh sequences per "
             f"task and distance; {n_seeds} seed{'s' if n_seeds > 1 else ''} ({', '.join(map(str, budget['seeds']))}); "
             f"{budget['eval_size']} held-out sequences per distance"]
    for task in tasks:
        if task == "copy":
            lines += ["", f"copy: accuracy with the symbol d steps back (chance {1 / SYMBOLS:.3f}; "
                          f"solved: >= {SOLVED:g})",
                      *table(result, cells, task, "accuracy", ".2f", distances, n_seeds)]
        else:
            lines += ["", f"adding: MSE / the MSE of predicting the mean (about 1/6), the first marked value d steps "
                          f"back (solved: <= {RELATIVE_MSE:g})",
                      *table(result, cells, task, "relative_mse", ".3g", distances, n_seeds),
                      "", f"adding: accuracy, the share of answers within {TOLERANCE:g} of the sum",
                      *table(result, cells, task, "accuracy", ".2f", distances, n_seeds, with_max=False)]
    return lines + ["", *RULE.split("\n"), f"{result['seconds']:.0f} s in all"]


def table(result: dict, cells: list[str], task: str, figure: str, fmt: str, distances: list[int], n_seeds: int,
          with_max: bool = True) -> list[str]:
    """Rows: cells; columns: the figure (mean over seeds) at each distance, then the largest distance
    solved. With several seeds a second row per cell gives each figure's min-max over the seeds."""
    width = 8 if n_seeds == 1 else 14
    lines = [f"{'cell':<9}{'hidden':>7}{'params':>8}" + "".join(f"{'d=' + str(d):>{width}}" for d in distances)
             + ("   max d" if with_max else "")]
    for cell in cells:
        r = result[common.SHORT[cell]]["tasks"][task]
        row = f"{common.SHORT[cell]:<9}{r['hidden_size']:>7}{r['params']:>8}" + "".join(
            f"{format(r[f'{figure}_by_distance'][str(d)], fmt):>{width}}" for d in distances)
        if with_max:
            row += f"{r['max_distance']:>8}"
            if n_seeds > 1:
                row += f"  (lower median; per seed {', '.join(map(str, r['max_distance_by_seed']))})"
        lines.append(row)
        if n_seeds > 1:
            spread = r[f"{figure}_spread"]
            lines.append(f"{'  min-max':<24}" + "".join(
                f"{format(spread[str(d)][0], fmt) + '-' + format(spread[str(d)][1], fmt):>{width}}" for d in distances))
    return lines


def plot_memory(result: dict, cells: list[str], tasks: list[str], distances: list[int], path):
    """One panel per task and figure: copy accuracy; adding MSE relative to the baseline (log) and
    accuracy; one line per cell (the mean over seeds, shaded between the seeds' min and max)."""
    plt = common.pyplot()
    if plt is None:
        return None
    panels = [(task, figure) for task in tasks
              for figure in (["accuracy"] if task == "copy" else ["relative_mse", "accuracy"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (task, figure) in zip(axes[0], panels):
        for cell in cells:
            r = result[common.SHORT[cell]]["tasks"][task]
            mean = [r[f"{figure}_by_distance"][str(d)] for d in distances]
            line, = ax.plot(distances, mean, marker="o", label=f"{common.SHORT[cell]} ({r['hidden_size']} units, "
                                                                 f"{r['params']} params)")
            spread = r[f"{figure}_spread"]
            ax.fill_between(distances, [spread[str(d)][0] for d in distances], [spread[str(d)][1] for d in distances],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        if figure == "relative_mse":
            ax.axhline(RELATIVE_MSE, color="grey", linestyle="--", linewidth=0.8,
                       label=f"solved below {RELATIVE_MSE:g}")
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=0.8, label="predicting the mean")
            ax.set_yscale("log")
            ax.set_ylabel("MSE / MSE of predicting the mean (ratio)", fontsize=9)
        else:
            ax.axhline(SOLVED, color="grey", linestyle="--", linewidth=0.8,
                       label=f"solved at {SOLVED:g}" if task == "copy" else f"{SOLVED:g} (copy's bar)")
            if task == "copy":
                ax.axhline(1 / SYMBOLS, color="grey", linestyle=":", linewidth=0.8, label="chance")
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("accuracy (share of held-out sequences)" if task == "copy"
                          else f"accuracy (share with |error| < {TOLERANCE:g})", fontsize=9)
        ax.set_xscale("log")
        ax.set_xticks(distances, [str(d) for d in distances])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_xlabel("distance d (time steps back)")
        ax.set_title(f"{task}: {'accuracy' if figure == 'accuracy' else 'MSE relative to the baseline'} vs d")
        ax.grid(alpha=0.3, axis="x")
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(fontsize=7)
    budget = result["budget"]
    fig.suptitle(f"Memory at ~{budget['params']} parameters: {budget['steps']} Adam steps × {budget['batch_size']} "
                 f"sequences, lr {budget['lr']:g}, {len(budget['seeds'])} seed(s)", fontsize=10)
    return common.save_figure(fig, path)
