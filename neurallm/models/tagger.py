"""A sequence tagger: the encoder, a linear layer to label scores, and a softmax per word or a
linear-chain CRF over the sentence (Huang et al. 2015; Lample et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neurallm.config import ModelConfig, TaskConfig
from neurallm.models.crf import CRF, constraints
from neurallm.models.encoder import Encoder
from neurallm.models.lmfeatures import CharLMFeatures


class Tagger(nn.Module):
    def __init__(self, model: ModelConfig, task: TaskConfig, chars: int, labels: list[str],
                 features: list[dict] | None = None):
        super().__init__()
        # Frozen character LMs whose states join each word's input (Akbik et al. 2018), when described.
        self.features = CharLMFeatures(features) if features else None
        self.encoder = Encoder(model, task, chars, self.features.output_size if self.features else 0)
        self.output = nn.Linear(self.encoder.output_size, len(labels))
        self.crf = CRF(len(labels), *constraints(labels, task.scheme)) if task.decoder == "crf" else None

    def emissions(self, batch):  # (batch, time, labels)
        extra = batch.extra.float() if batch.extra is not None else None
        return self.output(self.encoder(batch.words, batch.chars, batch.lengths, extra)).float()

    def loss(self, batch, words=None):
        """Per word of the batch: cross-entropy summed over the words, or the CRF's sentence NLL summed
        over the sentences, divided by ``words`` (default: the batch's own; data-parallel training
        divides by the global batch's share, so the processes' average is the global mean)."""
        scores, mask = self.emissions(batch), batch.mask
        words = mask.sum() if words is None else words
        if self.crf is not None:
            return self.crf.nll(scores, batch.labels, mask).sum() / words
        return F.cross_entropy(scores[mask], batch.labels[mask], reduction="sum") / words

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        """(batch, time) label ids; positions past a sentence's end hold 0."""
        scores = self.emissions(batch)
        best = self.crf.decode(scores, batch.mask) if self.crf is not None else scores.argmax(-1)
        return best.masked_fill(~batch.mask, 0)
