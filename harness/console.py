"""Terminal output, set up once: the rich consoles and the progress bar every long job shows
(training epochs and steps, grid runs, feature extraction, synthetic data). User text (paths,
messages, settings) is printed as text, never parsed as rich markup: a path with ``[v2]`` keeps it
and a message naming ``[train]`` shows it."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def make_console(stderr: bool = False) -> Console:
    """A console that keeps tables whole in logs and pipes (rich would wrap them at 80 columns)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=200)


def say(console: Console, text: str, style: str | None = None) -> None:
    """Print ``text`` as is (no markup, no highlighting), optionally in one style."""
    console.print(Text(str(text), style=style or ""), highlight=False)


def error(console: Console, message: str) -> None:
    """``error: <message>`` with the message printed as text, on one line however long (not wrapped
    at the console's width)."""
    console.print(Text.assemble(("error: ", "bold red"), str(message)), highlight=False, soft_wrap=True)


def progress_bar(console: Console, *, info: bool = True, disable: bool | None = None) -> Progress:
    """The progress bar of every long job: description, bar, done/total, an ``info`` field
    (``progress.add_task(..., info="")``), elapsed and remaining time. Off when the console is
    not a terminal unless ``disable`` says otherwise (logs get plain lines instead)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}", markup=False))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=(not console.is_terminal) if disable is None else disable)
