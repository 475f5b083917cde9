"""nlm diagnose memory: the synthetic tasks, equal-parameter sizing, training, and the command."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import fails, last_json
from neurallm.cli import main
from neurallm.diagnostics import memory

CELLS = ("rnn_tanh", "lstm", "gru")
TINY = ["--steps", "20", "--distances", "2,4", "--params", "500", "--eval-size", "50"]


def test_copy_answer_is_the_symbol_d_steps_back():
    d = 6
    ids, target = memory.copy_batch(d, 64, torch.Generator().manual_seed(0))
    assert ids.shape == (64, d + 1)
    assert torch.equal(target, ids[:, 0]) and (target < memory.SYMBOLS).all()
    assert ((ids[:, 1:d] >= memory.SYMBOLS) & (ids[:, 1:d] < memory.RECALL)).all()  # noise in between
    assert (ids[:, d] == memory.RECALL).all()
    changed = ids.clone()
    changed[:, 0] = (ids[:, 0] + 1) % memory.SYMBOLS
    assert torch.equal(memory.copy_answer(changed), changed[:, 0])
    noise = ids.clone()
    other = torch.Generator().manual_seed(1)
    noise[:, 1:d] = torch.randint(memory.SYMBOLS, memory.RECALL, (64, d - 1), generator=other)
    assert not torch.equal(noise, ids) and torch.equal(memory.copy_answer(noise), target)


def test_adding_answer_moves_with_the_marked_values_only():
    d = 5
    inputs, target = memory.adding_batch(d, 64, torch.Generator().manual_seed(0))
    assert inputs.shape == (64, d + 1, 2)
    markers = inputs[..., 1]
    assert (markers[:, 0] == 1).all() and (markers.sum(1) == 2).all()
    second = markers[:, 1:].argmax(1) + 1
    assert torch.allclose(target, inputs[:, 0, 0] + inputs[torch.arange(64), second, 0])
    moved = inputs.clone()
    moved[:, 0, 0] += 0.25  # the value d steps back
    assert torch.allclose(memory.adding_answer(moved), target + 0.25)
    unmarked = inputs.clone()
    unmarked[..., 0] += 0.3 * (1 - markers)
    assert torch.allclose(memory.adding_answer(unmarked), target)


@pytest.mark.parametrize("task", memory.TASKS)
def test_training_sequences_spread_the_distance_over_1_to_d(task):
    d = 8
    x, _ = memory.BATCHES[task](d, 2000, torch.Generator().manual_seed(0), spread=True)
    first = (x < memory.SYMBOLS).long().argmax(1) if task == "copy" else x[..., 1].argmax(1)
    assert set((d - first).tolist()) == set(range(1, d + 1))


@pytest.mark.parametrize("task", memory.TASKS)
def test_equal_parameter_counts(task):
    for cell in CELLS:
        for target, within in ((20000, 0.02), (500, 0.1)):
            hidden = memory.hidden_size(cell, task, target)
            model = memory.Probe(cell, task, hidden)
            count = sum(p.numel() for p in model.parameters())
            assert count == memory.param_count(cell, task, hidden)
            assert abs(count - target) <= within * target, (cell, hidden, count)
    assert memory.hidden_size("rnn_tanh", task, 20000) > memory.hidden_size("lstm", task, 20000)


def test_lstm_learns_copy_at_short_distance(one_thread):
    args = SimpleNamespace(steps=400, batch_size=64, lr=3e-3)
    check = memory.copy_batch(2, 200, torch.Generator().manual_seed(10))
    model, steps = memory.train("lstm", "copy", 2, memory.hidden_size("lstm", "copy", 2000), 1, args, check)
    assert steps < args.steps and steps % memory.CHECK_EVERY == 0  # stopped early: the check passed
    held = memory.copy_batch(2, 500, torch.Generator().manual_seed(11))
    assert memory.evaluate(model, *held)["accuracy"] >= 0.95


def test_training_is_seeded(one_thread):
    args = SimpleNamespace(steps=5, batch_size=8, lr=3e-3)
    check = memory.adding_batch(3, 10, torch.Generator().manual_seed(10))
    a, b = (memory.train("gru", "adding", 3, 6, 7, args, check)[0] for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_command_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "memory"
    assert main(["diagnose", "memory", *TINY, "--seeds", "2", "--out", str(out), "--json"]) == 0
    printed = last_json(capsys)
    written = json.loads((out / "memory.json").read_text())
    assert (out / "memory.png").stat().st_size > 0
    assert printed["budget"] == written["budget"]
    assert printed["budget"]["steps"] == 20 and printed["budget"]["seeds"] == [1, 2]
    for cell in ("rnn", "lstm", "gru"):
        r = written[cell]
        assert set(r["accuracy_by_distance"]) == {"2", "4"}
        assert r["max_distance"] in (0, 2, 4) and r["hidden_size"] > 0
        assert abs(r["params"] - 500) <= 50
        for task in memory.TASKS:
            t = r["tasks"][task]
            assert len(t["max_distance_by_seed"]) == 2 and len(t["seeds"]) == 2
            for d, acc in t["accuracy_by_distance"].items():
                lo, hi = t["accuracy_spread"][d]
                assert 0 <= lo <= acc <= hi <= 1
            assert all(s["steps_by_distance"] == {"2": 20, "4": 20} for s in t["seeds"])  # no check before step 100
        assert r["accuracy_by_distance"] == r["tasks"]["copy"]["accuracy_by_distance"]
        assert set(r["tasks"]["adding"]["mse_by_distance"]) == {"2", "4"}
        assert "mse_by_distance" not in r["tasks"]["copy"]
    assert "solved" in written["rule"]


def test_table_and_no_plot_without_matplotlib(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setattr(memory.common, "pyplot", lambda: None)
    assert main(["diagnose", "memory", *TINY, "--cells", "lstm", "--tasks", "adding", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "d=2" in text and "d=4" in text and "max d" in text and "lstm" in text
    assert "copy:" not in text and "rnn " not in text
    assert memory.common.NO_PLOTS in text
    assert (tmp_path / "memory.json").exists() and not (tmp_path / "memory.png").exists()


@pytest.mark.parametrize("flag, value, pattern", [
    ("--cells", "rnn,transformer", "--cells.*unknown cell 'transformer'"),
    ("--tasks", "copy,sort", "--tasks: 'copy,sort'"),
    ("--tasks", "copy,copy", "--tasks.*twice"),
    ("--distances", "10,5", "--distances: '10,5'"),
    ("--lr", "0", "--lr"),
])
def test_bad_input_fails_in_one_line(tmp_path, capsys, flag, value, pattern):
    out = tmp_path / "never"
    fails(["diagnose", "memory", flag, value, "--out", str(out)], capsys, pattern)
    assert not out.exists()
