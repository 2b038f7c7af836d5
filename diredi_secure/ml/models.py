"""The cloud teachers (CNNs) and the edge students (an MLP; a depthwise-separable CNN), and their
checkpoints.

Two pairs: the digits' (8x8 inputs: ``cnn_teacher`` about 37k parameters, ``mlp_student`` 2,410)
and the MNIST scenario's (28x28 inputs: ``cnn28_teacher`` 935k, ``dscnn_student`` 86k, the size of a microcontroller-class edge model; :func:`mnist_specs`).

Both use GroupNorm rather than BatchNorm: BatchNorm mixes samples within a batch, which breaks the
per-sample gradients DP-SGD (Opacus) needs. A checkpoint is a safetensors file (weights, float32)
whose metadata holds a JSON ``architecture`` (a :class:`ModelSpec`) plus free-form string metadata;
loading goes through :mod:`diredi_secure.checkpoint`, which refuses pickle and zip files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..checkpoint import (
    DEFAULT_MAX_CHECKPOINT_BYTES,
    checkpoint_bytes,
    load_checkpoint_bytes,
    read_regular_file,
)
from ..errors import KeyFileError, ModelFormatError
from .data import NUM_CLASSES

__all__ = [
    "ModelSpec",
    "build_model",
    "count_parameters",
    "flat_parameters",
    "load_model",
    "load_model_bytes",
    "mnist_specs",
    "model_bytes",
    "save_model",
    "specs_for",
    "state_arrays",
    "student_spec",
    "teacher_spec",
]

Architecture = Literal["cnn_teacher", "mlp_student", "cnn28_teacher", "dscnn_student"]
_ARCHITECTURES = ("cnn_teacher", "mlp_student", "cnn28_teacher", "dscnn_student")
ARCHITECTURE_FORMAT = "diredi-model/1"


@dataclass(frozen=True)
class ModelSpec:
    """What :func:`build_model` builds: enough to rebuild the module before loading weights."""

    architecture: Architecture
    num_classes: int = NUM_CLASSES
    hidden: int = 32
    channels: tuple[int, int, int] = (16, 32, 64)

    def __post_init__(self) -> None:
        if self.architecture not in _ARCHITECTURES:
            raise ModelFormatError(f"unknown architecture {self.architecture!r}")
        if not (1 < self.num_classes <= 1000 and 0 < self.hidden <= 4096):
            raise ModelFormatError("model sizes out of range")
        if len(self.channels) != 3 or not all(0 < c <= 512 and c % 4 == 0 for c in self.channels):
            raise ModelFormatError("channels must be three multiples of 4 in (0, 512]")

    def to_json(self) -> str:
        return json.dumps({"format": ARCHITECTURE_FORMAT, **asdict(self)}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ModelSpec:
        try:
            raw = json.loads(text)
            if raw.pop("format", None) != ARCHITECTURE_FORMAT:
                raise ModelFormatError("architecture JSON has no or an unknown format tag")
            return ModelSpec(
                architecture=raw["architecture"],
                num_classes=int(raw["num_classes"]),
                hidden=int(raw["hidden"]),
                channels=tuple(int(c) for c in raw["channels"]),  # type: ignore[arg-type]
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFormatError(f"architecture JSON is malformed: {exc}") from exc


def teacher_spec() -> ModelSpec:
    """The default cloud CNN (about 37k parameters)."""
    return ModelSpec("cnn_teacher", hidden=48)


def student_spec() -> ModelSpec:
    """The default edge MLP: 64 -> 32 -> 10 (2,410 parameters, 15x fewer than the teacher)."""
    return ModelSpec("mlp_student", hidden=32)


def mnist_specs() -> tuple[ModelSpec, ModelSpec]:
    """(teacher, student) for 28x28 inputs: a CNN of 935,338 parameters and a depthwise-separable
    CNN of 86,026 (10.9x fewer; tests/unit/test_ml_models_mnist.py pins both counts). Sized for
    a shared 2-core CPU: the strides keep the depthwise layers (slow on CPU) at 7x7 and 4x4."""
    return (ModelSpec("cnn28_teacher", hidden=768, channels=(16, 32, 128)),
            ModelSpec("dscnn_student", hidden=128, channels=(16, 64, 192)))


def specs_for(dataset: str) -> tuple[ModelSpec, ModelSpec]:
    """(teacher, student) specs for a scenario's dataset (``"digits"`` or ``"mnist"``)."""
    if dataset == "mnist":
        return mnist_specs()
    if dataset == "digits":
        return teacher_spec(), student_spec()
    raise ModelFormatError(f"no models for dataset {dataset!r}")


class CnnTeacher(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        c1, c2, c3 = spec.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.GroupNorm(4, c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(4, c2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.GroupNorm(4, c3), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 4, spec.hidden), nn.ReLU(),
            nn.Linear(spec.hidden, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class MlpStudent(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, spec.hidden), nn.ReLU(),
            nn.Linear(spec.hidden, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class Cnn28Teacher(nn.Module):
    """Three conv stages (28 -> 14 -> 7 -> 3) and a wide hidden layer: the cloud model."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        c1, c2, c3 = spec.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.GroupNorm(4, c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(4, c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.GroupNorm(4, c3), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 9, spec.hidden), nn.ReLU(),
            nn.Linear(spec.hidden, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


def _separable(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    """A depthwise 3x3 (one filter per channel) then a pointwise 1x1, each with GroupNorm + ReLU:
    MobileNet's block, about 9/c_out + 1/9 of a full 3x3 convolution's weights."""
    return [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in),
            nn.GroupNorm(4, c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_out, 1), nn.GroupNorm(4, c_out), nn.ReLU()]


class DsCnnStudent(nn.Module):
    """Stem 3x3 conv of stride 2, four depthwise-separable blocks (14 -> 7 -> 7 -> 4 -> 4), global
    average pool,
    one hidden layer: the edge model. GroupNorm throughout (Opacus' per-sample gradients)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        c1, c2, c3 = spec.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.GroupNorm(4, c1), nn.ReLU(),
            *_separable(c1, c2, 2), *_separable(c2, c2, 1),
            *_separable(c2, c3, 2), *_separable(c3, c3, 1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c3, spec.hidden), nn.ReLU(),
            nn.Linear(spec.hidden, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


def build_model(spec: ModelSpec, *, seed: int | None = None) -> nn.Module:
    """A freshly initialised module for ``spec`` (seeded when ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    if spec.architecture == "cnn_teacher":
        return CnnTeacher(spec)
    if spec.architecture == "cnn28_teacher":
        return Cnn28Teacher(spec)
    if spec.architecture == "dscnn_student":
        return DsCnnStudent(spec)
    return MlpStudent(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(int(p.numel()) for p in model.parameters() if p.requires_grad)


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The state dict as float32 numpy arrays (names without Opacus' ``_module.`` prefix)."""
    inner = getattr(model, "_module", model)
    return {k: v.detach().cpu().numpy().astype(np.float32).copy()
            for k, v in inner.state_dict().items()}


def flat_parameters(model: nn.Module) -> np.ndarray:
    """All parameters (``nn.Parameter``, whether or not frozen now), flattened and concatenated in state_dict order (float32)."""
    inner = getattr(model, "_module", model)
    names = {n for n, _ in inner.named_parameters()}
    parts = [v.detach().cpu().reshape(-1) for k, v in inner.state_dict().items() if k in names]
    return torch.cat(parts).numpy().astype(np.float32)


def set_flat_parameters(model: nn.Module, flat: np.ndarray) -> None:
    """Inverse of :func:`flat_parameters`; raises :class:`ModelFormatError` on a size mismatch."""
    inner = getattr(model, "_module", model)
    params = dict(inner.named_parameters())
    names = [k for k in inner.state_dict() if k in params]
    total = sum(params[k].numel() for k in names)
    if flat.shape != (total,):
        raise ModelFormatError(f"flat parameter vector has {flat.size} values, model has {total}")
    offset = 0
    with torch.no_grad():
        for k in names:
            n = params[k].numel()
            params[k].copy_(torch.from_numpy(flat[offset : offset + n]).view_as(params[k]))
            offset += n


def model_bytes(model: nn.Module, spec: ModelSpec, metadata: Mapping[str, str] | None = None) -> bytes:
    """Safetensors bytes of ``model`` with its architecture JSON in the metadata."""
    meta = dict(metadata or {})
    meta["architecture"] = spec.to_json()
    return checkpoint_bytes(state_arrays(model), meta)


def save_model(
    path: Path, model: nn.Module, spec: ModelSpec, metadata: Mapping[str, str] | None = None
) -> None:
    from ..checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), model_bytes(model, spec, metadata))


def load_model_bytes(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
) -> tuple[nn.Module, ModelSpec, dict[str, str]]:
    """Rebuild a model from untrusted checkpoint bytes.

    Raises :class:`ModelFormatError` (pickle/zip refused, no architecture, tensors that do not fit
    the architecture or are not finite), :class:`TooLarge` over ``max_bytes``.
    """
    tensors, meta = load_checkpoint_bytes(data, max_bytes=max_bytes)
    if "architecture" not in meta:
        raise ModelFormatError("checkpoint has no 'architecture' metadata")
    spec = ModelSpec.from_json(meta.pop("architecture"))
    model = build_model(spec)
    expected = model.state_dict()
    if set(tensors) != set(expected):
        raise ModelFormatError(
            f"checkpoint tensors {sorted(set(tensors) ^ set(expected))} do not fit {spec.architecture}"
        )
    state: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        arr = tensors[name]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != np.float32:
            raise ModelFormatError(f"tensor {name} has shape {arr.shape} {arr.dtype}, "
                                   f"expected {tuple(ref.shape)} float32")
        if not np.all(np.isfinite(arr)):
            raise ModelFormatError(f"tensor {name} has non-finite values")
        state[name] = torch.from_numpy(arr.copy())
    model.load_state_dict(state)
    model.eval()
    return model, spec, meta


def load_model(
    path: Path, *, max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
) -> tuple[nn.Module, ModelSpec, dict[str, str]]:
    """Rebuild a model from the checkpoint file at ``path``; see :func:`load_model_bytes`.

    The file is read with :func:`read_regular_file` (regular files only, at most ``max_bytes``
    read, the cap :func:`load_checkpoint_bytes` applies anyway): a FIFO or device is a
    :class:`ModelFormatError`, an over-cap file :class:`TooLarge`, before anything is parsed.
    """
    try:
        data = read_regular_file(Path(path), "model", max_bytes)
    except KeyFileError as exc:  # mapped as load_checkpoint maps it
        raise ModelFormatError(exc.message) from exc
    return load_model_bytes(data, max_bytes=max_bytes)
