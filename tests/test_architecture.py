"""The shape of the code: every harness module imports on its own in a fresh interpreter, the
harness's module-level imports form no cycle, and the benchmark times the runner's own step."""
from __future__ import annotations

import ast
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


def test_every_module_imports_alone_in_a_fresh_interpreter():
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for m in _modules()}
    failed = {}
    for m, p in procs.items():
        out, _ = p.communicate(timeout=300)
        if p.returncode != 0:
            failed[m] = out[-2000:]
    assert not failed, failed


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
