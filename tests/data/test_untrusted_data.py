"""Hostile data inputs fed through the commands a user runs (``ablate.py run --data DIR``,
``python -m harness.data.prepare ...``): question pickles, vocab and QA json, GloVe files and feature h5
files. Each is refused with one ``error:`` line naming the file, before anything is trained or
written, and without the memory the input asks for. The tests build their inputs themselves."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import ablate
from harness.data import layout as L
from harness.data import prepare as P
from harness.data.features import FINGERPRINT_FILE
from harness.data.question_pickle import load_question_pickle

ROOT = Path(__file__).resolve().parents[2]
from tests.data.test_dataset import write_dataset  # noqa: E402 - the tests' small valid data set

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, whichever module numpy 1 / 2 names


class Raw:
    """Pickles as ``fn(*args)`` then BUILD ``state``: lets a test write any reconstruction a file can
    hold, without numpy ever building it here."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def raw_array(shape, dtype, data, fortran=False):
    return Raw(_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, dtype, fortran, data))


def raw_dtype(typestr, state):
    return Raw(np.dtype, (typestr, False, True), state)


def files_under(root: Path) -> dict:
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*")}


def run_ablate(data: Path, store: Path):
    r = CliRunner().invoke(ablate.app, ["run", "question-only", "--data", str(data), "--results", str(store),
                                        "--epochs", "1", "--device", "cpu"])
    return r.exit_code, r.output


def assert_one_error_line(code: int, out: str, *fragments: str):
    lines = out.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    for f in fragments:
        assert f in lines[0], (f, out)


def assert_refused_run(data: Path, store: Path, *fragments: str):
    before = files_under(data)
    code, out = run_ablate(data, store)
    assert_one_error_line(code, out, *fragments)
    assert files_under(data) == before  # nothing written beside the data
    assert not (store / "runs").exists() or not any((store / "runs").iterdir())  # nothing trained


def with_train_pickle(tmp_path: Path, **entries) -> Path:
    """The small data set with ``entries`` added to (or replacing keys of) its train pickle."""
    root = write_dataset(tmp_path / "data")
    f = root / "toy_train_questions.pt"
    obj = pickle.loads(f.read_bytes())
    obj.update(entries)
    f.write_bytes(pickle.dumps(obj, protocol=4))
    return root


# --------------------------------------------------------------------------- question pickles: what BUILD may reach

HOSTILE_ARRAYS = {
    # a structured dtype with an object field filled from raw bytes: pointers the file chooses
    "object field": (raw_array((1,), np.dtype([("p", "O")]), b"A" * 8), "is not a plain dtype"),
    "object from bytes": (raw_array((2,), np.dtype("O"), b"A" * 16), "must hold a list of 2 items"),
    "foreign flags": (raw_array((1,), raw_dtype("i8", (3, "<", None, None, None, -1, -1, 63)), b"A" * 8),
                      "flags 63 are not those of the plain dtype"),
    "sub-array": (raw_array((1,), raw_dtype("i8", (3, "<", (np.dtype("i4"), (2,)), None, None, -1, -1, 0)),
                            b"A" * 8), "structured and sub-array dtypes are refused"),
    "names": (raw_array((1,), raw_dtype("i8", (3, "<", None, ("p",), {"p": (np.dtype("O"), 0)}, 8, 8, 63)),
                        b"A" * 8), "structured and sub-array dtypes are refused"),
    "metadata": (raw_array((1,), raw_dtype("i8", (4, "<", None, None, None, -1, -1, 0, {"m": 1})), b"A" * 8),
                 "is not a plain dtype's"),
    "object holding a float": (raw_array((1,), np.dtype("O"), [1.5]), "only str and int are accepted"),
    "datetime": (np.zeros(2, dtype="M8[s]"), "is not a plain dtype"),
    "short data": (raw_array((4,), np.dtype("<i8"), b"A" * 8), "needs 32 bytes, the file holds 8"),
}


@pytest.mark.parametrize("key", ["glove", "never_read"])
@pytest.mark.parametrize("case", sorted(HOSTILE_ARRAYS))
def test_a_question_pickle_whose_arrays_are_not_plain_is_refused(tmp_path, case, key):
    value, why = HOSTILE_ARRAYS[case]
    data = with_train_pickle(tmp_path, **{key: value})
    assert_refused_run(data, tmp_path / "store", "toy_train_questions.pt: ", why)


def run_ablate_measured(data: Path, tmp_path: Path) -> tuple[int, str, int]:
    """``ablate.py run question-only`` on ``data`` in a child process: exit code, output, and the
    child's peak resident memory in KiB (VmHWM: the peak of the child's own address space; getrusage's
    ru_maxrss would also count the parent's peak, which exec carries over from a vfork)."""
    rss = tmp_path / "peak_kib"
    argv = ["ablate.py", "run", "question-only", "--data", str(data), "--results", str(tmp_path / "store"),
            "--epochs", "1", "--device", "cpu"]
    peak = "[l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]"
    child = (f"import runpy, sys; sys.argv = {argv!r}\n"
             f"try:\n    runpy.run_path('ablate.py', run_name='__main__')\n"
             f"finally:\n    open({str(rss)!r}, 'w').write({peak})")
    r = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return r.returncode, r.stdout + r.stderr, int(rss.read_text())


#: KiB: the interpreter and torch, far below the GiB the hostile inputs declare
PEAK_KIB = 900 * 1024


@pytest.mark.slow
def test_a_question_pickle_declaring_a_gib_array_is_refused_before_allocating(tmp_path):
    """1.3 KB declaring (8388608, 16) int64 (1 GiB): refused by size, in a process whose peak
    memory stays far below the declared size (a loader trusting the shape allocates and touches it)."""
    data = with_train_pickle(tmp_path, glove=raw_array((8388608, 16), np.dtype("<i8"), b""))
    assert (data / "toy_train_questions.pt").stat().st_size < 4096
    code, out, peak = run_ablate_measured(data, tmp_path)
    assert_one_error_line(code, out, "toy_train_questions.pt: ",
                          "declares shape (8388608, 16) of int64 (1,073,741,824 bytes), more than the whole file")
    assert peak < PEAK_KIB


@pytest.mark.slow
def test_a_feature_h5_declaring_gibs_it_does_not_store_is_refused_before_reading(tmp_path):
    """A few KB of h5 declaring 1.6 GB of ids and 24 GB of features, never written: HDF5 would fill
    them in on reading. Refused from the metadata, the child's peak memory far below."""
    data = write_dataset(tmp_path / "data")
    n = 200_000_000
    for name, key, shape in (("appearance", "resnet_features", (n, 3, 2, 5)),
                             ("motion", "resnext_features", (n, 3, 5))):
        with h5py.File(data / f"toy_{name}_feat.h5", "w") as f:
            f.create_dataset(key, shape=shape, dtype="<f4")
            f.create_dataset("ids", shape=(n,), dtype="<i8")
    assert (data / "toy_appearance_feat.h5").stat().st_size < 16384
    code, out, peak = run_ablate_measured(data, tmp_path)
    assert_one_error_line(code, out, "toy_appearance_feat.h5: 'resnet_features' declares shape (200000000, 3, 2, 5) "
                          "of float32 (24,000,000,000 bytes) and stores 0 bytes; more than 64x")
    assert peak < PEAK_KIB


def _compare(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.flags.f_contiguous == b.flags.f_contiguous
        assert a.tobytes(order="A") == b.tobytes(order="A") if a.dtype != object else a.tolist() == b.tolist()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _compare(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _compare(x, y)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    else:
        assert a == b


def _plain_values() -> dict:
    m = np.arange(12, dtype=np.int64).reshape(3, 4)
    return {
        "questions": m.astype(np.int32), "fortran": np.asfortranarray(m), "strided": m[:, ::2],
        "glove": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6), "f8": np.array([0.5, np.inf]),
        "f2": np.ones(3, np.float16), "big_endian": np.arange(5, dtype=">i4"), "u1": np.arange(4, dtype=np.uint8),
        "bool": np.array([True, False]), "c16": np.array([1 + 2j]), "c8": np.array([3j], dtype=np.complex64),
        "str": np.array(["vid1", "video22"]), "bytes": np.array([b"a", b"bc"]), "empty": np.zeros((0, 5)),
        "scalar0d": np.array(7), "obj": np.array(["a", 1, "bc"], dtype=object), "obj2d": np.array([["x", 2]], object),
        "np_scalars": [np.int64(3), np.float32(1.5), np.bool_(True), np.str_("s"), np.uint16(9)],
        "dtype": np.dtype("float32"), "nested": {"t": (1, 2.5, "x", None), "b": b"\x00\xff", "big": 2 ** 70},
    }


def _numpy1_spelling(raw: bytes, protocol: int) -> bytes:
    """``raw`` as numpy 1 writes it: ``numpy.core.*`` module names (the frame length fixed up)."""
    pairs = [(b"numpy._core.multiarray", b"numpy.core.multiarray"), (b"numpy._core.numeric", b"numpy.core.numeric")]
    if protocol < 4:
        for old, new in pairs:
            raw = raw.replace(old, new)
        return raw
    shrink = 0
    for old, new in pairs:
        n = raw.count(bytes([0x8C, len(old)]) + old)
        raw = raw.replace(bytes([0x8C, len(old)]) + old, bytes([0x8C, len(new)]) + new)
        shrink += n * (len(old) - len(new))
    assert raw[2] == 0x95 and len(raw) < 65536  # one frame: its length follows
    size = int.from_bytes(raw[3:11], "little") - shrink
    return raw[:3] + size.to_bytes(8, "little") + raw[11:]


@pytest.mark.filterwarnings("ignore:numpy.core.numeric is deprecated:DeprecationWarning")  # numpy 1's spelling
@pytest.mark.parametrize("numpy1", [False, True])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_question_pickles_load_identically(tmp_path, protocol, numpy1):
    values = _plain_values()
    raw = pickle.dumps(values, protocol=protocol)
    if numpy1:
        raw = _numpy1_spelling(raw, protocol)
        assert b"numpy._core" not in raw and b"numpy.core.multiarray" in raw
    path = tmp_path / "q.pt"
    path.write_bytes(raw)
    reference = pickle.loads(raw)  # numpy's own reading (native byte order below protocol 5)
    _compare(load_question_pickle(path), reference)
    assert reference["big_endian"].tolist() == [0, 1, 2, 3, 4] and reference["obj"].tolist() == ["a", 1, "bc"]


def test_the_harness_own_question_pickles_load_identically(tiny):
    for path in tiny.paths.questions.values():
        _compare(load_question_pickle(path), pickle.loads(path.read_bytes()))


# --------------------------------------------------------------------------- vocab json, feature h5 ids


@pytest.mark.parametrize("content, why", [
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (nested too deeply)"),
    (b'{"question_token_to_idx": {"\xff\xfe": 0}}', "not valid JSON (not UTF-8"),
    (b"[]", "expected a JSON object (the vocabularies), got list"),
    (b'{"question_token_to_idx": [1], "answer_token_to_idx": {"a": 0}, "question_answer_token_to_idx": {"a": 0}}',
     "'question_token_to_idx' must be a non-empty object"),
])
def test_a_hostile_vocab_json_is_one_error_line(tmp_path, content, why):
    data = write_dataset(tmp_path / "data")
    (data / "toy_vocab.json").write_bytes(content)
    assert_refused_run(data, tmp_path / "store", "toy_vocab.json: ", why)


def test_feature_files_whose_video_ids_are_strings_are_one_error_line(tmp_path):
    ids = np.array([f"v{i}".encode() for i in range(6)])
    data = write_dataset(tmp_path / "data", app_ids=ids, motion_ids=ids)
    assert_refused_run(data, tmp_path / "store", "toy_appearance_feat.h5: 'ids' must hold integer video ids")


# --------------------------------------------------------------------------- feature h5: storage outside the file


def _external_features(data: Path, target: str) -> None:
    """The appearance features' raw storage placed in ``target`` (the metadata says so; no byte moves)."""
    path = data / "toy_appearance_feat.h5"
    with h5py.File(path, "r") as f:
        ids = f["ids"][()]
    with h5py.File(path, "w") as f:
        f.create_dataset("resnet_features", shape=(6, 3, 2, 5), dtype="<f4", external=[(target, 0, 6 * 3 * 2 * 5 * 4)])
        f["ids"] = ids


def test_feature_h5_with_external_storage_is_refused(tmp_path):
    data = write_dataset(tmp_path / "data")
    _external_features(data, "/etc/passwd")
    assert_refused_run(data, tmp_path / "store", "toy_appearance_feat.h5: ",
                       "'resnet_features' stores its data in an external file ('/etc/passwd')")


@pytest.mark.slow
def test_feature_h5_with_storage_on_a_fifo_is_refused_not_hung(tmp_path):
    """A FIFO blocks a reader forever: the refusal comes from the metadata, before any read (a
    subprocess with a timeout, so that a regression fails instead of hanging the suite)."""
    data = write_dataset(tmp_path / "data")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _external_features(data, str(fifo))
    r = subprocess.run([sys.executable, "ablate.py", "run", "question-only", "--data", str(data), "--results",
                        str(tmp_path / "store"), "--epochs", "1", "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_error_line(r.returncode, r.stdout + r.stderr, "toy_appearance_feat.h5: ", "external file")


def test_virtual_and_linked_feature_datasets_are_refused(tmp_path):
    data = write_dataset(tmp_path / "data")
    path = data / "toy_motion_feat.h5"
    with h5py.File(path, "r") as f:
        motion, ids = f["resnext_features"][()], f["ids"][()]
    other = tmp_path / "elsewhere.h5"
    with h5py.File(other, "w") as f:
        f["m"] = motion
    layout = h5py.VirtualLayout(shape=motion.shape, dtype="<f4")
    layout[...] = h5py.VirtualSource(str(other), "m", shape=motion.shape)
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("resnext_features", layout)
        f["ids"] = ids
    assert_refused_run(data, tmp_path / "store1", "toy_motion_feat.h5: ", "'resnext_features' is a virtual dataset")
    with h5py.File(path, "w") as f:
        f["resnext_features"] = h5py.ExternalLink(str(other), "m")
        f["ids"] = ids
    assert_refused_run(data, tmp_path / "store2", "toy_motion_feat.h5: ", "'resnext_features' is a ExternalLink")


def test_nextqa_release_features_with_external_storage_are_refused(tmp_path):
    feats = tmp_path / "vid_feat"
    feats.mkdir()
    for split in ("train", "val", "test"):
        with h5py.File(feats / f"app_mot_{split}.h5", "w") as f:
            f["ids"] = np.arange(3)
            f.create_dataset("feat", shape=(3, 2, 4096), dtype="<f4", external=[("/etc/passwd", 0, 3 * 2 * 4096 * 4)])
    out = tmp_path / "out"
    code, text = run_prepare("next-qa-features", "--features", feats, "--out", out)
    assert_one_error_line(code, text, "app_mot_train.h5: ", "external file ('/etc/passwd')")
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- prepare: QA json, GloVe, video ids


def run_prepare(*args):
    r = CliRunner().invoke(P.build_cli(), [str(a) for a in args])
    return r.exit_code, r.output


def qa(q, a, v, i):
    return {"question": q, "answer": a, "video_id": v, "id": i}


def release(tmp_path: Path, train=None, glove_lines=None) -> tuple[Path, Path]:
    ann = tmp_path / "ann"
    ann.mkdir()
    recs = [qa("what is a man doing?", "dance", 1, 0), qa("who is dancing?", "man", 2, 1)]
    for split in ("train", "val", "test"):
        (ann / f"{split}_qa.json").write_text(json.dumps(train if split == "train" and train is not None else recs))
    glove = tmp_path / "glove.txt"
    lines = glove_lines or [f"{w} " + " ".join(["0.5"] * 4) for w in ("what", "is", "a", "man", "who")]
    glove.write_text("\n".join(lines) + "\n")
    return ann, glove


def prepare_questions(ann: Path, glove: Path, out: Path, *extra):
    return run_prepare("questions", "--dataset", "msrvtt-qa", "--annotations", ann, "--glove", glove,
                       "--out", out, *extra)


def test_a_qa_release_nested_deep_is_one_error_line(tmp_path):
    ann, glove = release(tmp_path)
    (ann / "train_qa.json").write_text("[" * 100_000 + "]" * 100_000)
    code, out = prepare_questions(ann, glove, tmp_path / "out")
    assert_one_error_line(code, out, "train_qa.json: not valid JSON (nested too deeply)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("video_id, why", [
    ("vid" + "9" * 5000, "is not an integer, 'vidN' or 'videoN' (at most 18 digits)"),
    (int("9" * 4000), "is outside 0..2**63-1"),
])
def test_a_huge_video_id_is_one_error_line(tmp_path, video_id, why):
    ann, glove = release(tmp_path, train=[qa("what is a man doing?", "dance", video_id, 0)])
    code, out = prepare_questions(ann, glove, tmp_path / "out")
    assert_one_error_line(code, out, "train_qa.json: record 0: video_id ", why)
    assert len(out) < 400  # the id is shortened in the message


def test_one_huge_question_does_not_pad_its_split(tmp_path):
    huge = "what " * 50_000 + "?"
    ann, glove = release(tmp_path, train=[qa("what is a man doing?", "dance", 1, 0), qa(huge, "man", 2, 1)])
    out = tmp_path / "out"
    code, text = prepare_questions(ann, glove, out)
    assert code == 0, text
    assert "1 cut to their first tokens" in " ".join(text.split())
    train = pickle.loads((out / "msrvtt-qa_train_questions.pt").read_bytes())
    assert train["questions"].shape == (2, P.MAX_QUESTION_TOKENS)
    assert train["questions_len"].tolist() == [5, P.MAX_QUESTION_TOKENS]
    summary = json.loads(L.questions_report_file(out, "msrvtt-qa").read_text())
    assert summary["splits"]["train"]["truncated_questions"] == 1
    code, _ = prepare_questions(ann, glove, tmp_path / "out8", "--max-question-tokens", "8")
    assert code == 0
    assert pickle.loads((tmp_path / "out8" / "msrvtt-qa_train_questions.pt").read_bytes())["questions"].shape == (2, 8)


@pytest.mark.parametrize("lines, why", [
    (["what " + " ".join(["1"] * 200_000)] + [f"w{i} 0.5 0.5 0.5 0.5" for i in range(20)],
     "the first line has 200,000 values, the next lines' vectors have 4"),
    (["what " + " ".join(["1"] * 200_000)], "vectors of 200,000 values; word vectors wider than 4096 are refused"),
    ([f"w{i} " + " ".join(["1"] * (8 if i in (0, 3, 6) else 30)) for i in range(10)],
     "the first 10 lines do not agree on a vector size"),
])
def test_a_glove_file_whose_dimension_the_file_does_not_bear_out_is_refused(tmp_path, lines, why):
    ann, glove = release(tmp_path, glove_lines=lines)
    code, out = prepare_questions(ann, glove, tmp_path / "out")
    assert_one_error_line(code, out, "glove.txt: ", why)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cache", ["deep", "finite list", "planted"])
def test_a_hostile_fingerprint_cache_beside_the_data_is_recomputed_not_fatal(tmp_path, cache):
    """The fingerprint cache travels with a data directory from elsewhere: a nested or mistyped one is
    ignored and rewritten, and the run goes on; a well-formed one made elsewhere (same size and
    modification time, as tar keeps them, but another status-change time) claiming another hash and
    a finished NaN check is not believed."""
    data = write_dataset(tmp_path / "data")
    app = data / "toy_appearance_feat.h5"
    st = app.stat()
    claim = {"sha1": "0" * 40, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns - 1}
    if cache == "deep":
        text = "[" * 100_000 + "]" * 100_000
    elif cache == "finite list":
        text = json.dumps({app.name: {**claim, "ctime_ns": st.st_ctime_ns, "finite": [1]}})
    else:
        text = json.dumps({app.name: {**claim, "finite": {"resnet_features": True}}})
    (data / FINGERPRINT_FILE).write_text(text)
    code, out = run_ablate(data, tmp_path / "store")
    assert code == 0, out
    rewritten = json.loads((data / FINGERPRINT_FILE).read_text())
    assert rewritten[app.name]["sha1"] != "0" * 40 and rewritten[app.name]["size"] == app.stat().st_size


def test_one_buffer_referenced_by_many_arrays_is_refused_before_allocating(tmp_path):
    """The pickle memo lets a file name one 64 KiB buffer for 4,096 arrays (256 MiB) at two bytes each:
    the arrays' declared bytes are summed against the file's size."""
    buf = b"\x00" * 65536
    data = with_train_pickle(tmp_path, extra=[raw_array((8192,), np.dtype("<i8"), buf) for _ in range(4096)])
    assert (data / "toy_train_questions.pt").stat().st_size < 4 * 65536
    assert_refused_run(data, tmp_path / "store", "toy_train_questions.pt: ", "the arrays declare ",
                       "bytes in all, more than the whole file holds")


@pytest.mark.parametrize("case, raw, why", [
    # BUILD (attributes set from a slot state) on the globals, NEWOBJ on one, one as a value
    ("build on numpy.ndarray", b"\x80\x02cnumpy\nndarray\nN}(U\x01xK\x01u\x86b.", "numpy.ndarray takes no state"),
    ("newobj on numpy.dtype", b"\x80\x02cnumpy\ndtype\n)\x81.", "cannot unpickle"),
    ("build on _reconstruct", b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nN}(U\x01xK\x01u\x86b.",
     "numpy.core.multiarray._reconstruct takes no state"),
    ("a stand-in as a value", b"\x80\x02}U\x01xcnumpy\ndtype\ns.", "numpy.dtype itself as a value"),
])
def test_the_unpickler_stand_ins_take_no_state(tmp_path, case, raw, why):
    data = write_dataset(tmp_path / "data")
    (data / "toy_val_questions.pt").write_bytes(raw)
    assert_refused_run(data, tmp_path / "store", "toy_val_questions.pt: ", why)


def test_one_huge_nextqa_question_or_candidate_does_not_pad_its_split(tmp_path):
    from tests.data.prepare.test_taskdata import NQ_HEADER, NQ_TEST, NQ_TRAIN, NQ_VAL, write_csv, write_glove

    ann = tmp_path / "nextqa"
    ann.mkdir()
    huge = " ".join(f"w{i}" for i in range(20_000))
    train = [NQ_TRAIN[0][:4] + (huge,) + NQ_TRAIN[0][5:], NQ_TRAIN[1][:8] + (huge,) + NQ_TRAIN[1][9:], *NQ_TRAIN[2:]]
    for s, rows in (("train", train), ("val", NQ_VAL), ("test", NQ_TEST)):
        write_csv(ann / f"{s}.csv", rows, NQ_HEADER)
    write_glove(tmp_path / "glove.txt", ["what", "did", "the", "baby", "do"])
    for cap, out in ((P.MAX_QUESTION_TOKENS, tmp_path / "out"), (8, tmp_path / "out8")):
        extra = () if cap == P.MAX_QUESTION_TOKENS else ("--max-question-tokens", cap)
        code, text = run_prepare("next-qa", "--annotations", ann, "--glove", tmp_path / "glove.txt", "--out", out,
                                 *extra)
        assert code == 0, text
        assert "train: 4 of 4 questions; " in text and f"2 texts cut to their first {cap} tokens" in text, text
        obj = pickle.loads((out / "next-qa_train_questions.pt").read_bytes())
        assert obj["questions"].shape == (4, cap) and obj["ans_candidates"].shape[2] == cap
        vocab = json.loads((out / "next-qa_vocab.json").read_text())
        assert len(vocab["question_token_to_idx"]) < 2 * cap + 100  # the cut tokens are not in the vocabulary


@pytest.mark.parametrize("ids, why", [
    ([b"9" * 4000], "'ids' holds |S4000 values that are not integer video ids"),  # past int64
    ([b"9" * 5000], "'ids' holds |S5000 values that are not integer video ids"),  # past int()'s digit limit
])
def test_nextqa_release_features_with_huge_string_ids_are_one_error_line(tmp_path, ids, why):
    feats = tmp_path / "vid_feat"
    feats.mkdir()
    for split in ("train", "val", "test"):
        with h5py.File(feats / f"app_mot_{split}.h5", "w") as f:
            f["ids"] = np.asarray(ids)
            f["feat"] = np.zeros((1, 2, 4096), np.float32)
    code, text = run_prepare("next-qa-features", "--features", feats, "--out", tmp_path / "out")
    assert_one_error_line(code, text, "app_mot_train.h5: ", why)
    assert len(text) < 400


@pytest.mark.parametrize("content, why", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),
    ("[1]", "expected a JSON object, got list"),
])
def test_a_hostile_meta_json_is_one_error_line(tmp_path, content, why):
    data = write_dataset(tmp_path / "data")
    L.meta_file(data, "toy").write_text(content)
    assert_refused_run(data, tmp_path / "store", "toy_meta.json: ", why)


def test_a_planted_fingerprint_cache_cannot_skip_the_nan_check(tmp_path):
    app = np.random.default_rng(0).standard_normal((6, 3, 2, 5)).astype(np.float32)
    app[4, 1, 0, 2] = np.nan
    data = write_dataset(tmp_path / "data", app=app)
    path = data / "toy_appearance_feat.h5"
    st = path.stat()
    (data / FINGERPRINT_FILE).write_text(json.dumps({path.name: {
        "sha1": "0" * 40, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns - 1,
        "finite": {"resnet_features": True}}}))
    r = CliRunner().invoke(ablate.app, ["run", "student", "--data", str(data), "--results", str(tmp_path / "store"),
                                        "--epochs", "1", "--device", "cpu", "--set", "module_dim=16"])
    assert_one_error_line(r.exit_code, r.output, "toy_appearance_feat.h5: 'resnet_features' has NaN or Inf values")


@pytest.mark.parametrize("video, why", [
    ("9" * 4000, "column 'video': " + "9" * 40 + "... (4,000 characters) is outside 0..9223372036854775807"),
    ("9" * 5000, "column 'video': '" + "9" * 39 + "... (5,002 characters) is not an integer"),
])
def test_a_huge_video_id_in_a_table_release_is_one_error_line(tmp_path, video, why):
    from tests.data.prepare.test_taskdata import NQ_HEADER, NQ_TEST, NQ_TRAIN, NQ_VAL, write_csv, write_glove

    ann = tmp_path / "nextqa"
    ann.mkdir()
    for s, rows in (("train", [(video,) + NQ_TRAIN[0][1:], *NQ_TRAIN[1:]]), ("val", NQ_VAL), ("test", NQ_TEST)):
        write_csv(ann / f"{s}.csv", rows, NQ_HEADER)
    write_glove(tmp_path / "glove.txt", ["what", "did"])
    code, text = run_prepare("next-qa", "--annotations", ann, "--glove", tmp_path / "glove.txt", "--out",
                             tmp_path / "out")
    assert_one_error_line(code, text, "train.csv: line 2, ", why)
    assert len(text) < 400 and not (tmp_path / "out").exists()
