"""Per-model preprocessing: input size and normalisation (``docs/architecture.md``, "Teacher checkpoints").

Each teacher sees an image normalised its own way; the student has its own. Images travel through
the engine as uint8 ``(N, 3, H, W)`` tensors and each model applies its :class:`Preprocessing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import KamalError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, float)):
        value = (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise KamalError(f"input size must be a positive int or [height, width], got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """Resize to ``input_size = (H, W)``, scale to [0, 1], subtract ``mean``, divide by ``std``."""

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "input_size", _size_pair(self.input_size))
        for field in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, field))
            if len(values) != 3:
                raise KamalError(f"preprocessing {field} needs 3 values (R, G, B), got {list(values)}")
            object.__setattr__(self, field, values)
        if min(self.std) <= 0:
            raise KamalError(f"preprocessing std values must be positive, got {list(self.std)}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) ``(N, 3, H, W)`` → normalised float ``(N, 3, *input_size)``."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        return cls(data["input_size"], data["mean"], data["std"])

    def replace(self, input_size=None, mean=None, std=None) -> "Preprocessing":
        return Preprocessing(
            input_size if input_size is not None else self.input_size,
            mean if mean is not None else self.mean,
            std if std is not None else self.std,
        )
