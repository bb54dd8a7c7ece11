#!/usr/bin/env python3
"""Peak memory of a command and all its child processes (Linux).

    python scripts/peak-memory.py -- python ablate.py --grid tiny --jobs 2

Samples the process tree every 0.2 s and prints the peak of the summed RSS (resident pages,
counting a page shared by N processes N times) and of the summed PSS (proportional set size: a
page shared by N processes counts 1/N in each, so the sum is the physical memory the tree holds),
and the largest single process's RSS. Shared, memory-mapped features show up as the difference
between the two sums: N workers mapping the same file hold one copy (PSS), not N (RSS).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB of one process."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    if not argv:
        print(__doc__)
        return 2
    proc = subprocess.Popen(argv)
    peak_rss = peak_pss = peak_one = 0
    t0 = time.time()
    while proc.poll() is None:
        sizes = [_rollup(p) for p in _tree(proc.pid)]
        peak_rss = max(peak_rss, sum(r for r, _ in sizes))
        peak_pss = max(peak_pss, sum(p for _, p in sizes))
        peak_one = max([peak_one, *[r for r, _ in sizes]])
        time.sleep(0.2)
    mib = lambda kb: kb / 1024  # noqa: E731
    print(f"peak-memory: {time.time() - t0:.0f} s, exit {proc.returncode}; process tree peak RSS sum "
          f"{mib(peak_rss):,.0f} MiB, peak PSS sum {mib(peak_pss):,.0f} MiB, largest process RSS "
          f"{mib(peak_one):,.0f} MiB", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
