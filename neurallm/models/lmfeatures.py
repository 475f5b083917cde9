"""Contextual character-LM features of words (Akbik et al. 2018): a forward character language
model reads the sentence, and the top layer's state after each word's last letter describes the
word in its left context; a backward one (trained with data.reverse) reads it from the end, and its
state after the word's first letter describes the right context.

The language models are frozen parts of the tagger: their weights are saved in its checkpoint,
their recipes and alphabets in its tokenizer.json, so the checkpoint stays self-contained.
"""

from __future__ import annotations

import torch
from torch import nn

from neurallm import config
from neurallm.data import tokenizers
from neurallm.errors import NlmError
from neurallm.models.lm import RNNLM


class CharLMFeatures(nn.Module):
    def __init__(self, described: list[dict]):
        """``described``: one ``{"model": ModelConfig fields, "tokenizer": its JSON, "reverse": bool}`` per LM."""
        super().__init__()
        self.described = described
        self.lms = nn.ModuleList(_reader(config.ModelConfig(**_tuples(d["model"]))) for d in described)
        self.tokenizers = [tokenizers.from_json(d["tokenizer"]) for d in described]
        self.reverse = [bool(d["reverse"]) for d in described]
        self.requires_grad_(False)
        self.output_size = sum(lm.stack.output_size if lm.proj is None else lm.cfg.emb_size for lm in self.lms)

    @classmethod
    def load(cls, paths: list[str]) -> "CharLMFeatures":
        from neurallm import checkpoint

        described, weights = [], []
        for path in paths:
            lm, recipe, tokenizer = checkpoint.load_float(path, "task.lm_features")
            if tokenizer.kind != "char":
                raise NlmError(f"task.lm_features {path}: a {tokenizer.kind}-level model; contextual features "
                               "need character language models")
            described.append({"model": recipe.to_dict()["model"], "tokenizer": tokenizer.to_json(),
                              "reverse": recipe.data.reverse})
            weights.append({k: v for k, v in lm.state_dict().items() if not k.startswith("decoder.")})
        features = cls(described)
        for lm, state in zip(features.lms, weights):
            lm.load_state_dict(state)
        return features

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: no dropout, whatever the tagger does

    @torch.no_grad()
    def forward(self, sentences: list[list[str]]) -> list[torch.Tensor]:
        """-> per sentence, (words, features) float16 (kept for a whole data set, they take half the room)."""
        parts = [self._one(lm, tok, rev, sentences) for lm, tok, rev in zip(self.lms, self.tokenizers, self.reverse)]
        return [torch.cat(p, dim=1) for p in zip(*parts)]

    def _one(self, lm, tokenizer, reverse: bool, sentences):
        device = lm.embedding.weight.device
        fallback = tokenizer.index.get(" ", tokenizer.boundary)  # a letter the LM never saw reads as a space
        rows, places = [], []
        for words in sentences:
            text = " ".join(words)
            ends = []  # the position of each word's last letter (forward) or first letter (backward), in reading order
            at = 0
            for w in words:
                ends.append(at + len(w) - 1)
                at += len(w) + 1
            if reverse:
                text = text[::-1]
                ends = [len(text) - 1 - (e - len(w) + 1) for e, w in zip(ends, words)]
            ids = [tokenizer.boundary] + [tokenizer.index.get(c, fallback) for c in text]
            rows.append(ids)
            places.append([e + 1 for e in ends])  # + 1: the boundary read first
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[torch.Tensor | None] = [None] * len(rows)
        for start in range(0, len(order), 32):
            chunk = order[start:start + 32]
            length = max(len(rows[i]) for i in chunk)
            ids = torch.full((len(chunk), length), tokenizer.boundary, dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, :len(rows[i])] = torch.tensor(rows[i])
            states, _ = lm(ids.to(device))  # (rows, letters, features); padding comes after: it changes nothing before
            for r, i in enumerate(chunk):
                results[i] = states[r, places[i]].half().cpu()
        return results


def _reader(cfg: config.ModelConfig) -> RNNLM:
    """The LM without its output layer: the features read its states only (and a tied output layer
    would share the embedding's storage, which one safetensors file cannot hold twice)."""
    lm = RNNLM(cfg)
    lm.decoder = None
    return lm


def _tuples(model: dict) -> dict:
    """JSON gives lists where ModelConfig holds tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
