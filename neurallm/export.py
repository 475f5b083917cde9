"""Export a language model to run without neurallm's model code: ONNX, TorchScript or torch.export.

For a recurrent model the state is the whole interface, so an export is three functions with
the state (layers, parts, directions, batch, hidden) as an explicit input and output:

- ``step``:    ids (B, 1) int64, state -> logits (B, V), state        one decoding step
- ``prefill``: ids (B, T) int64, state -> features (B, T, F), state   a prompt, fused kernels
- ``head``:    features (B, T, F) -> log-probabilities (B, T, V)      scoring what prefill read

(``prefill`` leaves the output layer out: reading a long prompt should not pay T x V of it;
scoring puts it back with ``head``.) Each is one file (step.onnx, prefill.onnx, head.onnx, or
.pt / .pt2), beside config.json (the recipe plus an ``export`` record: format, the files'
sha256, the verification) and tokenizer.json. Loading checks every file's sha256 first, so a
cut or altered file is named, not half-run.

Before anything is written the export is run on held-out text beside the eager model; over
its budget (fp32: logits within 1e-4, perplexity within 0.01%) it is refused.

ONNX goes through torch's TorchScript-based exporter (``dynamo=False``): it maps nn.LSTM /
GRU / RNN to ONNX's own recurrent operators and exports in well under a second, where the
dynamo exporter takes ~10 s per graph and specialises a batch of one. onnxruntime runs the
files with sequential execution, all graph optimisations, and as many intra-op threads as
torch uses for step and head but one for prefill (``_ort_threads`` says why).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from neurallm import checkpoint, quantize
from neurallm.data.corpora import sha256
from neurallm.errors import NlmError
from neurallm.runner import EagerRunner

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
FUNCTIONS = ("step", "prefill", "head")
BUDGET_FP32 = {"max_logit_diff": 1e-4, "max_ppl_rel_diff": 1e-4}


# ---- the three functions, as modules to trace ---------------------------------------------------

class Function(nn.Module):
    """One of a model's three functions, as a module to trace (``name``: step, prefill or head).
    It holds only the parts that function reads (TorchScript and torch.export save every weight
    of the traced module, used or not: a prefill file would carry the output layer too)."""

    UNUSED = {"step": (), "prefill": ("decoder",), "head": ("embedding", "stack", "proj")}

    def __init__(self, model, name: str):
        super().__init__()
        if name == "step":
            model = _step_layout(model)
        trimmed = copy.copy(model)  # a shallow copy: the same weights, its own table of parts
        trimmed._modules = {k: (nn.Identity() if k in self.UNUSED[name] and v is not None else v)
                            for k, v in model._modules.items()}
        self.model, self.name = trimmed, name

    def forward(self, *args):
        if self.name == "head":
            return self.model.log_probs(args[0])
        if self.name == "prefill":
            return self.model(*args)
        # reference=True: the written-out cell (two matmuls a layer), not a fused call per token
        features, state = self.model(*args, reference=True)
        return head_of(self.model, features[:, 0]), state


def _step_layout(model):
    """A copy whose matrices are stored transposed (same values and shapes): the step reads
    ``x @ w.T``, and with ``w.T`` contiguous TorchScript and torch.export run a matrix-vector
    kernel ~5x faster at batch 1 here than on torch's (out, in) layout. (onnxruntime picks its
    own layout; the values it is given are the same.)"""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in [*model.stack.layers, model.decoder]:
            for parameter in module.parameters(recurse=True):
                if parameter.dim() == 2:
                    parameter.data = parameter.data.t().contiguous().t()
    return model


def head_of(model, features):
    """Logits of a full softmax (a MatMul, which onnxruntime's int8 pass takes; a Gemm it leaves);
    an adaptive softmax gives log-probabilities (it has no logits)."""
    if isinstance(model.decoder, nn.AdaptiveLogSoftmaxWithLoss):
        return model.log_probs(features)
    return torch.matmul(features, model.decoder.weight.t()) + model.decoder.bias


PT2_CHUNK = 16  # torch.export unrolls the recurrent kernels over time: a pt2 prefill reads 16 tokens a call


def _examples(model, fmt: str):
    state = model.init_state(2)
    ids = torch.zeros(2, PT2_CHUNK if fmt == "pt2" else 3, dtype=torch.long)
    features = torch.zeros(2, 3, model.proj.out_features if model.proj is not None else model.stack.output_size)
    return {"step": (ids[:, :1], state), "prefill": (ids, state), "head": (features,)}


_NAMES = {"step": (["ids", "state"], ["logits", "state_out"]),
          "prefill": (["ids", "state"], ["features", "state_out"]),
          "head": (["features"], ["log_probs"])}
_DYNAMIC = {"ids": {0: "batch", 1: "time"}, "state": {3: "batch"}, "features": {0: "batch", 1: "time"},
            "logits": {0: "batch"}, "state_out": {3: "batch"}, "log_probs": {0: "batch", 1: "time"}}


def _write(fmt: str, name: str, module: nn.Module, args: tuple, path: Path) -> None:
    inputs, outputs = _NAMES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        if fmt == "onnx":
            dynamic = {k: v for k, v in _DYNAMIC.items() if k in inputs + outputs}
            if name == "step":
                dynamic["ids"] = {0: "batch"}
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, dynamo=False, opset_version=17)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, args, check_trace=False), str(path))
        else:
            batch, time_ = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=1)
            shapes = {"step": ({0: batch}, {3: batch}), "prefill": ({0: batch}, {3: batch}),
                      "head": ({0: batch, 1: time_},)}[name]
            # forward(*args): its shapes are one tuple
            program = torch.export.export(module, args, dynamic_shapes=(shapes,), strict=False)
            torch.export.save(program, str(path))


# ---- running an export --------------------------------------------------------------------------

def _ort_threads(name: str) -> int:
    """Measured on 2 cores (benchmarks/export_quant.py): a step's matrix products (a 33k-word output
    layer) run ~2x faster on both cores; a prefill's recurrent operator walks time in order, and a
    second thread only slows it (~1.5x). NLM_ORT_THREADS overrides both."""
    if os.environ.get("NLM_ORT_THREADS"):
        value = os.environ["NLM_ORT_THREADS"]
        if not value.isdigit() or int(value) < 1:
            raise NlmError(f"NLM_ORT_THREADS={value!r}: expected an integer >= 1")
        return int(value)
    return 1 if name == "prefill" else torch.get_num_threads()


def _load_function(fmt: str, name: str, path: Path):
    """-> a callable from torch tensors to a tuple of torch tensors."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise NlmError(f"{path}: running an ONNX export needs onnxruntime: pip install 'neurallm[export]'") \
                from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = _ort_threads(name)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # No spinning: between runs onnxruntime's idle threads would spin on the cores that torch's
        # sampling needs next (measured here: top-k + top-p decoding 2.5x slower with spinning on).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise NlmError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        names = [i.name for i in session.get_inputs()]

        def call(*tensors):
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
            return tuple(torch.from_numpy(a) for a in session.run(None, feeds))
        return call
    try:
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    except Exception as e:  # a damaged archive fails in many ways, each its own type
        raise NlmError(f"{path}: cannot be loaded as {fmt} ({type(e).__name__}: {str(e)[:200]})") from None

    def call(*tensors):
        with torch.no_grad():
            out = module(*tensors)
        return out if isinstance(out, tuple) else (out,)
    return call


class ExportedRunner:
    """An export's three functions behind the runner interface (runner.py)."""

    def __init__(self, directory: Path, record: dict, recipe):
        self.kind = record["format"]
        self.device = torch.device("cpu")
        self.vocab_size = recipe.model.vocab_size
        self.model_hash = record["source_hash"] + f"+{self.kind}"
        self.record = record
        m = recipe.model
        self._state_shape = (m.num_layers, 2 if m.cell == "lstm" else 1, 1, m.hidden_size)
        self.functions = {name: _load_function(self.kind, name, directory / record["files"][name]["file"])
                          for name in FUNCTIONS}

    def init_state(self, batch: int) -> torch.Tensor:
        layers, parts, dirs, hidden = self._state_shape
        return torch.zeros(layers, parts, dirs, batch, hidden)

    def step_bytes(self, batch: int) -> int:
        return self.record["step_bytes"] + min(batch, self.vocab_size) * self.record["embedding_row_bytes"]

    def _pieces(self, ids):
        """A pt2 prefill takes exactly PT2_CHUNK tokens: whole chunks, then the rest by steps (None)."""
        if self.kind != "pt2":
            return [(ids, "prefill")]
        whole = ids.size(1) // PT2_CHUNK * PT2_CHUNK
        return [(ids[:, t:t + PT2_CHUNK], "prefill") for t in range(0, whole, PT2_CHUNK)] + \
            [(ids[:, t:t + 1], "step") for t in range(whole, ids.size(1))]

    def read(self, ids, state):
        state = state.contiguous()
        for piece, function in self._pieces(ids):
            state = self.functions[function](piece, state)[1]
        return state

    def step(self, ids, state):
        logits, state = self.functions["step"](ids, state.contiguous())
        return logits.float(), state

    def nll(self, ids, targets, state):
        state, out = state.contiguous(), []
        for piece, function in self._pieces(ids):
            if function == "prefill":
                features, state = self.functions["prefill"](piece, state)
                out.append(self.functions["head"](features)[0])
            else:
                logits, state = self.functions["step"](piece, state)
                out.append(torch.log_softmax(logits.float(), -1).unsqueeze(1))
        log_probs = torch.cat(out, 1)
        return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float(), state


def open_export(directory: Path, record: dict, recipe) -> ExportedRunner:
    """Check every file against its recorded size and sha256, then load the three functions."""
    where = directory / "config.json"
    if not isinstance(record, dict) or not isinstance(record.get("format"), str) or record["format"] not in FORMATS or \
            not isinstance(record.get("files"), dict) or set(record["files"]) != set(FUNCTIONS):
        raise NlmError(f"{where}: 'export' record is malformed "
                       f"(expected format one of {', '.join(FORMATS)} and files {', '.join(FUNCTIONS)})")
    for key, kind in (("source_hash", str), ("step_bytes", int), ("embedding_row_bytes", int)):
        if not isinstance(record.get(key), kind):
            raise NlmError(f"{where}: 'export' record lacks {key} ({kind.__name__})")
    for name, entry in record["files"].items():
        plain_name = isinstance(entry, dict) and isinstance(entry.get("file"), str) and \
            entry["file"] == Path(entry["file"]).name
        if not (plain_name and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            raise NlmError(f"{where}: export.files.{name} is malformed (expected a file name in this folder, "
                           f"its bytes and sha256)")
    for name, entry in record["files"].items():
        path = directory / entry["file"]
        if not path.is_file():
            raise NlmError(f"{path}: missing (the export's {name} function)")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise NlmError(f"{path}: does not match the sha256 in config.json (cut short or altered); "
                           f"export the model again")
    return ExportedRunner(directory, record, recipe)


# ---- verification -------------------------------------------------------------------------------

def compare(reference, candidate, ids: list[int], boundary: int, step_tokens: int = 64, bptt: int = 70) -> dict:
    """Run two runners on the same held-out tokens: the largest difference of the step function's
    logits (teacher-forced over the first ``step_tokens``, batch 1, and batch 2 on two offsets)
    and of the scoring log-probabilities, and both perplexities."""
    from neurallm.evaluate import rows_nll

    stream = torch.tensor([boundary] + ids)
    worst = 0.0
    n = min(step_tokens, len(ids))
    rows = torch.stack([stream[:n], stream[len(stream) - n:]])  # (2, n)
    for batch in (rows[:1], rows):
        s_ref, s_new = reference.init_state(batch.size(0)), candidate.init_state(batch.size(0))
        for t in range(n):
            l_ref, s_ref = reference.step(batch[:, t:t + 1], s_ref)
            l_new, s_new = candidate.step(batch[:, t:t + 1], s_new)
            worst = max(worst, (l_ref - l_new).abs().max().item())
    nll_ref = rows_nll(reference, stream.unsqueeze(0), bptt)
    nll_new = rows_nll(candidate, stream.unsqueeze(0), bptt)
    ppl_ref, ppl_new = math.exp(nll_ref.double().mean().item()), math.exp(nll_new.double().mean().item())
    worst = max(worst, (nll_ref - nll_new).abs().max().item())
    return {"tokens": int(nll_ref.numel()), "max_logit_diff": worst, "perplexity_eager": ppl_ref,
            "perplexity": ppl_new, "ppl_rel_diff": abs(ppl_new - ppl_ref) / ppl_ref}


def within(report: dict, budget: dict) -> list[str]:
    """The budget lines a verification report breaks (none: it passes)."""
    broken = []
    if budget.get("max_logit_diff") is not None and not report["max_logit_diff"] <= budget["max_logit_diff"]:
        broken.append(f"largest logit difference {report['max_logit_diff']:.3g} > {budget['max_logit_diff']:g}")
    if budget.get("max_ppl_rel_diff") is not None and not report["ppl_rel_diff"] <= budget["max_ppl_rel_diff"]:
        broken.append(f"perplexity differs by {100 * report['ppl_rel_diff']:.4f}% > "
                      f"{100 * budget['max_ppl_rel_diff']:g}%")
    return broken


# ---- the verb -----------------------------------------------------------------------------------

def export(source, fmt: str, out, verify_tokens: int = 2000, verify_file: str | None = None,
           max_ppl_rel_diff: float | None = None, progress=print) -> dict:
    """Export ``source`` (a checkpoint directory or stored name) to ``out``; -> the export record.

    The files are written into a temporary directory beside ``out``, loaded back and verified
    against the eager model; only an export within budget is moved into place (replacing ``out``
    whole). A quantized checkpoint exports to ONNX: its weights as they are (the int4 and bf16
    values exactly, in fp32), and its int8 parts through onnxruntime's dynamic int8 operators.
    Its activations are rounded differently there (int8: onnxruntime's rounding, not fbgemm's;
    int4: fp32, not bf16), so such an export is held to a perplexity budget against the quantized
    model (1% unless given), not to the fp32 logit budget."""
    from neurallm.evaluate import heldout_ids

    if fmt not in FORMATS:
        raise NlmError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch's exporter writes through it)
            import onnxruntime  # noqa: F401  (the export is verified by running it)
        except ImportError:
            raise NlmError("--format onnx needs the export extra: pip install 'neurallm[export]'") from None
    directory, config = checkpoint.describe(source)
    model, recipe, tokenizer = checkpoint.load(directory)
    plan = config.get("quantization")
    if plan and fmt != "onnx":
        raise NlmError(f"{directory}: a quantized checkpoint exports to ONNX only (--format onnx)")
    # A quantized model computes with reduced activations (int8: fbgemm's rounding, not onnxruntime's;
    # int4: bf16), so its export is held to a perplexity budget, not to fp32's logit budget.
    budget = {"max_logit_diff": None if plan else BUDGET_FP32["max_logit_diff"],
              "max_ppl_rel_diff": max_ppl_rel_diff if max_ppl_rel_diff is not None else
              (0.01 if plan else BUDGET_FP32["max_ppl_rel_diff"])}
    int8 = bool(plan) and "int8" in plan["parts"].values()
    out = Path(out)
    checkpoint.check_out(out, directory, "export")
    ids = heldout_ids(recipe, tokenizer, verify_tokens, verify_file)
    eager = EagerRunner(model)
    plain = quantize.widened(model) if plan else model
    with checkpoint.staged(out) as tmp:
        files = {}
        examples = _examples(plain, fmt)
        for name in FUNCTIONS:
            path = tmp / f"{name}{FORMATS[fmt]}"
            _write(fmt, name, Function(plain, name).eval(), examples[name], path)
            if int8:
                quantize.onnx_int8(path, plan["parts"])
            files[name] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
        held = EagerRunner(quantize.int8_only(plain, plan) if int8 else plain)  # what the files hold
        record = {"format": fmt, "files": files, "source_hash": eager.model_hash,
                  "step_bytes": held.step_bytes(0), "embedding_row_bytes": held.step_bytes(1) - held.step_bytes(0)}
        report = compare(eager, ExportedRunner(tmp, record, recipe), ids, tokenizer.boundary)
        record["verified"] = {**report, "text": verify_file or f"{recipe.data.corpus}/valid",
                              "budget": {k: v if v is None or math.isfinite(v) else None for k, v in budget.items()}}
        progress(f"verified on {report['tokens']} held-out tokens: largest logit difference "
                 f"{report['max_logit_diff']:.3g}, perplexity {report['perplexity']:.4f} vs eager "
                 f"{report['perplexity_eager']:.4f} ({100 * report['ppl_rel_diff']:.5f}%)")
        broken = within(report, budget)
        if broken:
            raise NlmError(f"export to {fmt} refused, over its budget: {'; '.join(broken)}; nothing was written")
        shutil.copy2(directory / "tokenizer.json", tmp / "tokenizer.json")
        checkpoint.write_json(tmp / "config.json", {**config, "export": record})
    return record
