"""nlm compare: RNN, LSTM and GRU trained on one recipe under one budget, and a report.

Each cell trains with ``nlm train``'s own loop on the same recipe, seed and data, one after
another (so they share the machine alike), bounded by the same wall-clock minutes or the same
steps. ``--match size`` keeps the recipe's sizes (a GRU then has 3/4 of an LSTM's recurrent
weights, a vanilla RNN 1/4); ``--match params`` sets each later cell's hidden size so its
parameter count matches the first cell's. The report (report.md, compare.json, plots) gives
parameters, training speed, the best validation figure, the figure against wall-clock time,
and each trained model's gradient-decay distance (flow.py).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

from neurallm import checkpoint, config
from neurallm.diagnostics import common, flow
from neurallm.errors import NlmError
from neurallm.models.lm import RNNLM


def parameters(model_cfg: config.ModelConfig) -> int:
    return sum(p.numel() for p in RNNLM(model_cfg).parameters())


def matched_hidden(model_cfg: config.ModelConfig, cell: str, target: int) -> int:
    """The hidden size at which ``cell`` has about ``target`` parameters (the rest of the model as given)."""
    def count(hidden: int) -> int:
        return parameters(config.replace(config.Recipe(model=model_cfg), model={"cell": cell, "hidden_size": hidden}).model)

    low, high = 1, 8 * model_cfg.hidden_size
    while low < high:  # the smallest size with at least the target, then the nearer of it and the one below
        mid = (low + high) // 2
        low, high = (mid + 1, high) if count(mid) < target else (low, mid)
    return min((low - 1, low), key=lambda h: abs(count(h) - target)) if low > 1 else low


def recipes(args, overrides: list[str]) -> dict[str, config.Recipe]:
    cells = common.cell_list(args.cells)
    budget = []
    if args.minutes is not None:
        budget.append(f"--train.max_minutes={args.minutes}")
    if args.steps is not None:
        budget.append(f"--train.max_steps={args.steps}")
    if args.valid_every:
        budget.append(f"--train.valid_every={args.valid_every}")
    # A vanilla RNN may diverge at the rate tuned for an LSTM: every cell may go back and lower its rate.
    base = config.load_recipe(args.recipe, ["--train.on_divergence=recover", *overrides, *budget])
    if base.task.kind != "lm":
        raise NlmError(f"recipe {args.recipe}: nlm compare trains language models (task.kind = {base.task.kind})")
    out = {cell: config.replace(base, model={"cell": cell}) for cell in cells}
    if args.match == "params":
        tokenizer = common.make_tokenizer(base)
        sized = {name: config.replace(r, model={"vocab_size": tokenizer.vocab_size}) for name, r in out.items()}
        target = parameters(sized[cells[0]].model)
        for cell in cells[1:]:
            hidden = matched_hidden(sized[cell].model, cell, target)
            out[cell] = config.replace(out[cell], model={"hidden_size": hidden})
    return out


def budget_text(recipe: config.Recipe) -> str:
    t = recipe.train
    parts = ([f"{t.max_minutes:g} minutes of wall-clock"] if t.max_minutes else []) + \
        ([f"{t.max_steps} steps"] if t.max_steps else []) + ([] if t.max_minutes or t.max_steps else [f"{t.epochs} epochs"])
    return " or ".join(parts) + " per cell" + (", whichever comes first" if len(parts) > 1 else "")


def command(args, overrides: list[str]) -> tuple[dict, list[str]]:
    from neurallm.train import train

    runs = recipes(args, overrides)
    out = Path(args.out or Path("runs") / "compare" / Path(args.recipe).stem)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for cell, recipe in runs.items():
        run_dir = out / common.SHORT[cell]
        finished = (run_dir / "summary.json").is_file()
        if finished and not args.resume:
            raise NlmError(f"{run_dir}: holds a finished run; pass --resume to report it (and go on with the others) "
                           f"or choose another --out")
        if finished:
            summary = checkpoint.read_json(run_dir / "summary.json")
        else:
            summary = train(recipe, run_dir, resume=args.resume and (run_dir / "resume").exists(),
                            show_progress=not args.no_progress)
            checkpoint.atomic_write(run_dir / "summary.json",
                                    lambda p, s=summary: p.write_text(json.dumps(common.finite(s)) + "\n"))
        results[common.SHORT[cell]] = describe_run(run_dir, recipe, summary, recipe.train.seed)
    sized = {cell: config.replace(recipe, model={"vocab_size": results[common.SHORT[cell]]["vocab_size"]})
             for cell, recipe in runs.items()}
    for cell, rate in step_speed(sized).items():
        results[cell]["step_tokens_per_s"] = rate
    first = next(iter(runs.values()))
    report = {"recipe": args.recipe, "overrides": overrides, "match": args.match, "budget": budget_text(first),
              "char_level": first.data.tokenizer == "char", "cells": results,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "command": "nlm " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "nlm" else None}
    plots = plot_curves(report, out / "curves.png"), plot_decay(report, out / "gradients.png")
    report["files"] = {"report": str(out / "report.md"), "plots": [str(p) for p in plots if p]}
    common.save_json(out / "compare.json", report)
    text = markdown(report, [p for p in plots if p])
    checkpoint.atomic_write(out / "report.md", lambda p: p.write_text(text, encoding="utf-8"))
    return report, [*table(report), f"wrote {out / 'report.md'}", *([] if all(plots) else [common.NO_PLOTS])]


def describe_run(run_dir: Path, recipe: config.Recipe, summary: dict, seed: int) -> dict:
    """The figures of one trained cell: size, speed, validation over time, gradient decay."""
    model, saved, tokenizer = common.load_lm(run_dir)
    records = checkpoint.read_jsonl(run_dir / "metrics.jsonl")
    curve = [(r["elapsed"], r["step"], r["valid_loss"]) for r in records if "valid_loss" in r and "elapsed" in r]
    best = summary.get("best_valid_loss", summary.get("valid_loss"))
    length = 100 if tokenizer.kind != "char" else 200
    ids = common.text_ids(saved.data, "valid", tokenizer, 16 * (50 + length + 1))
    torch.manual_seed(seed)
    decay = flow.profile(model, flow.windows(ids, 16, 50, length), 50, 1000.0)
    return {"hidden_size": saved.model.hidden_size, "vocab_size": saved.model.vocab_size, "parameters": sum(p.numel() for p in model.parameters()),
            "steps": summary["steps"], "minutes": summary["elapsed_seconds"] / 60,
            "tokens_per_s": summary["tokens_per_s"], "train_step_tokens_per_s": summary["train_step_tokens_per_s"],
            "best_valid_loss": best, "best_valid_perplexity": math.exp(min(best, 700)),
            "best_valid_bpc": best / math.log(2), "recoveries": summary.get("recoveries", 0),
            "curve": [{"minutes": e / 60, "step": s, "valid_loss": v} for e, s, v in curve],
            "decay_distance": decay["decay_distance"], "gradient_curve": decay["relative"], "probe_length": length,
            "checkpoint": str(run_dir)}


def step_speed(runs: dict[str, config.Recipe], rounds: int = 5, steps: int = 5) -> dict[str, float]:
    """Training tokens/s of each cell's model on one random batch of the recipe's shape (forward, backward,
    update), timed in interleaved rounds and the median kept: the cells meet the same load on the machine,
    which the whole runs, one after another, need not."""
    import time

    models, times = {}, {}
    for cell, recipe in runs.items():
        cfg = recipe.train
        vocab = recipe.model.vocab_size
        torch.manual_seed(recipe.train.seed)
        model = RNNLM(config.replace(recipe, model={"vocab_size": vocab}).model)
        batch = torch.randint(0, vocab, (cfg.batch_size, cfg.bptt + 1))
        models[common.SHORT[cell]] = (model, torch.optim.SGD(model.parameters(), lr=1e-3), batch)
    for _ in range(rounds):
        for name, (model, optimizer, batch) in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                features, _ = model(batch[:, :-1])
                loss = model.loss(features, batch[:, 1:])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            times.setdefault(name, []).append(time.perf_counter() - start)
    return {name: steps * batch[:, 1:].numel() / sorted(t)[len(t) // 2]
            for (name, (_, _, batch)), t in zip(models.items(), times.values())}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _figure(report: dict, r: dict) -> str:
    return f"{r['best_valid_bpc']:.3f}" if report["char_level"] else f"{r['best_valid_perplexity']:.1f}"


def _decay(r: dict) -> str:
    return str(r["decay_distance"]) if r["decay_distance"] is not None else f"> {r['probe_length'] - 1}"


def table(report: dict) -> list[str]:
    figure = "valid bpc" if report["char_level"] else "valid ppl"
    lines = [f"| cell | hidden | parameters | training tokens/s | steps | minutes | {figure} | "
             f"gradient 1e3 decay (steps) | recoveries |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell, r in report["cells"].items():
        lines.append(f"| {cell} | {r['hidden_size']} | {r['parameters']:,} | {r['step_tokens_per_s']:,.0f} | {r['steps']} | "
                     f"{r['minutes']:.1f} | {_figure(report, r)} | {_decay(r)} | {r['recoveries']} |")
    return lines


def markdown(report: dict, plots: list[Path]) -> str:
    match = ("the recipe's sizes for every cell" if report["match"] == "size"
             else "each cell's hidden size set to match the first cell's parameter count")
    lines = [f"# RNN, LSTM and GRU on `{report['recipe']}`", "",
             f"Made by `{report['command'] or 'nlm compare ' + report['recipe']}` on {report['date'][:10]} "
             f"({report['machine']['cpu']}, {report['machine']['cores']} cores, torch {report['machine']['torch']}, "
             f"{report['machine']['threads']} threads).", "",
             f"Budget: {report['budget']}; {match}; the same recipe, seed and data for each, trained one after "
             f"another. Training tokens/s: forward, backward and update on a batch of the recipe's shape, each cell "
             f"timed in turn over interleaved rounds (median), so all meet the same load; minutes: each whole run's "
             f"wall-clock (validation included), which a busy machine can stretch. The validation figure is the best "
             f"checkpoint's; the gradient decay is the distance at which ‖∂J(t)/∂h(t-d)‖ of the trained model "
             f"has fallen 1000-fold (`nlm diagnose gradients`, 16 windows of the validation text). A recovery is "
             f"a step whose loss or gradient was not finite: the run went back to its last snapshot at half the rate "
             f"(`train.on_divergence=recover`).", "", *table(report), ""]
    for plot in plots:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    return "\n".join(lines)


def plot_curves(report: dict, path: Path):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell, r in report["cells"].items():
        points = [(p["minutes"], p["valid_loss"] / math.log(2) if report["char_level"] else math.exp(p["valid_loss"]))
                  for p in r["curve"]]
        if points:
            ax.plot(*zip(*points), "o-", markersize=3, label=f"{cell} ({r['parameters'] / 1e6:.2f}M parameters)")
    ax.set_xlabel("wall-clock time (minutes)")
    ax.set_ylabel("validation bits per character" if report["char_level"] else "validation perplexity")
    if not report["char_level"]:
        ax.set_yscale("log")
    ax.set_title(f"{report['recipe']}: validation against training time")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return common.save_figure(fig, path)


def plot_decay(report: dict, path: Path):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell, r in report["cells"].items():
        ax.plot([v if v > 0 else math.nan for v in r["gradient_curve"]], label=cell)
    ax.axhline(1e-3, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("distance d = t - k (time steps)")
    ax.set_ylabel("‖∂J(t)/∂h(t-d)‖ / ‖∂J(t)/∂h(t)‖ (all layers)")
    ax.set_title(f"{report['recipe']}: gradient flow back in time, trained models")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return common.save_figure(fig, path)
