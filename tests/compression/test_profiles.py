"""Profiler summaries (harness.compression.profiles): the MACs of a profiled GEMM node from its shapes, the share
of a run outside the GEMMs, the int8 / fp32 split; on hand-made events with figures worked out by hand, then on a
real ONNX Runtime profile of a two-layer graph whose MACs are known."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.compression import profiles as P


def _node(op: str, dur: float, ts: int, a: list[int], y: list[int]) -> dict:
    return {"cat": "Node", "name": f"n{ts}_kernel_time", "dur": dur, "ts": ts,
            "args": {"op_name": op, "input_type_shape": [{"float": a}, {"int8": [1]}],
                     "output_type_shape": [{"float": y}]}}


def test_node_macs_from_shapes():
    # [4, 6, 8] x [8, 5] -> [4, 6, 5]: 4*6*5 outputs, 8 products each
    assert P.node_macs("MatMulInteger", [{"uint8": [4, 6, 8]}], [{"float": [4, 6, 5]}]) == 4 * 6 * 5 * 8
    # Gemm with A transposed ([K, M] = [8, 6]) -> [6, 5]
    assert P.node_macs("Gemm", [{"float": [8, 6]}], [{"float": [6, 5]}]) == 6 * 5 * 8
    # a bidirectional LSTM over 12 steps, batch 3, input 300, hidden 384: per step and direction 4 gates of
    # (input + hidden) products per hidden unit
    assert P.node_macs("DynamicQuantizeLSTM", [{"float": [12, 3, 300]}], [{"float": [12, 2, 3, 384]}]) == \
        12 * 3 * 2 * 4 * 384 * (300 + 384)
    assert P.node_macs("MatMul", [], [{"float": [2, 2]}]) == 0


def test_summarize_ort_splits_int8_and_fp32_and_the_time_outside_gemms():
    events = [{"name": "model_run", "cat": "Session", "dur": 999, "ts": 0}]  # the warm-up run: skipped
    events += [_node("MatMulInteger", 500, 1, [2, 3], [2, 4])]  # before the first counted run: not counted
    for i, ts in enumerate((100, 200)):
        events += [{"name": "model_run", "cat": "Session", "dur": 10_000, "ts": ts},
                   _node("DynamicQuantizeMatMul", 4_000, ts + 1, [2, 3], [2, 4]),
                   _node("LSTM", 3_000, ts + 2, [5, 1, 3], [5, 1, 1, 2]),
                   _node("Softmax", 1_000 + 1_000 * i, ts + 3, [2, 4], [2, 4])]
    s = P.summarize_ort(events, skip_runs=1)
    assert s["runs"] == 2 and s["run_ms"] == pytest.approx(10.0)
    assert s["gemm_ms"] == pytest.approx(7.0) and s["non_gemm_share"] == pytest.approx(0.3)
    assert s["int8_gemm_macs"] == 2 * 4 * 3 and s["fp32_gemm_macs"] == 5 * 1 * 1 * 4 * 2 * (3 + 2)
    assert [o["op"] for o in s["top_ops"]] == ["DynamicQuantizeMatMul", "LSTM", "Softmax"]
    assert s["top_ops"][2]["ms"] == pytest.approx(1.5) and s["top_ops"][0]["share"] == pytest.approx(0.4)
    assert P.fmt_top(s, 2) == "DynamicQuantizeMatMul 40%, LSTM 30%"
    assert P.summarize_ort([], 1) == {"tool": "onnxruntime profiler", "runs": 0}


def test_summarize_torch_counts_gemm_self_time():
    class E:
        def __init__(self, key, us):
            self.key, self.self_cpu_time_total = key, us

    s = P.summarize_torch([E("aten::addmm", 6_000), E("aten::quantized_lstm", 2_000), E("aten::softmax", 4_000)],
                          runs=2, run_ms=8.0)
    assert s["gemm_ms"] == pytest.approx(4.0) and s["non_gemm_share"] == pytest.approx(0.5)
    assert s["top_ops"][0] == {"op": "aten::addmm", "ms": 3.0, "share": 0.375}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notice
def test_a_real_onnxruntime_profile_counts_the_macs_of_its_matmuls(tmp_path):
    """Two Linears (16 -> 32 -> 8) on a batch of 5, exported and profiled: 5*16*32 + 5*32*8 MACs, all fp32; after
    ONNX Runtime's dynamic quantisation of the MatMuls, the same MACs counted as int8."""
    ort = pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from harness.compression.compress import session_options

    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False)).eval()
    x = torch.randn(5, 3, 16)  # 3-D: exported as MatMul, not Gemm
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"], opset_version=17)
    quantize_dynamic(tmp_path / "m.onnx", tmp_path / "q.onnx", op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)
    want = 5 * 3 * 16 * 32 + 5 * 3 * 32 * 8
    for name, kind in (("m.onnx", "fp32_gemm_macs"), ("q.onnx", "int8_gemm_macs")):
        s = ort.InferenceSession(str(tmp_path / name), session_options(ort, 1, str(tmp_path / "p")),
                                 providers=["CPUExecutionProvider"])
        for _ in range(3):
            s.run(None, {"x": x.numpy()})
        summary = P.summarize_ort(json.loads(Path(s.end_profiling()).read_text()), skip_runs=1)
        assert summary["runs"] == 2 and summary[kind] == want, summary
        assert 0 <= summary["non_gemm_share"] <= 1
