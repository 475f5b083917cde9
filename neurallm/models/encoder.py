"""The sentence encoder of taggers and classifiers: word embedding, character features of each
word, a bidirectional recurrent stack over the padded sentences of a batch.

A batch holds ``words`` (batch, time) word ids, ``chars`` (batch, time, letters) character ids
and ``lengths`` (batch,); id 0 is padding everywhere, id 1 the unknown word or character.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neurallm.config import ModelConfig, TaskConfig
from neurallm.models.stack import RecurrentStack, dropout, keep_mask

PAD, UNK = 0, 1


class CharCNN(nn.Module):
    """Convolution over a word's characters, max-pooled over its length (Ma & Hovy 2016)."""

    def __init__(self, chars: int, emb_size: int, filters: int, width: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(chars, emb_size, padding_idx=PAD)
        self.conv = nn.Conv1d(emb_size, filters, width, padding=width // 2)
        self.output_size = filters

    def forward(self, chars):  # (words, letters) -> (words, filters)
        x = self.conv(self.embedding(chars).transpose(1, 2))  # (words, filters, letters)
        return x.masked_fill((chars == PAD).unsqueeze(1), -torch.inf).amax(dim=2)


class CharLSTM(nn.Module):
    """A bidirectional LSTM over a word's characters; its two final states (Lample et al. 2016)."""

    def __init__(self, chars: int, emb_size: int, size: int):
        super().__init__()
        self.embedding = nn.Embedding(chars, emb_size, padding_idx=PAD)
        self.stack = RecurrentStack("lstm", emb_size, size, 1, bidirectional=True)
        self.output_size = 2 * size

    def forward(self, chars):  # (words, letters) -> (words, 2 * size)
        lengths = (chars != PAD).sum(1)
        out, _ = self.stack(self.embedding(chars), lengths=lengths)  # (words, letters, 2 * size)
        size = out.size(2) // 2
        # The forward direction after the last letter, the backward one after (reading back to) the first.
        last = out[torch.arange(out.size(0), device=out.device), lengths - 1, :size]
        return torch.cat([last, out[:, 0, size:]], dim=1)


class Encoder(nn.Module):
    def __init__(self, model: ModelConfig, task: TaskConfig, chars: int, extra_size: int = 0):
        super().__init__()
        self.cfg = model
        self.embedding = nn.Embedding(model.vocab_size, model.emb_size, padding_idx=PAD)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if task.char == "cnn":
            self.chars = CharCNN(chars, task.char_emb_size, task.char_size)
        elif task.char == "lstm":
            self.chars = CharLSTM(chars, task.char_emb_size, task.char_size)
        else:
            self.chars = None
        width = model.emb_size + (self.chars.output_size if self.chars else 0) + extra_size
        self.stack = RecurrentStack(model.cell, width, model.hidden_size, model.num_layers, bidirectional=True,
                                    connection=model.connection, dropout_hidden=model.dropout_hidden,
                                    locked_dropout=model.locked_dropout, weight_drop=model.weight_drop)
        self.output_size = self.stack.output_size

    def embed(self, words):
        weight = self.embedding.weight
        if self.training and self.cfg.dropout_emb:
            weight = weight * keep_mask((weight.size(0), 1), self.cfg.dropout_emb, weight)  # whole word types
        return F.embedding(words, weight)

    def features(self, words, chars, extra=None):
        """The input of the stack: (batch, time, width)."""
        parts = [self.embed(words)]
        if self.chars is not None:
            real = words != PAD  # letters of real words only: padding positions stay zero
            out = torch.zeros(*words.shape, self.chars.output_size, device=words.device)
            out[real] = self.chars(chars[real])
            parts.append(out)
        if extra is not None:
            parts.append(extra)
        return torch.cat(parts, dim=2)

    def forward(self, words, chars, lengths, extra=None):
        """-> (batch, time, 2 * hidden); positions past a sentence's length hold no meaning."""
        cfg = self.cfg
        x = dropout(self.features(words, chars, extra), cfg.dropout_input, self.training, cfg.locked_dropout)
        out, _ = self.stack(x, lengths=lengths)
        return dropout(out, cfg.dropout, self.training, cfg.locked_dropout)
