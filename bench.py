"""Measure the cost of variants: parameters, MACs/FLOPs, latency, inference and training
throughput, peak memory (and, with --data, the data layer's throughput), per batch size.

    python bench.py --variant dualvgr --config msvd --device cpu --batch-size 1 --format json
    python bench.py --variant 'teacher-*' --variant dualvgr --batch-size 1,32,256 --format markdown
    python bench.py --variant 'student-*' --device cuda --precision bf16 --compile --out bench.json
    python bench.py --variant dualvgr --config msvd --device cpu --compress dynamic-int8 --compress onnx

Every invocation also writes results/bench/<timestamp>-<variant>.json (one file per variant,
a list of records; --results DIR to put them elsewhere, --no-store to skip). Field meanings,
timing and memory conventions: docs/benchmarks.md.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import variants
from harness.console import error, make_console, plural, say
from harness.data.sizes import SIZES
from harness.files import atomic_write_json

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
console = make_console()
err = make_console(stderr=True)

#: model sizes (harness.data.sizes; msvd = the reference's MSVD-QA setting), which the synthetic presets share
CONFIGS = {name: size.model_config() for name, size in SIZES.items()}

#: fields every record has (null where a field cannot be measured on the device)
REQUIRED_FIELDS = ("variant", "config", "device", "gpu_name", "torch_version", "batch_size", "precision",
                   "params_total", "params_trainable", "macs_per_sample", "flops_per_sample", "unsupported_ops",
                   "latency_ms_median", "latency_ms_p90", "latency_ms_p99", "infer_samples_per_s",
                   "train_samples_per_s", "peak_mem_mib_infer", "peak_mem_mib_train", "peak_mem_mib_train_step",
                   "resident_mib_train", "peak_mem_step_kind", "infer_path", "lstm_precision", "tf32_matmul",
                   "tf32_cudnn", "cuda_version", "cudnn_version", "runs_sharing_device")

TABLE_COLUMNS = ("variant", "batch_size", "params_total", "macs_per_sample", "latency_ms_median", "latency_ms_p90",
                 "infer_samples_per_s", "train_samples_per_s", "peak_mem_mib_infer", "peak_mem_mib_train",
                 "peak_mem_mib_train_step")


@app.command()
def main(
    variant: list[str] = typer.Option(["dualvgr"], help="Variant name or shell wildcard ('teacher-*'); repeatable."),
    config: str = typer.Option("msvd", help=f"Model size preset: {', '.join(CONFIGS)}."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Variant setting key=value, any variant's "
                                             "(module_dim=256, keep_ratio=0.5, logits.T=2), repeatable."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N [default: cuda when available]."),
    batch_size: str = typer.Option("1,32", help="Comma-separated batch sizes."),
    precision: str = typer.Option("fp32", help="fp32 (strict: no TF32 on CUDA), tf32 (CUDA), bf16 or fp16 (autocast)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model (compiled during warm-up)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="Latency from the eval forward captured once per "
                                                               "batch size in a CUDA graph and replayed (CUDA only)."),
    reps: int = typer.Option(50, min=1, help="Timed eval forwards per batch size."),
    warmup: Optional[int] = typer.Option(None, min=0,
                                         help="Warm-up runs before timing [default: 10 on CUDA, 3 on CPU]."),
    train_reps: Optional[int] = typer.Option(None, min=1,
                                             help="Timed training steps per batch size [default: max(5, reps/5)]."),
    no_train: bool = typer.Option(False, "--no-train", help="Skip the training-step measurements."),
    no_flops: bool = typer.Option(False, "--no-flops", help="Skip FLOP counting."),
    question_len: int = typer.Option(12, min=1, help="Padded question length of the random inputs."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (torch.set_num_threads) "
                                                     "[default: torch's]. On a CPU shared with other work, use 1."),
    data: Optional[str] = typer.Option(None, help="Also measure the data layer on this data set "
                                                  "(e.g. synthetic:tiny): memory and streaming samples/s."),
    fmt: str = typer.Option("table", "--format", help="table, json or markdown."),
    out: Optional[str] = typer.Option(None, help="Also write the JSON records to this file."),
    results: str = typer.Option("results", help="Results directory; records go to <results>/bench/."),
    no_store: bool = typer.Option(False, "--no-store", help="Do not write records under <results>/bench/."),
    compress: Optional[list[str]] = typer.Option(None, "--compress", help="Instead of the measurements above: CPU "
                                                 "latency of fp32 eager and of each compressed path named "
                                                 "(dynamic-int8, onnx, ort-dynamic-int8, ort-static-int8; "
                                                 "repeatable), each beside its bound from the GEMM rates and copy "
                                                 "bandwidth measured in the same run and the share of its time "
                                                 "outside the GEMMs (harness.compression.compress; --device cpu; "
                                                 "docs/compression.md)."),
    compress_reps: int = typer.Option(15, min=1, help="With --compress: timed forwards per path and batch size, in "
                                                      "3 rounds that time the paths in turn."),
):
    """Cost of each variant and batch size."""
    import torch

    from ablate import parse_sets

    names, sizes, dev = _check_options(variant, config, fmt, precision, batch_size, device, threads)
    if compress:
        return _compress_main(names, config, parse_sets(set_), sizes, dev, compress, compress_reps, warmup, threads,
                              fmt, out, None if no_store else results)
    if cuda_graph and (dev.type != "cuda" or compile_):
        raise typer.BadParameter("--cuda-graph needs a CUDA device (--device cuda) and no --compile: a graph replays "
                                 f"captured CUDA kernels (device here: {dev})", param_hint="--cuda-graph")
    sets = parse_sets(set_)
    if threads is not None:
        torch.set_num_threads(threads)
    _warn_if_loaded(dev)
    for name in names:  # every variant's settings checked before anything is measured
        _config(name, config, sets)
    data_rec = _data_layer(data, sizes, dev) if data else {}
    records = []
    for name in names:
        recs = _measure_alone(name, config, sets, sizes, dev, precision=precision, compile=compile_, reps=reps,
                              warmup=warmup, train=not no_train, train_reps=train_reps, flops=not no_flops,
                              question_len=question_len, cuda_graph=cuda_graph)
        for r in recs:
            r.update(data_rec.get(r["batch_size"], {}))
        records.extend(recs)
        if not no_store:
            path = Path(results) / "bench" / f"{recs[0]['measured_at']}-{name}.json"
            atomic_write_json(path, recs)
            say(err, f"wrote {path}")
    if out:
        atomic_write_json(out, records)
    _print(records, fmt, config, precision, compile_, with_data=bool(data))


def _compress_main(names: list[str], config: str, sets: dict, sizes: list[int], dev, methods: list[str], reps: int,
                   warmup: int | None, threads: int | None, fmt: str, out: str | None, results: str | None) -> None:
    """``--compress``: fp32 eager and each compressed path of each variant, latency beside its bound."""
    import torch

    from harness.compression.compress import CompressError, check_methods

    if dev.type != "cpu":
        raise typer.BadParameter(f"--compress measures CPU paths (int8 kernels, ONNX Runtime's CPU provider): use "
                                 f"--device cpu, not {dev}", param_hint="--device")
    try:
        methods = list(check_methods(methods, "--compress"))
    except CompressError as e:
        raise typer.BadParameter(str(e), param_hint="--compress") from None
    if threads is not None:
        torch.set_num_threads(threads)
    _warn_if_loaded(dev)
    records = []
    for name in names:
        try:
            recs = _compress_rows(_config(name, config, sets), config, sizes, methods, reps, warmup)
        except CompressError as e:  # a model that cannot be exported, onnxruntime missing: one line
            error(err, str(e))
            raise typer.Exit(1) from None
        records.extend(recs)
        if results:
            path = Path(results) / "bench" / f"{recs[0]['measured_at']}-{name}-compress.json"
            atomic_write_json(path, recs)
            say(err, f"wrote {path}")
    if out:
        atomic_write_json(out, records)
    _print_compress(records, fmt)


def _compress_rows(cfg, config: str, sizes: list[int], methods: list[str], reps: int, warmup: int | None) -> list[dict]:
    """One record per (path, batch size): latency (median, p90), bound, speed-up against fp32 eager."""
    import tempfile

    import torch

    from harness.compression import compress as C
    from harness.env import device_name, git_commit, load_average

    torch.manual_seed(0)
    model = variants.build(cfg).eval()
    say(err, f"{cfg.name}: counting MACs, measuring the GEMM rates and the copy bandwidth")
    macs, rates = C.quantized_macs(model, cfg.model), C.ort_rates(C.machine_rates())
    fp32_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    paths = {"fp32 eager": (model, fp32_bytes, None)}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = {"variant": cfg.name, "config": config, "device_name": device_name("cpu"),
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "macs_per_sample": macs[0], "macs_int8_per_sample": macs[1], **rates,
            "git_commit": git_commit(), "measured_at": stamp, "load_average_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            say(err, f"{cfg.name}: {m}")
            calibration = C.random_calibration(cfg.model) if C.METHODS[m].calibrated else None
            comp = C.METHODS[m].build(model, cfg, Path(tmp) / m, calibration)
            paths[m] = (comp.module, comp.size_bytes, m)
        rows = [row for bs in sizes for row in _compress_batch(cfg, model, paths, bs, macs, rates, base, reps, warmup)]
    for r in rows:
        fp32 = next(x for x in rows if x["batch_size"] == r["batch_size"] and x["path"] == "fp32 eager")
        r["speedup_vs_fp32"] = fp32["latency_ms_median"] / r["latency_ms_median"]
        r["x_bound"] = r["latency_ms_median"] / r["bound_ms"]
        r["load_average_after"] = load_average()
    return rows


def _compress_batch(cfg, model, paths: dict, bs: int, macs: tuple[int, int], rates: dict, base: dict, reps: int,
                    warmup: int | None) -> list[dict]:
    """The rows of one batch size: every path timed in turn on the same inputs, then profiled (where its time
    goes, and for ONNX Runtime the MACs it ran in int8), beside the bound of what it runs."""
    import torch

    from harness.compression import compress as C
    from harness.compression.profiles import fmt_top
    from harness.model.inputs import random_inputs

    inputs = random_inputs(cfg.model, bs, "cpu")
    say(err, f"{cfg.name} batch {bs}: {', '.join(paths)}, timed in turn, then profiled")
    lats = C.interleaved_latency({p: m for p, (m, _, _) in paths.items()}, inputs, reps, warmup=warmup)
    read = variants.task(variants.task_of(cfg)).predict
    rows = []
    with torch.no_grad():
        ref = read(model(*inputs)["logits"])
    for path, (module, wbytes, method) in paths.items():
        with torch.no_grad():
            agree = float((read(module(*inputs)["logits"]) == ref).float().mean())
        prof = C.path_profile(module, inputs)
        q = C.int8_macs(method, macs, prof, bs)
        kind = "int8" if q else "fp32"
        rows.append({**base, "path": path, "batch_size": bs, "weight_bytes": wbytes, "bound_path": kind,
                     "int8_macs_per_sample": q, **lats[path], **C.bound_ms(kind, bs, (macs[0], q), wbytes, rates),
                     "argmax_agrees_fp32": agree, "non_gemm_share": prof.get("non_gemm_share"),
                     "profile_tool": prof.get("tool"), "profile_top_ops": fmt_top(prof), "profile": prof})
    return rows


COMPRESS_COLUMNS = ("variant", "path", "batch_size", "latency_ms_median", "latency_ms_p90", "bound_ms", "compute_ms",
                    "memory_ms", "x_bound", "speedup_vs_fp32", "int8_macs_per_sample", "non_gemm_share",
                    "profile_top_ops", "weight_bytes", "argmax_agrees_fp32")


def _print_compress(records: list[dict], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(records, indent=1, default=str))
        return
    r0 = records[0]
    note = (f"{r0['config']} config, {r0['device_name']}, {plural(r0['threads'], 'thread')}, "
            f"torch {r0['torch_version']}; "
            f"{r0['macs_per_sample'] / 1e9:.3f} G MACs per sample, {r0['macs_int8_per_sample'] / 1e9:.3f} G of them in "
            f"nn.LSTM / nn.Linear (int8 under dynamic-int8; an ONNX Runtime path's int8 MACs counted from its "
            f"profile); non_gemm_share: the share of a forward outside the GEMM operators (matrix products and fused "
            f"LSTMs), from ONNX Runtime's profiler or torch.profiler; measured in this run: fp32 GEMM "
            f"{r0['fp32_gemm_flops'] / 1e9:.0f} GFLOP/s, int8 GEMM {r0['int8_gemm_flops'] / 1e9:.0f} GOP/s "
            f"({r0['gemm_n']}^3; int8: a dynamically quantised product, its input's quantisation included; each the "
            f"faster of torch and ONNX Runtime{_engines(r0)}), copy {r0['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + "
            f"written); bound = max(MACs at the path's GEMM rates, its weight bytes at the copy bandwidth); load "
            f"average {r0['load_average_before']}")
    _table(records, COMPRESS_COLUMNS, note, fmt, text_columns=("variant", "path"))


def _engines(r: dict) -> str:
    """Each engine's GEMM rates, where ONNX Runtime's were measured."""
    if "ort_int8_gemm_flops" not in r:
        return ", ONNX Runtime not installed"
    return (f": torch {r['torch_fp32_gemm_flops'] / 1e9:.0f} / {r['torch_int8_gemm_flops'] / 1e9:.0f}, ONNX Runtime "
            f"{r['ort_fp32_gemm_flops'] / 1e9:.0f} / {r['ort_int8_gemm_flops'] / 1e9:.0f}")


def _check_options(variant: list[str], config: str, fmt: str, precision: str, batch_size: str, device: str,
                   threads: int | None):
    """The variant names, batch sizes and device the options ask for; a bad option is named."""
    from harness.env import PRECISIONS, resolve_device
    from harness.errors import HarnessError

    if config not in CONFIGS:
        raise typer.BadParameter(f"unknown config {config!r} (known: {', '.join(CONFIGS)})", param_hint="--config")
    if fmt not in ("table", "json", "markdown"):
        raise typer.BadParameter(f"unknown format {fmt!r} (table, json or markdown)", param_hint="--format")
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})", param_hint="--precision")
    if threads is not None and threads < 1:
        raise typer.BadParameter(f"threads must be >= 1, got {threads}", param_hint="--threads")
    for pattern in variant:  # every pattern must match: a typo is an error, not a silent omission
        if not variants.list(pattern):
            raise typer.BadParameter(f"no variant matches {pattern!r} "
                                     f"(known: {', '.join(variants.list())})", param_hint="--variant")
    try:
        sizes = [int(b) for b in batch_size.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {batch_size!r}",
                                 param_hint="--batch-size") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"batch sizes must be >= 1, got {batch_size!r}", param_hint="--batch-size")
    try:
        dev = resolve_device(device)
    except HarnessError as e:
        raise typer.BadParameter(str(e), param_hint="--device") from None
    return variants.list(variant), sizes, dev


def _warn_if_loaded(dev) -> None:
    import torch

    if dev.type == "cpu" and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if load > 1.0:
            threads = torch.get_num_threads()
            more = f" (with {threads} threads, possibly far slower; --threads 1 helps)" if threads > 1 else ""
            say(err, f"CPU load average is {load:.1f} before measuring: other processes share the CPU, timings will be "
                     f"noisy{more}; see docs/benchmarks.md", "yellow")


def _data_layer(data: str, sizes: list[int], dev) -> dict[int, dict]:
    """Per batch size: the data layer's samples/s on ``data`` in memory and streaming."""
    from harness.data import dataset as D
    from harness.measurement.measure import data_throughput

    rec: dict[int, dict] = {}
    for mode in ("memory", "stream"):
        say(err, f"data layer: {data} ({mode})")
        loaded = D.load(data, mode=mode)
        for bs in sizes:
            r = data_throughput(loaded, bs, dev)
            rec.setdefault(bs, {})[f"data_samples_per_s_{mode}"] = r["data_samples_per_s"]
    for bs in rec:
        rec[bs]["data"] = data
    return rec


def _config(name: str, config: str, sets: dict):
    try:
        return variants.get_config(name, **{**CONFIGS[config], **sets})
    except variants.ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="--set") from None


def _measure_alone(name: str, config: str, sets: dict, sizes: list[int], dev, **options) -> list[dict]:
    """:func:`_measure` on CPU in a fresh process per variant: the CPU peak memory is the process's
    peak RSS, which after another variant would include what that one left allocated (the same
    architecture read 592 MiB measured first, about 770 MiB after another variant), so each
    variant gets a process of its own and rows compare. On CUDA the peak is reset exactly: in-process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    if dev.type != "cpu":
        return _measure(name, config, sets, sizes, dev, **options)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_in_child, torch.get_num_threads(), name, config, sets, sizes, str(dev),
                           options).result()


def _measure_in_child(threads: int, name: str, config: str, sets: dict, sizes: list[int], dev: str,
                      options: dict) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    recs = _measure(name, config, sets, sizes, torch.device(dev), **options)
    for r in recs:
        r.update(measured_in="a fresh process for this variant", pid=os.getpid())
    return recs


def _measure(name: str, config: str, sets: dict, sizes: list[int], dev, **options) -> list[dict]:
    """The records of one variant at the config's size, one per batch size."""
    from harness.env import git_commit
    from harness.measurement.measure import measure_variant

    cfg = _config(name, config, sets)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    recs = measure_variant(cfg, sizes, dev, teacher_settings=dict(CONFIGS[config]),
                           on_progress=lambda msg: say(err, msg), **options)
    commit = git_commit()
    for r in recs:
        r.update({"config": config, "sets": sets, "git_commit": commit, "measured_at": stamp})
        for e in r.get("errors", {}).values():
            say(err, f"{name} batch {r['batch_size']}: not measured: {e}", "yellow")
    return recs


def _print(records: list[dict], fmt: str, config: str, precision: str, compiled: bool, with_data: bool) -> None:
    if fmt == "json":
        print(json.dumps(records, indent=1, default=str))
        return
    cols = list(TABLE_COLUMNS) + (["data_samples_per_s_memory", "data_samples_per_s_stream"] if with_data else [])
    r0 = records[0]
    note = (f"{config} config, {r0['device_name']}, torch {r0['torch_version']}, {precision} (LSTMs in "
            f"{r0.get('lstm_precision')}), inference path {r0.get('infer_path')}; MACs per sample (FLOPs = 2 x MACs); "
            f"peak memory: {r0['peak_mem_kind'] or 'n/a'}; train-step memory: {_step_kind(records)}")
    _table(records, cols, note, fmt)


def _step_kind(records: list[dict]) -> str:
    """What ``peak_mem_mib_train_step`` is in these records ("-" where it was not measured)."""
    kinds = sorted({r["peak_mem_step_kind"] for r in records if r.get("peak_mem_step_kind")})
    return ", ".join(kinds) + (" (- where not measured)" if any(r.get("peak_mem_mib_train_step") is None
                                                              for r in records) else "") if kinds else "not measured"


def _table(records: list[dict], cols, note: str, fmt: str, text_columns: tuple[str, ...] = ("variant",)) -> None:
    """The records as a Markdown table (``fmt`` markdown) or a rich table, ``note`` under / above it; the
    ``text_columns`` left-aligned, the figures right-aligned."""
    if fmt == "markdown":
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" if c in text_columns else "---:" for c in cols) + "|")
        for r in records:
            print("| " + " | ".join(fmt_cell(r.get(c)) for c in cols) + " |")
        print(f"\n{note}")
        return
    t = Table(title=note)
    for c in cols:
        t.add_column(c, justify="left" if c in text_columns else "right")
    for r in records:
        t.add_row(*[fmt_cell(r.get(c)) for c in cols])
    console.print(t)


def fmt_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v:,.0f}"
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


if __name__ == "__main__":
    app()
