"""Videos: finding a release's files and their ids, sampling clips (the reference's rule), and
decoding them with PyAV."""
from __future__ import annotations

import itertools
import re
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from harness.data.prepare.common import NEXTQA, TGIF_DATASETS, VIDEO_DATASETS, PrepareError, check_dataset

VIDEO_EXTENSIONS = (".avi", ".gif", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".wmv")
#: MSVD's file of ``<youtube clip name> vid<N>`` lines (an input of the release)
MAPPING_FILE = "youtube_mapping.txt"


# ----------------------------------------------------------------------------- finding videos


def read_youtube_mapping(path: Path) -> dict[int, str]:
    """MSVD's ``youtube_mapping.txt``: lines ``<youtube clip name> vid<N>`` -> {N: clip name}."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"MSVD video-name mapping {path} does not exist")
    out: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        m = re.fullmatch(r"vid(\d+)", parts[-1]) if len(parts) == 2 else None
        if not m:
            raise PrepareError(f"{path}: line {lineno} is not '<youtube name> vid<N>': {line!r}")
        vid = int(m.group(1))
        if vid in out and out[vid] != parts[0]:
            raise PrepareError(f"{path}: line {lineno}: vid{vid} is mapped twice ({out[vid]!r} and {parts[0]!r})")
        out[vid] = parts[0]
    if not out:
        raise PrepareError(f"{path}: empty mapping")
    return out


def find_mapping(*dirs: Path | None) -> Path | None:
    """The first ``youtube_mapping.txt`` in one of ``dirs`` or its parent."""
    for d in dirs:
        if d is not None:
            for p in (Path(d) / MAPPING_FILE, Path(d).parent / MAPPING_FILE):
                if p.is_file():
                    return p
    return None


def _ids_by_name(dataset: str, videos_dir: Path, mapping: Path | None, names: dict[int, str] | None
                 ) -> Callable[[Path], int | None]:
    """How a video file's name gives its id (None: not a video of the data set)."""
    if dataset in ("msrvtt-qa", NEXTQA):
        pattern = r"video(\d+)" if dataset == "msrvtt-qa" else r"(\d+)"

        def numbered(p: Path) -> int | None:
            m = re.fullmatch(pattern, p.stem)
            return int(m.group(1)) if m else None
        return numbered
    if dataset in TGIF_DATASETS:
        if names is None:
            raise PrepareError("TGIF-QA videos are named by the question files (gif_name -> key): pass --annotations")
        by_gif = {name: vid for vid, name in names.items()}
        return lambda p: by_gif.get(p.stem)
    mapping = mapping or find_mapping(videos_dir)
    if mapping is None:
        raise PrepareError(f"MSVD-QA needs {MAPPING_FILE} (lines '<youtube name> vid<N>'): none in "
                           f"{videos_dir} or its parent; pass --mapping FILE")
    by_name = {name: vid for vid, name in read_youtube_mapping(mapping).items()}
    return lambda p: by_name.get(p.stem)


def find_videos(dataset: str, videos_dir: Path, mapping: Path | None = None, names: dict[int, str] | None = None
                ) -> dict[int, Path]:
    """{video id: file} for every video under ``videos_dir`` (searched recursively): MSRVTT's
    ``video<N>.mp4`` (TrainValVideo/, TestVideo/), MSVD's ``<youtube name>.avi`` (YouTubeClips/)
    with ids from ``youtube_mapping.txt``, TGIF-QA's ``<gif_name>.gif`` with ids from ``names``
    ({key: gif_name}, from the question files), NExT-QA's ``<video id>.mp4`` (NExTVideo/<folder>/)."""
    check_dataset(dataset, VIDEO_DATASETS)
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise PrepareError(f"video directory {videos_dir} does not exist")
    id_of = _ids_by_name(dataset, videos_dir, mapping, names)
    out: dict[int, Path] = {}
    for p in sorted(p for p in videos_dir.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
        vid = id_of(p)
        if vid is None:
            continue
        if vid in out:
            raise PrepareError(f"two files for video id {vid}: {out[vid]} and {p}")
        out[vid] = p
    return out


# ----------------------------------------------------------------------------- clip sampling


def clip_frame_indices(total_frames: int, num_clips: int, num_frames: int) -> tuple[np.ndarray, bool]:
    """(num_clips, num_frames) frame indices, and whether frames had to be repeated (padded).

    The reference's ``extract_clips_with_consecutive_frames``: clip centres at
    ``linspace(0, total, num_clips + 2)`` (truncated to integers) without the two ends; each clip
    is the ``num_frames`` consecutive frames ``[c - num_frames // 2, c + num_frames // 2)``. At the
    start of a short video the window is clipped at frame 0 and padded in front with copies of
    frame 0; at its end, a window past the last frame is cut at ``total - 1`` (the reference
    excludes the last frame there) and padded behind with copies of frame ``total - 1``. For an
    odd ``num_frames`` the window is ``[c - num_frames // 2, c + num_frames - num_frames // 2)``
    (the reference would fail).
    """
    if total_frames < 1:
        raise ValueError(f"a video with {total_frames} frames has no clips")
    if num_clips < 1 or num_frames < 1:
        raise ValueError(f"num_clips and num_frames must be positive, got {num_clips}, {num_frames}")
    centres = np.linspace(0, total_frames, num_clips + 2, dtype=np.int32)[1:num_clips + 1]
    half = num_frames // 2
    out = np.empty((num_clips, num_frames), dtype=np.int64)
    padded = False
    for k, c in enumerate(centres.tolist()):
        start, end = max(c - half, 0), c + (num_frames - half)
        if end > total_frames:
            end = total_frames - 1
        idx = list(range(start, end))
        short = num_frames - (end - start)
        if start == 0 and short > 0:
            idx = [0] * short + idx
            padded = True
        if end == total_frames - 1 and short > 0:
            idx = idx + [end] * short
            padded = True
        out[k] = idx[:num_frames]
    return out, padded


# ----------------------------------------------------------------------------- decoding


class VideoError(Exception):
    """A video that cannot be decoded."""


@dataclass
class DecodedVideo:
    video_id: int
    path: Path
    clips: np.ndarray | None  # (clips, frames, H, W, 3) uint8, None when unreadable
    total_frames: int
    padded: bool = False
    error: str | None = None
    warning: str | None = None


#: the first box of an ISO base media file (mp4, mov, m4v, 3gp)
_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"styp", b"pnot"}


def _iso_damage(f, size: int) -> str | None:
    """What is wrong with an ISO base media file's top-level boxes (None: nothing seen)."""
    off, kinds = 0, set()
    while off + 8 <= size:
        f.seek(off)
        head = f.read(16)
        n, kind = struct.unpack(">I4s", head[:8])
        if n == 1 and len(head) == 16:
            n = struct.unpack(">Q", head[8:])[0]
        elif n == 0:
            n = size - off
        name = kind.decode("latin-1")
        if n < 8:
            return f"its {name!r} box at byte {off} has the impossible size {n}"
        if off + n > size:
            return f"its {name!r} box at byte {off} needs {n} bytes, {off + n - size} more than the file has"
        kinds.add(kind)
        off += n
    return None if b"moov" in kinds else "it has no 'moov' box (the index of its frames)"


def container_damage(path: Path) -> str | None:
    """A truncated or damaged container, told by the sizes its headers declare: an mp4 / mov box
    running past the end of the file (or no index box), an AVI's RIFF size larger than the file.
    None when nothing is seen (other formats are not checked)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:4] == b"RIFF" and len(head) >= 8:
                declared = struct.unpack("<I", head[4:8])[0] + 8
                return (f"its RIFF header declares {declared} bytes, the file has {size}" if declared > size
                        else None)
            if head[4:8] in _ISO_BOXES:
                return _iso_damage(f, size)
    except OSError as e:
        return f"cannot read it ({e})"
    return None


def _ffmpeg_error(e: Exception) -> str:
    """An FFmpeg error without the file name it repeats."""
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


def _open(path: Path):
    """The container, or a VideoError saying why not: an empty file, a truncated or damaged
    container, or a file FFmpeg cannot read at all (not a video)."""
    try:
        return av.open(str(path))
    except Exception as e:  # every kind of unreadable file
        if path.is_file() and path.stat().st_size == 0:
            raise VideoError("empty file (0 bytes)") from None
        damage = container_damage(path)
        if damage is not None:
            raise VideoError(f"truncated or damaged: {damage}; FFmpeg cannot open it ({_ffmpeg_error(e)})") from None
        raise VideoError(f"not a video FFmpeg can read ({_ffmpeg_error(e)})") from None


def _decode(path: Path, wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int, str | None]:
    """Decode a video's first video stream (other streams, audio included, are not decoded); keep
    the frames in ``wanted`` (all when None) as RGB. Returns (frames, number decoded, warning). A
    decoding error after the first frames ends the video there (with a warning); before any frame
    it raises VideoError."""
    kept: dict[int, np.ndarray] = {}
    n, warning = 0, None
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if wanted is None or n in wanted:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
        except Exception as e:
            if n == 0:
                raise VideoError(f"cannot decode any frame ({_ffmpeg_error(e)})") from None
            warning = f"decoding stopped after {n} frames ({_ffmpeg_error(e)})"
    if n == 0:
        raise VideoError("no decodable frame")
    return kept, n, warning


def _frame_count(path: Path) -> int:
    """The container's frame count (0 when it has none or the file does not open)."""
    try:
        with av.open(str(path)) as c:
            return int(c.streams.video[0].frames) if c.streams.video else 0
    except Exception:  # reported by the decoding pass
        return 0


def _sampled_frames(path: Path, num_clips: int, num_frames: int
                    ) -> tuple[dict[int, np.ndarray], int, np.ndarray, bool, str | None]:
    """Decode once keeping the frames the container's frame count predicts; decode again when the
    count was wrong. Returns (frames, total, indices, padded, warning)."""
    meta = _frame_count(path)
    wanted = set(clip_frame_indices(meta, num_clips, num_frames)[0].ravel().tolist()) if meta > 0 else None
    kept, total, warning = _decode(path, wanted)
    idx, padded = clip_frame_indices(total, num_clips, num_frames)
    need = set(idx.ravel().tolist())
    if not need <= kept.keys():
        kept, total2, warning = _decode(path, need)
        if total2 != total or not need <= kept.keys():
            raise VideoError(f"decoded {total} frames, then {total2}: the video does not decode the same twice")
    if total < meta:  # a truncated file often decodes its first frames without an error
        damage = container_damage(path)
        fewer = f"the container declares {meta} frames, {total} decoded: truncated or damaged"
        warning = "; ".join(w for w in (warning, fewer + (f" ({damage})" if damage else "")) if w)
    return kept, total, idx, padded, warning


def decode_clips(video_id: int, path: Path, num_clips: int, num_frames: int) -> DecodedVideo:
    """The sampled clips of a video, never raising: an unreadable video has ``error`` set.

    Frames are counted by decoding (the container's frame count, when it has one, only chooses
    which frames to keep in a single pass; a second pass runs when the count was wrong)."""
    path = Path(path)
    try:
        kept, total, idx, padded, warning = _sampled_frames(path, num_clips, num_frames)
        clips = np.stack([np.stack([kept[i] for i in row]) for row in idx.tolist()])
        return DecodedVideo(video_id, path, clips, total, padded, None, warning)
    except VideoError as e:
        return DecodedVideo(video_id, path, None, 0, False, str(e))
    except Exception as e:  # any failure on one video is reported, not fatal
        return DecodedVideo(video_id, path, None, 0, False, f"{type(e).__name__}: {e}")


def prefetch(fn: Callable, items: list, workers: int, depth: int) -> Iterator:
    """``fn(item)`` for every item, computed ``workers`` at a time in threads (PyAV decodes without
    the GIL), yielded in order with at most ``depth`` results waiting."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as ex:
        it = iter(items)
        queue = deque(ex.submit(fn, x) for x in itertools.islice(it, depth))
        while queue:
            fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(ex.submit(fn, nxt))
            yield fut.result()
