"""Speed reports: what ``nlm generate --bench`` measures."""

from __future__ import annotations

import time

from neurallm.generate import Sampling
from neurallm.runtime import peak_rss_mb


def bench_generate(checkpoint, prompt: str, max_tokens: int, sampling: Sampling, batch: int = 1, seed: int = 0,
                   device: str = "cpu") -> dict:
    """Decode ``batch`` streams of ``max_tokens`` from one prompt (seeds seed, seed + 1, ...).

    first_token_ms: from the start of the prompt's prefill to the first step's tokens.
    tokens_per_s: all streams' tokens after that first step, over the time they took.
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
    return {"model": lm.name, "batch": batch, "prompt_tokens": len(ids) + 1, "max_tokens": max_tokens,
            "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "first_token_ms": 1000 * (first - started), "tokens_per_s": rate, "tokens_per_s_per_stream": rate / batch,
            "tokens": produced, "seconds": end - started, "peak_rss_mb": peak_rss_mb()}
