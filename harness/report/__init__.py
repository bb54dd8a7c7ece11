"""Markdown comparison reports from the results store.

``write_report(store, name)`` writes ``reports/NAME.md`` (the report), ``reports/NAME.csv`` (its
main table, one row per variant and data set) and the plots it embeds under ``reports/NAME_files/``.

Runs are grouped by data set and variant: the runs of one group differ only in their seed (runs
of one variant with different settings, e.g. ``--set module_dim=128``, form separate groups whose
labels name the settings that differ). A group's category is the baseline, the control (the
un-distilled student), or its variant's family from the zoo's tags (``variants.zoo.FAMILIES``).
Accuracies are the test accuracy at the best-validation epoch, in percent: mean over seeds,
sample standard deviation (ddof=1; none for one seed) and a 95% interval. Intervals, p-values and
the per-seed McNemar tests come from :mod:`harness.stats` (a two-level bootstrap over seeds and
test questions, Holm-Bonferroni across the comparisons of a table); this module only gathers the
runs' predictions and renders.

The package, one module per job: :mod:`.grouping` (runs into groups, labels, report order),
:mod:`.statistics` (predictions, the glue to :mod:`harness.stats`, the main table's rows),
:mod:`.fmt` (numbers and Markdown tables), :mod:`.plots` (matplotlib), :mod:`.header` (the header
and partial-report lines), :mod:`.sections` (a data set's Markdown sections: one ``Context``, and
the list ``SECTIONS`` the writer iterates; a new section goes there), :mod:`.writer` (the runs table,
the CSV, :func:`write_report`) and :mod:`.compare` (two sets of runs compared, ``ablate.py compare``).
Metrics other than accuracy come from :mod:`harness.evaluation.metrics`' registry (a column and a note each).

The output depends only on the records (and predictions) it covers and on the bootstrap's seed
and size (named in the header), except the header's ``generated`` line, so a report can be
regenerated and diffed.
"""

from __future__ import annotations

from harness.report import count  # noqa: F401 - registers the count task's sections
from harness.report import modality  # noqa: F401 - registers the modality-reduction section
from harness.report.compare import compare_runs
from harness.report.fmt import QUESTIONS_ONLY, fmt_acc, fmt_cell, fmt_ci, fmt_p
from harness.report.grouping import CATEGORIES, Group, group_runs, mean_std, reference, type_names
from harness.report.header import missing_line, mark_missing
from harness.report.plots import label_layout, curves_figure, plot_cost, plot_curves, plot_per_type
from harness.report.sections import SECTIONS, Context
from harness.report.statistics import (ALPHA, COST_COLUMNS, CORRECTION, Comparison, SectionStats, correct_table,
    pareto_front, section_stats, summarize)
from harness.report.writer import csv_columns, write_report

__all__ = ["ALPHA", "CATEGORIES", "COST_COLUMNS", "CORRECTION", "QUESTIONS_ONLY", "SECTIONS", "Comparison", "Context",
           "Group", "SectionStats", "compare_runs", "correct_table", "csv_columns", "curves_figure", "fmt_acc",
           "fmt_cell", "fmt_ci", "fmt_p", "group_runs", "mark_missing", "mean_std", "pareto_front", "plot_cost",
           "plot_curves", "plot_per_type", "reference", "section_stats", "summarize", "type_names", "write_report",
           "label_layout", "missing_line"]
