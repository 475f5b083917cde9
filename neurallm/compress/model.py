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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neurallm.compress import MAX_SEGMENTS
from neurallm.config import ModelConfig
from neurallm.errors import NlmError
from neurallm.models import cells
from neurallm.models.lm import RNNLM

SYMBOLS = 256
START = 10  # the byte every segment's history starts with (a newline, a byte-level LM's boundary)
ROW_LIMIT = 1024  # a context's counts are halved past this total, so recent bytes weigh more (PAQ's habit)
LOG_TABLE = 4096  # logarithms are read from tables this long: counts and totals stay below ROW_LIMIT + MAX_SEGMENTS
assert LOG_TABLE > ROW_LIMIT + MAX_SEGMENTS


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
                  (min(self.window, self.segments, self.learn_every) >= 1, "window/segments/learn_every", "positive"),
                  (self.segments <= MAX_SEGMENTS, "segments", f"at most {MAX_SEGMENTS}")]
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

    Two tables: the counts (int16; a row is halved once its total passes ROW_LIMIT) and
    log(count + alpha) in float16, which is what a step reads: log-probabilities up to the row's
    normaliser log(total + 256 alpha), without a logarithm of every entry, and half the bytes to
    gather (the costliest part of a step otherwise: a few hundred rows scattered over a few hundred
    megabytes). The normaliser is left out: it moves all 256 logits of a segment by the same amount
    in the mixture (its weight times it), which the softmax ignores, and so does the loss. Rows of
    fixed log-probabilities (``extra``) may follow the counts', so that one gather reads both.

    The bookkeeping of a step is a few dozen operations on a few hundred integers: numpy's, whose
    call costs a microsecond where a torch call costs several. Logarithms come from tables made
    once (a count is an integer below LOG_TABLE): a step computes none."""

    def __init__(self, orders, buckets: int, alpha: float, batch: int, extra: torch.Tensor | None = None):
        sizes = [SYMBOLS ** k if k <= 2 else buckets for k in orders]
        self.offsets = np.array([sum(sizes[:i]) for i in range(len(sizes))], dtype=np.int64)
        self.masks = np.array([(1 << (8 * k)) - 1 for k in orders], dtype=np.int64)
        self.moduli = np.array([SYMBOLS ** k if k <= 2 else _prime_below(buckets) for k in orders], dtype=np.int64)
        self.extra_start = sum(sizes)
        extra = torch.empty(0, SYMBOLS) if extra is None else extra
        self.log_count = (torch.arange(LOG_TABLE, dtype=torch.float64) + alpha).log().half().numpy()
        self.log1p = torch.arange(LOG_TABLE, dtype=torch.float64).log1p().float().numpy()
        self.counts = np.zeros((sum(sizes), SYMBOLS), dtype=np.int16)
        self.logs = torch.cat((torch.full((sum(sizes), SYMBOLS), float(self.log_count[0]), dtype=torch.float16),
                               extra.half()))
        self._logs = self.logs.numpy()  # the same memory
        self.totals = np.zeros(sum(sizes), dtype=np.int16)
        self.history = np.full((batch, 1), START, dtype=np.int64)  # each segment's last 7 bytes, newest lowest
        self.rows = self._rows()
        self._ones = np.ones(self.rows.size, dtype=np.int16)  # np.add.at is fast with an array of the table's type

    def _rows(self) -> np.ndarray:
        """(batch, orders) rows of the current contexts."""
        return (self.history & self.masks) % self.moduli + self.offsets

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """rows (batch, n) -> their log-probabilities up to each row's normaliser (batch, n, 256), float16."""
        return self.logs.index_select(0, torch.from_numpy(rows.reshape(-1))).view(*rows.shape, SYMBOLS)

    def confidence(self) -> np.ndarray:
        """log(1 + total) of the current contexts (batch, orders), float32."""
        return self.log1p[self.totals[self.rows]]

    def add(self, symbols: np.ndarray) -> None:
        """symbols (batch,): count them in their contexts, then move every context on by one byte. A
        context whose total passes ROW_LIMIT has its counts halved, so that recent bytes weigh more
        (PAQ's habit)."""
        flat = self.rows.reshape(-1)
        cells = (self.rows * SYMBOLS + symbols[:, None]).reshape(-1)
        counts, logs = self.counts.reshape(-1), self._logs.reshape(-1)
        np.add.at(counts, cells, self._ones)  # a cell several segments hit at once counts each
        logs[cells] = self.log_count[counts[cells]]
        np.add.at(self.totals, flat, self._ones)
        full = flat[self.totals[flat] > ROW_LIMIT]
        if full.size:
            rows = np.unique(full)
            halved = self.counts[rows] // 2
            self.counts[rows] = halved
            self.totals[rows] = halved.sum(1)
            self._logs[rows] = self.log_count[halved]
        self.history = ((self.history << 8) | symbols[:, None]) & ((1 << 56) - 1)
        self.rows = self._rows()


class Match:
    """The byte that followed the last time the current context (the last 7 bytes, hashed) occurred,
    in any segment: the match model of PAQ and lstm-compress. The counts forget whole strings once
    their rows fill; a match follows a repeat (a name, a heading, a phrase) for as long as it goes on.
    Its opinion reaches the mixer as one more row of log-probabilities (``ROWS``: sure of one byte,
    or none), with log(1 + the run of bytes it has predicted right) as its confidence. Every coded
    byte is kept (interleaved: segment b's byte of step t at t * batch + b), so that a match can go
    on past the step it was found in. Numpy, as the counts' bookkeeping."""

    SURE = 15 / 16  # the probability of the predicted byte before the mixer's weighting

    def __init__(self, batch: int, length: int, bits: int = 20):
        self.batch, self.t = batch, 0
        self.buffer = np.zeros(batch * (length + 1), dtype=np.uint8)
        self.prime = _prime_below(1 << bits)
        self.last = np.full(1 << bits, -1, dtype=np.int64)  # hashed context -> where its next byte is
        self.ptr = np.full(batch, -1, dtype=np.int64)  # where the predicted byte is; -1: no match
        self.predicted = np.full(batch, SYMBOLS, dtype=np.int64)  # SYMBOLS: none
        self.run = np.zeros(batch, dtype=np.int64)
        self.places = np.arange(batch, dtype=np.int64)

    @staticmethod
    def rows() -> torch.Tensor:
        """(257, 256) log-probabilities: row s sure of byte s, the last row uniform (no match)."""
        sure = torch.full((SYMBOLS + 1, SYMBOLS), math.log((1 - Match.SURE) / (SYMBOLS - 1)))
        sure.fill_diagonal_(math.log(Match.SURE))
        sure[SYMBOLS] = -math.log(SYMBOLS)
        return sure

    def add(self, symbols: np.ndarray, history: np.ndarray) -> None:
        """symbols (batch,) just coded; history (batch, 1): the contexts they end."""
        hit = self.predicted == symbols
        self.run = np.where(hit, np.minimum(self.run + 1, LOG_TABLE - 1), 0)
        here = self.t * self.batch
        self.buffer[here:here + self.batch] = symbols
        key = history.reshape(-1) % self.prime
        self.ptr = np.where(hit, self.ptr + self.batch, self.last[key])
        # Several segments may end the same context at once: the latest place wins, as with one.
        np.maximum.at(self.last, key, self.places + here + self.batch)
        self.predicted = np.where(self.ptr >= 0, self.buffer[np.maximum(self.ptr, 0)].astype(np.int64), SYMBOLS)
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
            self._logp, self._confidence = torch.empty(*shape, SYMBOLS, dtype=torch.float16), torch.empty(shape)

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
        rows, confidence = self.counts.rows, self.counts.confidence()
        if self.match is not None:
            rows = np.concatenate((rows, self.match.predicted[:, None] + self.counts.extra_start), 1)
            confidence = np.concatenate((confidence, self.counts.log1p[self.match.run][:, None]), 1)
        logp16 = self.counts.read(rows)  # (batch, sources, 256)
        logp = logp16.float()
        confidence = torch.from_numpy(confidence)
        weight_t, bias = self._mix
        w = torch.addmm(bias, torch.cat((features, confidence), 1), weight_t)  # (batch, sources)
        logits = torch.baddbmm(torch.addmm(self._out[1], features, self._out[0]).unsqueeze(1), w.unsqueeze(1), logp)
        if self.learning:
            self._inputs[self._t] = symbols
            torch.index_select(logp16, 0, self._learners, out=self._logp[self._t])
            torch.index_select(confidence, 0, self._learners, out=self._confidence[self._t])
        return torch.softmax(logits[:, 0], 1)

    def seen(self, symbols: torch.Tensor) -> None:
        """symbols (batch,): the bytes just coded. Counted; after a full window, learned from."""
        self.counts.add(symbols.numpy())
        if self.match is not None:
            self.match.add(symbols.numpy(), self.counts.history)
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
        logp = self._logp.view(-1, *self._logp.shape[2:]).float()  # (window * learners, sources, 256)
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
