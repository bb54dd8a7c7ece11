"""Run bundles (harness.training.bundle): a teacher exported from one results store and imported into an
empty one is used by its student without retraining; a tampered or hostile bundle is refused with a
message naming what failed, and nothing is written outside the store."""
import io
import json
import os
import tarfile

import pytest
import torch
from typer.testing import CliRunner

import ablate
from harness.training import bundle as B
from harness.training.plan import RunSpec
from harness.training.runner import train
from harness.runs.store import ResultsStore

FAST = {"epochs": 1, "batch_size": 512}  # the settings of the shared teacher-g4 run (conftest.SHARED_RUNS)


def members_of(path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def write_bundle(path, members: dict[str, bytes], extra: list[tuple[tarfile.TarInfo, bytes]] = (),
                 fix_manifest: bool = False):
    """A bundle with ``members`` (the manifest's checksums brought up to date when ``fix_manifest``)
    and ``extra`` raw tar members."""
    members = dict(members)
    if fix_manifest:
        m = json.loads(members[B.MANIFEST])
        m["files"] = {n: {"sha256": B.sha256(b), "bytes": len(b)} for n, b in members.items() if n != B.MANIFEST}
        members[B.MANIFEST] = json.dumps(m).encode()
    with tarfile.open(path, "w") as tf:
        for info, data in extra:
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.slow
def test_imported_teacher_is_used_by_its_student_without_retraining(tiny, exported, tmp_path, monkeypatch):
    trec, bundle = exported
    store = ResultsStore(tmp_path / "empty")
    res = CliRunner().invoke(ablate.app, ["import", str(bundle), "--results", str(store.root)])
    assert res.exit_code == 0, res.output
    assert "imported run " + trec["run_id"] in " ".join(res.output.split())
    assert store.read_record(trec["run_id"]) == trec
    run_dir = store.run_dir(trec["run_id"])
    assert not (run_dir / "state.pt").exists() and (run_dir / "best.pt").is_file()
    import harness.training.runner as R

    trained = []
    real = R._Run.execute
    monkeypatch.setattr(R._Run, "execute", lambda self, *a: trained.append(self.p.spec.variant) or real(self, *a))
    srec = train(RunSpec(variant="student-logits", data="synthetic:tiny", seed=3, **FAST), store, data=tiny,
                 device="cpu", progress=False)
    assert trained == ["student-logits"]  # the teacher was found, not trained again
    assert srec["teacher_runs"] == [trec["run_id"]]
    assert srec["teachers"][0]["test_acc"] == trec["metrics"]["test"]["overall"]
    assert store.read_record(trec["run_id"]) == trec
    # importing it again changes nothing
    again, added, _ = B.import_bundle(bundle, store)
    assert again == trec and not added


def test_export_refuses_an_incomplete_run(tmp_path):
    with pytest.raises(B.BundleError, match="not complete"):
        B.export_run(ResultsStore(tmp_path), "dualvgr-000000000000", tmp_path / "x.tar")


def refused(bundle, tmp_path, match: str, data: str | None = None):
    """Import ``bundle`` into an empty store under ``tmp_path``: it must be refused with a message
    matching ``match``; nothing may have been written in the store or beside it."""
    store = ResultsStore(tmp_path / "store")
    before = files_under(tmp_path)
    with pytest.raises(B.BundleError, match=match):
        B.import_bundle(bundle, store, data=data)
    assert not store.runs.exists()
    assert files_under(tmp_path) == before
    res = CliRunner().invoke(ablate.app, ["import", str(bundle), "--results", str(store.root)])
    assert res.exit_code == 2, res.output
    assert files_under(tmp_path) == before


def test_tampered_member_is_refused(exported, tmp_path):
    _, bundle = exported
    m = members_of(bundle)
    rec = json.loads(m[B.RECORD])
    rec["metrics"]["test"]["overall"] = 99.9
    m[B.RECORD] = json.dumps(rec).encode()
    refused(write_bundle(tmp_path / "t.tar", m), tmp_path, r"record\.json: checksum mismatch")


def test_record_whose_identity_is_not_what_it_claims_is_refused(exported, tmp_path):
    _, bundle = exported
    m = members_of(bundle)
    rec = json.loads(m[B.RECORD])
    rec["spec"]["seed"] = rec["seed"] = 4  # another run's settings under this run's id, checksums updated
    m[B.RECORD] = json.dumps(rec).encode()
    refused(write_bundle(tmp_path / "t.tar", m, fix_manifest=True), tmp_path, "identity mismatch")

    m = members_of(bundle)
    rec = json.loads(m[B.RECORD])
    rec["variant_config"]["model"]["module_dim"] += 1  # the model built from the record would not be the run's
    m[B.RECORD] = json.dumps(rec).encode()
    refused(write_bundle(tmp_path / "t2.tar", m, fix_manifest=True), tmp_path, "identity mismatch: record.json says "
                                                                               "variant_config")


def test_other_data_is_refused(exported, tmp_path, data_cache):
    _, bundle = exported
    m = members_of(bundle)
    for name in (B.MANIFEST, B.RECORD):
        obj = json.loads(m[name])
        if name == B.MANIFEST:
            obj["data_id"] = "tiny-0123456789"
        else:
            obj["data"]["id"] = "tiny-0123456789"
        m[name] = json.dumps(obj).encode()
    refused(write_bundle(tmp_path / "t.tar", m, fix_manifest=True), tmp_path, "data id mismatch")


def hostile(kind: str) -> tuple[tarfile.TarInfo, bytes]:
    data = b""
    if kind == "dotdot":
        info, data = tarfile.TarInfo("../escaped.txt"), b"outside"
    elif kind == "absolute":
        info, data = tarfile.TarInfo("/tmp/vqakd-bundle-escaped.txt"), b"outside"
    elif kind == "symlink":
        info = tarfile.TarInfo("predictions_val.csv")
        info.type, info.linkname = tarfile.SYMTYPE, "../../escaped.txt"
    elif kind == "hardlink":
        info = tarfile.TarInfo("predictions_val.csv")
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    else:  # a character device
        info = tarfile.TarInfo("predictions_val.csv")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("kind,match", [("dotdot", r"'\.\./escaped\.txt' points outside"),
                                        ("absolute", "absolute path"), ("symlink", "symbolic link"),
                                        ("hardlink", "hard link"), ("device", "device")])
def test_members_that_would_leave_the_store_are_refused(exported, tmp_path, kind, match):
    _, bundle = exported
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    evil = write_bundle(inner / "evil.tar", members_of(bundle), extra=[hostile(kind)])
    refused(evil, inner, match)
    assert not (tmp_path / "a" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


class RunsCode:
    """Unpickling this calls os.mkdir(path): what a hostile weights file would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_weights_that_would_run_code_are_refused(exported, tmp_path):
    _, bundle = exported
    m = members_of(bundle)
    marker = tmp_path / "code-ran"
    state = torch.load(io.BytesIO(m[B.WEIGHTS]), weights_only=True)
    state["hook"] = RunsCode(marker)
    buf = io.BytesIO()
    torch.save(state, buf)
    m[B.WEIGHTS] = buf.getvalue()
    bad = write_bundle(tmp_path / "pickle.tar", m, fix_manifest=True)  # checksums right: the weights check refuses
    refused(bad, tmp_path, r"best\.pt refused: not a plain state dict")
    assert not marker.exists()


def test_weights_of_another_model_are_refused(exported, tmp_path):
    _, bundle = exported
    m = members_of(bundle)
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(3)}, buf)
    m[B.WEIGHTS] = buf.getvalue()
    refused(write_bundle(tmp_path / "w.tar", m, fix_manifest=True), tmp_path, "does not fit variant")


def test_not_a_bundle(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all")
    refused(junk, tmp_path, "not a readable bundle")
    other = write_bundle(tmp_path / "other.tar", {"notes.txt": b"hello"})
    refused(other, tmp_path, "unexpected member 'notes.txt'")
