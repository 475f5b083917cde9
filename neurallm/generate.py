"""Sampling: a generator of token ids over an explicit recurrent state and random generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from neurallm.errors import NlmError


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
    if sampling.temperature == 0:
        return int(logprobs.argmax())
    return int(torch.multinomial(distribution(logprobs, sampling), 1, generator=rng))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_tokens: int, sampling: Sampling, rng: torch.Generator,
             state: torch.Tensor | None = None) -> Iterator[int]:
    """Read the prompt in one forward pass, then yield ``max_tokens`` sampled ids, one step each.

    ``state`` is the recurrent state before the prompt (None: zeros); the caller puts the
    tokenizer's boundary id first when the prompt starts a new text.
    """
    model.eval()
    device = next(model.parameters()).device
    if not prompt_ids:
        raise NlmError("generation needs at least one token to start from")
    features, state = model(torch.tensor([prompt_ids], device=device), state)
    for i in range(max_tokens):
        token = sample(model.log_probs(features[0, -1]).cpu(), rng, sampling)
        yield token
        if i + 1 < max_tokens:
            features, state = model(torch.tensor([[token]], device=device), state)
