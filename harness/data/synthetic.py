"""Deterministic synthetic video-QA data sets in the HCRN / DualVGR on-disk format.

The files look exactly like the output of HCRN's ``preprocess_features.py`` and
``preprocess_questions.py`` for MSVD-QA, so every loader, model and metric in the
harness can be exercised without the real data (or a GPU):

* ``{name}_appearance_feat.h5``  ``resnet_features`` float32 (videos, clips, frames, dim)
  and ``ids`` int64 (videos,)
* ``{name}_motion_feat.h5``      ``resnext_features`` float32 (videos, clips, dim) and
  ``ids`` int64 (videos,), same ids in the same order as the appearance file
* ``{name}make_vocab.json``          ``question_token_to_idx`` / ``answer_token_to_idx`` /
  ``question_answer_token_to_idx``
* ``{name}_{train,val,test}make_questions.pt``  a plain ``pickle`` of a dict with the numpy
  arrays ``questions`` (padded with 0 after the tokens), ``questions_len``,
  ``video_ids``, ``question_id``, ``answers`` and ``glove``
* ``{name}_meta.json``           written last; its presence means "complete"

Video ids are ``1000 + a shuffled range`` (so that code confusing "video id" with
"row in the h5 file" breaks); question ids are unique across the three splits and
not in row order. Videos are split 60/15/25 into disjoint train/val/test sets
(like MSVD-QA's per-video splits).

The generative story
--------------------
A "world" holds random prototype vectors (i.i.d. N(0, 1) per dimension) for
``objects``, ``actions`` and ``scenes``; popularity of every kind of entity is
Zipf-like (``obj_0`` is the most frequent object), and every action has a
preferred scene.

Each video has

* a scene ``s``: with probability 0.7 the preferred scene of its dominant action,
  otherwise a popularity draw;
* a dominant object ``o*`` shown in a strict majority of its clips (the others show
  other objects);
* a dominant action ``a*`` performed in a strict majority, but never all, of its
  clips; the remaining clips each perform a distinct other action, so at least
  one action happens in exactly one clip.

Features (scaled so that every dimension has unit variance)::

    appearance[v, c, f] = 1.0 * scene[s] + 0.8 * object[o_c] + 0.6 * drift(t_cf)
                          + video_nuisance_v + 1.4 * noise
    motion[v, c]        = 1.0 * action[a_c] + 0.6 * drift'(t_c)
                          + video_nuisance'_v + 1.0 * noise

where ``drift(t)`` is a smooth, fixed trajectory through feature space over the
normalised time ``t`` in [0, 1] of the frame / clip (a "lighting drift" that makes
positions recoverable from the features) and the nuisance is a per-video random
offset.

Questions (the first token is always the question word; the rest is the question's
specifying tokens scattered among random Zipf-distributed filler words ``w_17``, for a
ragged total length of 3..``max_len`` tokens). Each type needs different evidence,
so per-type accuracies differ and a question-only model scores clearly lower:

* ``what ... <ordinal> ...`` -> the object of the named clip (``first``, ``second``,
  ...): clip-specific appearance. Answering the dominant object is right in the
  majority of cases, localising the clip is needed for the rest.
* ``who ...``   -> the video's dominant object: appearance, whole video.
* ``how ...``   -> the video's dominant action: motion, whole video.
* ``when ... <act_k> ...`` -> ``start`` / ``middle`` / ``end``: the time bucket of the
  (single) clip in which the named action happens: motion + temporal localisation.
  The hardest type; its prior (``middle``) is the strongest.
* ``where ...`` -> the scene: easiest from the video (visible in every frame), and
  half of these questions also name the dominant action, which predicts the scene
  70% of the time (a language prior, so question-only is far from zero there).

Answer tokens are ``obj_i``, ``act_i``, ``scene_i`` and the time buckets, after
HCRN's ``<UNK0>`` / ``<UNK1>`` (which are never the answer). Action names ``act_i``
are also question tokens, so ``question_answer_token_to_idx`` shares them. The glove
matrix is a seeded N(0, 1) matrix of shape (question_vocab, word_dim), the same in
all three splits.

Reference numbers (tiny, seed 0, test split): a multinomial logistic regression on a
bag of question tokens gets ~24% (what 15, who 16, how 16, when 49, where 47); the
same with mean / per-clip appearance and motion features added gets ~75% (what 69,
who 78, how 89, when 50, where 94). A small BiLSTM + clip-attention network
(module_dim 64) reaches ~60% in 15 epochs (~12 s on 2 CPU cores) against ~25% for its
question-only version.

Everything is a pure function of (preset, seed): every random draw comes from a
``numpy.random.Generator(PCG64(...))`` seeded with ``SeedSequence(seed, spawn_key=...)``
per purpose (and per video for the features), so the contents do not depend on the
chunk size used to write the features.

The presets ``tiny-mc`` and ``tiny-count`` ask multiple-choice and count questions about tiny's videos
instead (:mod:`harness.data.synthetic_tasks` tells how); their meta json names the task.

Use: ``python -m harness.data.synthetic --out DIR [--preset tiny|small|msvd|tiny-mc|tiny-count] [--seed N]
[--name NAME]`` or :func:`generate`.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from harness.data import layout, synthetic_tasks
from harness.files import atomic_write_bytes
from harness.data.synthetic_tasks import Features
from harness.data.synthetic_world import (S_GLOVE, STORY_TEXT, OPEN_ENDED, PRESETS, QUESTION_WORDS, SPLITS,
    SUGGESTED_TRAIN, TIME_BUCKETS, Preset, features_for_video, get_preset, Layout, make_layout, make_questions, rng,
    split_videos, make_videos, make_vocab, make_world)

__all__ = [
    "Preset",
    "PRESETS",
    "QUESTION_WORDS",
    "TIME_BUCKETS",
    "generate",
    "dataset_files",
    "is_complete",
    "main",
]

FORMAT_VERSION = 3  # 3: contiguous feature datasets (memory-mappable)

# --------------------------------------------------------------------------- writing


def dataset_files(out: str | Path, name: str = "synthetic") -> dict[str, Path]:
    """Paths of every file of a data set (keys: appearance, motion, vocab, train, val,
    test, meta): :func:`harness.data.layout.dataset_files`."""
    return layout.dataset_files(out, name)


def is_complete(out: str | Path, preset: str | Preset = "tiny", seed: int = 0,
                name: str = "synthetic") -> bool:
    """True when ``out`` holds a finished data set for exactly (preset, seed, name): the
    meta json exists, matches (including the preset's sizes, its suggested training and the format version) and
    every other file is present."""
    p = get_preset(preset)
    files = dataset_files(out, name)
    try:
        meta = json.loads(files["meta"].read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("generator") == "harness.data.synthetic"
        and meta.get("format_version") == FORMAT_VERSION
        and meta.get("preset") == p.name
        and meta.get("preset_config") == asdict(p)
        and meta.get("suggested_train") == SUGGESTED_TRAIN.get(p.name, {})  # a changed suggestion is rewritten
        and meta.get("seed") == seed
        and meta.get("name") == name
        and all(f.exists() for f in files.values())
    )


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_features(p: Preset, features: Features, ids: np.ndarray, app_path: Path, mot_path: Path,
                    progress: bool) -> None:
    """Each video row's ``features(row)`` into the two h5 files, in blocks of rows, atomically."""
    import h5py

    C, F, D, V = p.n_clips, p.n_frames, p.vision_dim, p.n_videos
    per_video = 4 * C * (F + 1) * D
    block = max(1, min(V, (64 << 20) // per_video))  # ~64 MB of features in memory at most
    app_tmp, mot_tmp = _tmp(app_path), _tmp(mot_path)
    bar = None
    try:
        with h5py.File(app_tmp, "w") as fa, h5py.File(mot_tmp, "w") as fm:
            # contiguous, as HCRN's scripts write them: the loader memory-maps such files, so the
            # workers of a --jobs N grid share one copy through the page cache
            da = fa.create_dataset(layout.APPEARANCE_KEY, shape=(V, C, F, D), dtype=np.float32)
            dm = fm.create_dataset(layout.MOTION_KEY, shape=(V, C, D), dtype=np.float32)
            fa.create_dataset(layout.IDS_KEY, data=ids)
            fm.create_dataset(layout.IDS_KEY, data=ids)
            if progress:
                from rich.console import Console

                from harness.console import progress_bar

                bar = progress_bar(Console(stderr=True), info=False, disable=False)
                bar.start()
                task = bar.add_task("writing features (videos)", total=V)
            for b0 in range(0, V, block):
                b1 = min(V, b0 + block)
                a_buf = np.empty((b1 - b0, C, F, D), dtype=np.float32)
                m_buf = np.empty((b1 - b0, C, D), dtype=np.float32)
                for j, row in enumerate(range(b0, b1)):
                    a_buf[j], m_buf[j] = features(row)
                da[b0:b1] = a_buf
                dm[b0:b1] = m_buf
                if bar is not None:
                    bar.update(task, advance=b1 - b0)
        os.replace(app_tmp, app_path)
        os.replace(mot_tmp, mot_path)
    finally:
        if bar is not None:
            bar.stop()
        app_tmp.unlink(missing_ok=True)
        mot_tmp.unlink(missing_ok=True)


def _meta(p: Preset, seed: int, name: str, lay: Layout, vocab: dict, qs: dict, split_rows: dict,
          files: dict[str, Path], task_meta: dict) -> dict[str, Any]:
    """The data set's ``{name}_meta.json``: how it was made, the sizes, the model and training it suggests;
    ``task_meta`` (a multiple-choice or count set's: its task, its question types, ...) updates it."""
    words = task_meta.get("question_types", QUESTION_WORDS)
    type_counts = {
        split: {w: int((qs[split]["questions"][:, 0] == vocab[layout.QUESTION_TOKENS_KEY][w]).sum())
                for w in words}
        for split in SPLITS
    }
    return {
        "generator": "harness.data.synthetic", "format_version": FORMAT_VERSION, "preset": p.name, "seed": seed,
        "name": name, "suggested_model": {"module_dim": p.suggested_module_dim},
        "suggested_train": SUGGESTED_TRAIN.get(p.name, {}), "question_types": list(QUESTION_WORDS),
        "story": STORY_TEXT, "preset_config": asdict(p),
        "answer_groups": {"object": lay.n_obj, "action": lay.n_act, "scene": lay.n_scene, "time": len(TIME_BUCKETS)},
        "max_question_len": lay.max_len, "split_videos": {s: int(len(split_rows[s])) for s in SPLITS},
        "question_type_counts": type_counts, "files": {k: v.name for k, v in files.items()}, **task_meta,
    }


def generate(out: str | Path, preset: str = "tiny", seed: int = 0, name: str = "synthetic",
             progress: bool = True) -> Path:
    """Write the data set for (preset, seed) into ``out`` and return ``out`` as a Path.

    ``preset`` is a key of :data:`PRESETS` (a :class:`Preset` instance is accepted too).
    ``progress`` shows a rich progress bar over videos while the features are written
    (in chunks of videos, so the msvd preset never holds all features in memory).

    Every file is written under a temporary name and renamed into place; the meta json
    is written last, so a directory with the meta json is complete. If ``out`` already
    holds a complete data set for the same preset, seed and name, nothing is written.
    """
    p = get_preset(preset)
    out = Path(out)
    if is_complete(out, p, seed, name):
        return out
    out.mkdir(parents=True, exist_ok=True)
    files = dataset_files(out, name)
    files["meta"].unlink(missing_ok=True)  # the directory no longer looks complete

    lay = make_layout(p)
    world = make_world(p, lay, seed)
    vids = make_videos(p, lay, world, seed)
    split_rows = split_videos(p, seed)
    if p.task == OPEN_ENDED:
        vocab = make_vocab(p, lay)
        qs = make_questions(p, lay, vocab, vids, split_rows, seed)
        features: Features = lambda row: features_for_video(p, world, vids, row, seed)  # noqa: E731
        task_meta: dict = {}
    else:
        made = synthetic_tasks.make(p, lay, world, vids, split_rows, seed)
        vocab, qs, features, task_meta = made.vocab, made.questions, made.features, made.meta
    glove = rng(seed, S_GLOVE).standard_normal((len(vocab[layout.QUESTION_TOKENS_KEY]), p.word_dim),
                                                 dtype=np.float32)

    _write_features(p, features, vids.ids, files["appearance"], files["motion"], progress)
    atomic_write_bytes(files["vocab"], json.dumps(vocab, indent=1).encode())
    for split in SPLITS:
        obj = dict(qs[split])
        obj["glove"] = glove
        atomic_write_bytes(files[split], pickle.dumps(obj, protocol=4))

    meta = _meta(p, seed, name, lay, vocab, qs, split_rows, files, task_meta)
    atomic_write_bytes(files["meta"], json.dumps(meta, indent=1).encode())
    return out


# --------------------------------------------------------------------------- CLI


def _preset_help() -> str:
    lines = []
    for p in PRESETS.values():
        cfg = p.model_config()
        task = "" if p.task == OPEN_ENDED else f"{p.task} questions, "
        lines.append(
            f"{p.name}: {task}{p.n_videos} videos x {p.n_clips} clips x {p.n_frames} frames x "
            f"{p.vision_dim} dims, {p.n_train}/{p.n_val}/{p.n_test} train/val/test "
            f"questions, question vocab {cfg['question_vocab']}, answer vocab {cfg['answer_vocab']}, "
            f"glove dim {p.word_dim}, suggested module_dim {p.suggested_module_dim}."
        )
    return " ".join(lines)


class PresetName(str, Enum):
    tiny = "tiny"
    tiny_mc = "tiny-mc"
    tiny_count = "tiny-count"
    small = "small"
    msvd = "msvd"


def _make_app():
    import typer

    app = typer.Typer(add_completion=False, rich_markup_mode=None)

    @app.command(help=(
        "Write a deterministic synthetic video-QA data set in the HCRN/DualVGR on-disk "
        "format into --out: NAME_appearance_feat.h5, NAME_motion_feat.h5, NAME_vocab.json, "
        "NAME_{train,val,test}make_questions.pt and NAME_meta.json (written last: its presence "
        "means complete; a complete --out for the same preset and seed is left as it is). "
        "Presets: tiny (CPU smoke tests and unit tests, ~5 MB), small (in between, ~150 MB), "
        "msvd (MSVD-QA's sizes, ~2.2 GB, written in chunks of videos); tiny-mc and tiny-count: "
        "tiny's videos with multiple-choice (5 candidates) or count (1..10) questions. Answers depend "
        "on the video features, differently per question type (what/who/how/when/where); see "
        "the module docstrings of harness.data.synthetic and harness.data.synthetic_tasks for the generative story."
    ))
    def main(
        out: Path = typer.Option(..., "--out", help="Output directory (created if needed)."),
        preset: PresetName = typer.Option(
            PresetName.tiny, "--preset", help="Data set sizes. " + _preset_help()),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same (preset, seed) "
                                 "always gives the same array contents."),
        name: str = typer.Option("synthetic", "--name", help="Data set name: the prefix "
                                 "of every file, e.g. NAME_appearance_feat.h5."),
        progress: bool = typer.Option(True, "--progress/--no-progress",
                                      help="Show a progress bar over videos."),
    ) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        already = is_complete(out, preset.value, seed, name)
        path = generate(out, preset=preset.value, seed=seed, name=name, progress=progress)
        files = dataset_files(path, name)
        total = sum(f.stat().st_size for f in files.values())
        state = "already complete" if already else "written"
        console.print(f"{preset.value} (seed {seed}) {state}: {path} "
                      f"({len(files)} files, {total / 1e6:.1f} MB)")

    return app


def main() -> None:
    """Console entry point."""
    _make_app()()


if __name__ == "__main__":
    main()
