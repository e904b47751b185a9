"""Image generators of the data-free methods.

:class:`DCGANGenerator` is DAFL's generator (Chen et al., ICCV 2019, Section 4.1: "a deep
convolutional generator following DCGAN [...] and a batch normalization at the end of the generator
to smooth the sample values"): a linear layer to a ``2w x S/4 x S/4`` map, two nearest-neighbour
upsamplings with 3x3 convolutions, batch norm and LeakyReLU, a 3x3 convolution to RGB, ``tanh``,
and a final affine-free batch norm. ``w`` (``width``) is 64 in the paper's MNIST generator.

Its output is read as an image already normalised the student's way (zero mean, unit variance per
channel, as the final batch norm makes it); :class:`GeneratedImages` turns it into what each teacher
expects and into uint8 previews.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .preprocessing import Preprocessing


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
