"""The server's decoding thread: requests in flight share each model's batched step.

Request handlers (on the asyncio loop) hand a ``Job`` to ``Scheduler.submit``; the
thread admits waiting jobs into free engine slots (reading their prompts), steps every
engine that has streams, turns tokens into text (stop strings included, so a stream
ends at the step its stop string appears) and hands each job its events back on the
loop, one call per step for all of them. A job whose client has gone is cancelled and
leaves at the next step. Waiting jobs are bounded: ``submit`` refuses one more with
``QueueFull`` and the handler answers 429.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from neurallm.engine import Context
from neurallm.generate import Sampling
from neurallm.inference import Loaded, StopText


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One choice of one request: read ``prompt`` after ``context``, then generate."""

    lm: Loaded
    context: Context
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int | None
    stops: list[str]
    logprobs: int = -1
    after: str = ""  # the text already shown before the reply (word spacing)
    index: int = 0  # which choice of its request
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None  # (index, Piece or None at the end), shared by a request's choices
    cancelled: bool = False
    # Filled in by the scheduler thread:
    tokens: list[int] = field(default_factory=list)
    submitted: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    reason: str = ""
    final: Context | None = None
    error: str = ""


@dataclass(frozen=True)
class Piece:
    """What a job receives per token: the text it adds (may be empty while a stop string is
    undecided), the token and its log-probability information."""

    text: str
    token: int
    logprob: float | None
    top: list


class Scheduler:
    def __init__(self, models: dict[str, Loaded], queue_size: int = 64):
        self.models = models
        self.queue_size = queue_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, tuple[Job, StopText]] = {}  # stream id -> (job, its text so far)
        self.wake = threading.Condition()
        self.stopping = False
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "rejected": 0, "tokens": 0,
                      "first_token_ms_sum": 0.0, "first_token_count": 0}
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step, 10 s
        self.thread = threading.Thread(target=self._run, name="nlm-decode", daemon=True)
        self.thread.start()

    # ---- called from the event loop ------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Queue the choices of one request together, or refuse them all with QueueFull."""
        with self.wake:
            if len(self.waiting) + len(jobs) > self.queue_size:
                self.stats["rejected"] += 1
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting "
                                f"(at most {self.queue_size})")
            self.stats["requests"] += 1
            for job in jobs:
                job.submitted = time.perf_counter()
                self.waiting.append(job)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        with self.wake:
            job.cancelled = True
            self.wake.notify()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def active(self) -> int:
        return len(self.running)

    def tokens_per_s(self) -> float:
        """Tokens generated over the last ten seconds, per second."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= 10]
        return sum(n for _, n in recent) / 10.0

    def close(self, grace: float = 0.0) -> None:
        """Stop: jobs in flight get ``grace`` seconds to finish, then all are cancelled."""
        deadline = time.perf_counter() + grace
        while (self.running or self.waiting) and time.perf_counter() < deadline:
            time.sleep(0.05)
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=10)

    # ---- the decoding thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.running:
                    self.wake.wait()
                if self.stopping:
                    break
            self._admit()
            for lm in self.models.values():
                if lm.engine.streams:
                    try:
                        self._step(lm)
                    except Exception as e:  # noqa: BLE001 (the requests in this model's step get the error)
                        self._fail(lm, f"{type(e).__name__}: {e}")
        for job, _ in list(self.running.values()):
            self._end(job, "cancelled")
        for job in self.waiting:
            job.reason = "cancelled"
            self._send(job, None)

    def _admit(self) -> None:
        while True:
            with self.wake:
                job = next((j for j in self.waiting if j.cancelled or j.lm.engine.free), None)
                if job is None:
                    return
                self.waiting.remove(job)
            if job.cancelled:
                job.reason = "cancelled"
                self.stats["cancelled"] += 1
                self._send(job, None)
                continue
            try:
                text = StopText(job.lm.tokenizer, job.stops, after=job.after)
                context = job.lm.engine.prefill(job.prompt, job.context)
                stream = job.lm.engine.submit(context, job.max_tokens, job.sampling, job.seed, job.logprobs)
            except Exception as e:  # noqa: BLE001 (reported to the request that caused it; the thread goes on)
                job.error, job.reason = f"{type(e).__name__}: {e}", "error"
                self._send(job, None)
                continue
            self.running[stream.id] = (job, text)

    def _fail(self, lm: Loaded, error: str) -> None:
        """A step that raised: its streams end with the error; the thread and other models go on."""
        for stream in list(lm.engine.streams):
            job, _ = self.running.pop(stream.id, (None, None))
            lm.engine.finish(stream, "error")
            if job is not None:
                job.error, job.reason, job.finished = error, "error", time.perf_counter()
                self._send(job, None)

    def _step(self, lm: Loaded) -> None:
        for stream in list(lm.engine.streams):  # a client gone: its slot frees now
            job, _ = self.running[stream.id]
            if job.cancelled:
                lm.engine.finish(stream, "cancelled")
                self._end(job, "cancelled", stream)
        events = lm.engine.step()
        now = time.perf_counter()
        batch = []
        for event in events:
            job, text = self.running[event.stream.id]
            if not job.tokens:
                job.first_token = now
                self.stats["first_token_ms_sum"] += 1000 * (now - job.submitted)
                self.stats["first_token_count"] += 1
            job.tokens.append(event.token)
            batch.append((job, Piece(text.push(event.token), event.token, event.logprob, event.top)))
            if text.stopped and not event.stream.done:
                lm.engine.finish(event.stream, "stop")
        self.stats["tokens"] += len(events)
        self.recent.append((now, len(events)))
        while self.recent and now - self.recent[0][0] > 10:
            self.recent.popleft()
        done = []
        for event in events:
            stream = event.stream
            if stream.done and stream.id in self.running:
                job, text = self.running[stream.id]
                tail = "" if text.stopped else text.flush()
                if tail:
                    batch.append((job, Piece(tail, -1, None, [])))
                done.append((job, "stop" if text.stopped else stream.reason, stream))
        if batch:
            self._send_many(batch)
        for job, reason, stream in done:
            self._end(job, reason, stream)

    def _end(self, job: Job, reason: str, stream=None) -> None:
        if stream is not None:
            self.running.pop(stream.id, None)
            job.final = stream.context
        else:
            for key, (j, _) in list(self.running.items()):
                if j is job:
                    self.running.pop(key)
        job.reason = job.reason or reason
        job.finished = time.perf_counter()
        self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        self._send(job, None)

    def _send(self, job: Job, item) -> None:
        if job.loop is not None and not job.loop.is_closed():
            job.loop.call_soon_threadsafe(job.events.put_nowait, (job.index, item))

    def _send_many(self, batch: list[tuple[Job, Piece]]) -> None:
        """One hand-over to the event loop per step, for every job at once."""
        loop = batch[0][0].loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch) -> None:
    for job, piece in batch:
        job.events.put_nowait((job.index, piece))
