"""Sampling: a generator of token ids over an explicit recurrent state and random generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator

import torch

from neurallm.errors import NlmError

CANDIDATES = 1024  # top-p alone looks at this many best tokens first; the full sort only if they fall short


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
    ``distribution``'s rule (temperature, top-k, then top-p), all rows at once. A row takes one
    uniform number from its own generator and inverts its cumulative distribution.

    A row with a cut looks only at its best ``top_k`` tokens (or, for top-p alone, its best
    ``CANDIDATES``), found with one ``topk`` for all rows, instead of sorting the vocabulary.
    Where that window cannot decide exactly (a nucleus wider than the window, or equal values at
    its edge) the row takes ``distribution``'s full sort. Which way a row goes depends on that row
    alone, so its token does not depend on the other rows."""
    logits = logits.float().cpu()  # (n, V): the draws and their bookkeeping live on the CPU
    hot = [i for i, s in enumerate(settings) if s.temperature > 0]
    if len(hot) < len(settings):
        out = logits.argmax(-1)
    else:
        out = torch.empty(len(settings), dtype=torch.long)
    if not hot:
        return out
    u = torch.tensor([float(torch.rand((), generator=rngs[i], dtype=torch.float64)) for i in hot])
    rows = logits if len(hot) == len(settings) else logits[hot]  # (no copy when every row samples)
    hs = [settings[i] for i in hot]
    # float32: a temperature below 1e-30 acts as 1e-30 (already greedy for any real gap between logits).
    # The best token is put at 0 before dividing, as distribution() does, so the rounding stays that of
    # the gaps, not of the logits / t; at temperature 1 softmax subtracts the max itself.
    if any(s.temperature != 1 for s in hs):
        t = rows.new_tensor([max(s.temperature, 1e-30) for s in hs]).unsqueeze(1)
        x = (rows - rows.max(-1, keepdim=True).values) / t
    else:
        x = rows
    vocab = x.size(-1)
    windows = [(s.top_k if 0 < s.top_k < vocab else CANDIDATES if s.top_p < 1 else 0) for s in hs]
    drawn = torch.empty(len(hot), dtype=torch.long)
    plain = [r for r, w in enumerate(windows) if not w]
    exact = []
    cut = [r for r, w in enumerate(windows) if w]
    if cut:
        x = x - x.max(-1, keepdim=True).values  # (at temperature 1 not yet done) the best token at 0
        exact = _draw_in_windows(x[cut], [windows[r] for r in cut], [hs[r] for r in cut], u[cut], drawn, cut)
    if len(plain) == len(hs):  # (the common case of one plain row: no gathers)
        drawn = _invert(torch.softmax(x, -1).cumsum(-1), u)
    elif plain:
        drawn[plain] = _invert(torch.softmax(x[plain], -1).cumsum(-1), u[plain])
    for r in exact:  # the full sort, in float64
        cdf = distribution(logits[hot[r]], hs[r]).cumsum(-1)
        drawn[r] = _invert(cdf.unsqueeze(0), u[r:r + 1])[0]
    out[hot] = drawn.to(out.device)
    return out


def _draw_in_windows(x, windows, settings, u, drawn, rows) -> list[int]:
    """Draw for rows whose cut fits in their window of best tokens; -> the rows it could not decide."""
    vocab = x.size(-1)
    width = min(vocab, max(windows) + 1)  # one past the widest window: its edge must not be a tie
    vals, ids = x.topk(width, -1)  # (m, width), descending
    pos = torch.arange(width).unsqueeze(0)
    w = torch.tensor(windows).unsqueeze(1)
    in_window = pos < w
    top_k = torch.tensor([0 < s.top_k < vocab for s in settings]).unsqueeze(1)
    # Probabilities: over the window for top-k (the rest is cut), over the whole vocabulary otherwise.
    norm = vals.masked_fill(~in_window, float("-inf")).logsumexp(-1)
    whole = ~top_k.squeeze(1)
    if whole.any():
        norm[whole] = x[whole].logsumexp(-1)
    probs = (vals - norm.unsqueeze(1)).exp().masked_fill(~in_window, 0.0)
    top_p = torch.tensor([s.top_p for s in settings]).unsqueeze(1)
    before = probs.cumsum(-1) - probs
    keep = in_window & (before < top_p)  # the nucleus (all of the window when top_p is 1)
    kept = keep.sum(-1)
    edge = vals.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)
    after = vals.gather(1, kept.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
    tied = (kept < width) & (edge == after)
    short = whole & (kept == w.squeeze(1)) & (w.squeeze(1) < vocab)  # the nucleus may go on past the window
    undecided = tied | short
    cdf = (probs * keep).cumsum(-1)
    choice = ids.gather(1, _invert(cdf, u).unsqueeze(1)).squeeze(1)
    rows = torch.tensor(rows)
    drawn[rows[~undecided]] = choice[~undecided]
    return rows[undecided].tolist()


def _invert(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row: the first position whose cumulative mass exceeds u times the row's total. A u that
    rounds to 1 in float32 lands on the last position with mass, never past it (a cut-off token)."""
    total = cdf[:, -1:]
    found = torch.searchsorted(cdf, u.to(cdf.dtype).unsqueeze(1) * total, right=True).squeeze(1)
    past = found >= cdf.size(-1)  # only where u * total rounded up to the total itself
    if past.any():
        found[past] = (cdf[past] < total[past]).sum(-1)
    return found


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
    start = Context(engine.runner.init_state(1) if state is None else state, prompt_ids[0], 1)
    stream = engine.submit(engine.prefill(prompt_ids[1:], start), max_tokens, sampling)
    stream.rng = rng
    for event in engine.run(stream):
        yield event.token
