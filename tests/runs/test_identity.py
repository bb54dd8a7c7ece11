"""Run identity (harness/runs/identity.py): the id is the resolved computation, pinned by a golden file;
spellings of one computation share an id; neutral defaults keep old ids; old stores are re-keyed
only where provable."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from pathlib import Path


import variants
from harness.runs import identity
from harness.training import plan as planning
from harness.training.plan import RunSpec
from harness.runs.store import ResultsStore

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "run_ids.json"


def rid(name: str, teacher_runs=("t-1",), train=None, **overrides) -> str:
    cfg = variants.get_config(name, **overrides)
    comp = identity.computation(cfg.to_dict(), "d", 0, train if train is not None else {},
                                list(teacher_runs) if cfg.teachers else None)
    return identity.run_id(cfg.name, comp)


def test_golden_run_ids_pin_every_variant():
    golden = json.loads(GOLDEN.read_text())
    now = planning.golden_run_ids(golden["data_id"], golden["seed"])
    assert set(golden["run_ids"]) == set(variants.list()), "a variant was added or removed: regenerate the golden file"
    assert now == golden, ("run ids changed: if what a run computes changed on purpose, rewrite "
                           "tests/golden/run_ids.json with `python -m harness.training.plan` and say why in the commit")


def test_two_spellings_of_one_computation_share_an_id():
    base = rid("student-similarity")
    assert rid("student-similarity", **{"similarity.matrix": "cross"}) == base  # the default, spelled out
    assert rid("student-similarity", **{"similarity.delta": 1}) == base  # an int for a float
    assert rid("student-logits", **{"logits.T": 4}) == rid("student-logits")
    assert rid("dualvgr", alpha=1) == rid("dualvgr") and rid("dualvgr", keep_ratio=1) == rid("dualvgr")
    train = RunSpec("dualvgr", lr=1e-4).resolved_train()
    assert rid("dualvgr", train={**train, "grad_clip": 12}) == rid("dualvgr", train=train)  # a TOML int
    assert rid("dualvgr", train={**train, "precision": "fp32"}) == rid("dualvgr", train={
        k: v for k, v in train.items() if k != "precision"})  # the neutral precision


def test_any_change_in_what_is_computed_changes_the_id():
    base = rid("student-similarity")
    assert rid("student-similarity", **{"similarity.matrix": "self"}) != base
    assert rid("student-similarity", **{"similarity.weight": 0.5}) != base
    assert rid("student-similarity", teacher_runs=("t-2",)) != base
    assert rid("dualvgr", beta=1e-7) != rid("dualvgr") and rid("dualvgr", keep_ratio=0.5) != rid("dualvgr")
    assert rid("dualvgr", train={"lr": 1e-3}) != rid("dualvgr", train={"lr": 1e-4})


def _planted(monkeypatch, loss: str, **new_defaults) -> None:
    """Register ``loss`` again with other factory defaults (the code change of a new default)."""
    entry = variants.LOSSES.get(loss)
    fn = entry.fn

    @functools.wraps(fn)
    def planted(*args, **kwargs):
        return fn(*args, **{**new_defaults, **kwargs})

    sig = inspect.signature(fn)
    planted.__signature__ = sig.replace(parameters=[
        p.replace(default=new_defaults[p.name]) if p.name in new_defaults else p for p in sig.parameters.values()])
    monkeypatch.setitem(variants.LOSSES._entries, loss, dataclasses.replace(entry, fn=planted))


def test_a_changed_loss_default_changes_the_id(monkeypatch):
    before = {v: rid(v) for v in ("student-similarity", "student-dkd", "student-logits", "dualvgr")}
    _planted(monkeypatch, "similarity", matrix="self")
    _planted(monkeypatch, "dkd", warmup=0.0)
    after = {v: rid(v) for v in before}
    assert after["student-similarity"] != before["student-similarity"]
    assert after["student-dkd"] != before["student-dkd"]
    assert after["student-logits"] == before["student-logits"] and after["dualvgr"] == before["dualvgr"]


def test_a_setting_added_with_a_neutral_default_keeps_every_id(monkeypatch):
    before = json.loads(GOLDEN.read_text())["run_ids"]
    # a new model setting (a field added to DualVGR's config class) and a new distillation parameter
    # whose defaults reproduce today's behaviour
    dualvgr = variants.family("dualvgr")
    widened = dataclasses.make_dataclass("DualVGRConfig", [("dropout", float, 0.0)], bases=(dualvgr.config,))
    monkeypatch.setitem(variants.MODEL_FAMILIES._entries, "dualvgr", dataclasses.replace(
        variants.MODEL_FAMILIES.get("dualvgr"), fn=dataclasses.replace(dualvgr, config=widened)))
    assert variants.get_config("dualvgr").model["dropout"] == 0.0
    _planted(monkeypatch, "logits", T=4.0)
    entry = variants.LOSSES.get("logits")
    sig = inspect.signature(entry.fn)
    entry.fn.__signature__ = sig.replace(parameters=[*sig.parameters.values(), inspect.Parameter(
        "label_smoothing", inspect.Parameter.KEYWORD_ONLY, default=0.0)])
    undeclared = planning.golden_run_ids()["run_ids"]
    assert undeclared["dualvgr"] != before["dualvgr"] and undeclared["student-logits"] != before["student-logits"]
    monkeypatch.setitem(identity.NEUTRAL, "model.dropout", 0.0)
    monkeypatch.setitem(identity.NEUTRAL, "distill.logits.label_smoothing", 0.0)
    assert planning.golden_run_ids()["run_ids"] == before
    cfg = variants.get_config("dualvgr").to_dict()
    cfg["model"]["dropout"] = 0.1  # used: a new computation
    assert identity.run_id("dualvgr",
                           identity.computation(cfg, "golden-data", 666, RunSpec("dualvgr").resolved_train())) \
        != before["dualvgr"]


# ----------------------------------------------------------------------------- stores of older harnesses


def _legacy_record(name: str, teacher_runs=(), **loss_params) -> dict:
    """A record as the harness of e61fe31 wrote it: the variant config as spelled, its description
    included, and a scheme-1 id."""
    cfg = variants.get_config(name).to_dict()
    cfg["model"].pop("motion_dim")
    for d in cfg["distill"]:
        d["params"] = dict(loss_params)
    train = {k: v for k, v in RunSpec(name, epochs=2).resolved_train().items() if k != "precision"}
    rec = {"variant": name, "variant_config": cfg, "train_config": train, "seed": 1, "record_version": 1,
           "data": {"id": "synthetic-tiny-x", "name": "tiny"}, "teacher_runs": list(teacher_runs),
           "teachers": [{"run_id": t, "variant": "teacher-g4"} for t in teacher_runs], "status": "complete"}
    rec["run_id"] = identity.legacy_run_id(rec)
    return rec


def test_an_old_store_is_told_apart_and_rekeyed_only_where_provable(tmp_path):
    store = ResultsStore(tmp_path)
    teacher = _legacy_record("teacher-g4")
    base = _legacy_record("dualvgr")
    sim = _legacy_record("student-similarity", [teacher["run_id"]])  # params {}: resolved from today's defaults
    logits = _legacy_record("student-logits", [teacher["run_id"]], T=4.0)  # every parameter spelled out
    forged = dict(_legacy_record("dualvgr-u2"), run_id="dualvgr-u2-000000000000")
    for r in (teacher, base, sim, logits, forged):
        store.write_record(r)
    assert [identity.scheme_of(r) for r in (teacher, sim, forged)] == ["1", "1", "unknown"]
    done, left = identity.migrate_store(store, apply=False)
    assert {o for o, _ in done} == {teacher["run_id"], base["run_id"], logits["run_id"]}
    assert store.is_complete(teacher["run_id"])  # a dry run moves nothing
    why = dict(left)
    assert "similarity.matrix" in why[sim["run_id"]] and "unknown" in why[forged["run_id"]]
    done, _ = identity.migrate_store(store)
    new = dict(done)
    rec = store.read_record(new[logits["run_id"]])
    assert identity.scheme_of(rec) == "2" and rec["teacher_runs"] == [new[teacher["run_id"]]]
    assert rec["migrated_from"]["run_id"] == logits["run_id"] and not store.run_dir(logits["run_id"]).exists()
    # the re-keyed id is the id a run of the same computation gets now
    cfg = variants.get_config("student-logits")
    plan_id = identity.run_id(cfg.name, identity.computation(
        cfg.to_dict(), "synthetic-tiny-x", 1, RunSpec("student-logits", epochs=2).resolved_train(),
        [new[teacher["run_id"]]]))
    assert plan_id == new[logits["run_id"]]
    assert identity.migrate_store(store)[0] == []  # nothing left to re-key


def test_code_fingerprint_covers_the_model_and_not_the_report(tmp_path, monkeypatch):
    fp = identity.code_fingerprint()
    assert len(fp) == 12 and fp == identity.code_fingerprint()
    root = tmp_path / "repo"
    for rel in identity.CODE_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((identity.ROOT / rel).read_bytes())
    (root / "harness" / "report").mkdir()
    (root / "harness" / "report" / "writer.py").write_text("# not the computation\n")
    monkeypatch.setattr(identity, "ROOT", root)
    assert identity.code_fingerprint() == fp
    model = root / "variants" / "dualvgr.py"
    model.write_text(model.read_text().replace("def forward(", "def forward(  ", 1))
    assert identity.code_fingerprint() != fp


def test_cli_results_names_the_scheme_migrate_rekeys_and_compare_refuses_a_run_against_itself(tiny, tmp_path):
    from typer.testing import CliRunner

    import ablate

    store = ResultsStore(tmp_path)
    base = dict(_legacy_record("dualvgr"), metrics={"best_epoch": 0, "test": {"overall": 50.0, "per_type": {}}})
    store.write_record(base)
    cli = CliRunner()
    out = cli.invoke(ablate.app, ["results", "--results", str(tmp_path)]).output
    assert "older identity scheme" in out and "migrate" in out
    dry = cli.invoke(ablate.app, ["migrate", "--results", str(tmp_path), "--dry-run"])
    assert dry.exit_code == 0 and f"would re-key {base['run_id']} -> dualvgr-" in dry.output
    assert store.is_complete(base["run_id"])
    done = cli.invoke(ablate.app, ["migrate", "--results", str(tmp_path)])
    assert done.exit_code == 0 and "1 record re-keyed" in done.output and not store.is_complete(base["run_id"])
    out = cli.invoke(ablate.app, ["results", "--results", str(tmp_path)]).output
    assert "older identity scheme" not in out
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n')
    same = cli.invoke(ablate.app, ["compare", "--grid", str(grid), "--grid", str(grid), "--results", str(tmp_path)])
    assert same.exit_code == 2 and "compares a run with itself" in same.output
