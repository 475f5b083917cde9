"""A sentence classifier: the encoder, its outputs pooled into one vector, a linear layer to classes.

Pooling: ``last`` joins the forward direction's state at the sentence's end and the backward
direction's at its start; ``max`` and ``mean`` run over the words; ``attention`` weights the
words by a learned score (Yang et al. 2016, one query vector).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neurallm.config import ModelConfig, TaskConfig
from neurallm.models.encoder import Encoder


class Classifier(nn.Module):
    def __init__(self, model: ModelConfig, task: TaskConfig, chars: int, classes: int):
        super().__init__()
        self.encoder = Encoder(model, task, chars)
        self.pooling = task.pooling
        width = self.encoder.output_size
        if self.pooling == "attention":
            self.attention = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1, bias=False))
        self.output = nn.Linear(width, classes)

    def pool(self, out, batch):  # (batch, time, width) -> (batch, width)
        mask = batch.mask.unsqueeze(2)  # (batch, time, 1)
        if self.pooling == "max":
            return out.masked_fill(~mask, -torch.inf).amax(dim=1)
        if self.pooling == "mean":
            return (out * mask).sum(1) / batch.lengths.unsqueeze(1).to(out.dtype)
        if self.pooling == "attention":
            scores = self.attention(out).masked_fill(~mask, -torch.inf)  # (batch, time, 1)
            return (torch.softmax(scores, dim=1) * out).sum(1)
        half = out.size(2) // 2
        last = out[torch.arange(out.size(0), device=out.device), batch.lengths - 1, :half]
        return torch.cat([last, out[:, 0, half:]], dim=1)

    def logits(self, batch):  # (batch, classes)
        out = self.encoder(batch.words, batch.chars, batch.lengths)
        return self.output(self.pool(out, batch)).float()

    def loss(self, batch, sentences=None):
        """Cross-entropy summed over the batch, divided by ``sentences`` (default: the batch's own)."""
        total = F.cross_entropy(self.logits(batch), batch.labels, reduction="sum")
        return total / (batch.labels.numel() if sentences is None else sentences)

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        """(batch, classes) probabilities."""
        return torch.softmax(self.logits(batch), dim=-1)
