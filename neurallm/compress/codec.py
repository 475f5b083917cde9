"""Compress and decompress bytes: the predictor walks the segments side by side, one byte of each
per step, and each segment's range coder codes its byte with the predictor's frequencies.

The compressor and the decompressor run the very same predictor operations in the same order
and batch shape (one batch of all segments, updates after the same windows), so they compute
the same probabilities bit for bit, turned into the same integer frequencies: the decoder
finds each byte from them before the next step needs it.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

from neurallm.compress import coder
from neurallm.compress.container import Header, crc32, unpack
from neurallm.compress.model import START, Predictor, Settings, check_prior, fresh_lm
from neurallm.errors import NlmError

MIN_SEGMENT = 4096  # a file is cut into no more segments than this many bytes each allows


def split(length: int, segments: int) -> list[int]:
    """Lengths of at most ``segments`` nearly equal parts (the first ones a byte longer)."""
    count = max(1, min(segments, length // MIN_SEGMENT))
    base, extra = divmod(length, count)
    return [base + (i < extra) for i in range(count)]


def platform(threads: int) -> dict:
    return {"torch": torch.__version__, "threads": threads, "cpu": torch.backends.cpu.get_cpu_capability()}


@contextlib.contextmanager
def threads_set(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _predictor(settings: Settings, lengths: list[int], prior) -> Predictor:
    batch, longest = len(lengths), max(lengths, default=0)
    if prior is None:
        return Predictor(fresh_lm(settings), settings, batch, prior=False, length=longest)
    lm, tokenizer, name = prior
    check_prior(lm, tokenizer, name)
    torch.manual_seed(settings.seed)
    return Predictor(copy.deepcopy(lm), settings, batch, prior=True, length=longest)  # it learns: the caller's model stays as it was


def _columns(data: bytes, lengths: list[int]) -> torch.Tensor:
    """The segments as rows (segments, longest) of bytes, the short ones padded with START."""
    rows = torch.full((len(lengths), max(lengths, default=0)), START, dtype=torch.uint8)
    start = 0
    for i, n in enumerate(lengths):
        if n:
            rows[i, :n] = torch.frombuffer(bytearray(data[start:start + n]), dtype=torch.uint8)
        start += n
    return rows


def _walk(settings: Settings, lengths: list[int], prior, threads: int, code, progress) -> None:
    """The one loop both directions run: each step, the predictor's frequencies for every segment's
    next byte go to ``code(t, cum) -> the bytes (segments,)`` (encoded from the input, or decoded),
    which the predictor then reads. Sharing it is what keeps the two sides' operations identical."""
    with threads_set(threads):
        predictor = _predictor(settings, lengths, prior)
        last = torch.full((len(lengths),), START, dtype=torch.long)
        for t in range(max(lengths, default=0)):
            last = code(t, coder.frequencies(predictor.step(last)))
            predictor.seen(last)
            if progress:
                progress(sum(t < n for n in lengths))


def compress(data: bytes, settings: Settings, prior=None, threads: int = 1, progress=None) -> bytes:
    """-> the whole compressed file. ``prior``: (lm, tokenizer, name) of a byte-level checkpoint.
    ``progress(n)`` is told the bytes done after each step."""
    lengths = split(len(data), settings.segments)
    rows = _columns(data, lengths)
    prior_id = None if prior is None else {"hash": _hash(prior[0]), "name": prior[2]}
    encoders = [coder.Encoder() for _ in lengths]
    segments = np.arange(len(lengths))

    def encode(t: int, cum: np.ndarray) -> torch.Tensor:
        symbols = rows[:, t].long()
        at = symbols.numpy()
        starts, ends, totals = cum[segments, at].tolist(), cum[segments, at + 1].tolist(), cum[:, -1].tolist()
        for i, enc in enumerate(encoders):
            if t < lengths[i]:
                enc.encode(starts[i], ends[i] - starts[i], totals[i])
        return symbols

    _walk(settings, lengths, prior, threads, encode, progress)
    payloads = [enc.finish() for enc in encoders]
    header = Header(len(data), crc32(data), settings.to_json(), lengths, [len(p) for p in payloads],
                    prior_id, platform(threads))
    return header.pack(payloads)


def read_header(blob: bytes, source: str) -> Header:
    return unpack(blob, source)[0]


def decompress(blob: bytes, source: str, prior=None, progress=None, ignore_platform: bool = False) -> bytes:
    header, payloads = unpack(blob, source)
    settings = Settings.from_json(header.settings, source)
    _check_prior(header, prior, source)
    _check_platform(header, source, ignore_platform)
    lengths = header.segments
    if len(lengths) > settings.segments:  # the batch, and so the counts' bounds, follow the settings
        raise NlmError(f"{source}: a malformed header ({len(lengths)} segments, settings allow {settings.segments})")
    decoders = coder.Decoders(payloads, source)
    ends = np.array(lengths, dtype=np.int64)
    out = torch.full((len(lengths), max(lengths, default=0)), START, dtype=torch.uint8)

    def decode(t: int, cum: np.ndarray) -> torch.Tensor:
        active = ends > t
        # an ended segment reads its padding, as the encoder's rows hold
        symbols = torch.from_numpy(np.where(active, decoders.decode(cum, active), START))
        out[:, t] = symbols
        return symbols

    _walk(settings, lengths, prior, int(header.platform.get("threads", 1)), decode, progress)
    data = b"".join(out[i, :n].numpy().tobytes() for i, n in enumerate(lengths))
    if crc32(data) != header.crc32 or len(data) != header.length:
        hint = "" if header.platform == platform(header.platform.get("threads", 1)) else \
            " (it was written on another platform; see the README on what must match)"
        raise NlmError(f"{source}: the decompressed data fails its CRC-32 check: the file is damaged{hint}")
    return data


def _hash(lm) -> str:
    from neurallm.runner import weights_hash

    return weights_hash(lm)


def _check_prior(header: Header, prior, source: str) -> None:
    if header.prior is None:
        if prior is not None:
            raise NlmError(f"{source}: was compressed without a prior model; decompress it without --model")
        return
    if prior is None:
        raise NlmError(f"{source}: was compressed with the prior model {header.prior.get('name')!r} "
                       f"(weights sha256 {str(header.prior.get('hash'))[:12]}...); give it with --model")
    if _hash(prior[0]) != header.prior.get("hash"):
        raise NlmError(f"{source}: was compressed with another prior model ({header.prior.get('name')!r}, weights "
                       f"sha256 {str(header.prior.get('hash'))[:12]}...) than {prior[2]}")


def _check_platform(header: Header, source: str, ignore: bool) -> None:
    here = platform(int(header.platform.get("threads", 1)))
    diff = [f"{k} {header.platform.get(k)} there, {here[k]} here" for k in ("torch", "cpu")
            if header.platform.get(k) != here[k]]
    if diff and not ignore:
        raise NlmError(f"{source}: compressed with different arithmetic ({'; '.join(diff)}): the model's "
                       f"probabilities may differ in their last bits and the data could not be decoded. "
                       f"--ignore-platform tries anyway (the CRC-32 check then tells)")
