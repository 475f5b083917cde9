"""Fixtures: the shared real data (tests skip cleanly without it) and tiny slices of it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("NLM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
if SHARED.is_dir():
    os.environ["NLM_DATA_DIR"] = str(SHARED)
os.environ["NLM_OFFLINE"] = "1"  # tests never download
os.environ.setdefault("NLM_CACHE_DIR", tempfile.mkdtemp(prefix="nlm-test-cache-"))  # never the user's cache

# A model small enough to train in a second; tests add these to any recipe.
TINY = ["--model.emb_size=16", "--model.hidden_size=16", "--train.batch_size=4", "--train.bptt=8",
        "--train.eval_batch_size=2", "--train.log_every=1", "--train.save_every=5"]


def need(*parts: str) -> Path:
    """A path in the shared data; without it the test skips (fails under NLM_REQUIRE_DATA=1, as in CI)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("NLM_REQUIRE_DATA") == "1":
            pytest.fail(f"shared data not found: {path} (NLM_REQUIRE_DATA=1)")
        pytest.skip(f"shared data not found: {path}")
    return path


def head(path: Path, lines: int) -> str:
    with open(path, encoding="utf-8") as f:
        return "".join(next(f) for _ in range(lines))


@pytest.fixture
def word_corpus(tmp_path) -> Path:
    """A folder corpus cut from the real PTB files: 300 / 40 / 40 lines."""
    src = need("ptb")
    out = tmp_path / "ptb-slice"
    out.mkdir()
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        (out / f"{split}.txt").write_text(head(src / f"ptb.{split}.txt", n), encoding="utf-8")
    return out


def shakespeare_slice(out: Path) -> Path:
    """A folder corpus cut from Tiny Shakespeare: 400 lines to train, the next 60 to validate and test."""
    lines = head(need("tinyshakespeare", "input.txt"), 520).splitlines(keepends=True)
    out.mkdir()
    (out / "train.txt").write_text("".join(lines[:400]), encoding="utf-8")
    (out / "valid.txt").write_text("".join(lines[400:460]), encoding="utf-8")
    (out / "test.txt").write_text("".join(lines[460:]), encoding="utf-8")
    return out


@pytest.fixture
def char_corpus(tmp_path) -> Path:
    return shakespeare_slice(tmp_path / "shakespeare-slice")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The same slice, once for a whole test module."""
    return shakespeare_slice(tmp_path_factory.mktemp("corpus") / "shakespeare-slice")


# A 2 x 24 character LSTM without dropout that says something after 150 steps (~1 s); 24 is no
# multiple of an int4 group size, so quantization pads it.
TINY_LSTM = ["--model.emb_size=24", "--model.hidden_size=24", "--model.dropout=0", "--model.dropout_hidden=0",
             "--train.batch_size=8", "--train.bptt=16", "--train.eval_batch_size=8", "--train.log_every=1000",
             "--train.save_every=1000", "--train.lr=0.03", "--train.warmup_steps=2"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one thread: faster on 2 cores, and far faster when another process keeps them busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def char_run(char_corpus, tmp_path):
    """A tiny character model trained for 8 steps on the Shakespeare slice."""
    from neurallm.cli import main

    out = tmp_path / "char-run"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "8", "--json", "--no-progress",
                 f"--data.corpus={char_corpus}", *TINY]) == 0
    return out


@pytest.fixture
def word_run(word_corpus, tmp_path):
    """A tiny word model trained for 8 steps on the PTB slice."""
    from neurallm.cli import main

    out = tmp_path / "word-run"
    assert main(["train", "ptb-small", "--out", str(out), "--max-steps", "8", "--no-progress",
                 f"--data.corpus={word_corpus}", *TINY]) == 0
    return out


def fails(args: list[str], capsys, pattern: str) -> str:
    """The verb stops with one error line matching ``pattern`` (exit status 2)."""
    import re

    from neurallm.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert err.startswith("nlm: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def sentences(path: Path, count: int) -> str:
    """The first ``count`` blank-line-separated blocks of a file (sentences, comments and all)."""
    blocks = path.read_text(encoding="utf-8").split("\n\n")
    return "\n\n".join(blocks[:count]) + "\n\n"


def last_json(capsys) -> dict:
    """The last line of what a verb printed, as JSON."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
