"""Training a language model: the task ``fit.Loop`` runs for ``nlm train``.

Batches are truncated-BPTT windows over parallel columns of the token stream. The hidden
state is carried from one window to the next (detached, so gradients stop at the window
edge), reset at each epoch and saved in resume/ with the rest; validation is the loss in
nats per token on the valid split (perplexity, or bits per character for a char model).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from neurallm import checkpoint, config, fit
from neurallm.data import corpora, tokenizers
from neurallm.data.batching import columns, num_windows, shard, window
from neurallm.errors import NlmError
from neurallm.evaluate import rows_nll, with_boundary
from neurallm.fit import Progress, end_of_epoch_decay, learning_rate, make_optimizer  # noqa: F401 (the loop's API, as before)
from neurallm.models.lm import RNNLM


class Objective(nn.Module):
    """model + loss in one forward, so DistributedDataParallel sees every parameter used."""

    def __init__(self, model: RNNLM):
        super().__init__()
        self.model = model

    def forward(self, x, state, y):
        features, state = self.model(x, state)
        return self.model.loss(features, y), state


def make_tokenizer(recipe: config.Recipe, train_text: str):
    d = recipe.data
    return tokenizers.train(d.tokenizer, train_text, d.bpe_vocab_size, d.max_vocab, d.min_freq)


def prepare_data(recipe: config.Recipe, tokenizer=None):
    """Train the tokenizer on the training split (unless given) and encode train and valid."""
    name = recipe.data.corpus
    train_text = corpora.text_of(recipe.data, "train")
    if tokenizer is None:
        tokenizer = make_tokenizer(recipe, train_text)
    train_ids = with_boundary(tokenizer, tokenizer.encode(train_text, source=f"{name}/train"))
    valid_ids = with_boundary(tokenizer, tokenizer.encode(corpora.text_of(recipe.data, "valid"), source=f"{name}/valid"))
    return tokenizer, train_ids, valid_ids


class LanguageModelling(fit.Task):
    resume_keys = (("train", "batch_size"), ("train", "bptt"), ("train", "optimizer"))

    def __init__(self, recipe: config.Recipe):
        self.recipe = recipe
        self.hidden = None  # the state carried from one window to the next

    def setup(self, loop: fit.Loop, resume: bool) -> None:
        self.loop = loop
        recipe, world = self.recipe, loop.world
        tokenizer = None
        if resume:
            tokenizer = tokenizers.from_json(checkpoint.read_json(loop.out / "tokenizer.json"))
        elif world > 1:
            tokenizer = self._shared_tokenizer(recipe)
        self.tokenizer, train_ids, valid_ids = prepare_data(recipe, tokenizer)
        self.recipe = config.replace(recipe, model={"vocab_size": self.tokenizer.vocab_size})
        cfg = self.recipe.train
        if cfg.batch_size % world:
            raise NlmError(f"train.batch_size {cfg.batch_size} is not divisible by {world} processes")
        # A split too short for its batch size is found now, not after an epoch of training.
        train_rows = _rows(train_ids, cfg.batch_size, f"{recipe.data.corpus}/train", "train.batch_size")
        valid_rows = _rows(valid_ids, cfg.eval_batch_size, f"{recipe.data.corpus}/valid", "train.eval_batch_size")
        self.train_data = shard(train_rows, loop.rank, world).to(loop.device)
        self.valid_rows = valid_rows[loop.rank::world]  # each process validates its share of the rows
        self.batches = num_windows(self.train_data, cfg.bptt)
        self.model = RNNLM(self.recipe.model).to(loop.device)
        self.objective = Objective(self.model)

    def _shared_tokenizer(self, recipe: config.Recipe):
        """Rank 0 trains the tokenizer and sends it to the others: one vocabulary, built once."""
        made = []
        self.loop.on_rank0(lambda: made.append(make_tokenizer(recipe, corpora.text_of(recipe.data, "train"))))
        box = [made[0].to_json() if made else None]
        dist.broadcast_object_list(box, 0)
        return tokenizers.from_json(box[0])

    def describe(self, out: Path) -> None:
        checkpoint.save_description(out, self.recipe, self.tokenizer)

    def loss(self, objective, index: int):
        x, y = window(self.train_data, index, self.recipe.train.bptt)
        if self.hidden is None:
            self.hidden = self.model.init_state(x.size(0))
        loss, hidden = objective(x, self.hidden.detach(), y)
        self.hidden = hidden.detach().float()
        return loss, y.numel()

    def new_epoch(self) -> None:
        self.hidden = None  # each epoch starts from a zero state

    def validate(self) -> tuple[float, dict]:
        nll_sum, tokens = 0.0, 0  # a process with no validation rows adds nothing
        if self.valid_rows.size(0):
            nll = rows_nll(self.model, self.valid_rows, self.recipe.train.bptt)
            nll_sum, tokens = nll.double().sum().item(), nll.numel()
        total = torch.tensor([nll_sum, tokens], dtype=torch.float64, device=self.loop.device)
        if self.loop.world > 1:
            dist.all_reduce(total)  # every process then holds the same figure, bit for bit
        loss = (total[0] / total[1]).item()
        record = {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 700))}
        if self.tokenizer.symbol_level:
            record["valid_bpc"] = loss / math.log(2)
        return loss, record

    def save(self, out: Path, record: dict) -> None:
        checkpoint.save(out, self.model, self.recipe, self.tokenizer, extra=record)

    def carry(self) -> dict:
        hidden = self.hidden if self.hidden is not None else self.model.init_state(self.train_data.size(0))
        return {"hidden": torch.cat(self.loop.gathered(hidden.contiguous()), dim=3).cpu()}

    def restore(self, tensors: dict, progress: Progress) -> None:
        per, rank = self.train_data.size(0), self.loop.rank
        expected = self.model.init_state(per * self.loop.world).shape
        if tensors["hidden"].shape != expected:
            raise ValueError(f"hidden state of shape {tuple(tensors['hidden'].shape)}, expected {tuple(expected)}")
        hidden = tensors["hidden"][:, :, :, rank * per:(rank + 1) * per]
        self.hidden = hidden.to(self.loop.device) if progress.window > 0 else None

    def summary(self, progress: Progress) -> dict:
        loss = progress.valid_loss
        out = {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 700)), "best_valid_loss": progress.best_valid}
        if self.tokenizer.symbol_level:
            out["valid_bpc"] = loss / math.log(2)
        return out


class Trainer(fit.Loop):
    """The loop with a language model: ``Trainer(recipe, out)``."""

    def __init__(self, recipe: config.Recipe, out: Path, resume: bool = False, show_progress: bool = True):
        super().__init__(LanguageModelling(recipe), out, resume=resume, show_progress=show_progress)

    @property
    def tokenizer(self):
        return self.task.tokenizer


def _rows(ids: torch.Tensor, rows: int, split: str, key: str) -> torch.Tensor:
    try:
        return columns(ids, rows)
    except NlmError as e:
        raise NlmError(f"{split}: {e}; lower {key}") from None


def train(recipe: config.Recipe, out, resume: bool = False, show_progress: bool = True) -> dict:
    trainer = Trainer(recipe, Path(out), resume=resume, show_progress=show_progress)
    try:
        return trainer.fit()
    finally:
        trainer.close()
