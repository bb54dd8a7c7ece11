"""Which project files one command passes, in order, and how often it comes back to a file it had left.

    python scripts/run_path.py run student-logits --data synthetic:tiny --epochs 1 --results /tmp/x

runs ``ablate.py`` with those arguments under :func:`sys.setprofile` and prints: the project files
(``ablate.py``, ``harness/``, ``variants/``) the command's calls enter, in the order first entered,
and the returns: a call into a file that is not on the stack any more although it was entered
before (the path came back to a file it had left), each distinct caller -> callee pair once (a
training loop calling the same function a thousand times is one). Module bodies run by an import
are not calls; the model zoo's forward passes (called by torch) are counted like any other call.

And the two ways a path can fail to go down: a call that goes up a layer (a module of a lower layer
calling into a higher one at run time, a callback: ``harness.layer_of``), and a call into a file that
is already on the stack below another file (A -> B -> A: the path entering a module again on its way
down). Each distinct caller -> callee pair once; both are 0 when every call of the command goes down.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


_FILES: dict[str, str | None] = {}


def layer(path: str) -> int:
    """The layer of a project file (``harness/runs/store.py`` -> ``harness.runs.store``)."""
    from harness import layer_of

    return layer_of(path.removesuffix(".py").replace("/", "."))


def project_file(filename: str) -> str | None:
    """``filename`` relative to the repository when it is one of the project's files, else None."""
    if filename not in _FILES:
        try:
            rel = Path(filename).resolve().relative_to(ROOT)
            ok = rel.parts[0] in ("harness", "variants") or str(rel) == "ablate.py"
        except (ValueError, OSError):
            ok = False
        _FILES[filename] = str(rel) if ok else None
    return _FILES[filename]


class Trace:
    def __init__(self):
        self.order: list[str] = []
        self.stack: list[str | None] = []  # the project file of each frame (None: not the project's)
        self.returns: dict[tuple[str, str], int] = {}
        self.up: dict[tuple[str, str], int] = {}  # calls up a layer
        self.again: dict[tuple[str, str], int] = {}  # A -> B -> A
        self.skip = 0  # depth inside a module body (an import)

    def __call__(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            if self.skip or code.co_name == "<module>":
                self.skip += 1
                return
            f = project_file(code.co_filename)
            if f is not None:
                caller = next((s for s in reversed(self.stack) if s is not None), None)
                edge = (f"{caller}", f"{f}:{code.co_name}")
                if f not in self.order:
                    self.order.append(f)
                elif f != caller and f not in self.stack:
                    self.returns[edge] = self.returns.get(edge, 0) + 1
                elif f != caller and f in self.stack:
                    self.again[edge] = self.again.get(edge, 0) + 1
                if caller is not None and layer(f) > layer(caller):
                    self.up[edge] = self.up.get(edge, 0) + 1
            self.stack.append(f)
        elif event == "return":
            if self.skip:
                self.skip -= 1
            elif self.stack:
                self.stack.pop()


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    import ablate

    trace = Trace()
    sys.setprofile(trace)
    try:
        ablate.app(argv, standalone_mode=False)
    finally:
        sys.setprofile(None)
    print(f"{len(trace.order)} project files entered, in this order:")
    for f in trace.order:
        print(f"  {f}")
    by_file: dict[str, int] = {}
    for (_, callee) in trace.returns:
        by_file[callee.split(":")[0]] = by_file.get(callee.split(":")[0], 0) + 1
    own = [e for e in trace.returns if not e[1].startswith(("variants/", "harness/data/synthetic"))]
    print(f"{len(trace.returns)} returns to a file already left (distinct caller -> callee pairs; "
          f"{len(own)} of them into the harness and the CLI, not the model zoo or the synthetic data's "
          f"generation), by file:")
    for f, n in sorted(by_file.items(), key=lambda x: -x[1]):
        print(f"  {n:4d} {f}")
    for (caller, callee) in trace.returns:
        print(f"       {caller} -> {callee}")
    for what, edges in (("calls up a layer (lower layer -> higher)", trace.up),
                        ("calls into a file already on the stack below another (A -> B -> A)", trace.again)):
        print(f"{len(edges)} {what}:")
        for (caller, callee) in edges:
            print(f"       {caller} -> {callee}")


if __name__ == "__main__":
    main(sys.argv[1:])
