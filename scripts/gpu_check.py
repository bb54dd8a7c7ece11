#!/usr/bin/env python3
"""Everything the harness's CUDA paths need proved on a GPU, in one call, with one exit code.

    python scripts/gpu_check.py --out results/gpu-check            # on a GPU: msvd sizes (DEVICE=cuda)
    DEVICE=cpu python scripts/gpu_check.py --out /tmp/dry           # the CPU dry run at tiny sizes (a test runs it)

``scripts/gpu-perf.sh`` wraps it (installs the carried wheels of ``.whl/`` first). Parts, each
recorded as passed, failed (with the error) or skipped (with why), none stopping the others:

1. ``environment``: nvidia-smi, torch / CUDA / cuDNN versions, the TF32 flags, clocks;
2. ``cuda_tests``: the test suite's tests marked ``cuda`` (pytest ``-m cuda``);
3. ``lstm_dtype``: what an ``nn.LSTM`` returns under autocast in each precision, plainly and through
   ``variants.dualvgr.run_lstm`` (cuDNN's autocast wrapper casts RNNs to fp16 even under bf16);
4. ``no_host_sync``: one training step of dualvgr, sparse-node and student-logits (teacher outputs
   given, as the cache gives them) under ``torch.cuda.set_sync_debug_mode("error")``;
5. ``bench``: dualvgr and teacher-g4 per precision (and the CUDA-graph inference path), written as
   ``bench.json`` and ``bench.md`` from the same records;
6. ``runs``: real runs of 2 epochs (the second epoch's figures reported): dualvgr, student-logits
   (its teacher and teacher-output cache included), a run stopped after one epoch and resumed
   (compared with the uninterrupted one), sparse-node, and a ``--jobs 2`` grid on one device;
7. ``table``: training samples/s, epoch time, eval latency b1/b256 (median, p90) and step peak
   memory beside the reference code's figures (``docs/reference.md``, copied below).

Writes ``gpu_check.json`` (every part) and ``gpu_check.md`` (the table and each part's status) to
``--out``; exits 1 when a part failed. Nothing here is estimated: a figure not measured is "-".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

#: sizes of the check per device: msvd on a GPU (the reference's MSVD-QA setting), tiny on the CPU
SIZES = {
    "cuda": {"config": "msvd", "data": "synthetic:msvd", "batches": [1, 256], "train_batch": 256, "reps": 50,
             "warmup": None, "train_reps": 10, "precisions": ["fp32", "tf32", "bf16", "fp16"],
             "graph_precisions": ["fp32", "bf16"]},
    # the dry run: the tiny model on a micro data set (tiny's dims, 256 training questions), one thread
    "cpu": {"config": "tiny", "data": "micro", "batches": [1, 4], "train_batch": 64, "reps": 2, "warmup": 1,
            "train_reps": 1, "precisions": ["fp32", "bf16"], "graph_precisions": [], "threads": 1},
}
#: the dry run's data set: the tiny preset's dims and vocabularies, a tenth of its questions
MICRO = {"name": "micro", "n_videos": 60, "n_train": 256, "n_val": 64, "n_test": 64}
#: the reference DualVGR code on one H100 80GB (docs/reference.md, "Speed of the reference
#: DualVGR code"; docs/performance.md quotes the same): 1 graph layer (dualvgr) and 4 (teacher-g4)
REFERENCE = {
    "dualvgr": {"train_samples_per_s_b256": 1362, "epoch_s": 35.0, "latency_ms_b1": 14.2, "latency_ms_b256": 28.4,
                "peak_mem_mib_train_b256": 3.9 * 1024},
    "teacher-g4": {"train_samples_per_s_b256": 410, "latency_ms_b1": 30.6, "latency_ms_b256": 79.3},
}
EPOCHS = 2


class Parts:
    """Each part's outcome: ``ok`` True / False / None (skipped), seconds, error, result."""

    def __init__(self):
        self.parts: dict[str, dict] = {}

    def run(self, name: str, fn, *args):
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = fn(*args)
            entry = {"ok": True, "result": result}
            if isinstance(result, dict) and result.get("skipped"):
                entry["ok"] = None
            elif isinstance(result, dict) and result.get("failed"):
                entry = {"ok": False, "result": result, "error": result["failed"]}
        except Exception as e:  # every part is recorded, the others go on
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(entry["traceback"], file=sys.stderr, flush=True)
        entry["seconds"] = round(time.perf_counter() - t, 2)
        self.parts[name] = entry
        print(f"   {name}: {'passed' if entry['ok'] else 'skipped' if entry['ok'] is None else 'FAILED'} "
              f"({entry['seconds']} s){': ' + entry['error'] if entry.get('error') else ''}", flush=True)
        return entry.get("result")

    @property
    def failed(self) -> list[str]:
        return [n for n, e in self.parts.items() if e["ok"] is False]


def _sh(cmd: list[str], timeout: int = 60) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]}: {e}"


def environment(dev: torch.device) -> dict:
    from harness.env import apply_math_flags, cuda_facts, device_name, environment as env_facts

    apply_math_flags(dev, "fp32")
    out = {"python": platform.python_version(), "device": device_name(dev), **env_facts(dev), **cuda_facts(dev)}
    if dev.type == "cuda":
        out["nvidia_smi"] = _sh(["nvidia-smi"])
        out["clocks"] = _sh(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
                             "power.draw,temperature.gpu,persistence_mode", "--format=csv"])
        out["capability"] = list(torch.cuda.get_device_capability(dev))
    print(json.dumps({k: v for k, v in out.items() if k != "nvidia_smi"}, default=str), flush=True)
    if out.get("nvidia_smi"):
        print(out["nvidia_smi"], flush=True)
    return out


def cuda_tests(dev: torch.device) -> dict:
    files = ["tests/measurement/test_gpu_paths.py", "tests/measurement/test_measure.py",
             "tests/variants/test_kd_losses.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    out = {"returncode": r.returncode, "tail": tail}
    if r.returncode not in (0, 5):  # 5: nothing collected
        out["failed"] = f"pytest -m cuda exited {r.returncode}: {tail[-1] if tail else ''}"
    return out


def lstm_dtype(dev: torch.device) -> dict:
    from harness.env import PRECISIONS, autocast, lstm_precision, precision_problem
    from variants.dualvgr import run_lstm

    lstm = torch.nn.LSTM(16, 16, batch_first=True).to(dev)
    x = torch.randn(2, 5, 16, device=dev)
    want = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out, bad = {}, []
    for p in PRECISIONS:
        if precision_problem(dev, p):
            out[p] = {"skipped": precision_problem(dev, p)}
            continue
        with torch.no_grad(), autocast(dev, p):
            plain, ours = lstm(x)[0].dtype, run_lstm(lstm, x)[0].dtype
        named = lstm_precision(dev, p)
        expected = torch.float32 if named in ("fp32", "tf32") else want[named]
        out[p] = {"nn_lstm": str(plain), "run_lstm": str(ours), "lstm_precision": named}
        if ours != expected:
            bad.append(f"{p}: run_lstm gave {ours}, lstm_precision says {named}")
    print(json.dumps(out), flush=True)
    return {**out, **({"failed": "; ".join(bad)} if bad else {})}


def no_host_sync(dev: torch.device, size: dict) -> dict:
    if dev.type != "cuda":
        return {"skipped": "torch.cuda.set_sync_debug_mode needs CUDA"}
    import variants
    from harness.measurement.measure import build_teachers, random_answers, random_inputs
    from harness.model.step import build_step
    from harness.data.synthetic import PRESETS

    out = {}
    for name in ("dualvgr", "sparse-node", "student-logits"):
        cfg = variants.get_config(name, **PRESETS[size["config"]].model_config())
        model = variants.build(cfg).to(dev)
        teachers = build_teachers(cfg, dev)
        step = build_step(cfg, model, teachers)
        inputs, answers = random_inputs(cfg.model, 32, dev), random_answers(cfg.model, 32, dev)
        with torch.no_grad():
            t_outs = [t(*inputs) for t in teachers] if teachers else None
        step(*inputs, answers, teacher_outputs=t_outs)
        torch.cuda.synchronize(dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(*inputs, answers, teacher_outputs=t_outs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(dev)
        out[name] = "no host sync in the step"
        del model, teachers, step
    return out


def bench(dev: torch.device, size: dict, out_dir: Path) -> dict:
    import bench as B
    import variants
    from harness.env import precision_problem
    from harness.measurement.measure import measure_variant
    from harness.data.synthetic import PRESETS
    from harness.files import atomic_write_json

    rows, skipped = [], {}
    plans = [(p, False) for p in size["precisions"]] + [(p, True) for p in size["graph_precisions"]]
    for precision, graph in plans:
        problem = precision_problem(dev, precision)
        if problem:  # a precision this machine cannot run (bf16 LSTMs on an AVX2 CPU): skipped with the reason
            skipped[precision] = problem
            print(f"   {precision}: skipped: {problem}", flush=True)
            continue
        for name in ("dualvgr", "teacher-g4"):
            cfg = variants.get_config(name, **PRESETS[size["config"]].model_config())
            print(f"   {name} {precision}{' cuda-graph' if graph else ''}", flush=True)
            recs = measure_variant(cfg, size["batches"], dev, precision=precision, reps=size["reps"],
                                   warmup=size["warmup"],
                                   train=not graph, train_reps=size["train_reps"],
                                   flops=precision == "fp32" and not graph,
                                   teacher_settings=dict(PRESETS[size["config"]].model_config()), cuda_graph=graph)
            rows += [{**r, "config": size["config"]} for r in recs]
            torch.cuda.empty_cache() if dev.type == "cuda" else None
    atomic_write_json(out_dir / "bench.json", rows)
    cols = ["variant", "precision", "infer_path", "lstm_precision", *B.TABLE_COLUMNS[1:], "resident_mib_train"]
    md = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    md += ["| " + " | ".join(B.fmt_cell(r.get(c)) for c in cols) + " |" for r in rows]
    (out_dir / "bench.md").write_text("\n".join(md) + "\n")
    errors = {f"{r['variant']} {r['precision']} {r['infer_path']} b{r['batch_size']}": r["errors"]
              for r in rows if r.get("errors")}
    unexpected = {k: v for k, v in errors.items() if not (k.endswith(" b1") and set(v) == {"train"})}
    return {"rows": len(rows), "errors": errors, "skipped_precisions": skipped,
            **({"failed": f"not measured: {unexpected}"} if unexpected else {})}


def _spec(variant: str, size: dict, seed: int = 0):
    from harness.training.plan import RunSpec

    return RunSpec(variant=variant, data=size["data"], seed=seed, epochs=EPOCHS, batch_size=size["train_batch"])


def _second_epoch(rec: dict) -> dict:
    h = rec["history"][-1]
    return {"run_id": rec["run_id"], "variant": rec["variant"], "epoch": h["epoch"] + 1,
            "train_samples_per_s": h["train_samples_per_s"], "epoch_train_s": h["train_time_s"],
            "val_acc": h["val_acc"], "test_acc": rec["metrics"]["test"]["overall"],
            "peak_mem_mib_train": rec["cost"].get("peak_mem_mib_train"),
            "peak_mem_mib_train_step": rec["cost"].get("peak_mem_mib_train_step"),
            "resident_mib_train": rec["cost"].get("resident_mib_train"), "lstm_precision": rec.get("lstm_precision"),
            "runs_sharing_device": rec.get("runs_sharing_device"), "wall_time_s": rec["wall_time_s"]}


def runs(dev: torch.device, size: dict, out_dir: Path) -> dict:
    from harness.data import dataset as D
    from harness.training.plan import RunPruned
    from harness.training.runner import train
    from harness.runs.store import ResultsStore

    data = D.load(size["data"])
    store = ResultsStore(out_dir / "runs")
    quiet = dict(device=dev, progress=False, force=True)
    out = {name: _second_epoch(train(_spec(name, size), store, data=data, **quiet))
           for name in ("dualvgr", "student-logits", "sparse-node")}
    # stopped after one epoch, resumed, against the same run uninterrupted (dualvgr above)
    resumed_store = ResultsStore(out_dir / "runs-resumed")
    try:  # stopped after its first epoch
        train(_spec("dualvgr", size), resumed_store, data=data, device=dev, progress=False,
              on_epoch=lambda epoch, acc: True)
        stopped = "complete"
    except RunPruned:
        stopped = "stopped"
    resumed = train(_spec("dualvgr", size), resumed_store, data=data, device=dev, progress=False)
    full = store.read_record(resumed["run_id"])
    same = [a["loss"] == b["loss"] and a["val_acc"] == b["val_acc"]
            for a, b in zip(full["history"], resumed["history"])]
    out["resume"] = {"stopped": stopped, "status": resumed["status"], "epochs": resumed["epochs_run"],
                     "equal_per_epoch": same, "test_acc": [full["metrics"]["test"]["overall"],
                                                           resumed["metrics"]["test"]["overall"]],
                     "deterministic_algorithms": resumed["environment"]["deterministic_algorithms"]}
    if resumed["status"] != "complete" or stopped != "stopped":
        out["failed"] = f"resume: {stopped} then {resumed['status']}"
    out["jobs2"] = _jobs2_grid(dev, size, out_dir)
    if out["jobs2"].get("failed"):
        out["failed"] = out["jobs2"]["failed"]
    return out


def _jobs2_grid(dev: torch.device, size: dict, out_dir: Path) -> dict:
    from harness.execution import grid as G
    from harness.execution.grid import run_grid
    from harness.runs.store import ResultsStore

    path = out_dir / "jobs2.toml"
    path.write_text(f'data = "{size["data"]}"\nseeds = [0, 1]\nvariants = ["dualvgr"]\n[train]\n'
                    f'epochs = {EPOCHS}\nbatch_size = {size["train_batch"]}\n')
    store = ResultsStore(out_dir / "runs-jobs2")
    res = run_grid(G.load(path), store, jobs=2, device="auto" if dev.type == "cuda" else "cpu")
    recs = [store.read_record(r) for r in res.run_ids if store.is_complete(r)]
    out = {"runs": [_second_epoch(r) for r in recs]}
    if len(recs) != 2 or any(r.get("runs_sharing_device") != 2 for r in recs):
        out["failed"] = (f"--jobs 2 grid: {len(recs)} runs complete, "
                         f"sharing {[r.get('runs_sharing_device') for r in recs]}")
    return out


def _micro_data(path: Path) -> Path:
    import dataclasses

    from harness.data.synthetic import PRESETS, generate

    if not (path / "synthetic_meta.json").exists() and not any(path.glob("*_meta.json")):
        generate(path, dataclasses.replace(PRESETS["tiny"], **MICRO), progress=False)
    return path


def _f(v, nd=1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def table(bench_rows: list[dict], run_out: dict | None, dev: torch.device) -> str:
    """One row per variant and precision: the figures beside the reference code's."""
    def pick(v, prec, bs, path="eager"):
        return next((r for r in bench_rows if r["variant"] == v and r["precision"] == prec and r["batch_size"] == bs
                     and r["infer_path"] == path), {})

    head = ("| variant | precision | inference path | train samples/s b256 (bench) | epoch 2 samples/s (run) | "
            "epoch 2 train s | latency b1 median / p90 ms | latency b256 median / p90 ms | step peak MiB "
            "(resident) | reference: samples/s, epoch s, b1 ms, b256 ms, peak MiB |")
    lines = [head, "|" + "---|" * 10]
    big = max(r["batch_size"] for r in bench_rows) if bench_rows else None
    for v in ("dualvgr", "teacher-g4"):
        ref = REFERENCE[v]
        for prec, path in sorted({(r["precision"], r["infer_path"]) for r in bench_rows if r["variant"] == v}):
            b1, bb = pick(v, prec, 1, path), pick(v, prec, big, path)
            tr = pick(v, prec, big) if path == "cuda-graph" else bb
            run = (run_out or {}).get(v) if prec == "fp32" and path == "eager" else None
            lines.append(f"| {v} | {prec} | {path} | {_f(tr.get('train_samples_per_s'), 0)} | "
                         f"{_f(run and run['train_samples_per_s'], 0)} | {_f(run and run['epoch_train_s'], 2)} | "
                         f"{_f(b1.get('latency_ms_median'), 2)} / {_f(b1.get('latency_ms_p90'), 2)} | "
                         f"{_f(bb.get('latency_ms_median'), 2)} / {_f(bb.get('latency_ms_p90'), 2)} | "
                         f"{_f(tr.get('peak_mem_mib_train_step'), 0)} ({_f(tr.get('resident_mib_train'), 0)}) | "
                         f"{ref.get('train_samples_per_s_b256', '-')}, {ref.get('epoch_s', '-')}, "
                         f"{ref.get('latency_ms_b1', '-')}, {ref.get('latency_ms_b256', '-')}, "
                         f"{_f(ref.get('peak_mem_mib_train_b256'), 0)} |")
    note = (f"\nbatch {big} stands for b256 on this device ({dev}); reference figures: the reference DualVGR code on "
            f"one H100 80GB (docs/reference.md). Runs: {EPOCHS} epochs, the second epoch's figures.")
    return "\n".join(lines) + note + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="Output directory [default: results/gpu-check-<UTC time>].")
    ap.add_argument("--device", default=os.environ.get("DEVICE", "cuda"), help="cuda, cuda:N or cpu [env DEVICE].")
    ap.add_argument("--size", default=None, choices=sorted(SIZES), help="Sizes: cuda (msvd) or cpu (tiny) "
                    "[default: the device's].")
    ap.add_argument("--skip", action="append", default=[], help="Skip a part (repeatable).")
    a = ap.parse_args()
    from harness.env import resolve_device
    from harness.errors import HarnessError

    try:
        dev = resolve_device(a.device)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = dict(SIZES[a.size or dev.type])
    out_dir = Path(a.out or ROOT / "results" / time.strftime("gpu-check-%Y%m%dT%H%M%SZ", time.gmtime()))
    out_dir.mkdir(parents=True, exist_ok=True)
    if size.get("threads"):
        torch.set_num_threads(size["threads"])
    if size["data"] == "micro":
        size["data"] = str(_micro_data(out_dir / "data-micro"))
    p, t0 = Parts(), time.perf_counter()
    steps = [("environment", environment, dev), ("cuda_tests", cuda_tests, dev), ("lstm_dtype", lstm_dtype, dev),
             ("no_host_sync", no_host_sync, dev, size), ("bench", bench, dev, size, out_dir),
             ("runs", runs, dev, size, out_dir)]
    for name, fn, *args in steps:
        if name in a.skip:
            p.parts[name] = {"ok": None, "result": {"skipped": "--skip"}, "seconds": 0}
            continue
        p.run(name, fn, *args)
    bench_rows = json.loads((out_dir / "bench.json").read_text()) if (out_dir / "bench.json").exists() else []
    md_table = table(bench_rows, (p.parts.get("runs") or {}).get("result"), dev)
    status = "\n".join(f"- {n}: {'passed' if e['ok'] else 'skipped' if e['ok'] is None else 'FAILED'} "
                       f"({e['seconds']} s){': ' + e['error'] if e.get('error') else ''}" for n, e in p.parts.items())
    total = round(time.perf_counter() - t0, 1)
    md = f"# GPU check on {dev} ({size['config']} sizes), {total} s\n\n{md_table}\n## Parts\n\n{status}\n"
    from harness.files import atomic_write_json

    atomic_write_json(out_dir / "gpu_check.json", {"device": str(dev), "size": size, "seconds": total,
                                                   "failed": p.failed, "parts": p.parts, "table": md_table})
    (out_dir / "gpu_check.md").write_text(md)
    print(md, flush=True)
    print(f"written: {out_dir}/gpu_check.json, gpu_check.md, bench.json, bench.md", flush=True)
    return 1 if p.failed else 0


if __name__ == "__main__":
    sys.exit(main())
