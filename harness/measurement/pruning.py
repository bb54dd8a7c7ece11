"""A run stopped by a search's pruner (the runner's ``on_epoch`` callback answered True,
:mod:`harness.search.optimize`): what its ``pruned.json`` holds, the epoch, the accuracies and the training
compute so far, counted and measured as a complete run's ``training_compute`` is (:mod:`harness.measurement.bill`),
so that a study's bill includes the runs it pruned."""
from __future__ import annotations

import dataclasses

from harness.measurement.bill import run_compute
from harness.measurement.costs import run_cost
from harness.env import device_name


def pruned_info(run, rec: dict) -> dict:
    """``pruned.json`` of the runner's ``_Run`` ``run``, stopped after the epoch ``rec`` of its history
    (its ``state.active_time`` brought up to now by the caller)."""
    st, p = run.state, run.p
    so_far = {"device": str(run.dev), "device_name": device_name(run.dev), "wall_time_s": st.active_time,
              "train_time_s": st.train_time, "epochs_run": len(st.history),
              "cost": run_cost(run.model, p.cfg, run.dev, None, None),
              "data": {"sizes": {k: len(v) for k, v in run.data.splits.items()}}}
    compute = run_compute(so_far, run.teacher_records, train_samples=st.train_samples,
                          teacher_step_samples=st.teacher_step_samples, cache_build_s=st.cache_build_s,
                          built_by_this_run=st.cache_builds, cache_info=run.tcache.info if run.tcache else None)
    return {"variant": p.spec.variant, "seed": p.spec.seed, "spec": dataclasses.asdict(p.spec),
            "epoch": rec["epoch"], "val_acc": rec["val_acc"], "best_val_acc": st.best["acc"],
            "epochs_run": len(st.history), "training_compute": compute}
