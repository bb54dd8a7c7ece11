"""Files a user did not make, fed to the command the user runs: run bundles (`ablate.py import`), grid
files (`ablate.py --grid`), SLURM options, resume states (`ablate.py run`, `ablate.py results
--incomplete`). Each hostile input is built here; each is refused with one `error:` line naming the
file and what is wrong, nothing runs, and nothing is written outside the store (or at all)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile
import tracemalloc

import pytest
import torch
from typer.testing import CliRunner

import ablate
from harness.training import bundle as B
from harness.data import dataset as D
from harness.execution import grid as G
from harness.execution import slurm as S
from harness.training.plan import RunSpec, plan
from harness.runs.store import ResultsStore
from tests.training.test_bundle import RunsCode, files_under, members_of, write_bundle
from tests.execution.test_executor import flags, sbatch_lines

runner = CliRunner()


def invoke(*args) -> tuple[int, str]:
    r = runner.invoke(ablate.app, [str(a) for a in args])
    return r.exit_code, r.output


def one_error_line(code: int, out: str, names, match: str) -> str:
    """The command was refused: exit 2, one line (no traceback) starting with ``error:`` that names
    ``names`` (the file) and says ``match``."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1, out
    assert "Traceback" not in out, out
    assert str(names) in errors[0] and match in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """An empty data directory: whatever a command generates lands here."""
    d = tmp_path / "data-dir"
    d.mkdir()
    monkeypatch.setenv("VQAKD_DATA_DIR", str(d))
    return d


def import_refused(bundle, tmp_path, match: str, *options) -> str:
    """``ablate.py import bundle``: one error line naming it, nothing written anywhere under tmp_path."""
    before = files_under(tmp_path)
    code, out = invoke("import", bundle, "--results", tmp_path / "store", *options)
    line = one_error_line(code, out, bundle, match)
    assert files_under(tmp_path) == before
    return line


def fixed_manifest(members: dict[str, bytes]) -> dict[str, bytes]:
    """The members with the manifest's checksums recomputed, the manifest first (as export writes it)."""
    m = json.loads(members[B.MANIFEST])
    m["files"] = {n: {"sha256": B.sha256(b), "bytes": len(b)} for n, b in members.items() if n != B.MANIFEST}
    return {B.MANIFEST: json.dumps(m).encode(), **{n: b for n, b in members.items() if n != B.MANIFEST}}


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """The members as tar blocks, without the end-of-archive blocks (more can be appended)."""
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT)
    for name, data in members.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()  # not closed: no end blocks


def raw_header(name: str, size: int, kind: bytes = tarfile.REGTYPE, realsize: int | None = None) -> bytes:
    """One tar header block, as a hostile tool writes it: ``size`` bytes declared, none following."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))[:512]
    if realsize is not None:  # a GNU sparse member: the size it expands to
        block[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


# ----------------------------------------------------------------------------- bundles: forged runs


def test_a_teacher_whose_weights_were_zeroed_is_refused_on_import(exported, tmp_path, data_cache):
    rec, bundle = exported
    m = members_of(bundle)
    state = torch.load(io.BytesIO(m[B.WEIGHTS]), weights_only=True)
    buf = io.BytesIO()
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, buf)
    m[B.WEIGHTS] = buf.getvalue()
    forged = write_bundle(tmp_path / "zeroed.tar", fixed_manifest(m))  # checksums right: only re-evaluation sees it
    line = import_refused(forged, tmp_path, "a forged or damaged run")
    assert f"says val acc {rec['metrics']['val']['overall']}" in line, line


def test_a_record_claiming_a_better_accuracy_is_refused_on_import(exported, tmp_path, data_cache):
    _, bundle = exported
    m = members_of(bundle)
    rec = json.loads(m[B.RECORD])
    for split in ("val", "test"):
        rec["metrics"][split]["overall"] = 99.9
    m[B.RECORD] = json.dumps(rec).encode()
    forged = write_bundle(tmp_path / "claims.tar", fixed_manifest(m))
    import_refused(forged, tmp_path, "record.json says val acc 99.9, but its weights give")


def test_an_honest_bundle_is_imported_with_what_was_verified(exported, tmp_path, data_cache):
    rec, bundle = exported
    code, out = invoke("import", bundle, "--results", tmp_path / "store")
    assert code == 0, out
    said = " ".join(out.split())
    assert f"imported run {rec['run_id']}" in said and "re-evaluated on this data set: val acc" in said, said
    assert "test acc" in said and "tolerance" in said, said
    imported = json.loads((ResultsStore(tmp_path / "store").run_dir(rec["run_id"]) / B.IMPORTED).read_text())
    assert imported["verified"].startswith("re-evaluated on this data set")


def test_tolerance_is_one_standard_error_and_at_least_two_questions():
    import numpy as np

    right = np.array([1.0] * 50 + [0.0] * 50)
    assert B.metric_tolerance(right, percent=True) == pytest.approx(100 * np.std(right, ddof=1) / 10)
    assert B.metric_tolerance(np.ones(10_000), percent=True) == pytest.approx(100 * 2 / 10_000)


def test_a_record_configuring_a_huge_model_is_refused_before_it_is_built(exported, tmp_path, tiny):
    """A forged record, consistent with itself (run id re-planned), whose module_dim makes a model
    of ~40 GB: the weights are compared with the model's shapes before any of it is allocated."""
    _, bundle = exported
    m = members_of(bundle)
    rec, man = json.loads(m[B.RECORD]), json.loads(m[B.MANIFEST])
    rec["spec"]["overrides"] = {**rec["spec"].get("overrides", {}), "module_dim": 100_000}
    planned = plan(RunSpec(**rec["spec"]), D.describe("synthetic:tiny"))
    rec["run_id"] = man["run_id"] = planned.run_id
    rec["variant_config"] = man["config"]["variant_config"] = planned.cfg.to_dict()
    m[B.RECORD], m[B.MANIFEST] = json.dumps(rec).encode(), json.dumps(man).encode()
    huge = write_bundle(tmp_path / "huge.tar", fixed_manifest(m))
    import_refused(huge, tmp_path, "best.pt does not fit variant 'teacher-g4' as its record configures it")


def test_a_synthetic_spec_is_checked_before_any_data_set_is_generated(exported, tmp_path, data_dir):
    _, bundle = exported
    for spec, match in (("synthetic:nosuch:1", "is not synthetic:PRESET[:SEED] with a known preset"),
                        ("synthetic:tiny:99999999999", "is not synthetic:PRESET[:SEED] with a known preset"),
                        ("synthetic:small:7", "is not synthetic:small:7 (synthetic-small")):
        m = members_of(bundle)
        rec, man = json.loads(m[B.RECORD]), json.loads(m[B.MANIFEST])
        rec["data"]["spec"] = man["data_spec"] = spec
        m[B.RECORD], m[B.MANIFEST] = json.dumps(rec).encode(), json.dumps(man).encode()
        bad = write_bundle(tmp_path / "spec.tar", fixed_manifest(m))
        line = import_refused(bad, tmp_path, match)
        assert "no data set generated" in line
        assert list(data_dir.iterdir()) == []


# ----------------------------------------------------------------------------- bundles: size


def test_a_gzip_bomb_is_refused_past_the_cap_which_the_user_can_raise(exported, tmp_path):
    _, bundle = exported
    m = members_of(bundle)
    m[B.WEIGHTS] = bytes(3 << 20)  # 3 MiB of zeros: a few KB gzipped
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(tar_bytes(fixed_manifest(m)) + bytes(1024)))
    assert bomb.stat().st_size < 64 << 10
    import_refused(bomb, tmp_path, "unpacks to more than 1 MiB (member 'best.pt' is 3,145,728 bytes); refused before "
                                   "reading it", "--max-unpacked-mib", 1)
    # a cap the user raised lets it be read: then its weights are refused for what they are
    import_refused(bomb, tmp_path, "best.pt", "--max-unpacked-mib", 8)


def test_a_member_past_the_default_cap_is_refused_before_it_is_read(exported, tmp_path):
    """A 2 GiB member declared in a 2 KB gzip file: refused by its header, nothing inflated."""
    _, bundle = exported
    m = members_of(bundle)
    man = json.loads(m[B.MANIFEST])
    man["files"][B.WEIGHTS] = {"sha256": "0" * 64, "bytes": 2 << 30}
    head = tar_bytes({B.MANIFEST: json.dumps(man).encode()}) + raw_header(B.WEIGHTS, 2 << 30)
    bomb = tmp_path / "declared.tar.gz"
    bomb.write_bytes(gzip.compress(head + bytes(4096)))
    tracemalloc.start()
    try:
        import_refused(bomb, tmp_path, f"unpacks to more than {B.MAX_UNPACKED_MIB:g} MiB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_a_sparse_member_is_refused(exported, tmp_path):
    """A 2 KB plain tar whose GNU sparse member would expand to 512 MiB."""
    _, bundle = exported
    m = members_of(bundle)
    sparse = tmp_path / "sparse.tar"
    sparse.write_bytes(tar_bytes({B.MANIFEST: m[B.MANIFEST]})
                       + raw_header(B.WEIGHTS, 0, tarfile.GNUTYPE_SPARSE, 512 << 20)
                       + bytes(1024))
    with tarfile.open(sparse) as tf:  # what Python's tarfile makes of it
        member = tf.getmember(B.WEIGHTS)
        assert member.issparse() and member.size == 512 << 20
    import_refused(sparse, tmp_path, "member 'best.pt' is a sparse file")


def test_a_huge_pax_header_is_refused_before_it_is_read(exported, tmp_path):
    _, bundle = exported
    m = members_of(bundle)
    big = tmp_path / "pax.tar"
    with tarfile.open(big, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(B.MANIFEST)
        info.size, info.pax_headers = len(m[B.MANIFEST]), {"comment": "x" * (1 << 20)}
        tf.addfile(info, io.BytesIO(m[B.MANIFEST]))
    import_refused(big, tmp_path, "a pax header of 1,048,")


def test_a_chain_of_pax_headers_is_refused(tmp_path):
    """Thousands of small pax headers before one member (tarfile reads such a chain recursively)."""
    record = b"20 comment=xxxxxxxx\n"
    pax = raw_header("././@PaxHeader", len(record), tarfile.XHDTYPE) + record + bytes(512 - len(record))
    chain = tmp_path / "chain.tar"
    chain.write_bytes(pax * 5000 + tar_bytes({B.MANIFEST: b"{}"}) + bytes(1024))
    import_refused(chain, tmp_path, f"more than {B.MAX_EXTENDED_HEADERS} extended headers")


def test_a_damaged_compressed_bundle_is_one_error_line(tmp_path):
    text = json.dumps({"format": B.FORMAT, "pad": [str(i) for i in range(50_000)]}).encode()
    for name, compress, how in (("cut.tar.gz", gzip.compress, "cut"), ("cut.tar.xz", lzma.compress, "cut"),
                                ("zeroed.tar.xz", lzma.compress, "zeroed")):
        data = bytearray(compress(tar_bytes({B.MANIFEST: text}) + bytes(1024)))
        if how == "cut":  # the compressed stream ends in the middle of the manifest
            data = data[:len(data) // 2]
        else:
            data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        damaged = tmp_path / name
        damaged.write_bytes(bytes(data))
        import_refused(damaged, tmp_path, "damaged tar file")


# ----------------------------------------------------------------------------- bundles: malformed JSON


def test_malformed_manifests_and_records_are_one_error_line(exported, tmp_path):
    _, bundle = exported
    m = members_of(bundle)
    deep = write_bundle(tmp_path / "deep.tar", {**m, B.MANIFEST: b"[" * 100_000 + b"]" * 100_000})
    import_refused(deep, tmp_path, "manifest.json is nested too deeply")

    man = json.loads(m[B.MANIFEST])
    man["files"][B.RECORD] = "not an entry"
    listing = write_bundle(tmp_path / "listing.tar", {B.MANIFEST: json.dumps(man).encode(),
                                                      **{n: b for n, b in m.items() if n != B.MANIFEST}})
    import_refused(listing, tmp_path, "files['record.json'] is str")

    rec = json.loads(m[B.RECORD])
    rec["data"] = ["synthetic:tiny"]
    m[B.RECORD] = json.dumps(rec).encode()
    import_refused(write_bundle(tmp_path / "data-list.tar", fixed_manifest(m)), tmp_path, "record.json: data is list")


# ----------------------------------------------------------------------------- grids


def write_grid(path, axes: dict, seeds=(0,)) -> str:
    lines = ['variants = ["student-logits"]', f"seeds = {list(seeds)}", "[axes]"]
    lines += [f'"{k}" = {json.dumps(v)}' for k, v in axes.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_grid_of_ten_million_runs_is_refused_before_it_is_expanded(tmp_path):
    axes = {"logits.T": [1.0 + i for i in range(10)], "logits.weight": [0.1 * (i + 1) for i in range(10)],
            "alpha": [0.1 * i for i in range(10)], "beta": [0.1 * i for i in range(10)],
            "ce_weight": [0.1 * i for i in range(10)], "graph_layers": list(range(1, 11)),
            "unit_layers": list(range(1, 11))}
    grid = write_grid(tmp_path / "huge.toml", axes)
    assert os.path.getsize(grid) < 1024
    tracemalloc.start()
    try:
        code, out = invoke("--grid", grid, "--results", tmp_path / "results", "--device", "cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_error_line(code, out, grid, "the grid makes 10,000,000 runs (before [[exclude]]), more than the limit of "
                                    "10,000; refused before expanding it (--max-runs N raises the limit)")
    assert peak < 64 << 20, peak  # ten million run specs would take GiBs
    assert not (tmp_path / "results").exists()


def test_max_runs_sets_the_limit(tmp_path):
    grid = write_grid(tmp_path / "small.toml", {"logits.T": [2.0, 4.0, 8.0], "logits.weight": [0.5, 1.0]}, seeds=(0, 1))
    code, out = invoke("--grid", grid, "--max-runs", 11, "--results", tmp_path / "results")
    one_error_line(code, out, grid, "the grid makes 12 runs (before [[exclude]]), more than the limit of 11")
    code, out = invoke("report", "--grid", grid, "--max-runs", 11, "--results", tmp_path / "results")
    one_error_line(code, out, grid, "more than the limit of 11")
    assert len(G.load(grid, max_runs=12).runs) == 12


# ----------------------------------------------------------------------------- SLURM options


HOSTILE_PARTITION = "debug\n#SBATCH --wrap=touch /tmp/owned"


def test_a_partition_name_with_a_newline_is_refused(tmp_path):
    code, out = invoke("--grid", "ci", "--executor", "slurm", "--partition", HOSTILE_PARTITION,
                       "--results", tmp_path / "results")
    one_error_line(code, out, "command line", "partition = 'debug\\n#SBATCH --wrap=touch /tmp/owned' is not a SLURM "
                                              "partition name")
    code, out = invoke("--grid", "ci", "--executor", "slurm", "--executor-option", f"partition={HOSTILE_PARTITION}",
                       "--results", tmp_path / "results")
    one_error_line(code, out, "--executor-option", "is not a SLURM partition name")
    grid = tmp_path / "cluster.toml"
    grid.write_text('variants = ["dualvgr"]\n[executor]\nkind = "slurm"\npartition = "gpu\\n#SBATCH --uid=0"\n')
    code, out = invoke("--grid", grid, "--results", tmp_path / "results")
    one_error_line(code, out, grid, "[executor]: partition = 'gpu\\n#SBATCH --uid=0' is not a SLURM partition name")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("partition", ["gpu", "gpu,debug", "a100-80gb_long.q"])
def test_partition_names_slurm_accepts_are_sent(partition, tmp_path):
    assert flags(sbatch_lines(S.slurm_parameters({"partition": partition, "time_min": 5}, "cpu"), tmp_path))[
        "partition"] == partition


@pytest.mark.parametrize("partition", ["", "gpu debug", "gpu\n#SBATCH --uid=0", "gpu;rm", "'gpu'", "x" * 65, "gpu,"])
def test_partition_names_slurm_would_misread_are_refused(partition):
    with pytest.raises(G.GridError, match="is not a SLURM partition name"):
        S.check_executor_options({"partition": partition}, "where")


def test_a_grid_file_name_cannot_add_a_line_to_the_sbatch_script(tmp_path):
    lines = sbatch_lines(S.slurm_parameters({"time_min": 5}, "cpu", name="ablate-x\n#SBATCH --uid=0 \"y"), tmp_path)
    assert not any(ln.startswith("#SBATCH --uid") for ln in lines), lines
    assert flags(lines)["job-name"] == "ablate-x__SBATCH_--uid_0__y"


# ----------------------------------------------------------------------------- resume states


RUN = ("run", "question-only", "--epochs", 2, "--batch-size", 512, "--seed", 5, "--device", "cpu")


def planted(tmp_path, tiny, state) -> tuple[ResultsStore, str]:
    """A store whose run of :data:`RUN` has ``state`` (an object saved with torch.save, or bytes) as state.pt."""
    store = ResultsStore(tmp_path / "results")
    run_id = plan(RunSpec("question-only", data="synthetic:tiny", seed=5, epochs=2, batch_size=512), tiny).run_id
    path = store.run_dir(run_id) / "state.pt"
    path.parent.mkdir(parents=True)
    if isinstance(state, bytes):
        path.write_bytes(state)
    else:
        torch.save(state, path)
    return store, run_id


def test_a_state_that_would_run_code_is_refused_when_resuming_and_listing(tmp_path, tiny):
    marker = tmp_path / "code-ran"
    state = {"model": {}, "epoch": 0, "hook": RunsCode(marker)}
    store, run_id = planted(tmp_path, tiny, state)
    digest = hashlib.sha256((store.run_dir(run_id) / "state.pt").read_bytes()).hexdigest()
    code, out = invoke(*RUN, "--results", store.root)
    one_error_line(code, out, store.run_dir(run_id) / "state.pt", "not a resume state this harness wrote "
                                                                   "(torch.load with weights_only=True")
    assert not marker.exists()
    assert hashlib.sha256((store.run_dir(run_id) / "state.pt").read_bytes()).hexdigest() == digest  # left as it is
    assert not (store.run_dir(run_id) / "failed.json").exists() and not store.is_complete(run_id)

    code, out = invoke("results", "--incomplete", "--results", store.root)
    one_error_line(code, out, store.run_dir(run_id) / "state.pt", "not a resume state")
    assert not marker.exists()


@pytest.mark.parametrize("state, match", [(b"PK\x03\x04 not really a zip", "not a resume state this harness wrote"),
                                          ([1, 2, 3], "a list, not a resume state"),
                                          ({"model": {}, "epoch": "0"}, "objective is NoneType, not dict")])
def test_a_malformed_state_is_one_error_line(tmp_path, tiny, state, match):
    store, run_id = planted(tmp_path, tiny, state)
    code, out = invoke(*RUN, "--results", store.root)
    one_error_line(code, out, store.run_dir(run_id) / "state.pt", match)
    code, out = invoke("results", "--incomplete", "--results", store.root)
    one_error_line(code, out, store.run_dir(run_id) / "state.pt", match)
