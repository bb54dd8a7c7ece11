"""One runner: train, validate every epoch, test, for any registered variant.

Training follows the reference recipe (Adam, lr halved every 10 epochs, grad-norm clip 12,
CE + the variant's auxiliary losses); every setting can be changed per run. The run is
identified by a hash of everything that determines its result (variant config, data set id,
seed, training settings), so starting the same run again resumes it from its last completed
epoch, and a complete run is not run twice.

The training step has no host synchronisation: losses and accuracy are summed on the device
and read once per epoch (and, for the progress display, every ``log_every`` steps).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import variants

from . import data as D
from .env import TRAIN_PRECISIONS, autocast, check_precision, device_name, git_commit, resolve_device, seed_everything
from .errors import HarnessError
from .measure import param_counts
from .metrics import accuracy_by_type
from .store import ResultsStore, atomic_torch_save, atomic_write_bytes

#: the reference's training recipe (anchors.md); data sets may suggest their own (synthetic presets)
REFERENCE_TRAIN = {"epochs": 25, "batch_size": 256, "lr": 1e-4, "lr_decay_every": 10, "lr_decay": 0.5,
                   "grad_clip": 12.0}
RECORD_VERSION = 1
@dataclass
class RunSpec:
    variant: str
    data: str = "synthetic:tiny"
    seed: int = 666
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_decay_every: int | None = None
    lr_decay: float | None = None
    grad_clip: float | None = None
    early_stop: int | None = None  # patience in epochs without a better val accuracy; None = off
    glove: bool = True
    precision: str = "fp32"  # fp32 (TF32 matmuls allowed on CUDA) or bf16 (autocast for training and evaluation)
    overrides: dict = field(default_factory=dict)  # variant settings (module_dim=..., alpha=...)

    def resolved_train(self, suggested: dict | None = None) -> dict:
        """Explicit settings > the data set's suggestions > the reference recipe."""
        out = dict(REFERENCE_TRAIN)
        out.update({k: v for k, v in (suggested or {}).items() if k in REFERENCE_TRAIN})
        for k in REFERENCE_TRAIN:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        out["early_stop"] = self.early_stop
        out["glove"] = self.glove
        if self.precision not in TRAIN_PRECISIONS:
            raise RunFailed(f"precision {self.precision!r} is not one of {', '.join(TRAIN_PRECISIONS)}")
        if self.precision != "fp32":  # fp32, the default, is left out so run ids from before the option stay valid
            out["precision"] = self.precision
        return out


class RunFailed(HarnessError, RuntimeError):
    """A run could not finish (NaN loss, bad config...); the message says why."""


def run_id_for(cfg: variants.VariantConfig, data_id: str, seed: int, train: dict,
               teacher_runs: list[str] | None = None) -> str:
    key = {"variant": cfg.to_dict(), "data": data_id, "seed": seed, "train": train, "v": RECORD_VERSION}
    if teacher_runs:
        key["teachers"] = list(teacher_runs)
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return f"{cfg.name}-{hashlib.sha1(blob).hexdigest()[:12]}"


@torch.no_grad()
def predict(model: torch.nn.Module, split: D.SplitData, features: D.Features, batch_size: int,
            device: torch.device, feature_transform=None, precision: str = "fp32") -> tuple[torch.Tensor, float | None]:
    """Argmax predictions for a split, kept on the device until the end (one transfer), and the
    mean reconstruction error for models that reconstruct their input (else None)."""
    model.eval()
    preds, recon = [], []
    for b in D.iterate_batches(split, features, batch_size, device=device):
        app, mot = (b.appearance, b.motion) if feature_transform is None else feature_transform(b)
        with autocast(device, precision):
            out = model(app, mot, b.questions, b.lengths)
        preds.append(out["logits"].argmax(1))
        if "recon_loss" in out:
            recon.append(out["recon_loss"].float() * b.answers.shape[0])
    recon_mse = float(torch.stack(recon).sum()) / len(split) if recon else None
    return torch.cat(preds).cpu(), recon_mse


#: evaluation-time ablations: which evidence each question type uses
ABLATIONS = ("shuffle_video", "zero_appearance", "zero_motion")


def ablated(split: D.SplitData, name: str, seed: int = 0):
    """(split, feature_transform) for an evaluation-time ablation: ``shuffle_video`` pairs every
    question with another question's video (a fixed permutation), ``zero_appearance`` /
    ``zero_motion`` replace that stream by zeros."""
    if name == "shuffle_video":
        perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).to(split.video_rows.device)
        return dataclasses.replace(split, video_rows=split.video_rows[perm]), None
    if name == "zero_appearance":
        return split, lambda b: (torch.zeros_like(b.appearance), b.motion)
    if name == "zero_motion":
        return split, lambda b: (b.appearance, torch.zeros_like(b.motion))
    raise ValueError(f"unknown ablation {name!r} (known: {', '.join(ABLATIONS)})")


def evaluate(model, split: D.SplitData, features: D.Features, type_names: list[str], batch_size: int,
             device: torch.device, ablation: str | None = None, precision: str = "fp32") -> tuple[dict, np.ndarray]:
    transform = None
    if ablation is not None:
        split, transform = ablated(split, ablation)
    pred, recon_mse = predict(model, split, features, batch_size, device, transform, precision)
    pred = pred.numpy()
    correct = pred == split.answers.cpu().numpy()
    metrics = accuracy_by_type(correct, split.qtypes.cpu().numpy(), type_names)
    if recon_mse is not None:
        metrics["recon_mse"] = recon_mse
    return metrics, pred


class _Display:
    """rich progress on a terminal; plain per-epoch lines otherwise (logs, CI)."""

    def __init__(self, console: Console, enabled: bool, title: str, epochs: int, steps: int):
        self.console, self.title = console, title
        self.live = enabled and console.is_terminal
        self.progress = None
        if self.live:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=console, transient=False)
            self.progress.start()
            self.t_epochs = self.progress.add_task(f"{title} epochs", total=epochs, info="")
            self.t_steps = self.progress.add_task("steps", total=steps, info="")
        self.enabled = enabled

    def epoch_start(self, epoch: int, completed: int) -> None:
        if self.live:
            self.progress.update(self.t_epochs, completed=completed)
            self.progress.reset(self.t_steps, description=f"epoch {epoch + 1}")

    def step(self, n: int, info: str | None = None) -> None:
        if self.live:
            self.progress.update(self.t_steps, advance=n, **({"info": info} if info else {}))

    def epoch_end(self, line: str, completed: int) -> None:
        if self.live:
            self.progress.update(self.t_epochs, completed=completed, info=line)
        elif self.enabled:
            self.console.print(f"{self.title} {line}", highlight=False)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


@dataclass
class Plan:
    """What a run is, before it runs: its resolved config, training settings, id and the plans
    of the teachers it needs (their ids are part of its id)."""

    spec: RunSpec
    cfg: variants.VariantConfig
    train: dict
    run_id: str
    teachers: list["Plan"]

    def all_run_ids(self) -> list[str]:
        """This run's id and its teachers' (recursively), teachers first."""
        out = [r for t in self.teachers for r in t.all_run_ids()]
        return [*dict.fromkeys([*out, self.run_id])]


def plan(spec: RunSpec, data: D.VideoQAData) -> Plan:
    """Resolve a run's settings (explicit > data set suggestions > reference) and its id."""
    train_cfg = spec.resolved_train(data.meta.get("suggested_train"))
    suggested_model = dict(data.meta.get("suggested_model", {}))
    dims = {k: v for k, v in data.dims.items() if k in variants.DATA_KEYS}
    cfg = variants.get_config(spec.variant, **{**suggested_model, **dims, **spec.overrides})
    data.check_model_config(cfg.model)
    teachers = [plan(dataclasses.replace(spec, variant=t, overrides={}), data) for t in cfg.teachers]
    run_id = run_id_for(cfg, data.data_id, spec.seed, train_cfg, [t.run_id for t in teachers])
    return Plan(spec, cfg, train_cfg, run_id, teachers)


def train(spec: RunSpec, store: ResultsStore | None = None, *, data: D.VideoQAData | None = None,
          device: str | torch.device | None = "auto", force: bool = False, progress: bool = True,
          console: Console | None = None, log_every: int = 25, stop_after_epochs: int | None = None) -> dict:
    """Train and evaluate one run; returns its record (also written to ``store``).

    A complete run already in the store is returned as is (unless ``force``). An incomplete one
    resumes from its last completed epoch. ``stop_after_epochs`` ends the process's work early
    without writing a record (used to test resuming).
    """
    store = store or ResultsStore()
    console = console or Console(stderr=True)
    dev = resolve_device(device)
    data = data or D.load(spec.data)
    p = plan(spec, data)
    cfg, train_cfg, run_id = p.cfg, p.train, p.run_id
    # before anything trains (teachers included): a precision this device cannot run fails now
    check_precision(dev, train_cfg.get("precision", "fp32"), train=True)
    if store.is_complete(run_id) and not force:
        return store.read_record(run_id)
    # teachers first: found in the store by their config, data set and seed, or trained now
    teachers, teacher_records = [], []
    for tp in p.teachers:
        trec = train(tp.spec, store, data=data, device=device, progress=progress, console=console, log_every=log_every)
        tcfg = variants.VariantConfig(**trec["variant_config"])
        tmodel = variants.build(tcfg)
        tmodel.load_state_dict(torch.load(store.run_dir(trec["run_id"]) / "best.pt", map_location="cpu",
                                          weights_only=True))
        teachers.append(tmodel.to(dev).eval().requires_grad_(False))
        teacher_records.append(trec)
    run_dir = store.run_dir(run_id)
    with run_lock(run_dir):  # one process trains a given run; others wait, then read its record
        if store.is_complete(run_id) and not force:
            return store.read_record(run_id)
        return _train_run(spec, store, data, dev, cfg, train_cfg, run_id, teachers, teacher_records, force,
                          progress, console, log_every, stop_after_epochs)


@contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on a run directory (POSIX advisory lock; held until training ends)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_run(spec, store, data, dev, cfg, train_cfg, run_id, teachers, teacher_records, force, progress,
               console, log_every, stop_after_epochs) -> dict:
    run_dir = store.run_dir(run_id)

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    seed_everything(spec.seed)
    model = variants.build(cfg).to(dev)
    if train_cfg["glove"] and hasattr(model, "word_embedding"):
        with torch.no_grad():
            model.word_embedding.weight.copy_(data.glove)
    teacher_dims = sorted({t.cfg.module_dim for t in teachers})
    if len(teacher_dims) > 1:
        raise RunFailed(f"{run_id}: teachers {cfg.teachers} have different module_dim {teacher_dims}; "
                        f"distillation losses take one teacher width")
    teacher_dim = teacher_dims[0] if teachers else None
    objective = variants.objective(cfg, teacher_dim=teacher_dim).to(dev)
    # distillation losses may learn (a hint regressor): trained with the student, not counted in it
    trainable = [*model.parameters(), *objective.parameters()]
    # fused Adam on CUDA (one kernel for all parameters); the for-each implementation elsewhere
    opt = torch.optim.Adam(trainable, lr=train_cfg["lr"], fused=dev.type == "cuda")
    precision = train_cfg.get("precision", "fp32")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=train_cfg["lr_decay_every"], gamma=train_cfg["lr_decay"])

    # features and questions on the device once (GPU-resident when they fit; streaming otherwise)
    features = data.features
    if isinstance(features, D.InMemoryFeatures) and dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        if features.nbytes < 0.5 * free:
            features = features.to(dev)
    splits = {k: v.to(dev) for k, v in data.splits.items()}
    tr, va = splits["train"], splits["val"]
    bs = train_cfg["batch_size"]
    drop_last = len(tr) % bs == 1  # BatchNorm cannot train on a batch of one
    steps = D.num_batches(len(tr), bs, drop_last)

    state_path, best_path = run_dir / "state.pt", run_dir / "best.pt"
    history: list[dict] = []
    best = {"acc": -1.0, "epoch": -1}
    start_epoch, train_time, train_samples = 0, 0.0, 0
    if state_path.exists() and not force:
        st = torch.load(state_path, map_location=dev, weights_only=False)
        model.load_state_dict(st["model"])
        objective.load_state_dict(st["objective"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng_cpu"])
        if dev.type == "cuda" and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"], dev)
        history, best = st["history"], st["best"]
        start_epoch, train_time, train_samples = st["epoch"] + 1, st["train_time"], st["train_samples"]
        started = st["started_at"]
        console.print(f"[dim]{run_id}: resuming after epoch {start_epoch}[/dim]")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale_tmp in run_dir.glob(".*.tmp"):  # left by a process killed while writing
        stale_tmp.unlink(missing_ok=True)

    epochs = train_cfg["epochs"]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    display = _Display(console, progress, spec.variant, epochs, steps)
    stale = 0 if not history else len(history) - 1 - best["epoch"]
    try:
        for epoch in range(start_epoch, epochs):
            if train_cfg["early_stop"] is not None and stale >= train_cfg["early_stop"]:
                break
            display.epoch_start(epoch, epoch)
            model.train()
            gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
            sums = torch.zeros(2, device=dev)  # sum of loss * n, correct answers
            count = 0
            part_sums: dict[str, torch.Tensor] = {}
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for step, b in enumerate(D.iterate_batches(tr, features, bs, shuffle=True, generator=gen,
                                                        drop_last=drop_last, device=dev)):
                with autocast(dev, precision):
                    out = model(b.appearance, b.motion, b.questions, b.lengths)
                    t_outs = None
                    if teachers:
                        with torch.no_grad():  # frozen teachers: eval mode, no autograd
                            t_outs = [t(b.appearance, b.motion, b.questions, b.lengths) for t in teachers]
                    loss, parts = objective(out, b.answers, t_outs, epoch=epoch)
                loss = loss.float()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, train_cfg["grad_clip"])
                opt.step()
                n = b.answers.shape[0]
                count += n
                sums += torch.stack([loss.detach() * n, (out["logits"].argmax(1) == b.answers).sum().to(sums.dtype)])
                for k, v in parts.items():
                    part_sums[k] = part_sums.get(k, 0) + v.float() * n
                if display.live and (step + 1) % log_every == 0:
                    s = sums.tolist()  # display only, every log_every steps
                    display.step(log_every, f"loss {s[0] / count:.3f} acc {100 * s[1] / count:.1f}")
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            s = sums.tolist() + [count]
            if not np.isfinite(s[0]):
                raise RunFailed(f"{run_id}: loss became {s[0]} in epoch {epoch + 1}")
            train_time += dt
            train_samples += int(s[2])
            sched.step()
            val, _ = evaluate(model, va, features, data.type_names, max(bs, 256), dev, precision=precision)
            rec = {"epoch": epoch, "loss": s[0] / s[2], "train_acc": 100 * s[1] / s[2], "val_acc": val["overall"],
                   "lr": opt.param_groups[0]["lr"], "train_time_s": dt,
                   **{f"loss_{k}": float(v) / s[2] for k, v in part_sums.items()}}
            history.append(rec)
            if val["overall"] > best["acc"]:
                best = {"acc": val["overall"], "epoch": epoch}
                atomic_torch_save(best_path, model.state_dict())
                stale = 0
            else:
                stale += 1
            atomic_torch_save(state_path, {
                "model": model.state_dict(), "objective": objective.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "history": history, "best": best, "epoch": epoch, "train_time": train_time,
                "train_samples": train_samples, "started_at": started, "run_id": run_id})
            display.epoch_end(f"epoch {epoch + 1}/{epochs} loss {rec['loss']:.3f} train {rec['train_acc']:.1f}% "
                              f"val {rec['val_acc']:.1f}%", epoch + 1)
            if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs and epoch + 1 < epochs:
                return {"run_id": run_id, "status": "stopped", "epoch": epoch}
    finally:
        display.close()

    peak_train = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" and start_epoch < epochs else None
    if not history:
        raise RunFailed(f"{run_id}: no epoch was trained (epochs={epochs})")
    # test at the last epoch and at the best-validation epoch
    eval_bs = max(bs, 256)
    test_last, pred_last = evaluate(model, splits["test"], features, data.type_names, eval_bs, dev, precision=precision)
    model.load_state_dict(torch.load(best_path, map_location=dev, weights_only=True))
    val_best, pred_val = evaluate(model, va, features, data.type_names, eval_bs, dev, precision=precision)
    test_best, pred_best = evaluate(model, splits["test"], features, data.type_names, eval_bs, dev, precision=precision)
    ablations = {a: evaluate(model, splits["test"], features, data.type_names, eval_bs, dev, ablation=a,
                             precision=precision)[0] for a in ABLATIONS}
    _write_predictions(run_dir / "predictions_test.csv", data, "test", {"pred_best": pred_best, "pred_last": pred_last})
    _write_predictions(run_dir / "predictions_val.csv", data, "val", {"pred_best": pred_val})

    record = {
        "run_id": run_id, "status": "complete", "record_version": RECORD_VERSION,
        "variant": spec.variant, "variant_config": cfg.to_dict(), "train_config": train_cfg,
        "seed": spec.seed, "spec": dataclasses.asdict(spec),
        "data": {"spec": spec.data, "id": data.data_id, "name": data.name, "type_names": data.type_names,
                 "sizes": {k: len(v) for k, v in data.splits.items()},
                 "streaming": data.features.streaming},
        "metrics": {"selection": "test is reported at the epoch with the best validation accuracy; "
                                 "test_last at the last epoch trained",
                    "best_epoch": best["epoch"], "val": val_best, "test": test_best, "test_last": test_last,
                    "ablations": ablations},
        "epochs_run": len(history), "history": history,
        "train_time_s": train_time, "train_samples_per_s": train_samples / train_time if train_time else None,
        "cost": run_cost(model, cfg, dev, train_samples / train_time if train_time else None, peak_train),
        "teacher_runs": [r["run_id"] for r in teacher_records],
        "teachers": [{"variant": r["variant"], "run_id": r["run_id"], "params": r["params"]["total"],
                      "test_acc": r["metrics"]["test"]["overall"]} for r in teacher_records],
        "params": param_counts(model), "git_commit": git_commit(), "torch_version": torch.__version__,
        "python_version": sys.version.split()[0], "device": str(dev), "device_name": device_name(dev),
        "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }
    record["wall_time_s"] = (datetime.fromisoformat(record["finished_at"])
                             - datetime.fromisoformat(started)).total_seconds()
    store.write_record(record)
    return record


def run_cost(model: torch.nn.Module, cfg: variants.VariantConfig, dev: torch.device,
             train_samples_per_s: float | None, peak_train_mib: float | None) -> dict:
    """Cost of a trained variant for reports: FLOPs per sample (fvcore, LSTMs included), eval
    latency at batch 1 on the run's device, peak training memory (CUDA only; None elsewhere,
    never invented). Measured on random inputs of the data's shapes (questions of 12 tokens)."""
    from . import measure

    out = {"macs_per_sample": None, "flops_per_sample": None, "latency_ms_median": None, "latency_ms_p90": None,
           "latency_batch_size": 1, "peak_mem_mib_train": peak_train_mib, "peak_mem_mib_infer": None,
           "train_samples_per_s": train_samples_per_s, "device": str(dev), "errors": {}}
    was_training = model.training
    try:
        fl = measure.count_flops(model, measure.random_inputs(cfg.model, 2, dev))
        out.update(macs_per_sample=int(fl["macs_per_sample"]), flops_per_sample=int(fl["flops_per_sample"]),
                   unsupported_ops=fl["unsupported_ops"])
    except Exception as e:  # noqa: BLE001 - a cost that cannot be measured is recorded as missing
        out["errors"]["flops"] = f"{type(e).__name__}: {e}"
    try:
        inputs = measure.random_inputs(cfg.model, 1, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        lat = measure.latency(model, inputs, reps=50 if dev.type == "cuda" else 20)
        out.update(latency_ms_median=lat["latency_ms_median"], latency_ms_p90=lat["latency_ms_p90"])
        if dev.type == "cuda":
            out["peak_mem_mib_infer"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    except Exception as e:  # noqa: BLE001
        out["errors"]["latency"] = f"{type(e).__name__}: {e}"
    model.train(was_training)
    return out


def _write_predictions(path: Path, data: D.VideoQAData, split: str, preds: dict[str, np.ndarray]) -> None:
    s = data.splits[split]
    answers = s.answers.numpy()
    df = pd.DataFrame({"question_id": s.question_ids, "video_id": s.video_ids,
                       "qtype": [data.type_names[t] for t in s.qtypes.numpy()], "answer": answers})
    for k, v in preds.items():
        df[k] = v
        df[f"correct_{k.removeprefix('pred_')}"] = v == answers
    atomic_write_bytes(path, df.to_csv(index=False).encode())
