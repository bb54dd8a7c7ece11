"""The training bill: what a run cost, and what producing its model cost in all.

Every run records its training compute (``record["training_compute"]``, :func:`run_compute`);
:func:`training_bill` adds, for a distilled student, its teachers' own training (once per
distinct teacher run, recursively) and the passes that built the teacher-output caches it read
(:mod:`harness.training.teacher_cache`; once per build, however many students share it).

What is measured and what is counted:

* **device-seconds: measured.** A run's own: the wall time of the processes that worked on it
  (``wall_time_s``: training steps, the validation after each epoch, checkpoints, the final test
  and the evaluation-time ablations; resumed runs included, the time a killed run lay dead not),
  less the seconds it spent building teacher caches, which are billed as the cache's; a cache's:
  the build pass's time, from its manifest. Each on the device named; seconds on different
  devices are added as they are (``mixed_devices`` says when they were).
* **FLOPs: counted.** The forward FLOPs per sample are fvcore's count of the model's eval
  forward (:func:`harness.measurement.measure.count_flops`, recorded in ``record["cost"]``; LSTMs included).
  The backward pass is counted as :data:`BACKWARD_PER_FORWARD` = 2 forwards (the usual
  convention: for each product of the forward, one for the gradient of its input and one for
  the gradient of its weights), so a training sample costs 3 forwards; times the training
  samples seen. Added: one forward per validation sample per epoch; for a student trained
  without the cache, its teachers' forward for every training sample; with the cache, the
  teachers' forward over the training split once per cache build. Not counted: the losses
  (DualVGR's auxiliary terms and the distillation losses, products of batch-by-batch matrices:
  small against the model), the optimizer's update, data loading, the final test.
"""
from __future__ import annotations

from harness.runs import record as R
from harness.runs.store import ResultsStore
from harness.files import StoreError

#: backward FLOPs per forward FLOP (the usual convention)
BACKWARD_PER_FORWARD = 2.0

MEASURED = ("device_s: the wall time of the run's processes on its device (training, per-epoch validation, "
            "checkpoints, final test), less the time it spent building teacher-output caches; a cache's "
            "device_s: its build pass's time")
COUNTED = (f"gflops: forward FLOPs per sample (fvcore, eval forward) x (1 + {BACKWARD_PER_FORWARD:g} for the "
           f"backward) x training samples seen, + a forward per validation sample per epoch, + the teachers' "
           f"forward per training sample (without the cache) or per question of the training split once per "
           f"cache build")


def _mul(a, b):
    return None if a is None or b is None else a * b


def _add(*xs):
    return None if any(x is None for x in xs) else sum(xs)


def run_compute(record: dict, teacher_records: list[dict], *, train_samples: int, teacher_step_samples: int,
                cache_build_s: float, cache_info: list[dict] | None, built_by_this_run=()) -> dict:
    """A run's own training compute, for its record: measured seconds and device, counted FLOPs
    (see the module doc), the samples they were counted over, and, for a student, its teachers'
    forward FLOPs per sample, the cache builds it read (with their measured seconds) and the
    teacher runs, whose own bills are in their records. ``cache_info``: the ``info`` of the
    :class:`harness.training.teacher_cache.TeacherOutputs` it read (None: no cache); ``built_by_this_run``:
    the ids of the builds among them this run made (in any of its processes)."""
    f = R.cost(record, "flops_per_sample")
    val_samples = int(R.split_sizes(record).get("val", 0)) * int(record["epochs_run"])
    teachers = [{"run_id": t["run_id"], "variant": t["variant"],
                 "forward_flops_per_sample": R.cost(t, "flops_per_sample")} for t in teacher_records]
    t_fwd = {t["run_id"]: t["forward_flops_per_sample"] for t in teachers}
    step_fwd = _add(*t_fwd.values()) if teachers else 0
    builds = []
    for info in cache_info or []:
        seen = {}
        for fi in info["files"]:
            b = seen.setdefault(fi["build_id"], {
                "teacher_run": info["teacher_run"], "build_id": fi["build_id"], "keys": [], "rows": info["rows"],
                "split": info["split"], "build_s": fi["build_s"], "build_device": fi["build_device"],
                "build_device_name": fi["build_device_name"], "built_at": fi["built_at"],
                "forward_flops": _mul(t_fwd.get(info["teacher_run"]), info["rows"]),
                "built_by_this_run": fi["build_id"] in built_by_this_run})
            b["keys"].append(fi["key"])
        builds.extend(seen.values())
    return {
        "device": record["device"], "device_name": record["device_name"],
        "wall_time_s": record["wall_time_s"], "train_time_s": record["train_time_s"], "cache_build_s": cache_build_s,
        "train_samples": int(train_samples), "val_samples": val_samples,
        "forward_flops_per_sample": f, "backward_per_forward": BACKWARD_PER_FORWARD,
        "train_flops": _mul(f, (1 + BACKWARD_PER_FORWARD) * train_samples),
        "validation_flops": _mul(f, val_samples),
        "teacher_step_samples": int(teacher_step_samples),
        "teacher_step_flops": _mul(step_fwd, teacher_step_samples) if teacher_step_samples else 0,
        "teacher_cache": {"used": cache_info is not None, "builds": builds},
        "teachers": teachers,
    }


def record_compute(record: dict) -> dict:
    """``record["training_compute"]``, or for a record written before it existed, the same
    fields derived from what it has (samples = throughput x step time; its teachers ran inside
    every step; ``derived`` is then true)."""
    tc = record.get("training_compute")
    if tc is not None:
        return {**tc, "derived": False}
    speed, step_s = record.get("train_samples_per_s"), record.get("train_time_s")
    n = int(round(speed * step_s)) if speed and step_s else 0
    f = R.cost(record, "flops_per_sample")
    teachers = [{"run_id": r, "variant": None, "forward_flops_per_sample": None}
                for r in record.get("teacher_runs", [])]
    val_samples = int(R.split_sizes(record).get("val", 0)) * int(record.get("epochs_run", 0))
    return {"device": record.get("device"), "device_name": record.get("device_name"),
            "wall_time_s": record.get("wall_time_s"), "train_time_s": step_s, "cache_build_s": 0.0,
            "train_samples": n, "val_samples": val_samples, "forward_flops_per_sample": f,
            "backward_per_forward": BACKWARD_PER_FORWARD,
            "train_flops": _mul(f, (1 + BACKWARD_PER_FORWARD) * n), "validation_flops": _mul(f, val_samples),
            "teacher_step_samples": n if teachers else 0, "teacher_step_flops": None if teachers else 0,
            "teacher_cache": {"used": False, "builds": []}, "teachers": teachers, "derived": True}


def _g(flops):
    return None if flops is None else flops / 1e9


def _own(record: dict, tc: dict, teacher_fwd: dict[str, float | None]) -> dict:
    step_flops = tc["teacher_step_flops"]
    if step_flops is None and tc["teacher_step_samples"]:  # an older record: the teachers' FLOPs from their records
        step_flops = _mul(_add(*[teacher_fwd.get(t["run_id"]) for t in tc["teachers"]]), tc["teacher_step_samples"])
    flops = _add(tc["train_flops"], tc["validation_flops"], step_flops)
    wall = tc["wall_time_s"]
    return {"run_id": record["run_id"], "variant": record.get("variant"), "gflops": _g(flops),
            "device_s": None if wall is None else wall - (tc.get("cache_build_s") or 0.0),
            "device": tc["device"], "device_name": tc["device_name"],
            "train_gflops": _g(tc["train_flops"]), "validation_gflops": _g(tc["validation_flops"]),
            "teacher_step_gflops": _g(step_flops), "train_samples": tc["train_samples"],
            "derived": tc["derived"]}


def training_bill(store: ResultsStore, record: dict) -> dict:
    """The training cost of a run's model, in GFLOPs (counted) and device-seconds (measured):

    * ``own``: this run (its training, validation and, without the cache, its teachers' forwards);
    * ``caches``: each teacher-output cache build it read (once per build);
    * ``teachers``: each distinct teacher run's own cost (recursively, each run once), from its record;
    * ``total``: own + caches + teachers, what producing this model cost;

    with ``measured`` / ``counted`` saying which figures are which, ``devices`` (and
    ``mixed_devices``), and ``missing``: teacher runs whose record is not in ``store`` (``total``
    then leaves them out and ``complete`` is false). A figure that cannot be known (a FLOP count
    that failed) is None, and so is every sum that needs it."""
    teachers: dict[str, dict] = {}
    caches: dict[str, dict] = {}
    missing: list[str] = []

    def visit(rec: dict) -> dict:
        tc = record_compute(rec)
        fwd = {}
        for t in tc["teachers"]:
            rid = t["run_id"]
            if rid not in teachers and rid not in missing:
                try:
                    trec = store.read_record(rid)
                except StoreError:
                    missing.append(rid)
                    continue
                teachers[rid] = None  # placeholder: a cycle cannot recurse
                teachers[rid] = visit(trec)
            fwd[rid] = t["forward_flops_per_sample"]
            if fwd[rid] is None and teachers.get(rid) is not None:
                fwd[rid] = teachers[rid]["forward_flops_per_sample"]
        for b in tc["teacher_cache"]["builds"]:
            caches.setdefault(b["build_id"], {k: b[k] for k in ("teacher_run", "build_id", "keys", "rows", "split",
                                                                 "build_device", "build_device_name", "built_at")}
                              | {"gflops": _g(b["forward_flops"]), "device_s": b["build_s"]})
        own = _own(rec, tc, fwd)
        own["forward_flops_per_sample"] = tc["forward_flops_per_sample"]
        return own

    own = visit(record)
    own.pop("forward_flops_per_sample")
    teacher_list = [dict(v) for v in teachers.values() if v is not None]
    for t in teacher_list:
        t.pop("forward_flops_per_sample")
    parts = [own, *caches.values(), *teacher_list]
    devices = sorted({p.get("device_name") or p.get("build_device_name") for p in parts} - {None})
    return {
        "run_id": record["run_id"], "variant": record.get("variant"),
        "own": own, "caches": list(caches.values()), "teachers": teacher_list,
        "total": {"gflops": _add(*[p["gflops"] for p in parts]), "device_s": _add(*[p["device_s"] for p in parts])},
        "complete": not missing, "missing": missing,
        "devices": devices, "mixed_devices": len(devices) > 1,
        "measured": MEASURED, "counted": COUNTED,
    }


def bill_row(bill: dict) -> dict:
    """The bill as flat columns for a report's table: the run's own and the total to produce its
    model, in GFLOPs and device-seconds."""
    return {"train_gflops_own": bill["own"]["gflops"], "train_device_s_own": bill["own"]["device_s"],
            "train_gflops_total": bill["total"]["gflops"], "train_device_s_total": bill["total"]["device_s"],
            "train_cost_complete": bill["complete"], "train_cost_devices": ", ".join(bill["devices"])}
