"""A range coder (an arithmetic coder that emits bytes) over integer frequencies.

Written here rather than taken from a library because the coder must take the integer
frequencies the model's probabilities were turned into exactly as they are (no second
quantization of its own), in pure integer arithmetic that gives the same bytes on every
machine, one symbol at a time for the decoder. It is the carry-propagating byte-wise coder
of LZMA (Martin 1979; Subbotin's and Pavlov's byte-oriented form): a 32-bit ``range``, a
``low`` with one carry bit, and a cached byte that a carry may still increment.

A symbol with frequency ``size`` starting at ``start`` out of ``total`` costs about
log2(total / size) bits; ``total`` must stay below 2**16 so that ``range // total`` keeps at
least 8 bits (the rounding then costs under 0.006 bits a symbol).
"""

from __future__ import annotations

import numpy as np
import torch

from neurallm.errors import NlmError

TOP = 1 << 24  # renormalise (shift a byte out) when range falls below this
MASK = (1 << 32) - 1
MAX_TOTAL = 1 << 16
SCALE = MAX_TOTAL - 256 * 2  # probability mass spread over the frequencies; every symbol keeps at least 1


def frequencies(probs: torch.Tensor) -> np.ndarray:
    """probs (batch, symbols) float32 -> cumulative integer frequencies (batch, symbols + 1), int64,
    starting at 0; every symbol gets at least 1 (so any byte can still be coded), the total stays
    below ``MAX_TOTAL``. Exact: a float32 product rounded down to an integer, then integer sums, so
    the same probabilities give the same integers on every machine. (Numpy: for 64 rows of 256 a
    torch call's own cost is most of the work.)"""
    sizes = np.floor(probs.numpy() * np.float32(SCALE)).astype(np.int64)
    cum = np.zeros((sizes.shape[0], sizes.shape[1] + 1), dtype=np.int64)
    np.cumsum(sizes + 1, axis=1, out=cum[:, 1:])
    return cum


class Encoder:
    def __init__(self):
        self.low, self.range = 0, MASK
        self.cache, self.pending = 0, 1  # the byte held back for a carry, and how many bytes it stands for
        self.out = bytearray()

    def encode(self, start: int, size: int, total: int) -> None:
        r = self.range // total
        self.low += r * start
        self.range = r * size
        while self.range < TOP:
            self.range <<= 8
            self._shift()

    def _shift(self) -> None:
        low = self.low
        if low < 0xFF000000 or low > MASK:  # the held bytes are final: no carry can reach them any more
            carry = low >> 32
            byte = self.cache
            while self.pending:
                self.out.append((byte + carry) & 0xFF)
                byte = 0xFF
                self.pending -= 1
            self.cache = (low >> 24) & 0xFF
        self.pending += 1
        self.low = (low & 0x00FFFFFF) << 8

    def finish(self) -> bytes:
        for _ in range(5):
            self._shift()
        return bytes(self.out)


class Decoders:
    """The decoders of all segments at once, in int64 array arithmetic: the same integers as one
    decoder a segment would compute, without a Python call per segment and byte."""

    def __init__(self, payloads: list[bytes], source: str = "input"):
        self.source = source
        # Zero bytes past each payload's end (the encoder's flush covers the end; a damaged file
        # may read further, and reads zeros, as the clamp below keeps it in the last column).
        self.data = np.zeros((len(payloads), max((len(p) for p in payloads), default=0) + 8), dtype=np.uint8)
        for i, p in enumerate(payloads):
            self.data[i, :len(p)] = np.frombuffer(p, dtype=np.uint8)
        self.rows = np.arange(len(payloads))
        self.pos = np.zeros(len(payloads), dtype=np.int64)
        self.range = np.full(len(payloads), MASK, dtype=np.int64)
        self.code = np.zeros(len(payloads), dtype=np.int64)
        for _ in range(5):
            self.code = (self.code << 8) | self._next(True)

    def _next(self, reading) -> np.ndarray:
        byte = self.data[self.rows, np.minimum(self.pos, self.data.shape[1] - 1)].astype(np.int64)
        self.pos += reading
        return byte

    def decode(self, cum: np.ndarray, active: np.ndarray) -> np.ndarray:
        """cum (segments, symbols + 1): each segment's cumulative frequencies; active (segments,)
        bool: the segments with a symbol left. -> the symbols (segments,), int64 (those of the
        inactive ones are meaningless, and their state is kept)."""
        total = cum[:, -1]
        r = self.range // total
        value = self.code // r
        if ((value >= total) & active).any():
            raise NlmError(f"{self.source}: the compressed data is damaged (a code past the end of its interval)")
        symbols = (cum[:, 1:-1] <= value[:, None]).sum(1)  # the symbol whose interval holds the value
        start, end = cum[self.rows, symbols], cum[self.rows, symbols + 1]
        self.code = np.where(active, self.code - r * start, self.code)
        self.range = np.where(active, r * (end - start), self.range)
        # range >= 2**24 before the symbol and r >= 2**8 (total < 2**16), so the new range is at
        # least 2**8 and two shifts always renormalise it.
        for _ in range(2):
            low = self.range < TOP
            self.code = np.where(low, (self.code << 8) | self._next(low), self.code)
            self.range = np.where(low, self.range << 8, self.range)
        return symbols
