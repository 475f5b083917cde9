"""State files: what a model has read, saved to continue later (safetensors, never a pickle).

A file holds the recurrent state (layers, parts, dirs, 1, hidden), the ids of the text
behind it and, as metadata, the pending last token, the token count, a hash of the
weights and one of the tokenizer it belongs to, and a checksum of its own contents, so a
state loaded into another model, or a file cut short or altered, is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from neurallm.checkpoint import atomic_write
from neurallm.engine import Context
from neurallm.errors import NlmError

FORMAT = "neurallm-state/1"


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(json.dumps(tokenizer.to_json(), sort_keys=True).encode()).hexdigest()


def _checksum(state: torch.Tensor, tokens: torch.Tensor, meta: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(meta):
        if key != "checksum":
            digest.update(f"{key}={meta[key]};".encode())
    for t in (state, tokens):
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(path, context: Context, tokens: list[int], model_hash: str, tok_hash: str, cell: str) -> Path:
    """Write ``context`` (and the ``tokens`` behind it, the pending one last) to ``path``, atomically."""
    path = Path(path)
    if len(tokens) != context.length or (tokens and tokens[-1] != context.pending):
        raise ValueError("the tokens behind a state end with its pending token, one per token read")
    state = context.state.detach().float().cpu().contiguous()
    ids = torch.tensor(tokens, dtype=torch.int64)
    meta = {"format": FORMAT, "model_sha256": model_hash, "tokenizer_sha256": tok_hash, "cell": cell,
            "pending": str(context.pending), "length": str(context.length)}
    meta["checksum"] = _checksum(state, ids, meta)
    if path.parent and not path.parent.exists():
        raise NlmError(f"{path}: the folder {path.parent} does not exist")
    atomic_write(path, lambda p: save_file({"state": state, "tokens": ids}, str(p), metadata=meta))
    return path


def load(path, model_hash: str, tok_hash: str, like: torch.Tensor, vocab_size: int) -> tuple[Context, list[int]]:
    """-> (context, tokens behind it), checked against the model that will continue it.
    ``like``: a state of that model ((layers, parts, dirs, batch, hidden)), for shape and device."""
    path = Path(path)
    if not path.is_file():
        raise NlmError(f"{path}: no such state file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise NlmError(f"{path}: not a readable state file ({e})") from None
    keys = ("model_sha256", "tokenizer_sha256", "pending", "length", "checksum")
    if meta.get("format") != FORMAT or set(tensors) != {"state", "tokens"} or not all(k in meta for k in keys):
        raise NlmError(f"{path}: not a neurallm state file (expected format {FORMAT})")
    state, ids = tensors["state"], tensors["tokens"]
    if meta["checksum"] != _checksum(state, ids, meta):
        raise NlmError(f"{path}: the file was altered or damaged (its checksum does not match its contents)")
    if meta["model_sha256"] != model_hash:
        raise NlmError(f"{path}: this state belongs to another model (weights sha256 {meta['model_sha256'][:12]}…, "
                       f"this checkpoint's are {model_hash[:12]}…)")
    if meta["tokenizer_sha256"] != tok_hash:
        raise NlmError(f"{path}: this state was made with another tokenizer")
    expected = (*like.shape[:3], 1, like.shape[4])
    if tuple(state.shape) != expected:
        raise NlmError(f"{path}: state of shape {tuple(state.shape)}, the model's is {expected}")
    # The checksum tells damage, not intent: a file edited on purpose is checked for sense too.
    tokens = ids.tolist() if ids.dim() == 1 and ids.dtype == torch.int64 else None
    pending, length = meta["pending"], meta["length"]
    if (tokens is None or not pending.isdigit() or not length.isdigit() or int(length) != len(tokens)
            or not tokens or tokens[-1] != int(pending) or not all(0 <= t < vocab_size for t in tokens)
            or state.dtype != torch.float32 or not torch.isfinite(state).all()):
        raise NlmError(f"{path}: the state file does not hold together (its tokens, count or pending token "
                       f"disagree, or fall outside the model's {vocab_size}-token vocabulary)")
    return Context(state.to(like.device, like.dtype), int(pending), int(length)), tokens
