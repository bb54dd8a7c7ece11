"""The appearance and motion backbones and their inputs: torchvision's ResNets (ImageNet) and video
networks (Kinetics-400), or the reference's ResNeXt-101 3D; weights from a file or torchvision's
cache (nothing is downloaded), or random for tests."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import get_weight

from harness.data.prepare.common import PrepareError
from harness.data.prepare.resnext3d import ResNeXt3D

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINETICS_MEAN, KINETICS_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)
APPEARANCE_MODELS = {"resnet50": "ResNet50_Weights.IMAGENET1K_V1", "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
                     "resnet152": "ResNet152_Weights.IMAGENET1K_V1"}
MOTION_MODELS = {"r2plus1d_18": "R2Plus1D_18_Weights.KINETICS400_V1", "r3d_18": "R3D_18_Weights.KINETICS400_V1",
                 "mc3_18": "MC3_18_Weights.KINETICS400_V1"}
RESNEXT3D = "resnext101-3d"


@dataclass
class Backbone:
    name: str
    module: nn.Module  # in eval mode on its device
    dim: int
    size: int
    mean: tuple | None  # on the 0..1 scale; None = raw 0..255 values (the reference's ResNeXt)
    std: tuple | None
    weights: str  # what the attrs record: torchvision:<enum>, file:<name>, random
    weights_path: str = ""


# ----------------------------------------------------------------------------- weights


def _hub_checkpoint(enum_name: str) -> Path:
    """Where torchvision keeps a weights file once downloaded (nothing is downloaded here)."""
    url = get_weight(enum_name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _load_state_dict(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{what} weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PrepareError(f"{path}: cannot load {what} weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise PrepareError(f"{path}: no state dict in the {what} weights file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _apply_weights(module: nn.Module, state: dict, path: Path, what: str, drop: tuple[str, ...] = ()) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    have = module.state_dict()
    # checkpoints from before PyTorch 0.4.1 (HCRN's ResNeXt) have no BatchNorm num_batches_tracked
    missing = [k for k in have if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in have]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in have.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:3]) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")
        problems = [f"{label}: {few(xs)}" for label, xs in (("missing", missing), ("unexpected", unexpected),
                                                             ("wrong shape", shapes)) if xs]
        raise PrepareError(f"{path}: not {what} weights ({'; '.join(problems)})")
    module.load_state_dict(state, strict=False)


def _weights_state(name: str, enum_name: str | None, weights: Path | None, random_weights: bool, what: str,
                   option: str) -> tuple[dict | None, str, str]:
    """(state dict or None for random, the weights label, the path) for a backbone. ``option`` is
    how the user passes a file (``--appearance-weights PATH``)."""
    if random_weights:
        return None, "random", ""
    if weights is not None:
        return _load_state_dict(weights, what), f"file:{Path(weights).name}", str(Path(weights).resolve())
    if enum_name is None:
        raise PrepareError(f"{what} model {name} needs a checkpoint: pass {option}")
    cached = _hub_checkpoint(enum_name)
    if not cached.is_file():
        raise PrepareError(
            f"no weights for {what} model {name}: torchvision's {enum_name} is not in its cache ({cached}), and this "
            f"command does not download. Either fetch it once on a machine with internet access, e.g. "
            f"python -c \"import torchvision; torchvision.models.get_model('{name}', "
            f"weights='{enum_name.split('.')[-1]}')\" "
            f"(or download {get_weight(enum_name).url} to {cached}), or pass {option} (a state dict file).")
    return _load_state_dict(cached, what), f"torchvision:{enum_name}", str(cached)


@contextmanager
def _seeded_float32():
    """Build a model the same way every time (random weights for tests): seed 0, float32, without
    touching the caller's RNG state or default dtype."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


# ----------------------------------------------------------------------------- the backbones


def build_appearance(name: str, weights: Path | None, random_weights: bool, size: int, device) -> Backbone:
    """A torchvision ResNet's 2048-d pool5 feature of a frame (ImageNet normalisation)."""
    if name not in APPEARANCE_MODELS:
        raise PrepareError(f"unknown appearance model {name!r} (known: {', '.join(APPEARANCE_MODELS)})")
    state, label, wpath = _weights_state(name, APPEARANCE_MODELS[name], weights, random_weights, "appearance",
                                         "--appearance-weights PATH")
    with _seeded_float32():
        model = getattr(torchvision.models, name)(weights=None)
    if state is not None:
        _apply_weights(model, state, Path(wpath), name)
    model.fc = nn.Identity()  # pool5: the reference drops the last layer
    model = model.eval().to(device, torch.float32)
    return Backbone(name, model, 2048, size, IMAGENET_MEAN, IMAGENET_STD, label, wpath)


def _motion_spec(spec: str, weights: Path | None) -> tuple[str, Path | None]:
    """``--motion NAME`` or ``--motion resnext101-3d:PATH`` -> (name, weights file)."""
    name, _, spec_path = spec.partition(":")
    if not spec_path:
        return name, weights
    if name != RESNEXT3D:
        raise PrepareError(f"--motion {spec!r}: only {RESNEXT3D} takes a checkpoint path in the name; "
                           f"use --motion-weights PATH")
    if weights is not None and Path(weights) != Path(spec_path):
        raise PrepareError(f"--motion {spec!r} and --motion-weights {weights} name two checkpoints")
    return name, Path(spec_path)


def _build_resnext3d(weights: Path | None, random_weights: bool, size: int, device) -> Backbone:
    """The reference's ResNeXt-101 3D (2048-d), fed 0..255 pixel values as HCRN does."""
    state, label, wpath = _weights_state(RESNEXT3D, None, weights, random_weights, "motion",
                                         f"--motion {RESNEXT3D}:PATH (HCRN's resnext-101-kinetics.pth)")
    with _seeded_float32():
        model = ResNeXt3D()
    if state is not None:  # the checkpoint's classifier (fc, 400 Kinetics classes) is not used
        _apply_weights(model, state, Path(wpath), "ResNeXt-101 3D", drop=("fc.",))
    return Backbone(RESNEXT3D, model.eval().to(device, torch.float32), 2048, size, None, None, label, wpath)


def build_motion(spec: str, weights: Path | None, random_weights: bool, size: int, device) -> Backbone:
    """One feature per clip: torchvision's Kinetics-400 video networks (512-d) or ``resnext101-3d:PATH``."""
    name, weights = _motion_spec(spec, weights)
    if name == RESNEXT3D:
        return _build_resnext3d(weights, random_weights, size, device)
    if name not in MOTION_MODELS:
        raise PrepareError(f"unknown motion model {spec!r} (known: {', '.join(MOTION_MODELS)}, {RESNEXT3D}:PATH)")
    state, label, wpath = _weights_state(name, MOTION_MODELS[name], weights, random_weights, "motion",
                                         "--motion-weights PATH")
    with _seeded_float32():
        model = getattr(torchvision.models.video, name)(weights=None)
    if state is not None:
        _apply_weights(model, state, Path(wpath), name)
    model.fc = nn.Identity()  # the 512-d globally pooled clip feature
    model = model.eval().to(device, torch.float32)
    return Backbone(name, model, 512, size, KINETICS_MEAN, KINETICS_STD, label, wpath)


def preprocess(frames: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, H, W, 3) uint8 on the device -> (N, 3, size, size) float: bicubic resize of the whole
    frame to a square (antialiased, like PIL's bicubic in the reference's ``imresize``; no crop),
    kept in 0..255, then normalised (or left in 0..255 when ``mean`` is None)."""
    x = frames.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0, 255).round_()  # imresize returns uint8
    if mean is None:
        return x
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255
    return (x - m) / s
