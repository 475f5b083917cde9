"""Gradient flow: how ‖∂J(t)/∂h(k)‖ falls (or grows) with the distance t - k, and through depth.

The loss J(t) of the last position of a window is differentiated with respect to every hidden
state h_l(k) of the window, in each layer l, in one backward pass. The stack is unrolled one
step at a time with the written-out cells (cells.py), so each h_l(k) is a node of the graph;
the fused kernels hide their per-step states from autograd. ``unroll`` gives the same features
as the model's own forward (tested).

Why a vanilla RNN forgets: ∂h(t)/∂h(k) is a product of t - k Jacobians diag(f'(·)) W_hh, so
its norm is at most (σ_max(W_hh) · max|f'|)^(t-k); with σ_max < 1 it must vanish
geometrically (Pascanu et al. 2013). An LSTM's cell path c(t) = f ⊙ c(t-1) + ... carries the
gradient through the forget gate instead, with no matrix in the way.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from neurallm.diagnostics import common
from neurallm.errors import NlmError
from neurallm.models import cells


def unroll(model, ids: torch.Tensor, state: torch.Tensor | None = None):
    """The model read one step at a time -> (features (batch, time, F), states): states[t][l] is
    layer l's state after step t, (parts, batch, hidden) (parts: h, and c for an LSTM), a node of
    the graph. Dropout off: call it on a model in eval mode."""
    stack = model.stack
    if stack.directions != 1:
        raise NlmError("gradient flow is measured on forward (unidirectional) models")
    x = model.embed(ids)
    if state is None:
        state = stack.init_state(ids.size(0), x.device, x.dtype)
    layer_states = [state[i, :, 0] for i in range(stack.num_layers)]  # (parts, batch, hidden) each
    features, states = [], []
    for t in range(ids.size(1)):
        below = [x[:, t]]
        for i, layer in enumerate(stack.layers):
            inp = stack.layer_input(below)
            layer_states[i] = cells.step(stack.cell, inp, layer_states[i], layer.weights(0))
            below.append(stack.join(i, layer_states[i][0], inp))
        features.append(model.proj(below[-1]) if model.proj is not None else below[-1])
        states.append(list(layer_states))
    return torch.stack(features, dim=1), states


def windows(ids: torch.Tensor, rows: int, warmup: int, length: int) -> torch.Tensor:
    """``rows`` stretches of warmup + length + 1 tokens, cut one after another from ``ids``."""
    size = warmup + length + 1
    if ids.numel() < size:
        raise NlmError(f"the text has {ids.numel()} tokens; a window needs {size} (lower --length or --warmup)")
    rows = min(rows, ids.numel() // size)
    return ids[: rows * size].view(rows, size)


def measure(model, batch: torch.Tensor, warmup: int) -> dict[str, torch.Tensor]:
    """Per row, layer and distance d: ‖∂J(T)/∂h_l(T - d)‖, J(T) the NLL of the window's last target.

    batch (rows, warmup + length + 1): the first ``warmup`` tokens set the state (no gradient),
    the next ``length`` are unrolled, the last is the target. -> {"h": (rows, layers, length),
    and for an LSTM "c": the same for the cell state}, index d = 0 the last step."""
    model.eval()
    with torch.no_grad():
        _, state = model(batch[:, :warmup]) if warmup else (None, None)
    inputs, target = batch[:, warmup:-1], batch[:, -1]
    with torch.enable_grad():
        features, states = unroll(model, inputs, state)
        nll = model.loss(features[:, -1:], target.unsqueeze(1), reduction="none").sum()  # rows apart: per-row gradients
        nodes = [s for step in states for s in step]
        grads = torch.autograd.grad(nll, nodes, allow_unused=True)
    layers, length = model.stack.num_layers, inputs.size(1)
    norms = torch.zeros(len(nodes), model.stack.parts, batch.size(0))
    for n, g in enumerate(grads):
        if g is not None:
            norms[n] = g.norm(dim=2)  # (parts, rows)
    norms = norms.view(length, layers, model.stack.parts, -1).permute(3, 1, 2, 0).flip(3)  # (rows, layers, parts, d)
    out = {"h": norms[:, :, 0]}
    if model.stack.parts == 2:
        out["c"] = norms[:, :, 1]
    return out


def decay_distance(curve: list[float], factor: float) -> int | None:
    """The first distance at which the curve has fallen ``factor`` times below its value at 0 (None: never)."""
    if not curve or not curve[0] > 0:
        return None
    return next((d for d, v in enumerate(curve) if v <= curve[0] / factor), None)


def rate_per_step(curve: list[float]) -> float | None:
    """exp of the least-squares slope of log norm against distance: the mean factor per step back."""
    points = [(d, math.log(v)) for d, v in enumerate(curve) if v > 0 and math.isfinite(v) and d >= 1]
    if len(points) < 2:
        return None
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return math.exp(slope)


def recurrent_spectrum(model) -> list[dict]:
    """Per layer: the spectral radius and the largest singular values of W_hh, per gate block."""
    names = {"lstm": ("input", "forget", "cell", "output"), "gru": ("reset", "update", "new")}
    layers = []
    for layer in model.stack.layers:
        w_hh = layer.weights(0)[1].detach().float()
        blocks = {}
        for name, block in zip(names.get(layer.cell, ("W_hh",)), w_hh.chunk(len(names.get(layer.cell, (0,))), dim=0)):
            singular = torch.linalg.svdvals(block)
            blocks[name] = {"spectral_radius": torch.linalg.eigvals(block).abs().max().item(),
                            "singular_values": [round(v, 4) for v in singular[:3].tolist()]}
        layers.append(blocks)
    return layers


def profile(model, batch: torch.Tensor, warmup: int, factor: float) -> dict:
    """The curves (mean over rows), their decay distances and rates, per layer and overall."""
    norms = measure(model, batch, warmup)
    h = norms["h"]  # (rows, layers, d)
    result = {"layers": []}
    for layer in range(h.size(1)):
        curve = h[:, layer].mean(0).tolist()
        entry = {"curve": curve, "relative": [v / curve[0] if curve[0] else math.nan for v in curve],
                 "decay_distance": decay_distance(curve, factor), "rate_per_step": rate_per_step(curve)}
        if "c" in norms:
            cell_curve = norms["c"][:, layer].mean(0).tolist()
            entry["cell_state_curve"] = cell_curve
            entry["cell_state_decay_distance"] = decay_distance(cell_curve, factor)
        result["layers"].append(entry)
    overall = h.pow(2).sum(1).sqrt().mean(0).tolist()  # all layers' h(k) as one vector
    result.update(curve=overall, relative=[v / overall[0] if overall[0] else math.nan for v in overall],
                  decay_distance=decay_distance(overall, factor), rate_per_step=rate_per_step(overall),
                  growth=overall[-1] / overall[0] if overall[0] else None)
    return result


def bound_distance(sigma: float, factor: float) -> float | None:
    """For a tanh or ReLU RNN (|f'| <= 1): the distance by which σ_max^d has fallen ``factor`` times,
    an upper bound on where the gradient must have fallen that much (None for σ_max >= 1: no bound)."""
    return math.log(factor) / -math.log(sigma) if 0 < sigma < 1 else None


# ---- nlm diagnose gradients ------------------------------------------------------------------

def gradients(args) -> tuple[dict, list[str]]:
    from neurallm import config

    if not args.factor > 1:
        raise NlmError(f"--factor: {args.factor} (expected a number > 1: how many times the gradient has fallen)")
    torch.manual_seed(args.seed)
    out = common.out_dir(args, "gradients")
    if args.checkpoint:
        trained, recipe, tokenizer = common.load_lm(args.checkpoint)  # a backward one reads its text backwards
        models = {"trained": trained, "initial": common.fresh_lm(recipe, args.seed)}
    else:
        recipe = common.model_recipe(args.data or "ptb", common.cell_name(args.cell), args.layers, args.hidden,
                                     args.emb, args.connection)
        tokenizer = common.make_tokenizer(recipe)
        recipe = config.replace(recipe, model={"vocab_size": tokenizer.vocab_size})
        models = {"initial": common.fresh_lm(recipe, args.seed)}
    data = dataclasses.replace(recipe.data, corpus=args.data) if args.data else recipe.data
    rows = windows(common.text_ids(data, args.split, tokenizer, args.rows * (args.warmup + args.length + 1)),
                   args.rows, args.warmup, args.length)
    cell = common.SHORT[recipe.model.cell]
    result = {"cell": cell, "layers": recipe.model.num_layers, "hidden_size": recipe.model.hidden_size,
              "connection": recipe.model.connection, "data": data.corpus, "split": args.split,
              "length": args.length, "rows": rows.size(0), "warmup": args.warmup, "factor": args.factor,
              "checkpoint": args.checkpoint, "models": {}}
    for name, model in models.items():
        figures = profile(model, rows, args.warmup, args.factor)
        figures["recurrent"] = recurrent_spectrum(model)
        if recipe.model.cell.startswith("rnn"):
            # The top layer's gradient flows back through its own W_hh alone; a lower layer's also goes up
            # into the next layer and back along it, so the bound is the top layer's only.
            top, spectrum = figures["layers"][-1], figures["recurrent"][-1]
            top["bound_distance"] = bound_distance(spectrum["W_hh"]["singular_values"][0], args.factor)
        result["models"][name] = figures
    result["decay_distance"] = result["models"]["trained" if args.checkpoint else "initial"]["decay_distance"]
    lines = gradient_lines(result)
    plot = plot_gradients(result, out / "gradients.png")
    result["files"] = {"json": str(out / "gradients.json"), "plot": str(plot) if plot else None}
    common.save_json(out / "gradients.json", result)
    lines += [f"wrote {out / 'gradients.json'}" + (f" and {plot}" if plot else ""), *([] if plot else [common.NO_PLOTS])]
    return result, lines


def _distance(value, length: int) -> str:
    return f"{value}" if value is not None else f"> {length - 1}"


def gradient_lines(result: dict) -> list[str]:
    length = result["length"]
    lines = [f"{result['cell']} × {result['layers']} layers of {result['hidden_size']}"
             f"{'' if result['connection'] == 'none' else ', ' + result['connection']}: ‖∂J(t)/∂h(t-d)‖ over "
             f"{result['rows']} windows of {result['data']}/{result['split']}, d = 0..{length - 1}",
             f"{'model':<9} {'layer':<7} {'1e{:g} at d'.format(math.log10(result['factor'])):>12} "
             f"{'per step':>9} {'|grad| d=0':>11} {'σ_max(W_hh)':>12} {'ρ(W_hh)':>8}"]
    for name, figures in result["models"].items():
        for i, (layer, spectrum) in enumerate(zip(figures["layers"], figures["recurrent"])):
            top = max(spectrum.values(), key=lambda b: b["singular_values"][0])
            rate = layer["rate_per_step"]
            lines.append(f"{name:<9} {i:<7} {_distance(layer['decay_distance'], length):>12} "
                         f"{'' if rate is None else format(rate, '.3f'):>9} {layer['curve'][0]:>11.3g} "
                         f"{top['singular_values'][0]:>12.3f} {top['spectral_radius']:>8.3f}")
            if layer.get("bound_distance") is not None:
                lines.append(f"{'':<17} bound from σ_max: the gradient must fall 1e{math.log10(result['factor']):g} "
                             f"by d = {layer['bound_distance']:.0f}")
        lines.append(f"{name:<9} {'all':<7} {_distance(figures['decay_distance'], length):>12} "
                     f"{'' if figures['rate_per_step'] is None else format(figures['rate_per_step'], '.3f'):>9}"
                     + (f"   (grows {figures['growth']:.3g}x over the window)" if figures["growth"] and figures["growth"] > 1 else ""))
    return lines


def plot_gradients(result: dict, path) -> object:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"trained": "-", "initial": "--"}
    for name, figures in result["models"].items():
        for i, layer in enumerate(figures["layers"]):
            values = [v if v > 0 else math.nan for v in layer["relative"]]
            ax.plot(range(len(values)), values, styles[name], label=f"{name}, layer {i}")
    ax.axhline(1 / result["factor"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("distance d = t - k (time steps)")
    ax.set_ylabel("‖∂J(t)/∂h(t-d)‖ / ‖∂J(t)/∂h(t)‖")
    ax.set_title(f"Gradient flow back in time: {result['cell']}, {result['layers']} × {result['hidden_size']}, "
                 f"{result['data']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return common.save_figure(fig, path)


# ---- nlm diagnose depth --------------------------------------------------------------------

def depth(args) -> tuple[dict, list[str]]:
    from neurallm import config

    torch.manual_seed(args.seed)
    out = common.out_dir(args, "depth")
    cell = common.cell_name(args.cell)
    depths = common.int_list(args.layers, "--layers")
    connections = common.name_list(args.connections, "--connections", config.CONNECTIONS)
    base = common.model_recipe(args.data, cell, 1, args.hidden, args.hidden)
    tokenizer = common.make_tokenizer(base)
    ids = common.text_ids(base.data, "valid", tokenizer, args.rows * (args.warmup + args.length + 1))
    rows = windows(ids, args.rows, args.warmup, args.length)
    train_ids = common.text_ids(base.data, "train", tokenizer, 20 * 35 * max(args.steps, 1) + 1) if args.steps else None
    result = {"cell": common.SHORT[cell], "hidden_size": args.hidden, "data": args.data, "length": args.length,
              "rows": rows.size(0), "steps": args.steps, "stacks": {}}
    lines = [f"{common.SHORT[cell]} stacks of {args.hidden} units, "
             + ("at initialisation" if not args.steps else f"after {args.steps} training steps")
             + f": ‖∂J(t)/∂h_l(t)‖ per layer l, relative to the top layer ({rows.size(0)} windows of {args.data}/valid)",
             f"{'layers':<7} {'connection':<10} {'bottom/top':>11} {'time decay (bottom, top)':>25}"]
    for layers in depths:
        for connection in connections:
            recipe = config.replace(base, model={"num_layers": layers, "connection": connection,
                                                 "vocab_size": tokenizer.vocab_size})
            model = common.fresh_lm(recipe, args.seed)
            if args.steps:
                common.train_briefly(model, train_ids, args.steps)
            figures = profile(model, rows, args.warmup, 1000.0)
            through = [layer["curve"][0] for layer in figures["layers"]]
            figures["through_depth"] = [v / through[-1] for v in through]
            result["stacks"][f"{layers}-{connection}"] = {"layers": layers, "connection": connection,
                                                          "through_depth": figures["through_depth"],
                                                          "decay_distance": [layer["decay_distance"] for layer in figures["layers"]],
                                                          "gradient_at_top": through[-1]}
            decay = figures["layers"][0]["decay_distance"], figures["layers"][-1]["decay_distance"]
            lines.append(f"{layers:<7} {connection:<10} {figures['through_depth'][0]:>11.3g} "
                         f"{_distance(decay[0], args.length) + ', ' + _distance(decay[1], args.length):>25}")
    plot = plot_depth(result, depths, connections, out / "depth.png")
    result["files"] = {"json": str(out / "depth.json"), "plot": str(plot) if plot else None}
    common.save_json(out / "depth.json", result)
    lines += [f"wrote {out / 'depth.json'}" + (f" and {plot}" if plot else ""), *([] if plot else [common.NO_PLOTS])]
    return result, lines


def plot_depth(result: dict, depths: list[int], connections: list[str], path) -> object:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(depths), figsize=(4 * len(depths), 4), squeeze=False, sharey=True)
    for ax, layers in zip(axes[0], depths):
        for connection in connections:
            values = result["stacks"][f"{layers}-{connection}"]["through_depth"]
            ax.plot(range(1, layers + 1), values, "o-", label=connection)
        ax.set_yscale("log")
        ax.set_xticks(range(1, layers + 1))
        ax.set_xlabel("layer (1 = bottom)")
        ax.set_title(f"{layers} layers")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("‖∂J/∂h_layer‖ / ‖∂J/∂h_top‖ (same time step)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Gradient through depth: {result['cell']} stacks"
                 + (" at initialisation" if not result["steps"] else f" after {result['steps']} steps"))
    return common.save_figure(fig, path)
