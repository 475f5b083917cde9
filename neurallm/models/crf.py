"""A linear-chain conditional random field, the output layer of a BiLSTM-CRF tagger
(Lample et al. 2016, "Neural Architectures for Named Entity Recognition").

The encoder gives emission scores ``emissions[b, t, k]`` (score of tag k at step t); the CRF
adds a score for each tag bigram, so a path y_0..y_{n-1} of a row of length n scores

    start[y_0] + sum_t emissions[t, y_t] + sum_{t>0} transitions[y_{t-1}, y_t] + end[y_{n-1}]

and p(y | x) = exp(score(y)) / Z with log Z from the forward algorithm. Viterbi finds the best
path. Everything runs in log space, vectorised over the batch, looping over time only.

Shapes: emissions (B, T, K) float; tags (B, T) long; mask (B, T) bool, a prefix mask (each
row's valid steps come first, every row has at least one). Padded steps are ignored: their
emissions and tags may hold anything (tags are only read where the mask is true).

Hard constraints (e.g. BIOES forbids O -> I-PER) enter as a fixed penalty ``ILLEGAL`` added to
the illegal start / transition / end scores. A finite penalty rather than -inf keeps the
logsumexp and its gradient free of NaN even if some row had no legal path; with emission
scores far below 1e4 in size, illegal paths carry probability exp(-1e4) = 0 and are never
decoded. The penalty is a buffer: it follows ``.to()`` and is saved in the state dict, but is
never trained.
"""

from __future__ import annotations

import torch
from torch import nn

ILLEGAL = -1e4  # added to an illegal move's score


class CRF(nn.Module):
    """Linear-chain CRF over ``num_tags`` tags.

    ``transitions[i, j]`` scores tag i followed by tag j; ``start[j]`` / ``end[i]`` score a path
    beginning with j / ending with i. The optional boolean masks ``transitions_allowed`` (K, K),
    ``start_allowed`` (K,), ``end_allowed`` (K,) mark the legal moves (see ``constraints``);
    None allows everything. Calling the module returns ``nll``.
    """

    def __init__(self, num_tags: int, transitions_allowed: torch.Tensor | None = None,
                 start_allowed: torch.Tensor | None = None, end_allowed: torch.Tensor | None = None):
        super().__init__()
        k = num_tags
        self.num_tags = k
        # Zeros: the model starts with no preference and lets the emissions lead.
        self.transitions = nn.Parameter(torch.zeros(k, k))
        self.start = nn.Parameter(torch.zeros(k))
        self.end = nn.Parameter(torch.zeros(k))
        for name, allowed, shape in (("transitions", transitions_allowed, (k, k)),
                                     ("start", start_allowed, (k,)), ("end", end_allowed, (k,))):
            if allowed is None:
                allowed = torch.ones(shape, dtype=torch.bool)
            allowed = torch.as_tensor(allowed, dtype=torch.bool)
            if allowed.shape != shape:
                raise ValueError(f"{name}_allowed has shape {tuple(allowed.shape)}, expected {shape}")
            penalty = torch.zeros(shape).masked_fill(~allowed, ILLEGAL)
            self.register_buffer(f"{name}_penalty", penalty)

    def _scores(self):
        """(start (K,), transitions (K, K), end (K,)) with the illegal moves penalised."""
        return (self.start + self.start_penalty, self.transitions + self.transitions_penalty,
                self.end + self.end_penalty)

    @staticmethod
    def _mask(emissions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        return mask.bool()

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log Z per row (B,): the forward algorithm, logsumexp over all K^n paths."""
        mask = self._mask(emissions, mask)
        start, trans, end = self._scores()
        alpha = start + emissions[:, 0]  # (B, K): log-sum of the paths ending in each tag
        for t in range(1, emissions.shape[1]):
            # (B, K, 1) + (K, K) + (B, 1, K) -> (B, K, K), summed out over the previous tag.
            step = torch.logsumexp(alpha.unsqueeze(2) + trans + emissions[:, t].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, t, None], step, alpha)  # padded steps carry alpha over
        return torch.logsumexp(alpha + end, dim=1)  # (B,)

    def score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The score of the path ``tags`` per row (B,), penalties for illegal moves included."""
        mask = self._mask(emissions, mask)
        start, trans, end = self._scores()
        tags = tags.masked_fill(~mask, 0)  # padded tags may be anything (e.g. -100); make them indexable
        emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # (B, T)
        step = trans[tags[:, :-1], tags[:, 1:]]  # (B, T-1): the move into step t
        last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)  # (B,): each row's last tag
        return (start[tags[:, 0]] + emit.masked_fill(~mask, 0).sum(1)
                + step.masked_fill(~mask[:, 1:], 0).sum(1) + end[last])

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(tags | emissions) per row (B,); take ``.mean()`` or ``.sum()`` for the loss."""
        return self.log_partition(emissions, mask) - self.score(emissions, tags, mask)

    forward = nll

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The Viterbi (highest-scoring) path per row, (B, T) long; padded positions hold 0."""
        mask = self._mask(emissions, mask)
        start, trans, end = self._scores()
        b, t_len, k = emissions.shape
        # A padded step points each tag back to itself, so backtracking from the final step walks
        # through the padding unchanged and reaches each row's own last position with its best tag.
        identity = torch.arange(k, device=emissions.device).expand(b, k)  # (B, K)
        pointers = [identity]  # pointers[t][b, j]: best previous tag given tag j at step t
        delta = start + emissions[:, 0]  # (B, K): best score of a path ending in each tag
        for t in range(1, t_len):
            best, arg = (delta.unsqueeze(2) + trans).max(dim=1)  # (B, K, K) -> (B, K) over the previous tag
            step = mask[:, t, None]
            delta = torch.where(step, best + emissions[:, t], delta)
            pointers.append(torch.where(step, arg, identity))
        pointers = torch.stack(pointers, dim=1)  # (B, T, K)

        path = torch.empty(b, t_len, dtype=torch.long, device=emissions.device)
        path[:, -1] = (delta + end).argmax(dim=1)
        for t in range(t_len - 1, 0, -1):
            path[:, t - 1] = pointers[:, t].gather(1, path[:, t, None]).squeeze(1)
        return path.masked_fill(~mask, 0)


def constraints(labels: list[str], scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The legal moves between ``labels`` under a tagging scheme, as boolean masks
    (transitions_allowed (K, K), start_allowed (K,), end_allowed (K,)) for ``CRF``.

    Labels are "O" or "<prefix>-<type>", e.g. "B-PER". Schemes:
      "bio" (IOB2): I-X only after B-X or I-X, and never first.
      "bioes": after B-X or I-X only I-X or E-X; after E-X, S-X or O only B-*, S-* or O;
               a path starts in B, S or O and ends in E, S or O.
      "none": everything allowed (e.g. POS tags).
    """
    scheme = scheme.lower()
    prefixes = {"bio": "BIO", "bioes": "BIOES"}
    k = len(labels)
    if scheme == "none":
        return torch.ones(k, k, dtype=torch.bool), torch.ones(k, dtype=torch.bool), torch.ones(k, dtype=torch.bool)
    if scheme not in prefixes:
        raise ValueError(f"unknown tagging scheme {scheme!r}; expected 'bio', 'bioes' or 'none'")
    parsed = []  # (prefix, type) per label; O has no type
    for label in labels:
        prefix, _, kind = label.partition("-")
        if label == "O":
            parsed.append(("O", None))
        elif prefix in prefixes[scheme] and prefix != "O" and kind:
            parsed.append((prefix, kind))
        else:
            raise ValueError(f"label {label!r} does not fit the {scheme!r} scheme")

    def move(a, b) -> bool:  # may label a be followed by label b?
        (pa, ta), (pb, tb) = a, b
        if scheme == "bio":
            return pb != "I" or (pa in "BI" and ta == tb)
        if pa in "BI":  # inside an entity: continue or close it, same type
            return pb in "IE" and ta == tb
        return pb in "BSO"  # outside: open a new entity or stay out

    trans = torch.tensor([[move(a, b) for b in parsed] for a in parsed], dtype=torch.bool).reshape(k, k)
    start = torch.tensor([p != "I" if scheme == "bio" else p in "BSO" for p, _ in parsed], dtype=torch.bool)
    end = torch.tensor([True if scheme == "bio" else p in "ESO" for p, _ in parsed], dtype=torch.bool)
    return trans, start, end
