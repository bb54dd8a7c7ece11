"""Compression beyond distillation (harness.compression.compress): dynamic int8 and ONNX Runtime evaluations of a
trained run agree with fp32 within stated tolerances, are recorded beside the run without touching it,
resume, name what cannot be exported; the grid key; the report section; the bounds."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from harness.compression import compress as C
from harness.execution import grid as G
from harness.training.plan import RunSpec
from harness.runs.record import task as record_task
from harness.training.runner import train
from harness.runs.store import ResultsStore


#: tolerances against the fp32 model on the tiny set's 1,000 test questions. ONNX Runtime computes the
#: same fp32 graph (other kernels, other summation order): every argmax equal, logits within 1e-4.
#: Dynamic int8 rounds weights and activations to 8 bits: measured on the tiny grid's trained runs,
#: 99.0-99.4% argmax agreement and max |logit diff| 0.25-0.35; allowed 97% and 1.0.
ONNX_AGREEMENT, ONNX_LOGIT_DIFF = 1.0, 1e-4
INT8_AGREEMENT, INT8_LOGIT_DIFF = 0.97, 1.0
#: int8 accuracy within this many points of the same run's fp32 accuracy (the issue's target: 1 point)
INT8_ACC_POINTS = 1.0


def _digests(run_dir: Path) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One dualvgr run on the tiny set (4 epochs: far enough from chance for the accuracy to mean something)."""
    store = ResultsStore(tmp_path_factory.mktemp("compress") / "results")
    rec = train(RunSpec("dualvgr", epochs=4, batch_size=64, lr=1e-3, seed=0), store, data=tiny, device="cpu",
                progress=False)
    return store, rec


@pytest.fixture(scope="module")
def compressed(trained, tiny):
    store, rec = trained
    before = _digests(store.run_dir(rec["run_id"]))
    out = {m: C.compress_run(store, rec["run_id"], m, tiny) for m in C.METHODS}
    return store, rec, out, before


@pytest.mark.capability
@pytest.mark.slow  # a trained run (4 epochs) and both evaluations: about 35 s on 2 cores
def test_int8_and_onnx_agree_with_fp32_within_tolerance(compressed):
    store, rec, out, _ = compressed
    onnx, int8 = out["onnx"]["agreement"], out["dynamic-int8"]["agreement"]
    assert onnx["n"] == int8["n"] == rec["data"]["sizes"]["test"]
    assert onnx["prediction_agreement"] >= ONNX_AGREEMENT and onnx["max_abs_logit_diff"] <= ONNX_LOGIT_DIFF
    assert int8["prediction_agreement"] >= INT8_AGREEMENT and int8["max_abs_logit_diff"] <= INT8_LOGIT_DIFF
    assert int8["max_abs_logit_diff"] > 0  # it really is quantised
    fp32 = rec["metrics"]["test"]["overall"]
    assert out["onnx"]["metrics"]["test"]["overall"] == pytest.approx(fp32)
    assert abs(out["dynamic-int8"]["metrics"]["test"]["overall"] - fp32) <= INT8_ACC_POINTS
    for r in out.values():  # evaluated on the machine that trained it: fp32 reproduces its predictions
        assert r["agreement"]["fp32_reproduced"] == 1.0


@pytest.mark.slow  # a trained run (4 epochs) and both evaluations: about 35 s on 2 cores
def test_record_holds_per_type_ablations_size_latency_and_the_link_to_its_run(compressed):
    store, rec, out, _ = compressed
    for method, r in out.items():
        assert r["run_id"] == rec["run_id"] and r["method"] == method and r["seed"] == rec["seed"]
        assert r["run_weights"] == rec["weights"]["best.pt"]
        assert set(r["metrics"]["test"]["per_type"]) == set(rec["metrics"]["test"]["per_type"])
        assert set(r["metrics"]["ablations"]) == set(rec["metrics"]["ablations"])
        assert set(r["cpu"]["latency"]) == {"1", "32"}
        assert all(v["fp32"]["latency_ms_median"] > 0 and v["compressed"]["latency_ms_median"] > 0
                   for v in r["cpu"]["latency"].values())
        d = C.directory(store, rec["run_id"], method)
        assert (d / r["size"]["file"]).stat().st_size == r["size"]["bytes"]
        assert (d / "predictions_test.csv").is_file() and (d / "predictions_val.csv").is_file()
    assert out["dynamic-int8"]["size"]["bytes"] < 0.5 * out["dynamic-int8"]["size"]["fp32_bytes"]
    assert out["onnx"]["method_info"]["opset"] == C.OPSET


@pytest.mark.slow  # a trained run (4 epochs) and both evaluations: about 35 s on 2 cores
def test_the_fp32_record_and_files_are_never_touched(compressed):
    store, rec, _, before = compressed
    assert _digests(store.run_dir(rec["run_id"])) == before
    assert store.read_record(rec["run_id"]) == rec
    assert [r["run_id"] for r in store.iter_records()] == [rec["run_id"]]  # no compressed record counts as a run


@pytest.mark.slow  # a trained run (4 epochs) and both evaluations: about 35 s on 2 cores
def test_a_complete_evaluation_is_skipped_and_a_killed_one_redone(compressed, tiny, monkeypatch):
    store, rec, out, _ = compressed
    calls = []
    real = C.METHODS["dynamic-int8"]
    monkeypatch.setitem(C.METHODS, "dynamic-int8", C.Method(real.name, real.description,
                                                            lambda *a: calls.append(a) or real.build(*a)))
    assert C.compress_run(store, rec["run_id"], "dynamic-int8", tiny) == out["dynamic-int8"]
    assert calls == []
    assert C.compress_runs(store, [rec["run_id"]], ("dynamic-int8",)) == [] and calls == []
    record_path = C.directory(store, rec["run_id"], "dynamic-int8") / "record.json"
    saved = record_path.read_bytes()
    record_path.unlink()  # killed before its record was written: the model file and predictions may be there
    again = C.compress_run(store, rec["run_id"], "dynamic-int8", tiny)
    assert len(calls) == 1 and again["metrics"] == out["dynamic-int8"]["metrics"]
    stale = json.loads(saved)
    stale["run_weights"] = {"nbytes": 1, "sha1": "0" * 40}  # made from other weights (the run was retrained)
    record_path.write_text(json.dumps(stale))
    assert C.read(store, rec["run_id"], "dynamic-int8") is None
    record_path.write_bytes(saved)
    assert C.read(store, rec["run_id"], "dynamic-int8") == out["dynamic-int8"]


def test_int8_and_onnx_agree_with_fp32_on_tiny_questions_fast(tiny, tmp_path):
    """The fast form: a randomly initialised tiny-size model on 300 test questions. Its logits lie close
    together (no training has spread them), so int8's rounding flips more near-ties than on a trained
    run: measured 96.7% argmax agreement, max |logit diff| 0.014; allowed 90% and 0.1."""
    import dataclasses

    import variants

    cfg = variants.get_config("dualvgr", **tiny.info.dims, module_dim=64)
    torch.manual_seed(0)
    model = variants.build(cfg).eval()
    test = tiny.splits["test"]
    def first(v):
        return {k: x[:300] for k, x in v.items()} if isinstance(v, dict) else v[:300]

    few = dataclasses.replace(test, **{f.name: first(getattr(test, f.name)) for f in dataclasses.fields(test)
                                       if f.name != "name"})
    int8, _ = C.agreement(model, C.quantize_int8(model), few, tiny.features, 100)
    assert int8["n"] == 300 and int8["prediction_agreement"] >= 0.9 and 0 < int8["max_abs_logit_diff"] <= 0.1
    onnx = C.METHODS["onnx"].build(model, cfg, tmp_path)
    agree, _ = C.agreement(model, onnx.module, few, tiny.features, 100)
    assert agree["prediction_agreement"] >= ONNX_AGREEMENT and agree["max_abs_logit_diff"] <= ONNX_LOGIT_DIFF
    assert onnx.size_bytes == (tmp_path / "model.onnx").stat().st_size


def test_a_model_that_cannot_be_exported_is_named_with_the_reason(tmp_path):
    class Histogram(nn.Module):  # aten::histc has no ONNX export at opset 17
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 5)

        def forward(self, appearance, motion, questions, lengths):
            x = self.lin(motion.mean(1))
            return {"logits": x + torch.histc(x, 4).sum()}

    cfg = {"num_clips": 2, "num_frames": 2, "vision_dim": 8, "question_vocab": 10}
    with pytest.raises(C.ExportError, match=r"toy-histc cannot be exported to ONNX \(opset 17, TorchScript "
                                            r"exporter\): UnsupportedOperatorError: .*aten::histc"):
        C.export_onnx(Histogram(), "toy-histc", tmp_path / "m.onnx", cfg)
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow  # a trained run (4 epochs) and both evaluations: about 35 s on 2 cores
def test_an_export_failure_is_a_failure_of_that_method_only(trained, tiny, monkeypatch):
    store, rec = trained

    def refuse(model, variant, path, cfg_model):
        raise C.ExportError(f"{variant} cannot be exported to ONNX (opset 17, TorchScript exporter): toy reason")

    monkeypatch.setattr(C, "export_onnx", refuse)
    other = ResultsStore(store.root.parent / "other")  # a store where nothing is evaluated yet
    for sub in ("runs", "datasets"):
        for p in (store.root / sub).rglob("*"):
            if p.is_file() and "compressed" not in p.parts:
                (other.root / p.relative_to(store.root)).parent.mkdir(parents=True, exist_ok=True)
                (other.root / p.relative_to(store.root)).write_bytes(p.read_bytes())
    failures = C.compress_runs(other, [rec["run_id"]], ("onnx", "dynamic-int8"))
    assert failures == [{"run_id": rec["run_id"], "variant": "dualvgr", "method": "onnx",
                         "reason": "dualvgr cannot be exported to ONNX (opset 17, TorchScript exporter): toy reason"}]
    assert C.read(other, rec["run_id"], "dynamic-int8") is not None and C.read(other, rec["run_id"], "onnx") is None


def test_incomplete_runs_unknown_methods_and_damaged_weights_are_refused(tmp_path):
    store = ResultsStore(tmp_path)
    with pytest.raises(C.CompressError, match="unknown compression method.*'int4'.*known: dynamic-int8, onnx"):
        C.compress_run(store, "dualvgr-x", "int4")
    with pytest.raises(C.CompressError, match="dualvgr-nothere: not a complete run"):
        C.compress_run(store, "dualvgr-nothere", "onnx")
    with pytest.raises(C.CompressError, match="named twice"):
        C.check_methods(["onnx", "onnx"], "x")
    store.run_dir("dualvgr-x").mkdir(parents=True)
    (store.run_dir("dualvgr-x") / "best.pt").write_bytes(b"12345")
    broken = {"run_id": "dualvgr-x", "weights": {"best.pt": {"nbytes": 1, "sha1": "0" * 40}}}
    with pytest.raises(C.CompressError, match=r"dualvgr-x: cannot compress: .*best.pt has 5 bytes, 1 were written"):
        C.fp32_model(store, broken)


def test_grid_evaluate_compress_key_is_checked(tmp_path):
    def load(text):
        p = tmp_path / "g.toml"
        p.write_text('variants = ["dualvgr"]\n' + text)
        return G.load(p)

    assert load("").compress == ()
    assert load('[evaluate]\ncompress = ["dynamic-int8", "onnx"]\n').compress == ("dynamic-int8", "onnx")
    for text, pattern in [('[evaluate]\ncompress = ["int4"]\n', r"g.toml: \[evaluate\] compress: unknown compression "
                                                               r"method\(s\) 'int4' \(known: dynamic-int8, onnx, "
                                                               r"ort-dynamic-int8, ort-static-int8\)"),
                          ('[evaluate]\ncompress = "onnx"\n', r"\[evaluate\] compress: expected a list"),
                          ('[evaluate]\ncompres = ["onnx"]\n', r"\[evaluate\] has unknown key\(s\) compres"),
                          ('[evaluate]\ncompress = ["onnx", "onnx"]\n', "named twice"),
                          ('evaluate = 3\n', r"\[evaluate\] must be a table")]:
        with pytest.raises(G.GridError, match=pattern):
            load(text)
    assert load('[evaluate]\ncompress = ["ort-static-int8"]\n').compress == ("ort-static-int8",)
    assert G.load("tiny-compress").compress == ("dynamic-int8", "onnx", "ort-dynamic-int8", "ort-static-int8")


@pytest.mark.slow  # a trained run (4 epochs) and both evaluations: about 35 s on 2 cores
def test_report_shows_compressed_rows_beside_fp32_only_when_there_are_some(compressed, tmp_path):
    from harness.report import write_report

    store, rec, out, _ = compressed
    md = write_report(store, "r", run_ids=[rec["run_id"]], out_dir=tmp_path).read_text()
    section = md.split("### Compressed: int8 and ONNX Runtime beside fp32")[1].split("\n### ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| dualvgr") or line.startswith("|  |")]
    assert [r.split("|")[2].strip() for r in rows[:5]] == ["fp32 (eager)", "dynamic-int8", "onnx",
                                                          "ort-dynamic-int8", "ort-static-int8"]
    assert "activation scales calibrated on 256 training questions" in section  # how static int8 was calibrated
    for row in rows[3:5]:  # ONNX Runtime int8: its paired difference against fp32 and its agreement, as any method
        cells = [c.strip() for c in row.split("|")]
        assert cells[6] not in ("", "-") and float(cells[10]) >= 100 * ORT_INT8_AGREEMENT
    onnx_row = rows[2].split("|")
    assert onnx_row[6].strip() == "+0.00" and onnx_row[10].strip() == "100.00"  # Δ fp32, argmax agrees %
    for m in C.METHODS:  # without compressed evaluations there is no such section
        (C.directory(store, rec["run_id"], m) / "record.json").rename(tmp_path / f"{m}.json")
    try:
        md2 = write_report(store, "r2", run_ids=[rec["run_id"]], out_dir=tmp_path).read_text()
    finally:
        for m in C.METHODS:
            (tmp_path / f"{m}.json").rename(C.directory(store, rec["run_id"], m) / "record.json")
    assert "### Compressed" not in md2


def test_bounds_and_quantised_macs():
    import variants
    from harness.data.sizes import SIZES

    cfg = variants.get_config("dualvgr", **SIZES["tiny"].model_config())
    total, q = C.quantized_macs(variants.build(cfg).eval(), cfg.model)
    assert 0 < q <= total
    rates = {"fp32_gemm_flops": 1e11, "int8_gemm_flops": 4e11, "copy_bytes_per_s": 1e10}
    fp32 = C.bound_ms("fp32", 1, (total, q), 4_000_000, rates)
    int8 = C.bound_ms("int8", 1, (total, q), 1_000_000, rates)
    assert fp32["compute_ms"] == pytest.approx(1000 * 2 * total / 1e11)
    assert fp32["memory_ms"] == pytest.approx(0.4) and int8["memory_ms"] == pytest.approx(0.1)
    assert int8["compute_ms"] < fp32["compute_ms"]
    assert fp32["bound_ms"] == max(fp32["compute_ms"], fp32["memory_ms"])
    assert C.bound_ms("fp32", 32, (total, q), 0, rates)["compute_ms"] == pytest.approx(32 * fp32["compute_ms"])


def test_machine_rates_are_measured():
    r = C.machine_rates(n=256, reps=2, copy_mib=8)
    assert r["fp32_gemm_flops"] > 1e8 and r["int8_gemm_flops"] > 1e8 and r["copy_bytes_per_s"] > 1e8
    both = C.ort_rates(r, n=256, reps=2)  # ONNX Runtime's own rates beside torch's; the bound takes the faster
    for kind in ("fp32", "int8"):
        assert both[f"ort_{kind}_gemm_flops"] > 1e8 and both[f"torch_{kind}_gemm_flops"] == r[f"{kind}_gemm_flops"]
        assert both[f"{kind}_gemm_flops"] == max(both[f"ort_{kind}_gemm_flops"], both[f"torch_{kind}_gemm_flops"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notice
def test_the_rate_graph_is_one_matmul_by_the_transposed_weight(tmp_path):
    """The int8 rate's graph: a Linear's Gemm rewritten as MatMul(a, W^T), which computes the same product."""
    import onnx
    import onnxruntime as ort

    lin = nn.Linear(6, 4, bias=False).eval()
    a = torch.randn(3, 6)
    torch.onnx.export(lin, (a,), str(tmp_path / "mm.onnx"), dynamo=False, input_names=["a"], opset_version=C.OPSET)
    C.as_matmul(tmp_path / "mm.onnx")
    assert [n.op_type for n in onnx.load(str(tmp_path / "mm.onnx")).graph.node] == ["MatMul"]
    session = ort.InferenceSession(str(tmp_path / "mm.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": a.numpy()})
    assert torch.allclose(torch.from_numpy(got[0]), a @ lin.weight.detach().T, atol=1e-6)


@pytest.mark.slow
def test_bench_compress_prints_the_latency_table_with_bounds(tmp_path):
    """bench.py --compress, run in this process (typer's CliRunner: no second interpreter start-up)."""
    import bench

    args = ["--variant", "dualvgr", "--config", "tiny", "--device", "cpu", "--compress", "dynamic-int8",
            "--compress", "onnx", "--compress", "ort-dynamic-int8", "--compress", "ort-static-int8",
            "--compress-reps", "2", "--threads", "1", "--format", "json", "--batch-size", "1,4",
            "--results", str(tmp_path)]
    p = CliRunner().invoke(bench.app, args)
    assert p.exit_code == 0, p.stderr
    rows = json.loads(p.stdout)
    paths = ("fp32 eager", "dynamic-int8", "onnx", "ort-dynamic-int8", "ort-static-int8")
    assert [(r["path"], r["batch_size"]) for r in rows] == [(p, b) for b in (1, 4) for p in paths]
    for r in rows:
        assert r["bound_ms"] > 0 and r["x_bound"] == pytest.approx(r["latency_ms_median"] / r["bound_ms"])
        assert r["bound_ms"] == max(r["compute_ms"], r["memory_ms"])
        assert 0 <= r["non_gemm_share"] <= 1 and r["profile_top_ops"]
        # each path's bound counts at the int8 rate what that path runs in int8, and no more than the model's MACs
        assert (r["int8_macs_per_sample"] > 0) == (r["path"] not in ("fp32 eager", "onnx"))
        assert r["bound_path"] == ("int8" if r["int8_macs_per_sample"] else "fp32")
        assert r["int8_macs_per_sample"] <= r["macs_per_sample"]
        assert r["compute_ms"] == pytest.approx(C.bound_ms(r["bound_path"], r["batch_size"], (
            r["macs_per_sample"], r["int8_macs_per_sample"]), r["weight_bytes"], r)["compute_ms"])
        assert r["profile_tool"] == ("torch.profiler" if r["path"] in ("fp32 eager", "dynamic-int8")
                                     else "onnxruntime profiler")
    dyn = [r for r in rows if r["path"] == "dynamic-int8"]
    assert all(r["int8_macs_per_sample"] == r["macs_int8_per_sample"] for r in dyn)
    assert list((tmp_path / "bench").glob("*-dualvgr-compress.json"))
    bad = CliRunner().invoke(bench.app, args[:-2] + ["--compress", "int4", "--no-store"])
    assert bad.exit_code == 2 and "unknown compression method(s) 'int4'" in bad.stderr


@pytest.mark.slow
def test_a_grid_with_evaluate_compress_trains_then_compresses_and_resumes(data_cache, tmp_path):
    """End to end through ablate.py's command (typer's CliRunner, in this process): train, compress, report;
    again: skipped. A small dualvgr (module_dim 16): what is checked is the grid's path, not the model."""
    import ablate

    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nseeds = [0]\nvariants = ["dualvgr"]\n[set]\nmodule_dim = 16\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n[evaluate]\ncompress = ["dynamic-int8"]\n')
    args = ["--grid", str(grid), "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"),
            "--device", "cpu"]
    first = CliRunner().invoke(ablate.app, args)
    assert first.exit_code == 0, first.output
    store = ResultsStore(tmp_path / "results")
    (rec,) = list(store.iter_records())
    assert rec["variant_config"]["model"]["module_dim"] == 16
    path = C.directory(store, rec["run_id"], "dynamic-int8") / "record.json"
    written = path.stat().st_mtime_ns
    assert C.read(store, rec["run_id"], "dynamic-int8")["metrics"]["test"]["n"] == rec["data"]["sizes"]["test"]
    assert "### Compressed: int8 and ONNX Runtime beside fp32" in (tmp_path / "reports" / "g.md").read_text()
    again = CliRunner().invoke(ablate.app, args)
    assert again.exit_code == 0, again.output
    assert path.stat().st_mtime_ns == written  # complete: not evaluated again
    out = CliRunner().invoke(ablate.app, ["compress", rec["run_id"], "--method", "int4", "--results",
                                          str(tmp_path / "results")])
    assert out.exit_code == 2 and "unknown compression method(s) 'int4'" in out.output


@pytest.mark.parametrize("task", ["multiple-choice", "count"])
@pytest.mark.slow
def test_the_other_tasks_export_and_quantise(task, tmp_path):
    """A multiple-choice model's candidates are exported inputs (their number and length dynamic); a count model's
    single output is compared as its rounded count (variants.tasks)."""
    import variants
    from harness.model.inputs import random_inputs
    from harness.data.sizes import SIZES

    cfg = variants.get_config("dualvgr", task=task, **SIZES["tiny"].model_config())
    torch.manual_seed(0)
    model = variants.build(cfg).eval()
    onnx = C.METHODS["onnx"].build(model, cfg, tmp_path)
    x = random_inputs(cfg.model, 6, "cpu", question_len=9, seed=2)
    with torch.no_grad():
        ref, got = model(*x)["logits"], onnx.module(*x)["logits"]
    assert got.shape == ref.shape and (got - ref).abs().max() <= ONNX_LOGIT_DIFF
    assert C.input_names(cfg.model)[4:] == tuple(variants.task(task).inputs)
    # harness.evaluation.evaluate passes a task's inputs by name (batch.extra): the exported model takes them so too
    named = dict(zip(C.input_names(cfg.model)[4:], x[4:]))
    with torch.no_grad():
        assert torch.equal(onnx.module(*x[:4], **named)["logits"], got)
    for m in ("ort-dynamic-int8", "ort-static-int8"):  # quantised, calibrated on inputs with the task's own
        q = C.METHODS[m].build(model, cfg, tmp_path / m, C.random_calibration(cfg.model, questions=16, batch_size=8))
        with torch.no_grad():
            qgot = q.module(*x[:4], **named)["logits"]
        assert qgot.shape == ref.shape and 0 < (qgot - ref).abs().max() <= 0.1 * max(1.0, ref.abs().max())


def test_compress_grid_takes_the_runs_of_every_data_set_of_the_grid(data_cache, tmp_path, monkeypatch):
    """``ablate.py compress --grid`` plans each run against its own data set: a two-data-set grid's
    multiple-choice and count runs are both compressed (the compression itself is stubbed: the runs
    it is given are what is checked)."""
    import ablate
    from typer.testing import CliRunner

    grid = tmp_path / "g.toml"
    grid.write_text('data = ["synthetic:tiny-mc", "synthetic:tiny-count"]\nseeds = [0]\nvariants = ["question-only"]\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n')
    store = ResultsStore(tmp_path / "results")
    res = G.run_grid(G.load(grid), store, device="cpu", console=Console(quiet=True))
    assert len(res.complete) == 2
    given: list[str] = []
    monkeypatch.setattr(C, "compress_runs", lambda store, ids, methods, **k: given.extend(ids) or [])
    out = CliRunner().invoke(ablate.app, ["compress", "--grid", str(grid), "--method", "dynamic-int8",
                                          "--results", str(tmp_path / "results")])
    assert out.exit_code == 0, out.output
    assert sorted(given) == sorted(res.complete)
    assert {record_task(store.read_record(r)) for r in given} == {"multiple-choice", "count"}


# ----------------------------------------------------------------------------- ONNX Runtime int8

#: ONNX Runtime's int8 paths against the fp32 model on the tiny set's 1,000 test questions of the 4-epoch run
#: (the ``compressed`` fixture), measured on a 2-core AVX2 EPYC with 7-bit weights: ort-dynamic-int8 99.5% argmax
#: agreement, max |logit diff| 0.16, accuracy 72.9 (fp32 73.0); ort-static-int8 98.2%, 0.52, 72.6 (full-range
#: weights on an AVX-512 VNNI EPYC: 99.3%, 0.094, 73.1; 98.9%, 0.51, 72.8). Allowed 97% each and max |logit diff|
#: 1.0 (as torch's dynamic int8), the accuracy within 1 point of fp32 (the issue's target). Sizes: dynamic 0.5 of
#: the fp32 state dict at most; static, whose graph keeps its quantise / dequantise pairs and the fp32 biases of the
#: Gemms it quantises, 0.53 measured, 0.6 allowed
ORT_INT8_AGREEMENT, ORT_INT8_LOGIT_DIFF = 0.97, 1.0
ORT_INT8_SIZE = {"ort-dynamic-int8": 0.5, "ort-static-int8": 0.6}
ORT_METHODS = ("ort-dynamic-int8", "ort-static-int8")


@pytest.mark.capability
@pytest.mark.slow  # the compressed fixture: a trained run (4 epochs) and every evaluation
def test_ort_int8_methods_agree_with_fp32_within_tolerance(compressed):
    store, rec, out, _ = compressed
    fp32 = rec["metrics"]["test"]["overall"]
    for m in ORT_METHODS:
        a = out[m]["agreement"]
        assert a["n"] == rec["data"]["sizes"]["test"]
        assert a["prediction_agreement"] >= ORT_INT8_AGREEMENT and 0 < a["max_abs_logit_diff"] <= ORT_INT8_LOGIT_DIFF
        assert abs(out[m]["metrics"]["test"]["overall"] - fp32) <= INT8_ACC_POINTS
        assert set(out[m]["metrics"]["test"]["per_type"]) == set(rec["metrics"]["test"]["per_type"])
        assert out[m]["size"]["bytes"] < ORT_INT8_SIZE[m] * out[m]["size"]["fp32_bytes"]  # int8 weights
        assert (C.directory(store, rec["run_id"], m) / out[m]["size"]["file"]).stat().st_size == out[m]["size"]["bytes"]
    ops = {m: out[m]["method_info"]["quantized_ops"] for m in ORT_METHODS}
    assert ops["ort-dynamic-int8"].get("DynamicQuantizeLSTM") and ops["ort-dynamic-int8"].get("MatMulInteger")
    assert ops["ort-static-int8"].get("QuantizeLinear") and ops["ort-static-int8"].get("DynamicQuantizeLSTM")


@pytest.mark.slow  # the compressed fixture: a trained run (4 epochs) and every evaluation
def test_static_int8_calibrates_on_training_questions_only(compressed, tiny):
    store, rec, out, _ = compressed
    cal = out["ort-static-int8"]["method_info"]["calibration"]
    ids = {int(q) for q in cal["question_ids"]}
    assert cal["source"] == "train" and cal["questions"] == len(ids) == C.CALIBRATION_QUESTIONS
    assert ids <= {int(q) for q in tiny.splits["train"].question_ids}
    assert not ids & {int(q) for s in ("val", "test") for q in tiny.splits[s].question_ids}
    assert "calibration" not in out["ort-dynamic-int8"]["method_info"]  # dynamic: nothing to calibrate


class _Untouchable:
    """A split that must not be read: any attribute access fails the test."""

    def __init__(self, name):
        self.name_ = name

    def __getattr__(self, attr):
        raise AssertionError(f"calibration read the {self.name_} split ({attr})")

    def __len__(self):
        raise AssertionError(f"calibration read the {self.name_} split (len)")


def test_calibration_draws_inputs_from_the_training_split_only(tiny):
    """Calibration on a data set whose validation and test splits fail when touched: it reads train only, the
    questions drawn (seed 0, without replacement) are those an independent draw gives, and each batch holds
    exactly those questions' inputs."""
    import dataclasses

    import variants

    data = dataclasses.replace(tiny, splits={"train": tiny.splits["train"], "val": _Untouchable("val"),
                                             "test": _Untouchable("test")})
    cfg = variants.get_config("dualvgr", **tiny.info.dims)
    cal = C.training_calibration(data, cfg.model, questions=40, batch_size=16)
    train = tiny.splits["train"]
    rows = sorted(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:40].tolist())
    assert cal.source == "train" and list(cal.question_ids) == [int(train.question_ids[r]) for r in rows]
    assert [len(b["questions"]) for b in cal.batches] == [16, 16, 8]
    questions = torch.cat([torch.from_numpy(b["questions"]) for b in cal.batches])
    assert torch.equal(questions, train.questions[rows])
    app = torch.cat([torch.from_numpy(b["appearance"]) for b in cal.batches])
    assert torch.equal(app, tiny.features.gather(train.video_rows[rows])[0])
    assert cal.describe()["questions"] == 40


def test_static_int8_refuses_to_build_without_calibration(tmp_path):
    import variants
    from harness.data.sizes import SIZES

    cfg = variants.get_config("dualvgr", **SIZES["tiny"].model_config())
    with pytest.raises(C.CompressError, match="dualvgr: ort-static-int8 calibrates on questions: none given"):
        C.METHODS["ort-static-int8"].build(variants.build(cfg).eval(), cfg, tmp_path, None)


def int8_weights(path) -> dict:
    """The int8 initialisers of an ONNX graph (its quantised weights), by name."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return {name: a for name, a in arrays.items() if a.dtype == np.int8 and a.size > 1}


def test_ort_int8_methods_agree_with_fp32_on_tiny_questions_fast(tiny, tmp_path):
    """The fast form on the shapes of the real path: a randomly initialised tiny-size model, calibrated on 64
    training questions, on 300 test questions. Untrained logits lie close together, so int8 flips near-ties:
    measured ort-dynamic-int8 97.7% argmax agreement, max |logit diff| 0.007; ort-static-int8 96.7%, 0.057 (AVX-512
    VNNI EPYC, full-range weights); 96.0%, 0.0085 and 95.0%, 0.057 (AVX2 EPYC, 7-bit weights; with full-range
    weights there 62% and 59%); allowed 85% and 0.1. Every int8 weight lies in ONNX Runtime's 7-bit range, which
    AVX2's saturating int16 products cannot overflow, whatever CPU runs this test."""
    import dataclasses

    import variants

    cfg = variants.get_config("dualvgr", **tiny.info.dims, module_dim=64)
    torch.manual_seed(0)
    model = variants.build(cfg).eval()
    test = tiny.splits["test"]
    few = dataclasses.replace(test, **{f.name: (getattr(test, f.name)[:300]) for f in dataclasses.fields(test)
                                       if f.name not in ("name", "extra")})
    cal = C.training_calibration(tiny, cfg.model, questions=64)
    for m in ORT_METHODS:
        comp = C.METHODS[m].build(model, cfg, tmp_path / m, cal)
        agree, _ = C.agreement(model, comp.module, few, tiny.features, 100)
        assert agree["prediction_agreement"] >= 0.85 and 0 < agree["max_abs_logit_diff"] <= 0.1
        weights = int8_weights(comp.file)
        assert len(weights) >= 3 and all(-64 <= w.min() and w.max() <= 64 for w in weights.values())
        assert comp.size_bytes == comp.file.stat().st_size and comp.file.parent == tmp_path / m


@pytest.mark.slow
def test_ort_methods_without_onnxruntime_are_one_error_line(shared_store, tmp_path, monkeypatch):
    """onnxruntime missing: `ablate.py compress` says so in one `error:` line per run and method (how to install
    it), exit 1, and records nothing; `bench.py --compress` likewise."""
    import sys

    import ablate
    import bench

    store, recs = shared_store.copy(tmp_path / "results", "dualvgr")
    rid = recs["dualvgr"]["run_id"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    out = CliRunner().invoke(ablate.app, ["compress", rid, "--method", "ort-static-int8", "--results",
                                          str(store.root)])
    assert out.exit_code == 1, out.output
    lines = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "ort-static-int8 method needs the onnx and onnxruntime packages" in lines[0]
    assert "pip install -e '.[compress]'" in lines[0] and "Traceback" not in out.output
    assert C.read(store, rid, "ort-static-int8") is None
    b = CliRunner().invoke(bench.app, ["--variant", "dualvgr", "--config", "tiny", "--device", "cpu", "--compress",
                                       "ort-dynamic-int8", "--compress-reps", "1", "--no-store", "--threads", "1"])
    assert b.exit_code == 1 and "Traceback" not in b.output
    errs = [line for line in b.stderr.splitlines() if line.startswith("error:")]
    assert len(errs) == 1 and "ort-dynamic-int8 method needs the onnx and onnxruntime packages" in errs[0]


@pytest.mark.slow  # the shared store's dualvgr run, compressed twice
def test_ablate_compress_runs_the_ort_methods_and_says_each(shared_store, tmp_path):
    """`ablate.py compress RUN --method ort-dynamic-int8 --method ort-static-int8`: one line per method with its
    accuracy beside fp32's, agreement, size and batch-1 latency; the static one's record names its calibration."""
    import ablate

    store, recs = shared_store.copy(tmp_path / "results", "dualvgr")
    rid = recs["dualvgr"]["run_id"]
    out = CliRunner().invoke(ablate.app, ["compress", rid, "--method", "ort-dynamic-int8", "--method",
                                          "ort-static-int8", "--results", str(store.root), "--threads", "1"])
    assert out.exit_code == 0, out.output
    for m in ORT_METHODS:
        line = next(x for x in out.output.splitlines() if f"seed 0 {m}: test acc" in x)
        rec = C.read(store, rid, m)
        assert f"{rec['metrics']['test']['overall']:.2f}" in line and "predictions agree" in line
        assert f"{rec['size']['bytes']:,} bytes" in line
    assert C.read(store, rid, "ort-static-int8")["method_info"]["calibration"]["source"] == "train"
    assert C.read(store, rid, "onnx") is None  # only the methods asked for
