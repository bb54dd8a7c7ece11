"""The report's modality-reduction section (harness/report/modality.py): each one-stream student beside the
two-stream model trained the same way, the accuracy it recovers overall and per question type, its costs."""
from __future__ import annotations

import re

import pytest

import variants
from harness.report.grouping import Group
from harness.report.modality import modality, two_stream_reference
from harness.runs.store import ResultsStore


def _group(variant: str) -> Group:
    return Group("d", variant, variant, "student", [{"variant_config": variants.get_config(variant).to_dict()}])


def test_each_one_stream_student_has_the_two_stream_model_trained_the_same_way_as_reference():
    groups = [_group(v) for v in ("dualvgr", "teacher-g4", "student", "student-logits", "student-similarity",
                                  "modality-appearance", "modality-motion-kd")]
    by = {g.variant: g for g in groups}
    assert modality(by["modality-appearance"]) == "appearance" and modality(by["student"]) is None
    assert two_stream_reference(by["modality-appearance"], groups).variant == "student"
    assert two_stream_reference(by["modality-motion-kd"], groups).variant == "student-similarity"
    assert two_stream_reference(by["modality-motion-kd"], [g for g in groups if g.variant != "student-similarity"]) \
        is None


@pytest.mark.slow
def test_a_grid_report_says_what_each_one_stream_student_recovers(tiny, tmp_path):
    from harness.execution import grid as G
    from harness.execution.grid import run_grid
    from harness.report import write_report

    f = tmp_path / "modality.toml"
    f.write_text('data = "synthetic:tiny"\nseeds = [0]\n'
                 'variants = ["student", "modality-appearance", "modality-motion"]\n'
                 '[train]\nepochs = 1\nbatch_size = 512\n[set]\nmodule_dim = 16\n')
    store = ResultsStore(tmp_path / "results")
    res = run_grid(G.load(f), store, device="cpu")
    assert not res.failed
    md = write_report(store, "modality", res.run_ids, out_dir=tmp_path / "reports").read_text()
    part = md.split("### Modality reduction: one stream against two")[1].split("\n### ")[0]
    recs = {r["variant"]: r for r in store.iter_records()}
    two = recs["student"]["metrics"]["test"]
    for v, reads in (("modality-appearance", "appearance"), ("modality-motion", "motion")):
        one = recs[v]["metrics"]["test"]
        row = re.search(rf"\| {v} \| {reads} \| student \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| n=1 / n=1 \| "
                        rf"([\d,]+) / ([\d,]+) \((\d\.\d\d)x\) \|", part)
        assert row, part
        assert float(row[1]) == round(one["overall"], 2) and float(row[2]) == round(two["overall"], 2)
        assert float(row[3]) == round(100 * one["overall"] / two["overall"], 1)
        p1, p2 = recs[v]["params"]["total"], recs["student"]["params"]["total"]
        assert (int(row[4].replace(",", "")), int(row[5].replace(",", ""))) == (p1, p2) and p1 < p2
        per_part = part.split("Recovered % per question type")[1]
        types = [t.strip() for t in re.search(r"\| one-stream variant \|(.*)\|", per_part)[1].split("|")]
        assert sorted(types) == sorted(two["per_type"])
        per = re.search(rf"\| {v} \|" + r" ([\d.-]+) \|" * len(types), per_part)
        # a type the two-stream model gets wholly wrong has no ratio: "-"
        assert list(per.groups()) == [f"{100 * one['per_type'][t] / two['per_type'][t]:.1f}" if two["per_type"][t]
                                      else "-" for t in types]
