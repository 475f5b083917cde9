"""``nlm compress`` and ``nlm decompress`` on files: the checks before any work, a progress bar,
and an output that appears whole or not at all (the input is only ever read)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from neurallm.errors import NlmError


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise NlmError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise NlmError(f"{path}: unreadable ({e.strerror})") from None


def _check_out(out: Path, inp: Path, force: bool) -> None:
    """Check the output before any work: not the input, not an existing file unless ``force``, in a
    folder we can write (a probe file is made there and removed)."""
    if out.exists() and out.resolve() == inp.resolve():
        raise NlmError(f"{out}: is the input; give another output path")
    if out.is_dir():
        raise NlmError(f"{out}: is a folder; give a file path")
    if out.exists() and not force:
        raise NlmError(f"{out}: exists (--force replaces it)")
    if not out.parent.is_dir():
        raise NlmError(f"{out.parent}: no such folder")
    probe = out.with_name(f".{out.name}.probe-{os.getpid()}")
    try:
        probe.touch(exist_ok=False)
    except OSError as e:
        raise NlmError(f"{out}: cannot write there ({e.strerror})") from None
    probe.unlink()


def _write(out: Path, data: bytes) -> None:
    """The whole output or none of it: a temporary file, flushed, renamed over ``out``."""
    from neurallm.checkpoint import atomic_write

    atomic_write(out, lambda tmp: tmp.write_bytes(data))


def _bar(total: int, show: bool, what: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=what, disable=not show, leave=False,
                file=sys.stderr, mininterval=0.5)


def load_prior(model: str | None):
    """--model: a byte-level checkpoint (a directory or a stored name) -> (lm, tokenizer, name)."""
    if model is None:
        return None
    from neurallm import checkpoint, store

    directory = store.resolve(model)
    lm, _, tokenizer = checkpoint.load_float(directory, "--model")
    return lm, tokenizer, model


def compress_file(inp, out, settings, model: str | None = None, force: bool = False, threads: int = 1,
                  progress: bool = True) -> dict:
    from neurallm.compress import codec
    from neurallm.compress.model import check_prior

    inp, out = Path(inp), Path(out)
    data = _read(inp)
    prior = load_prior(model)
    if prior is not None:
        check_prior(*prior)
        cfg = prior[0].cfg  # the header records the prior's own shape
        settings = replace(settings, cell=cfg.cell, hidden=cfg.hidden_size, layers=cfg.num_layers, emb=cfg.emb_size)
    _check_out(out, inp, force)
    start = time.perf_counter()
    with _bar(len(data), progress, "compress") as bar:
        blob = codec.compress(data, settings, prior, threads, progress=bar.update)
    seconds = time.perf_counter() - start
    _write(out, blob)
    return {**report(len(data), len(blob), seconds), "input": str(inp), "output": str(out),
            "segments": len(codec.split(len(data), settings.segments)), "prior": model}


def decompress_file(inp, out, model: str | None = None, force: bool = False, progress: bool = True,
                    ignore_platform: bool = False) -> dict:
    from neurallm.compress import codec

    inp, out = Path(inp), Path(out)
    blob = _read(inp)
    header = codec.read_header(blob, str(inp))  # another format or a damaged header: refused before any work
    prior = load_prior(model)
    _check_out(out, inp, force)
    start = time.perf_counter()
    with _bar(header.length, progress, "decompress") as bar:
        data = codec.decompress(blob, str(inp), prior, progress=bar.update, ignore_platform=ignore_platform)
    seconds = time.perf_counter() - start
    _write(out, data)
    return {**report(len(data), len(blob), seconds), "input": str(inp), "output": str(out)}


def report(original: int, compressed: int, seconds: float) -> dict:
    return {"original_bytes": original, "compressed_bytes": compressed,
            "bits_per_byte": 8 * compressed / original if original else None,
            "ratio": compressed / original if original else None, "seconds": seconds,
            "bytes_per_s": original / seconds if seconds > 0 else None}
