"""Typed, frozen configuration: a recipe file plus dotted overrides.

A recipe is a TOML file with the sections [data], [model], [train], [chat] and [task]; every key
maps to a field of the dataclass below, which owns its default and checks its
value in ``__post_init__``. ``--model.hidden_size=650`` overrides one field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from neurallm.errors import NlmError

RECIPE_DIR = Path(__file__).parent / "recipes"
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
CONNECTIONS = ("none", "residual", "highway", "dense")


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise NlmError(f"bad value for {key}: {value!r} (expected {expected})")


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "ptb"
    tokenizer: str = "word"  # word | char | byte | bpe
    bpe_vocab_size: int = 8000
    # Word vocabulary: the max_vocab most frequent words seen at least min_freq times in the
    # training split; every other word is <unk> in training too, so <unk> gets a real probability.
    max_vocab: int = 0  # 0: no cap
    min_freq: int = 1
    # The text read backwards, character by character: a backward language model, such as the one
    # whose states feed a tagger with contextual character features (task.lm_features, Akbik et al. 2018).
    reverse: bool = False

    def __post_init__(self):
        _check(self.tokenizer in ("word", "char", "byte", "bpe"), "data.tokenizer", self.tokenizer,
               "word, char, byte or bpe")
        _check(self.bpe_vocab_size >= 260, "data.bpe_vocab_size", self.bpe_vocab_size, "an integer >= 260")
        _check(self.max_vocab == 0 or self.max_vocab >= 3, "data.max_vocab", self.max_vocab,
               "0 (no cap) or an integer >= 3: <eos>, <unk> and a word")
        _check(self.min_freq >= 1, "data.min_freq", self.min_freq, "an integer >= 1")
        _check(not self.reverse or self.tokenizer == "char", "data.reverse", self.reverse,
               "false unless data.tokenizer is char (a backward character model)")
        _check(self.tokenizer == "word" or (self.max_vocab == 0 and self.min_freq == 1), "data.max_vocab/min_freq",
               (self.max_vocab, self.min_freq), "the defaults (0, 1) unless data.tokenizer is word")


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"
    vocab_size: int = 0  # filled in from the tokenizer when training starts
    emb_size: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    bidirectional: bool = False
    connection: str = "none"  # between layers: none | residual | highway | dense
    tie_weights: bool = False  # Press & Wolf 2017; Inan et al. 2017
    softmax: str = "full"  # full | adaptive (Grave et al. 2017)
    adaptive_cutoffs: tuple[int, ...] = (2000, 10000)
    adaptive_div_value: float = 4.0
    dropout: float = 0.2  # on the last layer's output
    dropout_emb: float = 0.0  # drops whole words from the embedding (AWD-LSTM)
    dropout_input: float = 0.0  # on the embedding output
    dropout_hidden: float = 0.0  # between layers
    locked_dropout: bool = False  # one mask per sequence (variational, Gal & Ghahramani 2016)
    weight_drop: float = 0.0  # DropConnect on recurrent weights (Merity et al. 2017)

    def __post_init__(self):
        _check(self.cell in CELLS, "model.cell", self.cell, "one of " + ", ".join(CELLS))
        _check(self.connection in CONNECTIONS, "model.connection", self.connection, "one of " + ", ".join(CONNECTIONS))
        _check(self.softmax in ("full", "adaptive"), "model.softmax", self.softmax, "full or adaptive")
        for key in ("emb_size", "hidden_size", "num_layers"):
            _check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        for key in ("dropout", "dropout_emb", "dropout_input", "dropout_hidden", "weight_drop"):
            value = getattr(self, key)
            _check(0.0 <= value < 1.0, f"model.{key}", value, "a probability in [0, 1)")
        cutoffs = list(self.adaptive_cutoffs)
        _check(self.adaptive_div_value > 0, "model.adaptive_div_value", self.adaptive_div_value, "a positive number")
        _check(cutoffs == sorted(set(cutoffs)) and all(c > 0 for c in cutoffs), "model.adaptive_cutoffs",
               self.adaptive_cutoffs, "increasing positive integers")
        _check(self.tie_weights is False or self.softmax == "full", "model.tie_weights", self.tie_weights,
               "false with an adaptive softmax")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 20
    bptt: int = 35
    epochs: int = 6
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 20.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip: float = 0.25  # gradient-norm clipping: the remedy for exploding gradients
    schedule: str = "plateau"  # constant | step | plateau | cosine
    decay_start: int = 4  # step schedule: first epoch (1-based) after which lr decays
    decay_factor: float = 0.25  # lr multiplier for step and plateau schedules
    warmup_steps: int = 0
    eval_batch_size: int = 10
    seed: int = 1111
    log_every: int = 50
    save_every: int = 500  # steps between training-state snapshots (for --resume)
    max_steps: int = 0  # 0: no bound
    max_minutes: float = 0.0  # 0: no bound
    valid_every: int = 0  # steps between validations within an epoch (0: at each epoch's end only)
    # Validate and keep a moving average of the weights rather than the weights themselves (Polyak
    # averaging): after update n, average = d * average + (1 - d) * weights, d = min(ema, (1 + n) / (10 + n)).
    # 0: off.
    ema: float = 0.0
    # A non-finite loss or gradient: stop with an error, or recover: go back to the last snapshot
    # (resume/), multiply the rate by recover_factor and go on, at most recover_tries times.
    on_divergence: str = "stop"  # stop | recover
    recover_tries: int = 3
    recover_factor: float = 0.5
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16

    def __post_init__(self):
        _check(self.optimizer in ("sgd", "adam", "adamw"), "train.optimizer", self.optimizer, "sgd, adam or adamw")
        _check(self.schedule in ("constant", "step", "plateau", "cosine"), "train.schedule", self.schedule,
               "constant, step, plateau or cosine")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", self.device, "auto, cpu or cuda")
        _check(self.precision in ("fp32", "bf16", "auto"), "train.precision", self.precision, "auto, fp32 or bf16")
        for key in ("batch_size", "bptt", "epochs", "eval_batch_size", "log_every", "save_every"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "an integer >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "a positive number")
        for key in ("clip", "momentum", "weight_decay", "warmup_steps"):
            _check(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "a number >= 0")
        _check(0 < self.decay_factor <= 1, "train.decay_factor", self.decay_factor, "a number in (0, 1]")
        _check(self.max_steps >= 0, "train.max_steps", self.max_steps, "an integer >= 0")
        _check(self.max_minutes >= 0, "train.max_minutes", self.max_minutes, "a number >= 0")
        _check(self.valid_every >= 0, "train.valid_every", self.valid_every, "an integer >= 0")
        _check(0 <= self.ema < 1, "train.ema", self.ema, "a number in [0, 1)")
        _check(self.on_divergence in ("stop", "recover"), "train.on_divergence", self.on_divergence, "stop or recover")
        _check(self.recover_tries >= 1, "train.recover_tries", self.recover_tries, "an integer >= 1")
        _check(0 < self.recover_factor < 1, "train.recover_factor", self.recover_factor, "a number in (0, 1)")


@dataclass(frozen=True)
class ChatConfig:
    """How turns are written into the token stream, for ``nlm chat`` and /v1/chat/completions:
    ``user`` + message + ``turn_end`` for each user turn, then ``assistant``, and the model's
    reply ends where it writes ``turn_end``. The default is plain text, one turn per line."""

    user: str = ""
    assistant: str = ""
    turn_end: str = "\n"

    def __post_init__(self):
        _check(self.turn_end != "", "chat.turn_end", self.turn_end, "a non-empty string: where a reply ends")


TASKS = ("lm", "tag", "classify")
POOLINGS = ("last", "max", "mean", "attention")


@dataclass(frozen=True)
class TaskConfig:
    """What a model is for: a language model (the default), a sequence tagger or a sentence
    classifier, and the settings only taggers and classifiers have. Their encoder is the
    [model] section's stack, bidirectional; model.vocab_size is their word vocabulary."""

    kind: str = "lm"  # lm | tag | classify
    # Tagging: the label column, "upos" or "xpos" in CoNLL-U, a 0-based index (or -1, the last) in CoNLL columns.
    column: str = ""  # "": upos for CoNLL-U, the last column otherwise
    scheme: str = "none"  # span labels are trained as bio or bioes (files are read in IOB2); none: POS tags
    decoder: str = "softmax"  # softmax | crf (a linear chain over the labels, Lample et al. 2016)
    char: str = "cnn"  # character features of each word: none | cnn (Ma & Hovy 2016) | lstm (Lample et al. 2016)
    char_emb_size: int = 30
    char_size: int = 50  # CNN filters, or LSTM units per direction
    lowercase: bool = False  # the word table looks up lower-cased forms (character features keep the case)
    unk_replace: float = 0.0  # training replaces a word seen once by <unk> with this probability (Lample et al.)
    pooling: str = "max"  # classification: last | max | mean | attention
    # Transfer from an `nlm train` language model (Howard & Ruder 2018): its embedding and layers start
    # the encoder's forward direction; each lower layer group trains at lr / discriminative; with
    # unfreeze_steps > 0 the groups join training one at a time, top first, that many steps apart.
    init_from: str = ""
    # Tagging: contextual features from character language models trained with `nlm train`, given as
    # "FORWARD,BACKWARD" checkpoints (the backward one trained with data.reverse = true); kept frozen.
    lm_features: str = ""
    discriminative: float = 2.6
    unfreeze_steps: int = 0

    def __post_init__(self):
        _check(self.kind in TASKS, "task.kind", self.kind, "one of " + ", ".join(TASKS))
        _check(self.scheme in ("none", "bio", "bioes"), "task.scheme", self.scheme, "none, bio or bioes")
        _check(self.decoder in ("softmax", "crf"), "task.decoder", self.decoder, "softmax or crf")
        _check(self.char in ("none", "cnn", "lstm"), "task.char", self.char, "none, cnn or lstm")
        _check(self.pooling in POOLINGS, "task.pooling", self.pooling, "one of " + ", ".join(POOLINGS))
        for key in ("char_emb_size", "char_size"):
            _check(getattr(self, key) >= 1, f"task.{key}", getattr(self, key), "an integer >= 1")
        _check(0.0 <= self.unk_replace < 1.0, "task.unk_replace", self.unk_replace, "a probability in [0, 1)")
        _check(self.discriminative >= 1.0, "task.discriminative", self.discriminative, "a number >= 1")
        _check(self.unfreeze_steps >= 0, "task.unfreeze_steps", self.unfreeze_steps, "an integer >= 0")


@dataclass(frozen=True)
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "chat": ChatConfig, "task": TaskConfig}


def _coerce(section: str, key: str, value, cls):
    """Turn a TOML or command-line value into the field's declared type."""
    kind = typing.get_type_hints(cls)[key]
    name = f"{section}.{key}"
    text = value if isinstance(value, str) else None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in ("true", "1", "yes", "false", "0", "no"):
                return text.lower() in ("true", "1", "yes")
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        # tuple[int, ...]
        if text is not None:
            value = json.loads(text) if text.strip().startswith("[") else [v for v in text.split(",") if v.strip()]
        return tuple(int(v) for v in value)
    except (TypeError, ValueError, json.JSONDecodeError):
        expected = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
            kind, "a list of integers")
        raise NlmError(f"bad value for {name}: {value!r} (expected {expected})") from None


def build(sections: dict, source: str = "recipe") -> Recipe:
    """Make a Recipe from ``{"model": {"hidden_size": 650}, ...}``, naming any unknown key."""
    if not isinstance(sections, dict):
        raise NlmError(f"{source}: expected a table of sections [data], [model], [train], [chat], [task]")
    parts = {}
    for section, values in sections.items():
        if section not in SECTIONS:
            raise NlmError(f"{source}: unknown section [{section}] (expected one of: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise NlmError(f"{source}: [{section}] must be a table of keys, not {values!r}")
        cls = SECTIONS[section]
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise NlmError(f"{source}: unknown key {section}.{key} (known keys: {', '.join(sorted(known))})")
        parts[section] = cls(**{k: _coerce(section, k, v, cls) for k, v in values.items()})
    return Recipe(**parts)


def recipe_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise NlmError(f"recipe file not found: {path}")
        return path
    path = RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        raise NlmError(f"unknown recipe {name!r} (shipped: {', '.join(list_recipes())}; or give a path to a .toml file)")
    return path


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def parse_overrides(args: list[str]) -> dict:
    """``["--model.hidden_size=650", "--train.lr", "1"]`` -> ``{"model": {"hidden_size": "650"}, ...}``."""
    out: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise NlmError(f"unexpected argument {arg!r} (overrides look like --section.key=value)")
        if "=" in arg:
            dotted, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise NlmError(f"override {arg} has no value")
            dotted, value = arg[2:], args[i + 1]
            i += 1
        section, key = dotted.split(".", 1)
        out.setdefault(section, {})[key] = value
        i += 1
    return out


def load_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    path = recipe_path(name)
    try:
        sections = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise NlmError(f"{path}: not a valid TOML recipe: {e}") from None
    for section, values in parse_overrides(overrides or []).items():
        if not isinstance(sections.setdefault(section, {}), dict):
            raise NlmError(f"{path}: [{section}] must be a table of keys")
        sections[section].update(values)
    return build(sections, source=str(path))


def replace(recipe: Recipe, **sections) -> Recipe:
    """``replace(r, model={"vocab_size": 10000})``: a copy with some fields changed."""
    parts = {name: dataclasses.replace(getattr(recipe, name), **values) for name, values in sections.items()}
    return dataclasses.replace(recipe, **parts)
