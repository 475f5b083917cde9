"""The model store: checkpoints kept under one home folder, each usable by a short name.

``home()/models/NAME/`` is a whole checkpoint directory, copied in by ``add``. Anywhere a
checkpoint path is taken, ``resolve`` also accepts a stored name (an existing path wins).
Every change goes through a rename, so a crash never leaves a half-copied or half-deleted
model under a real name: copies are made under a hidden ``.NAME.tmp-PID`` and removals are
renamed to a hidden ``.NAME.del-PID`` first. Names starting with a dot are never models.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from neurallm import checkpoint
from neurallm.errors import NlmError

NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_HELP = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
LIST_HINT = "nlm models list shows them"
# Parts of a training run's directory that are not part of the model: the state --resume needs
# (and what a crash mid-snapshot left of it), the run's lock, half-written files of a save.
RUN_ONLY_TOP = ("resume", ".resume.old-*", ".resume.tmp-*")
RUN_ONLY_ANYWHERE = ("*.lock", ".*.tmp-*")


def home() -> Path:
    """``$NLM_HOME``, else ``$XDG_CACHE_HOME/neurallm``, else ``~/.cache/neurallm``."""
    if os.environ.get("NLM_HOME"):
        return Path(os.environ["NLM_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: a relative value is ignored
    return base / "neurallm"


def models_dir() -> Path:
    return home() / "models"


def valid_name(name) -> bool:
    return isinstance(name, str) and NAME_RULE.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not valid_name(name):
        raise NlmError(f"{name!r} is not a valid model name (names are {NAME_HELP})")
    return name


def _is_dir(path: Path) -> bool:
    """``Path.is_dir`` that answers False, not an exception, for a folder it may not look into."""
    try:
        return path.is_dir()
    except OSError:
        return False


def resolve(ref: str | Path) -> Path:
    """A checkpoint directory from a path or a stored name. Only reads: works with a read-only or missing store."""
    if ref != "" and _is_dir(Path(ref)):  # Path("") would be the current folder
        return Path(ref)
    if valid_name(str(ref)) and _is_dir(models_dir() / str(ref)):
        return models_dir() / str(ref)
    raise NlmError(f"{ref}: no such checkpoint directory, and no stored model of that name ({LIST_HINT})")


def where(name: str) -> Path:
    path = models_dir() / check_name(name)
    if not _is_dir(path):
        raise NlmError(f"no stored model named {name} in {models_dir()} ({LIST_HINT})")
    return path


# ---- changes ---------------------------------------------------------------------------------

def _unwritable(folder: Path, e: OSError) -> NlmError:
    return NlmError(f"{folder}: the model store cannot be written ({e.strerror}); "
                    f"set NLM_HOME to a writable folder")


def _taken(name: str) -> NlmError:
    return NlmError(f"a stored model named {name} exists already (nlm models remove {name}, or pick another name)")


def _writable_models_dir() -> Path:
    folder = models_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(folder, e) from None
    return folder


def _check_source(source: Path, target: Path) -> None:
    if not _is_dir(source):
        raise NlmError(f"{source}: no such checkpoint directory")
    if not (source / "config.json").is_file():
        raise NlmError(f"{source}: not a checkpoint directory (no config.json)")
    real, stored = source.resolve(), target.resolve()
    if real == stored or stored in real.parents:
        raise NlmError(f"{source} is the stored model {target.name} itself")
    if real in models_dir().resolve().parents:
        raise NlmError(f"{source}: holds the model store {models_dir()}; it cannot be copied into itself")


def _not_model(top: Path):
    """copytree's ``ignore``: what a training run keeps beside its checkpoint."""
    def ignore(folder, names):
        patterns = RUN_ONLY_ANYWHERE + (RUN_ONLY_TOP if Path(folder) == top else ())
        return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    return ignore


def _sync_tree(root: Path) -> None:
    """Flush every copied file and folder, so the rename into place never exposes an unwritten file."""
    for folder, _, files in os.walk(root):
        for name in files:
            checkpoint._sync(Path(folder) / name)
        checkpoint._sync(Path(folder))


def add(source, name: str, force: bool = False) -> Path:
    """Copy a checkpoint directory into the store as NAME; ``force`` replaces a stored one of that name
    (the old copy is removed only once the new one is in place)."""
    target = models_dir() / check_name(name)
    source = Path(source) if Path(source).exists() or not valid_name(str(source)) else resolve(source)  # or a stored name
    _check_source(source, target)
    folder = _writable_models_dir()
    checkpoint.recover_dir(target)  # a crash inside an earlier add: put back the set-aside model
    if target.exists() and not force:
        raise _taken(name)
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise _unwritable(folder, e) from None
    try:
        shutil.copytree(source, tmp, ignore=_not_model(source), dirs_exist_ok=True)
        _sync_tree(tmp)
        checkpoint.replace_dir(tmp, target)
    except BaseException as e:  # Ctrl-C included
        checkpoint.recover_dir(target)  # drops the copy; puts back a replaced model if it was set aside
        if isinstance(e, (OSError, shutil.Error)):
            raise NlmError(f"{source}: could not be copied to {target} ({e})") from None
        raise
    return target


def remove(name: str) -> None:
    """Rename out of sight first, then delete: a crash half-way leaves only a hidden folder."""
    path = where(name)
    gone = path.with_name(f".{name}.del-{os.getpid()}")
    try:
        os.rename(path, gone)
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    shutil.rmtree(gone, ignore_errors=True)


def rename(old: str, new: str) -> Path:
    source, target = where(old), models_dir() / check_name(new)
    if target.exists():
        raise _taken(new)
    try:
        os.rename(source, target)
    except OSError as e:
        raise _unwritable(source.parent, e) from None
    return target


# ---- listing ---------------------------------------------------------------------------------

def _kind(config: dict) -> str:
    export, quantization = config.get("export"), config.get("quantization")
    if isinstance(export, dict) and "format" in export:
        return f"exported ({export['format']})"
    if isinstance(quantization, dict) and "scheme" in quantization:
        return f"quantized ({quantization['scheme']})"
    task = config.get("task")
    kind = task.get("kind") if isinstance(task, dict) else None
    return {"tag": "tagger", "classify": "classifier"}.get(kind, "LM")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validation(info) -> str:
    """The run's score at the saved step, as train.py records it in config.json's ``info``."""
    info = info if isinstance(info, dict) else {}
    if _number(info.get("valid_bpc")):
        return f"bpc {info['valid_bpc']:.3f}"
    if _number(info.get("valid_perplexity")):
        return f"ppl {info['valid_perplexity']:.2f}"
    if _number(info.get("valid_f1")):
        return f"F1 {100 * info['valid_f1']:.2f}"
    if _number(info.get("valid_accuracy")):
        return f"acc {100 * info['valid_accuracy']:.2f}"
    return "-"


def _files(path: Path) -> list[Path]:
    return [Path(folder) / name for folder, _, names in os.walk(path) for name in names]


def _date(path: Path, files: list[Path]) -> str:
    """When the model was saved: the newest of its checkpoint files (``add`` keeps their times)."""
    model_files = [f for f in files if f.parent == path and f.name in checkpoint.FILES] or [path]
    newest = max(f.stat().st_mtime for f in model_files)
    return datetime.fromtimestamp(newest).strftime("%Y-%m-%d %H:%M")


def _describe(path: Path) -> dict:
    files = _files(path)
    entry = {"name": path.name, "path": path, "size_bytes": sum(f.lstat().st_size for f in files),
             "kind": "LM", "corpus": "-", "validation": "-", "date": _date(path, files)}
    try:
        config = checkpoint.read_json(path / "config.json")
    except NlmError as e:
        return {**entry, "kind": "broken: config.json " + str(e).removeprefix(f"{path / 'config.json'}: ")}
    if not isinstance(config, dict):
        return {**entry, "kind": "broken: config.json is not a JSON object"}
    data = config.get("data")
    corpus = data.get("corpus") if isinstance(data, dict) else None
    return {**entry, "kind": _kind(config), "corpus": str(corpus) if corpus is not None else "-",
            "validation": _validation(config.get("info"))}


def entries() -> list[dict]:
    """One dict per stored model, by name; a model whose config.json cannot be read is listed as broken."""
    folder = models_dir()
    if not _is_dir(folder):
        return []
    return [_describe(p) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if not p.name.startswith(".") and p.is_dir()]


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_table(rows: list[dict]) -> list[str]:
    """Aligned lines, a header first; the last column is not padded."""
    header = ("NAME", "KIND", "SIZE", "CORPUS", "VALID", "DATE")
    cells = [header] + [(r["name"], r["kind"], human_size(r["size_bytes"]), r["corpus"], r["validation"], r["date"])
                        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]) for row in cells]
