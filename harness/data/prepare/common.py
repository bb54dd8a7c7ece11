"""What every part of :mod:`harness.data.prepare` shares: its error type, the data sets it knows and
the task names a prepared data set's meta file records."""
from __future__ import annotations


from harness.data.dataset import DataError

#: the QA-json releases (``questions`` command)
DATASETS: tuple[str, ...] = ("msvd-qa", "msrvtt-qa")
#: TGIF-QA's four tasks; each is a data set of its own, ``tgif-qa-{task}`` (HCRN prepares them apart)
TGIF_TASKS: tuple[str, ...] = ("action", "transition", "count", "frameqa")
TGIF_DATASETS: tuple[str, ...] = tuple(f"tgif-qa-{t}" for t in TGIF_TASKS)
NEXTQA = "next-qa"
#: every data set whose videos the ``features`` command can extract
VIDEO_DATASETS: tuple[str, ...] = (*DATASETS, *TGIF_DATASETS, NEXTQA)



class PrepareError(DataError):
    """Bad input or output for preparation: the message names the file, key or record."""


#: the most an id is (a release's video and question ids are stored as int64)
MAX_ID = 2 ** 63 - 1


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` for a message, its middle left out past ``limit`` characters (a hostile cell
    can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def check_dataset(dataset: str, known: tuple[str, ...] = DATASETS) -> None:
    if dataset not in known:
        raise PrepareError(f"unknown data set {dataset!r} (known: {', '.join(known)})")
