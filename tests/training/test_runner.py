"""The runner on the tiny synthetic set: records, predictions, resume, SIGKILL safety, CLI."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import ablate
from tests.conftest import needs_cpu_bf16
from harness.training.plan import RunPruned, RunSpec
from harness.training.runner import train
from harness.runs.store import ResultsStore

ROOT = Path(__file__).resolve().parents[2]
FAST = {"epochs": 2, "batch_size": 512}
#: a small dualvgr for the tests of the runner's path (resume, SIGKILL, the embedding, bf16), not of the model
SMALL = {"overrides": {"module_dim": 16}}


def spec(variant="dualvgr", **kw):
    return RunSpec(variant=variant, data="synthetic:tiny", seed=1, **{**FAST, **kw})


@pytest.mark.slow
def test_record_fields_and_predictions(tiny, tmp_path):
    store = ResultsStore(tmp_path / "results")
    rec = train(spec(), store, data=tiny, device="cpu", progress=False)
    assert rec["status"] == "complete" and rec["epochs_run"] == 2 and len(rec["history"]) == 2
    for key in ("run_id", "variant", "variant_config", "data", "seed", "metrics", "wall_time_s",
                "train_samples_per_s", "params", "git_commit", "torch_version", "device_name"):
        assert key in rec, key
    assert rec["params"]["total"] == 223_748  # the tiny config is the 223,748-parameter golden config
    m = rec["metrics"]
    assert set(m["test"]["per_type"]) == {"what", "who", "how", "when", "where"}
    assert 0 <= m["best_epoch"] < 2 and "best validation" in m["selection"]
    assert rec["train_samples_per_s"] > 0
    preds = pd.read_csv(store.run_dir(rec["run_id"]) / "predictions_test.csv")
    assert len(preds) == len(tiny.splits["test"])
    assert abs(100 * preds["correct_best"].mean() - m["test"]["overall"]) < 1e-9
    assert abs(100 * preds["correct_last"].mean() - m["test_last"]["overall"]) < 1e-9
    df = store.to_frame()
    assert df.loc[0, "variant"] == "dualvgr" and df.loc[0, "test_acc"] == m["test"]["overall"]
    assert "test_acc_what" in df
    # complete runs are not run twice: nothing is trained, the stored record comes back
    import harness.training.runner as R

    def no_training(*a, **k):
        raise AssertionError("a complete run was trained again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R._Run, "execute", no_training)
        again = train(spec(), store, data=tiny, device="cpu", progress=False)
    assert again == rec


@pytest.mark.slow
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny, tmp_path):
    full = train(spec(epochs=3, **SMALL), ResultsStore(tmp_path / "a"), data=tiny, device="cpu", progress=False)
    store = ResultsStore(tmp_path / "b")
    with pytest.raises(RunPruned):  # stopped after its first epoch
        train(spec(epochs=3, **SMALL), store, data=tiny, device="cpu", progress=False,
              on_epoch=lambda epoch, acc: epoch == 0)
    assert not store.is_complete(full["run_id"]) and (store.run_dir(full["run_id"]) / "state.pt").is_file()
    resumed = train(spec(epochs=3, **SMALL), store, data=tiny, device="cpu", progress=False)
    assert resumed["run_id"] == full["run_id"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["metrics"]["test"] == full["metrics"]["test"]


@pytest.mark.slow
def test_sigkill_leaves_the_store_readable_and_rerun_finishes(tiny, tmp_path, data_cache):
    results = tmp_path / "results"
    env = {**os.environ, "VQAKD_DATA_DIR": str(data_cache), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "ablate.py"), "run", "dualvgr", "--data", "synthetic:tiny", "--epochs", "4",
           "--batch-size", "512", "--set", "module_dim=16", "--seed", "2", "--results", str(results), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(results.glob("runs/*/state.pt")):
            time.sleep(0.05)
        assert list(results.glob("runs/*/state.pt")), "no checkpoint appeared"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    store = ResultsStore(results)
    assert store.to_frame().empty  # no partial record
    assert not list(results.glob("runs/*/record.json"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming after epoch" in out.stderr or "resuming after epoch" in out.stdout
    recs = store.records()
    assert len(recs) == 1 and recs[0]["epochs_run"] == 4
    assert [h["epoch"] for h in recs[0]["history"]] == list(range(4))
    assert not list(results.glob("runs/*/.*.tmp"))


@pytest.mark.slow
def test_a_run_whose_best_epoch_is_its_last_reports_what_its_best_weights_give(tiny, tmp_path):
    """The final evaluation does not evaluate the test split twice when the best epoch is the last one (best.pt
    then holds the model's own weights): the record's test metrics and predictions are those of best.pt loaded
    into a fresh model and evaluated anew."""
    from harness.compression.compress import fp32_model
    from harness.evaluation.evaluate import evaluate
    from harness.training.runner import eval_batch_size

    store = ResultsStore(tmp_path / "results")
    rec = train(spec(epochs=1, batch_size=512), store, data=tiny, device="cpu", progress=False)
    assert rec["metrics"]["best_epoch"] == 0 and rec["metrics"]["test"] == rec["metrics"]["test_last"]
    metrics, pred = evaluate(fp32_model(store, rec), tiny.splits["test"], tiny.features, tiny.type_names,
                             eval_batch_size(512), torch.device("cpu"))
    assert metrics == rec["metrics"]["test"]
    preds = pd.read_csv(store.run_dir(rec["run_id"]) / "predictions_test.csv")
    assert (preds["pred_best"].to_numpy() == pred).all() and (preds["pred_last"] == preds["pred_best"]).all()


def test_question_only_and_early_stopping(tiny, tmp_path):
    rec = train(spec("question-only", epochs=6, early_stop=1, lr=1e-6), ResultsStore(tmp_path), data=tiny,
                device="cpu", progress=False)
    assert rec["epochs_run"] < 6  # with a tiny lr the val accuracy stalls and early stopping ends the run
    assert rec["params"]["by_module"].keys() == {"linguistic_input_unit", "output_unit"}


@pytest.mark.slow
def test_cli_run_prints_per_type_table(tmp_path, shared_store):
    """The table ``run`` prints from the run's record (the shared store's dualvgr, copied: the command finds it
    complete and prints it as it does after training; test_cli.py's runs train through the command)."""
    import ablate

    shared_store.copy(tmp_path, "dualvgr")
    r = CliRunner().invoke(ablate.app, ["run", "dualvgr", "--epochs", "1", "--batch-size", "512", "--seed", "0",
                                        "--results", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 0 and "already complete: dualvgr-" in r.output, r.output
    for word in ("what", "who", "how", "when", "where", "test (best-val epoch)", "223,748 parameters"):
        assert word in r.output
    r = CliRunner().invoke(ablate.app, ["results", "--results", str(tmp_path)])
    assert r.exit_code == 0 and "dualvgr" in r.output


def test_cli_errors_are_clear(tmp_path, data_cache):
    import ablate

    r = CliRunner().invoke(ablate.app, ["run", "dualvgrr", "--results", str(tmp_path)])
    assert r.exit_code == 2 and "unknown variant 'dualvgrr'" in r.output and "dualvgr" in r.output
    r = CliRunner().invoke(ablate.app, ["run", "dualvgr", "--set", "nonsense=3", "--results", str(tmp_path)])
    assert r.exit_code == 2 and "no setting 'nonsense'" in r.output
    r = CliRunner().invoke(ablate.app, ["run", "dualvgr", "--set", "num_clips=8", "--results", str(tmp_path)])
    assert r.exit_code == 2 and "num_clips=8 does not match the data" in r.output
    r = CliRunner().invoke(ablate.app, ["run", "dualvgr", "--data", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_cli_list_and_help():
    import ablate

    r = CliRunner().invoke(ablate.app, ["list"])
    assert r.exit_code == 0 and "dualvgr" in r.output and "question-only" in r.output
    r = CliRunner().invoke(ablate.app, ["run", "--help"])
    assert r.exit_code == 0 and "synthetic:PRESET" in r.output


@pytest.mark.slow
def test_word_embeddings_start_from_glove(tiny, tmp_path, monkeypatch):
    """The embedding the optimiser starts from (captured when the runner builds the step)."""
    import harness.training.runner as R

    seen = []
    real = R.build_step

    def capture(cfg, model, *a, **k):
        seen.append(model.word_embedding.weight.detach().clone())
        return real(cfg, model, *a, **k)

    monkeypatch.setattr(R, "build_step", capture)
    store = ResultsStore(tmp_path)
    train(spec(epochs=1, **SMALL), store, data=tiny, device="cpu", progress=False)  # the embedding: 300 wide
    assert torch.equal(seen[-1], tiny.glove)
    train(spec(epochs=1, glove=False, **SMALL), store, data=tiny, device="cpu", progress=False)
    assert not torch.equal(seen[-1], tiny.glove) and seen[-1].abs().max() <= 1.0  # the reference's U(-1, 1)


@pytest.mark.capability
@needs_cpu_bf16
def test_bf16_autocast_trains_with_its_own_run_id(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    fp32 = train(spec(epochs=1, **SMALL), store, data=tiny, device="cpu", progress=False)
    bf16 = train(spec(epochs=1, precision="bf16", **SMALL), store, data=tiny, device="cpu", progress=False)
    assert "precision" not in fp32["identity"]["computation"]["train"]  # fp32 is neutral: ids of before the option
    assert bf16["train_config"]["precision"] == "bf16" and bf16["run_id"] != fp32["run_id"]
    assert bf16["status"] == "complete" and math.isfinite(bf16["history"][0]["loss"])
    # a different function (bf16 rounding) but the same model: close after one epoch, not identical
    assert bf16["history"][0]["loss"] != fp32["history"][0]["loss"]
    assert abs(bf16["history"][0]["loss"] - fp32["history"][0]["loss"]) < 0.1 * fp32["history"][0]["loss"]


def test_a_precision_training_does_not_offer_is_named():
    """Runs on every CPU (it was inside the bf16 test, which AVX2-only CPUs skip, so its stale message went
    unnoticed until CI landed on a CPU with bf16)."""
    with pytest.raises(ValueError, match="precision = 'fp16' is not one of fp32, tf32, bf16"):
        spec(precision="fp16").resolved_train()


def test_bf16_on_a_cpu_without_bf16_lstm_fails_up_front(tiny, tmp_path, monkeypatch):
    """On AVX2-only CPUs (oneDNN has no bf16 LSTM) a bf16 run fails before anything trains, its
    teachers included, with a message that says why; simulated here by the probe's answer."""
    from harness import env
    from harness.env import PrecisionError

    monkeypatch.setattr(env, "_probe_cpu", lambda dtype: "RuntimeError: mkldnn bf16 lstm needs avx512")
    store = ResultsStore(tmp_path)
    with pytest.raises(PrecisionError, match="bf16 autocast cannot run an LSTM on this CPU.*use fp32"):
        train(spec("student-logits", epochs=1, precision="bf16"), store, data=tiny, device="cpu", progress=False)
    assert not store.runs.exists() or not any(store.runs.iterdir())  # not even the teacher started
    r = CliRunner().invoke(ablate.app, ["run", "dualvgr", "--precision", "bf16", "--device", "cpu",
                                        "--results", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "cannot run an LSTM on this CPU" in r.output, r.output


@pytest.mark.slow
def test_a_run_is_planned_and_its_teacher_outputs_dry_run_once(tmp_path, shared_store, monkeypatch):
    """``ablate.py run`` plans the student once (its teacher's plan inside it) and hands the plan to ``train``: the
    teacher is not planned again to train it, and the dry run that finds the teacher outputs the losses read runs
    once (at planning, not again at set-up); the student trains from the teacher in the store."""
    import harness.training.plan as P
    from harness.training import teacher_cache as TC

    store, recs = shared_store.copy(tmp_path / "results", "teacher-g4")
    planned, dry_runs = [], []
    real_plan, real_keys = P.plan, TC.keys_read

    def counting_plan(s, data):
        planned.append(s.variant)
        return real_plan(s, data)

    def counting_keys(*a, **k):
        dry_runs.append(k.get("names"))
        return real_keys(*a, **k)

    monkeypatch.setattr(P, "plan", counting_plan)
    monkeypatch.setattr(TC, "keys_read", counting_keys)
    r = CliRunner().invoke(ablate.app, ["run", "student-logits", "--seed", "3", "--epochs", "1", "--batch-size", "512",
                                        "--device", "cpu", "--results", str(store.root)])
    assert r.exit_code == 0, r.output
    assert planned == ["student-logits", "teacher-g4"]  # the student's plan, and its teacher's inside it
    assert len(dry_runs) == 1 and "teacher-g4" in dry_runs[0][0]
    rec = store.read_record(store.to_frame().query("variant == 'student-logits'")["run_id"].iloc[0])
    assert rec["teacher_runs"] == [recs["teacher-g4"]["run_id"]]
    assert rec["training_compute"]["teacher_cache"]["builds"][0]["keys"] == ["logits"]


def test_train_says_how_it_got_the_record(tmp_path, tiny):
    """A plan handed to ``train``: trained the first time, reused the second (the record the store holds)."""
    from harness.training.plan import plan

    store = ResultsStore(tmp_path / "results")
    p = plan(spec("question-only", epochs=1, batch_size=512), tiny)
    first = train(p, store, data=tiny, device="cpu", progress=False)
    again = train(p, store, data=tiny, device="cpu", progress=False)
    assert (first.how, again.how) == ("trained", "reused")
    assert first["run_id"] == p.run_id and again == first == store.read_record(p.run_id)
