"""The command line: ``python -m harness.data.prepare questions|tgif-qa|next-qa|next-qa-features|features``.
It catches only :class:`PrepareError` (printed, exit 2); anything else is a bug and shows its traceback."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from harness.data import layout as L
from harness.data.prepare.backbones import APPEARANCE_MODELS, MOTION_MODELS, RESNEXT3D
from harness.data.prepare.common import TGIF_TASKS, VIDEO_DATASETS, PrepareError
from harness.data.prepare.extract import FeatureSettings, extract_features
from harness.data.prepare.nextqa import APPEARANCE_DIM, adapt_nextqa_features, prepare_nextqa
from harness.data.prepare.questions import ANSWER_TOP, MAX_QUESTION_TOKENS, prepare_questions
from harness.data.prepare.tgif import prepare_tgif

#: no wrapping: messages hold file names
console = Console(stderr=True, soft_wrap=True)


class Dataset(str, Enum):
    msvd = "msvd-qa"
    msrvtt = "msrvtt-qa"


TgifTask = Enum("TgifTask", {t: t for t in TGIF_TASKS}, type=str)


def _log(message: str) -> None:
    console.print(message, highlight=False, markup=False)


def _fail(e: PrepareError) -> None:
    console.print(f"error: {e}", style="red", highlight=False, markup=False)
    raise typer.Exit(2)


def questions(
    dataset: Dataset = typer.Option(..., help="Which release: names the output files "
                                    f"({L.vocab_file('', '{dataset}')} ...)."),
    annotations: Path = typer.Option(..., help="Directory with the release's train_qa.json, val_qa.json, "
                                     "test_qa.json (records: question, answer, video_id, id)."),
    glove: Path = typer.Option(..., help="GloVe vectors, .txt format (glove.840B.300d.txt as in the reference)."),
    out: Path = typer.Option(..., help="Output directory (created if needed)."),
    answer_top: int = typer.Option(ANSWER_TOP, help="Answer vocabulary: the K most frequent training answers "
                                   "(the reference's default for both data sets)."),
    mapping: Path | None = typer.Option(None, help="MSVD-QA's youtube_mapping.txt, to check that every "
                                       "question's video has a name [default: found in --annotations or "
                                       "its parent, else not checked]."),
    max_question_tokens: int = typer.Option(MAX_QUESTION_TOKENS, help="A longer question keeps its first tokens "
                                            "(counted in the summary), so one oversized question cannot pad "
                                            "its split; the releases' questions are far shorter."),
):
    """Vocabulary json and question pickles (HCRN's preprocess_questions.py rules)."""
    try:
        prepare_questions(dataset.value, annotations, glove, out, answer_top=answer_top, mapping=mapping,
                          max_question_tokens=max_question_tokens, log=_log)
    except PrepareError as e:
        _fail(e)


def tgif_qa(
    task: TgifTask = typer.Option(..., help="Which TGIF-QA task: action, transition (multiple choice), count, "
                                  "frameqa (open-ended); the data set is tgif-qa-TASK."),
    annotations: Path = typer.Option(..., help="Directory with the release's Train_TASK_question.csv and "
                                     "Test_TASK_question.csv (tab-separated)."),
    glove: Path = typer.Option(..., help="GloVe vectors, .txt format (glove.840B.300d.txt)."),
    out: Path = typer.Option(..., help="Output directory (created if needed)."),
    answer_top: int | None = typer.Option(None, help="FrameQA: the K most frequent training answers [default: "
                                          "every answer of the Train file, as HCRN]."),
    max_question_tokens: int = typer.Option(MAX_QUESTION_TOKENS, help="A longer question or candidate answer keeps "
                                            "its first tokens (counted in the summary), so one oversized text "
                                            "cannot pad its split."),
):
    """TGIF-QA questions: vocabulary, question pickles and meta file (HCRN's tgif_qa.py rules)."""
    try:
        prepare_tgif(task.value, annotations, glove, out, answer_top=answer_top,
                     max_question_tokens=max_question_tokens, log=_log)
    except PrepareError as e:
        _fail(e)


def next_qa(
    annotations: Path = typer.Option(..., help="Directory with NExT-QA's train.csv, val.csv, test.csv."),
    glove: Path = typer.Option(..., help="GloVe vectors, .txt format (glove.840B.300d.txt)."),
    out: Path = typer.Option(..., help="Output directory (created if needed)."),
    max_question_tokens: int = typer.Option(MAX_QUESTION_TOKENS, help="A longer question or candidate answer keeps "
                                            "its first tokens (counted in the summary), so one oversized text "
                                            "cannot pad its split."),
):
    """NExT-QA multiple-choice questions: vocabulary, question pickles and meta file."""
    try:
        prepare_nextqa(annotations, glove, out, max_question_tokens=max_question_tokens, log=_log)
    except PrepareError as e:
        _fail(e)


def next_qa_features(
    features: Path = typer.Option(..., help="NExT-QA's vid_feat/ directory: app_mot_train.h5, app_mot_val.h5, "
                                  "app_mot_test.h5 (ids; feat (videos, clips, appearance + motion))."),
    out: Path = typer.Option(..., help="Output directory (created if needed)."),
    appearance_dim: int = typer.Option(APPEARANCE_DIM, help="The appearance part of each clip's feature (NExT-QA's "
                                       "loader: the first 2048 dims; the rest is motion)."),
):
    """NExT-QA's released features to the appearance and motion files, without re-extraction."""
    try:
        adapt_nextqa_features(features, out, app_dim=appearance_dim, log=_log)
    except PrepareError as e:
        _fail(e)


def features(
    videos: Path = typer.Option(..., help="Directory holding the videos (searched recursively): MSVD's "
                                "YouTubeClips/*.avi, MSRVTT's TrainValVideo/ and TestVideo/ video<N>.mp4, TGIF's "
                                "<gif_name>.gif, NExT-QA's NExTVideo/<folder>/<video id>.mp4."),
    out: Path = typer.Option(..., help="Output directory (created if needed)."),
    dataset: str = typer.Option(..., metavar="NAME", help="Which release: names the files and how video files map "
                                f"to ids: {', '.join(VIDEO_DATASETS)}."),
    annotations: Path | None = typer.Option(None, help="The question files' directory (QA json, TGIF-QA tsv, "
                                           "NExT-QA csv): only the videos its questions refer to, and a missing "
                                           "one is an error [default: every video found; TGIF-QA needs it]."),
    mapping: Path | None = typer.Option(None, help="MSVD-QA's youtube_mapping.txt [default: found in "
                                       "--annotations, --videos or their parents]."),
    appearance: str = typer.Option("resnet101", help=f"Appearance backbone: {', '.join(APPEARANCE_MODELS)} "
                                   "(torchvision, ImageNet; pool5, 2048-d)."),
    motion: str = typer.Option("r2plus1d_18", help=f"Motion backbone: {', '.join(MOTION_MODELS)} (torchvision, "
                               f"Kinetics-400; 512-d) or {RESNEXT3D}:PATH (the reference's ResNeXt-101 3D "
                               "checkpoint resnext-101-kinetics.pth; 2048-d)."),
    clips: int = typer.Option(8, help="Clips per video (MSVD-QA 8; MSRVTT-QA configs use 16)."),
    frames: int = typer.Option(16, help="Consecutive frames per clip."),
    appearance_weights: Path | None = typer.Option(None, help="State dict file for the appearance backbone "
                                                  "[default: torchvision's cached ImageNet weights]."),
    motion_weights: Path | None = typer.Option(None, help="State dict / checkpoint file for the motion "
                                              "backbone [default: torchvision's cached Kinetics weights]."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random backbones: meaningless features, "
                                        "for tests only."),
    image_size: int = typer.Option(224, help="Appearance frame size (square)."),
    motion_size: int = typer.Option(112, help="Motion frame size (square)."),
    batch_size: int = typer.Option(4, help="Videos per forward pass (x clips x frames images)."),
    device: str = typer.Option("auto", help="auto (cuda when available), cpu, cuda, cuda:N."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="Decoding threads."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="With --annotations: give referenced "
                                       "videos that have no file zero features instead of failing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
):
    """Appearance and motion h5 files (HCRN's preprocess_features.py sampling); resumable."""
    settings = FeatureSettings(appearance, motion, clips, frames, image_size, motion_size, batch_size,
                               appearance_weights, motion_weights, random_weights, device, workers, allow_missing)
    try:
        summary = extract_features(dataset, videos, out, settings, annotations=annotations, mapping=mapping,
                                   console=console, progress=progress)
    except PrepareError as e:
        _fail(e)
    if not summary.complete:
        raise typer.Exit(1)


def build_cli() -> typer.Typer:
    app = typer.Typer(add_completion=False, rich_markup_mode=None,
                      context_settings={"help_option_names": ["-h", "--help"]},
                      help="From the public MSVD-QA / MSRVTT-QA / TGIF-QA / NExT-QA releases (question files, "
                           "videos or NExT-QA's features) and a GloVe file to the HCRN / DualVGR feature format "
                           "that harness.data.dataset loads. See docs/preparing-data.md.")
    app.command()(questions)
    app.command("tgif-qa")(tgif_qa)
    app.command("next-qa")(next_qa)
    app.command("next-qa-features")(next_qa_features)
    app.command()(features)
    return app


def main(argv: list[str] | None = None) -> None:
    build_cli()(args=argv, prog_name="python -m harness.data.prepare")
