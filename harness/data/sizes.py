"""Named model sizes, defined once: ``tiny``, ``small`` and ``msvd`` (MSVD-QA's vocabularies,
clips, frames and feature widths, as HCRN / DualVGR preprocess it, and the paper's module_dim).
``bench.py --config NAME`` and the tests build models of these sizes; the synthetic generator
(:mod:`harness.data.synthetic`) writes data sets of them and suggests their ``module_dim``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    """The data-dictated model settings (``variants.DATA_KEYS`` but ``motion_dim``, which is
    ``vision_dim`` here) and the suggested width ``module_dim``."""

    question_vocab: int  # incl. <NULL>=0 and <UNK>=1
    answer_vocab: int
    vision_dim: int
    word_dim: int  # width of the GloVe matrix
    num_clips: int
    num_frames: int
    module_dim: int

    def model_config(self) -> dict:
        """The model settings of this size (``variants.get_config(name, **size.model_config())``)."""
        return dataclasses.asdict(self)


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(question_vocab=100, answer_vocab=50, vision_dim=128, word_dim=32, num_clips=4, num_frames=4,
                      module_dim=64),
    "small": ModelSize(question_vocab=1000, answer_vocab=200, vision_dim=512, word_dim=64, num_clips=8, num_frames=8,
                       module_dim=128),
    "msvd": ModelSize(question_vocab=4000, answer_vocab=1000, vision_dim=2048, word_dim=300, num_clips=8,
                      num_frames=16, module_dim=768),
}
