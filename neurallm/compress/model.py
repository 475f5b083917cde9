"""The predictor a compressed file is coded with: a byte-level recurrent LM whose logits are
mixed with adaptive n-gram counts and a match model, learning as it reads.

One pass over a megabyte gives a recurrent network little time to learn, and it learns
slowly at first; counts of what followed the last 1..7 bytes predict well from the first
repeat on (as PPM and PAQ do), and a match model follows long repeats. The network sees their
log-probabilities and learns how far to trust each at each point (a learned, state-dependent
geometric mixture: logits = W h + b + Σ_k w_k(h, n_k) · log p_k), so it has only to learn what
they miss.

Everything here runs the same in the compressor and the decompressor: ``step`` reads one byte
per segment and gives the next byte's probabilities; ``seen`` counts the bytes coded and, after
every ``window`` steps, trains on the window just coded (truncated backpropagation through time
from the state the window started in; mixer and network together).
"""

from __future__ import annotations

import math
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
    hidden: int = 64
    layers: int = 1
    emb: int = 32
    orders: tuple[int, ...] = (1, 2, 3, 4, 5, 7)
    match: bool = True  # a match model beside the counts
    buckets: int = 1 << 16  # rows of each hashed count table (orders above 2)
    alpha: float = 0.05  # additive smoothing of the counts
    lr: float = 3e-3
    window: int = 20  # bytes per segment between updates (the truncated BPTT length)
    clip: float = 1.0
    segments: int = 64
    learn_every: int = 2  # learn from every n-th segment of a window
    seed: int = 0
    adapt: bool = True  # with a prior: keep learning as the text is read

    def __post_init__(self):
        checks = [(self.cell in ("lstm", "gru", "rnn_tanh"), "cell", "lstm, gru or rnn_tanh"),
                  (self.hidden >= 1 and self.layers >= 1 and self.emb >= 1, "hidden/layers/emb", "positive"),
                  (self.orders and all(1 <= k <= 7 for k in self.orders) and len(set(self.orders)) == len(self.orders),
                   "orders", "one or more distinct integers 1..7"),
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
    per context, all orders in one table so that one gather serves a step. A context of k <= 2
    bytes has its own row; longer ones share ``buckets`` rows by their value modulo a prime (a hash
    that needs no multiplication, so nothing overflows 64 bits).

    The table holds log(count + alpha), not the count, and ``norm`` each row's log(total + 256 alpha):
    a step reads log-probabilities with one subtraction instead of a logarithm of every entry (the
    costliest part of a step otherwise). A count is recovered exactly as round(exp(entry) - alpha)
    when it changes (counts stay far below where float32 would blur them). Rows of fixed
    log-probabilities (``extra``, norm 0) may follow the counts', so that one gather reads both."""

    def __init__(self, orders, buckets: int, alpha: float, batch: int, extra: torch.Tensor | None = None):
        self.alpha = alpha
        sizes = [SYMBOLS ** k if k <= 2 else buckets for k in orders]
        self.offsets = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))])
        self.masks = torch.tensor([(1 << (8 * k)) - 1 for k in orders])
        self.moduli = torch.tensor([SYMBOLS ** k if k <= 2 else _prime_below(buckets) for k in orders])
        self.extra_start = sum(sizes)
        extra = torch.empty(0, SYMBOLS) if extra is None else extra
        self.logs = torch.cat((torch.full((sum(sizes), SYMBOLS), math.log(alpha)), extra))
        self.totals = torch.zeros(self.logs.size(0))
        self.norm = torch.cat((torch.full((sum(sizes),), math.log(SYMBOLS * alpha)), torch.zeros(extra.size(0))))
        self.history = torch.full((batch, 1), START, dtype=torch.long)  # each segment's last 7 bytes, newest lowest
        self.rows = self._rows()

    def _rows(self) -> torch.Tensor:
        """(batch, orders) rows of the current contexts."""
        return (self.history & self.masks) % self.moduli + self.offsets

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (batch, n) -> their log-probabilities (batch, n, 256) and log(1 + total) (batch, n)."""
        flat = rows.view(-1)
        logp = self.logs.index_select(0, flat).view(*rows.shape, SYMBOLS)
        logp.sub_(self.norm.index_select(0, flat).view(*rows.shape, 1))
        return logp, self.totals.index_select(0, flat).log1p_().view(rows.shape)

    def add(self, symbols: torch.Tensor) -> None:
        """symbols (batch,): count them in their contexts, then move every context on by one byte. A
        context whose total passes ROW_LIMIT has its counts halved, so that recent bytes weigh more
        (PAQ's habit)."""
        flat = self.rows.view(-1)
        cells, hits = torch.unique((self.rows * SYMBOLS + symbols.unsqueeze(1)).view(-1), return_counts=True)
        logs = self.logs.view(-1)
        counts = logs.index_select(0, cells).exp_().sub_(self.alpha).round_().add_(hits)
        logs.index_copy_(0, cells, counts.add_(self.alpha).log_())
        self.totals.index_put_((flat,), torch.ones(flat.numel()), accumulate=True)
        totals = self.totals.index_select(0, flat)
        full = totals > ROW_LIMIT
        if bool(full.any()):
            rows = flat[full].unique()
            halved = self.logs[rows].exp_().sub_(self.alpha).round_().mul_(0.5).floor_()
            self.totals[rows] = halved.sum(1)
            self.logs[rows] = halved.add_(self.alpha).log_()
            totals = self.totals.index_select(0, flat)
        self.norm.index_copy_(0, flat, totals.add_(SYMBOLS * self.alpha).log_())
        self.history = ((self.history << 8) | symbols.unsqueeze(1)) & ((1 << 56) - 1)
        self.rows = self._rows()


class Match:
    """The byte that followed the last time the current context (the last 7 bytes, hashed) occurred,
    in any segment: the match model of PAQ and lstm-compress. The counts forget whole strings once
    their rows fill; a match follows a repeat (a name, a heading, a phrase) for as long as it goes on.
    Its opinion reaches the mixer as one more row of log-probabilities (``ROWS``: sure of one byte,
    or none), with log(1 + the run of bytes it has predicted right) as its confidence. Every coded
    byte is kept (interleaved: segment b's byte of step t at t * batch + b), so that a match can go
    on past the step it was found in."""

    SURE = 15 / 16  # the probability of the predicted byte before the mixer's weighting

    def __init__(self, batch: int, length: int, bits: int = 20):
        self.batch, self.t = batch, 0
        self.buffer = torch.zeros(batch * (length + 1), dtype=torch.uint8)
        self.prime = _prime_below(1 << bits)
        self.last = torch.full((1 << bits,), -1, dtype=torch.long)  # hashed context -> where its next byte is
        self.ptr = torch.full((batch,), -1, dtype=torch.long)  # where the predicted byte is; -1: no match
        self.predicted = torch.full((batch,), SYMBOLS, dtype=torch.long)  # SYMBOLS: none
        self.run = torch.zeros(batch)
        self.places = torch.arange(batch)

    @staticmethod
    def rows() -> torch.Tensor:
        """(257, 256) log-probabilities: row s sure of byte s, the last row uniform (no match)."""
        sure = torch.full((SYMBOLS + 1, SYMBOLS), math.log((1 - Match.SURE) / (SYMBOLS - 1)))
        sure.fill_diagonal_(math.log(Match.SURE))
        sure[SYMBOLS] = -math.log(SYMBOLS)
        return sure

    def add(self, symbols: torch.Tensor, history: torch.Tensor) -> None:
        """symbols (batch,) just coded; history (batch, 1): the contexts they end."""
        hit = self.predicted == symbols
        self.run = torch.where(hit, self.run + 1, 0.0)
        here = self.t * self.batch
        self.buffer[here:here + self.batch] = symbols
        key = history.view(-1) % self.prime
        self.ptr = torch.where(hit, self.ptr + self.batch, self.last.index_select(0, key))
        # Several segments may end the same context at once: the latest place wins, as with one.
        self.last.scatter_reduce_(0, key, self.places + here + self.batch, reduce="amax")
        self.predicted = torch.where(self.ptr >= 0, self.buffer.index_select(0, self.ptr.clamp(min=0)).long(), SYMBOLS)
        self.t += 1


def _prime_below(n: int) -> int:
    return next(p for p in range(n, 1, -1) if all(p % d for d in range(2, int(p ** 0.5) + 1)))


class Adam:
    """Adam (Kingma & Ba 2015) in a few lines. torch.optim's first optimizer of a process imports
    torch._dynamo, 2.6 s here: longer than coding a 50 kB file, and paid again by every
    decompression. The same update as torch.optim.Adam's defaults (tested)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))


class Predictor(nn.Module):
    """The LM and the mixer over the counts (and the match), with a fast single-step path and a
    training step."""

    def __init__(self, lm: RNNLM, settings: Settings, batch: int, prior: bool, length: int = 0):
        super().__init__()
        self.lm, self.settings, self.batch = lm, settings, batch
        width = lm.proj.out_features if lm.proj is not None else lm.stack.output_size
        k = len(settings.orders) + settings.match
        self.mix = nn.Linear(width + k, k)  # the weight of each order's log-probabilities
        nn.init.zeros_(self.mix.weight)
        # A fresh model starts from the counts alone (an even geometric mixture); a prior from itself.
        nn.init.constant_(self.mix.bias, 0.0 if prior else 1.0 / k)
        self.counts = Counts(settings.orders, settings.buckets, settings.alpha, batch,
                             Match.rows() if settings.match else None)
        self.match = Match(batch, length) if settings.match else None
        self.learning = settings.adapt or not prior
        self.optimizer = Adam(list(self.parameters()), settings.lr) if self.learning else None
        self.state = lm.init_state(batch)  # (layers, parts, 1, batch, hidden)
        self._prepare()
        self._sources = k
        self._inputs = torch.empty(settings.window, batch, dtype=torch.long)
        self._t, self._windows = 0, 0
        self._learning_rows()
        self._start_state = self.state
        self.eval()

    def _learning_rows(self) -> None:
        """The segments the current window's update learns from (every ``learn_every``-th, a different
        share each window), and buffers for what the window keeps of them."""
        every = min(self.settings.learn_every, self.batch)
        self._learners = torch.arange(self._windows % every, self.batch, every)
        if self.learning:
            shape = (self.settings.window, self._learners.numel(), self._sources)
            self._logp, self._confidence = torch.empty(*shape, SYMBOLS), torch.empty(shape)

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
        rows = self.counts.rows
        if self.match is not None:
            rows = torch.cat((rows, (self.match.predicted + self.counts.extra_start).unsqueeze(1)), 1)
        logp, confidence = self.counts.read(rows)  # (batch, sources, 256), (batch, sources)
        if self.match is not None:
            confidence[:, -1] = self.match.run.log1p()
        weight_t, bias = self._mix
        w = torch.addmm(bias, torch.cat((features, confidence), 1), weight_t)  # (batch, sources)
        logits = torch.baddbmm(torch.addmm(self._out[1], features, self._out[0]).unsqueeze(1), w.unsqueeze(1), logp)
        if self.learning:
            self._inputs[self._t] = symbols
            torch.index_select(logp, 0, self._learners, out=self._logp[self._t])
            torch.index_select(confidence, 0, self._learners, out=self._confidence[self._t])
        return torch.softmax(logits[:, 0], 1)

    def seen(self, symbols: torch.Tensor) -> None:
        """symbols (batch,): the bytes just coded. Counted; after a full window, learned from."""
        self.counts.add(symbols)
        if self.match is not None:
            self.match.add(symbols, self.counts.history)
        self._t += 1
        if self._t == self.settings.window:
            if self.learning:
                self._learn(symbols)
            self._t = 0

    def _learn(self, last: torch.Tensor) -> None:
        """One Adam step on the window just coded, from the state it started in, on the learning
        segments: the counts and the coder see every byte, the gradient a share of them (which saves
        most of an update's time)."""
        rows = self._learners
        inputs = self._inputs.T[rows]  # (learners, window)
        targets = torch.cat((self._inputs[1:, rows], last[rows].unsqueeze(0)))  # (window, learners): the buffers' order
        logp = self._logp.view(-1, *self._logp.shape[2:])  # (window * learners, sources, 256)
        with torch.enable_grad():
            # Eval mode: a prior's dropout stays off while it adapts (Krause et al. 2018 adapt without it).
            features, _ = self.lm(inputs, self._start_state[:, :, :, rows])
            features = features.transpose(0, 1).reshape(-1, features.size(-1))  # (window * learners, F)
            w = self.mix(torch.cat((features, self._confidence.view(features.size(0), -1)), 1))
            logits = torch.baddbmm(self.lm.decoder(features).unsqueeze(1), w.unsqueeze(1), logp)[:, 0]
            loss = F.cross_entropy(logits, targets.reshape(-1))
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.optimizer.params, self.settings.clip)
            self.optimizer.step()
        self._prepare()
        self._windows += 1
        self._learning_rows()
        self._start_state = self.state
