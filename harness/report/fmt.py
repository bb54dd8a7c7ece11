"""Number and table formatting of the report: accuracies, intervals, p-values, Markdown tables."""
from __future__ import annotations

import math
import re

from harness.stats import Estimate

#: marks an interval or p-value that covers the test questions only (fewer than stats.MIN_SEEDS seeds)
QUESTIONS_ONLY = "†"



def fixed(x, nd: int = 2, sign: bool = False) -> str:
    """A number with ``nd`` decimals (signed with ``sign``); ``-`` when missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def fmt_sig(x, sig: int = 4) -> str:
    """A number with ``sig`` significant digits; ``-`` when missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{sig}g}"


def fmt_p(p: float | None) -> str:
    """A p-value: 3 significant digits, scientific below 1e-4."""
    if p is None:
        return "-"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.2e}"


def fmt_acc(mean: float | None, std: float | None) -> str:
    """``mean ± std``; the mean alone when the std is undefined (one seed)."""
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_ci(e: Estimate | None, sign: bool = False, nd: int = 1) -> str:
    """``[lo, hi]`` (``nd`` decimals), marked † when the interval covers the test questions only (few seeds)."""
    if e is None or e.lo is None:
        return "-"
    return f"[{fixed(e.lo, nd, sign)}, {fixed(e.hi, nd, sign)}]" + ("" if e.seed_level else QUESTIONS_ONLY)


def fmt_cell(e: Estimate | None, mean: float | None) -> str:
    """An accuracy cell: ``mean ± std [lo, hi]`` (the record's mean when there is no estimate)."""
    if e is None:
        return fixed(mean)
    return f"{fmt_acc(e.mean, e.std)} {fmt_ci(e)}"


def md_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    """A Markdown table; the columns in ``right`` (default: all but the first) right-aligned."""
    right = right if right is not None else set(range(1, len(headers)))
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def slug(s: str) -> str:
    """A file-name-safe form of a string (plot names per data set)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "data"


def uniq(values) -> list[str]:
    """The distinct non-empty values, as sorted strings."""
    return sorted({str(v) for v in values if v not in (None, "")})


def fmt_mcnemar(mc: list[tuple]) -> str:
    """McNemar per seed: ``seed: b/c, p=...`` joined by ``;``."""
    return "; ".join(f"{seed}: {b}/{c}, p={fmt_p(p)}" for seed, b, c, p in mc) or "-"
