"""Searches, not only grids: an Optuna study over declared ranges of a variant's settings, every
trial an ordinary run, selected on validation accuracy only, then the best configuration retrained
with fresh seeds and compared on test.

Study file (``grids/NAME.toml``; the grid file's keys where they mean the same thing)::

    description = "logit KD's temperature and weight, and DualVGR's auxiliary-loss weights"
    data = "synthetic:tiny"
    variants = ["student-logits"]          # exactly one variant
    [train]                                # as a grid's [train]
    epochs = 15
    [set]                                  # fixed settings, as a grid's [set]
    module_dim = 64
    [executor]                             # as a grid's [executor]: kind, jobs, SLURM requests
    kind = "local"
    [search]
    n_trials = 20                          # trials finished (complete, pruned or failed) the study spends
    sampler = "tpe"                        # tpe (its first min(10, n_trials / 2) trials random) | random
    seed = 0                               # the trials' training seed (and the sampler's)
    pruner = "median"                      # median | successive-halving | none
    startup_trials = 5                     # trials before the pruner prunes anything
    warmup_epochs = 3                      # epochs a trial always trains before it can be pruned
    final_seeds = [1, 2, 3]                # fresh seeds (>= 3, not ``seed``) of the test comparison
    control = "student"                    # the un-distilled control retrained with them
    compare_default = true                 # and the variant at its default settings
    [search.params]                        # each a setting of the variant (variants.settings)
    "logits.T" = {low = 1.0, high = 8.0, log = true}
    "logits.weight" = {low = 0.1, high = 10.0, log = true}
    graph_layers = {low = 1, high = 3, int = true}
    beta = {choices = [1e-8, 1e-6]}

The direction is always to maximize the validation accuracy at the best-validation epoch. A trial
is a :class:`~harness.training.runner.RunSpec` with the sampled settings as overrides, so it has the run id
``--set`` would give it: a run already complete in the store (a grid's, an earlier study's) is
reused, its objective read from its record, never retrained. The pruner sees each epoch's
validation accuracy through the runner's ``on_epoch`` callback; a pruned run has ``pruned.json``
and no record (not a complete run), and a later study may resume it.

Storage: Optuna's journal file in the results store (``results/studies/NAME.log``; a shared file
system lets SLURM jobs share it) or an RDB URL. Restarting the same command continues the study:
trials a killed process left RUNNING are marked failed and asked again with the same settings (the
run resumes from its last epoch), and only finished trials count towards ``n_trials``, so none is
lost or duplicated. ``--jobs N`` runs N worker processes (or SLURM / submitit jobs) sharing the
study, each asking for a trial under a lock so that they never overshoot ``n_trials``.

Honesty: the workers search with test metrics sealed (:func:`harness.runs.record.sealed_test`); only
after the study, the best settings, the control and (optionally) the defaults are trained with
fresh seeds and compared on test by :func:`harness.report.write_report` (a normal report of those
runs); the study's report is :mod:`harness.search.report`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import types
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

import variants

from harness.data import dataset as D
from harness.runs import record as R
from harness.console import plural, say
from harness.errors import HarnessError
from harness.execution.grid import Grid, grid_plans, order_runs
from harness.evaluation.metrics import PRIMARY, task_metric
from harness.training.plan import RunPruned, RunSpec, feature_modalities, feature_mode, plan
from harness.training.runner import check_run, train
from harness.execution.schedule import worker_init, cpu_threads_per_worker, device_slots, job_init, submitit_threads
from harness.search.definition import Study, StudyError, load_study
from harness.runs.store import ResultsStore
from harness.files import held_elsewhere, locked

#: trials that spent the budget: finished, or running now (FAIL counts only with a ``failure``: a run that failed)
SPENT = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
SEALED = "a search selects on validation accuracy only"


# ----------------------------------------------------------------------------- storage


def journal_storage(path: Path) -> optuna.storages.BaseStorage:
    """Optuna's journal storage on a file (its backend's name changed in Optuna 4: both work)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from optuna.storages.journal import JournalFileBackend as backend  # Optuna >= 4.0
    except ImportError:  # Optuna 3.x
        from optuna.storages import JournalFileStorage as backend
    return optuna.storages.JournalStorage(backend(str(path)))


def storage_for(study: Study, store: ResultsStore, url: str | None = None):
    """The study's storage: an RDB ``url`` when given, else the journal file in the results store."""
    return url if url else journal_storage(storage_for_path(study, store))


def _sampler(study: Study, salt: int) -> optuna.samplers.BaseSampler:
    seed = study.search["seed"] + 1009 * salt  # a restarted or parallel worker does not replay another's draws
    if study.search["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, study.search["n_trials"] // 2 or 1))


def _pruner(study: Study) -> optuna.pruners.BasePruner:
    s = study.search
    if s["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s["startup_trials"], n_warmup_steps=s["warmup_epochs"])
    if s["pruner"] == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, s["warmup_epochs"]))
    return optuna.pruners.NopPruner()


def open_study(study: Study, store: ResultsStore, url: str | None = None) -> optuna.Study:
    """Create or load the study (maximize); a journal holds one definition: a study file whose trials
    changed since (variant, ranges, data, training) is refused, naming the journal."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(study, store, url)
    o = optuna.create_study(study_name=study.name, storage=storage, direction="maximize", load_if_exists=True,
                            sampler=_sampler(study, 0), pruner=_pruner(study))
    want = json.dumps(study.definition(), sort_keys=True)
    have = o.user_attrs.get("definition")
    if have is None:
        o.set_user_attr("definition", want)
    elif have != want:
        raise StudyError(f"{study.path}: the study {study.name!r} in {url or storage_for_path(study, store)} was "
                         f"defined otherwise (variant, data, [train], [set], seed or [search.params] changed): "
                         f"give the study another name (file name) or remove its storage")
    return o


def storage_for_path(study: Study, store: ResultsStore) -> Path:
    return store.root / "studies" / f"{study.name}.log"


def recover(o: optuna.Study) -> list[int]:
    """Trials left RUNNING by a killed process (call only while no worker runs): marked failed
    (``abandoned``, not counted) and asked again with the same settings; returns their numbers."""
    storage, out = o._storage, []  # the study's own storage (journal or RDB)
    for t in o.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "abandoned", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        o.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        out.append(t.number)
    return out


def spent(o: optuna.Study) -> int:
    """Trials that spent the budget: complete, pruned, running, or failed as runs (not abandoned)."""
    return sum(1 for t in o.get_trials(deepcopy=False)
               if t.state in SPENT or (t.state == TrialState.FAIL and "failure" in t.user_attrs))


# ----------------------------------------------------------------------------- trials


def spec_for(study: Study, params: dict, seed: int | None = None) -> RunSpec:
    """The run a trial (or a final retraining) is: the variant with [set] and the sampled settings."""
    seed = study.search["seed"] if seed is None else seed
    return RunSpec(variant=study.variant, data=study.data, seed=seed, overrides={**study.fixed, **params},
                   **study.train)


def val_view(rec: R.Record) -> dict:
    """All a search sees of a run's record: its best validation accuracy and per-epoch curve."""
    return {"best": R.metric(rec, "val"), "curve": [(h["epoch"] + 1, h["val_acc"]) for h in rec.get("history", [])]}


def run_trial(o: optuna.Study, trial: optuna.Trial, study: Study, store: ResultsStore, data: D.VideoQAData,
              device: str, progress: bool = True) -> TrialState:
    """One trial as an ordinary run: reused when complete in the store, else trained with the pruner
    watching each epoch; told to the study as complete, pruned or failed."""
    spec = spec_for(study, trial.params)
    planned = plan(spec, data)
    run_id = planned.run_id
    trial.set_user_attr("run_id", run_id)
    if store.is_complete(run_id):
        view = val_view(store.read_record(run_id))
        for step, v in view["curve"]:
            trial.report(v, step)
        trial.set_user_attr("reused", True)
        o.tell(trial, view["best"])
        return TrialState.COMPLETE

    def on_epoch(epoch: int, val_acc: float) -> bool:
        trial.report(val_acc, epoch + 1)
        return trial.should_prune()

    try:
        dev, _ = check_run(device, spec.precision)
        rec = train(planned, store, data=data, device=dev, progress=progress, on_epoch=on_epoch)
    except RunPruned:
        trial.set_user_attr("pruned_epoch", (store.read_pruned(run_id) or {}).get("epoch", -1) + 1)
        o.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    except (HarnessError, variants.ConfigError, torch.cuda.OutOfMemoryError) as e:
        trial.set_user_attr("failure", store.write_failure(run_id, {"variant": spec.variant, "seed": spec.seed,
                                                                    "spec": dataclasses.asdict(spec)}, e)["reason"])
        o.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    o.tell(trial, val_view(rec)["best"])
    return TrialState.COMPLETE


def next_trial(o: optuna.Study, study: Study, store: ResultsStore) -> optuna.Trial | None:
    """A new trial (an enqueued retry first), or None when the budget is spent; under a lock, so
    that parallel workers never overshoot ``n_trials``."""
    with locked(store.root / "studies" / f"{study.name}.ask.lock"):
        if spent(o) >= study.search["n_trials"]:
            return None
        return o.ask({k: p.distribution() for k, p in study.params.items()})


def search_worker(path: str, results: str, url: str | None, device: str, index: int,
                  progress: bool = True) -> dict:
    """One worker (this process, a local process or a SLURM job): asks for trials and runs them until
    the study's budget is spent, with test metrics sealed. Returns the trials it ran, by state."""
    study, store = load_study(path), ResultsStore(results)
    spec = spec_for(study, {})
    data = D.load(study.data, mode=feature_mode(spec), modalities=feature_modalities(spec))
    with R.sealed_test(SEALED):
        o = open_study(study, store, url)
        o.sampler = _sampler(study, 1 + index + 7919 * len(o.trials))
        ran: dict[str, int] = {}
        while (trial := next_trial(o, study, store)) is not None:
            state = run_trial(o, trial, study, store, data, device, progress)
            ran[state.name] = ran.get(state.name, 0) + 1
    return ran


# ----------------------------------------------------------------------------- running workers


def search_job(path: str, results: str, url: str | None, device: str, index: int, threads: int | None) -> dict:
    """:func:`search_worker` as a submitit job, with its share of the CPU (:func:`job_init`)."""
    job_init(threads)
    return search_worker(path, results, url, device, index, False)


def _pool_main(parent: int, threads: int | None, sharing: int, args: tuple) -> None:
    worker_init(parent, threads, sharing)
    try:
        search_worker(*args)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the study's process reports it
        pass


def run_workers(study: Study, store: ResultsStore, jobs: int, executor: str, device: str, url: str | None,
                options: dict, poll_s: float = 2.0) -> None:
    """The study's workers: in this process (local, one job), ``jobs`` local processes, or ``jobs``
    submitit jobs (``slurm``, ``submitit-local``) sharing the study's storage."""
    path, results = str(study.path.resolve()), str(store.root.resolve())
    if executor in ("slurm", "submitit-local"):
        return _run_submitit(study, results, path, jobs, executor, device, url, options, poll_s)
    if executor != "local":
        raise StudyError(f"{study.path}: a search runs with the local, slurm or submitit-local executor, "
                         f"not {executor!r}")
    if jobs <= 1:
        search_worker(path, results, url, device, 0)
        return None
    ctx = mp.get_context("spawn")
    slots = device_slots(jobs, device, torch.cuda.device_count() if device in ("auto", "cuda") else 0)
    threads = None if slots[0][0].startswith("cuda") else cpu_threads_per_worker(jobs)
    procs = [ctx.Process(target=_pool_main, args=(os.getpid(), threads, n, (path, results, url, d, i, False)),
                         daemon=True, name=f"search-worker-{i}") for i, (d, n) in enumerate(slots)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return None


def _run_submitit(study: Study, results: str, path: str, jobs: int, executor: str, device: str, url: str | None,
                  options: dict, poll_s: float) -> None:
    """``jobs`` submitit jobs, each a :func:`search_worker` (the executor module's submitit set-up
    and its way of following jobs, SLURM states included)."""
    from harness.execution.executor import follow, submitit_executor

    ex = submitit_executor(f"{study.name}-search", Path(results), executor, jobs,
                            device, options)
    threads = submitit_threads(executor, device, jobs)
    js = ex.map_array(search_job, [path] * jobs, [results] * jobs, [url] * jobs, [device] * jobs,
                      list(range(jobs)), [threads] * jobs)
    lost: list[str] = []
    workers = {j: types.SimpleNamespace(run_id=f"{study.name}-search-{i}", spec=types.SimpleNamespace(
        variant=f"search worker {i}", seed=study.search["seed"])) for i, j in enumerate(js)}
    try:
        follow(workers, executor,
                lambda w, out: lost.append(str(out.get("reason"))) if out.get("status") == "failed" else None, poll_s)
    except KeyboardInterrupt:
        for j in js:
            j.cancel(check=False)
        raise
    if lost:
        raise StudyError(f"{plural(len(lost), 'search job')} ended without finishing: {lost[0]}; rerun to go on")


# ----------------------------------------------------------------------------- the whole study


def final_specs(study: Study, best_params: dict) -> dict[str, list[RunSpec]]:
    """What the test comparison retrains with the fresh seeds: the best settings, the control (with
    the [set] settings it has) and, with ``compare_default``, the variant at its defaults."""
    seeds, ctrl = study.search["final_seeds"], study.search["control"]
    own = set(variants.settings(ctrl))
    out = {"best": [spec_for(study, best_params, s) for s in seeds],
           "control": [RunSpec(variant=ctrl, data=study.data, seed=s, overrides={k: v for k, v in study.fixed.items()
                                                                                 if k in own}, **study.train)
                       for s in seeds]}
    if study.search["compare_default"]:
        out["default"] = [spec_for(study, {}, s) for s in seeds]
    return out


def _spec_key(s: RunSpec) -> str:
    return json.dumps(dataclasses.asdict(s), sort_keys=True)


def final_grid(study: Study, specs: dict[str, list[RunSpec]]) -> Grid:
    """The fresh-seed runs as a grid (for :func:`harness.execution.grid.run_grid` and the report)."""
    runs = list({_spec_key(s): s for v in specs.values() for s in v}.values())
    return Grid(name=f"{study.name}-final", path=study.path, description=f"fresh-seed test comparison of {study.name}",
                data=study.data, seeds=list(study.search["final_seeds"]), runs=order_runs(runs),
                executor=study.executor)


def study_lock(study: Study, store: ResultsStore):
    """Held by the search command for the whole study: a second command on the same study would mark
    the first one's running trials abandoned, so it is refused."""
    path = store.root / "studies" / f"{study.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    if held_elsewhere(path):
        raise StudyError(f"another search of study {study.name!r} is running ({path} is locked); wait for it, "
                         f"or add workers to it with --jobs in that command")
    return locked(path)


def definition_hash(study: Study) -> str:
    return hashlib.sha1(json.dumps(study.definition(), sort_keys=True).encode()).hexdigest()[:10]


def check_task(study: Study) -> None:
    """A study maximizes validation accuracy: refused, naming the task and its metric, on a data set
    whose task is scored otherwise (a count's MSE)."""
    task = D.describe(study.data).task
    metric = task_metric(task)
    if metric.name != PRIMARY:
        raise StudyError(f"{study.path}: data {study.data} asks {task} questions, scored by {metric.title}; a "
                         f"search maximizes validation accuracy, so it runs on open-ended or multiple-choice data")


def search_phase(study: Study, store: ResultsStore, *, jobs: int = 1, executor: str = "local",
                 device: str = "auto", url: str | None = None, options: dict | None = None, console=None,
                 poll_s: float = 2.0) -> optuna.Study:
    """Recover what a killed run left, run the workers until ``n_trials`` trials have finished,
    and return the study (call within :func:`study_lock`)."""
    check_task(study)
    o = open_study(study, store, url)
    retried = recover(o)
    if console is not None:
        done = spent(o)
        say(console, f"study {study.name} ({study.variant} on {study.data}, {definition_hash(study)}): {done} of "
                     f"{plural(study.search['n_trials'], 'trial')} spent"
            + (f"; {len(retried)} left running by a killed process asked again" if retried else "")
            + f"; executor {executor} x {jobs}")
    run_workers(study, store, jobs, executor, device, url, dict(options or {}), poll_s)
    o = open_study(study, store, url)
    if spent(o) < study.search["n_trials"]:
        raise StudyError(f"study {study.name}: {spent(o)} of {plural(study.search['n_trials'], 'trial')} finished "
                         "(a worker died?); run the same command again to finish it")
    return o


def final_phase(study: Study, store: ResultsStore, o: optuna.Study, *, jobs: int = 1, executor: str = "local",
                device: str = "auto", options: dict | None = None, console=None, reports: str | Path = "reports",
                poll_s: float = 2.0, train_runs: bool = True) -> tuple[dict[str, list[str]], Path | None]:
    """After the search (test metrics unsealed): the best settings, the control and the defaults
    trained with the fresh seeds (as a grid: any executor), and their normal report
    (``reports/NAME-final.md``, the two-level statistics); returns their run ids by role and the
    report's path (None when a run failed: the study's report says so)."""
    from harness.execution.grid import run_grid
    from harness.report import write_report

    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in o.get_trials(deepcopy=False)):
        raise StudyError(f"study {study.name}: no complete trial yet (run `ablate.py search {study.path}`)")
    specs = final_specs(study, o.best_trial.params)
    g = final_grid(study, specs)
    planned = {_spec_key(p.spec): p.run_id for p in grid_plans(g, D.describe)}
    ids = {role: [planned[_spec_key(s)] for s in ss] for role, ss in specs.items()}
    if train_runs and run_grid(g, store, executor=executor, jobs=jobs, device=device, options=options,
                               console=console, poll_s=poll_s).interrupted:
        raise KeyboardInterrupt
    all_ids = [*dict.fromkeys(r for v in ids.values() for r in v)]
    if not all(store.is_complete(r) for r in all_ids):
        return ids, None
    path = write_report(store, g.name, all_ids, out_dir=reports, control=study.search["control"],
                        grid_file=str(study.path),
                        command=f"python ablate.py search {study.path} --results {store.root}")
    return ids, path
