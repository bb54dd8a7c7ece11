"""Writing a report: the runs table, the CSV of the main table, and :func:`write_report`, which
groups the runs, writes the header and each data set's sections, and writes the Markdown, the
CSV and the plots atomically."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.measurement import bill, costs
from harness.compression import compress
from harness.runs import identity
from harness.evaluation import metrics as M
from harness.runs import record as R
from harness.stats import Bootstrap
from harness.runs.store import ResultsStore
from harness.files import atomic_write_bytes
from harness.report.fmt import fixed, md_table
from harness.report.grouping import Group, group_runs
from harness.report.header import (OTHER_CODE, ReportInfo, missing_line, several_codes, header, in_repo,
    mark_missing, repo_command)
from harness.report.sections import Shared, context, data_section
from harness.report.statistics import COST_COLUMNS, Predictions

def _run_row(g: Group, r: dict, several: bool) -> list[str]:
    """One run of the runs table."""
    mark = f" {OTHER_CODE} code `{identity.code_of(r) or 'unknown'}`" if several else ""
    return [f"`{r['run_id']}`{mark}", g.label, R.data_name(r), str(r["seed"]), fixed(R.metric(r, "test")),
            fixed(R.metric(r, "val")), f"{R.best_epoch(r) + 1}/{r.get('epochs_run', len(r.get('history', [])))}",
            ",".join(r.get("teacher_runs", [])) or "-", str(r.get("device_name") or "-"),
            f"`{r.get('git_commit') or '-'}`", str(r.get("finished_at") or "-")]


def _runs_table(sections: dict[str, list[Group]]) -> list[str]:
    """Every run behind the report's numbers."""
    several = several_codes([r for gs in sections.values() for g in gs for r in g.runs])
    run_rows = [_run_row(g, r, several) for gs in sections.values() for g in gs for r in g.runs]
    return ["## Runs", ""] + md_table(["run", "variant", "data", "seed", "test acc", "val acc", "best epoch",
                                       "teacher runs", "device", "commit", "finished"], run_rows,
                                      right={3, 4, 5, 6}) + [""]


def csv_columns() -> list[str]:
    """The main CSV's leading columns (per-type accuracies and run ids follow): the row's identity,
    params and costs, test accuracy with its interval and comparisons, teachers, then every other
    registered metric (harness.evaluation.metrics) by name."""
    return ["data_name", "data_id", "variant", "label", "category", "params", *(c[1] for c in COST_COLUMNS.values()),
            "test_acc_mean", "test_acc_std", "test_acc_ci_lo", "test_acc_ci_hi", "ci_covers_seeds", "n_seeds",
            "seeds", "seeds_missing", "delta_baseline", "delta_baseline_ci_lo", "delta_baseline_ci_hi", "p_baseline",
            "p_baseline_holm", "delta_control", "delta_control_ci_lo", "delta_control_ci_hi", "p_control",
            "p_control_holm", "teachers", *(m.name for m in M.secondary())]


def csv_bytes(rows: list[dict]) -> bytes:
    """The main table as CSV: one row per variant configuration and data set."""
    cols = csv_columns()
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in cols]
    df = df.reindex(columns=cols + extra) if len(df) else pd.DataFrame(columns=cols)
    return df.to_csv(index=False).encode()


def _write_outputs(out_dir: Path, name: str, files_dir: Path, written: dict, rows: list[dict],
                   lines: list[str]) -> Path:
    """Plots first, then the table, then the Markdown that links them (each atomically)."""
    for fname, data in sorted(written.items()):
        atomic_write_bytes(files_dir / fname, data)
    if files_dir.is_dir():
        for old in files_dir.glob("*.png"):
            if old.name not in written:
                old.unlink()
    atomic_write_bytes(out_dir / f"{name}.csv", csv_bytes(rows))
    md = out_dir / f"{name}.md"
    atomic_write_bytes(md, "\n".join(lines).rstrip("\n").encode() + b"\n")
    return md


def write_report(store: ResultsStore, name: str, run_ids: list[str] | None = None, out_dir: str | Path = "reports",
                 baseline: str = "dualvgr", control: str = "student", grid_file: str | None = None,
                 boot: Bootstrap | None = None, command: str | None = None,
                 planned: list[dict] | None = None) -> Path:
    """Write ``out_dir/NAME.md``, ``out_dir/NAME.csv`` (the main table, one row per variant and data
    set) and the plots in ``out_dir/NAME_files/``; returns the Markdown's path. ``run_ids=None``:
    every complete run in the store; requested runs that are not complete are listed and left out.
    ``boot``: the bootstrap's size and seed (default: harness.stats'). ``command``: the command that
    regenerates the report, as the header shows it (default: ``python ablate.py report --grid NAME``).
    A requested run that failed is listed with the reason its ``failed.json`` gives. ``planned``: what
    each requested run is (``{"run_id", "variant", "label", "seed"}``, e.g. from a grid's plans): then
    a report missing some of them says so in its header (the configurations and seeds with no complete
    run) and in each row that lacks seeds."""
    out_dir, boot, names = Path(out_dir), boot or Bootstrap(), {"baseline": baseline, "control": control}
    records, missing = _records(store, run_ids)
    sections = group_runs(records, baseline, control)
    kept = sorted((r for gs in sections.values() for g in gs for r in g.runs), key=lambda r: r["run_id"])
    command, outside = repo_command(command, out_dir)
    info = ReportInfo(name, kept, [missing_line(store, r) for r in missing], grid_file, names,
                      sorted(x for gs in sections.values() for g in gs for x in g.superseded), boot, command,
                      mark_missing(sections, planned or [], missing), outside, in_repo(out_dir))
    shared = Shared(Predictions(store), boot, names, out_dir / f"{name}_files", len(sections) > 1)
    lines, all_rows = header(info), []
    if not sections:
        lines += ["No complete run.", ""]
    for data_id, groups in sections.items():
        ctx = context(shared, data_id, groups)
        lines += data_section(ctx)
        all_rows += ctx.rows
    lines += _runs_table(sections)
    return _write_outputs(out_dir, name, shared.files_dir, shared.written, all_rows, lines)


def _records(store: ResultsStore, run_ids: list[str] | None) -> tuple[list[dict], list[str]]:
    """The complete runs requested (every complete run for None), sorted by id, with their inference
    cost and training bill attached; and the requested run ids that are not complete."""
    if run_ids is None:
        records, missing = list(store.iter_records()), []
    else:
        ids = list(dict.fromkeys(run_ids))
        missing = [r for r in ids if not store.is_complete(r)]
        records = [store.read_record(r) for r in ids if store.is_complete(r)]
    records.sort(key=lambda r: r["run_id"])
    records = costs.attach(store, records)  # latency / inference memory measured alone, never during training
    for r in records:  # the training bill: the run's own, and the total with its teachers
        r["cost"].update(bill.bill_row(bill.training_bill(store, r)))
        r["compressed"] = compress.read_all(store, r)  # its compressed evaluations (harness.compression.compress)
    return records, missing
