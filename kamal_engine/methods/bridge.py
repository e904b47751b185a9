"""The transfer bridge of adaptive knowledge amalgamation (Shen et al., ICCV 2019, Section 3.2).

Between block l of the student and the paired block of a teacher, a feature-alignment (FA) module
on each side (a 1x1 convolution, Eq. 1) maps both features to a common ``C_out`` channels; the
transfer loss (Eq. 2) is the mean squared difference of the two aligned maps. The regulariser
(Eq. 4) pulls every output channel's weight vector ``w_{·j}`` to unit norm (the relaxed Eq. 3),
which rules out the trivial solution of both aligned maps going to zero.

Readings where the paper leaves room (documented here and tested):

* ``C_out`` is the student's channel count at block l;
* Eq. 4 is applied to both FA convolutions of a bridge (either alone going to zero would let the
  other side follow it);
* teachers of another architecture may have another spatial size at the paired block: the
  teacher's aligned map is resized to the student's (average pooling when larger, bilinear when
  smaller) before Eq. 2;
* blocks are paired by relative depth: student block l of B_s goes with teacher block
  ``ceil(l · B_t / B_s)`` (the identity when the block counts agree).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def paired_block(student_block: int, student_blocks: int, teacher_blocks: int) -> int:
    """The teacher block (1-based) paired with ``student_block`` (1-based), by relative depth."""
    return max(1, math.ceil(student_block * teacher_blocks / student_blocks))


def match_size(feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``feature`` resized to spatial ``size`` (average pooling down, bilinear up)."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, tuple(size))
    return F.interpolate(feature, size=tuple(size), mode="bilinear", align_corners=False)


class FeatureAlignment(nn.Module):
    """FA (Eq. 1): ``F_a,c = Σ_c' w_{c,c'} F_c'``, a 1x1 convolution without bias.

    The rows ``w_{c,·}`` start at unit norm, where the regulariser of Eq. 4 is zero.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        with torch.no_grad():
            w = torch.randn(out_channels, in_channels)
            self.conv.weight.copy_((w / w.norm(dim=1, keepdim=True)).view(out_channels, in_channels, 1, 1))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.conv(feature)

    def regulariser(self) -> torch.Tensor:
        """Eq. 4: ``1/C_out Σ_j (Σ_i w_ij² − 1)²``, with j the output and i the input channel."""
        w = self.conv.weight.flatten(1)
        return ((w * w).sum(1) - 1).pow(2).mean()


def transfer_loss(aligned_student: torch.Tensor, aligned_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 2 per sample: ``1/(C H W) ||F_a^s − F_a^t||²``; shape (N,)."""
    return (aligned_student - aligned_teacher).pow(2).flatten(1).mean(1)


class TransferBridge(nn.Module):
    """FA on the student's block-l feature and on the paired teacher feature (Fig. 3)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__()
        channels = int(student_shape[0])
        self.student = FeatureAlignment(channels, channels)
        self.teacher = FeatureAlignment(int(teacher_shape[0]), channels)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        """Eq. 2 per sample, shape (N,)."""
        aligned_teacher = match_size(self.teacher(teacher_feature), student_feature.shape[-2:])
        return transfer_loss(self.student(student_feature), aligned_teacher)

    def regulariser(self) -> torch.Tensor:
        """Eq. 4 for both FA modules of the bridge."""
        return self.student.regulariser() + self.teacher.regulariser()
