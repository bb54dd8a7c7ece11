"""Live logging sinks: a run's per-epoch values sent to TensorBoard or Weights & Biases while it trains.

Off by default; chosen per run (``ablate.py run ... --log tensorboard --log wandb``) or per grid
(``[log]`` in the grid file, or ``--log`` on the grid's command line). Every sink reads the values
the run's record stores: each epoch's history entry (:func:`epoch_scalars` names them), and at the
end the record's test and validation accuracy (and a count's MSE). Nothing is computed twice.

- ``tensorboard``: event files under the run's directory (``results/runs/<run_id>/tensorboard/``),
  written by torch's ``SummaryWriter``; the run id, variant, teachers, seed, data set and settings
  are written as hyper-parameters, so ``tensorboard --logdir results/runs`` compares a grid's runs
  in its HParams view.
- ``wandb``: a W&B run named by the run id, in offline mode (files under the run's directory,
  ``wandb sync`` uploads them later) unless the user has configured W&B with an API key
  (``WANDB_API_KEY`` or ``~/.netrc``; ``WANDB_MODE=offline`` or ``disabled`` is obeyed): never a login prompt.

A tracker that is not installed, cannot start or fails while logging never fails the run: it is
dropped with a one-line warning naming it and the reason.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from harness.errors import HarnessError

SINKS: tuple[str, ...] = ("tensorboard", "wandb")
#: where a run's TensorBoard event files go, under its run directory
TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT = "vqakd"
#: the record's final accuracies, as logged at the end of a run (also the HParams view's metrics)
FINAL_METRICS = {"final/test_acc": ("test", "overall"), "final/val_acc": ("val", "overall"),
                 "final/test_mse": ("test", "mse"), "final/val_mse": ("val", "mse")}

Warn = Callable[[str], None]


class LogSinkError(HarnessError, ValueError):
    """An unknown logging sink was asked for; the message names it and where."""


def check_sinks(names: Iterable[str] | None, where: str = "--log") -> tuple[str, ...]:
    """The sink names, checked and de-duplicated (order kept)."""
    out: list[str] = []
    for n in names or ():
        if n not in SINKS:
            raise LogSinkError(f"{where}: unknown logging sink {n!r} (known: {', '.join(SINKS)})")
        if n not in out:
            out.append(n)
    return tuple(out)


def epoch_scalars(entry: dict) -> dict[str, float]:
    """One epoch's values, by tag, exactly as the record's history entry holds them: the training
    loss and its parts, training accuracy, learning rate, samples/s and epoch time, validation
    accuracy overall and per question type, and a count's validation MSE."""
    names = {"loss": "train/loss", "train_acc": "train/acc", "lr": "train/lr",
             "train_samples_per_s": "train/samples_per_s", "train_time_s": "train/time_s", "val_acc": "val/acc",
             "val_mse": "val/mse"}
    out = {tag: float(entry[k]) for k, tag in names.items() if entry.get(k) is not None}
    out.update({f"train/{k}": float(v) for k, v in entry.items() if k.startswith("loss_")})
    out.update({f"val/acc_{t}": float(v) for t, v in (entry.get("val_acc_per_type") or {}).items()})
    return out


def final_scalars(record: dict) -> dict[str, float]:
    m = record.get("metrics", {})
    return {tag: float(m[split][key]) for tag, (split, key) in FINAL_METRICS.items()
            if m.get(split, {}).get(key) is not None}


def run_hparams(run_id: str, variant: str, seed: int, data_id: str, teachers: list[str], teacher_runs: list[str],
                train: dict, overrides: dict) -> dict:
    """What identifies a run, as flat hyper-parameters (numbers, strings, booleans)."""
    out: dict = {"run_id": run_id, "variant": variant, "seed": seed, "data": data_id,
                 "teachers": ",".join(teachers) or "none", "teacher_runs": ",".join(teacher_runs) or "none"}
    for prefix, d in (("train", train), ("set", overrides)):
        for k, v in sorted(d.items()):
            out[f"{prefix}.{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, hparams: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        for s in hparams_summary(hparams, {k: 0.0 for k in FINAL_METRICS}):  # experiment, session start, end
            self.writer.file_writer.add_summary(s)

    def epoch(self, entry: dict) -> None:
        for tag, v in epoch_scalars(entry).items():
            self.writer.add_scalar(tag, v, entry["epoch"])
        self.writer.flush()  # live: TensorBoard sees each epoch as it ends

    def final(self, record: dict) -> None:
        for tag, v in final_scalars(record).items():
            self.writer.add_scalar(tag, v, record["epochs_run"] - 1)

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> tuple[str, str]:
    """(mode, why): offline or disabled when ``WANDB_MODE`` says so; online when an API key is
    configured (``WANDB_API_KEY``, or ``~/.netrc`` for the W&B host); offline otherwise, even when
    ``WANDB_MODE`` asks for online, so that W&B never asks to log in."""
    asked = os.environ.get("WANDB_MODE", "")
    if asked in ("offline", "disabled", "dryrun"):
        return asked, f"WANDB_MODE={asked}"
    if os.environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return "online", f"an API key for {host} in netrc"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline", "no W&B API key configured (`wandb sync` uploads the run later)"


class _WandB:
    def __init__(self, run_dir: Path, hparams: dict, warn: Warn):
        import wandb

        mode, why = wandb_mode()
        if mode == "offline":
            warn(f"wandb: offline, {why}; files in {run_dir / 'wandb'}")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=hparams["run_id"],
                              id=hparams["run_id"], dir=str(run_dir), config=hparams, mode=mode,
                              resume="allow" if mode == "online" else None,
                              settings=wandb.Settings(silent=True, console="off"))

    def epoch(self, entry: dict) -> None:
        self.run.log(epoch_scalars(entry), step=entry["epoch"])

    def final(self, record: dict) -> None:
        self.run.summary.update(final_scalars(record))

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """The sinks a run logs to; a sink that fails is dropped with a warning, the run goes on."""

    def __init__(self, names: Iterable[str], run_dir: Path, hparams: dict, warn: Warn):
        self.warn, self.open = warn, {}
        makers = {"tensorboard": lambda: _TensorBoard(run_dir, hparams),
                  "wandb": lambda: _WandB(run_dir, hparams, warn)}
        for name in check_sinks(names):
            try:
                self.open[name] = makers[name]()
            except ImportError as e:
                warn(f"{name}: not installed ({e}); this run is not logged to it "
                     f"(pip install tensorboard wandb, or the project's [log] extra)")
            except Exception as e:  # a tracker that cannot start never fails the run
                warn(f"{name}: could not start ({type(e).__name__}: {e}); this run is not logged to it")

    def _each(self, what: str, *args) -> None:
        for name, sink in list(self.open.items()):
            try:
                getattr(sink, what)(*args)
            except Exception as e:  # a tracker that fails never fails the run
                self.open.pop(name)
                self.warn(f"{name}: logging failed ({type(e).__name__}: {e}); the run goes on without it")

    def epoch(self, entry: dict) -> None:
        self._each("epoch", entry)

    def final(self, record: dict) -> None:
        self._each("final", record)

    def close(self) -> None:
        self._each("close")
        self.open = {}
