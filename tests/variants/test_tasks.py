"""The task registry end to end on hand-made sets: multiple choice and count questions written in
HCRN's format next to the tiny set's features, loaded, validated, trained through the runner,
distilled, evaluated and recorded with the task's metric."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

import variants
from harness.data import dataset as D
from harness.data import layout as L
from harness.evaluation import metrics as M
from harness.errors import DataError
from harness.training.plan import RunSpec
from harness.training.runner import train
from harness.runs.store import ResultsStore
from variants.tasks import COUNT, MULTIPLE_CHOICE, OPEN_ENDED, count_predictions, hinge_loss

K = 5


def _rewrite(src, dst, task: str, named: bool = True, edit=None):
    """A copy of the tiny set at ``dst`` whose questions ask ``task``: multiple choice draws K
    candidates of question-vocabulary tokens, the right one the token of the answer's id; count
    answers 1 + answer id mod 10. ``edit(split, obj)`` may spoil a file."""
    shutil.copytree(src, dst)
    name = next(dst.glob(L.VOCAB_GLOB)).name.removesuffix("_vocab.json")
    vocab = json.loads(L.vocab_file(dst, name).read_text())
    qv = len(vocab[L.QUESTION_TOKENS_KEY])
    for split in L.SPLITS:
        path = L.questions_file(dst, name, split)
        obj = pickle.loads(path.read_bytes())
        ans = np.asarray(obj["answers"], dtype=np.int64)
        if task == MULTIPLE_CHOICE:
            rng = np.random.default_rng(len(ans))
            cand = rng.integers(2, qv, size=(len(ans), K, 2))
            right = rng.integers(0, K, size=len(ans))
            cand[np.arange(len(ans)), right, 0] = 2 + ans % (qv - 2)
            obj[L.CANDIDATES_KEY], obj[L.CANDIDATES_LEN_KEY] = cand, np.full((len(ans), K), 2)
            obj["answers"] = right
            nextqa = ["CW", "CH", "TN", "TC", "DC", "DL", "DO"]  # NExT-QA's types
            obj[L.QUESTION_CATEGORY_KEY] = np.array([nextqa[i % 7] for i in range(len(ans))])
        else:
            obj["answers"] = 1 + ans % 10
        if edit:
            edit(split, obj)
        path.write_bytes(pickle.dumps(obj))
    meta_path = L.meta_file(dst, name)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if named:
        meta[L.TASK_META_KEY] = task
    else:
        meta.pop(L.TASK_META_KEY, None)
    meta_path.write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def task_sets(tiny, tmp_path_factory):
    src = tiny.paths.vocab.parent
    d = tmp_path_factory.mktemp("tasks")
    return {MULTIPLE_CHOICE: _rewrite(src, d / "mc", MULTIPLE_CHOICE, named=False),
            COUNT: _rewrite(src, d / "count", COUNT)}


def test_the_registry_has_three_tasks_and_families_say_which_they_answer():
    assert variants.TASKS.list() == sorted([OPEN_ENDED, MULTIPLE_CHOICE, COUNT])
    assert variants.family("dualvgr").tasks == (OPEN_ENDED, MULTIPLE_CHOICE, COUNT)
    with pytest.raises(variants.ConfigError, match="has no head for the ranking task"):
        variants.get_config("dualvgr", task="ranking")


def test_tasks_are_detected_and_loaded_with_their_inputs(task_sets):
    mc = D.load(task_sets[MULTIPLE_CHOICE])  # no task in its meta: detected from ans_candidates
    assert mc.info.task == MULTIPLE_CHOICE
    tr = mc.splits["train"]
    assert tr.extra["candidates"].shape == (len(tr), K, 2) and tr.extra["candidate_lengths"].shape == (len(tr), K)
    b = next(D.iterate_batches(tr, mc.features, 8))
    assert b.extra["candidates"].shape == (8, K, 2)
    count = D.describe(task_sets[COUNT])
    assert count.task == COUNT
    assert D.describe("synthetic:tiny").task == OPEN_ENDED


def test_bad_task_files_name_file_and_key(tiny, tmp_path):
    src = tiny.paths.vocab.parent

    def drop(split, obj):
        if split == "val":
            del obj[L.CANDIDATES_LEN_KEY]

    with pytest.raises(DataError, match=r"val_questions\.pt: missing key 'ans_candidates_len'"):
        D.load(_rewrite(src, tmp_path / "a", MULTIPLE_CHOICE, edit=drop))

    def big(split, obj):
        if split == "test":
            obj["answers"][3] = 11

    with pytest.raises(DataError, match=r"test_questions\.pt: count 11 of question 3 .*outside 1\.\.10"):
        D.load(_rewrite(src, tmp_path / "b", COUNT, edit=big))

    def wrong(split, obj):
        if split == "train":
            obj["answers"][0] = K

    with pytest.raises(DataError, match=rf"candidate index {K} of question 0 .*outside 0\.\.{K - 1}"):
        D.load(_rewrite(src, tmp_path / "c", MULTIPLE_CHOICE, edit=wrong))


def test_count_predictions_round_and_clamp_as_hcrn():
    x = torch.tensor([[-3.0], [0.4], [1.49], [1.5], [4.51], [9.7], [30.0]])
    assert count_predictions(x).tolist() == [1, 1, 1, 2, 5, 10, 10]
    # HCRN: (logits + 0.5).long().clamp(min=1, max=10)
    assert count_predictions(x).tolist() == (x + 0.5).long().clamp(1, 10).view(-1).tolist()


def test_hinge_loss_is_hcrns_summed_margin_over_every_candidate():
    s = torch.tensor([[2.0, 0.5, 1.8], [0.0, 0.0, 3.0], [1.0, 1.5, 0.2]])
    a = torch.tensor([0, 2, 0])
    # HCRN's train.py: sum over every (question, candidate) of max(0, 1 + s_j - s_answer), the answer's own term
    # (= 1) included: q0: 1, max(0, 1 + 0.5 - 2) = 0, max(0, 1 + 1.8 - 2) = 0.8 -> 1.8
    #                 q1: max(0, 1 + 0 - 3) = 0 twice, own 1 -> 1
    #                 q2: own 1, max(0, 1 + 1.5 - 1) = 1.5, max(0, 1 + 0.2 - 1) = 0.2 -> 2.7
    assert hinge_loss(s, a).item() == pytest.approx(1.8 + 1.0 + 2.7)
    # HCRN's own expression, on its flattened (B * K) logits and tiled answers
    flat, k = s.reshape(-1), s.shape[1]
    agg = torch.arange(s.shape[0]).repeat_interleave(k) * k
    hcrn = torch.max(torch.tensor(0.0), 1.0 + flat - flat[a.repeat_interleave(k) + agg]).sum()
    assert hinge_loss(s, a).item() == pytest.approx(hcrn.item())
    # the right candidate's own term has no gradient; a wrong one inside the margin pushes its score down
    s = s.clone().requires_grad_(True)
    hinge_loss(s, a).backward()
    assert s.grad.tolist() == [[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-2.0, 1.0, 1.0]]


def test_the_multiple_choice_loss_is_hcrns_hinge_unless_set_to_cross_entropy():
    s = torch.tensor([[2.0, 0.5, 1.8], [0.0, 0.0, 3.0]])
    a = torch.tensor([0, 2])
    out = {"logits": s}
    obj = variants.objective(variants.get_config("question-only", task=MULTIPLE_CHOICE))
    total, parts = obj(out, a)
    assert set(parts) == {"hinge"} and total.item() == pytest.approx(1.8 + 1.0)
    ce_cfg = variants.get_config("question-only", task=MULTIPLE_CHOICE, mc_loss="ce")
    total, parts = variants.objective(ce_cfg)(out, a)
    assert set(parts) == {"ce"} and total.item() == pytest.approx(torch.nn.functional.cross_entropy(s, a).item())
    assert variants.get_config("dualvgr", task=MULTIPLE_CHOICE).loss["mc_loss"] == "hinge"
    assert "mc_loss" not in variants.get_config("dualvgr").loss  # an open-ended config does not spell it
    with pytest.raises(variants.ConfigError, match=r"mc_loss = 'svm' is not one of hinge, ce"):
        variants.get_config("dualvgr", task=MULTIPLE_CHOICE, mc_loss="svm")


def test_the_run_id_covers_the_multiple_choice_loss_on_multiple_choice_runs_only():
    from harness.runs import identity

    def rid(**over):
        cfg = variants.get_config("dualvgr", **over)
        return identity.run_id("dualvgr", identity.computation(cfg.to_dict(), "d", 0, {}))

    # open-ended and count runs: mc_loss acts on nothing, so it is not in their ids
    assert rid() == rid(mc_loss="ce") == rid(mc_loss="hinge")
    assert rid(task=COUNT) == rid(task=COUNT, mc_loss="ce")
    # multiple choice: the hinge (the reference recipe) is a new computation; cross entropy keeps the id of before
    def comp(**over):
        return identity.computation(variants.get_config("dualvgr", task=MULTIPLE_CHOICE, **over).to_dict(), "d", 0, {})

    hinge, ce = comp(), comp(mc_loss="ce")
    assert hinge["loss"].pop("mc_loss") == "hinge" and "mc_loss" not in ce["loss"]
    assert hinge == ce  # the hinge's computation is the one of before plus mc_loss: nothing else changed
    assert rid(task=MULTIPLE_CHOICE, mc_loss="hinge") == rid(task=MULTIPLE_CHOICE) != rid(task=MULTIPLE_CHOICE,
                                                                                           mc_loss="ce")


def test_a_non_finite_count_output_is_no_count_and_never_averaged_into_an_mse():
    x = torch.tensor([[float("nan")], [float("inf")], [float("-inf")], [3.2]])
    # before: the clamp ran before the cast, and a NaN became -9223372036854775808
    assert count_predictions(x).tolist() == [0, 0, 0, 3]
    with pytest.raises(M.NonFiniteCount, match=r"3 of 4 count outputs .*not finite.*question 0"):
        M.squared_error_by_type(count_predictions(x).numpy(), np.array([1, 2, 3, 3]), np.zeros(4), ["count"])
    assert M.squared_error_by_type(np.array([3, 5]), np.array([1, 5]), np.zeros(2), ["count"])["mse"] == 2.0


def test_a_family_without_the_task_gets_a_clear_error():
    fam = variants.family("dualvgr")
    with pytest.raises(ValueError, match="no head for the count task"):
        variants.families.ModelFamily("toy", torch.nn.Linear, fam.config).make_config({"task": COUNT})


@pytest.mark.slow
@pytest.mark.parametrize("task", [MULTIPLE_CHOICE, COUNT])
def test_dualvgr_and_a_logit_kd_student_train_on_each_task(task, task_sets, tmp_path):
    store = ResultsStore(tmp_path / "results")
    common = dict(data=str(task_sets[task]), seed=0, epochs=2, batch_size=256, overrides={"module_dim": 16})
    rec = train(RunSpec(variant="student-logits", **common), store, device="cpu", progress=False)
    assert rec["status"] == "complete" and rec["variant_config"]["model"]["task"] == task
    teacher = store.read_record(rec["teacher_runs"][0])
    assert teacher["variant_config"]["model"]["task"] == task
    test = rec["metrics"]["test"]
    if task == COUNT:
        assert 0 <= test["mse"] and set(test["mse_per_type"]) <= set(rec["data"]["type_names"])
        assert "lowest validation mse" in rec["metrics"]["selection"]
        best = min(h["val_mse"] for h in rec["history"])
        assert rec["metrics"]["val"]["mse"] == pytest.approx(best)
    else:
        assert "mse" not in test and 0 <= test["overall"] <= 100
    assert M.METRICS["mse"].applies(rec) == (task == COUNT)


def test_dkd_on_a_count_set_is_refused_before_training(task_sets, tmp_path):
    from harness.training.plan import plan
    info = D.describe(task_sets[COUNT])
    with pytest.raises(variants.ConfigError, match="'dkd' has no meaning for the count task"):
        plan(RunSpec(variant="student-dkd", data=str(task_sets[COUNT]), seed=0), info)


@pytest.mark.slow
def test_a_grid_over_three_tasks_reports_a_table_per_task(tiny, task_sets, tmp_path):
    from harness.execution import grid as G
    from harness.execution.grid import run_grid
    from harness.report import write_report

    sets = [str(tiny.paths.vocab.parent), str(task_sets[MULTIPLE_CHOICE]), str(task_sets[COUNT])]
    f = tmp_path / "tasks.toml"
    f.write_text(f'data = {json.dumps(sets)}\nseeds = [0]\nvariants = ["dualvgr", "question-only"]\n'
                 '[train]\nepochs = 1\nbatch_size = 512\n[set]\nmodule_dim = 16\n')
    g = G.load(f)
    assert g.datasets == sets and len(g.runs) == 6 and {r.data for r in g.runs} == set(sets)
    store = ResultsStore(tmp_path / "results")
    res = run_grid(g, store, device="cpu")
    assert not res.failed and len(res.run_ids) == 6
    md = write_report(store, "tasks", res.run_ids, out_dir=tmp_path / "reports").read_text()
    assert md.count("## Data set:") == 3
    # the multiple-choice part, and only it, says which loss its runs trained with: HCRN's, the reference recipe
    assert md.count("Multiple-choice loss") == 1
    mc_part = next(part for part in md.split("## Data set:") if "Multiple-choice loss" in part)
    assert "Multiple-choice loss of every run: HCRN's summed max-margin hinge (mc_loss = hinge)." in mc_part
    assert "| causal |" in mc_part  # the NExT-QA types of the multiple-choice set
    assert md.count("### Main table (count: MSE)") == 1 and md.count("### Main table\n") == 2
    count_part = md.split("### Main table (count: MSE)")[1]
    assert "test MSE" in count_part and "McNemar's test does not apply" in count_part
    assert "Against `dualvgr`" in count_part and "question-only" in count_part
    assert "### Training curves" in count_part
    assert len(list((tmp_path / "reports" / "tasks_files").glob("training_curves-*.png"))) == 3  # one per task
    import re
    assert re.search(r"\| variant( \| (CW|CH|TN|TC|DC|DL|DO)){7} \| causal \| temporal \| descriptive \| all \|", md)
    assert re.search(r"causal: (CW|CH) \+ (CW|CH); temporal: (TC|TN) \+ (TC|TN); descriptive: D. \+ D. \+ D.\.", md)
    # compressed evaluations of the other tasks: a multiple-choice run through ONNX Runtime (candidates fed by
    # name), a count run in int8, each reported in its task's metric beside fp32
    from harness.compression import compress as C
    by = {(store.read_record(i)["data"]["spec"], store.read_record(i)["variant"], store.read_record(i)["seed"]): i
          for i in res.run_ids}
    mc, cnt = by[(sets[1], "dualvgr", 0)], by[(sets[2], "dualvgr", 0)]
    assert C.compress_run(store, mc, "onnx")["agreement"]["prediction_agreement"] == 1.0
    assert C.compress_run(store, cnt, "dynamic-int8")["metrics"]["test"]["mse"] >= 0
    md = write_report(store, "tasks", res.run_ids, out_dir=tmp_path / "reports").read_text()
    count_part = md.split("### Main table (count: MSE)")[1].split("## Data set:")[0]
    assert "| variant | path | n seeds | test MSE | 95% CI | Δ fp32 |" in count_part
    assert re.search(r"\|  \| dynamic-int8 \| n=1 \| \d+\.\d{3} \|", count_part)
    assert re.search(r"\|  \| onnx \| n=1 \| \d+\.\d\d \|", md.split("### Main table (count: MSE)")[0])


def test_the_cli_trains_multiple_choice_with_the_loss_set_and_the_record_says_which(task_sets, tmp_path):
    from typer.testing import CliRunner

    import ablate

    common = ["--data", str(task_sets[MULTIPLE_CHOICE]), "--epochs", "1", "--batch-size", "512", "--device", "cpu",
              "--results", str(tmp_path / "results"), "--set", "module_dim=16"]
    runs = {}
    for loss in ("hinge", "ce"):
        res = CliRunner().invoke(ablate.app, ["run", "question-only", *common, "--set", f"mc_loss={loss}"])
        assert res.exit_code == 0, res.output
        what = {"hinge": "HCRN's summed max-margin hinge", "ce": "cross entropy over the candidates"}[loss]
        assert f"multiple-choice loss: {what} (mc_loss = {loss})" in " ".join(res.output.split())
        runs[loss] = next(r for r in ResultsStore(tmp_path / "results").iter_records()
                          if r["variant_config"]["loss"].get("mc_loss") == loss)
        assert set(runs[loss]["history"][0]) >= {f"loss_{'hinge' if loss == 'hinge' else 'ce'}"}
    assert runs["hinge"]["run_id"] != runs["ce"]["run_id"]
    res = CliRunner().invoke(ablate.app, ["run", "question-only", *common, "--set", "mc_loss=svm"])
    assert res.exit_code == 2 and "error: variant 'question-only': setting mc_loss = 'svm' is not one of hinge, ce" \
        in " ".join(res.output.split())


def test_grid_data_must_be_specs(tmp_path):
    from harness.execution import grid as G
    f = tmp_path / "bad.toml"
    f.write_text('data = ["synthetic:tiny", "synthetic:tiny"]\nvariants = ["dualvgr"]\n')
    with pytest.raises(G.GridError, match=r"bad\.toml: data must be a data spec or a non-empty list of distinct"):
        G.load(f)
