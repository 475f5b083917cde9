"""Quantized checkpoints: int8, int4 and bf16 weights that every verb loads like any checkpoint.

A plan gives each part of the model a precision: ``embedding``, each recurrent layer
(``stack.0``, ``stack.1``, ...; ``stack`` for all of them) and ``decoder`` (the output layer;
every matrix of an adaptive softmax). The schemes are plans:

- ``int8``: dynamic int8 for the recurrent and output matrices (per-output-channel symmetric
  weights; activations quantized per call by fbgemm's kernels);
- ``int4-weight``: weight-only int4 for the embedding and the output layer, group-wise
  (asymmetric, one scale and offset per ``group_size`` inputs), recurrent weights fp32;
- ``bf16``: every weight rounded to bf16.

A recipe (JSON) starts from a scheme and sets parts: ``{"scheme": "int8", "group_size": 64,
"layers": {"stack": "fp32", "embedding": "int4"}}``. The checkpoint stores the quantized
tensors in model.safetensors and the plan in config.json's ``quantization``; loading builds
the model, swaps in the quantized modules the plan names, then loads the tensors with the
usual shape checks.

The modules themselves (and their kernels) are in models/quantized.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from neurallm.errors import NlmError
from neurallm.models.quantized import LINEAR, QuantEmbedding, QuantLayer

PRECISIONS = ("fp32", "bf16", "int8", "int4")
SCHEMES = {
    "int8": {"embedding": "fp32", "stack": "int8", "decoder": "int8"},
    "int4-weight": {"embedding": "int4", "stack": "fp32", "decoder": "int4"},
    "bf16": {"embedding": "bf16", "stack": "bf16", "decoder": "bf16"},
}
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4-packed kernel takes
RECIPE_KEYS = {"scheme", "group_size", "layers"}


# ---- plans --------------------------------------------------------------------------------------

def plan_of(model, scheme: str | None = None, recipe: dict | None = None, source: str = "--recipe") -> dict:
    """-> {"scheme", "group_size", "parts": {part: precision}} for this model; clear errors for a
    recipe's unknown keys, parts, precisions or group sizes."""
    recipe = dict(recipe or {})
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise NlmError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} (expected {', '.join(sorted(RECIPE_KEYS))})")
    scheme = recipe.get("scheme", scheme)
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise NlmError(f"{source}: scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    group = recipe.get("group_size")
    if group is not None and (type(group) is not int or group not in GROUP_SIZES):
        raise NlmError(f"{source}: group_size {group!r} (expected one of {', '.join(map(str, GROUP_SIZES))})")
    layers = [f"stack.{i}" for i in range(model.cfg.num_layers)]
    base = SCHEMES[scheme]
    parts = {"embedding": base["embedding"], **{name: base["stack"] for name in layers}, "decoder": base["decoder"]}
    chosen = recipe.get("layers", {})
    if not isinstance(chosen, dict):
        raise NlmError(f"{source}: layers must be an object mapping parts to precisions")
    for part, precision in chosen.items():
        if precision not in PRECISIONS:
            raise NlmError(f"{source}: layers.{part} = {precision!r} (expected one of {', '.join(PRECISIONS)})")
        names = layers if part == "stack" else [part]
        if not set(names) <= set(parts):
            raise NlmError(f"{source}: layers.{part}: no such part (this model has embedding, stack, "
                           f"{', '.join(layers)}, decoder)")
        for name in names:
            parts[name] = precision
    widths = {"embedding": model.cfg.emb_size, "decoder": _decoder_inputs(model)}
    widths.update({name: min(layer.rnn.input_size, layer.rnn.hidden_size)
                   for name, layer in zip(layers, model.stack.layers)})
    # a group may pad a row up to the smallest group size, no further (the rest would be all zeros)
    most = min((_padded(widths[part], GROUP_SIZES[0]) for part, p in parts.items() if p == "int4"), default=256)
    if group is None:
        group = max(g for g in GROUP_SIZES if g <= min(64, most))  # 64 unless a row is narrower
    for part, precision in parts.items():
        if precision == "int4" and group > _padded(widths[part], GROUP_SIZES[0]):
            raise NlmError(f"{source}: group_size {group} is larger than {part}'s rows ({widths[part]} values; "
                           f"at most {_padded(widths[part], GROUP_SIZES[0])})")
    return {"scheme": scheme, "group_size": group, "parts": parts}


def _padded(width: int, group: int) -> int:
    return math.ceil(width / group) * group


def _decoder_inputs(model) -> int:
    return model.proj.out_features if model.proj is not None else model.stack.output_size


def read_recipe(path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise NlmError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise NlmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NlmError(f"{path}: expected a JSON object")
    return data


def _linears(module: nn.Module):
    """(parent, name, nn.Linear) for every Linear inside ``module`` (itself included)."""
    if isinstance(module, nn.Linear):
        yield None, None, module
        return
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                yield parent, name, child


def apply(model, plan: dict):
    """Swap the model's parts for the quantized modules its plan names, filled from its weights."""
    parts, group = plan["parts"], plan["group_size"]
    if parts["embedding"] != "fp32":
        model.embedding = QuantEmbedding(*model.embedding.weight.shape, parts["embedding"], group) \
            .fill(model.embedding.weight.detach())
    for i, layer in enumerate(model.stack.layers):
        if parts[f"stack.{i}"] != "fp32":
            model.stack.layers[i] = QuantLayer(layer, parts[f"stack.{i}"], group)
    if parts["decoder"] != "fp32":
        make = LINEAR[parts["decoder"]]
        for parent, name, linear in list(_linears(model.decoder)):
            quantized = make.of(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), group)
            if parent is None:
                model.decoder = quantized
            else:
                setattr(parent, name, quantized)
    return model.eval()


def prepare(model, record: dict, source: str) -> None:
    """Before loading a quantized checkpoint's tensors: the same swaps, so the model's state_dict
    names and shapes are what the file must hold."""
    if not isinstance(record, dict) or not isinstance(record.get("parts"), dict):
        raise NlmError(f"{source}: 'quantization' record is malformed (expected a 'parts' object)")
    plan = plan_of(model, record.get("scheme"), {"scheme": record.get("scheme"),
                                                 "group_size": record.get("group_size", 64),
                                                 "layers": record["parts"]}, source)
    apply(model, plan)


# ---- back to fp32, and onnxruntime's int8 ----------------------------------------------------------

def widened(model):
    """A plain fp32 ``RNNLM`` holding a quantized model's weights as they are (dequantized):
    what an ONNX export of it traces."""
    from neurallm.models.lm import RNNLM

    from neurallm.checkpoint import tied

    plain = RNNLM(model.cfg).eval()
    if model.cfg.tie_weights and not tied(model):  # the two parts were quantized apart: each keeps its values
        plain.decoder.weight = nn.Parameter(plain.decoder.weight.detach().clone())
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=False)  # the parts left in fp32 (names agree)
        if isinstance(model.embedding, QuantEmbedding):
            plain.embedding.weight.copy_(model.embedding.dequantized())
        for layer, mine in zip(plain.stack.layers, model.stack.layers):
            for d in range(layer.directions if isinstance(mine, QuantLayer) else 0):
                for weight, bias, q in zip(layer.weights(d)[:2], layer.weights(d)[2:], (mine.ih[d], mine.hh[d])):
                    weight.copy_(q.dequantized())
                    bias.copy_(q.bias.float())
        for name, linear in plain.decoder.named_modules():
            q = model.decoder.get_submodule(name)
            if isinstance(linear, nn.Linear) and not isinstance(q, nn.Linear):
                linear.weight.copy_(q.dequantized())
                if linear.bias is not None:
                    linear.bias.copy_(q.bias.float())
    return plain


def int8_only(plain, plan: dict):
    """A copy of an fp32 model with only the plan's int8 parts quantized: what an int8 ONNX export
    holds (its int4 and bf16 parts are fp32 there), for counting the bytes a step reads."""
    import copy

    parts = {k: (v if v == "int8" else "fp32") for k, v in plan["parts"].items()}
    return apply(copy.deepcopy(plain), {**plan, "parts": parts})


def onnx_int8(path: Path, parts: dict) -> None:
    """Rewrite an exported ONNX file with onnxruntime's dynamic int8 operators (per-channel int8
    weights; MatMulInteger, DynamicQuantizeLSTM) for the nodes of the parts planned int8."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type not in ("MatMul", "LSTM", "GRU"):
            continue
        # a node inside recurrent layer i is named ".../layers.i/..."; the projection and highway gates
        # stay fp32 (as in eager); any other matrix is the output layer's
        if "/proj" in node.name or "/highways" in node.name:
            continue
        part = next((f"stack.{i}" for i in range(len(parts)) if f"/layers.{i}/" in node.name), "decoder")
        if parts.get(part) == "int8":
            nodes.append(node.name)
    if not nodes:
        return
    quantized = path.with_name(path.stem + ".int8" + path.suffix)
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its advice to pre-process (shape inference) is for CNNs
    try:
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_quantize=nodes, op_types_to_quantize=["MatMul", "LSTM", "GRU"])
    finally:
        root.level = level
    quantized.replace(path)


# ---- the verb -----------------------------------------------------------------------------------

BUDGETS = {"int8": 0.02, "int4-weight": 0.05, "bf16": 0.005}  # largest relative perplexity increase by default


def quantize_checkpoint(source, scheme: str | None, out, recipe_file: str | None = None,
                        max_increase: float | None = None, tokens: int = 20000, verify_file: str | None = None,
                        progress=print) -> dict:
    """Quantize ``source`` into the checkpoint directory ``out``; -> the quantization record.

    The result is written to a temporary directory, loaded back as every verb loads it, and
    scored on the first ``tokens`` held-out tokens beside the fp32 model; over the budget
    (``max_increase``, relative) it is refused and nothing is written."""
    import copy
    import shutil

    from safetensors.torch import save_file

    from neurallm import checkpoint
    from neurallm.data.corpora import sha256
    from neurallm.evaluate import heldout_ids, rows_nll
    from neurallm.runner import weights_hash

    directory, config = checkpoint.describe(source)
    if "export" in config or "quantization" in config:
        raise NlmError(f"{directory}: is {'an export' if 'export' in config else 'quantized already'}; "
                       f"quantize the fp32 checkpoint it came from")
    model, recipe, tokenizer = checkpoint.load(directory)
    plan = plan_of(model, scheme, read_recipe(recipe_file) if recipe_file else None, recipe_file or "--scheme")
    limit = BUDGETS[plan["scheme"]] if max_increase is None else max_increase
    out = Path(out)
    checkpoint.check_out(out, directory, "quantization")
    stream = torch.tensor([tokenizer.boundary] + heldout_ids(recipe, tokenizer, tokens, verify_file))
    before = math.exp(rows_nll(model, stream.unsqueeze(0)).double().mean().item())
    quantized = apply(copy.deepcopy(model), plan)
    with checkpoint.staged(out) as tmp:
        checkpoint.atomic_write(tmp / "model.safetensors",
                                lambda p: save_file(checkpoint.tensors_of(quantized), str(p)))
        weights = tmp / "model.safetensors"
        record = {**plan, "source_hash": weights_hash(model),
                  "weights": {"bytes": weights.stat().st_size, "sha256": sha256(weights)}}
        checkpoint.write_json(tmp / "config.json", {**config, "quantization": record})
        shutil.copy2(directory / "tokenizer.json", tmp / "tokenizer.json")
        loaded = checkpoint.load(tmp)[0]  # what every verb will load
        after = math.exp(rows_nll(loaded, stream.unsqueeze(0)).double().mean().item())
        size = (tmp / "model.safetensors").stat().st_size
        record["validation"] = {"text": verify_file or f"{recipe.data.corpus}/valid", "tokens": len(stream) - 1,
                                "perplexity_fp32": before, "perplexity": after, "increase": after / before - 1,
                                "budget": limit if math.isfinite(limit) else None, "bytes": size,
                                "bytes_fp32": (directory / "model.safetensors").stat().st_size}
        progress(f"{plan['scheme']}: {size / 1e6:.2f} MB (fp32 {record['validation']['bytes_fp32'] / 1e6:.2f} MB); "
                 f"perplexity {after:.4f} vs fp32 {before:.4f} on {len(stream) - 1} held-out tokens "
                 f"({100 * (after / before - 1):+.3f}%)")
        if not after / before - 1 <= limit:
            raise NlmError(f"quantization refused: perplexity rises {100 * (after / before - 1):.3f}%, over the "
                           f"budget of {100 * limit:g}% (--max-increase); nothing was written")
        checkpoint.write_json(tmp / "config.json", {**config, "quantization": record})
    return record
