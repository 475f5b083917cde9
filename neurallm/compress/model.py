"""The predictor a compressed file is coded with: a byte-level recurrent LM whose logits are
mixed with adaptive n-gram counts, learning as it reads.

One pass over a megabyte gives a recurrent network little time to learn, and it learns
slowly at first; counts of what followed the last 1..K bytes predict well from the first
repeat on (as PPM and PAQ do). The network therefore sees the counts' log-probabilities and
learns how far to trust each order at each point (a learned, state-dependent geometric
mixture: logits = W h + b + Σ_k w_k(h, n_k) · log p_k), so it has only to learn what the
counts miss.

Everything here runs the same in the compressor and the decompressor: ``step`` reads one byte
per segment and gives the next byte's probabilities; after every ``window`` steps ``learn``
trains on the window just coded (truncated backpropagation through time from the state the
window started in) and updates the counts' mixer with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from neurallm.config import ModelConfig
from neurallm.errors import NlmError
from neurallm.models import cells
from neurallm.models.lm import RNNLM

SYMBOLS = 256
START = 10  # the byte every segment's history starts with (a newline, a byte-level LM's boundary)
ROW_LIMIT = 1024.0  # a context's counts are halved past this total, so recent bytes weigh more (PAQ's habit)


@dataclass(frozen=True)
class Settings:
    """What the compressor and decompressor must agree on; written into the file's header."""

    cell: str = "lstm"
    hidden: int = 128
    layers: int = 1
    emb: int = 32
    orders: tuple[int, ...] = (1, 2, 3, 4, 6)
    buckets: int = 1 << 16  # rows of each hashed count table (orders above 2)
    alpha: float = 0.05  # additive smoothing of the counts
    lr: float = 3e-3
    window: int = 20  # bytes per segment between updates (the truncated BPTT length)
    clip: float = 1.0
    segments: int = 64
    learn_every: int = 1  # learn from every n-th segment of a window
    seed: int = 0
    adapt: bool = True  # with a prior: keep learning as the text is read

    def __post_init__(self):
        checks = [(self.cell in ("lstm", "gru", "rnn_tanh"), "cell", "lstm, gru or rnn_tanh"),
                  (self.hidden >= 1 and self.layers >= 1 and self.emb >= 1, "hidden/layers/emb", "positive"),
                  (all(1 <= k <= 7 for k in self.orders) and len(set(self.orders)) == len(self.orders),
                   "orders", "distinct integers 1..7"),
                  (self.buckets >= 256 and self.buckets & (self.buckets - 1) == 0, "buckets", "a power of two >= 256"),
                  (self.alpha > 0 and self.lr > 0 and self.clip > 0, "alpha/lr/clip", "positive"),
                  (min(self.window, self.segments, self.learn_every) >= 1, "window/segments/learn_every", "positive")]
        for ok, key, expected in checks:
            if not ok:
                raise NlmError(f"compression setting {key}: expected {expected}")

    def to_json(self) -> dict:
        return {**asdict(self), "orders": list(self.orders)}

    @classmethod
    def from_json(cls, data: dict, source: str) -> "Settings":
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise NlmError(f"{source}: unknown compression settings {sorted(set(data) - known) if isinstance(data, dict) else data!r}")
        try:
            return cls(**{**data, "orders": tuple(data.get("orders", cls.orders))})
        except TypeError as e:
            raise NlmError(f"{source}: malformed compression settings ({e})") from None


def fresh_lm(settings: Settings) -> RNNLM:
    torch.manual_seed(settings.seed)
    return RNNLM(ModelConfig(cell=settings.cell, vocab_size=SYMBOLS, emb_size=settings.emb,
                             hidden_size=settings.hidden, num_layers=settings.layers, dropout=0.0))


def check_prior(lm: RNNLM, tokenizer, source: str) -> None:
    """A prior must be a byte-level LM with a full softmax (its logits are mixed with the counts')."""
    if tokenizer.kind != "byte" or lm.cfg.vocab_size != SYMBOLS:
        raise NlmError(f"{source}: a prior model must be byte-level (trained with data.tokenizer=byte); "
                       f"this one is {tokenizer.kind}-level with {lm.cfg.vocab_size} symbols")
    if lm.cfg.softmax != "full" or lm.stack.directions != 1:
        raise NlmError(f"{source}: a prior model needs a full softmax and one direction")


class Counts:
    """Adaptive n-gram counts for orders k: how often each byte followed the last k bytes, one row
    per context, all orders in one table so that one gather serves a step: (rows, 257) float32,
    the last column each row's total. A context of k <= 2 bytes has its own row; longer ones
    share ``buckets`` rows by their value modulo a prime (a hash that needs no multiplication,
    so nothing overflows 64 bits)."""

    def __init__(self, orders, buckets: int, alpha: float, batch: int):
        self.alpha = alpha
        sizes = [SYMBOLS ** k if k <= 2 else buckets for k in orders]
        self.offsets = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))])
        self.masks = torch.tensor([(1 << (8 * k)) - 1 for k in orders])
        self.moduli = torch.tensor([SYMBOLS ** k if k <= 2 else _prime_below(buckets) for k in orders])
        self.table = torch.zeros(sum(sizes), SYMBOLS + 1)
        self.history = torch.full((batch, 1), START, dtype=torch.long)  # each segment's last 7 bytes, newest lowest
        self.rows = self._rows()

    def _rows(self) -> torch.Tensor:
        """(batch, orders) rows of the current contexts."""
        return (self.history & self.masks) % self.moduli + self.offsets

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> log-probabilities (batch, orders, 256) and log(1 + total) (batch, orders) of the next byte."""
        batch, orders = self.rows.shape
        rows = self.table.index_select(0, self.rows.view(-1))
        totals = rows[:, SYMBOLS:]
        logp = (rows[:, :SYMBOLS] + self.alpha).log_().sub_((totals + SYMBOLS * self.alpha).log_())
        return logp.view(batch, orders, SYMBOLS), totals.log1p().view(batch, orders)

    def add(self, symbols: torch.Tensor) -> None:
        """symbols (batch,): count them in their contexts (and the contexts' totals), then move every
        context on by one byte. A context whose total passes ROW_LIMIT has its counts halved, so that
        recent bytes weigh more (PAQ's habit)."""
        width = SYMBOLS + 1
        base = self.rows * width
        cells = torch.cat(((base + symbols.unsqueeze(1)).view(-1), (base + SYMBOLS).view(-1)))
        self.table.view(-1).index_put_((cells,), torch.ones(cells.numel()), accumulate=True)
        totals = self.table.view(-1).index_select(0, cells[cells.numel() // 2:])
        if bool((totals > ROW_LIMIT).any()):
            full = self.rows.view(-1)[totals > ROW_LIMIT].unique()
            halved = self.table[full, :SYMBOLS].mul_(0.5).floor_()
            self.table[full] = torch.cat((halved, halved.sum(1, keepdim=True)), 1)
        self.history = ((self.history << 8) | symbols.unsqueeze(1)) & ((1 << 56) - 1)
        self.rows = self._rows()


def _prime_below(n: int) -> int:
    return next(p for p in range(n, 1, -1) if all(p % d for d in range(2, int(p ** 0.5) + 1)))


class Predictor(nn.Module):
    """The LM and the mixer over the counts, with a fast single-step path and a training step."""

    def __init__(self, lm: RNNLM, settings: Settings, batch: int, prior: bool):
        super().__init__()
        self.lm, self.settings = lm, settings
        width = lm.proj.out_features if lm.proj is not None else lm.stack.output_size
        k = len(settings.orders)
        self.mix = nn.Linear(width + k, k)  # the weight of each order's log-probabilities
        nn.init.zeros_(self.mix.weight)
        # A fresh model starts from the counts alone (an even geometric mixture); a prior from itself.
        nn.init.constant_(self.mix.bias, 0.0 if prior else 1.0 / k)
        self.counts = Counts(settings.orders, settings.buckets, settings.alpha, batch)
        self.learning = settings.adapt or not prior
        params = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=settings.lr) if self.learning else None
        self.state = lm.init_state(batch)  # (layers, parts, 1, batch, hidden)
        self._prepare()
        self._window: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._start_state = self.state
        self._windows = 0
        self.eval()

    def _prepare(self) -> None:
        """Copies of the weights laid out for single steps: layer 0's input projection of every byte
        as a table (256, gates * hidden), the other matrices transposed."""
        with torch.no_grad():
            stack, emb = self.lm.stack, self.lm.embedding.weight
            self._steps = []
            for i, layer in enumerate(stack.layers):
                w_ih, w_hh, b_ih, b_hh = (w.detach() for w in layer.weights(0))
                first = emb @ w_ih.T + b_ih if i == 0 else None
                self._steps.append((first, w_ih.T.contiguous(), b_ih, w_hh.T.contiguous(), b_hh))
            dec = self.lm.decoder
            self._out = (dec.weight.detach().T.contiguous(), dec.bias.detach().clone())
            self._mix = (self.mix.weight.detach().T.contiguous(), self.mix.bias.detach().clone())

    @torch.no_grad()
    def step(self, symbols: torch.Tensor) -> torch.Tensor:
        """symbols (batch,): each segment's last byte -> probabilities (batch, 256) float32 of the next."""
        stack, state = self.lm.stack, self.state
        below, finals = [], []
        for i, (table, w_ih_t, b_ih, w_hh_t, b_hh) in enumerate(self._steps):
            if i == 0:
                inp, gx = None, table.index_select(0, symbols)
            else:
                inp = stack.layer_input(below)
                gx = torch.addmm(b_ih, inp, w_ih_t)
            new = cells.update(stack.cell, gx, torch.addmm(b_hh, state[i, 0, 0], w_hh_t), state[i, :, 0])
            out = new[0] if inp is None else stack.join(i, new[0], inp)
            finals.append(new)
            below.append(out)
        features = below[-1] if self.lm.proj is None else self.lm.proj(below[-1])
        self.state = torch.stack(finals).unsqueeze(2)
        logp, confidence = self.counts.read()
        weight_t, bias = self._mix
        w = torch.addmm(bias, torch.cat((features, confidence), 1), weight_t)  # (batch, orders)
        logits = torch.addmm(self._out[1], features, self._out[0]) + torch.bmm(w.unsqueeze(1), logp).squeeze(1)
        if self.learning:
            self._window.append((symbols, logp, confidence))
        return torch.softmax(logits, 1)

    def seen(self, symbols: torch.Tensor) -> None:
        """symbols (batch,): the bytes just coded. Counted; after a full window, learned from."""
        self.counts.add(symbols)
        if self.learning and len(self._window) == self.settings.window:
            self._learn(symbols)

    def _learn(self, last: torch.Tensor) -> None:
        """One Adam step on the window just coded, from the state it started in, on every
        ``learn_every``-th segment (a different share each window): the counts and the coder see
        every byte, the gradient a sample of them, which saves most of an update's time."""
        every = self.settings.learn_every
        rows = torch.arange(self._windows % every, last.numel(), every)
        self._windows += 1
        inputs = torch.stack([w[0] for w in self._window], 1)[rows]  # (rows, window)
        targets = torch.cat((inputs[:, 1:], last[rows].unsqueeze(1)), 1)
        logp = torch.stack([w[1][rows] for w in self._window], 1)  # (rows, window, orders, 256)
        confidence = torch.stack([w[2][rows] for w in self._window], 1)  # (rows, window, orders)
        with torch.enable_grad():
            # Eval mode: a prior's dropout stays off while it adapts (Krause et al. 2018 adapt without it).
            features, _ = self.lm(inputs, self._start_state[:, :, :, rows])
            w = self.mix(torch.cat((features, confidence), 2))
            logits = self.lm.decoder(features) + (w.unsqueeze(-1) * logp).sum(2)
            loss = F.cross_entropy(logits.reshape(-1, SYMBOLS), targets.reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.settings.clip)
            self.optimizer.step()
        self._prepare()
        self._window.clear()
        self._start_state = self.state
