"""The Markdown report: sections, statistics (intervals, Holm-corrected p-values, per-seed McNemar),
Pareto front, plots, CSV, determinism."""
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from harness.measurement import costs
from harness.runs import identity
from harness import stats as S
from harness.report import fmt_p, group_runs, pareto_front, reference, write_report
from harness.runs.store import ResultsStore
from harness.files import atomic_write_bytes, atomic_write_json

BOOT = S.Bootstrap()  # the reports' default

TYPES = ["what", "who", "how", "when", "where"]
N = 200  # test questions
K = 10  # answer classes
DATA = {"spec": "synthetic:fake", "id": "fake-abc123", "name": "fake", "type_names": TYPES + ["other"],
        "sizes": {"train": 600, "val": 100, "test": N}}
QIDS = np.arange(1000, 1000 + N)
QTYPES = np.array([TYPES[i % len(TYPES)] for i in range(N)])
ANSWERS = np.random.default_rng(0).integers(0, K, N)

#: (variant, seed) -> test accuracy (%); hand-picked so the Pareto front on GFLOPs is known
ACC = {("dualvgr", 1): 70.0, ("dualvgr", 2): 72.5, ("student", 1): 75.0, ("student", 2): 74.0,
       ("student-logits", 1): 77.0, ("student-logits", 2): 80.5, ("teacher-g4", 1): 85.0,
       ("autoencoder", 3): 60.0}
#: cost fields per variant; student-logits has none (the optional field is absent)
COST = {"dualvgr": {"flops_per_sample": 2.0e9, "macs_per_sample": 1.0e9, "latency_ms_median": 5.0,
                    "peak_mem_mib_train": 300.0, "peak_mem_mib_infer": 50.0},
        "student": {"flops_per_sample": 0.5e9, "macs_per_sample": 0.25e9, "latency_ms_median": 2.0,
                    "peak_mem_mib_train": 100.0, "peak_mem_mib_infer": 20.0},
        "teacher-g4": {"flops_per_sample": 3.0e9, "macs_per_sample": 1.5e9, "latency_ms_median": 6.0,
                       "peak_mem_mib_train": 400.0, "peak_mem_mib_infer": 60.0},
        "autoencoder": {"flops_per_sample": 2.5e9, "macs_per_sample": 1.25e9, "latency_ms_median": 4.0,
                        "peak_mem_mib_train": 350.0, "peak_mem_mib_infer": 55.0}}
PARAMS = {"dualvgr": 223_748, "student": 120_000, "student-logits": 120_000, "teacher-g4": 275_252,
          "autoencoder": 250_000}


def acc_block(correct: np.ndarray) -> dict:
    qt = QTYPES[: len(correct)]
    per_type = {t: 100.0 * correct[qt == t].mean() for t in TYPES}
    return {"overall": 100.0 * correct.mean(), "per_type": per_type,
            "counts": {t: int((qt == t).sum()) for t in TYPES}, "n": len(correct)}


def make_run(store: ResultsStore, variant: str, seed: int, *, acc: float, data: dict = DATA, cost=None,
             teachers=(), model_overrides=None, finished="2026-01-02T00:00:00+00:00", run_id=None,
             recon_mse=None) -> dict:
    """A well-formed record and its predictions_test.csv, consistent with each other."""
    rng = np.random.default_rng(zlib.crc32(f"{variant}/{seed}/{run_id}".encode()))
    correct = np.zeros(N, bool)
    correct[rng.permutation(N)[: int(round(acc * N / 100))]] = True
    pred = np.where(correct, ANSWERS, (ANSWERS + 1) % K)
    # one architecture per family, as in the zoo (the students a smaller MFB here, to make them cheaper):
    # latency is stored per architecture and device, so runs of one architecture share it
    model = {"module_dim": 64, "graph_layers": 4 if variant == "teacher-g4" else 1,
             "mm_dim": 128 if variant.startswith("student") else 256,
             "decoder_hidden": 32 if variant == "autoencoder" else 0, **(model_overrides or {})}
    run_id = run_id or f"{variant}-{data['id']}-s{seed}"
    test = acc_block(correct)
    if recon_mse is not None:
        test["recon_mse"] = recon_mse
    teacher_recs = [{"variant": t, "run_id": f"{t}-{data['id']}-s{seed}", "params": PARAMS[t],
                     "test_acc": ACC.get((t, seed), 80.0)} for t in teachers]
    rec = {
        "run_id": run_id, "status": "complete", "variant": variant,
        "variant_config": {"name": variant, "arch": "dualvgr", "description": f"{variant} (test)", "model": model,
                           "loss": {"alpha": 1.0}, "teachers": list(teachers),
                           "distill": [{"name": "logits", "weight": 1.0, "params": {}}] if teachers else []},
        "train_config": {"epochs": 3, "batch_size": 64, "lr": 1e-3}, "seed": seed, "data": data,
        "metrics": {"best_epoch": 2, "val": acc_block(correct[:100]), "test": test, "test_last": acc_block(correct),
                    "ablations": {"shuffle_video": acc_block(correct & (np.arange(N) % 3 == 0)),
                                  "zero_appearance": acc_block(correct & (np.arange(N) % 2 == 0)),
                                  "zero_motion": acc_block(correct & (np.arange(N) % 4 != 0))}},
        "history": [{"epoch": e, "loss": 2.0 - e, "train_acc": 50.0 + 10 * e, "val_acc": acc - 10 + 5 * e,
                     "lr": 1e-3, "train_time_s": 1.0} for e in range(3)],
        "epochs_run": 3, "train_samples_per_s": 1000.0, "wall_time_s": 10.0,
        "params": {"total": PARAMS[variant], "trainable": PARAMS[variant], "by_module": {}},
        "teachers": teacher_recs, "teacher_runs": [t["run_id"] for t in teacher_recs],
        "git_commit": "abc123", "torch_version": "2.9.0", "device_name": "cpu (test)",
        "started_at": f"2026-01-01T00:0{seed}:00+00:00", "finished_at": finished,
    }
    if cost is not None:
        rec["cost"] = {k: v for k, v in cost.items() if k not in ("latency_ms_median", "peak_mem_mib_infer")}
        if "latency_ms_median" in cost:  # measured once per configuration and device (harness.measurement.costs)
            key = costs.cost_key(model, "dualvgr", rec["device_name"])
            atomic_write_json(store.root / "costs" / f"{key}.json", {
                "latency_ms_median": cost["latency_ms_median"], "latency_ms_p90": 1.1 * cost["latency_ms_median"],
                "spread": 1.1, "peak_mem_mib_infer": cost.get("peak_mem_mib_infer"), "reps": 50,
                "measured_at": "2026-01-03T00:00:00+00:00", "device_name": rec["device_name"], "host": "test"})
    store.write_record(rec)
    df = pd.DataFrame({"question_id": QIDS, "video_id": QIDS // 2, "qtype": QTYPES, "answer": ANSWERS,
                       "pred_best": pred, "correct_best": correct, "pred_last": pred, "correct_last": correct})
    atomic_write_bytes(store.run_dir(run_id) / "predictions_test.csv", df.to_csv(index=False).encode())
    return rec


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(tmp_path / "results")
    for (variant, seed), acc in ACC.items():
        make_run(s, variant, seed, acc=acc, cost=COST.get(variant),
                 teachers=("teacher-g4",) if variant == "student-logits" else (),
                 recon_mse=0.125 + 0.01 * seed if variant == "autoencoder" else None)
    return s


def sections(md: str) -> dict[str, str]:
    """'### title' -> the text up to the next heading."""
    parts = re.split(r"^(#{2,3} .*)$", md, flags=re.M)
    return {parts[i].lstrip("#").strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def table(text: str, first: int = 0) -> dict[str, list[str]]:
    """The ``first``-th Markdown table in ``text``: row label -> cells (bold marks removed)."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([re.sub(r"^\*\*(.*)\*\*$", r"\1", c.strip()) for c in line.strip().strip("|").split(" | ")])
        elif cur:
            tables.append(cur)
            cur = []
    t = tables[first]
    return {"__header__": t[0], **{r[0]: r for r in t[2:]}}


def stats(store, variant) -> tuple[float, float | None]:
    acc = [r["metrics"]["test"]["overall"] for r in store.records(variant=variant)]
    return float(np.mean(acc)), float(np.std(acc, ddof=1)) if len(acc) > 1 else None


def fmt(m, s) -> str:
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def load_correct(store, run_id) -> pd.Series:
    df = pd.read_csv(store.run_dir(run_id) / "predictions_test.csv")
    return pd.Series(df["correct_best"].to_numpy(bool), index=df["question_id"])


def test_sections_main_table_and_deltas(store, tmp_path):
    md_path = write_report(store, "grid1", out_dir=tmp_path / "reports", grid_file="grids/grid1.toml")
    assert md_path == tmp_path / "reports" / "grid1.md"
    md = md_path.read_text()
    secs = sections(md)
    for title in ("Data set: fake (`fake-abc123`)", "Main table", "Accuracy per question type",
                  "Evaluation-time ablations", "Significance", "Accuracy against cost", "Per-type accuracy (plot)",
                  "Training curves", "Runs"):
        assert title in secs, title
    assert "Reports are regenerated by `python ablate.py report --grid grid1`; do not edit." in md
    for s in ("fake (`fake-abc123`)", "`grids/grid1.toml`", "- runs: 8 complete", "`abc123`", "cpu (test)", "2.9.0",
              "2026-01-01T00:01:00+00:00 .. 2026-01-02T00:00:00+00:00"):
        assert s in md, s

    main = table(secs["Main table"])
    # baseline first, then control, teachers, students, others
    assert [k for k in main if k != "__header__"] == ["dualvgr", "student", "teacher-g4", "student-logits",
                                                      "autoencoder"]
    h = main["__header__"]
    col = {name: h.index(name) for name in h}
    base_m, _ = stats(store, "dualvgr")
    ctrl_m, _ = stats(store, "student")
    for v in ("dualvgr", "student", "student-logits", "teacher-g4", "autoencoder"):
        m, s = stats(store, v)
        row = main[v]
        assert row[col["test acc"]] == fmt(m, s)
        assert row[col["n seeds"]] == f"n={len(store.records(variant=v))}"
        assert row[col["params"]] == f"{PARAMS[v]:,}"
        if v != "dualvgr":
            assert row[col["Δ dualvgr"]] == f"{m - base_m:+.2f}"
        if v != "student":
            assert row[col["Δ student"]] == f"{m - ctrl_m:+.2f}"
    assert main["dualvgr"][col["Δ dualvgr"]] == "ref" and main["student"][col["Δ student"]] == "ref"
    # one seed: no standard deviation (undefined, not 0.00)
    assert main["teacher-g4"][col["test acc"]] == "85.00" and main["teacher-g4"][col["n seeds"]] == "n=1"
    # cost: present -> formatted, absent -> "-"
    assert main["dualvgr"][col["GFLOPs"]] == "2" and main["student"][col["GFLOPs"]] == "0.5"
    assert main["dualvgr"][col["latency ms"]] == "5.000" and main["dualvgr"][col["train mem MiB"]] == "300.0"
    assert all(main["student-logits"][col[c]] == "-" for c in ("GFLOPs", "train mem MiB"))
    # latency belongs to the configuration: student-logits (the student's architecture) shows the student's
    assert main["student-logits"][col["latency ms"]] == main["student"][col["latency ms"]] == "2.000"
    assert main["student-logits"][col["teachers"]] == "teacher-g4" and main["dualvgr"][col["teachers"]] == "-"
    # reconstruction error of the autoencoder variant (mean over its seeds)
    assert main["autoencoder"][col["recon MSE"]] == f"{0.155:.4g}" and main["dualvgr"][col["recon MSE"]] == "-"

    # per-type table: mean over seeds, the data set's types with questions (not 'other')
    pt = table(secs["Accuracy per question type"])
    assert pt["__header__"] == ["variant", *TYPES, "all"]
    for t in TYPES:
        exp = np.mean([r["metrics"]["test"]["per_type"][t] for r in store.records(variant="student-logits")])
        assert pt["student-logits"][1 + TYPES.index(t)].startswith(f"{exp:.2f} ± ")
    assert pt["questions"][1:] == [str(int((QTYPES == t).sum())) for t in TYPES] + [str(N)]

    ab = table(secs["Evaluation-time ablations"])
    assert ab["__header__"] == ["variant", "test", "videos shuffled", "appearance zeroed", "motion zeroed"]
    exp = np.mean([r["metrics"]["ablations"]["zero_motion"]["overall"] for r in store.records(variant="dualvgr")])
    assert ab["dualvgr"][4] == f"{exp:.2f}"

    # the CSV: one row per variant, same numbers
    df = pd.read_csv(tmp_path / "reports" / "grid1.csv")
    assert len(df) == 5 and df["variant"].is_unique
    r = df.set_index("variant")
    for v in ("dualvgr", "student", "student-logits"):
        m, s = stats(store, v)
        assert r.loc[v, "test_acc_mean"] == pytest.approx(m) and r.loc[v, "test_acc_std"] == pytest.approx(s)
        assert r.loc[v, "test_acc_ci_lo"] < m < r.loc[v, "test_acc_ci_hi"] and not r.loc[v, "ci_covers_seeds"]
        assert r.loc[v, "delta_baseline"] == pytest.approx(m - base_m)
        assert r.loc[v, "delta_control"] == pytest.approx(m - ctrl_m)
    assert r.loc["dualvgr", "gflops"] == pytest.approx(2.0) and np.isnan(r.loc["student-logits", "gflops"])
    assert r.loc["teacher-g4", "n_seeds"] == 1 and np.isnan(r.loc["teacher-g4", "test_acc_std"])
    # categories: the baseline, the control, then the zoo's families (tags)
    assert r.loc["student-logits", "category"] == "student" and r.loc["teacher-g4", "category"] == "teacher"
    assert r.loc["autoencoder", "category"] == "autoencoder" and r.loc["student", "category"] == "control"


def test_significance_matches_direct_computations(store, tmp_path):
    """Each row: Δ the mean paired difference, the interval and p from harness.stats on the
    predictions, Holm over the table's p column, McNemar per seed from the predictions files."""
    md = write_report(store, "g", out_dir=tmp_path).read_text()
    sig = sections(md)["Significance"]
    assert "Holm-Bonferroni" in sig and "McNemar's exact two-sided test of each paired seed" in sig
    for ref, first in (("dualvgr", 0), ("student", 1)):
        rows = table(sig, first)
        assert rows["__header__"] == ["variant", "paired seeds", "Δ", "95% CI", "p", "p (Holm)",
                                      "McNemar per seed: b/c, p"]
        ps = {}
        for v in ("student-logits", "teacher-g4", "student" if ref == "dualvgr" else "dualvgr"):
            paired, mc, a_all, r_all = [], [], [], []
            for seed in (1, 2):
                va = [r for r in store.records(variant=v) if r["seed"] == seed]
                vr = [r for r in store.records(variant=ref) if r["seed"] == seed]
                if not va or not vr:
                    continue
                a, rr = load_correct(store, va[0]["run_id"]), load_correct(store, vr[0]["run_id"])
                b, c = int((a & ~rr).sum()), int((~a & rr).sum())
                mc.append(f"{seed}: {b}/{c}, p={fmt_p(binomtest(min(b, c), b + c, 0.5).pvalue)}")
                paired.append(str(seed))
                a_all.append(va[0]["run_id"])
                r_all.append(vr[0]["run_id"])
            row = rows[v]
            assert row[1] == ", ".join(paired) and row[-1] == "; ".join(mc)
            delta = np.mean([store.read_record(x)["metrics"]["test"]["overall"] for x in a_all]) - np.mean(
                [store.read_record(x)["metrics"]["test"]["overall"] for x in r_all])
            assert row[2] == f"{delta:+.2f}"
            t = S.CorrectTable({x: load_correct(store, x).to_numpy() for x in a_all + r_all},
                               {"all": np.ones(N, bool)}, BOOT)
            e = t.compare(a_all, r_all)
            assert row[3] == f"[{e.lo:+.1f}, {e.hi:+.1f}]†"  # 1 or 2 seeds: questions only
            assert row[4] == fmt_p(e.p) + "†"
            ps[v] = e.p
        # the autoencoder ran on seed 3 only: no pairing
        assert rows["autoencoder"][-1] == "not paired"
        holm = dict(zip(ps, S.holm(list(ps.values()))))  # the table's family: every paired variant
        for v, p in holm.items():
            assert rows[v][5].removesuffix(" *") == fmt_p(p) + "†" and rows[v][5].endswith("*") == (p < 0.05)
    assert "autoencoder: no shared seeds (autoencoder: 3; dualvgr: 1, 2)" in sig
    assert "teacher-g4" in table(sig, 0) and "dualvgr" in table(sig, 1)  # baseline vs control too
    assert "n seeds < 3: seed variance not estimated" in md
    assert "- statistics: two-level bootstrap over seeds and test questions (`harness/stats.py`), 2000 resamples, " \
           f"generator seed {S.BOOTSTRAP_SEED}" in md


def test_three_seeds_give_intervals_over_seeds_and_questions(tmp_path):
    s = ResultsStore(tmp_path / "results")
    for seed, (a, b, c) in enumerate([(70.0, 71.0, 80.0), (72.0, 74.0, 81.5), (71.0, 71.5, 82.0)]):
        make_run(s, "dualvgr", seed, acc=a)
        make_run(s, "student", seed, acc=b)
        make_run(s, "student-logits", seed, acc=c, teachers=("teacher-g4",))
    md = write_report(s, "g", out_dir=tmp_path / "r").read_text()
    main = table(sections(md)["Main table"])
    ci = main["student-logits"][main["__header__"].index("95% CI")]
    assert re.fullmatch(r"\[\d+\.\d, \d+\.\d\]", ci)  # no †: 3 seeds
    lo, hi = (float(x) for x in ci.strip("[]").split(", "))
    assert lo < 81.17 < hi
    assert "seed variance not estimated" not in md
    sig = table(sections(md)["Significance"], 0)
    assert sig["student-logits"][1] == "0, 1, 2" and not sig["student-logits"][3].endswith("†")
    assert sig["student-logits"][5].endswith("*")  # +10 points over 3 seeds: significant after Holm


def test_reference_prefers_the_registered_settings_of_an_axis(tmp_path):
    """A grid with [axes] over the control's loss weights (grids/vqakd-weights.toml): the control is
    the row with the registered alpha and beta, whatever its position or run count."""
    s = ResultsStore(tmp_path / "results")
    for seed in (1, 2, 3):
        for alpha, beta in ((1.0, 1e-8), (1.0, 1e-6), (100.0, 1e-8), (100.0, 1e-6)):
            rec = make_run(s, "student", seed, acc=70.0 + alpha / 10, run_id=f"student-{alpha}-{beta}-{seed}")
            rec["variant_config"]["loss"] = {"alpha": alpha, "beta": beta, "ce_weight": 1.0}
            s.write_record(rec)
    groups = group_runs(list(s.iter_records()))["fake-abc123"]
    assert len(groups) == 4
    ctrl = reference(groups, "student")
    assert ctrl.label == "student [loss.alpha=1.0, loss.beta=1e-08]"
    md = write_report(s, "g", out_dir=tmp_path / "r").read_text()
    assert "Against `student` (runs of `student [loss.alpha=1.0, loss.beta=1e-08]`):" in md


def test_runs_without_predictions_are_left_out_of_the_statistics(store, tmp_path):
    rid = store.records(variant="student-logits")[0]["run_id"]
    (store.run_dir(rid) / "predictions_test.csv").unlink()
    md = write_report(store, "g", out_dir=tmp_path).read_text()
    assert f"runs without usable test predictions, left out of the intervals and tests: `{rid}`." in md
    main = table(sections(md)["Main table"])
    assert main["student-logits"][main["__header__"].index("95% CI")] == "-"  # no interval from part of the runs
    m, s = stats(store, "student-logits")
    assert main["student-logits"][main["__header__"].index("test acc")] == fmt(m, s)  # the records still count
    sig = table(sections(md)["Significance"], 0)
    assert sig["student-logits"][1] == str(store.records(variant="student-logits")[1]["seed"])  # the other seed
    assert "predictions missing or on other questions for `" + rid + "` (those seeds left out)" in md


def test_pareto_front_helper():
    assert pareto_front([1, 2, 3], [50, 60, 70]) == [True, True, True]
    assert pareto_front([1, 2, 3], [70, 60, 80]) == [True, False, True]
    assert pareto_front([1, 1, 2], [60, 70, 70]) == [False, True, False]  # same cost, less accurate; dominated
    assert pareto_front([1, 1], [60, 60]) == [True, True]  # identical points do not dominate each other
    assert pareto_front([None, 2.0, 1.0], [99, 50, 40]) == [False, True, True]  # no cost: not on the front
    assert pareto_front([], []) == []


def test_pareto_front_in_report_and_plots(store, tmp_path):
    md_path = write_report(store, "g", out_dir=tmp_path / "r")
    md = md_path.read_text()
    cost = sections(md)["Accuracy against cost"]
    # GFLOPs: student 0.5 (74.5), dualvgr 2 (71.25), autoencoder 2.5 (60), teacher-g4 3 (85)
    assert "Pareto front (GFLOPs per sample; max accuracy, min cost): student, teacher-g4." in cost
    # student-logits has the student's architecture, so its latency (measured per architecture), and a better accuracy
    assert "Pareto front (latency (ms, batch 1); max accuracy, min cost): student-logits, teacher-g4." in cost
    assert "Not plotted (no `cost.flops_per_sample`): student-logits." in cost
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {Path(x).name for x in links} == {"acc_vs_gflops.png", "acc_vs_latency_ms.png", "per_type.png",
                                             "training_curves.png", "acc_vs_train_gflops_total.png"}
    assert "Pareto front (training GFLOPs to produce the model; max accuracy, min cost)" in cost
    for link in links:
        assert link.startswith("g_files/")
        p = md_path.parent / link
        assert p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_cost_anywhere_skips_cost_plots_with_a_note(tmp_path):
    s = ResultsStore(tmp_path / "results")
    for seed in (1, 2):
        make_run(s, "dualvgr", seed, acc=70 + seed)
        make_run(s, "student", seed, acc=72 + seed)
    out = tmp_path / "r"
    # a stale plot from an earlier report with costs is removed
    atomic_write_bytes(out / "g_files" / "acc_vs_gflops.png", b"old")
    md = write_report(s, "g", out_dir=out).read_text()
    assert "Accuracy against GFLOPs per sample: not plotted, no record has `cost.flops_per_sample`." in md
    assert "Accuracy against latency (ms, batch 1): not plotted" in md
    assert "no record has cost measurements" in md
    assert sorted(p.name for p in (out / "g_files").iterdir()) == ["per_type.png", "training_curves.png"]
    main = table(sections(md)["Main table"])
    assert "recon MSE" not in main["__header__"]


@pytest.mark.slow
def test_report_is_deterministic(store, tmp_path):
    a = write_report(store, "g", out_dir=tmp_path / "a").read_text().splitlines()
    b = write_report(store, "g", out_dir=tmp_path / "b").read_text().splitlines()
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(a) == len(b) and all(x.startswith("- generated:") for x, _ in diff)
    assert sum(x.startswith("- generated:") for x in a) == 1
    assert (tmp_path / "a" / "g.csv").read_bytes() == (tmp_path / "b" / "g.csv").read_bytes()
    # the same report again into the same place: the same Markdown, nothing left behind
    c = write_report(store, "g", out_dir=tmp_path / "a").read_text().splitlines()
    assert [x for x in c if not x.startswith("- generated:")] == [x for x in a if not x.startswith("- generated:")]
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_run_ids_subset_missing_runs_and_several_data_sets(store, tmp_path):
    data2 = {**DATA, "id": "other-999", "name": "other", "type_names": ["count", "action"]}
    make_run(store, "dualvgr", 1, acc=50.0, data=data2)
    ids = [r["run_id"] for r in store.iter_records() if r["variant"] in ("dualvgr", "student")]
    md = write_report(store, "g", run_ids=ids + ["nope-000"], out_dir=tmp_path).read_text()
    secs = sections(md)
    assert "Data set: fake (`fake-abc123`)" in secs and "Data set: other (`other-999`)" in secs
    assert "- runs: 5 of 6 complete; 1 requested but not complete, left out: `nope-000`" in md
    assert "the control `student` has no run on this data set" in md
    df = pd.read_csv(tmp_path / "g.csv")
    assert list(zip(df["data_id"], df["variant"])) == [("fake-abc123", "dualvgr"), ("fake-abc123", "student"),
                                                       ("other-999", "dualvgr")]
    # one set of plots per data set
    names = {Path(x).name for x in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)}
    assert {"per_type-fake-abc123.png", "per_type-other-999.png"} <= names


def test_settings_split_groups_and_superseded_seeds(tmp_path):
    s = ResultsStore(tmp_path / "results")
    make_run(s, "dualvgr", 1, acc=70.0)
    make_run(s, "student", 1, acc=71.0)
    make_run(s, "student", 1, acc=60.0, model_overrides={"module_dim": 128}, run_id="student-wide-1")
    # a rerun of the same variant, settings and seed: the later one counts
    make_run(s, "dualvgr", 1, acc=90.0, run_id="dualvgr-rerun", finished="2026-02-01T00:00:00+00:00")
    groups = group_runs(list(s.iter_records()))["fake-abc123"]
    assert [g.label for g in groups] == ["dualvgr", "student [module_dim=128]", "student [module_dim=64]"]
    assert groups[0].superseded == ["dualvgr-fake-abc123-s1"]
    md = write_report(s, "g", out_dir=tmp_path / "r").read_text()
    main = table(sections(md)["Main table"])
    assert main["dualvgr"][main["__header__"].index("test acc")] == "90.00"
    assert "superseded by a later run" in md and "`dualvgr-fake-abc123-s1`" in md


def test_empty_store(tmp_path):
    md = write_report(ResultsStore(tmp_path / "none"), "g", out_dir=tmp_path / "r").read_text()
    assert "No complete run." in md
    assert pd.read_csv(tmp_path / "r" / "g.csv").empty


def test_report_on_real_records(tiny, shared_store, tmp_path):
    """Records written by the runner itself (1 epoch each on the tiny synthetic set), copied from the
    session's shared store."""
    s, recs = shared_store.copy(tmp_path / "results", "dualvgr", "question-only")
    md_path = write_report(s, "real", out_dir=tmp_path / "reports")
    md = md_path.read_text()
    secs = sections(md)
    main = table(secs["Main table"])
    h = main["__header__"]
    for v, r in recs.items():
        assert main[v][h.index("test acc")] == f"{r['metrics']['test']['overall']:.2f}"
        assert main[v][h.index("params")] == f"{r['params']['total']:,}"
    d = recs["question-only"]["metrics"]["test"]["overall"] - recs["dualvgr"]["metrics"]["test"]["overall"]
    assert main["question-only"][h.index("Δ dualvgr")] == f"{d:+.2f}"
    assert main["question-only"][h.index("Δ student")] == "-"
    assert "`student` has no run on this data set: no comparison." in secs["Significance"]
    a = load_correct(s, recs["question-only"]["run_id"])
    b_ = load_correct(s, recs["dualvgr"]["run_id"])
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    row = table(secs["Significance"])["question-only"]
    assert row[-1] == f"{recs['dualvgr']['seed']}: {b}/{c}, p={fmt_p(binomtest(min(b, c), b + c, 0.5).pvalue)}"
    assert row[3].endswith("]†")  # one seed: the interval covers the test questions only
    pt = table(secs["Accuracy per question type"])
    assert pt["__header__"][1:-1] == [t for t in tiny.type_names if t in recs["dualvgr"]["metrics"]["test"]["per_type"]]
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (md_path.parent / link).stat().st_size > 0
    df = pd.read_csv(tmp_path / "reports" / "real.csv")
    assert sorted(df["variant"]) == ["dualvgr", "question-only"]


def test_cost_plot_labels_merge_identical_points_and_stack_the_rest():
    from harness.report import label_layout
    pts = [{"label": "dualvgr", "x": 3.3e-3, "acc": 77.7}, {"label": "student", "x": 3.3e-3, "acc": 77.7},
           {"label": "student-logits", "x": 3.3e-3, "acc": 78.9}, {"label": "question-only", "x": 8e-4, "acc": 26.5}]
    layout = label_layout(pts)
    assert [(labels, k) for _, labels, k in layout] == [
        (["question-only"], 0), (["student-logits"], 0), (["dualvgr", "student"], 1)]
    # far apart at the same cost: each starts its own stack
    far = [{"label": f"v{i}", "x": 1.0, "acc": a} for i, a in enumerate((78.0, 77.9, 62.0, 61.9, 56.0))]
    assert [k for _, _, k in label_layout(far)] == [0, 1, 0, 1, 0]


def test_compare_pairs_runs_by_variant_and_seed(tmp_path):
    from harness.report import compare_runs
    s = ResultsStore(tmp_path / "results")
    a = [make_run(s, "dualvgr", seed, acc=acc, run_id=f"a{seed}")["run_id"] for seed, acc in ((1, 70.0), (2, 72.0))]
    b = [make_run(s, "dualvgr", seed, acc=acc, run_id=f"b{seed}")["run_id"] for seed, acc in ((1, 71.0), (2, 69.0))]
    b.append(make_run(s, "dualvgr", 3, acc=90.0, run_id="b3")["run_id"])  # no partner: left out
    df, md = compare_runs(s, a, b, "fp32", "bf16")
    row = df.iloc[0]
    assert row["variant"] == "dualvgr" and row["pairs"] == 2
    assert row["acc_fp32"] == pytest.approx(71.0) and row["acc_bf16"] == pytest.approx(70.0)
    assert row["delta_mean"] == pytest.approx(-1.0) and row["delta_std"] == pytest.approx(np.std([1, -3], ddof=1))
    # the interval and p: harness.stats on the paired predictions (2 seeds: the questions only)
    pa = {k: load_correct(s, k).to_numpy() for k in a + b}
    e = S.CorrectTable(pa, {"all": np.ones(N, bool)}, BOOT).compare(["b1", "b2"], ["a1", "a2"])
    assert (row["ci_lo"], row["ci_hi"], row["p"]) == pytest.approx((e.lo, e.hi, e.p)) and not row["ci_covers_seeds"]
    # McNemar per seed from the predictions files, not pooled
    for (seed, bb, cc, p), k in zip(row["mcnemar"], (1, 2)):
        assert (seed == k and bb == int((pa[f"b{k}"] & ~pa[f"a{k}"]).sum())
                and cc == int((~pa[f"b{k}"] & pa[f"a{k}"]).sum()))
        assert p == pytest.approx(binomtest(min(bb, cc), bb + cc).pvalue)
    assert list(df["variant"]) == ["dualvgr"]  # one variant: no pooled row (it would repeat it)
    # "paired seeds" lists the seeds, as the report's significance table does
    assert any(line.startswith("| dualvgr | 1, 2 | 71.00 | 70.00 | -1.00 |") for line in md), md
    assert any("Holm-Bonferroni" in line for line in md)
    # a second variant: a row each, and `all` taking every pair as a unit; Holm across the rows
    a += [make_run(s, "student", seed, acc=75.0, run_id=f"sa{seed}")["run_id"] for seed in (1, 2, 3)]
    b += [make_run(s, "student", seed, acc=77.0, run_id=f"sb{seed}")["run_id"] for seed in (1, 2, 3)]
    df, md = compare_runs(s, a, b, "fp32", "bf16")
    assert list(df["variant"]) == ["dualvgr", "student", "all"] and list(df["pairs"]) == [2, 3, 5]
    assert any(line.startswith("| all | 5 pairs (the rows above) |") for line in md), md
    assert df.iloc[-1]["delta_mean"] == pytest.approx((1 - 3 + 2 + 2 + 2) / 5)
    assert bool(df.iloc[1]["ci_covers_seeds"]) and bool(df.iloc[2]["ci_covers_seeds"])
    assert list(df["p_holm"]) == pytest.approx(S.holm(list(df["p"])))


def test_training_curves_have_ticks_at_whole_epochs(tmp_path):
    from harness.report import curves_figure

    s = ResultsStore(tmp_path / "results")
    runs = [make_run(s, "dualvgr", seed, acc=70.0 + seed, run_id=f"r{seed}") for seed in (1, 2)]
    for r in runs:  # three epochs: matplotlib's default locator would put ticks at 1.0, 1.25, 1.5, ...
        r["history"] = [{"epoch": e, "val_acc": 50.0 + 5 * e, "loss": 1.0} for e in range(3)]
    (g,) = group_runs(runs)[runs[0]["data"]["id"]]
    fig = curves_figure([g], {g.label: "C0"}, "t")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # a count's curves plot its validation MSE (the line is the mean over seeds of the history's val_mse)
    for r in runs:
        for h in r["history"]:
            h["val_mse"] = 9.0 - h["epoch"] + r["seed"]
    ax = curves_figure([g], {g.label: "C0"}, "t", key="val_mse").axes[0]
    assert list(ax.lines[0].get_ydata()) == [10.5, 9.5, 8.5] and "MSE" in ax.get_ylabel()


def test_header_names_the_code_and_marks_runs_of_several_fingerprints_and_environments(tmp_path):
    s = ResultsStore(tmp_path / "results")
    for seed, code, threads in ((0, "c0de00000001", 1), (1, "c0de00000002", 2)):
        rec = make_run(s, "dualvgr", seed, acc=70.0)
        rec.update(code={"fingerprint": code}, environment={"threads": threads, "cpu": "X", "cpu_capability": "AVX2"})
        s.write_record(rec)
    md = write_report(s, "g", out_dir=tmp_path / "r").read_text()
    assert "- code: code c0de00000001 (1 run), code c0de00000002 (1 run); **runs from more than one code" in md
    assert "- environment differs between runs (can change numbers): threads: 1, 2" in md
    runs = [line for line in md.splitlines() if line.startswith("| `dualvgr-")]
    assert len(runs) == 2 and all("§ code `c0de0000000" in line for line in runs)
    rec = s.read_record(runs[0].split("`")[1])
    rec["code"]["fingerprint"] = "c0de00000002"
    s.write_record(rec)
    md = write_report(s, "g", out_dir=tmp_path / "r").read_text()
    assert "- code: code c0de00000002 (2 runs)" in md and "§" not in md


def test_header_says_when_the_runs_code_is_not_the_checkouts_and_which_files_changed(tmp_path):
    mine = identity.code_record()
    s = ResultsStore(tmp_path / "results")
    rec = make_run(s, "dualvgr", 0, acc=70.0)
    rec["code"] = {"fingerprint": "0ldc0de00000", "digests": {**mine["digests"], "variants/losses.py": "0" * 12,
                                                              "harness/gone.py": "1" * 12, "`bad name`": "2"}}
    s.write_record(rec)
    md = write_report(s, "g", out_dir=tmp_path / "r").read_text()
    assert (f"- code: code 0ldc0de00000 (1 run); **not this checkout's code**: code 0ldc0de00000 is not this "
            f"checkout's ({mine['fingerprint']}); changed: `harness/gone.py`, `variants/losses.py`\n") in md
    rec["code"] = {"fingerprint": "0ldc0de00000", "files": ["variants/losses.py"]}  # no digests kept
    s.write_record(rec)
    md = write_report(s, "g", out_dir=tmp_path / "r").read_text()
    assert "is not this checkout's (" + mine["fingerprint"] + "); its records do not say which files changed" in md
    rec["code"] = mine
    s.write_record(rec)
    md = write_report(s, "g", out_dir=tmp_path / "r").read_text()
    assert f"- code: code {mine['fingerprint']} (1 run), this checkout's\n" in md


def test_a_partial_report_says_what_is_missing_in_its_header_and_rows(store, tmp_path):
    """Runs planned but not complete: the header says the report is partial, how many runs, which
    configurations have no complete run and which seed has none; each row short of seeds says which."""
    complete = [f"{v}-{DATA['id']}-s{s}" for v, s in ACC if v != "autoencoder"]
    planned = [{"run_id": f"{v}-{DATA['id']}-s{s}", "variant": v, "label": v, "seed": s}
               for v in ("dualvgr", "student", "student-logits", "teacher-g4", "student-dkd") for s in (1, 2, 3)]
    ids = [p["run_id"] for p in planned]
    md = write_report(store, "part", run_ids=ids, out_dir=tmp_path / "r", boot=S.Bootstrap(resamples=200),
                      planned=planned).read_text()
    head = md.split("### Main table")[0]
    assert f"**Partial report: {len(ids) - len(complete)} of the {len(ids)} planned runs are not complete**" in head
    assert "configurations with no complete run (1, not in any table): `student-dkd` (seeds 1, 2, 3)" in head
    assert "seeds with no complete run at all: 3" in head
    assert f"- runs: {len(complete)} of {len(ids)} complete" in head
    main = table(sections(md)["Main table"])
    assert "n=2 of 3 (seed 3 missing)" in main["dualvgr"]
    assert "n=1 of 3 (seeds 2, 3 missing)" in main["teacher-g4"]
    csv = pd.read_csv(tmp_path / "r" / "part.csv").set_index("label")
    assert str(csv.loc["teacher-g4", "seeds_missing"]) == "2;3"
    # nothing missing: no partial lines, plain n
    md = write_report(store, "full", run_ids=complete, out_dir=tmp_path / "r", boot=S.Bootstrap(resamples=200),
                      planned=[p for p in planned if p["run_id"] in complete]).read_text()
    assert "Partial report" not in md and "n=2 of" not in md


@pytest.mark.slow
def test_ablate_report_of_a_partly_run_grid_names_the_missing_seed_and_variant(tiny, tmp_path):
    """`ablate.py report --grid` with some of the grid's runs complete: the written report says so."""
    from typer.testing import CliRunner

    import ablate

    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0, 1]\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n[axes]\nmodule_dim = [16, 24]\n')
    results, reports = tmp_path / "results", tmp_path / "reports"
    runner = CliRunner()
    r = runner.invoke(ablate.app, ["--grid", str(grid), "--results", str(results), "--reports", str(reports),
                                   "--seeds", "0"])
    assert r.exit_code == 0, r.output
    store = ResultsStore(results)
    store.run_dir(next(x["run_id"] for x in store.iter_records() if x["variant_config"]["model"]["module_dim"] == 24)
                  ).joinpath("record.json").unlink()  # one configuration with no complete run
    r = runner.invoke(ablate.app, ["report", "--grid", str(grid), "--results", str(results), "--reports", str(reports)])
    assert r.exit_code == 0, r.output
    md = (reports / "g.md").read_text()
    assert "**Partial report: 3 of the 4 planned runs are not complete**" in md
    assert "`question-only [module_dim=24]` (seeds 0, 1)" in md
    assert "seeds with no complete run at all: 1" in md
    assert "n=1 of 2 (seed 1 missing)" in md


def test_rows_of_a_loss_parameter_axis_are_labelled_with_that_parameter(store, tmp_path):
    """A grid axis over similarity.matrix labels its rows 'student-similarity [similarity.matrix=self]',
    not with the whole distill JSON (the default spelled out where a run leaves it implicit)."""
    for seed in (1, 2):
        for matrix in (None, "self"):
            rec = make_run(store, "student-logits", seed, acc=70.0 + seed, teachers=("teacher-g4",),
                           run_id=f"sim-{matrix}-{seed}")
            rec["variant"] = rec["variant_config"]["name"] = "student-similarity"
            rec["variant_config"]["distill"] = [{"name": "similarity", "weight": 1.0,
                                                 "params": {"matrix": matrix} if matrix else {}}]
            store.run_dir(rec["run_id"]).joinpath("record.json").unlink()
            store.write_record(rec)
    groups = group_runs([r for r in store.iter_records() if r["variant"] == "student-similarity"])
    labels = sorted(g.label for gs in groups.values() for g in gs)
    assert labels == ["student-similarity [similarity.matrix=cross]", "student-similarity [similarity.matrix=self]"]


def test_compare_says_which_variants_and_seeds_it_left_out(tmp_path):
    from harness.report import compare_runs
    s = ResultsStore(tmp_path / "results")
    a = [make_run(s, "dualvgr", seed, acc=70.0 + seed, run_id=f"a{seed}")["run_id"] for seed in (1, 2)]
    a.append(make_run(s, "student", 1, acc=75.0, run_id="sa1")["run_id"])  # student only in fp32
    b = [make_run(s, "dualvgr", seed, acc=71.0 + seed, run_id=f"b{seed}")["run_id"] for seed in (1, 2, 3)]
    df, md = compare_runs(s, a, b, "fp32", "bf16")
    assert list(df["variant"]) == ["dualvgr"]
    note = next(line for line in md if line.startswith("Not compared"))
    assert note == "Not compared (2): `student` only in fp32 (seeds 1); `dualvgr` seed 3 only in bf16.", note
