"""Cost measurements (harness/measurement/measure.py) and bench.py. CPU only; the CUDA paths (CUDA events,
max_memory_allocated) are exercised by the tests marked to skip without a GPU."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import variants
from tests.conftest import needs_cpu_bf16
from harness.measurement import flops as F
from harness.measurement import measure as M
from harness.data.synthetic import PRESETS

SMALL = PRESETS["tiny"].model_config()
MSVD = PRESETS["msvd"].model_config()


def lstm_macs(steps: int, input_size: int, hidden: int, directions: int = 1) -> int:
    """Hand count of an LSTM layer's MACs: per time step, per sequence, per direction, 4 gates
    x (input x hidden + hidden x hidden) multiply-adds for the two gate matrix products. Biases
    and the elementwise gate ops (sigmoid, tanh, cell/hidden products and sums) are not counted,
    as FlopCounterMode does not count them. ``steps`` = sequences x time steps."""
    return directions * steps * 4 * (input_size * hidden + hidden * hidden)


# ----------------------------------------------------------------------------- FLOPs: every variant


@pytest.mark.parametrize("name", variants.list())
def test_flops_agree_with_flopcountermode(name):
    cfg = variants.get_config(name, **SMALL)
    torch.manual_seed(0)
    model = variants.build(cfg)
    r = F.flops_crosscheck(model, M.random_inputs(cfg.model, 2, "cpu"))
    msg = (f"{name}: fvcore x2 = {r['fvcore_flops']:,.0f}, FlopCounterMode = {r['torch_flops']:,}, "
           f"rel diff {r['rel_diff']:.2e}")
    print(msg)
    assert r["torch_flops"] > 0, msg
    assert r["fvcore_flops"] == r["torch_flops"], msg  # the two counters agree exactly
    # every op the counter met is either counted or deliberately zero (ZERO_FLOP_OPS)
    assert r["unsupported_ops"] == {}, f"{msg}; decide the FLOPs of {r['unsupported_ops']} in flops.py"


def test_sparse_node_is_cheaper_than_dualvgr():
    out = {}
    for name in ("dualvgr", "sparse-node"):
        cfg = variants.get_config(name, **SMALL)
        out[name] = F.count_flops(variants.build(cfg), M.random_inputs(cfg.model, 2, "cpu"))["macs_per_sample"]
    assert 0 < out["sparse-node"] < out["dualvgr"], out


def test_per_sample_counts_do_not_depend_on_batch_size():
    cfg = variants.get_config("dualvgr", **SMALL)
    model = variants.build(cfg)
    a = F.count_flops(model, M.random_inputs(cfg.model, 2, "cpu"))
    b = F.count_flops(model, M.random_inputs(cfg.model, 5, "cpu"))
    assert a["macs_per_sample"] == b["macs_per_sample"]
    assert a["flops_per_sample"] == 2 * a["macs_per_sample"]


def test_dead_code_is_counted_with_all_outputs():
    """question-only computes the per-word BiLSTM but never uses it: the eager forward (and
    FlopCounterMode) pay for it, a logits-only trace would drop it."""
    cfg = variants.get_config("question-only", **SMALL)
    model = variants.build(cfg)
    inputs = M.random_inputs(cfg.model, 2, "cpu")
    full = F.count_flops(model, inputs)["macs_per_sample"]
    logits_only = F.count_flops(model, inputs, outputs="logits")["macs_per_sample"]
    L, W, H = 12, SMALL["word_dim"], SMALL["module_dim"] // 2
    assert full - logits_only == lstm_macs(L, W, H, directions=2)  # the unused concatRNN


# ----------------------------------------------------------------------------- FLOPs: recurrent handle


class _Padded(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.lstm = nn.LSTM(**kw)

    def forward(self, x):
        return self.lstm(x)[0]


class _Packed(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.lstm = nn.LSTM(batch_first=True, **kw)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True)[0]


def test_lstm_handle_padded_bidirectional():
    B, T, I, H = 3, 5, 10, 7
    model = _Padded(input_size=I, hidden_size=H, batch_first=True, bidirectional=True)
    x = torch.randn(B, T, I)
    r = F.count_flops(model, (x,))
    expected = lstm_macs(B * T, I, H, directions=2)  # 2 x 15 x 4 x (70 + 49) = 14,280
    assert expected == 14280
    assert r["macs_per_sample"] * B == expected
    assert r["unsupported_ops"] == {}
    assert F.torch_flops(model, (x,)) == 2 * expected


def test_lstm_handle_two_layers_time_first():
    B, T, I, H = 2, 6, 5, 4
    model = _Padded(input_size=I, hidden_size=H, num_layers=2, bidirectional=True)  # (T, B, I) input
    x = torch.randn(T, B, I)
    total = F.count_flops(model, (x,))["macs_per_sample"] * T  # count_flops divides by dim 0 (T here)
    expected = lstm_macs(B * T, I, H, 2) + lstm_macs(B * T, 2 * H, H, 2)  # layer 2 reads both directions
    assert total == expected
    assert F.torch_flops(model, (x,)) == 2 * expected


def test_lstm_handle_packed_counts_real_steps_only():
    I, H = 10, 7
    model = _Packed(input_size=I, hidden_size=H, num_layers=2, bidirectional=True)
    x, lengths = torch.randn(3, 5, I), torch.tensor([5, 2, 4])
    steps = int(lengths.sum())  # 11 real (sequence, step) pairs, not 3 x 5
    expected = lstm_macs(steps, I, H, 2) + lstm_macs(steps, 2 * H, H, 2)
    r = F.count_flops(model, (x, lengths))
    assert r["macs_per_sample"] * 3 == expected
    assert r["unsupported_ops"] == {}
    assert F.torch_flops(model, (x, lengths)) == 2 * expected


def test_einsum_handle_is_exact():
    """fvcore's einsum rule rounds numpy's report to 4 significant digits; ours is exact."""
    class E(nn.Module):
        def forward(self, wh, a):
            return torch.einsum("bhnf,hf->bhn", wh, a)

    wh, a = torch.randn(1, 4, 8, 192), torch.randn(4, 192)
    assert F.count_flops(E(), (wh, a))["macs_per_sample"] == 4 * 8 * 192  # 6144 (fvcore: 6145)
    assert F.torch_flops(E(), (wh, a)) == 2 * 4 * 8 * 192


# ----------------------------------------------------------------------------- the reference size


def test_dualvgr_msvd_params_and_macs_include_the_lstms():
    cfg = variants.get_config("dualvgr", **MSVD)
    model = variants.build(cfg)
    assert M.param_counts(model)["total"] == 23_187_578
    r = F.count_flops(model, M.random_inputs(cfg.model, 1, "cpu"))
    D, W, V, L = 768, 300, 2048, 12
    # question: two BiLSTMs (concatRNN, encoder) over L = 12 padded words, hidden D/2 per direction
    question = 2 * lstm_macs(L, W, D // 2, directions=2)
    # appearance: one BiLSTM over each clip's 16 frames, 8 clips, hidden D/2 per direction
    appearance = lstm_macs(8 * 16, V, D // 2, directions=2)
    assert question == 50_429_952 and appearance == 956_301_312
    by = r["macs_per_sample_by_module"]
    assert by["linguistic_input_unit"] == question  # only the LSTMs do matrix products there
    assert by["visual_appearance_input_unit"] == appearance
    assert r["macs_per_sample"] > question + appearance  # plus the graph reasoning, fusion, classifier
    assert r["macs_per_sample"] == sum(by.values())
    assert r["flops_per_sample"] == 2 * r["macs_per_sample"]
    assert r["unsupported_ops"] == {}


# ----------------------------------------------------------------------------- timing, memory, training


def test_latency_and_train_throughput_fields():
    cfg = variants.get_config("dualvgr", **SMALL)
    model = variants.build(cfg)
    inputs = M.random_inputs(cfg.model, 4, "cpu")
    lat = M.latency(model, inputs, warmup=1, reps=5)
    assert lat["timer"] == "perf_counter" and lat["reps"] == 5
    assert 0 < lat["latency_ms_median"] <= lat["latency_ms_p90"] <= lat["latency_ms_p99"]
    assert lat["infer_samples_per_s"] > 0
    step = M.make_train_step(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    tr = M.train_throughput(step, inputs, M.random_answers(cfg.model, 4, "cpu"), warmup=1, reps=3)
    assert tr["train_samples_per_s"] > 0 and tr["train_ms_median"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "Adam did not step"


def test_student_train_step_uses_its_teacher():
    cfg = variants.get_config("student-fused", **SMALL)
    model = variants.build(cfg)
    with pytest.raises(ValueError, match="teacher"):
        M.make_train_step(cfg, model)
    teachers = M.build_teachers(cfg, "cpu")
    assert len(teachers) == 1 and teachers[0].cfg.graph_layers == 4
    assert not any(p.requires_grad for p in teachers[0].parameters())
    step = M.make_train_step(cfg, model, teachers)
    loss = step(M.random_inputs(cfg.model, 3, "cpu"), M.random_answers(cfg.model, 3, "cpu"))
    assert torch.isfinite(loss)
    assert step.objective.kd_names == ["fused"]


def test_peak_memory_cpu_is_process_rss():
    mib, kind = M.peak_memory_mib(lambda: torch.ones(64, 1 << 20).sum(), "cpu")  # 256 MiB tensor
    assert kind.startswith("cpu_process_peak_rss")
    assert mib > 256


def test_cpu_step_memory_is_the_profilers_tensor_peak_every_time():
    """A warmed-up step reuses the pages its warm-up freed, so the RSS cannot see it: the profiler's
    accounting sees the 64 MiB the function holds at once (two 32 MiB tensors), on every call."""
    resident = torch.ones(32, 1 << 20)  # 128 MiB held before: not the function's  # noqa: F841

    def fn():
        a = torch.ones(8, 1 << 20)
        b = a * 2  # both alive: 64 MiB
        del a
        return float(b.sum())

    for _ in range(3):
        assert M.cpu_tensor_peak_mib(fn) == pytest.approx(64.0, abs=1.0)
    assert M.cpu_tensor_peak_mib(lambda: None) == 0.0


def test_cpu_step_memory_that_cannot_be_measured_is_null_with_its_reason(monkeypatch):
    def broken(fn):
        raise RuntimeError("profiler already running")

    monkeypatch.setattr(M, "cpu_tensor_peak_mib", broken)
    cfg = variants.get_config("dualvgr", **SMALL)
    (rec,) = M.measure_variant(cfg, [4], "cpu", reps=1, warmup=1, train_reps=1, flops=False)
    assert rec["train_samples_per_s"] and rec["peak_mem_mib_train"] > 0  # the rest is measured
    assert rec["peak_mem_mib_train_step"] is None and rec["peak_mem_step_kind"] is None
    assert rec["errors"] == {"peak_mem_mib_train_step": "RuntimeError: profiler already running"}


@pytest.mark.capability
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_never_invents_numbers(precision):
    cfg = variants.get_config("dualvgr", **SMALL)
    (rec,) = M.measure_variant(cfg, [2], "cpu", precision=precision, reps=3, warmup=1, train_reps=2, flops=False)
    errors = rec.get("errors", {})
    assert (rec["latency_ms_median"] is None) == ("latency" in errors), rec
    assert (rec["train_samples_per_s"] is None) == ("train" in errors), rec


@pytest.mark.capability
@needs_cpu_bf16
def test_bf16_is_timed_on_a_cpu_that_supports_it():
    cfg = variants.get_config("dualvgr", **SMALL)
    (rec,) = M.measure_variant(cfg, [2], "cpu", precision="bf16", reps=3, warmup=1, train_reps=2, flops=False)
    assert rec["latency_ms_median"] is not None, rec


def test_bf16_on_a_cpu_without_it_is_reported_not_timed(monkeypatch):
    from harness import env

    monkeypatch.setattr(env, "_probe_cpu", lambda dtype: "RuntimeError: no bf16 lstm")
    cfg = variants.get_config("dualvgr", **SMALL)
    (rec,) = M.measure_variant(cfg, [2], "cpu", precision="bf16", reps=3, warmup=1, train_reps=2, flops=False)
    assert rec["latency_ms_median"] is None and rec["train_samples_per_s"] is None
    assert "cannot run an LSTM on this CPU" in rec["errors"]["latency"]
    with pytest.raises(ValueError, match="precision"):
        M.autocast("cpu", "fp8")


def test_batch_one_training_is_null_not_invented():
    cfg = variants.get_config("dualvgr", **SMALL)
    (rec,) = M.measure_variant(cfg, [1], "cpu", reps=2, warmup=1, flops=False)
    assert rec["latency_ms_median"] is not None
    assert rec["train_samples_per_s"] is None and rec["peak_mem_mib_train"] is None
    assert "BatchNorm" in rec["errors"]["train"]


@pytest.mark.cuda
def test_cuda_timing_and_memory():
    cfg = variants.get_config("dualvgr", **SMALL)
    (rec,) = M.measure_variant(cfg, [4], "cuda", reps=5, warmup=2, train_reps=3)
    assert rec["timer"] == "cuda_events" and rec["gpu_name"]
    assert rec["peak_mem_kind"] == "cuda_max_memory_allocated"
    assert rec["peak_mem_mib_train"] > rec["peak_mem_mib_infer"] > 0


# ----------------------------------------------------------------------------- data layer


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_data_throughput(data_cache, mode):
    from harness.data import dataset as D

    data = D.load("synthetic:tiny", mode=mode)
    r = M.data_throughput(data, 64, "cpu")
    assert r["data_mode"] == mode
    assert r["data_samples_per_s"] > 0
    assert r["data_batches"] == -(-len(data.splits["train"]) // 64)


# ----------------------------------------------------------------------------- bench.py


def _bench(args):
    from typer.testing import CliRunner

    import bench

    res = CliRunner().invoke(bench.app, args)
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.slow
def test_bench_json_has_every_field(tmp_path):
    import bench

    out = tmp_path / "out.json"
    _bench(["--variant", "dualvgr", "--variant", "student-f*", "--config", "tiny", "--device", "cpu",
            "--batch-size", "2", "--reps", "3", "--warmup", "1", "--train-reps", "2", "--format", "json",
            "--out", str(out), "--results", str(tmp_path / "results")])
    records = json.loads(out.read_text())
    assert [r["variant"] for r in records] == ["dualvgr", "student-fused"]
    for r in records:
        missing = [f for f in bench.REQUIRED_FIELDS if f not in r]
        assert not missing, missing
        assert r["config"] == "tiny" and r["device"] == "cpu" and r["batch_size"] == 2 and r["precision"] == "fp32"
        assert r["gpu_name"] is None  # CUDA only
        assert r["peak_mem_mib_infer"] > 0 and r["peak_mem_mib_train"] > 0  # CPU: process peak RSS
        assert r["macs_per_sample"] > 0 and r["flops_per_sample"] == 2 * r["macs_per_sample"]
        for f in ("latency_ms_median", "latency_ms_p90", "latency_ms_p99", "infer_samples_per_s",
                  "train_samples_per_s"):
            assert r[f] > 0, f
        assert r["unsupported_ops"] == {} and "errors" not in r
    assert records[1]["teachers"] == ["teacher-g4"]
    stored = sorted((tmp_path / "results" / "bench").glob("*.json"))
    assert [p.name.split("-", 1)[1] for p in stored] == ["dualvgr.json", "student-fused.json"]
    assert json.loads(stored[0].read_text())[0]["params_total"] == records[0]["params_total"]


@pytest.mark.slow
def test_bench_markdown_data_and_no_store(tmp_path, monkeypatch, data_cache):
    monkeypatch.chdir(tmp_path)
    res = _bench(["--variant", "question-only", "--config", "tiny", "--device", "cpu", "--batch-size", "2,4",
                  "--reps", "2", "--warmup", "1", "--no-train", "--format", "markdown", "--no-store",
                  "--set", "module_dim=32", "--data", "synthetic:tiny"])
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| variant | batch_size | params_total | macs_per_sample")
    assert lines[0].rstrip(" |").endswith("data_samples_per_s_memory | data_samples_per_s_stream")
    assert len(lines) == 4 and "| question-only | 2 |" in lines[2]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[-2] != "-" and cells[-1] != "-"  # data samples/s, memory and streaming
    assert cells[7] == "-"  # train_samples_per_s: --no-train
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_bench_cpu_train_step_memory_is_measured_not_the_rss_difference(tmp_path):
    """bench.py on the CPU: the step's own memory is the profiler's tensor peak (the RSS difference
    read 0.03 MiB for dualvgr at batch 256): it grows with the batch, holds at least the gradients
    of every parameter (the step frees them before each backward), and the note says what it is."""
    out = tmp_path / "out.json"
    res = _bench(["--variant", "dualvgr", "--config", "tiny", "--device", "cpu", "--threads", "1",
                  "--batch-size", "2,64", "--reps", "1", "--warmup", "1", "--train-reps", "1", "--no-store",
                  "--format", "markdown", "--out", str(out)])
    small, big = json.loads(out.read_text())
    assert small["peak_mem_step_kind"] == big["peak_mem_step_kind"] == M.CPU_STEP_KIND
    assert big["peak_mem_mib_train_step"] >= small["peak_mem_mib_train_step"] >= small["params_total"] * 4 / 2 ** 20
    assert big["peak_mem_mib_train_step"] > 2 * small["peak_mem_mib_train_step"], (small, big)
    assert f"train-step memory: {M.CPU_STEP_KIND}" in " ".join(res.stdout.split())


def test_bench_rejects_unknown_variant():
    from typer.testing import CliRunner

    import bench

    res = CliRunner().invoke(bench.app, ["--variant", "nope-*", "--config", "tiny", "--device", "cpu"])
    assert res.exit_code != 0 and "no variant matches" in res.output
