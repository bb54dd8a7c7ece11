"""The training bill (harness/measurement/bill.py) on hand-made records with round numbers: a run's own
compute, the cache builds it read and its teachers' training, each counted once."""
import pytest

from harness.measurement.bill import BACKWARD_PER_FORWARD, bill_row, run_compute, training_bill
from harness.runs.store import ResultsStore

G = 1e9


def _record(store, run_id, *, fwd, wall, device="cpu", teachers=(), train_samples=2000, teacher_step_samples=0,
            cache_build_s=0.0, cache_info=None, epochs=2, write=True, built=()):
    rec = {"run_id": run_id, "variant": run_id.split("-")[0], "device": device, "device_name": f"{device} box",
           "wall_time_s": wall, "train_time_s": wall / 2, "cost": {"flops_per_sample": fwd},
           "data": {"sizes": {"train": 1000, "val": 100, "test": 100}}, "epochs_run": epochs,
           "teacher_runs": [t["run_id"] for t in teachers]}
    rec["training_compute"] = run_compute(rec, list(teachers), train_samples=train_samples,
                                          teacher_step_samples=teacher_step_samples, cache_build_s=cache_build_s,
                                          cache_info=cache_info, built_by_this_run=built)
    if write:
        store.write_record(rec)
    return rec


def _cache(teacher_run, build_id, build_s, keys=("logits",)):
    return {"teacher_run": teacher_run, "rows": 1000, "split": "train", "keys": list(keys),
            "files": [{"key": k, "build_id": build_id, "build_s": build_s, "build_device": "cpu",
                       "build_device_name": "cpu box", "built_at": "2026-01-01T00:00:00+00:00",
                       "built_now": False} for k in keys]}


@pytest.fixture
def store(tmp_path):
    return ResultsStore(tmp_path)


def test_backward_counts_two_forwards():
    assert BACKWARD_PER_FORWARD == 2.0


def test_teacher_alone(store):
    t = _record(store, "teacher-1", fwd=1e6, wall=100.0)
    b = training_bill(store, t)
    # 3 forwards x 2,000 training samples + 1 forward x 100 validation questions x 2 epochs
    assert b["own"]["gflops"] == pytest.approx(6.0 + 0.2)
    assert b["own"]["train_gflops"] == pytest.approx(6.0) and b["own"]["validation_gflops"] == pytest.approx(0.2)
    assert b["own"]["device_s"] == 100.0
    assert b["total"] == pytest.approx({"gflops": 6.2, "device_s": 100.0})
    assert b["teachers"] == [] and b["caches"] == [] and b["complete"] and not b["mixed_devices"]
    assert "measured" in b and "counted" in b and "backward" in b["counted"]


def test_student_from_the_cache_pays_the_build_once(store):
    t = _record(store, "teacher-1", fwd=1e6, wall=100.0)
    # built by this run: 4 of its 50 s were the cache's; two keys built in one pass count once
    s = _record(store, "student-1", fwd=5e5, wall=50.0, teachers=[t], cache_build_s=4.0,
                cache_info=[_cache("teacher-1", "b1", 4.0, keys=("logits", "video"))], built=["b1"])
    (build,) = s["training_compute"]["teacher_cache"]["builds"]
    assert build["keys"] == ["logits", "video"] and build["forward_flops"] == 1e6 * 1000
    assert build["built_by_this_run"]
    b = training_bill(store, s)
    assert b["own"]["gflops"] == pytest.approx(3.0 + 0.1) and b["own"]["teacher_step_gflops"] == 0
    assert b["own"]["device_s"] == pytest.approx(46.0)
    assert [(c["build_id"], c["gflops"], c["device_s"]) for c in b["caches"]] == [("b1", pytest.approx(1.0), 4.0)]
    assert [t["run_id"] for t in b["teachers"]] == ["teacher-1"]
    assert b["total"] == pytest.approx({"gflops": 3.1 + 1.0 + 6.2, "device_s": 46.0 + 4.0 + 100.0})
    # a second student reading the same build: its total carries the build too (its model needed it)
    s2 = _record(store, "student-2", fwd=5e5, wall=40.0, teachers=[t], cache_info=[_cache("teacher-1", "b1", 4.0)])
    assert not s2["training_compute"]["teacher_cache"]["builds"][0]["built_by_this_run"]
    assert training_bill(store, s2)["total"] == pytest.approx({"gflops": 3.1 + 1.0 + 6.2, "device_s": 40 + 4 + 100})
    assert bill_row(b) == pytest.approx({"train_gflops_own": 3.1, "train_device_s_own": 46.0,
                                         "train_gflops_total": 10.3, "train_device_s_total": 150.0,
                                         "train_cost_complete": True, "train_cost_devices": "cpu box"})


def test_student_without_the_cache_pays_the_teacher_every_step(store):
    t = _record(store, "teacher-1", fwd=1e6, wall=100.0)
    s = _record(store, "student-1", fwd=5e5, wall=60.0, teachers=[t], teacher_step_samples=2000)
    b = training_bill(store, s)
    assert b["own"]["teacher_step_gflops"] == pytest.approx(2.0)
    assert b["own"]["gflops"] == pytest.approx(3.1 + 2.0) and b["caches"] == []
    assert b["total"] == pytest.approx({"gflops": 5.1 + 6.2, "device_s": 160.0})


def test_each_teacher_run_counted_once_however_it_is_reached(store):
    t1 = _record(store, "teacher-1", fwd=1e6, wall=100.0)
    # teacher-2 is itself distilled from teacher-1 (from the cache build b1)
    t2 = _record(store, "teacher-2", fwd=1e6, wall=80.0, teachers=[t1], cache_info=[_cache("teacher-1", "b1", 4.0)],
                 cache_build_s=4.0, built=["b1"])
    s = _record(store, "student-1", fwd=5e5, wall=50.0, teachers=[t1, t2],
                cache_info=[_cache("teacher-1", "b1", 4.0), _cache("teacher-2", "b2", 3.0)],
                cache_build_s=3.0, built=["b2"])
    b = training_bill(store, s)
    assert sorted(t["run_id"] for t in b["teachers"]) == ["teacher-1", "teacher-2"]
    assert sorted(c["build_id"] for c in b["caches"]) == ["b1", "b2"]
    gflops = (3.1) + (6.2) + (6.2) + 1.0 + 1.0  # own, teacher-1, teacher-2, builds b1 and b2
    device_s = (50 - 3) + 100 + (80 - 4) + 4 + 3
    assert b["total"] == pytest.approx({"gflops": gflops, "device_s": device_s})


def test_missing_teacher_mixed_devices_and_unknown_flops(store):
    t = _record(store, "teacher-1", fwd=1e6, wall=10.0, device="cuda", write=False)  # not in the store
    s = _record(store, "student-1", fwd=5e5, wall=50.0, teachers=[t], teacher_step_samples=2000)
    b = training_bill(store, s)
    assert not b["complete"] and b["missing"] == ["teacher-1"] and b["teachers"] == []
    store.write_record(t)
    b = training_bill(store, s)
    assert b["complete"] and b["mixed_devices"] and b["devices"] == ["cpu box", "cuda box"]
    # a FLOP count that failed: no invented figure, and no total that needs it
    s2 = _record(store, "student-2", fwd=None, wall=50.0, teachers=[t], teacher_step_samples=2000)
    b = training_bill(store, s2)
    assert b["own"]["gflops"] is None and b["total"]["gflops"] is None
    assert b["total"]["device_s"] == pytest.approx(60.0)


def test_a_record_from_before_training_compute(store):
    _record(store, "teacher-1", fwd=1e6, wall=100.0)
    old = {"run_id": "student-old", "variant": "student", "device": "cpu", "device_name": "cpu box",
           "wall_time_s": 30.0, "train_time_s": 20.0, "train_samples_per_s": 100.0,
           "cost": {"flops_per_sample": 5e5}, "data": {"sizes": {"val": 100}}, "epochs_run": 2,
           "teacher_runs": ["teacher-1"]}
    b = training_bill(store, old)
    assert b["own"]["derived"] and b["own"]["train_samples"] == 2000
    # its teacher ran in every step; that teacher's forward comes from the teacher's record
    assert b["own"]["teacher_step_gflops"] == pytest.approx(2.0)
    assert b["total"] == pytest.approx({"gflops": 3.1 + 2.0 + 6.2, "device_s": 130.0})
