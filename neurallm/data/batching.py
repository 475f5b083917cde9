"""Token streams cut into parallel columns and truncated-BPTT windows.

A stream of N ids becomes a (batch, N // batch) matrix: each row is a contiguous slice
of the text, so a hidden state carried from one window to the next continues the same
text (pytorch/examples word_language_model lays it out the same way, seq-first).
"""

from __future__ import annotations

import torch

from neurallm.errors import NlmError


def columns(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) -> (batch, N // batch); the tail that does not fill a row is dropped."""
    if batch_size < 1:
        raise NlmError(f"batch size {batch_size}: expected an integer >= 1")
    length = ids.numel() // batch_size
    if length < 2:
        raise NlmError(f"{ids.numel()} tokens cannot fill {batch_size} rows of at least 2 tokens "
                       "(a smaller batch size, or more text)")
    return ids[: length * batch_size].view(batch_size, length)


def shard(data: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of a (batch, length) matrix that one of ``world`` data-parallel processes trains on."""
    if data.size(0) % world:
        raise ValueError(f"batch size {data.size(0)} is not divisible by {world} processes")
    per = data.size(0) // world
    return data[rank * per:(rank + 1) * per]


def num_windows(data: torch.Tensor, bptt: int) -> int:
    return (data.size(1) - 1 + bptt - 1) // bptt


def window(data: torch.Tensor, index: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window ``index``: inputs (batch, T) and next-token targets (batch, T), T <= bptt."""
    start = index * bptt
    end = min(start + bptt, data.size(1) - 1)
    return data[:, start:end], data[:, start + 1:end + 1]
