"""The report's header: what traces it to its runs (data sets, grid file, commits, devices, code,
environment, statistics), and the partial-report lines of a grid not yet run through."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness.runs import identity
from harness.runs import record as R
from harness import stats as S
from harness.digests import file_hash
from harness.env import NUMERIC_ENVIRONMENT
from harness.stats import Bootstrap
from harness.runs.store import ResultsStore
from harness.report.fmt import QUESTIONS_ONLY, uniq
from harness.report.grouping import Group
from harness.report.statistics import CORRECTION

def _grid_file(grid_file, committed: bool = False) -> str:
    """The grid file as the header names it: relative to the repository (else to the working directory),
    with its SHA-256; in a report inside the repository, a file outside it is not named."""
    if not grid_file:
        return "-"
    p = Path(grid_file)
    digest = f" (sha256 {file_hash(p, 'sha256')[:12]})" if p.is_file() else ""
    shown = _inside(p, REPO)
    if shown is None and committed:
        return "a file outside the repository, not named here" + digest
    if shown is None:  # a path relative to the working directory reads the same on every machine
        shown = _inside(p, Path.cwd()) or p
    return f"`{shown}`" + digest


def _date_span(records: list[dict]) -> str:
    """The runs' earliest start .. latest finish (compared as UTC instants)."""
    def key(s: str):
        try:
            return datetime.fromisoformat(s).astimezone(timezone.utc).isoformat()
        except ValueError:
            return s
    started = [r["started_at"] for r in records if r.get("started_at")]
    finished = [r["finished_at"] for r in records if r.get("finished_at")]
    return f"{min(started, key=key) if started else '-'} .. {max(finished, key=key) if finished else '-'}"


#: the repository: a report written inside it names only paths inside it (:func:`repo_command`)
REPO = identity.ROOT


def _inside(p: Path, root: Path) -> Path | None:
    """``p`` relative to ``root``, or None when it is outside."""
    try:
        return p.resolve().relative_to(root.resolve())
    except ValueError:
        return None


def in_repo(out_dir: str | Path) -> bool:
    """Whether a report written to ``out_dir`` is inside the repository (a committed report)."""
    return _inside(Path(out_dir), REPO) is not None


def repo_command(command: str | None, out_dir: str | Path) -> tuple[str | None, list[str]]:
    """The regenerate command as a report written to ``out_dir`` shows it: every word that names an
    existing path inside the repository written relative to its root; for a report inside the
    repository (a committed one), a path outside it replaced by its option's name in capitals
    (``--results /tmp/x`` -> ``--results RESULTS``), with the placeholders returned to be explained."""
    import shlex

    if not command:
        return command, []
    words, placeholders = shlex.split(command), []
    committed = in_repo(out_dir)
    for i, w in enumerate(words):
        if w.startswith("-") or i < 2 or not ("/" in w or Path(w).exists()):
            continue
        rel = _inside(Path(w), REPO)
        if rel is not None:
            words[i] = str(rel)
        elif committed:
            words[i] = words[i - 1].lstrip("-").replace("-", "_").upper() if words[i - 1].startswith("--") else "PATH"
            placeholders.append(words[i])
    return shlex.join(words), placeholders


@dataclass
class ReportInfo:
    """What the header says of a report. ``records``: the runs it covers; ``missing``: the requested
    runs that are not complete, as the header lists them (:func:`missing_line`); ``names``: the
    variant names of the references (``baseline``, ``control``); ``partial``: the lines of
    :func:`mark_missing`; ``command``: the command that regenerates it."""

    name: str
    records: list[dict]
    missing: list[str]
    grid_file: str | None
    names: dict[str, str]
    superseded: list[str]
    boot: Bootstrap
    command: str | None = None
    partial: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # placeholders of the command's paths outside the repository
    committed: bool = False  # written inside the repository: names no path outside it


def _runs_line(info: ReportInfo) -> str:
    """How many runs are complete, which requested ones are not, which are superseded."""
    n = len(info.records)
    runs = f"{n} complete"
    if info.missing:
        runs = f"{n} of {n + len(info.missing)} complete"
        runs += f"; {len(info.missing)} requested but not complete, left out: " + ", ".join(info.missing)
    if info.superseded:
        runs += (f"; {len(info.superseded)} superseded by a later run of the same variant, settings and seed, "
                 "left out: " + ", ".join(f"`{m}`" for m in info.superseded))
    return runs


def header(info: ReportInfo) -> list[str]:
    """The report's title, regeneration command, partial-report lines, provenance and method."""
    name, records, boot = info.name, info.records, info.boot
    command, baseline, control = info.command, info.names["baseline"], info.names["control"]
    datasets = sorted({(R.data_name(r), R.data_id(r)) for r in records})
    return [
        f"# {name}", "", f"Reports are regenerated by `{command or f'python ablate.py report --grid {name}'}`; "
                         f"do not edit." + "".join(f" {p}: a path outside the repository, not named here."
                                                   for p in info.outside), "",
        *info.partial,
        f"- generated: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- grid: `{name}`; grid file: {_grid_file(info.grid_file, info.committed)}",
        "- data sets: " + (", ".join(f"{n} (`{i}`)" for n, i in datasets) or "-"),
        f"- runs: {_runs_line(info)}",
        f"- runs' dates: {_date_span(records)} (earliest start .. latest finish)",
        "- git commits: " + (", ".join(f"`{c}`" for c in uniq(r.get("git_commit") for r in records)) or "-"),
        "- devices: " + (", ".join(uniq(r.get("device_name") for r in records)) or "-"),
        "- torch: " + (", ".join(uniq(r.get("torch_version") for r in records)) or "-"),
        *_code_lines(records),
        f"- baseline: `{baseline}`; control (the un-distilled student): `{control}`",
        f"- statistics: two-level bootstrap over seeds and test questions (`harness/stats.py`), "
        f"{boot.resamples} resamples, generator seed {boot.seed}, {boot.confidence:.0%} intervals; "
        f"{CORRECTION} across the comparisons of each table",
        "",
        "Accuracies are test accuracies (%) at the epoch with the best validation accuracy: mean ± sample "
        "standard deviation (ddof=1) over seeds (no ± for one seed) and a 95% interval [lo, hi] from the "
        "two-level bootstrap: test questions resampled (the same question ids for every run), the seed level "
        f"from Student's t with n - 1 degrees of freedom. With fewer than {S.MIN_SEEDS} seeds the seed variance "
        f"is not estimated: such intervals and p-values, marked {QUESTIONS_ONLY}, cover the sampling of the test "
        "questions only (they say whether these trained runs differ beyond the noise of the test set, not "
        "whether training again with other seeds would). Deltas are differences of means in percentage points. "
        "The list of runs behind every number is at the end.",
        "",
    ]


#: marks the runs of a report whose runs come from more than one code fingerprint
OTHER_CODE = "§"


def several_codes(records: list[dict]) -> bool:
    """Whether the runs come from more than one code fingerprint."""
    return len({identity.code_of(r) for r in records}) > 1


def _code_lines(records: list[dict]) -> list[str]:
    """The code that computed the runs (``harness.runs.identity`` fingerprints), and the environment facts
    that can change numbers (``harness.env.environment``) where the runs differ in them."""
    code = "- code: " + identity.describe_code(records)
    if several_codes(records):
        code += (f"; **runs from more than one code fingerprint** (each run's code in the runs table, marked "
                 f"{OTHER_CODE}): differences between rows may come from the code")
    other = identity.against_checkout(records)
    if other:
        code += "; **not this checkout's code**: " + "; ".join(other)
    elif records and all(identity.code_of(r) for r in records):
        code += ", this checkout's"
    envs = [r.get("environment") or {} for r in records]
    differ = [k for k in NUMERIC_ENVIRONMENT if len({json.dumps(e.get(k), default=str) for e in envs}) > 1]
    if not differ and envs and envs[0]:
        env = "- environment: " + ", ".join(f"{k} {envs[0].get(k)}" for k in ("threads", "cpu", "cpu_capability")) \
            + ", the same for every run"
    elif not differ:
        env = "- environment: not recorded"
    else:
        env = "- environment differs between runs (can change numbers): " + "; ".join(
            f"{k}: " + ", ".join(uniq(str(e.get(k, "not recorded")) for e in envs)) for k in differ)
    return [code, env]


def mark_missing(sections: dict[str, list[Group]], planned: list[dict], missing: list[str]) -> list[str]:
    """Set each group's ``missing_seeds`` from the plans of the missing runs (a missing run belongs
    to the group holding a complete run of the same variant and label); return the header's
    partial-report lines: how many runs are missing, the configurations with no complete run and
    the seeds with none. No lines when nothing planned is missing."""
    by_id = {p["run_id"]: p for p in planned}
    lost = [by_id[m] for m in missing if m in by_id]
    if not lost:
        return []
    config_of = {p["run_id"]: (p["variant"], p["label"]) for p in planned}
    groups = {config_of[r["run_id"]]: g for gs in sections.values() for g in gs for r in g.runs
              if r["run_id"] in config_of}
    absent: dict[tuple, list] = {}
    for p in lost:
        g = groups.get((p["variant"], p["label"]))
        if g is not None:
            g.missing_seeds = sorted({*g.missing_seeds, p["seed"]}, key=str)
        else:
            absent.setdefault((p["variant"], p["label"]), []).append(p["seed"])
    done_seeds = {p["seed"] for p in planned if p["run_id"] not in set(missing)}
    no_seed = sorted({p["seed"] for p in lost} - done_seeds, key=str)
    lines = [f"**Partial report: {len(lost)} of the {len(planned)} planned runs are not complete** (run the grid "
             f"again to finish them; complete runs are not redone)."]
    if absent:
        lines.append(f"- configurations with no complete run ({len(absent)}, not in any table): " + ", ".join(
            f"`{label}` (seeds {', '.join(map(str, seeds))})" for (_, label), seeds in absent.items()))
    short = [g for gs in sections.values() for g in gs if g.missing_seeds]
    if short:
        lines.append(f"- rows missing seeds ({len(short)}; their n says which): " + ", ".join(
            f"`{g.label}`" for g in short))
    if no_seed:
        lines.append(f"- seeds with no complete run at all: {', '.join(map(str, no_seed))}")
    return lines + [""]


def missing_line(store: ResultsStore, run_id: str) -> str:
    """A requested run that is not complete, for the header: its id, and why when it failed."""
    failure = store.read_failure(run_id)
    reason = str(failure.get("reason", "?")).splitlines()[0][:300] if failure else None
    return f"`{run_id}`" + (f" (failed: {reason})" if reason else "")
