"""Inference costs of trained configurations, measured once per (model configuration, device),
serially, after training.

Latency and inference memory belong to a model configuration and a device, not to a training
run: timed inside a run they measure whatever else the machine was doing (a ``--jobs 2`` grid
once showed 302 ms for dualvgr and 3.5 ms for the same architecture in another run). So runs
record no latency; after a grid's (or ``ablate.py run``'s) training, :func:`measure_missing`
times each distinct configuration of the runs once, alone, with warm-up and repetitions, and
stores the figures under ``results/costs/``, keyed by the configuration and the device.
:func:`attach` puts them into the records a report reads, with when and where they were measured
and their spread (p90 / median): a spread above :data:`SPREAD_FLAG` suggests interference.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

import variants

from harness.env import device_name, load_average, resolve_device
from harness.runs.store import ResultsStore
from harness.files import atomic_write_json, locked

#: p90 / median above this: the timing was disturbed (other work on the machine); reports flag it (:func:`busy`)
SPREAD_FLAG = 1.5
#: timed forwards per configuration (after warm-up), by device type
REPS = {"cuda": 200, "cpu": 50}


def cost_key(model_cfg: dict, arch: str, dev_name: str, threads: int | None = None) -> str:
    """The configuration's architecture and model settings (what inference cost depends on), the
    device and the threads used (``threads``: this process's torch threads when None): the same
    model timed 1.4 ms on one thread and 5.9-12.6 ms on two contended ones."""
    threads = torch.get_num_threads() if threads is None else threads
    blob = json.dumps({"arch": arch, "model": model_cfg, "device": dev_name}, sort_keys=True, default=str)
    return f"{arch}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}-t{threads}"


def _path(store: ResultsStore, key: str) -> Path:
    return store.root / "costs" / f"{key}.json"


def read(store: ResultsStore, record: dict) -> dict | None:
    """The stored inference cost of a record's configuration on the record's device, measured with
    this process's threads, or None."""
    cfg = record.get("variant_config") or {}
    key = cost_key(cfg.get("model", {}), cfg.get("arch", ""), record.get("device_name", ""))
    try:
        return json.loads(_path(store, key).read_text())
    except (OSError, ValueError):
        return None


def measure_one(model_cfg: dict, arch: str, device: torch.device) -> dict:
    """Batch-1 eval latency (median, p90, p99) and, on CUDA, peak inference memory of one
    configuration with random weights (costs do not depend on the weights)."""
    from harness.measurement import measure

    cfg = variants.VariantConfig(name=arch, arch=arch, description="", model=dict(model_cfg))
    torch.manual_seed(0)
    model = variants.build(cfg).to(device).eval()
    inputs = measure.random_inputs(cfg.model, 1, device)
    lat = measure.latency(model, inputs, reps=REPS.get(device.type, 50))

    def infer():
        with torch.no_grad():
            model(*inputs)

    mem, kind = measure.peak_memory_mib(infer, device)
    return {"latency_ms_median": lat["latency_ms_median"], "latency_ms_p90": lat["latency_ms_p90"],
            "latency_ms_p99": lat["latency_ms_p99"], "reps": lat["reps"], "warmup": lat["warmup"],
            "spread": lat["latency_ms_p90"] / lat["latency_ms_median"] if lat["latency_ms_median"] else None,
            "peak_mem_mib_infer": mem if device.type == "cuda" else None, "peak_mem_kind": kind,
            "latency_batch_size": 1}


def measure_missing(store: ResultsStore, run_ids: list[str], device: str | torch.device = "auto",
                    say=lambda msg: None, force: bool = False) -> int:
    """Measure, one at a time, every configuration among ``run_ids``' complete records that has
    no stored cost on this device yet (records trained on another device are left to that
    device). Returns how many were measured."""
    dev = resolve_device(device)
    name = device_name(dev)
    todo: dict[str, tuple[dict, str, list[str]]] = {}  # key -> model settings, arch, the variants that share it
    for rid in run_ids:
        if not store.is_complete(rid):
            continue
        r = store.read_record(rid)
        if r.get("device_name") != name:
            continue
        cfg = r["variant_config"]
        key = cost_key(cfg["model"], cfg["arch"], name)
        if force or not _path(store, key).exists():
            names = todo.setdefault(key, (cfg["model"], cfg["arch"], []))[2]
            names += [] if r["variant"] in names else [r["variant"]]
    measured = 0
    for i, (key, (model_cfg, arch, variant_names)) in enumerate(todo.items()):
        # one measurement at a time among the processes sharing the store (two `ablate.py run` of one
        # config finish together: they must not time latency at once); one that waited finds it done
        with locked(_path(store, key).parent / ".measuring.lock"):
            if not force and _path(store, key).exists():
                continue
            say(f"measuring inference cost {i + 1}/{len(todo)} of {', '.join(variant_names)} on {name} (cost entry "
                f"{key}, shared by the runs of the same model settings and threads)")
            load_before = load_average()
            rec = measure_one(model_cfg, arch, dev)
            # other work on the machine while timing: the 1-minute load average before and after
            rec.update(threads=torch.get_num_threads(), load_average=[load_before, load_average()])
            rec.update({"key": key, "arch": arch, "model": model_cfg, "device": str(dev), "device_name": name,
                        "host": platform.node(), "torch_version": torch.__version__,
                        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            atomic_write_json(_path(store, key), rec)
            measured += 1
    return measured


def busy(c: dict) -> str | None:
    """Why a stored measurement says the machine was busy while it timed, or None: its p90 / median
    above :data:`SPREAD_FLAG` (the timing was disturbed), or, on a CPU, the 1-minute load average when
    it began above the CPU's cores (more runnable tasks than cores: every forward waited its turn,
    steadily, which the spread does not show)."""
    spread, load = c.get("spread"), (c.get("load_average") or [None])[0]
    cores = re.search(r"\b(\d+) cores\)$", str(c.get("device_name") or "")) if str(c.get("device", "")).startswith(
        "cpu") else None
    why = []
    if isinstance(spread, (int, float)) and spread > SPREAD_FLAG:
        why.append(f"p90/median {spread:.2f}")
    if cores and isinstance(load, (int, float)) and load > int(cores.group(1)):
        why.append(f"load average {load:.2f} on {cores.group(1)} cores")
    return ", ".join(why) or None


def attach(store: ResultsStore, records: list[dict]) -> list[dict]:
    """Copies of ``records`` whose ``cost`` carries the serially measured latency and inference
    memory of their configuration (``cost.measured``: when, where, spread, flagged), or None where
    none was measured: a latency timed during training is never shown."""
    out = []
    for r in records:
        r = dict(r)
        cost = dict(r.get("cost") or {})
        c = read(store, r)
        for k in ("latency_ms_median", "latency_ms_p90", "peak_mem_mib_infer"):
            cost[k] = c.get(k) if c else None
        cost["measured"] = None if c is None else {
            "at": c["measured_at"], "device_name": c["device_name"], "host": c["host"], "spread": c["spread"],
            "disturbed": busy(c) is not None, "busy": busy(c), "reps": c["reps"],
            "threads": c.get("threads"), "load_average": c.get("load_average")}
        r["cost"] = cost
        out.append(r)
    return out


def run_cost(model: torch.nn.Module, cfg: variants.VariantConfig, dev: torch.device,
             train_samples_per_s: float | None, peak_train_mib: dict | None) -> dict:
    """What a training run can say of its variant's cost: FLOPs per sample (fvcore, LSTMs
    included; counted, so load does not change them), the measured training throughput and peak
    training memory (CUDA only; None elsewhere, never invented). Latency and inference memory are
    not timed here, under whatever else runs: :mod:`harness.measurement.costs` measures them once per
    configuration and device, serially, after training."""
    from harness.measurement import measure

    peak = peak_train_mib or {}
    out = {"macs_per_sample": None, "flops_per_sample": None, "peak_mem_mib_train": peak.get("total"),
           "peak_mem_mib_train_step": peak.get("step"), "resident_mib_train": peak.get("resident"),
           "train_samples_per_s": train_samples_per_s, "device": str(dev), "errors": {}}
    try:
        fl = measure.count_flops(model, measure.random_inputs(cfg.model, 2, dev))
        out.update(macs_per_sample=int(fl["macs_per_sample"]), flops_per_sample=int(fl["flops_per_sample"]),
                   unsupported_ops=fl["unsupported_ops"])
    except Exception as e:  # a cost that cannot be measured is recorded as missing
        out["errors"]["flops"] = f"{type(e).__name__}: {e}"
    return out
