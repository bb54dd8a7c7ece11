"""One runner: train, validate every epoch, test, for any registered variant.

Training follows the reference recipe (Adam, lr halved every 10 epochs, grad-norm clip 12,
CE + the variant's auxiliary losses); every setting can be changed per run. The run is
identified by a hash of everything that determines its result (variant config, data set id,
seed, training settings, teacher runs), so starting the same run again resumes it from its last
completed epoch, and a complete run is not run twice. The id is computed from the data set's
:class:`~harness.data.dataset.DataInfo` alone (:func:`harness.training.plan.plan`), so reports and
grids know every run id without reading a feature.

A run goes through named steps around one state object (:class:`_Run`): set up (model, the
shared training step of :mod:`harness.model.step`, schedule, resume from ``state.pt``, a student's
teacher outputs from :mod:`harness.training.teacher_cache`), one epoch at a time (train, validate,
checkpoint), then evaluate (test at the last and the best-validation epoch, the evaluation-time
ablations) and write the record, with its training compute (:mod:`harness.measurement.bill`). The
training step has no host synchronisation: losses and accuracy are summed on the device and read once
per epoch (and, for the progress display, every ``log_every`` steps).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import pickle
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from rich.console import Console

import variants
from variants.dualvgr import kept_clips

from harness.data import dataset as D
from harness.runs import identity
from harness.training import teacher_cache
from harness.evaluation import metrics as M
from harness.measurement.bill import run_compute
from harness.measurement.costs import run_cost
from harness.console import progress_bar, say
from harness.env import (apply_math_flags, check_precision, device_name, environment, git_commit, lstm_precision,
    resolve_device, runs_sharing_device, seed_everything)
from harness.env import sync as _sync
from harness.evaluation.evaluate import ABLATIONS, evaluate
from harness.model.inputs import param_counts
from harness.data.features import InMemoryFeatures
from harness.training.plan import (Plan, RunFailed, RunPruned, RunSpec, check_plans, feature_modalities,
    feature_mode, plan)
from harness.measurement.pruning import pruned_info
from harness.runs.record import RECORD_VERSION, Record, teacher_ref
from harness.training.sinks import Sinks, check_sinks, run_hparams
from harness.model.step import TrainStep, build_step
from harness.runs.store import WEIGHTS, DamagedRun, ResultsStore, StateError, read_state
from harness.files import atomic_torch_save, atomic_write_bytes, file_digest, held_elsewhere, locked
from harness.training.teacher_cache import TeacherOutputs

# ----------------------------------------------------------------------------- training


#: how :func:`train` got a run's record: trained (or resumed) here, found complete in the store, or trained by
#: another process while this one waited for the run's lock
HOW = ("trained", "reused", "waited")


class Trained(dict):
    """A run's record (as the store holds it) and :attr:`how` this call got it (one of :data:`HOW`)."""

    def __init__(self, record: dict, how: str):
        super().__init__(record)
        self.how = how


def check_run(device: str | torch.device | None, precision: str, log=()) -> tuple[torch.device, tuple[str, ...]]:
    """What fails before a run's data is read: the device (resolved), the training precision on it and the
    logging sinks (checked); returns the device and the sinks."""
    dev = resolve_device(device)
    check_precision(dev, precision, train=True)
    return dev, check_sinks(log)


def eval_batch_size(train_batch: int) -> int:
    """The batch size a run evaluates at: its training batch size, at least 256 (no gradients to hold)."""
    return max(train_batch, 256)


@dataclass
class _Options:
    """How :func:`train` trains a plan and its teachers (none of it part of a run id)."""

    console: Console
    progress: bool = True
    log_every: int = 25
    teacher_cache: bool = True
    refuse_damaged: bool = False
    log: tuple[str, ...] = ()


def train(run: Plan | RunSpec, store: ResultsStore | None = None, *, data: D.VideoQAData | None = None,
          device: str | torch.device | None = "auto", force: bool = False, progress: bool = True,
          console: Console | None = None, log_every: int = 25, teacher_cache: bool = True,
          refuse_damaged: bool = False, log: tuple[str, ...] = (),
          on_epoch: Callable[[int, float], bool] | None = None) -> Trained:
    """Train and evaluate one run and the teacher runs it needs; returns its record (also written to
    ``store``) and how it was got (:class:`Trained`).

    ``run``: its plan (:func:`harness.training.plan.plan`), which the caller checked with :func:`check_run`
    (the CLI, a grid's worker, a search): its teachers train from their own plans, and the dry run of
    :func:`harness.training.plan.check_plans` runs once (here, when the plan was not checked yet, before
    its teachers train). Or a :class:`RunSpec`: checked, its data loaded (unless ``data``) and planned here.

    A complete run already in the store is returned as is (unless ``force``). An incomplete one
    resumes from its last completed epoch. ``teacher_cache``: a distilled student reads its teachers' outputs
    from the cache of :mod:`harness.training.teacher_cache` (built on first use) instead of running the
    teachers every step; the same training, so it is not part of the run id. ``spec.require_code``: a
    complete run (its teachers too) is reused only when its record was computed by the code of this
    fingerprint (:func:`harness.runs.identity.code_fingerprint`); otherwise it is trained again from scratch.
    A complete run (this one, or a teacher) whose weights are damaged is set aside and retrained
    (:meth:`ResultsStore.usable`), or, with ``refuse_damaged``, refused (DamagedRun). ``log``: live logging
    sinks (:mod:`harness.training.sinks`) for the runs trained now, teachers included; not part of the run id
    either. ``on_epoch(epoch, val_acc)`` (a search's pruner; a test stopping a run to resume it): called after
    each epoch of this run (a resumed run's past epochs first); True stops the run there as pruned
    (``pruned.json``, no record, RunPruned); not part of the run id, and changes no record.
    """
    if isinstance(run, RunSpec):
        device, log = check_run(device, run.precision, log)
        data = data or D.load(run.data, mode=feature_mode(run), modalities=feature_modalities(run))
        run = plan(run, data)
    data = data or D.load(run.spec.data, mode=feature_mode(run.spec), modalities=feature_modalities(run.spec))
    store = store or ResultsStore()
    dev = resolve_device(device)
    apply_math_flags(dev, run.train.get("precision", "fp32"))  # TF32 chosen, not inherited (recorded in environment)
    store.write_data_info(data.info.to_dict())
    opts = _Options(console or Console(stderr=True), progress, log_every, teacher_cache, refuse_damaged, tuple(log))
    return _train_plan(run, store, data, dev, force, opts, on_epoch)


def _train_plan(p: Plan, store: ResultsStore, data: D.VideoQAData, dev: torch.device, force: bool, opts: _Options,
                on_epoch: Callable[[int, float], bool] | None = None) -> Trained:
    """:func:`train` of one plan: its teachers (found in the store by their plans, or trained now), then itself,
    under its lock (one process trains a given run; others wait, then read its record)."""
    force = force or stale(store, p.run_id, p.spec.require_code)
    if not force and store.usable(p.run_id, opts.refuse_damaged):
        return Trained(store.read_record(p.run_id), "reused")
    if p.teachers and p.teacher_keys is None:
        check_plans([p])  # before its teachers train
    teachers, teacher_records = [], []
    for tp in p.teachers:
        trec = _train_plan(tp, store, data, dev, False, opts)
        teachers.append(_frozen_teacher(store, trec, dev))
        teacher_records.append(trec)
    lock = store.run_dir(p.run_id) / RUN_LOCK
    waited = held_elsewhere(lock)
    if waited:
        say(opts.console, f"another process is training {p.run_id}: waiting for it, then using its record", "yellow")
    with run_lock(store.run_dir(p.run_id)):
        if not force and store.usable(p.run_id, opts.refuse_damaged):
            return Trained(store.read_record(p.run_id), "waited" if waited else "reused")
        run = _Run(p, store, data, dev, teachers, teacher_records, opts)
        run.on_epoch = on_epoch
        return Trained(run.execute(force), "trained")


def stale(store: ResultsStore, run_id: str, require_code: str | None) -> bool:
    """Whether the run is complete but was computed by other code than ``require_code`` (None: any code will do)."""
    if require_code is None or not store.is_complete(run_id):
        return False
    return identity.code_of(store.read_record(run_id)) != require_code


def _frozen_teacher(store: ResultsStore, trec: dict, dev: torch.device) -> torch.nn.Module:
    """A trained teacher's best weights, frozen: eval mode, no autograd. Weights that cannot be read
    (damaged after their check) are set aside, the teacher retrained on the next run, and the error
    names the file."""
    tmodel = variants.build(variants.VariantConfig(**trec["variant_config"]))
    path = store.run_dir(trec["run_id"]) / WEIGHTS
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        store.set_aside(trec["run_id"], f"{path} cannot be read ({e})")
        raise DamagedRun(f"teacher {trec['variant']} ({trec['run_id']}): {path} cannot be read ({e}); set aside, "
                         f"the teacher is retrained when the run is started again") from None
    tmodel.load_state_dict(weights)
    return tmodel.to(dev).eval().requires_grad_(False)


#: the lock file in a run's directory, held by the process training it
RUN_LOCK = ".lock"


@contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on a run directory (POSIX advisory lock; held until training ends)."""
    with locked(run_dir / RUN_LOCK):
        yield


def epoch_line(rec: dict, epochs: int) -> str:
    """One epoch's line, by the metric that chooses the best epoch: validation accuracy, or for a
    count the validation MSE (lower is better), the exact-match accuracies in brackets."""
    head = f"epoch {rec['epoch'] + 1}/{epochs} loss {rec['loss']:.3f}"
    if rec.get("val_mse") is not None:
        return (f"{head} val MSE {rec['val_mse']:.3f} (exact match: train {rec['train_acc']:.1f}%, "
                f"val {rec['val_acc']:.1f}%)")
    return f"{head} train {rec['train_acc']:.1f}% val {rec['val_acc']:.1f}%"


class _Display:
    """rich progress on a terminal; plain per-epoch lines, named by the run, otherwise (logs, CI)."""

    def __init__(self, console: Console, enabled: bool, title: str, epochs: int, steps: int):
        self.console, self.title, self.enabled = console, title, enabled
        self.live = enabled and console.is_terminal
        self.progress = None
        if self.live:
            self.progress = progress_bar(console, disable=False)
            self.progress.start()
            self.t_epochs = self.progress.add_task(f"{title} epochs", total=epochs, info="")
            self.t_steps = self.progress.add_task("steps", total=steps, info="")

    def epoch_start(self, epoch: int) -> None:
        if self.live:
            self.progress.update(self.t_epochs, completed=epoch)
            self.progress.reset(self.t_steps, description=f"epoch {epoch + 1}")

    def step(self, n: int, info: str) -> None:
        if self.live:
            self.progress.update(self.t_steps, advance=n, info=info)

    def epoch_end(self, line: str, completed: int) -> None:
        if self.live:
            self.progress.update(self.t_epochs, completed=completed, info=line)
        elif self.enabled:
            say(self.console, f"{self.title} {line}")

    def close(self) -> None:
        if self.live:
            self.progress.stop()


@dataclass
class _Progress:
    """What a run has done so far; saved in ``state.pt`` after every epoch."""

    history: list[dict] = field(default_factory=list)
    #: the best validation epoch: its accuracy, its selection score (metrics.selection_score; absent
    #: from older state files, whose score was the accuracy) and its index
    best: dict = field(default_factory=lambda: {"acc": -1.0, "score": -math.inf, "epoch": -1})
    next_epoch: int = 0
    train_time: float = 0.0  # seconds in training steps
    train_samples: int = 0
    active_time: float = 0.0  # seconds this run's processes spent on it (not the time a killed run lay dead)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    teacher_step_samples: int = 0  # samples whose teachers ran forward inside the training step (no cache)
    cache_build_s: float = 0.0  # seconds of active_time spent building teacher-output caches
    cache_builds: list[str] = field(default_factory=list)  # ids of the cache builds this run made

    def stale_epochs(self) -> int:
        return 0 if not self.history else len(self.history) - 1 - self.best["epoch"]


class _Run:
    """One run's state and its steps: :meth:`setup`, :meth:`train_epoch`, :meth:`end_epoch`,
    :meth:`final_eval`, :meth:`record`."""

    def __init__(self, p: Plan, store: ResultsStore, data: D.VideoQAData, dev: torch.device,
                 teachers: list[torch.nn.Module], teacher_records: list[dict], opts: _Options):
        self.p, self.store, self.data, self.dev = p, store, data, dev
        self.task = variants.task_of(p.cfg)  # what the questions ask (variants.tasks)
        self.read_answer = variants.task(self.task).predict
        self.teachers, self.teacher_records = teachers, teacher_records
        self.console, self.show_progress, self.log_every = opts.console, opts.progress, opts.log_every
        self.run_dir = store.run_dir(p.run_id)
        self.state_path, self.best_path = self.run_dir / "state.pt", self.run_dir / WEIGHTS
        self.precision = p.train.get("precision", "fp32")
        self.use_teacher_cache = opts.teacher_cache and bool(teachers)
        self.tcache: TeacherOutputs | None = None
        self.log = opts.log
        self.on_epoch: Callable[[int, float], bool] | None = None  # train's
        self.t_process = time.perf_counter()

    # -- set up

    def setup(self, force: bool) -> None:
        cfg, tc = self.p.cfg, self.p.train
        seed_everything(self.p.spec.seed)
        self.model = variants.build(cfg).to(self.dev)
        if tc["glove"] and hasattr(self.model, "word_embedding"):
            with torch.no_grad():
                self.model.word_embedding.weight.copy_(self.data.glove)
        self.step: TrainStep = build_step(cfg, self.model, self.teachers, lr=tc["lr"], grad_clip=tc["grad_clip"],
                                          precision=self.precision)
        self.sched = torch.optim.lr_scheduler.StepLR(self.step.optimizer, step_size=tc["lr_decay_every"],
                                                     gamma=tc["lr_decay"])
        self.features = self._device_features()
        self.splits = {k: v.to(self.dev) for k, v in self.data.splits.items()}
        self.batch_size = tc["batch_size"]
        self.drop_last = len(self.splits["train"]) % self.batch_size == 1  # BatchNorm cannot train on a batch of one
        self.state = _Progress()
        if self.state_path.exists() and not force:
            self._resume()
        for stale_tmp in self.run_dir.glob(".*.tmp"):  # left by a process killed while writing
            stale_tmp.unlink(missing_ok=True)
        if self.use_teacher_cache:
            self.tcache = self._teacher_outputs()
            self.step.teachers = []  # the cache replaces them: their weights leave the device
            self.teachers.clear()  # (the caller's list too)
        self.resident_mib = _reset_peak(self.dev)

    def _device_features(self) -> D.Features:
        """Features and questions on the device once (GPU-resident when they fit; streaming otherwise)."""
        features = self.data.features
        if isinstance(features, InMemoryFeatures) and self.dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.dev)
            if features.nbytes < 0.5 * free:
                features = features.to(self.dev)
        return features

    def _teacher_outputs(self) -> TeacherOutputs:
        """The teachers' outputs on the training split, from their cache (built now if needed):
        only the keys the objective reads (the plan's, found by :func:`harness.training.plan.check_plans`)."""
        tr = self.splits["train"]
        cache = teacher_cache.prepare(self.store, self.teacher_records, self.teachers, self.p.teacher_keys, tr,
                                      self.features, self.data.data_id, self.dev, self.precision,
                                      on_build=lambda msg: say(self.console, f"{self.p.run_id}: {msg}", "dim"))
        self.state.cache_build_s += sum(i["build_s_now"] for i in cache.info)
        for f in (f for i in cache.info for f in i["files"] if f["built_now"]):
            if f["build_id"] not in self.state.cache_builds:
                self.state.cache_builds.append(f["build_id"])
        return cache

    def _resume(self) -> None:
        # loaded on the CPU whatever the device: the RNG states must stay CPU ByteTensors (set_rng_state and
        # cuda.set_rng_state take nothing else); load_state_dict moves the model's and optimizer's tensors
        st = read_state(self.state_path, self.p.run_id)  # weights_only: no pickled code runs
        try:
            self.model.load_state_dict(st["model"])
            self.step.objective.load_state_dict(st["objective"])
            self.step.optimizer.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            torch.set_rng_state(st["rng_cpu"])
            if self.dev.type == "cuda" and st.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(st["rng_cuda"], self.dev)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise StateError(f"{self.state_path}: does not fit run {self.p.run_id} ({type(e).__name__}: "
                             f"{first.strip()[:200]}); refused, nothing resumed (delete it to train the run from its "
                             f"start)") from None
        self.state = _Progress(st["history"], st["best"], st["epoch"] + 1, st["train_time"], st["train_samples"],
                               st.get("active_time", 0.0), st["started_at"],
                               # a state from before the cache: its teachers ran in every step
                               st.get("teacher_step_samples", st["train_samples"] if self.teachers else 0),
                               st.get("cache_build_s", 0.0), st.get("cache_builds", []))
        say(self.console, f"{self.p.run_id}: resuming after epoch {self.state.next_epoch}", "dim")

    # -- one epoch

    def train_epoch(self, epoch: int, display: _Display) -> dict:
        """One pass over the training split; returns the epoch's mean loss terms and accuracy."""
        gen = torch.Generator().manual_seed(self.p.spec.seed * 1_000_003 + epoch)
        tr = self.splits["train"]
        sums = torch.zeros(2, device=self.dev)  # sum of loss * n, correct answers
        part_sums: dict[str, torch.Tensor] = {}
        count = 0
        set_epoch = getattr(self.model, "set_epoch", None)
        if set_epoch is not None:  # a model whose training follows the schedule (temporal expansion)
            set_epoch(epoch)
        _sync(self.dev)
        t0 = time.perf_counter()
        for i, b in enumerate(D.iterate_batches(tr, self.features, self.batch_size, shuffle=True, generator=gen,
                                                drop_last=self.drop_last, device=self.dev)):
            t_outs = self.tcache.gather(b.index) if self.tcache is not None else None
            out = self.step(b.appearance, b.motion, b.questions, b.lengths, b.answers, epoch=epoch,
                            teacher_outputs=t_outs, extra=b.extra)
            n = b.answers.shape[0]
            count += n
            sums += torch.stack([out.loss * n, (self.read_answer(out.logits) == b.answers).sum().to(sums.dtype)])
            for k, v in out.parts.items():
                part_sums[k] = part_sums.get(k, 0) + v.float() * n
            if display.live and (i + 1) % self.log_every == 0:
                s = sums.tolist()  # display only, every log_every steps
                display.step(self.log_every, f"loss {s[0] / count:.3f} acc {100 * s[1] / count:.1f}")
        _sync(self.dev)
        dt = time.perf_counter() - t0
        loss_sum, correct = sums.tolist()
        if not np.isfinite(loss_sum):
            raise RunFailed(f"{self.p.run_id}: loss became {loss_sum} in epoch {epoch + 1}")
        self.state.train_time += dt
        self.state.train_samples += count
        if self.teachers and self.tcache is None:
            self.state.teacher_step_samples += count
        self.sched.step()
        return {"epoch": epoch, "loss": loss_sum / count, "train_acc": 100 * correct / count,
                "lr": self.step.optimizer.param_groups[0]["lr"], "train_time_s": dt, "train_samples_per_s": count / dt,
                **{f"loss_{k}": float(v) / count for k, v in part_sums.items()}}

    def end_epoch(self, rec: dict) -> None:
        """Validate, keep the best weights, checkpoint the whole state atomically."""
        val, _ = evaluate(self.model, self.splits["val"], self.features, self.data.type_names, self.eval_batch,
                          self.dev, precision=self.precision, task=self.task)
        rec["val_acc"] = val["overall"]
        rec["val_acc_per_type"] = val["per_type"]
        if "mse" in val:
            rec["val_mse"] = val["mse"]
        st = self.state
        st.history.append(rec)
        score = M.selection_score(self.task, val)
        if score > st.best.get("score", st.best["acc"]):
            st.best = {"acc": val["overall"], "score": score, "epoch": rec["epoch"]}
            st.best["weights"] = atomic_torch_save(self.best_path, self.model.state_dict())  # size, SHA-1
        st.next_epoch = rec["epoch"] + 1
        now = time.perf_counter()
        st.active_time += now - self.t_process
        self.t_process = now
        atomic_torch_save(self.state_path, {
            "model": self.model.state_dict(), "objective": self.step.objective.state_dict(),
            "optimizer": self.step.optimizer.state_dict(), "scheduler": self.sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None,
            "history": st.history, "best": st.best, "epoch": rec["epoch"], "train_time": st.train_time,
            "train_samples": st.train_samples, "active_time": st.active_time, "started_at": st.started,
            "teacher_step_samples": st.teacher_step_samples, "cache_build_s": st.cache_build_s,
            "cache_builds": st.cache_builds,
            "run_id": self.p.run_id})

    def _ask_to_stop(self, recs: list[dict]) -> None:
        """Hand each epoch's validation accuracy to ``on_epoch``; when it answers True the run stops there:
        ``pruned.json`` (:func:`harness.measurement.pruning.pruned_info`), no record, RunPruned."""
        for rec in recs if self.on_epoch is not None else []:
            if self.on_epoch(rec["epoch"], rec["val_acc"]):
                self.state.active_time += time.perf_counter() - self.t_process
                self.t_process = time.perf_counter()
                self.store.write_pruned(self.p.run_id, pruned_info(self, rec))
                raise RunPruned(f"{self.p.run_id}: pruned after epoch {rec['epoch'] + 1} (val {rec['val_acc']:.2f}%)")

    @property
    def eval_batch(self) -> int:
        return eval_batch_size(self.batch_size)

    # -- the whole run

    def execute(self, force: bool) -> dict:
        self.setup(force)
        p = self.p
        sinks = Sinks(self.log, self.run_dir, run_hparams(
            p.run_id, p.spec.variant, p.spec.seed, self.data.data_id, list(p.cfg.teachers),
            [t.run_id for t in p.teachers], p.train, p.spec.overrides),
            warn=lambda msg: say(self.console, f"{p.run_id}: {msg}", "yellow"))
        try:
            return self._epochs_then_record(sinks)
        finally:
            sinks.close()

    def _epochs_then_record(self, sinks: Sinks) -> dict:
        tc, st = self.p.train, self.state
        epochs, first = tc["epochs"], st.next_epoch
        steps = D.num_batches(len(self.splits["train"]), self.batch_size, self.drop_last)
        display = _Display(self.console, self.show_progress, f"{self.p.spec.variant} seed {self.p.spec.seed}",
                           epochs, steps)
        try:
            self._ask_to_stop(st.history)  # a resumed run's epochs first
            for epoch in range(first, epochs):
                if tc["early_stop"] is not None and st.stale_epochs() >= tc["early_stop"]:
                    break
                display.epoch_start(epoch)
                rec = self.train_epoch(epoch, display)
                self.end_epoch(rec)
                sinks.epoch(rec)  # the values the record's history now holds
                display.epoch_end(epoch_line(rec, epochs), epoch + 1)
                self._ask_to_stop([rec])
        finally:
            display.close()
        if not st.history:
            raise RunFailed(f"{self.p.run_id}: no epoch was trained (epochs={epochs})")
        peak = _peak_since_reset(self.dev, self.resident_mib) if first < epochs else None
        metrics = self.final_eval()
        record = self.record(metrics, peak)
        sinks.final(record)
        return record

    def final_eval(self) -> dict:
        """Test at the last epoch and at the best-validation epoch (and the ablations there);
        writes the per-question predictions."""
        ev = lambda split, **kw: evaluate(self.model, self.splits[split], self.features,  # noqa: E731
                                          self.data.type_names, self.eval_batch, self.dev,
                                          precision=self.precision, task=self.task, **kw)
        test_last, pred_last = ev("test")
        # when the best epoch is the last one, best.pt holds the model's own weights: its test evaluation is the
        # one just made (not repeated; tests/training/test_runner.py checks it against best.pt evaluated anew)
        best_is_last = self.state.best["epoch"] == len(self.state.history) - 1
        if not best_is_last:
            self.model.load_state_dict(torch.load(self.best_path, map_location=self.dev, weights_only=True))
        val_best, pred_val = ev("val")
        test_best, pred_best = (test_last, pred_last) if best_is_last else ev("test")
        ablations = {a: ev("test", ablation=a)[0] for a in ABLATIONS}
        write_predictions(self.run_dir / "predictions_test.csv", self.data, "test",
                           {"pred_best": pred_best, "pred_last": pred_last})
        write_predictions(self.run_dir / "predictions_val.csv", self.data, "val", {"pred_best": pred_val})
        chosen = M.task_metric(self.task)
        best = "best validation accuracy" if chosen.name == M.PRIMARY else \
            f"{'highest' if chosen.higher_is_better else 'lowest'} validation {chosen.name}"
        return {"selection": f"test is reported at the epoch with the {best}; test_last at the last epoch trained",
                "best_epoch": self.state.best["epoch"], "val": val_best, "test": test_best, "test_last": test_last,
                "ablations": ablations}

    def record(self, metrics: dict, peak_train_mib: dict | None) -> dict:
        p, st, dev, data = self.p, self.state, self.dev, self.data
        st.active_time += time.perf_counter() - self.t_process
        self.t_process = time.perf_counter()
        speed = st.train_samples / st.train_time if st.train_time else None
        record: Record = {
            "run_id": p.run_id, "status": "complete", "record_version": RECORD_VERSION,
            "variant": p.spec.variant, "variant_config": p.cfg.to_dict(), "train_config": p.train,
            "seed": p.spec.seed, "spec": dataclasses.asdict(p.spec),
            "data": {"spec": p.spec.data, "id": data.data_id, "name": data.name, "type_names": data.type_names,
                     "sizes": {k: len(v) for k, v in data.splits.items()}, "streaming": data.features.streaming},
            "metrics": metrics, "epochs_run": len(st.history), "history": st.history,
            "train_time_s": st.train_time, "train_samples_per_s": speed,
            "cost": run_cost(self.model, p.cfg, dev, speed, peak_train_mib),
            "teacher_runs": [r["run_id"] for r in self.teacher_records],
            "weights": {WEIGHTS: st.best.get("weights") or file_digest(self.best_path)},  # checked before reuse
            "teachers": [teacher_ref(r) for r in self.teacher_records],
            "identity": {"scheme": identity.SCHEME, "computation": p.computation},
            "code": identity.code_record(),
            "environment": environment(dev),
            # what the LSTMs computed in (bf16 on CUDA runs them in fp32/TF32: harness.env.lstm_precision)
            "lstm_precision": lstm_precision(dev, self.precision),
            "runs_sharing_device": runs_sharing_device(),
            "params": param_counts(self.model), "git_commit": git_commit(), "torch_version": torch.__version__,
            "clips": {"total": p.cfg.model["num_clips"],
                      "kept": kept_clips(p.cfg.model.get("keep_ratio", 1.0), p.cfg.model["num_clips"])},
            "python_version": sys.version.split()[0], "device": str(dev), "device_name": device_name(dev),
            "started_at": st.started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            # time this run's processes spent on it, resumed runs included; not the time a killed run lay dead
            "wall_time_s": st.active_time,
        }
        record["training_compute"] = run_compute(record, self.teacher_records, train_samples=st.train_samples,
                                                 teacher_step_samples=st.teacher_step_samples,
                                                 cache_build_s=st.cache_build_s, built_by_this_run=st.cache_builds,
                                                 cache_info=self.tcache.info if self.tcache else None)
        self.store.write_record(record)
        return record


def _reset_peak(dev: torch.device) -> float | None:
    """Reset the device's peak memory once everything resident (features, model, teacher cache)
    is loaded; returns what is resident then (MiB; CUDA only, None elsewhere)."""
    if dev.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev) / 2 ** 20


def _peak_since_reset(dev: torch.device, resident_mib: float | None) -> dict | None:
    """The training epochs' peak (steps and validation, optimizer state included) apart from what
    was resident before them: ``step`` = peak - resident, and the total, as before."""
    if dev.type != "cuda" or resident_mib is None:
        return None
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return {"total": peak, "step": peak - resident_mib, "resident": resident_mib}


def write_predictions(path: Path, data: D.VideoQAData, split: str, preds: dict[str, np.ndarray]) -> None:
    s = data.splits[split]
    answers = s.answers.numpy()
    df = pd.DataFrame({"question_id": s.question_ids, "video_id": s.video_ids,
                       "qtype": [data.type_names[t] for t in s.qtypes.numpy()], "answer": answers})
    for k, v in preds.items():
        df[k] = v
        df[f"correct_{k.removeprefix('pred_')}"] = v == answers
    atomic_write_bytes(path, df.to_csv(index=False).encode())
