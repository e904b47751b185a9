"""Teacher-level filters f_k^n (filtered-KA Eq. 4) and the adapter used when shapes differ.

:class:`TeacherFilter` is the paper's "light channel coding module": global average pooling, FC
c→c/r, ReLU, FC c/r→c and a sigmoid gate that scales the channels of the student feature F_u^k
before it enters teacher n (r = 4). One reading choice, documented and tested: the gate is
``2·sigmoid(z)`` with the last FC zero-initialised, so a new filter is exactly the identity. With a
plain sigmoid a new filter would halve every feature fed to the teacher, and a student initialised
from that teacher would start far from the teacher's own predictions.

The paper assumes the student's block k has the teacher's shape. When it does not (another width
or architecture), :class:`FeatureAdapter` replaces the SE filter: a 1x1 convolution to the
teacher's channel count and a bilinear resize to the teacher's spatial size.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class TeacherFilter(nn.Module):
    """Channel gate ``x * 2·sigmoid(FC(ReLU(FC(pool(x)))))``; the identity when freshly built."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = 2 * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class FeatureAdapter(nn.Module):
    """1x1 conv from the student's channels to the teacher's, then a resize to the teacher's size.

    Unlike the SE gate it can re-map channels: where the student's block feature and the teacher's
    are related only up to a linear change of channels (teachers trained apart), it can learn that map.
    """

    def __init__(self, in_channels: int, out_channels: int, size: Sequence[int]):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        self.size = tuple(int(s) for s in size)

    @torch.no_grad()
    def set_map(self, weight: torch.Tensor, bias: torch.Tensor) -> "FeatureAdapter":
        """Set the 1x1 convolution to ``weight`` ``(out, in)`` and ``bias`` ``(out,)``."""
        self.proj.weight.copy_(weight.reshape(self.proj.weight.shape))
        self.proj.bias.copy_(bias)
        return self

    def set_identity(self) -> "FeatureAdapter":
        """Channel i to channel i (the identity when the channel counts match), no bias."""
        out_c, in_c = self.proj.weight.shape[:2]
        return self.set_map(torch.eye(out_c, in_c), torch.zeros(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x


def filter_spec(student_shape: Sequence[int], teacher_shape: Sequence[int], reduction: int = 4,
                kind: str = "se") -> dict[str, Any]:
    """How to connect a student feature of ``student_shape`` (C, H, W) to a teacher block's input:
    ``kind = "se"`` gives the SE gate where the shapes match (else an adapter), ``"adapter"`` always an
    adapter."""
    if kind == "se" and tuple(student_shape) == tuple(teacher_shape):
        return {"kind": "se", "channels": int(student_shape[0]), "reduction": int(reduction)}
    return {"kind": "adapter", "in_channels": int(student_shape[0]), "out_channels": int(teacher_shape[0]),
            "size": [int(teacher_shape[1]), int(teacher_shape[2])]}


def build_filter(spec: dict[str, Any]) -> nn.Module:
    kind = spec["kind"]
    if kind == "se":
        return TeacherFilter(spec["channels"], spec.get("reduction", 4))
    if kind == "adapter":
        return FeatureAdapter(spec["in_channels"], spec["out_channels"], spec["size"])
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"unknown filter kind {kind!r}")
