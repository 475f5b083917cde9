"""Perplexity, bits per character and per-token log-probabilities of a language model."""

from __future__ import annotations

import math
import sys
import time

import torch

from neurallm.data.batching import columns, num_windows, window
from neurallm.errors import NlmError
from neurallm.runner import as_runner


def token_nll(model, ids: torch.Tensor, batch_size: int = 1, bptt: int = 70) -> torch.Tensor:
    """Negative log-likelihood (nats) of each token of a stream, predicted from all before it.

    The stream starts with the tokenizer's boundary token (prepended by the caller), so
    with batch 1 every real token is scored, each from its whole history: the exact
    sequential score. ``batch_size`` > 1 cuts the stream into rows read in parallel,
    which is faster but leaves each row's first token and the short tail unscored
    (as pytorch/examples does); training's validation uses it. Returns (batch, tokens_per_row).
    """
    return rows_nll(model, columns(ids, batch_size), bptt)


@torch.no_grad()
def rows_nll(model, data: torch.Tensor, bptt: int = 70) -> torch.Tensor:
    """(rows, length) token ids, each row its own stream -> NLL of tokens 1.. of each row (rows, length - 1)."""
    runner = as_runner(model)
    # One preallocated result: keeping many small per-window tensors alive between the
    # large logits buffers fragments glibc's heap (RSS grew by a logits size per window).
    out = torch.empty(data.size(0), data.size(1) - 1)
    state = runner.init_state(data.size(0))
    for i in range(num_windows(data, bptt)):
        x, y = window(data, i, bptt)
        nll, state = runner.nll(x, y, state)
        out[:, i * bptt:i * bptt + y.size(1)] = nll.cpu()
    return out


def heldout_ids(recipe, tokenizer, tokens: int, file: str | None = None) -> list[int]:
    """The first ``tokens`` tokens of the model's validation split (or of ``file``): the text
    exports and quantized models are checked on."""
    from neurallm.data import corpora

    source = file or f"{recipe.data.corpus}/valid"
    text = corpora.text_of(recipe.data, "valid", file)
    ids = tokenizer.encode(text[: tokens * 40], source=source) if tokenizer.kind != "char" else \
        tokenizer.encode("".join(c for c in text[: tokens * 2] if c in tokenizer.index), source=source)
    if len(ids) < 2:
        raise NlmError(f"{source}: too little text to check a model on (needs 2 tokens)")
    return ids[:tokens]


def with_boundary(tokenizer, ids: list[int]) -> torch.Tensor:
    return torch.tensor([tokenizer.boundary] + list(ids), dtype=torch.long)


UNKNOWN = ("error", "skip")


def encode(tokenizer, text: str, source: str = "text", unknown: str = "error") -> tuple[list[int], dict]:
    """Token ids of a text to score, and what the vocabulary could not hold.

    A character model meets characters outside its vocabulary: an error naming the first
    (``unknown="error"``), or left out of the scored stream and counted (``"skip"``, reported
    as ``skipped``). A word model maps unknown words to ``<unk>`` and reports how many
    (``unknown`` and ``unknown_rate``, as papers do); BPE covers every byte.
    """
    if unknown not in UNKNOWN:
        raise NlmError(f"--unknown {unknown}: expected one of {', '.join(UNKNOWN)}")
    if tokenizer.kind != "char":
        if unknown == "skip":
            raise NlmError(f"--unknown skip applies to character models; this {tokenizer.kind} model "
                           f"{'maps unknown words to <unk>' if tokenizer.kind == 'word' else 'covers every byte'}")
        ids = tokenizer.encode(text, source=source)
        if tokenizer.kind != "word":
            return ids, {}
        unknown_count = sum(1 for i in ids if i == tokenizer.unk)
        return ids, {"unknown": unknown_count, "unknown_rate": unknown_count / max(len(ids), 1)}
    if unknown == "skip":
        kept = "".join(c for c in text if c in tokenizer.index)
        if not kept:
            raise NlmError(f"{source}: nothing to score (all {len(text)} characters are outside the vocabulary)")
        return tokenizer.encode(kept, source=source), {"skipped": len(text) - len(kept)}
    try:
        return tokenizer.encode(text, source=source), {"skipped": 0}
    except NlmError as e:
        raise NlmError(f"{e} (--unknown skip leaves such characters out of the score)") from None


def evaluate(model, tokenizer, ids: list[int], batch_size: int = 1, bptt: int = 70) -> dict:
    if not ids:
        raise NlmError("no tokens to evaluate")
    start = time.perf_counter()
    nll = token_nll(model, with_boundary(tokenizer, ids), batch_size, bptt)
    seconds = time.perf_counter() - start
    mean = nll.double().mean().item()
    result = {"nll": mean, "perplexity": math.exp(min(mean, 700)), "tokens": nll.numel(),
              "seconds": seconds, "tokens_per_s": nll.numel() / max(seconds, 1e-9)}
    if tokenizer.symbol_level:
        result["bpc"] = mean / math.log(2)
    return result


def score(model, tokenizer, text: str, bptt: int = 70, source: str = "text", unknown: str = "error") -> dict:
    """Log-probability of each token of ``text`` (natural log), and the total."""
    ids, counts = encode(tokenizer, text, source, unknown)
    if not ids:
        raise NlmError(f"{source}: no tokens to score")
    logprobs = (-token_nll(model, with_boundary(tokenizer, ids), 1, bptt)[0]).tolist()
    tokens = [{"token": tokenizer.token(i), "logprob": lp} for i, lp in zip(ids, logprobs)]
    total = sum(logprobs)
    return {"tokens": tokens, "total_logprob": total, "mean_logprob": total / len(tokens), "count": len(tokens),
            **counts}


DYNAMIC_METHODS = ("sgd", "rms")


def dynamic_evaluate(model, tokenizer, ids: list[int], lr: float, decay: float = 0.0, bptt: int = 20,
                     method: str = "sgd", progress: bool = False) -> dict:
    """Dynamic evaluation (Krause et al. 2018): the stream is read once, in segments of ``bptt``
    tokens, each scored first and then learned from with one gradient step,
        θ ← θ − lr · u + decay · (θ₀ − θ)
    with u the segment's gradient ("sgd") or the gradient over the root of its running mean square
    ("rms": as RMSprop, β = 0.99, bias-corrected; Krause et al. scale by mean squares taken on the
    training data instead), and a pull back to the trained weights θ₀. The model adapts to the
    text it reads (a name, a topic seen once is likelier again); every token is still scored
    before the model has learned from it. The model's weights change; dropout stays off."""
    if not ids:
        raise NlmError("no tokens to evaluate")
    if lr <= 0 or not 0 <= decay < 1 or method not in DYNAMIC_METHODS:
        raise NlmError(f"--dynamic.lr {lr} / --dynamic.decay {decay} / --dynamic.method {method}: expected lr > 0, "
                       f"0 <= decay < 1 and a method of {', '.join(DYNAMIC_METHODS)}")
    if type(model.decoder) not in (torch.nn.Linear, torch.nn.AdaptiveLogSoftmaxWithLoss):
        raise NlmError("--dynamic adapts a float model's weights: give the float checkpoint, not a quantized one")
    params = list(model.parameters())
    trained = [p.detach().clone() for p in params]
    squares = [torch.zeros_like(p) for p in params] if method == "rms" else None
    data = with_boundary(tokenizer, ids).unsqueeze(0).to(next(model.parameters()).device)
    model.eval()
    state = model.init_state(1)
    total, count = 0.0, 0
    windows = num_windows(data, bptt)
    bar = _bar(windows, progress)
    start = time.perf_counter()
    for i in range(windows):
        x, y = window(data, i, bptt)
        with torch.enable_grad():
            features, state = model(x, state.detach())
            nll = model.loss(features, y, reduction="none")
            model.zero_grad(set_to_none=True)
            nll.mean().backward()
        total += nll.detach().double().sum().item()
        count += nll.numel()
        with torch.no_grad():
            for j, (p, p0) in enumerate(zip(params, trained)):
                if p.grad is None:
                    continue
                update = p.grad
                if squares is not None:
                    squares[j].mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
                    update = p.grad / (squares[j] / (1 - 0.99 ** (i + 1))).sqrt_().add_(1e-8)
                p.add_(update, alpha=-lr)
                if decay:
                    p.add_(p0 - p, alpha=decay)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    mean = total / count
    result = {"nll": mean, "perplexity": math.exp(min(mean, 700)), "tokens": count, "seconds": seconds,
              "tokens_per_s": count / max(seconds, 1e-9),
              "dynamic": {"method": method, "lr": lr, "decay": decay, "bptt": bptt}}
    if tokenizer.symbol_level:
        result["bpc"] = mean / math.log(2)
    return result


def _bar(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="seg", disable=not show, leave=False, file=sys.stderr)
