"""harness.data.prepare: from (tiny, generated) release files and videos to features that load and train."""
import json
import pickle
import shutil
from pathlib import Path

import av  # a dependency of the project: if missing, this must fail, not skip
import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from harness.data import dataset as D
from harness.data import prepare as P

# --------------------------------------------------------------------------- clip sampling


def test_clip_frame_indices_long_video():
    # 100 frames, 3 clips of 4: centres linspace(0, 100, 5)[1:4] = 25, 50, 75; windows [c-2, c+2)
    idx, padded = P.clip_frame_indices(100, 3, 4)
    assert idx.tolist() == [[23, 24, 25, 26], [48, 49, 50, 51], [73, 74, 75, 76]] and not padded
    # 8 x 16 on 300 frames (an MSVD-length video): centres 33, 66, ..., 266
    idx, padded = P.clip_frame_indices(300, 8, 16)
    assert idx.shape == (8, 16) and idx[0].tolist() == list(range(25, 41)) and idx[-1, 0] == 258 and not padded


def test_clip_frame_indices_short_video_pads_like_the_reference():
    # 10 frames, 2 clips of 8: centres int(linspace(0, 10, 4)) = 3, 6
    # clip 1: [-1, 7) -> start clipped to 0 -> frames 0..6, one copy of frame 0 in front
    # clip 2: [2, 10) -> end 10 is not past the video: frames 2..9
    idx, padded = P.clip_frame_indices(10, 2, 8)
    assert idx.tolist() == [[0, 0, 1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7, 8, 9]] and padded
    # 7 frames, 2 clips of 6: centres 2, 4; clip 2: [1, 7) fits; clip 1: [-1, 5) -> 0..4 + one 0 in front
    assert P.clip_frame_indices(7, 2, 6)[0].tolist() == [[0, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]
    # 3 frames, 2 clips of 4: centres 1, 2; clip 2: [0, 4) -> end past the video -> cut at 2 (the
    # reference drops the last frame there), frames 0, 1, padded in front with frame 0 (start was clipped)
    assert P.clip_frame_indices(3, 2, 4)[0].tolist() == [[0, 0, 1, 2], [0, 0, 0, 1]]
    # a single frame: every index 0
    assert P.clip_frame_indices(1, 2, 4)[0].tolist() == [[0] * 4] * 2
    with pytest.raises(ValueError):
        P.clip_frame_indices(0, 2, 4)


# --------------------------------------------------------------------------- video names


def test_video_names_to_ids(tmp_path):
    # MSRVTT: video<N>.mp4 in TrainValVideo/ and TestVideo/
    for d, n in (("TrainValVideo", 0), ("TrainValVideo", 6512), ("TestVideo", 9999)):
        (tmp_path / "msrvtt" / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / "msrvtt" / d / f"video{n}.mp4").touch()
    (tmp_path / "msrvtt" / "notes.txt").touch()
    found = P.find_videos("msrvtt-qa", tmp_path / "msrvtt")
    assert {k: v.name for k, v in found.items()} == {0: "video0.mp4", 6512: "video6512.mp4", 9999: "video9999.mp4"}
    # MSVD: <youtube name>.avi, ids from youtube_mapping.txt ("<name> vid<N>"), found beside the videos' folder
    (tmp_path / "msvd" / "YouTubeClips").mkdir(parents=True)
    (tmp_path / "msvd" / "youtube_mapping.txt").write_text("-_hbPLsZvvo_5_8 vid1\nzv2RIbUsnSw_335_341 vid2\n")
    (tmp_path / "msvd" / "YouTubeClips" / "-_hbPLsZvvo_5_8.avi").touch()
    assert {k: v.name for k, v in P.find_videos("msvd-qa", tmp_path / "msvd").items()} == {1: "-_hbPLsZvvo_5_8.avi"}
    (tmp_path / "msvd" / "youtube_mapping.txt").write_text("-_hbPLsZvvo_5_8 1\n")
    with pytest.raises(P.PrepareError, match=r"youtube_mapping.txt: line 1 is not '<youtube name> vid<N>'"):
        P.find_videos("msvd-qa", tmp_path / "msvd")
    # ids in the QA files: integers, or "vidN" / "videoN" strings
    assert [P.parse_video_id(v, "x") for v in (7, "7", "vid7", "video7")] == [7, 7, 7, 7]
    with pytest.raises(P.PrepareError, match="x: video_id 'abc' is not an integer"):
        P.parse_video_id("abc", "x")


# --------------------------------------------------------------------------- fixtures

NAMES = {1: "-abc_DEF1_0_10", 2: "xyz2_5_15", 3: "short3_1_2", 4: "bad4_0_1", 5: "q5_3_8", 6: "r6_2_9"}
FRAMES = {1: 30, 2: 24, 3: 3, 5: 36, 6: 28}  # 3: too short for 2 clips x 4 frames; 4: not a video


def write_video(path: Path, n_frames: int, seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n_frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.roll(base, 2 * i, axis=1), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def qa(q, a, v, i):
    return {"question": q, "answer": a, "video_id": v, "id": i}


TRAIN = [qa("what is a man doing?", "dance", 1, 0), qa("what's the man's hat?", "hat", 2, 1),
         qa("who is dancing?", "man", 1, 2), qa("what is a man doing?", "dance", 3, 3),
         qa("who is singing?", "man", 5, 4), qa("how is the woman dancing?", "slowly", 6, 5),
         qa("what is it?", "dance", 4, 6), qa("where is the cat?", "garden", 5, 7)]
VAL = [qa("what is a girl doing?", "dance", 2, 100), qa("where is the dog?", "garden", 6, 101),
       qa("who is the zebra?", "man", 3, 102)]
TEST = [qa("what is the man doing?", "dance", 5, 200), qa("who's jumping?", "woman", 1, 201),
        qa("what is a car?", "man", 4, 202), qa("how is it done?", "slowly", 6, 203)]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny MSVD-QA-like release: QA json files, youtube_mapping.txt, videos, a GloVe file."""
    root = tmp_path_factory.mktemp("release")
    ann = root / "MSVD-QA"
    ann.mkdir()
    for split, recs in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (ann / f"{split}_qa.json").write_text(json.dumps(recs))
    (ann / "youtube_mapping.txt").write_text("".join(f"{n} vid{v}\n" for v, n in NAMES.items()))
    vids = root / "video" / "YouTubeClips"
    vids.mkdir(parents=True)
    for v, n in FRAMES.items():
        write_video(vids / f"{NAMES[v]}.avi", n, seed=v)
    (vids / f"{NAMES[4]}.avi").write_bytes(b"this is not a video\n" * 50)
    (vids / "unrelated.avi").write_bytes(b"")  # not in the mapping: ignored
    rng = np.random.default_rng(0)
    lines = [". . . " + " ".join("1" for _ in range(8))]  # a GloVe 840B-style entry with spaces in the word
    for w in ("what", "is", "a", "man", "doing", "'s", "who", "the", "man", "dancing", "Hat"):
        lines.append(w + " " + " ".join(f"{x:.4f}" for x in rng.normal(size=8)))
    (root / "glove.txt").write_text("\n".join(lines) + "\n")
    return root


def run_cli(*args):
    """(exit code, output with whitespace runs as single spaces)."""
    res = CliRunner().invoke(P.build_cli(), [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())


@pytest.fixture(scope="module")
def questions_out(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    code, output = run_cli("questions", "--dataset", "msvd-qa", "--annotations", release / "MSVD-QA",
                           "--glove", release / "glove.txt", "--out", out, "--answer-top", "3")
    assert code == 0, output
    return out


FEATURE_ARGS = ["--dataset", "msvd-qa", "--appearance", "resnet101", "--motion", "r2plus1d_18", "--clips", "2",
                "--frames", "4", "--image-size", "32", "--motion-size", "32", "--batch-size", "2", "--workers", "1",
                "--device", "cpu", "--random-weights", "--no-progress"]


@pytest.fixture(scope="module")
def prepared(release, questions_out):
    code, output = run_cli("features", "--videos", release / "video", "--annotations", release / "MSVD-QA",
                           "--out", questions_out, *FEATURE_ARGS)
    assert code == 0, output
    return questions_out, output


# --------------------------------------------------------------------------- questions


def test_questions_follow_the_reference_rules(questions_out):
    vocab = json.loads((questions_out / "msvd-qa_vocab.json").read_text())
    # answers: <UNK0>, <UNK1>, then the top 3 training answers (dance 3, man 2, then hat / slowly / garden
    # with 1 each: ties in order of first appearance -> hat)
    assert vocab["answer_token_to_idx"] == {"<UNK0>": 0, "<UNK1>": 1, "dance": 2, "man": 3, "hat": 4}
    q = vocab["question_token_to_idx"]
    assert list(q)[:8] == ["<NULL>", "<UNK>", "what", "is", "a", "man", "doing", "'s"]
    assert vocab["question_answer_token_to_idx"] == {"<NULL>": 0, "<UNK>": 1}

    def load(split):
        with open(questions_out / f"msvd-qa_{split}_questions.pt", "rb") as f:
            return pickle.load(f)

    tr, va, te = load("train"), load("val"), load("test")
    # train: the questions whose answer is outside the vocabulary (slowly, garden) are dropped
    assert tr["question_id"].tolist() == [0, 1, 2, 3, 4, 6]
    assert tr["answers"].tolist() == [2, 4, 3, 2, 3, 2]
    assert tr["video_ids"].tolist() == [1, 2, 1, 3, 5, 4]
    # "what's the man's hat" -> what 's the man 's hat; padded with <NULL> to the split's longest question
    assert tr["questions"][1].tolist() == [q[t] for t in ("what", "'s", "the", "man", "'s", "hat")]
    assert tr["questions_len"].tolist() == [5, 6, 3, 5, 3, 3] and tr["questions"].shape == (6, 6)
    assert (tr["questions"][0, 5:] == 0).all()
    # val / test: kept, an answer outside the vocabulary is <UNK1> = 1; unknown words are <UNK> = 1
    assert va["answers"].tolist() == [2, 1, 3] and va["question_id"].tolist() == [100, 101, 102]
    assert te["answers"].tolist() == [2, 1, 3, 1]
    assert va["questions"][0].tolist() == [q["what"], q["is"], q["a"], 1, q["doing"]]  # girl: unknown
    assert te["questions"][1].tolist()[:3] == [q["who"], q["'s"], 1]
    # GloVe: exact (case-sensitive) matches; missing words, <NULL> and <UNK> are zeros; same matrix everywhere
    g = tr["glove"]
    assert g.shape == (len(q), 8) and g.dtype == np.float32
    assert np.abs(g[q["what"]]).sum() > 0 and np.abs(g[q["'s"]]).sum() > 0
    assert not g[[0, 1, q["hat"], q["singing"]]].any()  # "Hat" in GloVe is not "hat"
    assert np.array_equal(va["glove"], g) and np.array_equal(te["glove"], g)
    report = json.loads((questions_out / "msvd-qa_questions_report.json").read_text())
    assert report["splits"]["train"]["dropped_oov_answer"] == 2
    assert report["splits"]["test"]["oov_answer_as_unk1"] == 2


def test_questions_errors_name_the_file_and_record(release, tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    for s in ("train", "val", "test"):
        (ann / f"{s}_qa.json").write_text((release / "MSVD-QA" / f"{s}_qa.json").read_text())
    (ann / "val_qa.json").write_text(json.dumps([VAL[0], {"question": "what?", "video_id": 2}]))
    code, output = run_cli("questions", "--dataset", "msvd-qa", "--annotations", ann, "--glove",
                           release / "glove.txt", "--out", tmp_path / "out")
    assert code == 2 and "val_qa.json: record 1 has no 'answer'" in output
    (ann / "val_qa.json").write_text(json.dumps(VAL))
    (ann / "youtube_mapping.txt").write_text("-abc_DEF1_0_10 vid1\n")
    with pytest.raises(P.PrepareError, match=r"train_qa.json: video id\(s\) vid2, vid3, vid4, vid5, vid6 are not in"):
        P.prepare_questions("msvd-qa", ann, release / "glove.txt", tmp_path / "out")
    assert not (tmp_path / "out" / "msvd-qa_vocab.json").exists()


# --------------------------------------------------------------------------- features


def test_features_load_with_the_questions(prepared):
    out, log = prepared
    d = D.load(out)
    assert d.name == "msvd-qa"
    assert d.dims == {"question_vocab": d.dims["question_vocab"], "answer_vocab": 5, "vision_dim": 2048,
                      "word_dim": 8, "num_clips": 2, "num_frames": 4, "motion_dim": 512}
    with h5py.File(out / "msvd-qa_appearance_feat.h5") as fa, h5py.File(out / "msvd-qa_motion_feat.h5") as fm:
        ids = fa["ids"][()]
        assert sorted(ids.tolist()) == [1, 2, 3, 4, 5, 6] and np.array_equal(ids, fm["ids"][()])
        app, mot = fa["resnet_features"][()], fm["resnext_features"][()]
        assert app.shape == (6, 2, 4, 2048) and mot.shape == (6, 2, 512)
        assert fm["resnext_features"].attrs["model"] == "r2plus1d_18"
        assert fa["resnet_features"].attrs["weights"] == "random"
        nframes = dict(zip(ids.tolist(), fa["num_frames"][()].tolist()))
    assert nframes == {**FRAMES, 4: 0}
    row = {v: i for i, v in enumerate(ids.tolist())}
    # the unreadable video has zero features (as in the reference), the others do not
    assert not app[row[4]].any() and not mot[row[4]].any()
    assert all(np.abs(app[row[v]]).sum() > 0 and np.abs(mot[row[v]]).sum() > 0 for v in FRAMES)
    # both are reported by name, on the console and in the report file
    assert "unreadable video 4" in log and NAMES[4] in log and "short video 3" in log
    report = json.loads((out / "msvd-qa_features_report.json").read_text())
    assert [u["id"] for u in report["unreadable"]] == [4] and NAMES[4] in report["unreadable"][0]["file"]
    assert report["padded"] == [{"id": 3, "file": report["padded"][0]["file"], "frames": 3}]


@pytest.mark.slow
def test_features_resume(release, prepared, tmp_path):
    out, _ = prepared
    # a second run finds every video done
    code, output = run_cli("features", "--videos", release / "video", "--annotations", release / "MSVD-QA",
                           "--out", out, *FEATURE_ARGS)
    assert code == 0 and "0 videos processed, 6 already done; complete" in output
    with h5py.File(out / "msvd-qa_appearance_feat.h5") as fa, h5py.File(out / "msvd-qa_motion_feat.h5") as fm:
        ids, full_app, full_mot = fa["ids"][()], fa["resnet_features"][()], fm["resnext_features"][()]
    # a partial run (3 videos), then an interrupted batch: the appearance file got one more video and
    # the motion file's features were resized without their ids
    part = tmp_path / "part"
    part.mkdir()
    for f in out.glob("msvd-qa_*_questions.pt"):
        shutil.copy(f, part)
    shutil.copy(out / "msvd-qa_vocab.json", part)
    settings = P.FeatureSettings(clips=2, frames=4, image_size=32, motion_size=32, batch_size=2, workers=0,
                                 device="cpu", random_weights=True)
    mapping = release / "MSVD-QA" / "youtube_mapping.txt"
    s = P.extract_features("msvd-qa", release / "video", part, settings, mapping=mapping, only={1, 2, 3},
                           progress=False)
    assert s.processed == 3
    with h5py.File(part / "msvd-qa_appearance_feat.h5", "a") as fa, \
            h5py.File(part / "msvd-qa_motion_feat.h5", "a") as fm:
        for ds in (fa["resnet_features"], fa["ids"], fa["num_frames"], fm["resnext_features"]):
            ds.resize(ds.shape[0] + 1, axis=0)
        fa["ids"][-1] = 5
    s = P.extract_features("msvd-qa", release / "video", part, settings, mapping=mapping, progress=False)
    assert s.skipped == 3 and s.processed == 3 and s.complete
    d = D.load(part)  # ids agree between the files, every question's video is there
    with h5py.File(part / "msvd-qa_appearance_feat.h5") as fa, h5py.File(part / "msvd-qa_motion_feat.h5") as fm:
        pids = fa["ids"][()]
        assert sorted(pids.tolist()) == [1, 2, 3, 4, 5, 6] and len(pids) == 6
        prow, frow = {v: i for i, v in enumerate(pids.tolist())}, {v: i for i, v in enumerate(ids.tolist())}
        for v in range(1, 7):  # the same features as the uninterrupted run (up to float noise: other batches)
            np.testing.assert_allclose(fa["resnet_features"][prow[v]], full_app[frow[v]], rtol=1e-4, atol=1e-2)
            np.testing.assert_allclose(fm["resnext_features"][prow[v]], full_mot[frow[v]], rtol=1e-4, atol=1e-4)
    assert d.features.num_videos == 6
    for where in (out, part):  # what earlier runs reported is kept, once
        report = json.loads((where / "msvd-qa_features_report.json").read_text())
        assert [u["id"] for u in report["unreadable"]] == [4] and [u["id"] for u in report["padded"]] == [3]
    # other settings on the same files are refused, naming the file and the setting
    for change, message in (({"clips": 3}, r"appearance_feat.h5: data set 'resnet_features' has shape "
                                           r"\(6, 2, 4, 2048\)"),
                            ({"motion": "r3d_18"}, r"motion_feat.h5: 'resnext_features' was written with "
                                                   r"model='r2plus1d_18', this run uses model='r3d_18'")):
        with pytest.raises(P.PrepareError, match=message):
            P.extract_features("msvd-qa", release / "video", part, mapping=mapping, progress=False,
                               settings=P.FeatureSettings(**{**settings.__dict__, **change}))


def test_features_errors(release, tmp_path, monkeypatch):
    # a referenced video without a file: an error naming it, unless --allow-missing
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / f"{NAMES[1]}.avi").write_bytes((release / "video" / "YouTubeClips" / f"{NAMES[1]}.avi").read_bytes())
    code, output = run_cli("features", "--videos", videos, "--annotations", release / "MSVD-QA", "--out",
                           tmp_path / "o", *FEATURE_ARGS)
    assert code == 2 and "5 videos referenced by the QA files" in output and "ids 2, 3, 4, 5, 6" in output
    # no weights: a plain message saying where they were looked for and what to do
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    args = [a for a in FEATURE_ARGS if a != "--random-weights"]
    code, text = run_cli("features", "--videos", release / "video", "--mapping",
                         release / "MSVD-QA" / "youtube_mapping.txt", "--out", tmp_path / "o", *args)
    assert code == 2, text
    assert "no weights for appearance model resnet101" in text and "--appearance-weights PATH" in text
    assert "does not download" in text


def test_train_on_prepared_data(prepared, tmp_path):
    from harness.training.plan import RunSpec
    from harness.training.runner import train
    from harness.runs.store import ResultsStore

    out, _ = prepared
    rec = train(RunSpec(variant="dualvgr", data=str(out), epochs=1, batch_size=4, seed=0,
                        overrides={"module_dim": 16}), ResultsStore(tmp_path / "results"), device="cpu", progress=False)
    assert rec["status"] == "complete"
    assert rec["variant_config"]["model"]["motion_dim"] == 512 and rec["variant_config"]["model"]["vision_dim"] == 2048
    assert rec["metrics"]["test"]["n"] == 4 and not rec["cost"]["errors"]


def test_prepared_files_honour_the_umask(prepared):
    """Group members on a shared cluster read prepared data as they would any file: the outputs
    are written with the process's umask (the fixtures run under pytest's, typically 022), not
    mkstemp's owner-only 0600."""
    import os
    import stat

    out, _ = prepared
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, (p, oct(p.stat().st_mode))
