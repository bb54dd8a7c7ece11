"""The harness, in layers; a module's layer is its path, and a module imports only from its own layer and
the layers before it (tests/test_architecture.py checks every import, inside functions too):

0. ``harness/*.py``, the foundation: errors, environment, console, digests, safe files, statistics;
1. ``harness.data``: the feature format, questions, synthetic sets, preparation from videos;
2. ``harness.evaluation``: a task's metrics and a model's predictions;
3. ``harness.runs``: settings, run ids, records, the results store;
4. ``harness.model``: one training step of any variant, its random inputs;
5. ``harness.measurement``: FLOPs, latency, memory, throughput, cost records, a run's bill;
6. ``harness.training``: a run's plan, the runner, teacher caches, logging sinks, run bundles;
7. ``harness.compression``: compressed evaluation of trained runs;
8. ``harness.execution``: grids, schedules, executors, SLURM, regression grids;
9. ``harness.report``: Markdown reports, comparisons, plots;
10. ``harness.search``: hyper-parameter studies.

The command lines (``ablate.py``, ``bench.py``) sit on top; the model zoo (``variants``) is below them all
and imports nothing from the harness.
"""

LAYERS = ("data", "evaluation", "runs", "model", "measurement", "training", "compression", "execution", "report",
          "search")  # the packages of harness/, lowest first


def layer_of(module: str) -> int:
    """The layer of a project module (dotted name), read from its path: the model zoo (``variants``) -1, the
    foundation (``harness/*.py``) 0, ``harness.<layer>...`` its place in :data:`LAYERS` from 1, the command
    lines and scripts on top."""
    parts = module.split(".")
    if parts[0] == "variants":
        return -1
    if parts[0] != "harness":
        return len(LAYERS) + 1
    return LAYERS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in LAYERS else 0
