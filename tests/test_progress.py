"""The progress bar counts against the bound that ends the run; no bar off a terminal."""

import io

from neurallm.progress import RunProgress, binding_bound
from neurallm.train import train

from test_train import recipe


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bound_that_ends_the_run_first():
    assert binding_bound(100, 3690, 30.0, 0.0, 0.26) == "steps"  # no time bound
    # 460 steps in 120 s: 3,690 steps would take 16 minutes, the 2-minute bound ends the run
    assert binding_bound(230, 3690, 60.0, 120.0, 60 / 230) == "time"
    assert binding_bound(230, 400, 60.0, 120.0, 60 / 230) == "steps"  # 400 steps fit in the 2 minutes
    assert binding_bound(0, 400, 0.0, 120.0, None) == "steps"  # no pace yet
    assert binding_bound(10, 400, 121.0, 120.0, None) == "time"  # the time is spent


def test_the_bar_total_follows_the_binding_bound():
    term = Terminal()
    bar = RunProgress(total_steps=3690, max_seconds=120.0, start_step=0, start_elapsed=0.0, stream=term)
    bar.update(step=230, elapsed=60.0, epoch=1, train_loss=2.5, tokens_per_s=8000)
    assert bar.mode == "time" and bar.bar.total == 120.0 and bar.bar.n == 60.0
    assert "60/120 s" in term.getvalue() and "step=230" in term.getvalue()
    bar.close()
    term = Terminal()
    bar = RunProgress(total_steps=400, max_seconds=120.0, start_step=0, start_elapsed=0.0, stream=term)
    bar.update(step=230, elapsed=60.0, epoch=1, train_loss=2.5, tokens_per_s=8000)
    assert bar.mode == "steps" and bar.bar.total == 400 and bar.bar.n == 230
    assert "230/400" in term.getvalue()
    # The pace drops (a busy machine): the time bound now ends the run first, and the bar says so.
    bar.update(step=240, elapsed=110.0, epoch=1, train_loss=2.4, tokens_per_s=800)
    assert bar.mode == "time" and bar.bar.total == 120.0
    bar.close()


def test_a_resumed_run_measures_its_pace_from_where_it_resumed():
    term = Terminal()
    bar = RunProgress(total_steps=1000, max_seconds=600.0, start_step=500, start_elapsed=300.0, stream=term)
    bar.update(step=600, elapsed=330.0, epoch=3, train_loss=2.0, tokens_per_s=9000)  # 0.3 s a step: 120 s to go
    assert bar.mode == "steps" and bar.bar.n == 600
    bar.close()


def test_off_a_terminal_one_plain_line_per_validation():
    pipe = io.StringIO()
    bar = RunProgress(total_steps=400, max_seconds=0.0, start_step=0, start_elapsed=0.0, stream=pipe)
    bar.update(step=50, elapsed=5.0, epoch=1, train_loss=2.5, tokens_per_s=8000)
    assert pipe.getvalue() == ""
    bar.validated(step=200, epoch=1, elapsed=65.0, valid_loss=1.5, char_level=True)
    assert pipe.getvalue() == "step 200 of 400, epoch 1, 00:01:05 elapsed: valid loss 1.5000 (2.1640 bpc)\n"
    quiet = RunProgress(total_steps=400, max_seconds=0.0, start_step=0, start_elapsed=0.0, enabled=False,
                        stream=pipe)
    quiet.validated(step=400, epoch=2, elapsed=130.0, valid_loss=1.4, char_level=True)
    assert pipe.getvalue().count("\n") == 1


def test_training_off_a_terminal_prints_validation_lines(word_corpus, tmp_path, capsys):
    train(recipe(word_corpus, "--train.max_steps=30"), tmp_path / "run", show_progress=True)  # ~20 windows an epoch
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step ") and "of 30, epoch 1" in lines[0]
    assert lines[1].startswith("step 30 of 30, epoch 2") and "perplexity" in lines[1]


def test_off_a_terminal_a_time_bounded_run_counts_against_the_time():
    pipe = io.StringIO()
    bar = RunProgress(total_steps=3690, max_seconds=120.0, start_step=0, start_elapsed=0.0, stream=pipe)
    bar.update(step=230, elapsed=60.0, epoch=1, train_loss=2.5, tokens_per_s=8000)  # 3,690 steps would take 16 min
    bar.validated(step=460, epoch=1, elapsed=120.0, valid_loss=2.0, char_level=False)
    assert pipe.getvalue() == "step 460, epoch 1, 00:02:00 of 00:02:00: valid loss 2.0000 (perplexity 7.39)\n"


def test_a_pace_near_the_line_does_not_flip_the_bar():
    term = Terminal()
    bar = RunProgress(total_steps=1000, max_seconds=100.0, start_step=0, start_elapsed=0.0, stream=term)
    bar.update(step=100, elapsed=9.8, epoch=1, train_loss=2.0, tokens_per_s=1)  # projected end 98 s: steps
    assert bar.mode == "steps"
    bar.update(step=200, elapsed=20.2, epoch=1, train_loss=2.0, tokens_per_s=1)  # 101 s: within 5%, kept
    assert bar.mode == "steps"
    bar.update(step=300, elapsed=33.0, epoch=1, train_loss=2.0, tokens_per_s=1)  # 110 s: the time bound binds
    assert bar.mode == "time"
    bar.close()


def test_a_time_bar_opened_after_the_time_is_spent():
    """The last log line of a run stopped by the clock comes just past the bound."""
    term = Terminal()
    bar = RunProgress(total_steps=100000, max_seconds=18.0, start_step=0, start_elapsed=0.0, stream=term)
    bar.update(step=900, elapsed=18.7, epoch=1, train_loss=2.5, tokens_per_s=8000)
    assert bar.mode == "time" and bar.bar.n == 18.0 and "18/18 s" in term.getvalue()
    bar.close()
