"""Export and quantization, side by side in one run: speed at batch 1, fidelity, size, bandwidth.

    python benchmarks/export_quant.py            # ~10 minutes on 2 cores; writes results/export_quant.json

Models (trained first if absent, as benchmarks/decode.py trains them):
- wt2-full: a 2 x 200 LSTM with a full softmax over WikiText-2's 33,278 words;
- medium: the ptb-medium recipe's size (2 x 650 LSTM, 10k words), briefly trained: its speed and
  bandwidth are what matter here, not its perplexity.

For each model, one stream at temperature 1 from the boundary token, median of ``--repeats``:
- reference: pytorch/examples word_language_model's generate loop on the same weights (decode.py);
- plain onnxruntime: this model's own ONNX export run by a loop a user would write (default
  session options, numpy softmax and a draw per step), fp32 and int8;
- nlm: the decoding engine over each variant (eager fp32, ONNX, TorchScript, pt2, int8, int4-weight,
  bf16, int8 ONNX), bandwidth achieved = weights read per step x steps/s.
Fidelity: the exports' verification (largest logit difference, perplexity apart, on 2,000 held-out
tokens) and each quantized variant's validation perplexity on the first ``--eval-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode import ensure_checkpoint, reference_decode, reference_from  # noqa: E402

MODELS = {
    "wt2-full": ("runs/decode-wt2-full", ["nlm", "train", "wikitext2-small", "--model.softmax=full", "--max-steps",
                                          "600", "--out", "runs/decode-wt2-full", "--no-progress"]),
    "medium": ("runs/bench-medium", ["nlm", "train", "ptb-medium", "--max-steps", "30", "--out", "runs/bench-medium",
                                     "--no-progress"]),
}
VARIANTS = ("eager", "onnx", "torchscript", "pt2", "int8", "int4-weight", "bf16", "int8-onnx")


def plain_onnxruntime(path: Path, tokens: int, token: int, seed: int = 0) -> float:
    """A user's loop over step.onnx: default session options, numpy sampling. -> tokens/s."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path / "step.onnx"), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[1].shape]
    state = np.zeros(shape, dtype=np.float32)
    ids = np.array([[token]], dtype=np.int64)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(tokens):
        logits, state = session.run(None, {"ids": ids, "state": state})
        p = np.exp(logits[0] - logits[0].max())
        ids[0, 0] = int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right").clip(0, len(p) - 1))
    return tokens / (time.perf_counter() - start)


def nlm_decode(directory: Path, tokens: int) -> dict:
    from neurallm.bench import memory_bandwidth
    from neurallm.engine import Engine
    from neurallm.generate import Sampling
    from neurallm.inference import Loaded

    lm = Loaded.open(directory, slots=1)
    engine = Engine(lm.model, slots=1)
    engine.submit(lm.start(), 20, Sampling(1.0), seed=1)  # warm-up
    while engine.streams:
        engine.step()
    engine.submit(lm.start(), tokens, Sampling(1.0), seed=0)
    start = time.perf_counter()
    while engine.streams:
        engine.step()
    rate = tokens / (time.perf_counter() - start)
    step_bytes = lm.model.step_bytes(1)
    return {"tokens_per_s": rate, "weight_bytes_per_step": step_bytes, "bandwidth_gb_s": step_bytes * rate / 1e9,
            "bandwidth_fraction": step_bytes * rate / 1e9 / memory_bandwidth()}


def make_variants(source: str, work: Path) -> dict:
    from neurallm.bench import _make

    made = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        made[variant] = _make(variant, source, work, print, made)
        print(f"{variant}: made in {time.perf_counter() - t0:.1f} s", flush=True)
    return made


def measure(name: str, path: str, args) -> dict:
    from neurallm import checkpoint
    from neurallm.bench import memory_bandwidth, weight_bytes
    from neurallm.evaluate import heldout_ids, rows_nll

    work = ROOT / "runs" / f"variants-{name}"
    made = make_variants(str(ROOT / path), work)
    cfg = json.loads((ROOT / path / "config.json").read_text())
    from safetensors.torch import load_file

    ref = reference_from(cfg, load_file(str(ROOT / path / "model.safetensors")))
    runner, recipe, tokenizer = checkpoint.open_runner(made["eager"])
    boundary = tokenizer.boundary
    speed = {variant: [] for variant in VARIANTS}
    speed.update({"reference": [], "plain_onnxruntime_fp32": [], "plain_onnxruntime_int8": []})
    bandwidth = {}
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every variant alike
        torch.manual_seed(0)
        _, seconds = reference_decode(ref, boundary, args.tokens)
        speed["reference"].append(args.tokens / seconds)
        speed["plain_onnxruntime_fp32"].append(plain_onnxruntime(made["onnx"], args.tokens, boundary))
        speed["plain_onnxruntime_int8"].append(plain_onnxruntime(made["int8-onnx"], args.tokens, boundary))
        for variant in VARIANTS:
            result = nlm_decode(made[variant], args.tokens)
            speed[variant].append(result["tokens_per_s"])
            bandwidth[variant] = result
    medians = {k: statistics.median(v) for k, v in speed.items()}
    for variant in VARIANTS:  # bandwidth at the median speed
        b = bandwidth[variant]
        b["bandwidth_gb_s"] = b["weight_bytes_per_step"] * medians[variant] / 1e9
        b["bandwidth_fraction"] = b["bandwidth_gb_s"] / memory_bandwidth()
        del b["tokens_per_s"]
    ids = heldout_ids(recipe, tokenizer, args.eval_tokens)
    stream = torch.tensor([boundary] + ids).unsqueeze(0)
    quality = {}
    for variant in VARIANTS:
        if variant in ("onnx", "torchscript", "pt2", "int8-onnx"):
            v = checkpoint.describe(made[variant])[1]["export"]["verified"]
            quality[variant] = {k: v[k] for k in ("tokens", "max_logit_diff", "perplexity", "perplexity_eager",
                                                  "ppl_rel_diff")}
        r = checkpoint.open_runner(made[variant])[0]
        quality.setdefault(variant, {})["perplexity_eval_tokens"] = \
            math.exp(rows_nll(r, stream).double().mean().item())
    base = quality["eager"]["perplexity_eval_tokens"]
    for variant in VARIANTS:
        quality[variant]["increase_over_fp32"] = quality[variant]["perplexity_eval_tokens"] / base - 1
    sizes = {variant: weight_bytes(made[variant]) for variant in VARIANTS}
    fastest_fp32 = max(("eager", "onnx", "torchscript", "pt2"), key=lambda v: medians[v])
    fastest_int8 = max(("int8", "int8-onnx"), key=lambda v: medians[v])
    return {
        "checkpoint": path, "model": {k: cfg["model"][k] for k in ("cell", "vocab_size", "emb_size", "hidden_size",
                                                                  "num_layers", "softmax")},
        "tokens_per_s": medians, "runs": speed, "bandwidth": bandwidth, "quality": quality, "bytes": sizes,
        "memory_bandwidth_gb_s": memory_bandwidth(),
        "targets": {
            "fastest_fp32": fastest_fp32,
            "fastest_fp32_over_plain_onnxruntime": medians[fastest_fp32] / medians["plain_onnxruntime_fp32"],
            "fastest_int8": fastest_int8,
            "fastest_int8_over_reference": medians[fastest_int8] / medians["reference"],
            "int8_over_reference": medians["int8"] / medians["reference"],
            "int8_increase": quality["int8"]["increase_over_fp32"],
            "int4_increase": quality["int4-weight"]["increase_over_fp32"],
        }}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=20000)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    from common import write

    started = time.perf_counter()
    names = args.models.split(",")
    trained = {name: ensure_checkpoint(*MODELS[name]) for name in names}
    results = {name: measure(name, MODELS[name][0], args) for name in names}
    write("export_quant", {
        "checkpoints": trained, "tokens": args.tokens, "repeats": args.repeats, "eval_tokens": args.eval_tokens,
        "benchmark_seconds": time.perf_counter() - started,
        "meaning": {
            "tokens_per_s": "one stream at temperature 1 from the boundary token, tokens/s, median of `repeats` "
                            "(variants interleaved); reference = pytorch/examples generate loop on the same weights; "
                            "plain_onnxruntime_* = a numpy loop over this model's step.onnx with default session "
                            "options; the rest = nlm's engine over each variant",
            "bandwidth": "weights read per step (runner.step_bytes: int8/int4/bf16 bytes as stored) x median "
                         "tokens/s, and its fraction of memory_bandwidth_gb_s (best of 5 sums over 256 MB)",
            "quality": "exports: their verification record (2,000 held-out tokens); every variant: perplexity on "
                       "the first `eval_tokens` validation tokens and its increase over eager fp32",
            "bytes": "weight files on disk (an export holds step, prefill and head, each with its weights)",
        },
        "models": results,
    })


if __name__ == "__main__":
    main()
