"""Exploding gradients: the same model trained with and without gradient clipping, from its
usual initialisation and with its recurrent weights scaled up.

Scaling W_hh past a spectral radius of 1 makes ∂h(t)/∂h(k) grow with t - k, so a few windows
send the gradient norm up by orders of magnitude; plain SGD then takes a step that size and the
loss jumps or turns NaN. Clipping the norm (Pascanu et al. 2013; train.clip in nlm) bounds the
step and training goes on. Four runs, one seed: the same initial weights (up to the scale) and the
same batches, so the curves differ only by the scale and the clip.
"""

from __future__ import annotations

import math
import statistics

import torch

from neurallm import config
from neurallm.diagnostics import common
from neurallm.errors import NlmError


def run(model, batches, steps: int, lr: float, clip: float) -> dict:
    """Plain SGD for ``steps`` windows; per step the loss and the gradient norm before clipping.
    A non-finite loss or gradient ends the run there (its step is recorded, no update is made)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, norms, state, diverged = [], [], None, None
    model.train()
    for step, (x, y) in zip(range(1, steps + 1), batches):
        features, state = model(x, None if state is None else state.detach())
        loss = model.loss(features, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf).item()
        losses.append(loss.item())
        norms.append(norm)
        if not (math.isfinite(losses[-1]) and math.isfinite(norm)):
            diverged = step
            break
        optimizer.step()
    return {"loss": losses, "grad_norm": norms, "diverged_at": diverged}


def summarise(record: dict) -> dict:
    finite = [n for n in record["grad_norm"] if math.isfinite(n)]
    median = statistics.median(finite) if finite else math.nan
    losses = [v for v in record["loss"][-20:] if math.isfinite(v)]
    return {"final_loss": statistics.mean(losses) if losses and record["diverged_at"] is None else None,
            "max_grad_norm": max(finite) if finite else None, "median_grad_norm": median,
            "spikes": sum(n > 10 * median for n in finite),  # steps with a norm 10x the run's median
            "diverged_at": record["diverged_at"]}


def command(args) -> tuple[dict, list[str]]:
    if not args.clip > 0:
        raise NlmError(f"--clip: {args.clip} (expected a norm > 0: the clipped runs' bound)")
    if not (args.scale > 0 and args.scale != 1):
        raise NlmError(f"--scale: {args.scale} (expected a positive factor other than 1)")
    if not args.lr > 0:
        raise NlmError(f"--lr: {args.lr} (expected a positive rate)")
    out = common.out_dir(args, "explode")
    cell = common.cell_name(args.cell)
    recipe = common.model_recipe(args.data, cell, args.layers, args.hidden, args.emb, args.connection)
    tokenizer = common.make_tokenizer(recipe)
    recipe = config.replace(recipe, model={"vocab_size": tokenizer.vocab_size})
    ids = common.text_ids(recipe.data, "train", tokenizer, args.batch_size * (args.bptt * args.steps + 1))
    result = {"cell": common.SHORT[cell], "layers": args.layers, "hidden_size": args.hidden, "data": args.data,
              "steps": args.steps, "lr": args.lr, "clip": args.clip, "scale": args.scale,
              "batch_size": args.batch_size, "bptt": args.bptt, "runs": {}}
    for scale in (1.0, args.scale):
        for clip in (0.0, args.clip):
            model = common.fresh_lm(recipe, args.seed)
            with torch.no_grad():
                for layer in model.stack.layers:
                    layer.weights(0)[1].mul_(scale)
            radius = max(torch.linalg.eigvals(layer.weights(0)[1].detach()).abs().max().item()
                         for layer in model.stack.layers)
            torch.manual_seed(args.seed)
            record = run(model, common.lm_batches(ids, args.batch_size, args.bptt), args.steps, args.lr, clip)
            name = f"W_hh x {scale:g}, " + (f"clip {clip:g}" if clip else "no clip")
            result["runs"][name] = {"scale": scale, "clip": clip or None, "spectral_radius": radius,
                                    **summarise(record), **record}
    lines = [f"{result['cell']} × {args.layers} of {args.hidden} on {args.data}, SGD lr {args.lr:g}, {args.steps} steps "
             f"of {args.batch_size} × {args.bptt} tokens",
             f"{'run':<26} {'ρ(W_hh)':>8} {'median |g|':>11} {'max |g|':>10} {'spikes':>7} {'last loss':>10} {'NaN at':>7}"]
    for name, r in result["runs"].items():
        lines.append(f"{name:<26} {r['spectral_radius']:>8.2f} {r['median_grad_norm']:>11.3g} "
                     f"{r['max_grad_norm'] if r['max_grad_norm'] is None else format(r['max_grad_norm'], '.3g'):>10} "
                     f"{r['spikes']:>7} {'-' if r['final_loss'] is None else format(r['final_loss'], '.3f'):>10} "
                     f"{r['diverged_at'] or '-':>7}")
    plot = plot_runs(result, out / "explode.png")
    result["files"] = {"json": str(out / "explode.json"), "plot": str(plot) if plot else None}
    common.save_json(out / "explode.json", result)
    lines += ["spikes: steps whose gradient norm is 10x the run's median; last loss: mean of the last 20 steps",
              f"wrote {out / 'explode.json'}" + (f" and {plot}" if plot else ""), *([] if plot else [common.NO_PLOTS])]
    return result, lines


def plot_runs(result: dict, path):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for name, r in result["runs"].items():
        steps = range(1, len(r["grad_norm"]) + 1)
        line, = top.plot(steps, [n if math.isfinite(n) else math.nan for n in r["grad_norm"]], linewidth=1, label=name)
        bottom.plot(steps, [v if math.isfinite(v) else math.nan for v in r["loss"]], linewidth=1, color=line.get_color())
        if r["diverged_at"]:
            for ax in (top, bottom):
                ax.axvline(r["diverged_at"], color=line.get_color(), linestyle=":", linewidth=1)
            top.annotate(" NaN", xy=(r["diverged_at"], 0.9), xycoords=("data", "axes fraction"), color=line.get_color())
    if result["clip"]:
        top.axhline(result["clip"], color="grey", linewidth=0.8, linestyle="--", label=f"clip {result['clip']:g}")
    top.set_yscale("log")
    top.set_ylabel("gradient norm (before clipping)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    bottom.set_yscale("log")  # a diverging run's loss leaves the others' range by decades
    bottom.set_ylabel("training loss (nats per token)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    top.set_title(f"Exploding gradients: {result['cell']} {result['layers']} × {result['hidden_size']}, "
                  f"SGD lr {result['lr']:g} (dotted: the step a run turned NaN)")
    return common.save_figure(fig, path)
