"""The shape of the code: every harness module imports on its own in a fresh interpreter, the
project's imports (inside functions too) form no cycle, and the benchmark times the runner's own step."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import LAYERS
from harness import layer_of as layer

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
    schedule's ``Schedule``); the command-line entry points stay thin."""
    files = [*HARNESS.rglob("*.py"), *(ROOT / "variants").rglob("*.py"), ROOT / "ablate.py", ROOT / "bench.py"]
    lengths = {k: v for f in files for k, v in _function_lengths(f).items()}
    long = {k: v for k, v in lengths.items() if v > 50}
    assert not long, long


#: the project's code: the harness, the variants and the entry points (tests excluded)
CODE = sorted([*HARNESS.rglob("*.py"), *(ROOT / "variants").rglob("*.py"), ROOT / "ablate.py", ROOT / "bench.py",
               *(ROOT / "scripts").glob("*.py")])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, text: str | None = None) -> list[tuple[str, str | None, int]]:
    """Every import of the project's modules in ``path`` (or ``text`` as if it were that file), at
    module level or inside a function: (the module imported from, the name imported from it or None
    for ``import x``, the line)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                target = node.module or ""
            out += [(target, a.name, node.lineno) for a in node.names]
    return [i for i in out if i[0].split(".")[0] in PROJECT]


PROJECT = {"harness", "variants", "ablate", "bench"}
MODULES = {_module_name(p): p for p in CODE}


def _graph() -> dict[str, set[str]]:
    """Which project modules each module imports (a name imported from a package counts as the
    submodule when it is one, else as the package)."""
    graph = {}
    for m, path in MODULES.items():
        found = set()
        for target, name, _ in _imports(path):
            found.add(f"{target}.{name}" if f"{target}.{name}" in MODULES else target)
        graph[m] = {n for n in found if n in MODULES and n != m}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n, [*stack, n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_the_cycle_finder_finds_cycles_at_any_depth():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from .executor import run\n")  # a function-level import counts
    assert [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] == ["executor"]


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up a layer (``module -> imported``)."""
    return sorted(f"{m} -> {n}" for m, deps in graph.items() for n in deps if layer(n) > layer(m))


def test_the_layer_check_finds_an_upward_import():
    assert layer("harness.errors") == 0 and layer("harness.data.prepare.cli") == 1 and layer("variants.zoo") == -1
    assert layer("harness.search.optimize") == len(LAYERS) and layer("ablate") > len(LAYERS)
    assert upward({"harness.runs.store": {"harness.training.runner", "harness.files"}, "harness.files": set(),
                   "harness.training.runner": set()}) == ["harness.runs.store -> harness.training.runner"]
    assert not (ROOT / "harness" / "common").exists() and all((HARNESS / name).is_dir() for name in LAYERS)


def test_imports_form_no_cycle_and_point_down():
    """No import cycle among the project's modules and no import pointing up a layer, imports inside
    functions included; every module under harness/ lives in the foundation or in a layer."""
    graph = _graph()
    assert "harness.execution.grid" in graph["harness.execution.executor"] or \
        "harness.execution.executor" in graph["harness.execution.grid"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    assert not upward(graph), upward(graph)
    packages = {p.parent.name for p in HARNESS.glob("*/__init__.py")}
    assert packages == set(LAYERS), f"a package under harness/ that is no layer: {packages ^ set(LAYERS)}"
    assert not any(n.startswith("harness") for m in graph if m.startswith("variants")
                                             for n in graph[m])
    assert graph["harness.env"] <= {"harness.errors"}  # the foundation imports nothing but the foundation


@pytest.mark.slow
def test_bench_times_the_runners_own_training_step(tiny, tmp_path, monkeypatch):
    """bench.py's training throughput and the runner's training call one step function."""
    import variants
    from harness.measurement import measure as M
    from harness.model import step as S
    from harness.training.plan import RunSpec
    from harness.training.runner import train
    from harness.runs.store import ResultsStore
    from harness.data.synthetic import PRESETS

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
    train(RunSpec("dualvgr", epochs=1, batch_size=512, overrides={"module_dim": 16}), ResultsStore(tmp_path),
          data=tiny, device="cpu", progress=False)
    assert len(calls) > n_bench  # the runner trained through TrainStep too
    step = M.make_train_step(cfg, variants.build(cfg), M.build_teachers(cfg, "cpu"))
    assert isinstance(step.train_step, S.TrainStep) and len(step.train_step.teachers) == 1


def test_readme_maps_every_layer():
    """The README's package map names every layer (the modules are described in docs/architecture.md)."""
    text = (ROOT / "README.md").read_text()
    missing = [name for name in LAYERS if f"harness/{name}/" not in text]
    assert not missing, f"README's package map does not name {missing}"
    doc = (ROOT / "docs" / "architecture.md").read_text()
    unnamed = [str(p.relative_to(ROOT)) for p in HARNESS.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and f"`{p.name}`" not in doc]
    assert not unnamed, f"docs/architecture.md does not describe {unnamed}"


def test_no_name_is_re_exported():
    """A name is imported from the module that defines it: an import kept only for others to import
    through (``noqa: F401``) may bring in a whole module (one that registers something, an optional
    dependency checked), never a name from another module."""
    shims = []
    for path in CODE:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and "noqa: F401" in lines[node.end_lineno - 1]:
                target = [i[0] for i in _imports(path) if i[2] == node.lineno]
                names = [a.name for a in node.names]
                if not target or any(f"{target[0]}.{n}" not in MODULES for n in names):
                    shims.append(f"{path.relative_to(ROOT)}:{node.lineno}: {', '.join(names)}")
    assert not shims, shims


def _private_uses(path: Path, text: str | None = None) -> list[str]:
    """Private names (``_x``) of other project modules that ``path`` (or ``text`` as if it were that
    file) imports or reads as attributes of a module it imported (``from .m import _x``, ``m._x``)."""
    module = _module_name(path)
    text = path.read_text() if text is None else text
    found, aliases = [], {}
    for target, name, line in _imports(path, text):
        if name is None:
            aliases[target.split(".")[0]] = target.split(".")[0]
        elif f"{target}.{name}" in MODULES:
            aliases[name] = f"{target}.{name}"
        elif name.startswith("_") and not name.startswith("__") and target != module:
            found.append(f"{path.relative_to(ROOT)}:{line}: {target}.{name}")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):  # `from x import m as y` binds y to module x.m
            aliases.update({a.asname: aliases[a.name] for a in node.names if a.asname and a.name in aliases})
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != module):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


@pytest.mark.slow
def test_no_private_name_crosses_modules():
    """A helper two modules share is public (no leading underscore) in the module that defines it."""
    probe = ("from harness.training import runner as R\nfrom ..runs.store import _lock, locked\n\n"
             "def f():\n    R._write(locked._x)\n")
    assert _private_uses(HARNESS / "execution" / "grid.py", probe) == [
        "harness/execution/grid.py:2: harness.runs.store._lock",
        "harness/execution/grid.py:5: harness.training.runner._write"]
    crossing = [u for p in CODE for u in _private_uses(p)]
    assert not crossing, crossing


def test_one_helper_hashes_files():
    """A file's bytes are hashed by harness.digests.file_hash only (store, features, teacher outputs and
    the code record share it; their digests are what they were: tests/golden/run_ids.json and the
    code-identity tests pin them)."""
    import re

    hashing = re.compile(r"hashlib\.file_digest\(|hashlib\.\w+\([^()]*\.read_bytes\(\)\)|\.update\(block\)")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in CODE if p.name != "digests.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if hashing.search(line)]
    assert not found, found
