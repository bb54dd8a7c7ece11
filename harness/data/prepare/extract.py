"""``python -m harness.data.prepare features``: videos to the appearance and motion feature files, by
the sampling of HCRN's ``preprocess_features.py`` (see :mod:`harness.data.prepare`); resumable."""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from harness.data import layout as L
from harness.console import plural, progress_bar
from harness.env import resolve_device
from harness.files import atomic_write_json
from harness.data.prepare.backbones import Backbone, build_appearance, build_motion, preprocess
from harness.data.prepare.common import NEXTQA, TGIF_DATASETS, VIDEO_DATASETS, PrepareError, check_dataset
from harness.data.prepare.nextqa import nextqa_video_ids
from harness.data.prepare.questions import video_ids_of
from harness.data.prepare.tgif import tgif_video_names
from harness.data.prepare.video import DecodedVideo, decode_clips, find_mapping, find_videos, prefetch
from harness.data.prepare.writer import FeatureFiles, feature_attrs

#: the lists of the features report that concern videos already in the files (kept on resuming)
REPORT_LISTS = ("unreadable", "padded", "warnings")


@dataclass
class FeatureSettings:
    appearance: str = "resnet101"
    motion: str = "r2plus1d_18"
    clips: int = 8
    frames: int = 16
    image_size: int = 224
    motion_size: int = 112
    batch_size: int = 4
    appearance_weights: Path | None = None
    motion_weights: Path | None = None
    random_weights: bool = False
    device: str = "auto"
    workers: int = 2
    allow_missing: bool = False


@dataclass
class FeatureSummary:
    appearance: Path
    motion: Path
    report: Path
    total: int = 0
    skipped: int = 0
    processed: int = 0
    unreadable: list = field(default_factory=list)  # {"id", "file", "error"}
    padded: list = field(default_factory=list)  # {"id", "file", "frames"}
    warnings: list = field(default_factory=list)  # {"id", "file", "warning"}
    missing: list = field(default_factory=list)  # video ids referenced by questions without a file
    complete: bool = False


# ----------------------------------------------------------------------------- setting up


def _check_settings(dataset: str, s: FeatureSettings) -> None:
    check_dataset(dataset, VIDEO_DATASETS)
    for k in ("clips", "frames", "image_size", "motion_size", "batch_size"):
        if getattr(s, k) < 1:
            raise PrepareError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(s, k)}")


def _tgif_names(dataset: str, annotations: Path | None) -> dict[int, str] | None:
    """TGIF-QA's {key: gif_name} from the question files (None for the other data sets)."""
    if dataset not in TGIF_DATASETS:
        return None
    if annotations is None:
        raise PrepareError(f"{dataset}: --annotations is needed: TGIF-QA's question files name the GIFs "
                           f"(gif_name) and their ids (key)")
    return tgif_video_names(annotations, dataset.removeprefix("tgif-qa-"))


def _targets(dataset: str, videos: Path, annotations: Path | None, mapping: Path | None, only: Iterable[int] | None,
             s: FeatureSettings, summary: FeatureSummary) -> dict[int, Path | None]:
    """{video id: file, or None for a referenced video without one (``--allow-missing``)}."""
    if dataset == "msvd-qa" and mapping is None:
        mapping = find_mapping(annotations, videos)
    names = _tgif_names(dataset, annotations)
    files = find_videos(dataset, videos, mapping, names)
    if annotations is not None:
        wanted_ids = (set(names) if names is not None else nextqa_video_ids(annotations) if dataset == NEXTQA
                      else video_ids_of(annotations))
        summary.missing = sorted(wanted_ids - files.keys())
        if summary.missing and not s.allow_missing:
            listed = ", ".join(map(str, summary.missing[:20]))
            raise PrepareError(f"{plural(len(summary.missing), 'video')} referenced by the QA files in {annotations} "
                               f"{'has' if len(summary.missing) == 1 else 'have'} no "
                               f"file under {videos}: ids {listed}{' ...' if len(summary.missing) > 20 else ''} "
                               f"(pass --allow-missing to give them zero features)")
        targets = {v: files.get(v) for v in wanted_ids}
    else:
        targets = dict(files)
        if not targets:
            like = {"msrvtt-qa": "video<N>.mp4", NEXTQA: "<video id>.mp4"}.get(dataset, "<youtube name>.avi from "
                                                                                 "the mapping")
            raise PrepareError(f"no video under {videos} is named like a {dataset} video ({like})")
    if only is not None:
        only = set(only)
        targets = {v: p for v, p in targets.items() if v in only}
    return targets


def _device(name: str) -> torch.device:
    try:
        dev = resolve_device(name)
    except ValueError as e:
        raise PrepareError(f"--{e}") from None
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    return dev


def _attrs(model: Backbone, s: FeatureSettings) -> dict:
    return feature_attrs(model.name, model.weights, model.weights_path, model.size, s.clips, s.frames)


# ----------------------------------------------------------------------------- the extraction


class _Extraction:
    """One run over the videos not yet in the files: decoding threads feed batches through both
    backbones; every batch is appended to the files, every new problem rewrites the report."""

    def __init__(self, dataset: str, videos: Path, targets: dict[int, Path | None], s: FeatureSettings,
                 app_model: Backbone, mot_model: Backbone, dev: torch.device, ff: FeatureFiles,
                 summary: FeatureSummary, console: Console):
        self.dataset, self.videos, self.targets, self.s = dataset, videos, targets, s
        self.app_model, self.mot_model, self.dev, self.ff = app_model, mot_model, dev, ff
        self.summary, self.console = summary, console

    def restore_report(self) -> None:
        """What earlier runs reported about the videos that are in the files (the others are redone)."""
        path = self.summary.report
        try:
            previous = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            previous = {}
        for key in REPORT_LISTS:
            getattr(self.summary, key).extend(e for e in previous.get(key, []) if e.get("id") in self.ff.done)

    def write_report(self) -> None:
        sm = self.summary
        atomic_write_json(sm.report, {
            "dataset": self.dataset, "videos": str(self.videos), "appearance": _attrs(self.app_model, self.s),
            "motion": _attrs(self.mot_model, self.s), **{k: getattr(sm, k) for k in REPORT_LISTS},
            "missing": sm.missing})

    def decode(self, v: int) -> DecodedVideo:
        p = self.targets[v]
        if p is None:
            return DecodedVideo(v, Path(f"<no file for video id {v}>"), None, 0, False, "no video file")
        return decode_clips(v, p, self.s.clips, self.s.frames)

    def _announce(self, todo: list[int]) -> None:
        sm, s, a, m = self.summary, self.s, self.app_model, self.mot_model
        if s.random_weights:
            self.console.print("[yellow]--random-weights: the features are meaningless (for tests only)[/yellow]")
        self.console.print(f"{self.dataset}: {len(self.targets)} videos, {sm.skipped} already in {sm.appearance.name}, "
                           f"{len(todo)} to do on {self.dev} ({a.name} {a.weights}, {m.name} {m.weights})",
                           highlight=False, markup=False)

    def _batches(self, todo: list[int]) -> Iterable[list[DecodedVideo]]:
        s = self.s
        stream = prefetch(self.decode, todo, s.workers, depth=max(2 * s.workers, s.batch_size) + s.batch_size)
        while batch := list(itertools.islice(stream, s.batch_size)):
            yield batch

    def run(self, progress: bool) -> None:
        sm = self.summary
        todo = sorted(v for v in self.targets if v not in self.ff.done)
        sm.total, sm.skipped = len(self.targets), len(self.targets) - len(todo)
        self._announce(todo)
        live = progress and self.console.is_terminal  # else a plain line every 500 videos (logs)
        bar = progress_bar(self.console, disable=not live)
        with bar, torch.inference_mode():
            task = bar.add_task("videos", total=len(self.targets), completed=sm.skipped, info="")
            for batch in self._batches(todo):
                if self.run_batch(batch):
                    self.write_report()
                sm.processed += len(batch)
                bar.update(task, advance=len(batch), info=f"{len(sm.unreadable)} unreadable, {len(sm.padded)} padded")
                if progress and not live and sm.processed % 500 < len(batch):
                    self.console.print(f"{sm.processed}/{len(todo)} videos", highlight=False)
        sm.complete = all(v in self.ff.done for v in self.targets)
        self.write_report()

    def features(self, batch: list[DecodedVideo]) -> tuple[np.ndarray, np.ndarray]:
        """(videos, clips, frames, app dim) and (videos, clips, motion dim) features of a batch, one
        forward pass per backbone; zeros for the unreadable videos."""
        C, F, a, m = self.s.clips, self.s.frames, self.app_model, self.mot_model
        app_out = np.zeros((len(batch), C, F, a.dim), dtype=np.float32)
        mot_out = np.zeros((len(batch), C, m.dim), dtype=np.float32)
        rows = [i for i, d in enumerate(batch) if d.clips is not None]
        if not rows:
            return app_out, mot_out
        app_in, mot_in = [], []
        for i in rows:  # videos differ in size: resize each, then batch
            clips = batch[i].clips
            frames = torch.from_numpy(clips.reshape(C * F, *clips.shape[2:])).to(self.dev, non_blocking=True)
            app_in.append(preprocess(frames, a.size, a.mean, a.std))
            x = preprocess(frames, m.size, m.mean, m.std)
            mot_in.append(x.view(C, F, 3, m.size, m.size).transpose(1, 2))  # (C, 3, F, S, S)
        app_out[rows] = a.module(torch.cat(app_in)).float().view(len(rows), C, F, a.dim).cpu().numpy()
        mot_out[rows] = m.module(torch.cat(mot_in)).float().view(len(rows), C, m.dim).cpu().numpy()
        return app_out, mot_out

    def record_issues(self, batch: list[DecodedVideo]) -> bool:
        """Report the batch's unreadable, short and warned-about videos by name; whether there was one."""
        sm, say, new_issue = self.summary, self.console.print, False
        for d in batch:
            name = str(d.path)
            if d.error is not None:
                sm.unreadable.append({"id": d.video_id, "file": name, "error": d.error})
                say(f"unreadable video {d.video_id} ({name}): {d.error}; written as zeros", style="red",
                    highlight=False, markup=False)
            elif d.padded:
                sm.padded.append({"id": d.video_id, "file": name, "frames": d.total_frames})
                say(f"short video {d.video_id} ({name}): {d.total_frames} frames, fewer than {self.s.clips} clips x "
                    f"{self.s.frames} frames need; padded by repeating its first / last frame", style="yellow",
                    highlight=False, markup=False)
            if d.warning:
                sm.warnings.append({"id": d.video_id, "file": name, "warning": d.warning})
                say(f"warning video {d.video_id} ({name}): {d.warning}", style="yellow", highlight=False,
                    markup=False)
            new_issue = new_issue or d.error is not None or d.padded or bool(d.warning)
        return new_issue

    def run_batch(self, batch: list[DecodedVideo]) -> bool:
        """Features of a batch of decoded videos, appended to the files; whether it had a problem to report."""
        app_out, mot_out = self.features(batch)
        new_issue = self.record_issues(batch)
        ids = np.asarray([d.video_id for d in batch], dtype=np.int64)
        finite = np.isfinite(app_out).all(axis=(1, 2, 3)) & np.isfinite(mot_out).all(axis=(1, 2))
        if not finite.all():
            raise PrepareError(f"NaN or Inf features for video id(s) {ids[~finite].tolist()}: check the weights and "
                               f"the device")
        self.ff.append(ids, app_out, mot_out, np.asarray([d.total_frames for d in batch], dtype=np.int64))
        return new_issue


def _print_summary(summary: FeatureSummary, console: Console) -> None:
    say = console.print
    say(f"{summary.processed} videos processed, {summary.skipped} already done; "
        f"{'complete' if summary.complete else 'NOT complete'}: {summary.appearance}, {summary.motion}",
        highlight=False, markup=False)
    if summary.unreadable:
        say(f"{plural(len(summary.unreadable), 'unreadable video')}, written as zero features: "
            + ", ".join(f"{u['id']} ({Path(u['file']).name})" for u in summary.unreadable[:20]),
            style="red", highlight=False, markup=False)
    if summary.padded:
        say(f"{plural(len(summary.padded), 'short video')}, padded: "
            + ", ".join(f"{u['id']} ({Path(u['file']).name}, {u['frames']} frames)" for u in summary.padded[:20]),
            style="yellow", highlight=False, markup=False)
    if summary.unreadable or summary.padded or summary.warnings:
        say(f"details: {summary.report}", highlight=False, markup=False)


def extract_features(dataset: str, videos: Path, out: Path, settings: FeatureSettings, *,
                     annotations: Path | None = None, mapping: Path | None = None, only: Iterable[int] | None = None,
                     console: Console | None = None, progress: bool = True) -> FeatureSummary:
    """Write (or complete) the appearance and motion feature files of ``dataset`` under ``out``.

    Videos: every one found under ``videos`` (see :func:`find_videos`), or only those the QA
    files under ``annotations`` refer to (a referenced video without a file is an error unless
    ``settings.allow_missing``: then it gets zero features, like an unreadable one); ``only``
    restricts further (tests)."""
    console = console or Console(stderr=True, soft_wrap=True)
    s, out, videos = settings, Path(out), Path(videos)
    _check_settings(dataset, s)
    summary = FeatureSummary(L.appearance_file(out, dataset), L.motion_file(out, dataset),
                             L.features_report_file(out, dataset))
    targets = _targets(dataset, videos, annotations, mapping, only, s, summary)
    dev = _device(s.device)
    app_model = build_appearance(s.appearance, s.appearance_weights, s.random_weights, s.image_size, dev)
    mot_model = build_motion(s.motion, s.motion_weights, s.random_weights, s.motion_size, dev)
    out.mkdir(parents=True, exist_ok=True)
    ff = FeatureFiles(summary.appearance, summary.motion, s.clips, s.frames, _attrs(app_model, s),
                      _attrs(mot_model, s), app_model.dim, mot_model.dim)
    try:
        run = _Extraction(dataset, videos, targets, s, app_model, mot_model, dev, ff, summary, console)
        run.restore_report()
        run.run(progress)
    finally:
        ff.close()
    _print_summary(summary, console)
    return summary
