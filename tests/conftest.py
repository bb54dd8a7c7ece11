import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # small models: one thread is faster on 2 cores and avoids oversubscription


def cpu_bf16_problem() -> str | None:
    """Why bf16 autocast cannot run here (None when it can): oneDNN has no bf16 LSTM on AVX2-only CPUs."""
    from harness.env import precision_problem

    return precision_problem("cpu", "bf16")


#: skip a test that trains or times in bf16 on a CPU that cannot, with the reason
needs_cpu_bf16 = pytest.mark.skipif(cpu_bf16_problem() is not None, reason=f"bf16 on this CPU: {cpu_bf16_problem()}")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with the reason, where there is no CUDA device."""
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
    from harness import data as D

    return D.load("synthetic:tiny")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """A teacher-g4 run trained in one store and exported with ``ablate.py export`` (one epoch, batch 128):
    (its record, the bundle's path); the bundle tests import it, or forge it."""
    from typer.testing import CliRunner

    import ablate
    from harness.planning import RunSpec
    from harness.runner import train
    from harness.store import ResultsStore

    d = tmp_path_factory.mktemp("bundle")
    store = ResultsStore(d / "trained-here")
    rec = train(RunSpec(variant="teacher-g4", data="synthetic:tiny", seed=3, epochs=1, batch_size=128), store,
                data=tiny, device="cpu", progress=False)
    out = d / "teacher.tar"
    res = CliRunner().invoke(ablate.app, ["export", rec["run_id"], "-o", str(out), "--results", str(store.root)])
    assert res.exit_code == 0, res.output
    return rec, out
