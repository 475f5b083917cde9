"""Exploding gradients: the probe, and training's opt-in recovery from a non-finite loss."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, fails, last_json
from neurallm import train as train_mod
from neurallm.checkpoint import read_jsonl
from neurallm.cli import main


def test_explode_command(word_corpus, tmp_path, capsys, one_thread):
    assert main(["diagnose", "explode", "--data", str(word_corpus), "--hidden", "8", "--steps", "6", "--batch-size", "2",
                 "--bptt", "5", "--scale", "4", "--out", str(tmp_path), "--json"]) == 0
    result = last_json(capsys)
    assert list(result["runs"]) == ["W_hh x 1, no clip", "W_hh x 1, clip 0.25", "W_hh x 4, no clip", "W_hh x 4, clip 0.25"]
    runs = result["runs"]
    assert runs["W_hh x 4, no clip"]["spectral_radius"] == pytest.approx(4 * runs["W_hh x 1, no clip"]["spectral_radius"],
                                                                          rel=1e-4)
    # The same initial weights and batches: the first step's gradient is the same with and without the clip.
    assert runs["W_hh x 1, clip 0.25"]["grad_norm"][0] == pytest.approx(runs["W_hh x 1, no clip"]["grad_norm"][0])
    assert all(len(r["loss"]) == 6 or r["diverged_at"] for r in runs.values())
    assert (tmp_path / "explode.png").is_file() and json.loads((tmp_path / "explode.json").read_text())["steps"] == 6


def test_the_explode_loop_stops_at_a_non_finite_gradient():
    from neurallm.diagnostics.explode import run

    model = torch.nn.Module()

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x, state):
            return self.w * x, None

        def loss(self, features, y):
            return (features * y).sum()

    model = Exploding()
    batches = iter([(torch.ones(2), torch.ones(2)), (torch.ones(2), torch.full((2,), math.inf)), (torch.ones(2),) * 2])
    record = run(model, batches, 3, lr=0.1, clip=0.0)
    assert record["diverged_at"] == 2 and len(record["loss"]) == 2
    assert torch.allclose(model.w, torch.full((2,), 0.9))  # the first step applied, the non-finite one not


def _nan_once(monkeypatch, at_step: int):
    """The language model's loss turns NaN once, at training step ``at_step``."""
    original, calls = train_mod.LanguageModelling.loss, {"n": 0}

    def loss(self, objective, index):
        value, tokens = original(self, objective, index)
        calls["n"] += 1
        return (value * math.nan if calls["n"] == at_step else value), tokens

    monkeypatch.setattr(train_mod.LanguageModelling, "loss", loss)


def test_training_recovers_from_a_divergence_when_asked(char_corpus, tmp_path, capsys, monkeypatch, one_thread):
    _nan_once(monkeypatch, at_step=8)
    out = tmp_path / "run"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "12", "--json", "--no-progress",
                 f"--data.corpus={char_corpus}", *TINY, "--train.on_divergence=recover", "--train.schedule=constant",
                 "--train.optimizer=adam", "--train.lr=0.01", "--train.warmup_steps=0"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["recoveries"] == 1 and summary["steps"] == 12
    assert "training diverged at step 8" in captured.err and "back to step 5" in captured.err
    records = read_jsonl(out / "metrics.jsonl")
    event = [r for r in records if r.get("event") == "recovered"]
    assert len(event) == 1 and event[0]["step"] == 5 and event[0]["lr_scale"] == 0.5
    rates = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert rates[5] == pytest.approx(0.01) and rates[6] == pytest.approx(0.005) and rates[12] == pytest.approx(0.005)
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 13))  # steps 6-7 logged once
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())


def test_the_recovered_run_restarts_from_the_snapshot_exactly(char_corpus, tmp_path, monkeypatch, capsys, one_thread):
    """Going back to a snapshot then on is the same as resuming it: compare the two runs' weights."""
    common = ["--no-progress", f"--data.corpus={char_corpus}", *TINY, "--train.schedule=constant",
              "--train.optimizer=adam", "--train.warmup_steps=0"]
    _nan_once(monkeypatch, at_step=8)
    assert main(["train", "shakespeare-char", "--out", str(tmp_path / "a"), "--max-steps", "10",
                 "--train.on_divergence=recover", "--train.lr=0.01", *common]) == 0
    monkeypatch.undo()
    # By hand: 5 steps, then resume at half the rate for the rest.
    assert main(["train", "shakespeare-char", "--out", str(tmp_path / "b"), "--max-steps", "5", "--train.lr=0.01",
                 *common]) == 0
    assert main(["train", "shakespeare-char", "--out", str(tmp_path / "b"), "--max-steps", "10", "--resume",
                 "--train.lr=0.005", *common]) == 0
    a = load_file(str(tmp_path / "a" / "resume" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "b" / "resume" / "tensors.safetensors"))
    for name in a:
        if name.startswith("model."):
            assert torch.equal(a[name], b[name]), name


def test_a_divergence_stops_training_by_default_and_recovery_gives_up(char_corpus, tmp_path, capsys, monkeypatch):
    _nan_once(monkeypatch, at_step=3)
    fails(["train", "shakespeare-char", "--out", str(tmp_path / "a"), "--max-steps", "6", "--no-progress",
           f"--data.corpus={char_corpus}", *TINY], capsys, r"training diverged at step 3 .*on_divergence=recover")
    monkeypatch.undo()
    assert main(["train", "shakespeare-char", "--out", str(tmp_path / "b"), "--max-steps", "30", "--no-progress",
                 f"--data.corpus={char_corpus}", *TINY, "--train.lr=1e30", "--train.clip=0",
                 "--train.on_divergence=recover", "--train.recover_tries=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.endswith(f"(recovery {n} of 2)") for n, line in enumerate(err[:2], 1)] == [True, True]
    assert re.match(r"nlm: error: training diverged .* after 2 recoveries \(train.recover_tries\); gave up", err[2])
    events = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r.get("event") == "recovered"]
    assert [e["lr_scale"] for e in events] == [0.5, 0.25]
    fails(["train", "shakespeare-char", "--out", str(tmp_path / "c"), "--train.on_divergence=retry"], capsys,
          "train.on_divergence")
