"""How related two networks' block features are, and how much of a teacher's knowledge gets through.

Filtered-KA's teacher-level filter (Eq. 4) is a channel gate: it can rescale the channels of the
student's feature, not re-map them. That suffices when the student's block-k feature and teacher
n's are related channel by channel, as they are for teachers fine-tuned from one backbone (the
paper's setting), and fails for teachers trained apart. Two measures say which case a run is in:

* :func:`feature_cka`: linear CKA (centred kernel alignment, Kornblith et al. 2019) between two
  feature maps of the same images, each spatial position a sample and each channel a feature.
  It is invariant to an orthogonal change of channels (a permutation included) and to a global
  scale, so it is ~1 for a network against itself or a channel-permuted copy; it falls where no
  linear per-position map (a 1x1 convolution) relates the two features.
* :func:`channel_alignment`: how much of the teacher's feature a per-channel rescaling of the
  student's explains (channel c against channel c). This is what the SE gate can use: high for
  teachers fine-tuned from one backbone (their channels still mean the same), near 0 for teachers
  trained apart and for a channel-permuted copy, however related (CKA) their features are. It
  decides, per teacher and block, between the SE gate and an adapter.
* :func:`knowledge_share`: the part of what a teacher's predictions say about the images that the
  student's entangled prediction reproduces. The soft-target loss of Eq. 7 is ℓ = H(p) + KL(p‖q):
  its floor is the teacher's own entropy H(p) (every block's converged loss is measured against
  it), and a prediction that ignores the image (the teacher's mean prediction) is ``prior`` above
  it. The share is ``1 - (ℓ - floor) / (prior - floor)``: 1 when the student reproduces the
  teacher exactly, 0 when it knows no more than the label frequencies.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .selection import Task


def _positions(feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, C, H, W)`` → ``(N·h·w, C)`` after average-pooling to ``size = (h, w)``."""
    if tuple(feature.shape[-2:]) != tuple(size):
        feature = F.adaptive_avg_pool2d(feature, tuple(size))
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).double()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two sample-by-feature matrices ``(n, p)`` and ``(n, q)`` (same samples)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm) if norm > 0 else 0.0


def feature_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of two feature maps ``(N, C, H, W)`` of the same N images, positions as samples.

    Maps of different spatial sizes are both average-pooled to the smaller one; channel counts may
    differ.
    """
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return linear_cka(_positions(a, size), _positions(b, size))


def channel_alignment(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of feature ``b``'s variance explained by an affine map of each channel of ``a`` to the same
    channel of ``b`` (R² of the best per-channel fit, channels weighted by their variance; positions as
    samples). 0 when the channel counts differ: no channel of ``a`` stands for one of ``b``."""
    if a.shape[1] != b.shape[1]:
        return 0.0
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    x, y = _positions(a, size), _positions(b, size)
    x, y = x - x.mean(0), y - y.mean(0)
    vx, vy = x.pow(2).sum(0), y.pow(2).sum(0)
    r2 = (x * y).sum(0).pow(2) / (vx * vy).clamp_min(1e-30)
    return float((vy * r2).sum() / vy.sum().clamp_min(1e-30))


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def least_squares_map(a: torch.Tensor, b: torch.Tensor, ridge: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1x1 convolution ``(W, bias)`` that best maps feature ``a`` to feature ``b`` (ridge regression,
    positions as samples, ``a`` resized to ``b``'s spatial size): the data-driven start of an adapter.

    ``ridge`` (relative to the mean variance of ``a``'s channels): None chooses it from :data:`RIDGES`
    by the error on the second half of the images of a fit on the first half, so that a deep block with
    few positions per image and many channels is not over-fitted; then the map is fitted on all images.
    """
    if tuple(a.shape[-2:]) != tuple(b.shape[-2:]):
        a = F.interpolate(a, size=tuple(b.shape[-2:]), mode="bilinear", align_corners=False)
    if ridge is None:
        half = len(a) // 2
        if half < 2:
            ridge = RIDGES[1]
        else:
            xa, ya = _positions(a[half:], a.shape[-2:]), _positions(b[half:], b.shape[-2:])

            def held_out_error(r):
                weight, bias = _ridge_fit(a[:half], b[:half], r)
                return float((xa @ weight.double().T + bias.double() - ya).pow(2).mean())

            ridge = min(RIDGES, key=held_out_error)
    return _ridge_fit(a, b, ridge)


def _ridge_fit(a: torch.Tensor, b: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _positions(a, a.shape[-2:]), _positions(b, b.shape[-2:])
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    gram += torch.eye(len(gram), dtype=gram.dtype) * ridge * gram.diagonal().mean().clamp_min(1e-12)
    weight = torch.linalg.solve(gram, xc.T @ yc).T  # (C_b, C_a)
    return weight.float(), (my - weight @ mx).float()


def reference_losses(targets: torch.Tensor, tasks: Sequence[Task]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task: the floor (the teacher's mean entropy) and the prior loss (the soft-target loss of the
    teacher's mean prediction, which ignores the image). ``targets`` holds the tasks' columns."""
    floors, priors, col = [], [], 0
    p_all = targets.double().clamp(1e-7, 1 - 1e-7)
    for task in tasks:
        p = p_all[:, col:col + len(task.outputs)]
        mean = p.mean(0, keepdim=True).expand_as(p)
        if task.kind == "multilabel":
            def loss(q):
                return -(p * q.log() + (1 - p) * (1 - q).log()).mean(0)
            floors.append(loss(p))
            priors.append(loss(mean))
        else:
            p = p / p.sum(1, keepdim=True)
            mean = mean / mean.sum(1, keepdim=True)
            floors.append((-(p * p.log()).sum(1).mean()).unsqueeze(0))
            priors.append((-(p * mean.log()).sum(1).mean()).unsqueeze(0))
        col += len(task.outputs)
    return torch.cat(floors).float(), torch.cat(priors).float()


def knowledge_share(loss: float, floor: float, prior: float) -> float:
    """``1 - (loss - floor) / (prior - floor)``, clipped to [0, 1]; 1.0 when the teacher's prediction does
    not depend on the image (nothing to get through)."""
    span = prior - floor
    if span <= 1e-9:
        return 1.0
    return float(min(1.0, max(0.0, 1.0 - (loss - floor) / span)))
