"""The decoding engine that generate, chat and the server share.

A recurrent model's whole memory of a text is a fixed-size state, so a stream is one
column of a state buffer: (layers, parts, directions, slots, hidden). ``prefill`` reads a
prompt into a ``Context`` with the fused whole-sequence kernels; ``submit`` puts a
context into a free slot; each ``step`` advances every active stream by one token in
one batched forward pass and one batched sampling pass. A stream that finishes leaves
and its slot is reused; active streams stay packed in slots 0..n-1, so a step works on
a view of the buffer and never gathers.

A ``Context`` holds the state after all of its tokens but the last, and that last token
(``pending``), not yet read: the next step reads it and samples what follows. So a fresh
text is the boundary token pending on a zero state, a finished stream's context is ready
to continue, and continuing never needs the output layer's features stored anywhere.

Each stream samples with its own random generator, one uniform draw per sampled token,
so its tokens do not depend on which other streams share the batch (up to the last bits
of float32 rounding: BLAS picks different kernels for one row than for many, which can
move a logit by ~1e-7; a token changes only if a draw lands that close to a boundary).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from neurallm.errors import NlmError
from neurallm.generate import Sampling, choose
from neurallm.runner import as_runner


@dataclass(frozen=True)
class Context:
    """What a model has read: ``state`` (layers, parts, dirs, 1, hidden) after every token but the
    last, the ``pending`` last token, and ``length`` tokens in all (the pending one included)."""

    state: torch.Tensor
    pending: int
    length: int


@dataclass
class Stream:
    """One request in the engine: its context moves forward one token per step."""

    context: Context
    max_tokens: int
    sampling: Sampling
    rng: torch.Generator
    logprobs: int = -1  # -1: none; 0: the chosen token's; k > 0: also the k best alternatives
    id: int = 0
    generated: int = 0
    done: bool = False
    reason: str = ""  # "length" when max_tokens ran out; "stop" or "cancelled" when the caller finished it
    slot: int = -1


@dataclass(frozen=True)
class Event:
    stream: Stream
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class Engine:
    def __init__(self, model, slots: int = 32):
        """``model``: an ``RNNLM`` or any runner (runner.py): eager, quantized or exported."""
        if slots < 1:
            raise NlmError(f"engine slots: {slots} (expected at least 1)")
        self.runner = as_runner(model)
        self.device = self.runner.device
        self.slots = slots
        self.streams: list[Stream] = []  # active, stream i in slot i
        self.buffer = self.runner.init_state(slots)  # (layers, parts, dirs, slots, hidden)
        self._ids = itertools.count(1)

    @property
    def model_hash(self) -> str:
        return self.runner.model_hash

    # ---- contexts -------------------------------------------------------------------------

    def start(self, boundary: int) -> Context:
        """A new text: the boundary token pending on a zero state."""
        return Context(self.runner.init_state(1), boundary, 1)

    @torch.no_grad()
    def prefill(self, ids: list[int], context: Context) -> Context:
        """Read ``ids`` after ``context``: the pending token and all new ids but the last go through
        the fused whole-sequence kernels in one call; the last becomes the new pending token."""
        if not ids:
            return context
        read = [context.pending] + list(ids[:-1])
        state = self.runner.read(torch.tensor([read]), context.state)
        # A copy made after the step's temporaries are freed: the state as returned sits among them,
        # and each one kept (a server's open sessions) held tens of KB of heap here instead of its 4 KB.
        return Context(state.clone(), int(ids[-1]), context.length + len(ids))

    # ---- streams --------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return self.slots - len(self.streams)

    def submit(self, context: Context, max_tokens: int, sampling: Sampling, seed: int | None = None,
               logprobs: int = -1) -> Stream:
        """Put a context into a free slot; it generates from the next step on."""
        if not self.free:
            raise NlmError(f"all {self.slots} decoding slots are busy")
        if max_tokens < 1:
            raise NlmError(f"max_tokens {max_tokens}: expected an integer >= 1")
        rng = torch.Generator()
        if seed is None:
            rng.seed()
        else:
            rng.manual_seed(seed)
        stream = Stream(context, max_tokens, sampling, rng, logprobs, id=next(self._ids))
        stream.slot = len(self.streams)
        self.buffer[:, :, :, stream.slot] = context.state[:, :, :, 0]
        self.streams.append(stream)
        return stream

    def finish(self, stream: Stream, reason: str = "stop") -> Context:
        """Take a stream out now (a stop string, a cancelled request); -> its context."""
        if not stream.done:
            stream.done, stream.reason = True, reason
            self._leave(stream)
        return stream.context

    def _leave(self, stream: Stream) -> None:
        """Free the stream's slot: its state goes back into its context; the last stream moves into the gap."""
        slot = stream.slot
        c = stream.context
        stream.context = Context(self.buffer[:, :, :, slot:slot + 1].clone(), c.pending, c.length)
        last = self.streams.pop()
        if last is not stream:
            self.buffer[:, :, :, slot] = self.buffer[:, :, :, last.slot]
            last.slot = slot
            self.streams[slot] = last
        stream.slot = -1

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Advance every active stream by one token."""
        n = len(self.streams)
        if not n:
            return []
        tokens = torch.tensor([[s.context.pending] for s in self.streams])
        logits, state = self.runner.step(tokens, self.buffer[:, :, :, :n])  # (n, vocab) float32
        self.buffer[:, :, :, :n] = state
        chosen = choose(logits, [s.sampling for s in self.streams], [s.rng for s in self.streams]).tolist()
        want = max(s.logprobs for s in self.streams)
        logp = torch.log_softmax(logits, -1) if want >= 0 else None
        if want > 0:
            best, best_ids = logp.topk(min(want, logp.size(-1)), -1)
        events = []
        for i, stream in enumerate(list(self.streams)):
            token = chosen[i]
            lp, top = None, []
            if stream.logprobs >= 0:
                lp = float(logp[i, token])
                top = list(zip(best_ids[i, :stream.logprobs].tolist(), best[i, :stream.logprobs].tolist())) \
                    if stream.logprobs > 0 else []
            stream.context = Context(stream.context.state, token, stream.context.length + 1)
            stream.generated += 1
            events.append(Event(stream, token, lp, top))
        for stream in [s for s in self.streams if s.generated >= s.max_tokens]:
            stream.done, stream.reason = True, "length"
            self._leave(stream)
        return events

    def run(self, stream: Stream):
        """Step until ``stream`` is done, yielding its events: the driver for one user (generate,
        chat). Closing the generator early (a stop string, Ctrl-C) takes the stream out; its
        ``.context`` then holds everything read and sampled so far."""
        try:
            while not stream.done:
                for event in self.step():
                    if event.stream is stream:
                        yield event
        finally:
            self.finish(stream)
