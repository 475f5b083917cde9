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

import torch

from neurallm.errors import NlmError

TOP = 1 << 24  # renormalise (shift a byte out) when range falls below this
MASK = (1 << 32) - 1
MAX_TOTAL = 1 << 16
SCALE = MAX_TOTAL - 256 * 2  # probability mass spread over the frequencies; every symbol keeps at least 1


def frequencies(probs: torch.Tensor) -> torch.Tensor:
    """probs (batch, symbols) float32 -> cumulative integer frequencies (batch, symbols + 1), int64,
    starting at 0; every symbol gets at least 1 (so any byte can still be coded), the total stays
    below ``MAX_TOTAL``. Exact float32 arithmetic on integers below 2**24: the same probabilities
    give the same integers on every machine."""
    cum = torch.zeros(probs.size(0), probs.size(1) + 1)
    torch.cumsum((probs * SCALE).floor_().add_(1), 1, out=cum[:, 1:])
    return cum.long()


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


class Decoder:
    def __init__(self, data: bytes, source: str = "input"):
        self.data, self.pos, self.source = data, 0, source
        self.range, self.code = MASK, 0
        for _ in range(5):
            self.code = (self.code << 8) | self._byte()

    def _byte(self) -> int:
        pos = self.pos
        self.pos += 1
        return self.data[pos] if pos < len(self.data) else 0  # the encoder's flush covers the end

    def target(self, total: int) -> int:
        """Where the next symbol lies in [0, total): the decoder then finds the symbol whose
        interval holds it and calls ``consume``."""
        self._r = self.range // total
        value = self.code // self._r
        if value >= total:
            raise NlmError(f"{self.source}: the compressed data is damaged (a code past the end of its interval)")
        return value

    def consume(self, start: int, size: int) -> None:
        self.code -= self._r * start
        self.range = self._r * size
        while self.range < TOP:
            self.code = (self.code << 8) | self._byte()
            self.range <<= 8
