"""Progress of a training run: a bar on a terminal, plain lines elsewhere.

A run may be bounded by steps (``--max-steps`` or its epochs) and by time
(``--max-minutes``). The bar counts against whichever bound will end the run first,
judged from the pace so far, so a two-minute run of a 3,690-step recipe shows
seconds out of 120, not "460/3690 steps, 14:02 left". Where the output is not a
terminal (a CI log, a pipe), there is no bar: one plain line per validation instead.
"""

from __future__ import annotations

import math
import sys
import time


def binding_bound(step: int, total_steps: int, elapsed: float, max_seconds: float,
                  seconds_per_step: float | None, current: str | None = None) -> str:
    """``"time"`` when the time bound will stop the run before ``total_steps``, else ``"steps"``.

    ``seconds_per_step``: the pace measured so far (None before any step: a time bound then
    binds only if it is already spent). ``current``: the bound shown so far, kept while the
    projected end lies within 5% of the time bound, so a pace near the line does not flip it.
    """
    if not max_seconds:
        return "steps"
    if elapsed >= max_seconds:
        return "time"
    if seconds_per_step is None:
        return "steps"
    projected = elapsed + (total_steps - step) * seconds_per_step
    if current is not None and abs(projected - max_seconds) < 0.05 * max_seconds:
        return current
    return "time" if projected > max_seconds else "steps"


class RunProgress:
    """What a run shows while it trains. ``stream`` defaults to stderr; ``enabled=False`` shows nothing."""

    def __init__(self, total_steps: int, max_seconds: float, start_step: int, start_elapsed: float,
                 enabled: bool = True, stream=None):
        self.total_steps, self.max_seconds = total_steps, max_seconds
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start_step, self.start_elapsed = start_step, start_elapsed
        self.mode = None
        self.bar = None

    def _open(self, mode: str, step: int, elapsed: float) -> None:
        from tqdm import tqdm

        if self.bar is not None:
            self.bar.close()
        self.mode = mode
        if mode == "time":
            fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
            # n never passes the total: tqdm then drops the total, which this format needs
            self.bar = tqdm(total=self.max_seconds, initial=min(elapsed, self.max_seconds), file=self.stream,
                            dynamic_ncols=True, leave=False, bar_format=fmt)
        else:
            self.bar = tqdm(total=self.total_steps, initial=step, unit="step", file=self.stream,
                            dynamic_ncols=True, leave=False)

    def _bound(self, step: int, elapsed: float) -> str:
        done = step - self.start_step
        pace = (elapsed - self.start_elapsed) / done if done > 0 else None
        return binding_bound(step, self.total_steps, elapsed, self.max_seconds, pace, current=self.mode)

    def update(self, step: int, elapsed: float, epoch: int, train_loss: float, tokens_per_s: float) -> None:
        """After each logged training interval."""
        mode = self._bound(step, elapsed)
        if not self.tty:
            self.mode = mode
            return
        if mode != self.mode:
            self._open(mode, step, elapsed)
        self.bar.n = min(elapsed, self.max_seconds) if mode == "time" else step
        postfix = {"epoch": epoch, "loss": f"{train_loss:.3f}", "tok_s": f"{tokens_per_s:.0f}"}
        if mode == "time":
            postfix = {"step": step, **postfix}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def validated(self, step: int, epoch: int, elapsed: float, valid_loss: float, char_level: bool,
                  text: str | None = None) -> None:
        """After each validation: a plain line where there is no bar. ``text``: the figure in a
        task's own words (a tagger's accuracy); by default a language model's loss and perplexity."""
        if not self.enabled or self.tty:
            return
        figure = (f"{valid_loss / math.log(2):.4f} bpc" if char_level
                  else f"perplexity {math.exp(min(valid_loss, 700)):.2f}")
        clock = time.strftime('%H:%M:%S', time.gmtime(elapsed))
        if self.mode == "time":  # the time bound ends this run: count against it
            where = f"step {step}, epoch {epoch}, {clock} of {time.strftime('%H:%M:%S', time.gmtime(self.max_seconds))}"
        else:
            where = f"step {step} of {self.total_steps}, epoch {epoch}, {clock} elapsed"
        print(f"{where}: {text or f'valid loss {valid_loss:.4f} ({figure})'}", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A line that must be seen (a warning), progress shown or not; above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
