"""Training: files written, loss falls, seeds repeat, resume is exact, checkpoints round-trip."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from neurallm import checkpoint, config
from neurallm.errors import NlmError
from neurallm.evaluate import evaluate
from neurallm.train import train

from conftest import TINY


def recipe(corpus, *extra):
    return config.load_recipe("ptb-small", [f"--data.corpus={corpus}", *TINY, "--train.batch_size=16",
                                            "--train.bptt=20", *extra])


def test_training_writes_a_checkpoint_and_lowers_the_loss(word_corpus, tmp_path):
    out = tmp_path / "run"
    result = train(recipe(word_corpus, "--train.max_steps=40", "--train.lr=20"), out, show_progress=False)
    assert result["steps"] == 40 and result["checkpoint"] == str(out)
    assert 39 * 16 * 20 < result["tokens"] < 40 * 16 * 20  # 40 windows of 16 x 20, an epoch's last one shorter
    assert result["epochs_completed"] == 1  # 300 lines of PTB: about 20 windows of 16 x 20 an epoch
    assert result["valid_perplexity"] == pytest.approx(math.exp(result["valid_loss"]))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] - 1.0  # from about ln(vocab) = 7 nats down
    assert result["valid_perplexity"] < math.exp(losses[0])
    with pytest.raises(NlmError, match="already holds a run"):
        train(recipe(word_corpus, "--train.max_steps=1"), out, show_progress=False)


def _train_losses(out):
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["train_loss"] for r in records if "train_loss" in r]


def _weights(out):
    return load_file(str(out / "resume" / "tensors.safetensors"))


@pytest.mark.parametrize("more", [[], ["--train.valid_every=4", "--train.on_divergence=recover"]])
def test_resume_continues_exactly(word_corpus, tmp_path, more):
    # ~20 windows per epoch: 50 steps cross two epoch ends, with dropout drawing random numbers; validations
    # within an epoch and the first snapshot of a recovering run change nothing either.
    extra = ["--train.schedule=plateau", "--model.dropout=0.3", "--model.dropout_emb=0.1", *more]
    whole = tmp_path / "whole"
    train(recipe(word_corpus, "--train.max_steps=50", *extra), whole, show_progress=False)
    split = tmp_path / "split"
    train(recipe(word_corpus, "--train.max_steps=27", *extra), split, show_progress=False)
    state = json.loads((split / "resume" / "state.json").read_text())
    assert state["progress"]["step"] == 27 and state["progress"]["window"] > 0  # stopped mid-epoch
    train(recipe(word_corpus, "--train.max_steps=50", *extra), split, resume=True, show_progress=False)
    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _train_losses(whole) == _train_losses(split)
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 and r["grad_norm_max"] >= r["grad_norm"] for r in records if "train_loss" in r)
    if more:
        assert [r["step"] for r in records if "valid_loss" in r][:3] == [4, 8, 12]


def test_same_seed_same_run_other_seed_other_run(word_corpus, tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train(recipe(word_corpus, "--train.max_steps=5", f"--train.seed={seed}"), tmp_path / name, show_progress=False)
        runs[name] = _weights(tmp_path / name)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_checkpoint_round_trip_gives_identical_evaluation(char_corpus, tmp_path):
    r = config.load_recipe("shakespeare-char", [f"--data.corpus={char_corpus}", *TINY, "--train.max_steps=10"])
    out = tmp_path / "run"
    train(r, out, show_progress=False)
    model, loaded_recipe, tok = checkpoint.load(out)
    text = (char_corpus / "test.txt").read_text()
    first = evaluate(model, tok, tok.encode(text))
    checkpoint.save(tmp_path / "copy", model, loaded_recipe, tok)
    again, _, tok2 = checkpoint.load(tmp_path / "copy")
    second = evaluate(again, tok2, tok2.encode(text))
    assert first["nll"] == second["nll"] and first["tokens"] == second["tokens"] == len(text)
    assert abs(first["bpc"] - first["nll"] / math.log(2)) < 1e-12


def test_checkpoint_errors(char_corpus, tmp_path):
    r = config.load_recipe("shakespeare-char", [f"--data.corpus={char_corpus}", *TINY, "--train.max_steps=2"])
    out = tmp_path / "run"
    train(r, out, show_progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["hidden_size"] = 32
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NlmError, match=r"model.safetensors: .* has shape .*config.json implies"):
        checkpoint.load(out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(NlmError, match="checkpoint is missing tokenizer.json"):
        checkpoint.load(out)
    with pytest.raises(NlmError, match="no such checkpoint directory"):
        checkpoint.load(tmp_path / "nothing")


def test_a_save_killed_half_way_leaves_the_old_checkpoint(char_corpus, tmp_path, monkeypatch):
    r = config.load_recipe("shakespeare-char", [f"--data.corpus={char_corpus}", *TINY, "--train.max_steps=2"])
    out = tmp_path / "run"
    train(r, out, show_progress=False)
    model, loaded, tok = checkpoint.load(out)
    before = (out / "model.safetensors").read_bytes()

    def dies(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", dies)
    with torch.no_grad():
        model.embedding.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(out, model, loaded, tok)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []  # no temporary file left behind
    checkpoint.load(out)


def test_ctrl_c_stops_cleanly_and_resumes_exactly(word_corpus, tmp_path, monkeypatch):
    import signal

    from neurallm import train as train_mod

    whole = tmp_path / "whole"
    train(recipe(word_corpus, "--train.max_steps=12"), whole, show_progress=False)
    real_step = train_mod.Trainer.train_step

    def step_then_interrupt(self, index, lr):
        loss = real_step(self, index, lr)
        if self.progress.step == 6:  # the 7th step is running: Ctrl-C arrives in the middle of it
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(train_mod.Trainer, "train_step", step_then_interrupt)
    split = tmp_path / "split"
    result = train(recipe(word_corpus, "--train.max_steps=12"), split, show_progress=False)
    assert result["interrupted"] and result["steps"] == 7
    monkeypatch.undo()
    train(recipe(word_corpus, "--train.max_steps=12"), split, resume=True, show_progress=False)
    a, b = _weights(whole), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_model_and_survives_an_early_kill(word_corpus, tmp_path):
    out = tmp_path / "run"
    train(recipe(word_corpus, "--train.max_steps=3"), out, show_progress=False)
    with pytest.raises(NlmError, match="saved with model.hidden_size = 16, not 32"):
        train(recipe(word_corpus, "--train.max_steps=6", "--model.hidden_size=32"), out, resume=True,
              show_progress=False)
    # Killed before any validation: resume/ and the description exist, the weights do not yet.
    (out / "model.safetensors").unlink()
    (out / "resume").rename(out / ".resume.old-123")  # and killed between the two renames of a snapshot
    result = train(recipe(word_corpus, "--train.max_steps=6"), out, resume=True, show_progress=False)
    assert result["steps"] == 6 and (out / "model.safetensors").is_file()


def test_resume_keeps_the_clock_of_a_time_bounded_run(word_corpus, tmp_path):
    out = tmp_path / "run"
    first = train(recipe(word_corpus, "--train.max_minutes=0.005", "--train.schedule=cosine"), out,
                  show_progress=False)
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["progress"]["elapsed"] >= 0.3 and first["epochs_completed"] < 20  # stopped by the clock
    records = (out / "metrics.jsonl").read_text()
    again = train(recipe(word_corpus, "--train.max_minutes=0.005", "--train.schedule=cosine"), out, resume=True,
                  show_progress=False)
    assert again["steps"] == first["steps"] > 0  # the budget was spent: no fresh minutes, no lr restart
    assert state["progress"]["elapsed"] <= again["elapsed_seconds"] < state["progress"]["elapsed"] + 1
    assert (out / "metrics.jsonl").read_text() == records  # nothing left to do: no second validation


def test_a_diverging_run_stops_with_an_error(word_corpus, tmp_path, monkeypatch):
    from neurallm import train as train_mod

    real_step = train_mod.Trainer.train_step

    def diverges(self, index, lr):
        loss, tokens, norm = real_step(self, index, lr)
        return (math.nan if self.progress.step == 7 else loss), tokens, norm

    monkeypatch.setattr(train_mod.Trainer, "train_step", diverges)
    with pytest.raises(NlmError, match=r"training diverged at step 8 \(loss nan, gradient norm [0-9.]+\); lower train.lr"):
        train(recipe(word_corpus, "--train.max_steps=20"), tmp_path / "run", show_progress=False)
    state = json.loads((tmp_path / "run" / "resume" / "state.json").read_text())
    assert state["progress"]["step"] == 5  # the last snapshot before it (save_every=5) is kept


def test_damaged_resume_state_is_a_clear_error(word_corpus, tmp_path):
    out = tmp_path / "run"
    train(recipe(word_corpus, "--train.max_steps=3"), out, show_progress=False)
    tensors = out / "resume" / "tensors.safetensors"
    good = tensors.read_bytes()
    tensors.write_bytes(good[:100])
    with pytest.raises(NlmError, match=r"resume/tensors.safetensors: unreadable"):
        train(recipe(word_corpus, "--train.max_steps=6"), out, resume=True, show_progress=False)
    tensors.unlink()
    with pytest.raises(NlmError, match=r"resume/tensors.safetensors: unreadable"):
        train(recipe(word_corpus, "--train.max_steps=6"), out, resume=True, show_progress=False)
    tensors.write_bytes(good)
    saved = load_file(str(tensors))
    save_file({**saved, "hidden": saved["hidden"][..., :1].contiguous()}, str(tensors))  # the carried state of one row
    with pytest.raises(NlmError, match=r"resume: damaged resume state \(ValueError: hidden state of shape"):
        train(recipe(word_corpus, "--train.max_steps=6"), out, resume=True, show_progress=False)
    tensors.write_bytes(good)
    state_file = out / "resume" / "state.json"
    state = json.loads(state_file.read_text())
    del state["world"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(NlmError, match=r"resume: damaged resume state \(KeyError"):
        train(recipe(word_corpus, "--train.max_steps=6"), out, resume=True, show_progress=False)


def test_one_run_at_a_time_in_a_directory(word_corpus, tmp_path):
    from neurallm.train import Trainer

    out = tmp_path / "run"
    first = Trainer(recipe(word_corpus, "--train.max_steps=2"), out, show_progress=False)
    try:
        with pytest.raises(NlmError, match="another run is using this directory"):
            train(recipe(word_corpus, "--train.max_steps=2"), out, show_progress=False)
        first.fit()
    finally:
        first.close()
    result = train(recipe(word_corpus, "--train.max_steps=4"), out, resume=True, show_progress=False)
    assert result["steps"] == 4


def test_a_split_too_short_for_its_batch_is_found_before_training(word_corpus, tmp_path):
    (word_corpus / "valid.txt").write_text("a\n", encoding="utf-8")  # with the boundary: 3 tokens
    out = tmp_path / "run"
    with pytest.raises(NlmError, match=r"ptb-slice/valid: 3 tokens cannot fill 2 rows .*; lower train.eval_batch_size"):
        train(recipe(word_corpus, "--train.max_steps=3"), out, show_progress=False)
    assert not (out / "resume").exists() and not (out / "config.json").exists()


def test_metrics_log_starts_fresh_and_resume_drops_records_past_the_snapshot(word_corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 99, "train_loss": 1.0}\n{"step": 100, "train_')  # a killed run
    train(recipe(word_corpus, "--train.max_steps=7"), out, show_progress=False)  # save_every=5: snapshot at 7
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps[0] == 1 and 99 not in steps
    # As if killed after step 9, past the last snapshot (step 7): those records are logged again on resume.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train_loss": 5.0}\n{"step": 9, "train_loss": 5.0}\n{"step": 10, "tra')
    train(recipe(word_corpus, "--train.max_steps=10"), out, resume=True, show_progress=False)
    train_steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if "train_loss" in r]
    assert train_steps == list(range(1, 11))
    assert (out / "curves.png").is_file()


def test_resume_applies_changed_momentum_and_weight_decay_and_refuses_another_optimizer(word_corpus, tmp_path):
    from neurallm.train import Trainer

    out = tmp_path / "run"
    train(recipe(word_corpus, "--train.max_steps=6", "--train.momentum=0.5"), out, show_progress=False)
    with pytest.raises(NlmError, match=r"saved with train.optimizer = 'sgd', not 'adamw'"):
        train(recipe(word_corpus, "--train.max_steps=9", "--train.optimizer=adamw", "--train.lr=0.01"), out,
              resume=True, show_progress=False)
    resumed = Trainer(recipe(word_corpus, "--train.max_steps=9", "--train.momentum=0.9", "--train.weight_decay=1e-4"),
                      out, resume=True, show_progress=False)
    try:
        groups = resumed.optimizer.param_groups
        assert [g["momentum"] for g in groups] == [0.9] and [g["weight_decay"] for g in groups] == [1e-4]
        assert resumed.optimizer.state  # the momentum buffers were restored, not dropped
        assert resumed.fit()["steps"] == 9
    finally:
        resumed.close()
    saved = json.loads((out / "resume" / "state.json").read_text())
    assert saved["recipe"]["train"]["momentum"] == 0.9 and saved["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_capped_word_vocabulary_gives_unknown_words_a_real_probability(char_corpus, tmp_path):
    """Raw text (no <unk> in it) as a word corpus: without a cap, <unk> never occurs in training and an
    unseen word at evaluation costs dozens of nats; with min_freq=2 the rare words train <unk>."""
    results = {}
    for min_freq in (1, 2):
        out = tmp_path / f"min{min_freq}"
        train(config.load_recipe("ptb-small", [f"--data.corpus={char_corpus}", *TINY, "--train.max_steps=60",
                                               "--train.lr=20", f"--data.min_freq={min_freq}"]), out,
              show_progress=False)
        model, _, tok = checkpoint.load(out)
        text = (char_corpus / "test.txt").read_text()
        ids = tok.encode(text)
        unseen = sum(1 for w in text.split() if w not in tok.index)
        assert unseen > 20 and sum(i == tok.unk for i in ids) == unseen
        results[min_freq] = (evaluate(model, tok, ids)["perplexity"], tok.vocab_size)
    (uncapped, _), (capped, vocab) = results[1], results[2]
    assert math.isfinite(capped) and capped < vocab / 4  # a sensible figure: well below a uniform guess
    assert capped < uncapped / 2


def test_the_weight_average_follows_its_formula_and_is_applied_only_inside_its_block():
    from neurallm.fit import Average

    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(0.0)
    average = Average(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    average.update(0)  # the first update: decay 1/10, not 0.9
    assert torch.allclose(average.tensors()["ema.weight"], torch.full((1, 2), 0.1 * 1 + 0.9 * 3))
    with torch.no_grad():
        layer.weight.fill_(5.0)
    average.update(100)  # later: the decay asked for
    expected = 0.9 * (0.1 + 2.7) + 0.1 * 5
    assert torch.allclose(average.tensors()["ema.weight"], torch.full((1, 2), expected))
    with average.applied():
        assert torch.allclose(layer.weight, torch.full((1, 2), expected))
    assert torch.equal(layer.weight, torch.full((1, 2), 5.0))  # the trained weights are back


def test_with_ema_the_checkpoint_holds_the_average_and_resume_is_exact(word_corpus, tmp_path):
    extra = ["--train.ema=0.9", "--train.schedule=constant", "--model.dropout=0.3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(recipe(word_corpus, "--train.max_steps=12", *extra), whole, show_progress=False)
    train(recipe(word_corpus, "--train.max_steps=5", *extra), split, show_progress=False)
    train(recipe(word_corpus, "--train.max_steps=12", *extra), split, resume=True, show_progress=False)
    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 12 steps stay within the first epoch: its one validation (at the stop) is the best, so it is saved.
    saved = load_file(str(whole / "model.safetensors"))
    assert all(torch.equal(saved[k], a[f"ema.{k}"]) for k in saved)
    assert not all(torch.equal(saved[k], a[f"model.{k}"]) for k in saved)  # not the trained weights
    with pytest.raises(NlmError, match=r"train\.ema"):
        recipe(word_corpus, "--train.ema=1")


def test_an_average_missing_from_a_snapshot_starts_from_the_weights_and_a_damaged_one_is_refused():
    from neurallm.fit import Average

    layer = torch.nn.Linear(2, 1)
    average = Average(layer, decay=0.9)
    average.load({"model.weight": torch.zeros(1, 2)})  # saved with train.ema = 0
    assert torch.equal(average.tensors()["ema.weight"], layer.weight.detach())
    with pytest.raises(ValueError, match=r"ema\.bias: missing"):
        average.load({"ema.weight": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match=r"ema\.weight: shape \(2,\), expected \(1, 2\)"):
        average.load({"ema.weight": torch.zeros(2), "ema.bias": torch.zeros(1)})
