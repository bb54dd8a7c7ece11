"""The project as a user installs it without a checkout: a wheel built from this tree, installed into
a fresh virtual environment, trains a tiny grid and writes its report with nothing from the source
tree on the path, and writes the report of a store trained by the checkout (the session's shared tiny
store: a teacher, its distilled student, the reference model and the question-only baseline) with its
tables; every package of the tree and every grid that comes with it are in the wheel, and a record made
by the installed code names no git commit of a repository around the venv."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import site
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: top-level entries of the tree a build does not read: version control, environments, stores, outputs
NOT_BUILT = {"build", "dist", "results", "data", "reports"}

pytestmark = pytest.mark.slow  # builds, installs and trains one run in a subprocess (about 20 s on 2 cores)


def _source_copy(dest: Path) -> Path:
    """The tree as a fresh clone has it, in ``dest``: the build never writes into the checkout, and a
    build/ left there by an earlier build cannot bring its files into this wheel."""
    def skip(where: str, names: list[str]) -> set[str]:
        out = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(where) == ROOT:
            out |= {n for n in names if n.startswith(".") or n in NOT_BUILT or (ROOT / n / "pyvenv.cfg").exists()}
        return out

    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` with the running environment's setuptools: nothing is downloaded."""
    src, out = _source_copy(tmp / "src"), tmp / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def _venv_with(wheel: Path, where: Path) -> Path:
    """A fresh virtual environment with ``wheel`` installed, its dependencies taken from the running
    environment's site-packages (one path in a .pth file, written after the install so that pip sees
    an empty environment; that folder's own .pth files, an editable install's among them, are not run)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    py = where / "bin" / "python"
    # --ignore-installed and no PYTHONPATH: a checkout on the path (its .egg-info) must not count as installed
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                        "--ignore-installed", str(wheel)], capture_output=True, text=True, timeout=300, env=clean)
    assert r.returncode == 0, r.stdout + r.stderr
    own = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip())
    deps = dict.fromkeys([*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])])
    (own / "dependencies-of-the-test-environment.pth").write_text("".join(f"{d}\n" for d in deps))
    return py


#: what the installed environment imports, printed as JSON
_WHERE = """
import json, sys
import ablate, bench, harness, harness.report, variants
from harness.execution import grid
print(json.dumps({"files": [m.__file__ for m in (ablate, bench, harness, harness.report, variants)],
                  "grid_dir": str(grid.GRID_DIR), "path": sys.path,
                  "editable": sorted(m for m in sys.modules if m.startswith("__editable__"))}))
"""


class Installed:
    """The wheel installed in a fresh venv, and a folder outside the checkout to run it in."""

    def __init__(self, tmp: Path, data_cache: Path):
        self.tmp = tmp
        self.wheel = _build_wheel(tmp)
        # the venv lies inside a checkout of something else (as a project's .venv does): that checkout's commit
        # is not the installed code's, and no record may claim it
        git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-C", str(tmp)]
        for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "another project"]):
            subprocess.run([*git, *args], check=True, capture_output=True, timeout=60)
        self.venv = tmp / "venv"
        self.py = _venv_with(self.wheel, self.venv)
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env.update(OMP_NUM_THREADS="1", VQAKD_DATA_DIR=str(data_cache))

    def run(self, *args, cwd: Path, timeout=300):
        """``python ARGS`` of the venv in ``cwd`` (neither the checkout nor a folder above it)."""
        cwd.mkdir(exist_ok=True)
        return subprocess.run([str(self.py), *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, data_cache) -> Installed:
    return Installed(tmp_path_factory.mktemp("wheel"), data_cache)


def test_the_wheel_holds_every_package_and_grid_and_writes_a_report_installed(installed):
    wheel, venv, tmp_path = installed.wheel, installed.venv, installed.tmp
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.relative_to(ROOT)) for d in ("harness", "variants")
                      for p in (ROOT / d).rglob("__init__.py"))
    grids = sorted(f"grids/{p.name}" for p in (ROOT / "grids").glob("*.toml"))
    assert packages and grids
    missing = [f for f in (*packages, *grids) if f not in names]
    assert not missing, f"missing from the wheel: {missing}"
    work = tmp_path / "elsewhere"  # neither the checkout nor a folder above it

    def run(*args, timeout=300):
        return installed.run(*args, cwd=work, timeout=timeout)

    r = run("-c", _WHERE)
    assert r.returncode == 0, r.stderr
    where = json.loads(r.stdout)
    inside = venv.resolve()
    assert all(Path(f).resolve().is_relative_to(inside) for f in where["files"]), where["files"]
    assert Path(where["grid_dir"]).resolve().is_relative_to(inside), where["grid_dir"]
    assert not any(p and Path(p).resolve() == ROOT for p in where["path"]) and not where["editable"], where

    (work / "one.toml").write_text('description = "one tiny run"\ndata = "synthetic:tiny"\nseeds = [0]\n'
                                   'variants = ["question-only"]\n\n[train]\nepochs = 1\n')
    r = run("-m", "ablate", "--grid", "one.toml", "--results", "store", "--reports", "reports", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    report = work / "reports" / "one.md"
    assert report.is_file(), r.stdout + r.stderr
    (run_dir,) = (work / "store" / "runs").iterdir()
    text = report.read_text()
    assert "question-only" in text and run_dir.name in text, text
    assert json.loads((run_dir / "record.json").read_text())["git_commit"] is None

    # a grid that comes with the project is found by its name (its runs are not in this store)
    r = run("-m", "ablate", "report", "--grid", "tiny", "--results", "store", "--reports", "reports")
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "error: no complete run of grid tiny" in out and "Traceback" not in out, out


#: the report of the shared store's runs, written by the installed harness (the store's own records and
#: predictions; the data set's info as the store recorded it)
_REPORT = """
import sys
from harness.report import write_report
from harness.runs.store import ResultsStore
print(write_report(ResultsStore("store"), "shared", run_ids=sys.argv[1:], out_dir="reports"))
"""


def test_the_installed_harness_writes_the_report_of_a_trained_store(installed, shared_store):
    work = installed.tmp / "report-elsewhere"
    store, recs = shared_store.copy(work / "store")
    ids = sorted(r["run_id"] for r in recs.values())
    r = installed.run("-c", _REPORT, *ids, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    report = work / "reports" / "shared.md"
    assert (work / r.stdout.strip().splitlines()[-1]).resolve() == report.resolve(), r.stdout
    text = report.read_text()
    for heading in ("# shared", "### Main table", "### Accuracy per question type", "### Evaluation-time ablations"):
        assert f"\n{heading}\n" in f"\n{text}", (heading, text)
    main = text.split("### Main table", 1)[1].split("###", 1)[0]
    rows = {line.split("|")[1].strip().strip("*"): line for line in main.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert set(rows) == set(recs), (set(rows), main)  # one row per variant, each trained run reported
    for variant, rec in recs.items():
        acc = f"{rec['metrics']['test']['overall']:.2f}"
        assert acc in rows[variant], (variant, acc, rows[variant])
    assert "teacher-g4" in rows["student-logits"].rsplit("|", 2)[-2]  # its teachers column
    csv = (work / "reports" / "shared.csv").read_text().splitlines()
    assert len(csv) == 1 + len(recs), csv  # the main table: a header and one row per variant
    assert any((work / "reports" / "shared_files").iterdir())  # its plots
