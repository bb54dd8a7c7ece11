"""A distilled student's training epoch with the teacher-output cache against without it
(harness/training/teacher_cache.py), teacher-g4 -> student-logits, the runner's own epoch
(``_Run.train_epoch``: batches, the shared training step, the loss sums), on the CPU.

The two epochs are timed alternately, ``REPS`` times each, in one process, and the ratio of
their medians is reported (``extra_info``: ``epoch_s_uncached``, ``epoch_s_cached``,
``speedup``); alternating makes load from other work on the machine fall on both alike. The
teacher is randomly initialised (its weights do not change its cost) and its cache is built
before timing (built once per teacher run, it is not part of a student's epoch).

    python -m pytest tests/benchmarks/test_teacher_cache_bench.py --benchmark-enable -s

With the project's default ``--benchmark-disable``, the tiny case runs once on its first
:data:`SMOKE_QUESTIONS` training questions as a smoke test and the small one is skipped; the
>= 1.3x target is asserted only when benchmarking."""
from __future__ import annotations

import dataclasses
import statistics
import time

import pytest
import torch
from rich.console import Console

import variants
from harness.data import dataset as D
from harness.env import device_name
from harness.training.plan import RunSpec, check_plans, plan
from harness.training.runner import _Display, _Options, _Run
from harness.runs.store import ResultsStore
from harness.files import atomic_torch_save

REPS = 5
SMOKE_QUESTIONS = 512
TARGET = 1.3  # >= 1.3x faster per student epoch for a teacher-g4 student


def _runs(preset: str, store: ResultsStore, questions: int | None = None):
    data = D.load(f"synthetic:{preset}")
    if questions is not None:  # the first questions of the training split only
        tr = data.splits["train"]
        head = D.SplitData(tr.name, *(getattr(tr, f)[:questions] for f in (
            "questions", "lengths", "video_rows", "answers", "qtypes")), tr.question_ids[:questions],
            tr.video_ids[:questions])
        data = dataclasses.replace(data, splits={**data.splits, "train": head})
    p = plan(RunSpec("student-logits", data=f"synthetic:{preset}", seed=1), data)
    check_plans([p])  # the outputs each teacher's cache holds, as train() sets them
    (tp,) = p.teachers
    torch.manual_seed(0)
    teacher = variants.build(tp.cfg).eval().requires_grad_(False)
    atomic_torch_save(store.run_dir(tp.run_id) / "best.pt", teacher.state_dict())
    trec = {"run_id": tp.run_id, "variant": tp.spec.variant, "variant_config": tp.cfg.to_dict()}
    console = Console(stderr=True, quiet=True)
    runs = {}
    for cached in (False, True):
        opts = _Options(console, False, 25, cached, False, ())
        run = _Run(p, store, data, torch.device("cpu"), [teacher], [trec], opts)
        run.run_dir = store.run_dir(f"{p.run_id}-{'cached' if cached else 'plain'}")  # two separate states
        run.state_path, run.best_path = run.run_dir / "state.pt", run.run_dir / "best.pt"
        run.setup(force=True)
        runs[cached] = run
    n = len(runs[True].splits["train"])
    return runs, _Display(console, False, "bench", 1, D.num_batches(n, p.train["batch_size"])), n


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.slow
def test_student_epoch_with_and_without_teacher_cache(benchmark, data_cache, tmp_path, preset):
    if benchmark.disabled and preset != "tiny":
        pytest.skip("small: only when benchmarking (--benchmark-enable)")
    reps = REPS if not benchmark.disabled else 1
    runs, display, n = _runs(preset, ResultsStore(tmp_path), SMOKE_QUESTIONS if benchmark.disabled else None)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(reps):
        for cached in ((False, True) if r % 2 == 0 else (True, False)):  # alternate which goes first
            t0 = time.perf_counter()
            runs[cached].train_epoch(r, display)
            times[cached].append(time.perf_counter() - t0)
    plain, cached = statistics.median(times[False]), statistics.median(times[True])
    speedup = plain / cached
    pairs = [a / b for a, b in zip(times[False], times[True])]  # each repetition's two epochs, back to back
    benchmark.extra_info.update({"preset": preset, "train_questions": n, "reps": reps,
                                 "epoch_s_uncached": times[False], "epoch_s_cached": times[True],
                                 "epoch_s_uncached_median": plain, "epoch_s_cached_median": cached,
                                 "speedup": speedup, "speedup_per_repetition": pairs,
                                 "torch_threads": torch.get_num_threads(), "device": device_name("cpu")})
    print(f"\n{preset}: student-logits (teacher-g4) epoch of {n:,} questions on {device_name('cpu')}, "
          f"{torch.get_num_threads()} thread(s), median of {reps}: without the cache {plain:.2f} s, "
          f"with it {cached:.2f} s: {speedup:.2f}x (per repetition {min(pairs):.2f}-{max(pairs):.2f}x)")
    # one more cached epoch through pytest-benchmark, so it appears in its table and saved runs
    benchmark.pedantic(runs[True].train_epoch, args=(reps, display), rounds=1, iterations=1)
    if not benchmark.disabled:
        assert speedup >= TARGET, f"{preset}: {speedup:.2f}x < {TARGET}x"
