"""The shape of the code: every harness module imports on its own in a fresh interpreter, the
harness's module-level imports form no cycle, and the benchmark times the runner's own step."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "harness"


def _modules() -> list[str]:
    out = []
    for p in sorted(HARNESS.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__":
            continue
        out.append(".".join(parts))
    return out


#: run in a fresh interpreter: the heavy third-party libraries are imported once, then each project
#: module is imported in a forked child that has no project module loaded (what matters is that the
#: project's modules import alone, in any order; torch need not be imported 30 times)
_IMPORT_EACH = r"""
import os, sys
import av, h5py, matplotlib.backends.backend_agg, matplotlib.figure, numpy, optuna, pandas, rich, scipy.stats  # noqa
import submitit, torch, torchvision, typer  # noqa
assert not [m for m in sys.modules if m.split(".")[0] in ("harness", "variants")]
failed = []
for m in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(m)
        except BaseException as e:
            print(f"{m}: {type(e).__name__}: {e}", flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(m)
print("FAILED", *failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    mods = [*_modules(), "variants", "ablate", "bench"]
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *mods], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def _function_lengths(path: Path) -> dict[str, int]:
    """Lines of each function's body (its signature and docstring not counted)."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            out[f"{path.relative_to(ROOT)}::{node.name}"] = body[-1].end_lineno - body[0].lineno + 1
    return out


def test_functions_are_short():
    """A function that grows past 50 lines is split into named steps (the runner's ``_Run``, the
    executor's ``_Schedule``); the command-line entry points stay thin."""
    files = [*HARNESS.rglob("*.py"), *(ROOT / "variants").rglob("*.py"), ROOT / "ablate.py", ROOT / "bench.py"]
    lengths = {k: v for f in files for k, v in _function_lengths(f).items()}
    long = {k: v for k, v in lengths.items() if v > 50}
    assert not long, long


def _top_level_imports(path: Path, module: str) -> set[str]:
    """harness modules imported at module level (not inside functions) by ``path``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("harness")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("harness"):
                continue
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if n in MODULES} or {target}
    return {m for m in found if m in MODULES and m != module}


MODULES = set(_modules())


def test_harness_imports_form_no_cycle():
    paths = {m: (ROOT / m.replace(".", "/")).with_suffix(".py") if (ROOT / m.replace(".", "/")).with_suffix(".py").exists()
             else ROOT / m.replace(".", "/") / "__init__.py" for m in MODULES}
    graph = {m: _top_level_imports(p, m) for m, p in paths.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(n):], n]) if n in stack
                            else f"import cycle through {m} -> {n}")
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert graph["harness.env"] <= {"harness.errors"}  # the bottom layer imports nothing else of the harness
    assert "harness.runner" not in graph["harness.measure"]
    assert "harness.measure" not in graph["harness.runner"]  # its input helpers are harness.inputs
    assert not graph["harness.settings"] - {"harness.env", "harness.errors"}  # the schema sits low


def test_bench_times_the_runners_own_training_step(tiny, tmp_path, monkeypatch):
    """bench.py's training throughput and the runner's training call one step function."""
    import variants
    from harness import measure as M
    from harness import step as S
    from harness.runner import RunSpec, train
    from harness.store import ResultsStore
    from harness.synthetic import PRESETS

    calls: list[str] = []
    original = S.TrainStep.__call__

    def counted(self, *a, **k):
        calls.append(self.model.__class__.__name__)
        return original(self, *a, **k)

    monkeypatch.setattr(S.TrainStep, "__call__", counted)
    cfg = variants.get_config("student-logits", **PRESETS["tiny"].model_config())
    (rec,) = M.measure_variant(cfg, [4], "cpu", reps=2, warmup=1, train_reps=2, flops=False)
    assert rec["train_samples_per_s"] is not None and len(calls) >= 3  # warm-up + timed + peak-memory steps
    n_bench = len(calls)
    train(RunSpec("dualvgr", epochs=1, batch_size=512), ResultsStore(tmp_path), data=tiny, device="cpu",
          progress=False)
    assert len(calls) > n_bench  # the runner trained through TrainStep too
    step = M.make_train_step(cfg, variants.build(cfg), M.build_teachers(cfg, "cpu"))
    assert isinstance(step.train_step, S.TrainStep) and len(step.train_step.teachers) == 1


def test_readme_architecture_names_every_module():
    """The README's architecture section names every harness module (by file name), the report
    package's included."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("- `harness/`"):text.index("- `ablate.py`")]
    missing = [p.name for p in [*HARNESS.glob("*.py"), *(HARNESS / "report").glob("*.py")]
               if p.name != "__init__.py" and f"`{p.name}`" not in section]
    assert not missing, f"README's architecture section does not name {missing}"
