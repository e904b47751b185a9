"""Image generators of the data-free methods.

:class:`DCGANGenerator` is DAFL's generator (Chen et al., ICCV 2019, Section 4.1: "a deep
convolutional generator following DCGAN [...] and a batch normalization at the end of the generator
to smooth the sample values"): a linear layer to a ``2w x S/4 x S/4`` map, two nearest-neighbour
upsamplings with 3x3 convolutions, batch norm and LeakyReLU, a 3x3 convolution to RGB, ``tanh``,
and a final affine-free batch norm. ``w`` (``width``) is 64 in the paper's MNIST generator.

Its output is read as an image already normalised the student's way (zero mean, unit variance per
channel, as the final batch norm makes it); :class:`GeneratedImages` turns it into what each teacher
expects and into uint8 previews.

:class:`GroupStackGenerator` is the dual-GAN's generator (Ye et al., CVPR 2020, Eq. 3): a stack of
:class:`GeneratorGroup` whose intermediate outputs have the student's feature shapes at chosen
block boundaries (:func:`group_boundaries`) and whose last output is the image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocessing import Preprocessing


class DCGANGenerator(nn.Module):
    """z (N, latent_dim) → image (N, 3, H, W) with a final affine-free batch norm."""

    def __init__(self, latent_dim: int = 100, image_size: Sequence[int] = (32, 32), width: int = 64,
                 channels: int = 3):
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.init_size = (max(1, self.image_size[0] // 4), max(1, self.image_size[1] // 4))
        w = int(width)
        self.project = nn.Linear(self.latent_dim, 2 * w * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(2 * w)
        self.conv1 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2))
        self.conv2 = nn.Sequential(nn.Conv2d(2 * w, w, 3, 1, 1), nn.BatchNorm2d(w), nn.LeakyReLU(0.2))
        self.to_image = nn.Sequential(nn.Conv2d(w, channels, 3, 1, 1), nn.Tanh(),
                                      nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z.flatten(1)).view(z.shape[0], -1, *self.init_size)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.interpolate(self.conv1(x), scale_factor=2)
        x = self.conv2(x)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.to_image(x)


class GeneratedImages:
    """Generated images (normalised the student's way) as each teacher and a person see them.

    A teacher with other preprocessing sees the same picture: the image is taken back to [0, 1]
    pixels with the student's mean/std, then resized and normalised with the teacher's own.
    """

    def __init__(self, student: Preprocessing):
        self.student = student

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.student.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.student.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x * std + mean

    def for_teacher(self, x: torch.Tensor, teacher: Preprocessing) -> torch.Tensor:
        return x if teacher == self.student else teacher(self.to_pixels(x))

    def preview(self, x: torch.Tensor, count: int = 16) -> torch.Tensor:
        """uint8 (count, 3, H, W) for the SamplesGenerated event."""
        pixels = self.to_pixels(x[:count].detach().float())
        return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class GeneratorGroup(nn.Module):
    """One group ``G^j`` of the dual-GAN's group-stack generator (Eq. 3).

    Its input is the noise z (the first group: a linear projection to a ``width x ⌈H/4⌉ x ⌈W/4⌉``
    map, as in :class:`DCGANGenerator`) or the previous group's feature (a 3x3 convolution). Then
    nearest-neighbour 2x upsamplings, each with a 3x3 convolution, batch norm and LeakyReLU, until
    the map covers ``out_shape``; a bilinear resize to the exact size; and a 3x3 convolution to
    ``C`` channels. An intermediate group ends like a teacher block (batch norm + ReLU, so its
    feature is non-negative as the teachers' are); the image group ends like DAFL's generator
    (``tanh`` and an affine-free batch norm, i.e. an image normalised the student's way).
    """

    def __init__(self, out_shape: Sequence[int], width: int = 64, *, latent_dim: int | None = None,
                 in_shape: Sequence[int] | None = None, image: bool = False):
        super().__init__()
        if (latent_dim is None) == (in_shape is None):
            raise ValueError("a generator group takes either the noise (latent_dim) or a feature (in_shape)")
        channels, height, width_px = (int(s) for s in out_shape)
        self.out_shape = (channels, height, width_px)
        w = int(width)
        if latent_dim is not None:
            start = (max(1, math.ceil(height / 4)), max(1, math.ceil(width_px / 4)))
            self.input = nn.Sequential(nn.Linear(int(latent_dim), w * start[0] * start[1]),
                                       nn.Unflatten(1, (w, *start)), nn.BatchNorm2d(w))
        else:
            start = (int(in_shape[1]), int(in_shape[2]))
            self.input = nn.Sequential(nn.Conv2d(int(in_shape[0]), w, 3, 1, 1), nn.BatchNorm2d(w), nn.LeakyReLU(0.2))
        layers, size = [], start
        while size[0] < height or size[1] < width_px:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w, 3, 1, 1), nn.BatchNorm2d(w),
                       nn.LeakyReLU(0.2)]
            size = (size[0] * 2, size[1] * 2)
        self.upsample = nn.Sequential(*layers)
        end = [nn.Tanh(), nn.BatchNorm2d(channels, affine=False)] if image else [nn.BatchNorm2d(channels), nn.ReLU()]
        self.output = nn.Sequential(nn.Conv2d(w, channels, 3, 1, 1), *end)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.upsample(self.input(x))
        if tuple(x.shape[-2:]) != self.out_shape[1:]:
            x = F.interpolate(x, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return self.output(x)


def group_boundaries(groups: int, blocks: int) -> list[int]:
    """Where each group's output sits among the ``blocks`` block boundaries (0 = the image).

    Group j (1-based) of J produces the feature that enters block ``round((J - j) · B / J) + 1``: with
    J = B this is the paper's Eq. 5 (group j stands for the output of block B − j, so it is judged by
    the teacher's last j blocks); with fewer groups the boundaries are spread evenly (J = 2, B = 4:
    the output of block 2, then the image); the last group always makes the image.
    """
    if not 1 <= groups <= blocks:
        raise ValueError(f"the generator needs between 1 and {blocks} groups (one per block at most), not {groups}")
    return [int(round((groups - j) * blocks / groups)) for j in range(1, groups + 1)]


class GroupStackGenerator(nn.Module):
    """``{G^1 .. G^J}`` (Eq. 3): ``F^1 = G^1(z)``, ``F^j = G^j(F^{j-1})``; the last ``F^J`` is the image.

    ``shapes[j]`` is the (C, H, W) of group j's output: the student's feature shape at that group's
    boundary (:func:`group_boundaries`), so a group's feature can stand in for the student's own
    (the second input stream of Eq. 16), and ``(3, H, W)`` for the image group.
    """

    def __init__(self, latent_dim: int, shapes: Sequence[Sequence[int]], width: int = 64):
        super().__init__()
        self.latent_dim = int(latent_dim)
        groups, previous = [], None
        for j, shape in enumerate(shapes):
            last = j == len(shapes) - 1
            groups.append(GeneratorGroup(shape, width, latent_dim=self.latent_dim if previous is None else None,
                                         in_shape=previous, image=last))
            previous = shape
        self.groups = nn.ModuleList(groups)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], z.flatten(1)
        for group in self.groups:
            x = group(x)
            features.append(x)
        return features
