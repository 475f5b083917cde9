"""The part of the tagging and classification tasks they share: data to examples, batches by
epoch, checkpoints (model.safetensors + config.json + tokenizer.json, which holds the word,
character and label lists), and transfer from a language model (Howard & Ruder 2018).

A subclass says how a split is read (``read``), which model it builds (``make_model``) and how
its predictions are scored (``metrics``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from neurallm import checkpoint, config, fit
from neurallm.data import corpora
from neurallm.errors import NlmError
from neurallm.tasks.sentences import (Vocab, buckets, collate, encode, examples_for, num_batches, singletons,
                                      with_features)


class Objective(nn.Module):
    """The model's loss as its forward, so DistributedDataParallel sees every parameter used."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, per=None):
        return self.model.loss(batch, per)


SUFFIXES = (".conllu", ".txt", ".tsv")


def split_file(name: str, split: str) -> Path:
    """A registered data set's split, or in a folder of one's own ``SPLIT.conllu``, ``.txt`` (CoNLL
    columns, or SST trees) or ``.tsv`` (text, tab, label); dev and valid name the same split."""
    split = "valid" if split == "dev" else split
    if name not in corpora.REGISTRY and Path(name).is_dir():
        names = [split, "dev"] if split == "valid" else [split]
        for found in (Path(name) / f"{n}{suffix}" for n in names for suffix in SUFFIXES):
            if found.is_file():
                return found
        raise NlmError(f"{name}: no {split} split (expected {split}.conllu, {split}.txt or {split}.tsv)")
    return corpora.split_path(name, split)


class SentenceTask(fit.Task):
    kind = ""  # "tag" or "classify"
    resume_keys = (("train", "batch_size"), ("train", "optimizer"), ("train", "seed")) + tuple(
        ("task", k) for k in ("kind", "column", "scheme", "decoder", "char", "char_emb_size", "char_size",
                              "lowercase", "pooling", "init_from", "lm_features"))

    def __init__(self, recipe: config.Recipe):
        if recipe.task.kind != self.kind:
            raise NlmError(f"recipe: task.kind is {recipe.task.kind!r}; this verb trains task.kind = {self.kind!r}")
        self.recipe = recipe
        self.order: tuple[int, list[list[int]]] | None = None  # (epoch, its batches)
        self.valid_examples = None

    # ---- what a subclass says -------------------------------------------------------------
    def read(self, path: Path):
        """-> (word lists, labels: a list per sentence or one per sentence, the line each sentence starts on)."""
        raise NotImplementedError

    def label_set(self, labels) -> list[str]:
        raise NotImplementedError

    def encode_labels(self, vocab: Vocab, labels, path: Path, lines):
        raise NotImplementedError

    def make_model(self, vocab: Vocab) -> nn.Module:
        raise NotImplementedError

    def metrics(self, model, vocab: Vocab, words, labels, path, lines, examples=None) -> dict:
        raise NotImplementedError

    def figure(self, metrics: dict) -> float:
        """Lower is better: the error rate."""
        return 1.0 - metrics["accuracy"]

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self, loop: fit.Loop, resume: bool) -> None:
        self.loop = loop
        recipe = self.recipe
        name = recipe.data.corpus
        train_path, valid_path = split_file(name, "train"), split_file(name, "valid")
        words, labels, lines = self.read(train_path)
        self.valid = (valid_path, *self.read(valid_path))
        if resume:
            self.vocab = Vocab.load(loop.out / "tokenizer.json")
        else:
            # The label inventory is that of train and dev (a label dev holds and train lacks is still a label).
            self.vocab = Vocab.build(words, self.label_set(labels + self.valid[2]), recipe.data.max_vocab,
                                     recipe.data.min_freq, recipe.task.lowercase)
        features = None
        if recipe.task.lm_features and not resume:
            if self.kind != "tag":
                raise NlmError("task.lm_features: contextual character-LM features feed taggers only")
            from neurallm.models.lmfeatures import CharLMFeatures

            features = CharLMFeatures.load([p.strip() for p in recipe.task.lm_features.split(",") if p.strip()])
            self.vocab.features = features.described
        lm = None
        if recipe.task.init_from and resume:  # the run's own encoder shape; the LM's weights are long trained on
            saved = checkpoint.read_json(loop.out / "config.json")["model"]
            recipe = config.replace(recipe, model={k: saved[k] for k in LM_KEYS})
        elif recipe.task.init_from:
            lm = transfer_recipe(recipe)
            recipe = lm[1]
        self.recipe = config.replace(recipe, model={"vocab_size": len(self.vocab.words)})
        ids = self.encode_labels(self.vocab, labels, train_path, lines)
        self.examples = [encode(self.vocab, w, y) for w, y in zip(words, ids)]
        self.rare = singletons(self.examples)
        self.model = self.make_model(self.vocab).to(loop.device)
        if features is not None:
            self.model.features.load_state_dict(features.state_dict())
        self.words = words  # for the character-LM features, computed once at the first step (the LMs are
        # frozen; a resumed run has its weights only then)
        if lm is not None:
            self.transferred = copy_language_model(lm[0], self.model.encoder, self.vocab)
        self.objective = Objective(self.model)
        cfg = self.recipe.train
        self.batches = num_batches(len(self.examples), cfg.batch_size)

    def describe(self, out: Path) -> None:
        checkpoint.save_description(out, self.recipe, self.vocab)

    def save(self, out: Path, record: dict) -> None:
        checkpoint.save(out, self.model, self.recipe, self.vocab, extra=record)

    # ---- training ---------------------------------------------------------------------------
    def _batches(self) -> list[list[int]]:
        """This epoch's batches: the same for a given seed and epoch, so a resumed run goes on exactly."""
        epoch = self.loop.progress.epoch
        if self.order is None or self.order[0] != epoch:
            generator = torch.Generator().manual_seed(self.recipe.train.seed * 1000 + epoch)
            lengths = [len(e.words) for e in self.examples]
            self.order = (epoch, buckets(lengths, self.recipe.train.batch_size, generator))
        return self.order[1]

    def loss(self, objective, index: int):
        if self.words is not None:
            with_features(self.model, self.examples, self.words)
            self.words = None
        rows, world = self._batches()[index], self.loop.world
        # Each process its share of the batch, its loss summed and divided by the global batch's size over
        # the processes: DDP's average of their gradients is then the global batch's mean. A process left
        # without a sentence (a last batch smaller than the processes) runs one at weight 0: each must step.
        share, weight = rows[self.loop.rank::world], 1.0
        if not share:
            share, weight = rows[:1], 0.0
        units = self.units([self.examples[i] for i in rows])
        batch = collate([self.examples[i] for i in share], self.loop.device, (self.rare, self.recipe.task.unk_replace))
        return objective(batch, units / world) * weight, sum(len(self.examples[i].words) for i in rows)

    def units(self, examples) -> int:
        """What a batch's loss is the mean over: its words (a classifier: its sentences)."""
        return sum(len(e.words) for e in examples)

    def global_tokens(self, tokens: int, world: int) -> int:
        return tokens  # loss() counts the whole batch's words

    def validate(self) -> tuple[float, dict]:
        path, words, labels, lines = self.valid
        if self.valid_examples is None:  # encoded once (character-LM features included: the LMs are frozen)
            self.valid_examples = examples_for(self.model, self.vocab, words)
        found = self.metrics(self.model, self.vocab, words, labels, path, lines, self.valid_examples)
        record = {f"valid_{k}": v for k, v in found.items() if isinstance(v, (int, float))}
        figure = torch.tensor([self.figure(found)], dtype=torch.float64, device=self.loop.device)
        if self.loop.world > 1:  # every process scored the same weights; rank 0's figure decides for all
            torch.distributed.broadcast(figure, 0)
        return figure.item(), record

    def figure_text(self, record: dict) -> str:
        shown = [f"{k[6:]} {100 * record[k]:.2f}" for k in ("valid_accuracy", "valid_f1") if k in record]
        return "dev " + ", ".join(shown)

    def summary(self, progress: fit.Progress) -> dict:
        out = {"valid_error": progress.valid_loss, "best_valid_error": progress.best_valid}
        if getattr(self, "transferred", None):
            out["init_from"] = {"checkpoint": self.recipe.task.init_from, **self.transferred}
        return out

    # ---- transfer: rates per layer group ------------------------------------------------------
    def groups(self) -> list[list[nn.Parameter]]:
        """One group, or with a language model to start from, the groups its parts went to, from the
        bottom: the word table, each layer's forward direction, then all that starts fresh (the head,
        character features, the backward direction), which trains at the full rate from the start."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # frozen LM features: none
        if not self.recipe.task.init_from:
            return [trainable]
        encoder = self.model.encoder
        layers = [[p for n, p in layer.rnn.named_parameters() if not n.endswith("_reverse")]
                  for layer in encoder.stack.layers]
        copied = {id(p) for p in [encoder.embedding.weight, *(p for g in layers for p in g)]}
        return [[encoder.embedding.weight], *layers, [p for p in trainable if id(p) not in copied]]

    def param_groups(self) -> list[dict]:
        return [{"params": g} for g in self.groups()]

    def lr_factors(self, step: int) -> list[float] | None:
        task = self.recipe.task
        if not task.init_from:
            return None
        count = self.recipe.model.num_layers + 2  # as groups() makes them: the word table, each layer, the rest
        factors = []
        for g in range(count):
            depth = count - 1 - g  # 0 for the head
            frozen = task.unfreeze_steps and step < depth * task.unfreeze_steps
            factors.append(0.0 if frozen else task.discriminative ** -depth)
        return factors


# ---- language-model transfer -----------------------------------------------------------------

LM_KEYS = ("cell", "emb_size", "hidden_size", "num_layers", "connection")


def transfer_recipe(recipe: config.Recipe):
    """The language model named by task.init_from, and the recipe with its encoder shape."""
    source = recipe.task.init_from
    lm, lm_recipe, tokenizer = checkpoint.load_float(source, "task.init_from")
    if tokenizer.kind != "word":
        raise NlmError(f"task.init_from {source}: a {tokenizer.kind}-level language model; "
                       "the encoder's word table needs a word-level one")
    if lm_recipe.model.connection != "none":
        # The encoder's layers read other widths (both directions below, character features), so the LM's
        # residual or highway joins would not join the same things: its forward pass could not be reproduced.
        raise NlmError(f"task.init_from {source}: a stack with {lm_recipe.model.connection} connections; "
                       "transfer needs plain stacked layers (model.connection = none)")
    shape = {k: getattr(lm_recipe.model, k) for k in LM_KEYS}
    return (lm, tokenizer), config.replace(recipe, model=shape)


@torch.no_grad()
def copy_language_model(lm_and_tokenizer, encoder, vocab: Vocab) -> dict:
    """Start the encoder's word table and forward direction from a language model. A task word
    takes the LM's vector for the same word, else for its lower-cased form; the rest keep their
    random start. Each forward layer takes the LM layer's weights; the inputs the LM had no
    counterpart for (character features, the backward direction below) start at zero, so the
    forward direction computes what the LM computed."""
    lm, tokenizer = lm_and_tokenizer
    found = 0
    table = encoder.embedding.weight
    for i, word in enumerate(vocab.words[2:], start=2):
        j = tokenizer.index.get(word, tokenizer.index.get(word.lower()))
        if j is not None:
            table[i] = lm.embedding.weight[j]
            found += 1
    for mine, theirs in zip(encoder.stack.layers, lm.stack.layers):
        for name, value in theirs.rnn.named_parameters():  # weight_ih_l0, weight_hh_l0, bias_*_l0
            target = getattr(mine.rnn, name)
            if name.startswith("weight_ih"):
                target.zero_()
                target[:, :value.size(1)] = value
            else:
                target.copy_(value)
    return {"words_found": found, "words": len(vocab.words) - 2}


# ---- loading a trained tagger or classifier ---------------------------------------------------

def load(directory, make_model, kind: str, device: str = "cpu"):
    """-> (model in eval mode, recipe, vocab) of a task checkpoint of ``kind`` (tag or classify)."""
    directory, data = checkpoint.describe(directory)
    sections = {k: v for k, v in data.items() if k != "info"}
    recipe = config.build(sections, source=str(directory / "config.json"))
    if recipe.task.kind != kind:
        what = {"lm": "a language model", "tag": "a tagger", "classify": "a classifier"}[recipe.task.kind]
        raise NlmError(f"{directory}: is {what} (task.kind = {recipe.task.kind!r}), not a "
                       f"{'tagger' if kind == 'tag' else 'classifier'}")
    vocab = Vocab.load(directory / "tokenizer.json")
    model = make_model(recipe, vocab)
    path = directory / "model.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise NlmError(f"{path}: unreadable ({e})") from None
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise NlmError(f"{path}: tensors do not match config.json and tokenizer.json")
    model.load_state_dict(state)
    return model.to(device).eval(), recipe, vocab
