"""Speed reports: ``nlm generate --bench`` (one model) and ``nlm bench`` (its variants side by side)."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from neurallm.errors import NlmError
from neurallm.generate import Sampling
from neurallm.runtime import peak_rss_mb


@functools.lru_cache(maxsize=1)
def memory_bandwidth() -> float:
    """The machine's memory read bandwidth in GB/s, as this process's threads see it: the best of
    five sums over a 256 MB buffer (far larger than any cache), after one untimed pass."""
    buffer = torch.ones(64 * 1024 * 1024)  # 256 MB of float32
    buffer.sum()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best / 1e9


def bench_generate(checkpoint, prompt: str, max_tokens: int, sampling: Sampling, batch: int = 1, seed: int = 0,
                   device: str = "cpu") -> dict:
    """Decode ``batch`` streams of ``max_tokens`` from one prompt (seeds seed, seed + 1, ...).

    first_token_ms: from the start of the prompt's prefill to the first step's tokens.
    tokens_per_s: all streams' tokens after that first step, over the time they took.
    bandwidth_gb_s: bytes of weights one step reads (runner.step_bytes) x steps per second.
    """
    from neurallm.inference import Loaded

    lm = Loaded.open(checkpoint, device=device, slots=batch)
    ids = lm.encode(prompt, "--prompt")
    started = time.perf_counter()
    context = lm.engine.prefill(ids, lm.start())
    for i in range(batch):
        lm.engine.submit(context, max_tokens, sampling, seed=seed + i)
    produced = len(lm.engine.step())
    first = time.perf_counter()
    while lm.engine.streams:
        produced += len(lm.engine.step())
    end = time.perf_counter()
    rate = (produced - batch) / (end - first) if max_tokens > 1 else float("nan")
    step_bytes = lm.model.step_bytes(batch)
    return {"model": lm.name, "kind": lm.model.kind, "batch": batch, "prompt_tokens": len(ids) + 1,
            "max_tokens": max_tokens, "temperature": sampling.temperature, "top_k": sampling.top_k,
            "top_p": sampling.top_p, "first_token_ms": 1000 * (first - started), "tokens_per_s": rate,
            "tokens_per_s_per_stream": rate / batch, "tokens": produced, "seconds": end - started,
            "peak_rss_mb": peak_rss_mb(), "weight_bytes_per_step": step_bytes,
            "bandwidth_gb_s": step_bytes * rate / batch / 1e9, "memory_bandwidth_gb_s": memory_bandwidth()}


# ---- nlm bench: variants side by side ------------------------------------------------------------

VARIANTS = ("eager", "onnx", "torchscript", "pt2", "int8", "int4-weight", "bf16", "int8-onnx")


def _make(variant: str, source, work: Path, progress, made: dict | None = None) -> Path:
    """The variant's checkpoint directory under ``work`` (made now; quantized ones with no budget;
    int8-onnx from the int8 variant made in this run, else a new one)."""
    from neurallm.export import export
    from neurallm.quantize import quantize_checkpoint
    from neurallm.store import resolve

    if variant == "eager":
        return resolve(source)
    target = work / variant
    quiet = lambda _: None  # noqa: E731
    if variant in ("onnx", "torchscript", "pt2"):
        export(source, variant, target, progress=quiet)
    elif variant == "int8-onnx":
        int8 = (made or {}).get("int8") or _make("int8", source, work, progress)
        export(int8, "onnx", target, max_ppl_rel_diff=math.inf, progress=quiet)
    else:
        quantize_checkpoint(source, variant, target, max_increase=math.inf, progress=quiet)
    return target


def weight_bytes(directory: Path) -> int:
    """Bytes on disk of a checkpoint's weight files, whatever its kind."""
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".safetensors", ".onnx", ".pt", ".pt2"))


def _generate_bench(directory: Path, batch: int, tokens: int) -> dict:
    """``nlm generate --bench`` in a fresh process, so each variant's peak memory is its own."""
    command = [sys.executable, "-m", "neurallm", "generate", str(directory), "--bench", "--json",
               "--batch", str(batch), "--max-tokens", str(tokens), "--prompt", ""]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise NlmError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_variants(source, variants: list[str], tokens: int = 200, eval_tokens: int = 5000,
                   work: str | None = None, progress=print) -> dict:
    """Make each variant, then per variant: tokens/s at batch 1 and 32, first-token time and peak
    memory (fresh processes), perplexity on the first ``eval_tokens`` held-out tokens, size."""
    from neurallm import checkpoint
    from neurallm.evaluate import heldout_ids, rows_nll

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise NlmError(f"--variants: unknown {', '.join(unknown)} (expected some of {', '.join(VARIANTS)})")
    rows, made = [], {}
    with tempfile.TemporaryDirectory(prefix="nlm-bench-") as scratch:
        base = Path(work or scratch)
        base.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            progress(f"{variant}: preparing")
            directory = made[variant] = _make(variant, source, base, progress, made)
            runner, recipe, tokenizer = checkpoint.open_runner(directory)
            ids = heldout_ids(recipe, tokenizer, eval_tokens)
            nll = rows_nll(runner, torch.tensor([tokenizer.boundary] + ids).unsqueeze(0)).double().mean().item()
            one, many = _generate_bench(directory, 1, tokens), _generate_bench(directory, 32, max(tokens // 4, 2))
            rows.append({"variant": variant, "kind": runner.kind, "tokens_per_s_batch1": one["tokens_per_s"],
                         "tokens_per_s_batch32": many["tokens_per_s"], "first_token_ms": one["first_token_ms"],
                         "perplexity": math.exp(nll), "bpc": nll / math.log(2) if tokenizer.symbol_level else None,
                         "bytes": weight_bytes(directory), "peak_rss_mb": one["peak_rss_mb"],
                         "bandwidth_gb_s": one["bandwidth_gb_s"]})
            progress(f"{variant}: {one['tokens_per_s']:.0f} tokens/s at batch 1")
    return {"checkpoint": str(source), "eval_tokens": eval_tokens, "tokens": tokens,
            "memory_bandwidth_gb_s": memory_bandwidth(), "variants": rows}


def table(result: dict) -> list[str]:
    head = f"{'variant':12} {'tok/s b1':>9} {'tok/s b32':>10} {'1st ms':>7} {'ppl':>9} {'MB':>7} {'peak MB':>8} {'GB/s':>6}"
    lines = [head]
    for r in result["variants"]:
        lines.append(f"{r['variant']:12} {r['tokens_per_s_batch1']:9.0f} {r['tokens_per_s_batch32']:10.0f} "
                     f"{r['first_token_ms']:7.1f} {r['perplexity']:9.3f} {r['bytes'] / 1e6:7.1f} "
                     f"{r['peak_rss_mb']:8.0f} {r['bandwidth_gb_s']:6.2f}")
    lines.append(f"perplexity over the first {result['eval_tokens']} held-out tokens; GB/s: weights read per "
                 f"token x tokens/s at batch 1, against {result['memory_bandwidth_gb_s']:.1f} GB/s measured memory "
                 f"bandwidth")
    return lines
