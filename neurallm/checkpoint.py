"""A checkpoint is one directory: model.safetensors + config.json + tokenizer.json.

No pickle anywhere. Every file is written to a temporary name and renamed into place,
so a run killed while saving leaves the previous checkpoint whole. A training run's
directory also holds metrics.jsonl, curves.png and resume/ (the state --resume needs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from neurallm import config as config_mod
from neurallm import runtime
from neurallm.data import tokenizers
from neurallm.errors import NlmError
from neurallm.models.lm import RNNLM

FILES = ("model.safetensors", "config.json", "tokenizer.json")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _sync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk, so a rename never exposes an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a fully written directory into place; the old one is removed only afterwards
    (``recover_dir`` puts it back if a crash came between the two renames)."""
    for path in tmp.iterdir():
        _sync(path)
    _sync(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    _sync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path):
    """Build a new checkpoint directory in a temporary sibling of ``out``: it replaces ``out`` whole
    when the block ends, and is removed, leaving ``out`` as it was, when the block fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the result from other users
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(target: Path) -> None:
    """After a crash inside ``replace_dir``: put the set-aside old directory back (the newest,
    should there be several), and clear what half-finished writes left behind."""
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not target.exists() and olds:
        os.replace(olds.pop(), target)
    for leftover in olds + list(target.parent.glob(f".{target.name}.tmp-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _sync(tmp)
        os.replace(tmp, path)
        _sync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tied(model) -> bool:
    """The output layer reads the embedding's own tensor (a quantized model may keep only one of them)."""
    return getattr(getattr(model, "decoder", None), "weight", None) is getattr(getattr(model, "embedding", None),
                                                                               "weight", False)


def tensors_of(model) -> dict:
    # Tied weights share storage; safetensors stores each tensor once, so drop the alias.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if tied(model):
        state.pop("decoder.weight", None)
    return state


def save_description(directory: Path, recipe, tokenizer, extra: dict | None = None) -> None:
    """config.json and tokenizer.json: all of a checkpoint but its weights."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {**recipe.to_dict(), **({"info": extra} if extra else {})}
    if config.get("task") == dataclasses.asdict(config_mod.TaskConfig()):
        del config["task"]  # a language model's: what earlier releases, which know no [task], can still read
    atomic_write(directory / "config.json", lambda p: write_json(p, config))
    atomic_write(directory / "tokenizer.json", lambda p: write_json(p, tokenizer.to_json()))


def save(directory, model: RNNLM, recipe, tokenizer, extra: dict | None = None) -> Path:
    """Write (or update) a checkpoint. Each file is replaced atomically: the weights first, then
    the description (whose ``info`` names the step and loss of those weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = tensors_of(model)
    atomic_write(directory / "model.safetensors", lambda p: save_file(weights, str(p)))
    save_description(directory, recipe, tokenizer, extra)
    return directory


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NlmError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise NlmError(f"{path}: cannot be read ({e.strerror})") from None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a line cut short by a kill (or otherwise unreadable) is skipped."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def describe(directory) -> tuple[Path, dict]:
    """-> (the checkpoint directory a path or stored name points at, its config.json)."""
    from neurallm import store

    directory = store.resolve(directory)
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise NlmError(f"{directory}: checkpoint is missing {name} (expected {', '.join(FILES)})")
    data = read_json(directory / "config.json")
    if not isinstance(data, dict):
        raise NlmError(f"{directory / 'config.json'}: expected a JSON object")
    return directory, data


def _recipe_and_tokenizer(directory: Path, data: dict):
    sections = {k: v for k, v in data.items() if k not in ("info", "export", "quantization")}
    recipe = config_mod.build(sections, source=str(directory / "config.json"))
    if recipe.task.kind != "lm":
        verb = "nlm tag" if recipe.task.kind == "tag" else "nlm classify"
        raise NlmError(f"{directory}: is a {'tagger' if recipe.task.kind == 'tag' else 'classifier'}, "
                       f"not a language model; use {verb} eval or {verb} predict")
    tokenizer = tokenizers.from_json(read_json(directory / "tokenizer.json"), str(directory / "tokenizer.json"))
    if tokenizer.vocab_size != recipe.model.vocab_size:
        raise NlmError(f"{directory / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, config.json says "
                       f"model.vocab_size = {recipe.model.vocab_size}")
    return recipe, tokenizer


def check_out(out: Path, source: Path, kind: str) -> None:
    """An --out for a new ``kind`` ("export" or "quantization") checkpoint: a new folder, or one holding
    an earlier result of the same kind (replaced whole); never the source, nor a training run."""
    if out.resolve() == source.resolve():
        raise NlmError(f"--out {out}: is the checkpoint being read; pick a new folder")
    if out.exists():
        config = read_json(out / "config.json") if (out / "config.json").is_file() else None
        if not isinstance(config, dict) or kind not in config:
            raise NlmError(f"--out {out}: exists and is not an earlier {'export' if kind == 'export' else 'quantized'} "
                           f"checkpoint (it would be replaced whole); pick a new folder")


def open_runner(directory, device: str = "cpu"):
    """Any kind of checkpoint, ready to decode and score: -> (runner, recipe, tokenizer).
    An LM or a quantized checkpoint runs in PyTorch; an export in its own runtime."""
    from neurallm.runner import EagerRunner

    directory, data = describe(directory)
    if "export" in data:
        from neurallm.export import open_export

        recipe, tokenizer = _recipe_and_tokenizer(directory, data)
        if device != "cpu":
            raise NlmError(f"{directory}: an export runs on the CPU here (--device cpu)")
        return open_export(directory, data["export"], recipe), recipe, tokenizer
    model, recipe, tokenizer = load(directory, device)
    return EagerRunner(model), recipe, tokenizer


def _check_weights(path: Path, expected) -> None:
    """A quantized checkpoint records its weights' size and sha256 (a flipped byte of int8 data
    would otherwise load as a slightly different model)."""
    from neurallm.data.corpora import sha256

    if expected is None:  # written before the checksum was recorded
        return
    if not (isinstance(expected, dict) and isinstance(expected.get("bytes"), int)
            and isinstance(expected.get("sha256"), str)):
        raise NlmError(f"{path.parent / 'config.json'}: quantization.weights is malformed (expected bytes and sha256)")
    if path.stat().st_size != expected["bytes"] or sha256(path) != expected["sha256"]:
        raise NlmError(f"{path}: does not match the sha256 in config.json (cut short or altered); quantize again")


def load_float(directory, what: str):
    """-> load(directory) of a language model whose weights another model takes (``what`` names the
    use): a quantized checkpoint is refused, its weights are not the float ones."""
    if "quantization" in describe(directory)[1]:
        raise NlmError(f"{what} {directory}: a quantized language model; give the checkpoint it was quantized from")
    return load(directory)


def load(directory, device: str = "cpu"):
    """-> (model in eval mode, recipe, tokenizer): a trained or a quantized checkpoint (its layers
    swapped for quantized ones). Clear errors for a missing file or a mismatched shape."""
    from neurallm import quantize

    directory, data = describe(directory)
    if "export" in data:
        raise NlmError(f"{directory}: is an export ({data['export'].get('format') if isinstance(data['export'], dict) else '?'}); "
                       f"this needs the checkpoint it was exported from")
    if not (directory / "model.safetensors").is_file():
        raise NlmError(f"{directory}: checkpoint is missing model.safetensors (expected {', '.join(FILES)})")
    recipe, tokenizer = _recipe_and_tokenizer(directory, data)
    model = RNNLM(recipe.model)
    if "quantization" in data:
        if device != "cpu":
            raise NlmError(f"{directory}: a quantized checkpoint runs on the CPU here (--device cpu)")
        quantize.prepare(model, data["quantization"], str(directory / "config.json"))
        _check_weights(directory / "model.safetensors", data["quantization"].get("weights"))
    try:
        state = load_file(str(directory / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise NlmError(f"{directory / 'model.safetensors'}: unreadable ({e})") from None
    expected = model.state_dict()
    if tied(model):
        expected.pop("decoder.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise NlmError(f"{directory / 'model.safetensors'}: tensors do not match config.json "
                       f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise NlmError(f"{directory / 'model.safetensors'}: {name} has shape {tuple(tensor.shape)} "
                           f"({tensor.dtype}), config.json implies {tuple(expected[name].shape)} "
                           f"({expected[name].dtype})")
    model.load_state_dict(state, strict=False)
    return model.to(runtime.pick_device(device)).eval(), recipe, tokenizer
