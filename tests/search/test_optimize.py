"""Searches (harness.search.optimize, ablate.py search): study files checked before anything runs, trials that
are ordinary runs (reused when complete), pruned runs recorded as pruned and never as finished, test
metrics sealed while searching, a killed study that resumes with no trial lost or duplicated."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from harness.runs import record as R
from harness.execution.schedule import cpu_threads_per_worker
from harness.search import optimize as S
from harness.training.plan import RunPruned
from harness.training.plan import RunSpec
from harness.training.runner import train
from harness.runs.store import ResultsStore

ROOT = Path(__file__).resolve().parents[2]

STUDY = """
data = "synthetic:tiny"
variants = ["{variant}"]
[train]
epochs = {epochs}
batch_size = 512
[set]
module_dim = 16
{teacher}
[search]
n_trials = {n_trials}
startup_trials = 1
warmup_epochs = 1
{extra}
[search.params]
alpha = {{low = 0.1, high = 100.0, log = true}}
{params}
"""


def _study(tmp_path: Path, name: str = "s", variant: str = "student", epochs: int = 2, n_trials: int = 3,
           extra: str = "", params: str = "") -> Path:
    teacher = 'teacher = "teacher-g2"' if variant != "student" else ""
    if variant != "student" and not params:
        params = '"logits.T" = {low = 1.0, high = 8.0, log = true}'
    extra = extra if "final_seeds" in extra else extra + "\nfinal_seeds = [1, 2, 3]"
    p = tmp_path / f"{name}.toml"
    p.write_text(STUDY.format(variant=variant, epochs=epochs, teacher=teacher, n_trials=n_trials, extra=extra,
                              params=params))
    return p


def _finished(o: optuna.Study) -> list:
    return [t for t in o.get_trials() if not t.user_attrs.get("abandoned")]


# --- the study file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, params, message", [
    ("sampler = 'grid'", "", r"\[search\] sampler = 'grid' must be one of tpe, random"),
    ("n_trials_max = 3", "", r"\[search\] has unknown key\(s\) n_trials_max"),
    ("final_seeds = [0, 1, 2]", "", r"\[search\] final_seeds = \[0, 1, 2\] must be >= 3 distinct integers, none of "
                                    r"them the study's seed 0"),
    ("", "'logits.T' = {low = 1.0, high = 8.0}", r"\[search.params\] 'logits.T' is not a setting of student"),
    ("", "beta = {low = 1e-6, high = 1e-8, log = true}", r"\[search.params\] 'beta': needs numbers low < high"),
    ("", "beta = {low = 0.0, high = 1.0, log = true}", r"\[search.params\] 'beta': needs numbers low < high"),
    ("", "beta = {choices = []}", r"\[search.params\] 'beta': choices must be a non-empty list"),
    ("", "mm_dim = {low = 16, high = 64, int = true, step = 2}", r"\[search.params\] 'mm_dim' must be a "
                                                                     r"table of choices, high, int, log, low"),
    ("", "module_dim = {low = 16, high = 32}", r"\[search.params\] 'module_dim' is also fixed in \[set\]"),
])
def test_study_file_errors_name_the_file_and_the_key(tmp_path, extra, params, message):
    p = _study(tmp_path, extra=extra, params=params)
    with pytest.raises(S.StudyError, match=str(p).replace(".", r"\.") + ": " + message):
        S.load_study(p)


def test_study_file_checks_values_and_variants(tmp_path):
    p = _study(tmp_path, params='"edge_by" = {choices = ["time", "nonsense"]}')
    with pytest.raises(S.StudyError, match=r"\[search.params\] 'edge_by': 'nonsense'"):
        S.load_study(p)
    p.write_text(p.read_text().replace('variants = ["student"]', 'variants = ["student*"]'))
    with pytest.raises(S.StudyError, match=r"variants must name exactly one variant"):
        S.load_study(p)
    s = S.load_study(_study(tmp_path, params='"edge_by" = {choices = ["time", "feature"]}'))
    assert s.variant == "student" and set(s.params) == {"alpha", "edge_by"} and s.search["n_trials"] == 3
    assert S.load_study(ROOT / "grids" / "search-logits.toml").search["n_trials"] == 20  # the shipped study loads
    from harness.execution import grid as G
    with pytest.raises(G.GridError, match=r"a \[search\] table makes this a study file.*ablate.py search"):
        G.load(ROOT / "grids" / "search-logits.toml")


# --- pruned runs -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_pruned_run_is_recorded_as_pruned_and_never_as_finished(tiny, tmp_path, data_cache):
    store = ResultsStore(tmp_path / "results")
    spec = RunSpec("student", epochs=3, batch_size=512, overrides={"module_dim": 16}, seed=5)
    seen = []
    with pytest.raises(RunPruned, match="pruned after epoch 2"):
        train(spec, store, data=tiny, device="cpu", progress=False, on_epoch=lambda e, v: seen.append(e) or e == 1)
    assert seen == [0, 1]
    run_id = store.read_pruned(next(store.runs.iterdir()).name)["run_id"]
    assert store.read_pruned(run_id)["epoch"] == 1 and store.read_pruned(run_id)["epochs_run"] == 2
    assert not store.is_complete(run_id) and store.to_frame().empty and not store.records()
    import ablate
    out = CliRunner().invoke(ablate.app, ["results", "--results", str(store.root)])
    assert run_id not in out.output and "no complete runs" in out.output
    out = CliRunner().invoke(ablate.app, ["results", "--results", str(store.root), "--incomplete"])
    assert "pruned by a search after epoch 2" in " ".join(out.output.split())
    # a later run resumes it: the callback sees the epochs already trained first; then it completes
    replay = []
    rec = train(spec, store, data=tiny, device="cpu", progress=False, on_epoch=lambda e, v: replay.append(e) or False)
    assert replay == [0, 1, 2] and rec["epochs_run"] == 3 and store.read_pruned(run_id) is None
    # the callback changes nothing a record holds: the same run trained without it has the same history
    other = ResultsStore(tmp_path / "other")
    plain = train(spec, other, data=tiny, device="cpu", progress=False)
    assert plain["run_id"] == rec["run_id"]
    assert [h["val_acc"] for h in plain["history"]] == [h["val_acc"] for h in rec["history"]]


class _PruneOdd(optuna.pruners.BasePruner):
    """Prunes every odd-numbered trial after its first epoch: pruning that does not depend on accuracies."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1 and (trial.last_step or 0) >= 1


@pytest.mark.slow
def test_pruned_trials_are_pruned_runs_and_the_report_says_so(tiny, tmp_path, data_cache, monkeypatch):
    monkeypatch.setattr(S, "_pruner", lambda study: _PruneOdd())
    study, store = S.load_study(_study(tmp_path, epochs=3, n_trials=4)), ResultsStore(tmp_path / "results")
    o = S.search_phase(study, store, device="cpu")
    trials = _finished(o)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED] * 2
    for t in trials:
        rid = t.user_attrs["run_id"]
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["pruned_epoch"] == 1 and store.read_pruned(rid)["epoch"] == 0
            assert not store.is_complete(rid)
        else:
            assert store.is_complete(rid) and store.read_pruned(rid) is None
    listed = set(store.to_frame()["run_id"])
    assert listed == {t.user_attrs["run_id"] for t in trials if t.state == TrialState.COMPLETE}
    from harness.search.report import _bill, _trial_rows
    rows = {int(r[0]): r for r in _trial_rows(o)}
    assert rows[1][2] == "pruned" and rows[1][3] == "1" and rows[0][2] == "complete" and rows[0][3] == "-"
    # the study's bill counts the pruned runs' training up to their pruning, as a record counts a run's
    lines, total = _bill(store, o)
    pruned_row = next(ln for ln in lines if ln.startswith("| pruned trial runs"))
    cells = [c.strip() for c in pruned_row.strip("|").split("|")]
    assert cells[1] == "2" and float(cells[2]) > 0 and float(cells[3]) > 0 and total > float(cells[3])


# --- reuse, honesty, resuming --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trials_reuse_complete_runs(tiny, tmp_path, data_cache):
    study, store = S.load_study(_study(tmp_path, n_trials=2)), ResultsStore(tmp_path / "results")
    done = train(S.spec_for(study, {"alpha": 2.0}), store, data=tiny, device="cpu", progress=False)  # as a grid would
    record = store.run_dir(done["run_id"]) / "record.json"
    before = record.stat().st_mtime_ns
    S.open_study(study, store).enqueue_trial({"alpha": 2.0})
    o = S.search_phase(study, store, device="cpu")
    first = o.trials[0]
    assert first.user_attrs["run_id"] == done["run_id"] and first.user_attrs.get("reused")
    assert first.value == R.metric(done, "val")  # the objective: its recorded best validation accuracy
    assert first.intermediate_values == {h["epoch"] + 1: h["val_acc"] for h in done["history"]}
    assert record.stat().st_mtime_ns == before  # not retrained
    assert not o.trials[1].user_attrs.get("reused") and len(_finished(o)) == 2


@pytest.mark.slow
def test_test_metrics_are_never_read_while_searching(tiny, tmp_path, data_cache, monkeypatch):
    """The workers search with test metrics sealed: the whole search (a distilled student, whose records
    copy its teacher's test accuracy, included) reads none; a search that read one would fail."""
    reads = []
    real = R.split_metrics

    def spy(rec, split):
        if R._SEALED:
            reads.append(split)
        return real(rec, split)

    monkeypatch.setattr(R, "split_metrics", spy)
    study, store = (S.load_study(_study(tmp_path, variant="student-logits", n_trials=2, extra='pruner = "none"')),
                    ResultsStore(tmp_path / "r"))
    o = S.search_phase(study, store, device="cpu")
    assert [t.state for t in _finished(o)] == [TrialState.COMPLETE] * 2 and set(reads) == {"val"}
    assert all(store.read_record(t.user_attrs["run_id"])["teachers"][0]["test_acc"] is not None for t in o.trials)
    # a search whose objective peeked at test accuracy is stopped, not quietly tuned on test
    monkeypatch.setattr(S, "val_view", lambda rec: {"best": R.metric(rec, "test"), "curve": []})
    more = S.load_study(_study(tmp_path, name="peek", variant="student-logits", n_trials=1))
    S.open_study(more, store).enqueue_trial(o.trials[0].params)  # a complete run: reused, its record read
    with pytest.raises(R.TestMetricsSealed, match="'test' metrics of run .* read while sealed"):
        S.search_phase(more, store, device="cpu")


@pytest.mark.slow
def test_a_killed_study_resumes_with_no_trial_lost_or_duplicated(tmp_path, data_cache):
    # the final phase retrains the best settings and the control (3 seeds each), not also the defaults: what is
    # checked here is that no trial is lost or run twice, and that both reports are written
    path, results = _study(tmp_path, epochs=3, n_trials=3, extra="compare_default = false"), tmp_path / "results"
    env = {**os.environ, "VQAKD_DATA_DIR": str(data_cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "ablate.py"), "search", str(path), "--results", str(results),
           "--reports", str(tmp_path / "reports"), "--device", "cpu"]
    study, store = S.load_study(path), ResultsStore(results)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # killed while its second trial trains, after an epoch of it
        deadline = time.time() + 180
        while time.time() < deadline:
            if S.storage_for_path(study, store).exists():
                running = [t for t in S.open_study(study, store).trials if t.state == TrialState.RUNNING
                           and t.number == 1 and t.intermediate_values]
                if running:
                    break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    o = S.open_study(study, store)
    assert [t.state for t in o.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    killed_run = o.trials[1].user_attrs["run_id"]
    assert (store.run_dir(killed_run) / "state.pt").exists() and not store.is_complete(killed_run)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "1 left running by a killed process asked again" in said and "resuming after epoch" in said
    o = S.open_study(study, store)
    states = [(t.number, t.state, bool(t.user_attrs.get("abandoned"))) for t in o.trials]
    assert states[1] == (1, TrialState.FAIL, True)  # the killed trial, abandoned, and asked again as #2
    retry = o.trials[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.params == o.trials[1].params
    assert retry.user_attrs["run_id"] == killed_run and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    finished = _finished(o)
    assert len(finished) == 3 and len({t.user_attrs["run_id"] for t in finished}) == 3  # none lost, none twice
    assert (tmp_path / "reports" / f"{study.name}.md").is_file()
    assert (tmp_path / "reports" / f"{study.name}-final.md").is_file()


@pytest.mark.slow
def test_parallel_workers_share_the_study_without_overshooting(tmp_path, data_cache):
    study, store = S.load_study(_study(tmp_path, n_trials=4)), ResultsStore(tmp_path / "results")
    o = S.search_phase(study, store, jobs=2, device="cpu")
    assert len(o.trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in o.trials)
    assert len({t.user_attrs["run_id"] for t in o.trials}) == 4


@pytest.mark.slow
def test_submitit_local_workers_run_the_study(tmp_path, data_cache):
    """The SLURM code path (submitit jobs sharing the journal), through submitit's local executor."""
    study, store = S.load_study(_study(tmp_path, n_trials=2)), ResultsStore(tmp_path / "results")
    o = S.search_phase(study, store, jobs=2, executor="submitit-local", device="cpu", options={"time_min": 10},
                       poll_s=0.5)
    assert len(o.trials) == 2 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in o.trials)
    # both jobs run at once on this machine: each with its share of the cores (two jobs of every core each on a
    # 2-core machine trained 8x slower)
    share = cpu_threads_per_worker(2)
    assert [store.read_record(t.user_attrs["run_id"])["environment"]["threads"] for t in o.trials] == [share] * 2


def test_a_second_search_of_the_same_study_is_refused(tmp_path):
    study, store = S.load_study(_study(tmp_path)), ResultsStore(tmp_path / "results")
    lock = store.root / "studies" / f"{study.name}.lock"
    lock.parent.mkdir(parents=True)
    code = (f"import fcntl, time; f = open({str(lock)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            f"print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(S.StudyError, match="another search of study 's' is running"):
            S.study_lock(study, store)
    finally:
        holder.kill()
        holder.wait()


def test_a_changed_study_definition_is_refused(tmp_path):
    p = _study(tmp_path)
    store = ResultsStore(tmp_path / "results")
    S.open_study(S.load_study(p), store)
    p.write_text(p.read_text().replace("high = 100.0", "high = 10.0"))
    with pytest.raises(S.StudyError, match="was defined otherwise"):
        S.open_study(S.load_study(p), store)


@pytest.mark.parametrize("rdb", [False, True])
def test_a_trial_left_running_is_asked_again_once(tmp_path, rdb):
    """Journal file or RDB URL: a trial a killed process left RUNNING becomes abandoned (not spent) and its
    settings are asked again, first, by the next worker; the budget counts finished trials only."""
    study, store = S.load_study(_study(tmp_path, n_trials=2)), ResultsStore(tmp_path / "results")
    url = f"sqlite:///{tmp_path / 'study.db'}" if rdb else None
    o = S.open_study(study, store, url)
    left = S.next_trial(o, study, store)  # asked, then the process "dies"
    assert S.spent(o) == 1
    o = S.open_study(study, store, url)
    assert S.recover(o) == [0] and S.spent(o) == 0
    again = S.next_trial(o, study, store)
    assert again.params == left.params and again.user_attrs["retry_of"] == 0
    assert S.next_trial(o, study, store) is not None and S.next_trial(o, study, store) is None  # 2 of 2 spent
    assert S.recover(S.open_study(study, store, url)) == [1, 2]
    assert (tmp_path / "study.db").exists() == rdb


def test_a_study_on_count_data_is_refused_before_anything_runs(tmp_path):
    """A search maximizes validation accuracy; a count's metric is its MSE, so the study is refused, naming it."""
    p = _study(tmp_path)
    p.write_text(p.read_text().replace('data = "synthetic:tiny"', 'data = "synthetic:tiny-count"'))
    study, store = S.load_study(p), ResultsStore(tmp_path / "results")
    with pytest.raises(S.StudyError, match=r"asks count questions, scored by test MSE; a search maximizes validation"):
        S.search_phase(study, store, device="cpu")
    assert not (store.root / "studies").exists() and not list(store.root.glob("runs/*"))
