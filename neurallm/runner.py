"""What decoding and scoring ask of a model, whatever runs it.

A recurrent model's interface is its state: (layers, parts, directions, batch, hidden).
Three functions over it are all the engine, ``nlm eval`` and ``nlm score`` need:

- ``read(ids (B, T), state) -> state``: a prompt read through the whole-sequence kernels;
- ``step(ids (B, 1), state) -> logits (B, V) float32, state``: one decoding step;
- ``nll(ids (B, T), targets (B, T), state) -> nll (B, T), state``: scoring.

``EagerRunner`` runs an ``RNNLM`` (fp32 or quantized) in PyTorch; ``export.py`` has the
runners of exported files (onnxruntime, TorchScript, torch.export). Each also says how
many bytes of weights one step reads, for the speed report's bandwidth figure.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_hash(model: nn.Module) -> str:
    """sha256 over the weights' names, shapes and bytes: which model a state belongs to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def step_bytes(model: nn.Module, batch: int) -> int:
    """Bytes of weights one decoding step of ``batch`` tokens reads: every tensor whole (as stored:
    int8, int4, bf16 or fp32), except an embedding table not shared with the output layer, of
    which only ``batch`` rows."""
    from neurallm.checkpoint import tied

    seen, rest, table = set(), 0, 0
    for name, tensor in model.state_dict().items():
        if (tensor.data_ptr(), tensor.numel()) in seen:
            continue
        seen.add((tensor.data_ptr(), tensor.numel()))
        size = tensor.numel() * tensor.element_size()
        if name.startswith("embedding.") and not tied(model):
            table += size
        else:
            rest += size
    rows = model.cfg.vocab_size
    return rest + table * min(batch, rows) // rows


class EagerRunner:
    """An ``RNNLM`` in PyTorch. Single steps on the CPU take the written-out cells (stack.py) and an
    output layer kept transposed: one row times a (features, vocab) matrix runs a matrix-vector
    kernel ~3x faster here than ``F.linear``'s (vocab, features) layout."""

    kind = "eager"

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(iter(model.state_dict().values())).device  # (a bf16 model has buffers only)
        self.vocab_size = model.cfg.vocab_size
        self._hash: str | None = None
        self._output: tuple | None = None

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = weights_hash(self.model)
        return self._hash

    def init_state(self, batch: int) -> torch.Tensor:
        return self.model.init_state(batch, self.device)

    def step_bytes(self, batch: int) -> int:
        return step_bytes(self.model, batch)

    @torch.no_grad()
    def read(self, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device), state)[1]

    @torch.no_grad()
    def step(self, ids: torch.Tensor, state: torch.Tensor):
        features, state = self.model(ids.to(self.device), state)
        return self.logits(features[:, 0]), state

    @torch.no_grad()
    def nll(self, ids: torch.Tensor, targets: torch.Tensor, state):
        features, state = self.model(ids.to(self.device), state)
        return self.model.loss(features, targets.to(self.device), reduction="none").float(), state

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features (n, F) -> (n, vocab) float32 logits (an adaptive softmax gives log-probabilities)."""
        decoder = self.model.decoder
        if isinstance(decoder, nn.AdaptiveLogSoftmaxWithLoss):
            return self.model.log_probs(features).float()
        if type(decoder) is not nn.Linear:  # a quantized output layer: its own kernel
            return decoder(features).float()
        if self._output is None:
            # A copy made once: make a new runner for weights changed later.
            self._output = (decoder.weight.detach().t().contiguous(), decoder.bias.detach())
        weight_t, bias = self._output
        return torch.addmm(bias, features.to(weight_t.dtype), weight_t).float()


def as_runner(model):
    """A runner as it is, or an ``RNNLM`` wrapped in one."""
    return model if hasattr(model, "step") and hasattr(model, "nll") else EagerRunner(model)
