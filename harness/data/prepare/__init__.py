"""From the public MSVD-QA / MSRVTT-QA / TGIF-QA / NExT-QA releases to the HCRN / DualVGR feature
format (:mod:`harness.data.layout`'s file names and keys).

The commands (``python -m harness.data.prepare --help``)::

    python -m harness.data.prepare questions --dataset msvd-qa --annotations DIR --glove glove.840B.300d.txt --out OUT
    python -m harness.data.prepare tgif-qa --task action --annotations DIR --glove glove.840B.300d.txt --out OUT
    python -m harness.data.prepare next-qa --annotations DIR --glove glove.840B.300d.txt --out OUT
    python -m harness.data.prepare next-qa-features --features vid_feat/ --out OUT
    python -m harness.data.prepare features  --dataset msvd-qa --videos DIR --annotations DIR --out OUT \\
        --appearance resnet101 --motion r2plus1d_18 --clips 8 --frames 16

One module per concern: :mod:`.text` (the tokenizer), :mod:`.questions` (QA records, vocabularies,
GloVe, the ``questions`` command), :mod:`.taskdata` (reading csv / tsv releases; vocabularies,
encoding and files of the open-ended, multiple-choice and count tasks), :mod:`.tgif` (TGIF-QA's
question files, the ``tgif-qa`` command), :mod:`.nextqa` (NExT-QA's question files and released
features, the ``next-qa`` and ``next-qa-features`` commands), :mod:`.video` (finding videos, clip
sampling, decoding), :mod:`.backbones` and :mod:`.resnext3d` (the networks and their weights),
:mod:`.writer` (the resumable h5 writer), :mod:`.extract` (the ``features`` command), :mod:`.cli`.

``questions`` follows HCRN's ``preprocess/preprocess_questions.py`` (and its copy in DualVGR):

* tokens: the lower-cased question without its last character (the ``?``), split like
  ``nltk.word_tokenize`` (:func:`tokenize`, a re-implementation of nltk's word tokenizer, checked
  against nltk by the tests; no nltk dependency);
* question vocabulary: ``<NULL>`` = 0, ``<UNK>`` = 1, then every token of the training questions
  in order of first appearance; unknown tokens of val / test questions become ``<UNK>``;
* answer vocabulary: ``<UNK0>`` = 0, ``<UNK1>`` = 1, then the ``answer_top`` (4000, the reference
  default for both data sets) most frequent training answers, ties in order of first appearance;
* a training question whose answer is outside the answer vocabulary is dropped (HCRN keeps it
  with label ``<UNK0>`` = 0 and trains on it; we do not teach the model to answer "unknown");
  a val / test question with such an answer is kept with answer ``<UNK1>`` = 1, which is never a
  training label, so it counts as wrong (the accuracy is over all questions, as in the papers);
* every split is padded with ``<NULL>`` to its own longest question (as in the reference);
* ``glove``: one row per question token from the GloVe ``.txt`` file (exact, case-sensitive
  match, as the reference looks tokens up in its pickled dict); tokens without a vector (and
  ``<NULL>``, ``<UNK>``) get zeros, as in the reference. The matrix is stored in all three pickles
  (the reference stores it in the training pickle only; :mod:`harness.data.dataset` checks all three);
* ``question_id``: the record's ``id`` field when every record has a distinct one (the reference uses the
  position in the file); ``video_ids``: the integer video id (MSVD-QA: N of ``vidN`` in
  ``youtube_mapping.txt``; MSRVTT-QA: N of ``videoN.mp4``).

``features`` follows HCRN's ``preprocess/preprocess_features.py``: every video is decoded (PyAV, its
first video stream; audio is ignored), ``clips`` clips of ``frames`` consecutive frames are taken
around ``clips`` evenly spaced centres (:func:`clip_frame_indices`, with the reference's padding by
repeating the first / last frame for short videos), frames are resized to a square (bicubic, like
the reference's ``imresize``; no crop) and fed to

* appearance: a torchvision ResNet (``resnet101`` as in the reference; ImageNet normalisation,
  ``--image-size`` 224): the 2048-d pool5 feature of every frame -> the appearance file
  (videos, clips, frames, 2048);
* motion: one feature per clip (the clip's frames at ``--motion-size`` 112) -> the motion file
  (videos, clips, dim): torchvision's Kinetics-400 ``r2plus1d_18`` / ``r3d_18`` / ``mc3_18``
  (512-d, Kinetics normalisation), or ``resnext101-3d:PATH``, the reference's ResNeXt-101 3D
  (Hara et al.; 2048-d; the ``resnext-101-kinetics.pth`` checkpoint HCRN uses, fed 0..255 pixel
  values without normalisation exactly as HCRN does).

A video that cannot be decoded gets zero features (as in the reference) and is reported by name; a
video too short to give ``clips x frames`` distinct frames is padded by the reference's rule and
reported. The h5 files are written one batch of videos at a time (:class:`FeatureFiles`), so a
killed run leaves readable files and running the command again skips the videos already there.
See ``docs/preparing-data.md``.
"""
from harness.data.prepare.backbones import (APPEARANCE_MODELS, MOTION_MODELS, RESNEXT3D, Backbone, build_appearance,
    build_motion)
from harness.data.prepare.cli import build_cli, main
from harness.data.prepare.common import DATASETS, NEXTQA, TGIF_DATASETS, TGIF_TASKS, VIDEO_DATASETS, PrepareError
from harness.data.prepare.extract import FeatureSettings, FeatureSummary, extract_features
from harness.data.prepare.nextqa import adapt_nextqa_features, prepare_nextqa, read_nextqa
from harness.data.prepare.questions import (ANSWER_TOP, MAX_QUESTION_TOKENS, MAX_WORD_DIM, QARecord, build_vocab,
    encode_split, glove_matrix, parse_video_id, prepare_questions, read_glove, read_qa)
from harness.data.prepare.taskdata import TaskRecord, build_task_vocab, encode_task, encode_task_split
from harness.data.prepare.text import question_tokens, tokenize
from harness.data.prepare.tgif import prepare_tgif, read_tgif, tgif_video_names
from harness.data.prepare.video import (DecodedVideo, VideoError, clip_frame_indices, decode_clips, find_mapping,
    find_videos, read_youtube_mapping)
from harness.data.prepare.writer import FeatureFiles

__all__ = [
    "APPEARANCE_MODELS", "MOTION_MODELS", "RESNEXT3D", "Backbone", "build_appearance", "build_motion",
    "build_cli", "main", "DATASETS", "NEXTQA", "TGIF_DATASETS", "TGIF_TASKS", "VIDEO_DATASETS", "PrepareError",
    "FeatureSettings", "FeatureSummary", "extract_features", "adapt_nextqa_features", "prepare_nextqa", "read_nextqa",
    "TaskRecord", "build_task_vocab", "encode_task", "encode_task_split", "prepare_tgif", "read_tgif",
    "tgif_video_names",
    "ANSWER_TOP", "MAX_QUESTION_TOKENS", "MAX_WORD_DIM", "QARecord", "build_vocab", "encode_split", "glove_matrix",
    "parse_video_id", "prepare_questions",
    "read_glove", "read_qa", "question_tokens", "tokenize", "DecodedVideo", "VideoError", "clip_frame_indices",
    "decode_clips", "find_mapping", "find_videos", "read_youtube_mapping", "FeatureFiles",
]
