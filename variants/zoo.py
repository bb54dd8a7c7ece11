"""The variant zoo: one decorated function per variant. The first docstring line is the
description shown by ``python ablate.py list``; the first tag is the variant's family, one of
:data:`FAMILIES` (reports group and order their rows by it).

DualVGR's two configurations: the official ``train.py`` (NJUPT-MCC/DualVGR-VideoQA) never passes
``unit_layers`` to the model, so the constructor default applies and it trains 2 reasoning units
(27,792,523 parameters at the MSVD-QA setting): ``dualvgr-u2``. VQAKD changed the default to 1
unit, and its teacher and students are built on that: ``dualvgr`` (23,187,578 parameters), the
baseline here because every teacher and student below is a variation of it.
"""
from __future__ import annotations

from .registry import register_variant

#: variant families, in report order (the first tag of each variant)
FAMILIES = ("baseline", "teacher", "student", "modality", "autoencoder", "sparse", "transformer", "sanity")

#: DualVGR's auxiliary-loss weights (reference defaults)
DUALVGR_LOSS = {"alpha": 1.0, "beta": 1e-8}


@register_variant(tags=("baseline",))
def dualvgr():
    ("DualVGR with 1 reasoning unit of 1 graph layer (VQAKD's configuration; the official train.py builds 2 units: "
     "dualvgr-u2), CE + common + HSIC losses.")
    return {"arch": "dualvgr", "model": {"unit_layers": 1, "graph_layers": 1}, "loss": dict(DUALVGR_LOSS)}


@register_variant("dualvgr-u2", tags=("baseline",))
def dualvgr_u2():
    ("DualVGR as the official DualVGR train.py builds it: 2 reasoning units (its constructor default) "
     "of 1 graph layer, CE + common + HSIC losses.")
    return {"arch": "dualvgr", "model": {"unit_layers": 2, "graph_layers": 1}, "loss": dict(DUALVGR_LOSS)}


@register_variant(tags=("sanity",))
def question_only():
    """Sanity baseline: DualVGR's question encoder and classifier, no video (CE only)."""
    return {"arch": "question-only", "model": {}, "loss": {}}


# ----------------------------------------------------------------------------- teachers
# DualVGR made deeper: more graph layers per unit (g) or more reasoning units (u).

def _teacher(graph_layers: int = 1, unit_layers: int = 1) -> dict:
    return {"arch": "dualvgr", "model": {"unit_layers": unit_layers, "graph_layers": graph_layers},
            "loss": dict(DUALVGR_LOSS)}


@register_variant(tags=("teacher",))
def teacher_g2():
    """Teacher: DualVGR with 2 graph layers."""
    return _teacher(graph_layers=2)


@register_variant(tags=("teacher",))
def teacher_g3():
    """Teacher: DualVGR with 3 graph layers."""
    return _teacher(graph_layers=3)


@register_variant(tags=("teacher",))
def teacher_g4():
    """Teacher: DualVGR with 4 graph layers (the VQAKD teacher)."""
    return _teacher(graph_layers=4)


@register_variant(tags=("teacher",))
def teacher_u2():
    """Teacher: DualVGR with 2 reasoning units of 1 graph layer."""
    return _teacher(unit_layers=2)


@register_variant(tags=("teacher",))
def teacher_u3():
    """Teacher: DualVGR with 3 reasoning units of 1 graph layer."""
    return _teacher(unit_layers=3)


# ----------------------------------------------------------------------------- students
# One-graph-layer DualVGR; trained against frozen teachers with distillation losses.

def _student(*losses: dict, teachers=("teacher-g4",)) -> dict:
    spec = _teacher(graph_layers=1)
    if losses:
        spec["teachers"] = list(teachers)
        spec["distill"] = list(losses)
    spec["loss"]["ce_weight"] = 1.0
    return spec


@register_variant(tags=("student",))
def student():
    ("Student control: 1-graph-layer DualVGR trained from labels only "
     "(what every distilled student is compared with).")
    return _student()


@register_variant(tags=("student",))
def student_fused():
    ("Student + VQAKD fused-feature KD from teacher-g4 (KL to the teacher's MFB output), "
     "with VQAKD's DualVGR-loss weights alpha 100 (common loss), beta 1e-6 (HSIC).")
    spec = _student({"name": "fused", "weight": 1.0, "params": {"t_app": 1.0, "t_mo": 1.0, "kd_alpha": 1.0,
                                                                 "kd_beta": 1.0}})
    spec["loss"].update(alpha=100.0, beta=1e-6)  # VQAKD's student-training defaults (train_kd_2.py)
    return spec


@register_variant(tags=("student",))
def student_logits():
    """Student + Hinton logit KD from teacher-g4 (T=4, T^2-scaled KL)."""
    return _student({"name": "logits", "weight": 1.0, "params": {"T": 4.0}})


@register_variant(tags=("student",))
def student_similarity():
    ("Student + TeachText KD from teacher-g4: Huber (delta 1) between the batch's question x video "
     "cosine-similarity matrices.")
    return _student({"name": "similarity", "weight": 1.0, "params": {}})


@register_variant(tags=("student",))
def student_similarity_ens():
    """Student + TeachText KD from the mean question x video similarity matrix of teacher-g2, -g3 and -g4."""
    return _student({"name": "similarity", "weight": 1.0, "params": {}},
                    teachers=("teacher-g2", "teacher-g3", "teacher-g4"))


@register_variant(tags=("student",))
def student_hint():
    """Student + FitNets hint KD from teacher-g4 (MSE of regressed fused clip features)."""
    return _student({"name": "hint", "weight": 1.0, "params": {"feature": "clip_fused"}})


@register_variant(tags=("student",))
def student_relational():
    """Student + RKD from teacher-g4 (distance and angle losses on video embeddings)."""
    return _student({"name": "relational", "weight": 1.0, "params": {}})


@register_variant(tags=("student",))
def student_dkd():
    ("Student + decoupled KD from teacher-g4 "
     "(target / non-target parts, alpha 1, beta 8, T 4, 2-epoch linear warm-up).")
    return _student({"name": "dkd", "weight": 1.0, "params": {}})


@register_variant(tags=("student",))
def student_sp():
    """Student + similarity-preserving KD from teacher-g4 (batch Gram matrices of fused clip features)."""
    return _student({"name": "sp", "weight": 1.0, "params": {}})


@register_variant(tags=("student",))
def student_pkt():
    """Student + probabilistic knowledge transfer from teacher-g4 (cosine-kernel distributions of video embeddings)."""
    return _student({"name": "pkt", "weight": 1.0, "params": {}})


# ----------------------------------------------------------------------------- one modality (TeachText)
# TeachText's modality reduction: students that read one stream, trained from labels or distilled from
# the two-stream teacher-g4 with TeachText's similarity loss. Their DualVGR loss has no common term
# (it compares the two streams' graphs): alpha 0; the HSIC term of their stream stays (beta).

def _one_modality(modality: str, distilled: bool) -> dict:
    spec = _student({"name": "similarity", "weight": 1.0, "params": {}}) if distilled else _student()
    spec["arch"] = "dualvgr-1m"
    spec["model"]["modality"] = modality
    spec["loss"]["alpha"] = 0.0
    return spec


@register_variant(tags=("modality",))
def modality_appearance():
    ("One-modality student: DualVGR over the appearance stream only (motion never read or computed), "
     "trained from labels.")
    return _one_modality("appearance", distilled=False)


@register_variant(tags=("modality",))
def modality_motion():
    ("One-modality student: DualVGR over the motion stream only (appearance never read or computed), "
     "trained from labels.")
    return _one_modality("motion", distilled=False)


@register_variant(tags=("modality",))
def modality_appearance_kd():
    ("One-modality student (appearance only) + TeachText KD from the two-stream teacher-g4 (Huber between "
     "question x video similarity matrices); the teacher reads motion in training, the student never.")
    return _one_modality("appearance", distilled=True)


@register_variant(tags=("modality",))
def modality_motion_kd():
    ("One-modality student (motion only) + TeachText KD from the two-stream teacher-g4 (Huber between "
     "question x video similarity matrices); the teacher reads appearance in training, the student never.")
    return _one_modality("motion", distilled=True)


# ----------------------------------------------------------------------------- autoencoder (MSVQA)

@register_variant(tags=("autoencoder",))
def autoencoder():
    """DualVGR + decoders reconstructing each clip's appearance frames and motion (MSE x 1, no pretraining)."""
    spec = _teacher(graph_layers=1)
    spec["model"]["decoder_hidden"] = 256
    spec["loss"].update(recon_weight=1.0, ae_pretrain_steps=0)
    return spec


@register_variant(tags=("autoencoder",))
def autoencoder_2stage():
    """MSVQA's two stages: 200 steps of reconstruction only (encoders + decoders), then the whole model."""
    spec = autoencoder()
    spec["loss"]["ae_pretrain_steps"] = 200
    return spec


# ----------------------------------------------------------------------------- sparse (SViTT)

@register_variant(tags=("sparse",))
def sparse_node():
    ("Node sparsity: keep the most question-relevant 60% of clips, rounded (2 of 4 at tiny, 5 of 8 at small and msvd), "
     "before encoding and graph reasoning.")
    spec = _teacher(graph_layers=1)
    spec["model"]["keep_ratio"] = 0.6
    return spec


@register_variant(tags=("sparse",))
def sparse_edge():
    """Edge sparsity: each clip attends to its 2 nearest clips in time (plus itself) instead of all."""
    spec = _teacher(graph_layers=1)
    spec["model"].update(edge_k=2, edge_by="time")
    return spec


@register_variant(tags=("sparse",))
def sparse_edge_feature():
    """Edge sparsity: each clip attends to its 2 most similar clips by feature (plus itself)."""
    spec = _teacher(graph_layers=1)
    spec["model"].update(edge_k=2, edge_by="feature")
    return spec


@register_variant(tags=("sparse",))
def sparse_node_edge():
    ("Node + edge sparsity: keep 60% of clips, rounded (2 of 4 at tiny, 5 of 8 at small and msvd), "
     "each attending to its 2 nearest in time.")
    spec = _teacher(graph_layers=1)
    spec["model"].update(keep_ratio=0.6, edge_k=2, edge_by="time")
    return spec


# ----------------------------------------------------------------------------- transformer (SViTT)
# A second model family (variants/transformer.py): a video-text transformer of width module_dim, dense, with
# SViTT's sparsity, and with its temporal expansion; students across the two families (the losses that compare
# outputs both families have: logits, DKD, and the relations of the batch's video / question embeddings).

#: SViTT's sparsity at these sizes: edge (the clip's block + 2 random blocks + [CLS]) and node (keep 50% of the
#: visual tokens after video layers 1, 2 and 3, and 50% after the first multimodal layer)
SVITT = {"edge_sparse": True, "edge_local": 1, "edge_random": 2, "video_keep": 0.5, "video_drop_layers": [0, 1, 2],
         "fusion_keep": 0.5, "fusion_drop_layers": [0]}


@register_variant(tags=("transformer",))
def transformer():
    ("Dense video-text transformer (4 video, 1 text, 2 multimodal layers of width module_dim, 4 heads; CE only): "
     "the control of the SViTT-style variants.")
    return {"arch": "transformer", "model": {}, "loss": {}}


@register_variant(tags=("transformer",))
def transformer_svitt():
    ("SViTT-style sparse transformer: edge sparsity (each clip's block sees itself, 2 random blocks and [CLS]), "
     "node sparsity (keep 50% of visual tokens by [CLS] attention after video layers 1-3, 50% by the question's "
     "attention after multimodal layer 1).")
    return {"arch": "transformer", "model": dict(SVITT), "loss": {}}


@register_variant(tags=("transformer",))
def transformer_svitt_expand():
    ("SViTT's temporal expansion of transformer-svitt: 2 epochs on a quarter of the frames at keep 0.7, 2 on half "
     "at keep 0.6, then every frame at keep 0.5 (evaluation: every frame, keep 0.5).")
    return {"arch": "transformer", "model": {**SVITT, "expand_stages": 3, "expand_keep": [0.7, 0.6],
                                             "expand_epochs": 2}, "loss": {}}


#: the distillation losses that apply across the two families, with the parameters of their DualVGR students
CROSS_FAMILY_LOSSES = {"logits": {"T": 4.0}, "dkd": {}, "relational": {}, "similarity": {}}


def _transformer_student(loss: str) -> dict:
    return {"arch": "transformer", "model": {}, "loss": {"ce_weight": 1.0}, "teachers": ["teacher-g4"],
            "distill": [{"name": loss, "weight": 1.0, "params": dict(CROSS_FAMILY_LOSSES[loss])}]}


@register_variant(tags=("student", "transformer"))
def dualvgr_from_transformer_logits():
    """DualVGR student (1 graph layer) + Hinton logit KD (T=4) from the dense transformer teacher."""
    return _student({"name": "logits", "weight": 1.0, "params": {"T": 4.0}}, teachers=("transformer",))


@register_variant(tags=("student", "transformer"))
def dualvgr_from_transformer_dkd():
    """DualVGR student (1 graph layer) + decoupled KD from the dense transformer teacher."""
    return _student({"name": "dkd", "weight": 1.0, "params": {}}, teachers=("transformer",))


@register_variant(tags=("student", "transformer"))
def dualvgr_from_transformer_relational():
    """DualVGR student (1 graph layer) + RKD on the video embeddings from the dense transformer teacher."""
    return _student({"name": "relational", "weight": 1.0, "params": {}}, teachers=("transformer",))


@register_variant(tags=("student", "transformer"))
def dualvgr_from_transformer_similarity():
    """DualVGR student (1 graph layer) + TeachText question x video similarity KD from the dense transformer."""
    return _student({"name": "similarity", "weight": 1.0, "params": {}}, teachers=("transformer",))


@register_variant(tags=("transformer", "student"))
def transformer_from_dualvgr_logits():
    """Dense transformer student + Hinton logit KD (T=4) from the DualVGR teacher teacher-g4."""
    return _transformer_student("logits")


@register_variant(tags=("transformer", "student"))
def transformer_from_dualvgr_dkd():
    """Dense transformer student + decoupled KD from the DualVGR teacher teacher-g4."""
    return _transformer_student("dkd")


@register_variant(tags=("transformer", "student"))
def transformer_from_dualvgr_relational():
    """Dense transformer student + RKD on the video embeddings from the DualVGR teacher teacher-g4."""
    return _transformer_student("relational")


@register_variant(tags=("transformer", "student"))
def transformer_from_dualvgr_similarity():
    """Dense transformer student + TeachText question x video similarity KD from the DualVGR teacher teacher-g4."""
    return _transformer_student("similarity")
