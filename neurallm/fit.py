"""The training loop that knows no task: steps, clipping, schedules, validation, best-weights
keeping, stops (steps, minutes, Ctrl-C), snapshots and exact resume, DDP, progress, metrics log,
divergence check.

A task answers the rest (``Task`` below): how batches are made, what a step's loss is, what
carries from one batch to the next, what the validation figure is, and how its checkpoint is
written. The language model's task is in train.py; taggers and classifiers are in tasks/.
``resume/`` holds everything needed to continue exactly: weights (and their moving average with
train.ema), optimizer, schedule, random state, the task's carried tensors and the position in the epoch.
"""

from __future__ import annotations

import fcntl
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from neurallm import checkpoint, config, runtime
from neurallm.errors import NlmError
from neurallm.progress import RunProgress


@dataclass
class Progress:
    """Where a run stands; saved in resume/state.json."""

    step: int = 0
    epoch: int = 1  # 1-based, the epoch in progress
    window: int = 0  # next batch of that epoch (a BPTT window for a language model)
    lr_scale: float = 1.0  # decays from the step and plateau schedules
    # The validation figure, lower is better: a language model's loss in nats, a tagger's or
    # classifier's error rate (1 - accuracy, or 1 - F1).
    best_valid: float = math.inf  # best of any validation: decides which weights are kept
    plateau_best: float = math.inf  # best at an epoch's end: drives the plateau schedule
    train_seconds: float = 0.0
    elapsed: float = 0.0  # wall-clock seconds of the run so far, across resumes (--max-minutes, cosine)
    tokens: int = 0
    train_loss: float = math.nan
    valid_loss: float = math.nan
    recoveries: int = 0  # times train.on_divergence = recover went back to a snapshot


class Window:
    """The steps since the last log line: their summed loss and gradient norm, from which time and token count."""

    def __init__(self, progress: Progress):
        self.loss, self.norm, self.norm_max, self.steps = 0.0, 0.0, 0.0, 0
        self.since, self.tokens = time.perf_counter(), progress.tokens

    def add(self, loss: float, norm: float) -> None:
        self.loss, self.norm, self.steps = self.loss + loss, self.norm + norm, self.steps + 1
        self.norm_max = max(self.norm_max, norm)


class Task:
    """What only a task knows. ``setup`` makes the data, ``model`` and ``objective`` (model and
    loss in one forward, so DistributedDataParallel sees every parameter used)."""

    recipe: config.Recipe  # with the sizes found in the data filled in
    model: nn.Module
    objective: nn.Module
    batches: int  # per epoch, for this process
    resume_keys: tuple[tuple[str, str], ...] = (("train", "batch_size"), ("train", "optimizer"))

    def setup(self, loop: "Loop", resume: bool) -> None:
        raise NotImplementedError

    def describe(self, out: Path) -> None:
        """Write the checkpoint's description (config, vocabularies) before any weights."""
        raise NotImplementedError

    def loss(self, objective: nn.Module, index: int) -> tuple[torch.Tensor, int]:
        """Batch ``index`` of the epoch in progress -> (mean loss, tokens in it)."""
        raise NotImplementedError

    def new_epoch(self) -> None:
        """Called as an epoch ends (after its validation)."""

    def validate(self) -> tuple[float, dict]:
        """-> (the figure, lower is better; the record logged and kept with the best weights)."""
        raise NotImplementedError

    def save(self, out: Path, record: dict) -> None:
        raise NotImplementedError

    def carry(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs beside weights and optimizer (every process calls this)."""
        return {}

    def restore(self, tensors: dict[str, torch.Tensor], progress: Progress) -> None:
        pass

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters())}]

    def lr_factors(self, step: int) -> list[float] | None:
        """A multiplier of the rate per parameter group at this step (None: all 1; 0: the group is frozen)."""
        return None

    def global_tokens(self, tokens: int, world: int) -> int:
        """The tokens of the global batch, from what loss() returned on one process (a language model's
        processes each read their own rows: as many again on each)."""
        return tokens * world

    def figure_text(self, record: dict) -> str | None:
        """The validation line where there is no bar (None: the language model's loss and perplexity)."""
        return None

    def summary(self, progress: Progress) -> dict:
        return {}


class Average:
    """A moving average of a model's weights (Polyak averaging, train.ema): after each update the
    average moves (1 - decay) of the way to the new weights. Early on the decay is (1 + n) / (10 + n)
    after n updates when that is lower, so the average soon leaves the random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # Weights frozen for good (a tagger's character LMs) stay out; those gradual unfreezing holds back are in.
        self.named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point() and p.requires_grad]
        self.params = [p for _, p in self.named]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, updates_before: int) -> None:
        decay = min(self.decay, (1 + updates_before) / (10 + updates_before))
        torch._foreach_lerp_(self.average, self.params, 1 - decay)

    @contextmanager
    def applied(self):
        """The model holds the average inside the block, its own weights again after it."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{name}": a.detach().cpu().contiguous() for (name, _), a in zip(self.named, self.average)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """From a snapshot; a snapshot saved without an average (train.ema was 0) starts it from the
        current weights."""
        if not any(k.startswith("ema.") for k in tensors):
            tensors = {f"ema.{name}": p for name, p in self.named}
        with torch.no_grad():
            for (name, p), a in zip(self.named, self.average):
                saved = tensors.get(f"ema.{name}")
                if saved is None or saved.shape != a.shape:
                    raise ValueError(f"averaged weight ema.{name}: " +
                                     ("missing" if saved is None else f"shape {tuple(saved.shape)}, expected {tuple(a.shape)}"))
                a.copy_(saved)


def make_optimizer(params, cfg: config.TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: config.TrainConfig, progress: Progress, total_steps: int) -> float:
    """The rate for the next step. A cosine schedule runs to zero over the planned steps, or
    over --max-minutes when that comes first, so a time-bounded run still anneals."""
    lr = cfg.lr * progress.lr_scale
    if cfg.warmup_steps and progress.step < cfg.warmup_steps:
        lr *= (progress.step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        done = progress.step / max(total_steps, 1)
        if cfg.max_minutes:
            done = max(done, progress.elapsed / (cfg.max_minutes * 60))
        lr *= 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return lr


def end_of_epoch_decay(cfg: config.TrainConfig, progress: Progress) -> None:
    """The step and plateau schedules act at an epoch's end, after its validation."""
    p = progress
    if cfg.schedule == "plateau" and p.valid_loss >= p.plateau_best:
        p.lr_scale *= cfg.decay_factor  # no better than the best epoch so far
    if cfg.schedule == "step" and p.epoch >= cfg.decay_start:
        p.lr_scale *= cfg.decay_factor  # Zaremba et al.: decay after each epoch past decay_start
    p.plateau_best = min(p.plateau_best, p.valid_loss)


class Loop:
    def __init__(self, task: Task, out: Path, resume: bool = False, show_progress: bool = True):
        self.task = task
        self.out = Path(out)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = runtime.pick_device(task.recipe.train.device)
        self.objective = None
        self._lock = None
        self._owns_group = self.world > 1 and not dist.is_initialized()
        if self._owns_group:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        try:
            self._setup(resume, show_progress)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: bool, show_progress: bool) -> None:
        if self.device.type == "cpu":
            runtime.keep_freed_memory()
        self.show_progress = show_progress and self.rank == 0
        self.bar = RunProgress(0, 0.0, 0, 0.0, enabled=False)  # fit() makes the run's own
        self.on_rank0(lambda: self._claim(resume))
        task = self.task
        torch.manual_seed(task.recipe.train.seed)
        task.setup(self, resume)
        self.recipe, self.cfg, self.model = task.recipe, task.recipe.train, task.model
        self.objective = task.objective
        if self.world > 1:
            # An adaptive softmax skips a tail cluster that no target of a batch falls in.
            self.objective = nn.parallel.DistributedDataParallel(
                self.objective, find_unused_parameters=getattr(self.recipe.model, "softmax", "") == "adaptive")
            # Same initial weights (DDP broadcasts rank 0's), but each process its own dropout masks.
            torch.manual_seed(self.cfg.seed + self.rank)
        if not resume:
            self.on_rank0(self._start_log)
        self.optimizer = make_optimizer(task.param_groups(), self.cfg)
        self.average = Average(self.model, self.cfg.ema) if self.cfg.ema else None
        self.amp = runtime.autocast_dtype(self.cfg.precision, self.device)
        self.progress = Progress()
        self.validated_at = -1  # the step of the last validation
        if resume:
            self.restore()

    # ---- the run directory -------------------------------------------------------------------
    def on_rank0(self, work) -> None:
        """``work()`` on rank 0 only; an NlmError there is raised on every process, so none waits forever."""
        error = None
        if self.rank == 0:
            try:
                work()
            except NlmError as e:
                error = str(e)
            except OSError as e:
                error = f"{e.filename or self.out}: {e.strerror}"
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, 0)
            error = box[0]
        if error is not None:
            raise NlmError(error)

    def _claim(self, resume: bool) -> None:
        """Make and lock the run directory (one run at a time); check it holds a run to resume, or none."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.out / ".lock", "w")
        except OSError as e:
            raise NlmError(f"--out {self.out}: cannot create the run directory ({e.strerror})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise NlmError(f"{self.out}: another run is using this directory") from None
        if resume:
            checkpoint.recover_dir(self.out / "resume")  # a crash mid-snapshot
            if not (self.out / "resume" / "state.json").is_file():
                raise NlmError(f"{self.out}: nothing to resume (no resume/state.json)")
        elif (self.out / "model.safetensors").exists() or (self.out / "resume").exists() or \
                any(self.out.glob(".resume.old-*")):
            raise NlmError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")

    def _start_log(self) -> None:
        # The checkpoint's description goes first, so resume/ is never without it.
        self.task.describe(self.out)
        (self.out / "metrics.jsonl").unlink(missing_ok=True)  # left by a run killed before its first save

    def close(self) -> None:
        """Release the directory lock and the process group (DDP holds it: drop DDP first, while the
        interpreter is whole, not at exit)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._owns_group and dist.is_initialized():
            self.objective = None
            gc.collect()
            dist.destroy_process_group()

    # ---- one step -------------------------------------------------------------------------
    def train_step(self, index: int, lr: float) -> tuple[float, int, float]:
        """One batch: forward, backward, clip, update. -> (loss of the global batch, tokens in it, the
        gradient's norm before clipping). A non-finite gradient is not applied (the loop then stops or
        recovers)."""
        self.model.train()
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        with autocast:
            loss, tokens = self.task.loss(self.objective, index)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        factors = self.task.lr_factors(self.progress.step) or [1.0] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, factors):
            group["lr"] = lr * factor
            if factor == 0:  # frozen: no update, no optimizer state, and no share of the clipped norm
                for p in group["params"]:
                    p.grad = None
        # The norm is measured even without a clip: it is logged, and a non-finite one stops the update.
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip or math.inf).item()
        if math.isfinite(norm):
            self.optimizer.step()
            if self.average is not None:
                self.average.update(self.progress.step)
        loss = loss.detach()
        if self.world > 1:  # report the loss of the global batch, as one process would
            dist.all_reduce(loss)
            loss /= self.world
        return loss.item(), self.task.global_tokens(tokens, self.world), norm

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, p = self.cfg, self.progress
        total_steps = cfg.max_steps or cfg.epochs * self.task.batches
        session = time.perf_counter()
        started = session - p.elapsed  # a resumed run goes on with its clock
        first_step = p.step
        self.bar = RunProgress(total_steps, cfg.max_minutes * 60, p.step, p.elapsed, enabled=self.show_progress)
        self._catch_interrupt()
        try:
            if cfg.on_divergence == "recover" and not (self.out / "resume").exists():
                self.snapshot()  # a state to go back to before the first scheduled snapshot
            stopped = self._loop(started, total_steps)
            p = self.progress  # (a recovery from divergence replaced it)
            if p.step > first_step or math.isnan(p.valid_loss):  # else a resume found nothing left to do
                if stopped and (p.window > 0 or math.isnan(p.valid_loss)) and self.validated_at != p.step:
                    self.validate()  # a bounded run still reports where it got to
                self.snapshot()
        finally:
            self.bar.close()
            if self._previous_sigint is not None:
                signal.signal(signal.SIGINT, self._previous_sigint)
        if self.world > 1:
            dist.barrier()  # no process tears the group down while another still writes or talks
        self.plot()
        return self.summary(time.perf_counter() - session)

    def _loop(self, started: float, total_steps: int) -> bool:
        """Train until the epochs are done (-> False) or a bound or Ctrl-C stops the run (-> True)."""
        cfg = self.cfg
        stopped = False
        while self.progress.epoch <= cfg.epochs and not stopped:
            window = Window(self.progress)
            lr = math.nan  # set by the first step; logged only after one
            while self.progress.window < self.task.batches:
                p = self.progress  # (a recovery replaces it)
                if self._should_stop(started):
                    stopped = True
                    if window.steps:  # the steps since the last log line: a short run reports its loss too
                        self._log_train(lr, window)
                    break
                lr = learning_rate(cfg, p, total_steps)
                t0 = time.perf_counter()
                loss, tokens, norm = self.train_step(p.window, lr)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    self._diverged(f"at step {p.step + 1} (loss {loss}, gradient norm {norm})")
                    window = Window(self.progress)
                    continue
                p.train_seconds += time.perf_counter() - t0
                p.tokens += tokens
                p.window += 1
                p.step += 1
                window.add(loss, norm)
                if p.step % cfg.log_every == 0 or p.window == self.task.batches:
                    self._log_train(lr, window)
                    window = Window(p)
                if cfg.valid_every and p.step % cfg.valid_every == 0 and p.window < self.task.batches:
                    self.validate()  # (an epoch's end validates anyway)
                if p.step % cfg.save_every == 0:
                    self.snapshot()
            if not stopped:
                self.end_epoch()
        return stopped

    def _diverged(self, where: str) -> None:
        """A non-finite loss or gradient: an error (train.on_divergence = stop), or back to the last
        snapshot with the rate lowered, a counted number of times (recover)."""
        cfg, p = self.cfg, self.progress
        if cfg.on_divergence != "recover":
            raise NlmError(f"training diverged {where}; lower train.lr, set train.clip, or set "
                           f"train.on_divergence=recover (the last snapshot, if any, is in {self.out / 'resume'})")
        if p.recoveries >= cfg.recover_tries:
            raise NlmError(f"training diverged {where} after {p.recoveries} recoveries (train.recover_tries); "
                           f"gave up. Lower train.lr or set train.clip (the last snapshot is in {self.out / 'resume'})")
        kept = {"recoveries": p.recoveries + 1, "lr_scale": p.lr_scale * cfg.recover_factor, "elapsed": p.elapsed,
                "train_seconds": p.train_seconds, "best_valid": p.best_valid}
        self.restore()  # the last snapshot: weights, optimizer, position, random state
        # The clock runs on (the time was spent), the best checkpoint saved stays the one to beat, and
        # the lowered rate and the count of recoveries carry over.
        p = self.progress
        for key, value in kept.items():
            setattr(p, key, value)
        tries, scale = p.recoveries, p.lr_scale
        self._log({"step": p.step, "epoch": p.epoch, "event": "recovered", "diverged": where, "lr_scale": scale,
                   "recoveries": tries})
        if self.rank == 0:
            self.bar.write(f"training diverged {where}: back to step {p.step}, the rate times {scale:g} "
                           f"(recovery {tries} of {cfg.recover_tries})")

    def _catch_interrupt(self) -> None:
        """The first Ctrl-C ends the run cleanly after the current step (resumable); a second one aborts."""
        self.interrupted = False
        self._previous_sigint = None
        if threading.current_thread() is not threading.main_thread():
            return
        # None: a handler not set from Python, which cannot be put back; the default then
        self._previous_sigint = previous = signal.getsignal(signal.SIGINT) or signal.SIG_DFL

        def handler(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, previous)
            if self.show_progress:
                print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr)

        signal.signal(signal.SIGINT, handler)

    def _should_stop(self, started: float) -> bool:
        """Also advances the run's clock; with several processes, rank 0's decision and clock hold for all."""
        cfg, p = self.cfg, self.progress
        p.elapsed = time.perf_counter() - started
        stop = self.interrupted or (cfg.max_steps and p.step >= cfg.max_steps) or \
            (cfg.max_minutes and p.elapsed >= cfg.max_minutes * 60)
        if self.world > 1:
            shared = torch.tensor([1.0 if stop else 0.0, p.elapsed], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, 0)
            stop, p.elapsed = bool(shared[0].item()), shared[1].item()
        return bool(stop)

    def end_epoch(self) -> None:
        p = self.progress
        self.validate()
        end_of_epoch_decay(self.cfg, p)
        p.epoch += 1
        p.window = 0
        self.task.new_epoch()
        self.snapshot()

    def validate(self) -> None:
        """The task's validation figure; saves the weights as the run's checkpoint when they are the best
        so far. With train.ema, the weights validated and saved are the moving average."""
        with self.average.applied() if self.average is not None else nullcontext():
            self._validate()

    def _validate(self) -> None:
        p = self.progress
        p.valid_loss, figures = self.task.validate()
        self.validated_at = p.step
        if not math.isfinite(p.valid_loss):
            raise NlmError(f"training diverged: validation at step {p.step} gave {p.valid_loss}; lower train.lr or "
                           f"set train.clip (the last snapshot, if any, is in {self.out / 'resume'})")
        improved = p.valid_loss < p.best_valid
        record = {"step": p.step, "epoch": p.epoch, "elapsed": p.elapsed, **figures}
        self._log(record)
        self.bar.validated(p.step, p.epoch, p.elapsed, p.valid_loss, figures.get("valid_bpc") is not None,
                           text=self.task.figure_text(record))
        if improved:
            p.best_valid = p.valid_loss
            if self.rank == 0:
                self.task.save(self.out, record)

    # ---- resume -----------------------------------------------------------------------------
    def gathered(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.world == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor)
        return parts

    def snapshot(self) -> None:
        """Write resume/ (atomically, as a whole directory) with all a later --resume needs."""
        carried = self.task.carry()
        rngs = self.gathered(self._rng_state().to(self.device))
        if self.rank != 0:
            return
        tensors = {f"model.{k}": v for k, v in checkpoint.tensors_of(self.model).items()}
        opt = self.optimizer.state_dict()
        meta = {"param_groups": opt["param_groups"], "state": {}}
        for idx, values in opt["state"].items():
            meta["state"][str(idx)] = {}
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    meta["state"][str(idx)][key] = value
        tensors.update(carried)
        if self.average is not None:
            tensors.update(self.average.tensors())
        for r, rng in enumerate(rngs):
            tensors[f"rng.{r}"] = rng.cpu()
        state = {"progress": asdict(self.progress), "optimizer": meta, "world": self.world,
                 "recipe": self.recipe.to_dict()}
        tmp = Path(tempfile.mkdtemp(prefix=".resume.tmp-", dir=self.out))
        try:
            save_file(tensors, str(tmp / "tensors.safetensors"))
            checkpoint.write_json(tmp / "state.json", state)
            checkpoint.replace_dir(tmp, self.out / "resume")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def restore(self) -> None:
        folder = self.out / "resume"
        state = checkpoint.read_json(folder / "state.json")
        try:
            self._restore(folder, state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise NlmError(f"{folder}: damaged resume state ({type(e).__name__}: {e})") from None
        self.on_rank0(self._trim_log)

    def _restore(self, folder: Path, state: dict) -> None:
        if state["world"] != self.world:
            raise NlmError(f"{folder}: saved by {state['world']} processes; resume it with the same number")
        saved = state["recipe"]
        now = self.recipe.to_dict()
        for section, key in [("data", k) for k in now["data"]] + [("model", k) for k in now["model"]] + \
                list(self.task.resume_keys):
            was = saved.get(section, {}).get(key, getattr(config.SECTIONS[section](), key))  # added since: default
            if json.loads(json.dumps(now[section][key])) != json.loads(json.dumps(was)):
                raise NlmError(f"{folder}: the run was saved with {section}.{key} = {was!r}, "
                               f"not {now[section][key]!r}; resume it with the same value")
        try:
            tensors = load_file(str(folder / "tensors.safetensors"))
        except (SafetensorError, OSError) as e:
            raise NlmError(f"{folder / 'tensors.safetensors'}: unreadable ({e})") from None
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not (k == "decoder.weight" and getattr(self.recipe.model, "tie_weights", False))]
        if missing or unexpected:
            raise NlmError(f"{folder / 'tensors.safetensors'}: weights do not match the model "
                           f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
        opt_state = {}
        for idx, values in state["optimizer"]["state"].items():
            opt_state[int(idx)] = dict(values)
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, idx, key = name.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = value
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
        for group in self.optimizer.param_groups:  # settings that may change on resume take their new values
            group["weight_decay"] = self.cfg.weight_decay
            if "momentum" in group:
                group["momentum"] = self.cfg.momentum
        self.progress = Progress(**state["progress"])
        self.task.restore(tensors, self.progress)
        if self.average is not None:
            self.average.load(tensors)
        self._set_rng_state(tensors[f"rng.{self.rank}"])

    def _trim_log(self) -> None:
        """Records past the snapshot are logged again by the resumed run: drop them."""
        log = self.out / "metrics.jsonl"
        kept = "".join(json.dumps(r) + "\n" for r in checkpoint.read_jsonl(log) if r.get("step", 0) <= self.progress.step)
        checkpoint.atomic_write(log, lambda path: path.write_text(kept, encoding="utf-8"))

    def _rng_state(self) -> torch.Tensor:
        """CPU generator state, followed by this device's CUDA generator state when training on a GPU."""
        state = torch.get_rng_state()
        if self.device.type == "cuda":
            state = torch.cat([state, torch.cuda.get_rng_state(self.device)])
        return state

    def _set_rng_state(self, state: torch.Tensor) -> None:
        cpu = torch.get_rng_state().numel()
        torch.set_rng_state(state[:cpu].clone())
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state[cpu:].clone(), self.device)

    # ---- reporting --------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _log_train(self, lr: float, window: "Window") -> None:
        """Log the mean loss, gradient norm and token rate of the steps since the last log line."""
        p = self.progress
        p.train_loss = window.loss / window.steps
        rate = (p.tokens - window.tokens) / (time.perf_counter() - window.since)
        self._log({"step": p.step, "epoch": p.epoch, "elapsed": p.elapsed, "lr": lr, "train_loss": p.train_loss,
                   "grad_norm": window.norm / window.steps, "grad_norm_max": window.norm_max, "tokens_per_s": rate})
        self.bar.update(p.step, p.elapsed, p.epoch, p.train_loss, rate)

    def plot(self) -> None:
        if self.rank == 0:
            from neurallm.plots import training_curves

            training_curves(self.out / "metrics.jsonl", self.out / "curves.png")

    def summary(self, seconds: float) -> dict:
        p = self.progress
        return {"checkpoint": str(self.out), "steps": p.step, "epochs_completed": p.epoch - 1,
                "seconds": seconds,  # this command's wall-clock time
                "elapsed_seconds": p.elapsed,  # the run's clock, across resumes (what --max-minutes bounds)
                "train_seconds": p.train_seconds, "tokens": p.tokens,
                # over the run's wall-clock, validation and snapshots included (as benchmarks/ measures both sides)
                "tokens_per_s": p.tokens / max(p.elapsed, 1e-9),
                "train_step_tokens_per_s": p.tokens / max(p.train_seconds, 1e-9),  # training steps only
                "train_loss": p.train_loss, **self.task.summary(p), "recoveries": p.recoveries,
                "peak_rss_mb": runtime.peak_rss_mb(),
                "processes": self.world, "device": str(self.device), "interrupted": self.interrupted}


def run(task: Task, out, resume: bool = False, show_progress: bool = True, loop_class=Loop) -> dict:
    loop = loop_class(task, Path(out), resume=resume, show_progress=show_progress)
    try:
        return loop.fit()
    finally:
        loop.close()
