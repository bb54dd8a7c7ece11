import collections
import copy
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # small models: one thread is faster on 2 cores and avoids oversubscription
# the processes the tests start (a command, a grid's or a search's process) inherit one thread too, unless the test
# or the harness gives them their share: each test worker already keeps a core busy, and OpenMP threads that wait
# for a core spin (a SIGKILL-and-resume grid test took 29 s with torch's default threads, 22 s with one)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def cpu_bf16_problem() -> str | None:
    """Why bf16 autocast cannot run here (None when it can): oneDNN has no bf16 LSTM on AVX2-only CPUs."""
    from harness.env import precision_problem

    return precision_problem("cpu", "bf16")


#: skip a test that trains or times in bf16 on a CPU that cannot, with the reason
needs_cpu_bf16 = pytest.mark.skipif(cpu_bf16_problem() is not None, reason=f"bf16 on this CPU: {cpu_bf16_problem()}")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts with one torch thread: a command a test runs in this process (``bench.py --threads 2``,
    ``ablate.py compress --threads 2``) sets torch's thread count for the process, and every later test of this
    worker would otherwise run two threads beside the other worker's (an every-student test took 53 s instead of
    21 s after one)."""
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with the reason, where there is no CUDA device. The test files with the most
    ``slow`` tests run first (each file's tests together and in their order, so module fixtures are set up once):
    test workers then end on short tests rather than one waiting for the other's long one."""
    slow = collections.Counter(item.path for item in items if "slow" in item.keywords)
    items.sort(key=lambda item: -slow[item.path])  # stable: a file's order is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.py runs these on a lent GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """Synthetic data sets are generated once per test session, in a temp dir."""
    d = tmp_path_factory.mktemp("data")
    old = os.environ.get("VQAKD_DATA_DIR")
    os.environ["VQAKD_DATA_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("VQAKD_DATA_DIR", None)
    else:
        os.environ["VQAKD_DATA_DIR"] = old


@pytest.fixture(scope="session")
def tiny(data_cache):
    from harness.data import dataset as D

    return D.load("synthetic:tiny")


#: the runs of the shared tiny store, one epoch each: a teacher, a student distilled from it (the teacher its
#: plan asks for is this very run), the reference model and the question-only baseline
SHARED_RUNS = {
    "teacher-g4": {"seed": 3, "epochs": 1, "batch_size": 512},
    "student-logits": {"seed": 3, "epochs": 1, "batch_size": 512},
    "dualvgr": {"seed": 0, "epochs": 1, "batch_size": 512},
    "question-only": {"seed": 0, "epochs": 1, "batch_size": 512},
}


class SharedStore:
    """A tiny results store trained once per test session, a run when a test first asks for it: tests never
    write to it, they copy the runs they need into their own directory (:meth:`copy`)."""

    def __init__(self, root: Path, data):
        self.root, self.data, self.records = root, data, {}

    def record(self, variant: str) -> dict:
        """The record of ``variant``'s run (:data:`SHARED_RUNS`), trained the first time it is asked for."""
        if variant not in self.records:
            from harness.training.plan import RunSpec
            from harness.training.runner import train
            from harness.runs.store import ResultsStore

            self.records[variant] = train(RunSpec(variant, data="synthetic:tiny", **SHARED_RUNS[variant]),
                                          ResultsStore(self.root), data=self.data, device="cpu", progress=False)
        return self.records[variant]

    def copy(self, dst: Path, *variants: str):
        """A store at ``dst`` (which may exist) holding the runs of ``variants`` (all of them when none is
        named) and the teacher runs they used: (the store, {variant: record})."""
        from harness.runs.store import ResultsStore

        recs = {v: copy.deepcopy(self.record(v)) for v in variants or SHARED_RUNS}
        keep = {r["run_id"] for r in recs.values()} | {t for r in recs.values() for t in r["teacher_runs"]}
        runs = self.root / "runs"
        shutil.copytree(self.root, dst, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if Path(d) == runs and n not in keep])
        return ResultsStore(dst), recs


@pytest.fixture(scope="session")
def shared_store(tiny, tmp_path_factory) -> SharedStore:
    """The session's trained tiny store (:class:`SharedStore`); copy it, never write to it."""
    return SharedStore(tmp_path_factory.mktemp("shared") / "results", tiny)


@pytest.fixture(scope="session")
def exported(shared_store, tmp_path_factory):
    """The shared store's teacher-g4 run exported with ``ablate.py export`` from a copy of the store: (its record,
    the bundle's path); the bundle tests import it, or forge it (into their own directories)."""
    from typer.testing import CliRunner

    import ablate

    d = tmp_path_factory.mktemp("bundle")
    store, recs = shared_store.copy(d / "trained-here", "teacher-g4")
    rec = recs["teacher-g4"]
    out = d / "teacher.tar"
    res = CliRunner().invoke(ablate.app, ["export", rec["run_id"], "-o", str(out), "--results", str(store.root)])
    assert res.exit_code == 0, res.output
    return rec, out
