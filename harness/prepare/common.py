"""What every part of :mod:`harness.prepare` shares: its error type and the data sets it knows."""
from __future__ import annotations

from ..data import DataError

DATASETS: tuple[str, ...] = ("msvd-qa", "msrvtt-qa")


class PrepareError(DataError):
    """Bad input or output for preparation: the message names the file, key or record."""


def check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise PrepareError(f"unknown data set {dataset!r} (known: {', '.join(DATASETS)})")
