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


@pytest.fixture
def char_corpus(tmp_path) -> Path:
    """A folder corpus cut from Tiny Shakespeare: 400 lines to train, the next 60 to validate and test."""
    lines = head(need("tinyshakespeare", "input.txt"), 520).splitlines(keepends=True)
    out = tmp_path / "shakespeare-slice"
    out.mkdir()
    (out / "train.txt").write_text("".join(lines[:400]), encoding="utf-8")
    (out / "valid.txt").write_text("".join(lines[400:460]), encoding="utf-8")
    (out / "test.txt").write_text("".join(lines[460:]), encoding="utf-8")
    return out


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


def last_json(capsys) -> dict:
    """The last line of what a verb printed, as JSON."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
