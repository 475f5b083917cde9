"""What the probes share: cell names, models at initialisation or from a checkpoint, text as
ids, the output folder, JSON and plots."""

from __future__ import annotations

import datetime
import json
import math
import sys
from pathlib import Path

import torch

from neurallm import checkpoint, config
from neurallm.errors import NlmError

# What a user types -> the cell's name in a recipe (model.cell).
CELLS = {"rnn": "rnn_tanh", "rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu", "lstm": "lstm", "gru": "gru"}
# ... and back, for tables and legends.
SHORT = {"rnn_tanh": "rnn", "rnn_relu": "rnn_relu", "lstm": "lstm", "gru": "gru"}


def cell_name(text: str, what: str = "--cell") -> str:
    name = text.strip().lower()
    if name not in CELLS:
        raise NlmError(f"{what}: unknown cell {text!r} (expected one of: {', '.join(CELLS)})")
    return CELLS[name]


def cell_list(text: str, what: str = "--cells") -> list[str]:
    cells = [cell_name(part, what) for part in text.split(",") if part.strip()]
    if not cells:
        raise NlmError(f"{what}: no cell named")
    if len(set(cells)) != len(cells):
        raise NlmError(f"{what}: {text!r} names a cell twice")
    return cells


def int_list(text: str, what: str, minimum: int = 1) -> list[int]:
    """'5,10,20' -> [5, 10, 20], increasing, each >= minimum."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NlmError(f"{what}: {text!r} (expected integers separated by commas)") from None
    if not values or any(v < minimum for v in values) or values != sorted(set(values)):
        raise NlmError(f"{what}: {text!r} (expected increasing integers >= {minimum})")
    return values


def name_list(text: str, what: str, known: tuple[str, ...]) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise NlmError(f"{what}: {text!r} (expected names from: {', '.join(known)})")
    return names


def load_lm(path) -> tuple[torch.nn.Module, config.Recipe, object]:
    """A language model checkpoint in float precision, in eval mode -> (model, recipe, tokenizer).
    Taggers, classifiers, exports and quantized models are refused with the reason."""
    model, recipe, tokenizer = checkpoint.load_float(path, "the checkpoint")
    return model.float().eval(), recipe, tokenizer


def fresh_lm(recipe: config.Recipe, seed: int) -> torch.nn.Module:
    """The recipe's model with freshly initialised weights (torch's defaults, as training starts)."""
    from neurallm.models.lm import RNNLM

    torch.manual_seed(seed)
    return RNNLM(recipe.model).eval()


def model_recipe(corpus: str, cell: str, layers: int, hidden: int, emb: int, connection: str = "none",
                 tokenizer: str | None = None) -> config.Recipe:
    """A language model recipe for a probe that builds its own model (--cell ...)."""
    kind = tokenizer or default_tokenizer(corpus)
    return config.build({"data": {"corpus": corpus, "tokenizer": kind},
                         "model": {"cell": cell, "num_layers": layers, "hidden_size": hidden, "emb_size": emb,
                                   "connection": connection, "dropout": 0.0}}, source="the probe's model")


def default_tokenizer(corpus: str) -> str:
    from neurallm.data import corpora

    known = corpora.REGISTRY.get(corpus)
    return getattr(known, "tokenizer", None) or ("char" if "shakespeare" in corpus else "word")


def make_tokenizer(recipe: config.Recipe):
    """The tokenizer nlm train would make for this recipe (from the corpus's training split)."""
    from neurallm.data import corpora
    from neurallm.train import make_tokenizer as train_tokenizer

    return train_tokenizer(recipe, corpora.text_of(recipe.data, "train"))


def text_ids(data: config.DataConfig, split: str, tokenizer, tokens: int, file: str | None = None) -> torch.Tensor:
    """The first ``tokens`` ids of a split (or a file) as the model reads it; characters a
    character model does not know are left out, words a word model does not know are <unk>."""
    from neurallm.data import corpora

    text = corpora.text_of(data, split, file)
    source = file or f"{data.corpus}/{split}"
    if tokenizer.kind == "char":
        text = "".join(c for c in text[: tokens * 2] if c in tokenizer.index)
    else:
        text = text[: tokens * 40]
    ids = tokenizer.encode(text, source=source)[:tokens]
    if len(ids) < 2:
        raise NlmError(f"{source}: too little text for the probe (needs at least 2 tokens)")
    return torch.tensor(ids, dtype=torch.long)


def out_dir(args, probe: str) -> Path:
    out = Path(args.out or Path("runs") / "diagnose" / probe)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NlmError(f"--out {out}: cannot create it ({e.strerror})") from None
    return out


def finite(value):
    """JSON has no NaN or Infinity: such a figure becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def save_json(path: Path, result: dict) -> Path:
    """The result with how it was made (command, date), written atomically."""
    data = {**result, "command": "nlm " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "nlm" else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    text = json.dumps(finite(data), indent=1, allow_nan=False) + "\n"
    checkpoint.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def pyplot():
    """matplotlib's pyplot (headless), or None when the plots extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


NO_PLOTS = "no plot: matplotlib is not installed (pip install 'neurallm[plots]')"


def save_figure(fig, path: Path) -> Path:
    plt = pyplot()
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix[1:]))
    plt.close(fig)
    return path


def lm_batches(ids: torch.Tensor, batch_size: int, bptt: int):
    """Training windows (x, y) over ``batch_size`` parallel columns of a token stream, cycling."""
    from neurallm.data.batching import columns, num_windows, window

    data = columns(ids, batch_size)
    count = num_windows(data, bptt)
    index = 0
    while True:
        yield window(data, index % count, bptt)
        index += 1


def train_briefly(model, ids: torch.Tensor, steps: int, lr: float = 1e-3, batch_size: int = 20, bptt: int = 35) -> None:
    """A few Adam steps of language modelling (the state carried between windows, clipped at 1.0):
    enough to move a probe's model off its initialisation the same way for every architecture."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    state = None
    model.train()
    for _, (x, y) in zip(range(steps), lm_batches(ids, batch_size, bptt)):
        features, state = model(x, None if state is None else state.detach())
        loss = model.loss(features, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
