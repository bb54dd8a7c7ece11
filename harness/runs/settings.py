"""The training settings' schema, in one place: the reference recipe, every setting's default and
its check. The runner resolves a run's settings with it, grid files and the command line are
checked with it, and the run id (:mod:`harness.runs.identity`) normalises against its defaults."""
from __future__ import annotations

from harness.env import TRAIN_PRECISIONS
from harness.errors import HarnessError

#: the reference's training recipe (docs/reference.md); data sets may suggest their own (synthetic presets)
REFERENCE_TRAIN = {"epochs": 25, "batch_size": 256, "lr": 1e-4, "lr_decay_every": 10, "lr_decay": 0.5,
                   "grad_clip": 12.0}
#: every training setting's default: the reference recipe, no early stopping, GloVe, fp32
TRAIN_DEFAULTS = {**REFERENCE_TRAIN, "early_stop": None, "glove": True, "precision": "fp32"}


class SettingError(HarnessError, ValueError):
    """A training setting of the wrong type or out of range; the message names it."""


def is_int(v) -> bool:
    """An int that is not a bool (TOML and JSON give both)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: training settings: key -> (check, what it must be)
TRAIN_CHECKS = {
    "epochs": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: is_int(v) and v >= 2, "an integer >= 2 (BatchNorm trains on batches of 2 or more)"),
    "lr": (lambda v: is_num(v) and v > 0, "a number > 0"),
    "lr_decay_every": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "lr_decay": (lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "grad_clip": (lambda v: is_num(v) and v > 0, "a number > 0"),
    "early_stop": (lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1 (epochs without improvement)"),
    "glove": (lambda v: isinstance(v, bool), "true or false"),
    "precision": (lambda v: v in TRAIN_PRECISIONS, f"one of {', '.join(TRAIN_PRECISIONS)}"),
}


def check_train_settings(values: dict, where: str = "") -> None:
    """Fail naming the first training setting that is unknown, of the wrong type or out of range
    (``None`` means "the default" for every setting)."""
    for k, v in values.items():
        if k not in TRAIN_CHECKS:
            raise SettingError(f"{where}unknown training setting {k!r} (known: {', '.join(TRAIN_CHECKS)})")
        ok, what = TRAIN_CHECKS[k]
        if v is not None and not ok(v):
            raise SettingError(f"{where}{k} = {v!r} is not {what}")
