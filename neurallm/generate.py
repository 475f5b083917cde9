"""Sampling: a generator of token ids over an explicit recurrent state and random generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator

import torch

from neurallm.errors import NlmError

TOP_P_CANDIDATES = 1024  # top-p looks at this many best tokens first; the full sort only if they fall short


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2020); 1: no cut

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise NlmError(f"--temperature {self.temperature}: expected a number >= 0")
        if self.top_k < 0:
            raise NlmError(f"--top-k {self.top_k}: expected an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise NlmError(f"--top-p {self.top_p}: expected a number in (0, 1]")


def distribution(logprobs: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The probabilities (V,) a draw is made from: temperature, then the top-k and top-p cuts,
    renormalised over what survives. Greedy (temperature 0) puts all mass on the argmax."""
    if sampling.temperature == 0:
        return torch.zeros_like(logprobs, dtype=torch.float64).index_fill_(0, logprobs.argmax().view(1), 1.0)
    logits = logprobs.double()  # float64: a temperature as small as 1e-300 stays nonzero
    logits = (logits - logits.max()) / sampling.temperature  # the best id stays 0, even as T -> 0
    if sampling.top_k and sampling.top_k < logits.numel():
        # Exactly k survive: among equal logits at the cut, the lower ids (a stable sort keeps their order).
        cut = logits.sort(descending=True, stable=True).indices[sampling.top_k:]
        logits = logits.index_fill(0, cut, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    return logits.softmax(-1)


def sample(logprobs: torch.Tensor, rng: torch.Generator, sampling: Sampling) -> int:
    """Draw one id from log-probabilities (V,)."""
    return int(choose(logprobs.unsqueeze(0).float(), [sampling], [rng])[0])


def choose(logits: torch.Tensor, settings: list[Sampling], rngs: list[torch.Generator]) -> torch.Tensor:
    """One id per row of ``logits`` (n, V): argmax where the temperature is 0, else a draw from
    ``generate.distribution``'s rule (temperature, top-k, then top-p), all rows at once. A row
    takes one uniform number from its own generator and inverts its cumulative distribution."""
    out = logits.argmax(-1)
    hot = [i for i, s in enumerate(settings) if s.temperature > 0]
    if not hot:
        return out
    rows = logits[hot] if len(hot) < len(settings) else logits
    hs = [settings[i] for i in hot]
    # float32: a temperature below 1e-30 acts as 1e-30 (already greedy for any real gap between logits)
    t = rows.new_tensor([max(s.temperature, 1e-30) for s in hs]).unsqueeze(1)
    x = (rows - rows.max(-1, keepdim=True).values) / t  # the best token stays at 0, even as t -> 0
    vocab = x.size(-1)
    ks = [s.top_k if 0 < s.top_k < vocab else 0 for s in hs]
    if any(ks):
        kth = x.topk(max(ks), -1).values  # (m, kmax), descending
        cut = torch.stack([kth[r, k - 1] if k else x.new_tensor(float("-inf")) for r, k in enumerate(ks)])
        keep = _first(x, cut, torch.tensor([k or vocab for k in ks]))
        x = x.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(x, -1)
    nucleus = [r for r, s in enumerate(hs) if s.top_p < 1]
    if nucleus:
        probs = _top_p(probs, nucleus, [hs[r].top_p for r in nucleus])
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=rngs[i], dtype=torch.float64) for i in hot]).to(cdf.dtype)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp_(max=vocab - 1)
    out[hot] = drawn
    return out


def _top_p(probs: torch.Tensor, rows: list[int], ps: list[float]) -> torch.Tensor:
    """Keep, in each listed row, the smallest set of most likely tokens whose mass reaches p."""
    probs = probs.clone()
    k = min(TOP_P_CANDIDATES, probs.size(-1))
    for r, p in zip(rows, ps):
        total = float(probs[r].sum())  # 1 up to rounding
        best = probs[r].topk(k).values
        mass = best.cumsum(0)
        if mass[-1] < p * total and k < probs.size(-1):  # the nucleus is wider: sort it all
            best = probs[r].sort(descending=True).values
            mass = best.cumsum(0)
        keep = int(((mass - best) < p * total).sum())  # the rule of distribution(): mass before < p
        probs[r].masked_fill_(~_first(probs[r:r + 1], best[keep - 1:keep], torch.tensor([keep]))[0], 0.0)
    return probs


def _first(x: torch.Tensor, cut: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` (m, V): the ``k`` entries above ``cut`` (the row's k-th largest value), where
    entries equal to the cut are taken in id order: exactly k survive, ties go to the lower ids."""
    above = x > cut.unsqueeze(1)
    at = x == cut.unsqueeze(1)
    room = (k - above.sum(-1)).unsqueeze(1)
    return above | (at & (at.cumsum(-1) <= room))


def generate(model, prompt_ids: list[int], max_tokens: int, sampling: Sampling, rng: torch.Generator,
             state: torch.Tensor | None = None) -> Iterator[int]:
    """Read the prompt in one forward pass, then yield ``max_tokens`` sampled ids, one step each
    (through the decoding engine, with one slot).

    ``state`` is the recurrent state before the prompt (None: zeros); the caller puts the
    tokenizer's boundary id first when the prompt starts a new text.
    """
    from neurallm.engine import Context, Engine

    if not prompt_ids:
        raise NlmError("generation needs at least one token to start from")
    engine = Engine(model, slots=1)
    start = Context(engine.model.init_state(1, engine.device) if state is None else state, prompt_ids[0], 1)
    stream = engine.submit(engine.prefill(prompt_ids[1:], start), max_tokens, sampling)
    stream.rng = rng
    for event in engine.run(stream):
        yield event.token
