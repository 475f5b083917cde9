"""Perplexity, bits per character and per-token log-probabilities of a language model."""

from __future__ import annotations

import math
import time

import torch

from neurallm.data.batching import columns, num_windows, window
from neurallm.errors import NlmError


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, batch_size: int = 1, bptt: int = 70) -> torch.Tensor:
    """Negative log-likelihood (nats) of each token of a stream, predicted from all before it.

    The stream starts with the tokenizer's boundary token (prepended by the caller), so
    with batch 1 every real token is scored, each from its whole history: the exact
    sequential score. ``batch_size`` > 1 cuts the stream into rows read in parallel,
    which is faster but leaves each row's first token and the short tail unscored
    (as pytorch/examples does); training's validation uses it. Returns (batch, tokens_per_row).
    """
    model.eval()
    device = next(model.parameters()).device
    data = columns(ids, batch_size).to(device)
    # One preallocated result: keeping many small per-window tensors alive between the
    # large logits buffers fragments glibc's heap (RSS grew by a logits size per window).
    out = torch.empty(data.size(0), data.size(1) - 1)
    state = None
    for i in range(num_windows(data, bptt)):
        x, y = window(data, i, bptt)
        features, state = model(x, state)
        out[:, i * bptt:i * bptt + y.size(1)] = model.loss(features, y, reduction="none").float().cpu()
    return out


def with_boundary(tokenizer, ids: list[int]) -> torch.Tensor:
    return torch.tensor([tokenizer.boundary] + list(ids), dtype=torch.long)


def evaluate(model, tokenizer, ids: list[int], batch_size: int = 1, bptt: int = 70) -> dict:
    start = time.perf_counter()
    nll = token_nll(model, with_boundary(tokenizer, ids), batch_size, bptt)
    seconds = time.perf_counter() - start
    mean = nll.double().mean().item()
    result = {"nll": mean, "perplexity": math.exp(min(mean, 700)), "tokens": nll.numel(),
              "seconds": seconds, "tokens_per_s": nll.numel() / max(seconds, 1e-9)}
    if tokenizer.kind == "char":
        result["bpc"] = mean / math.log(2)
    return result


def score(model, tokenizer, text: str, bptt: int = 70, source: str = "text") -> dict:
    """Log-probability of each token of ``text`` (natural log), and the total."""
    ids = tokenizer.encode(text, source=source)
    if not ids:
        raise NlmError(f"{source}: no tokens to score")
    logprobs = (-token_nll(model, with_boundary(tokenizer, ids), 1, bptt)[0]).tolist()
    tokens = [{"token": tokenizer.token(i), "logprob": lp} for i, lp in zip(ids, logprobs)]
    total = sum(logprobs)
    return {"tokens": tokens, "total_logprob": total, "mean_logprob": total / len(tokens), "count": len(tokens)}
