"""The engine's own small CNNs, fast enough for the demo and the tests on a laptop CPU.

* :class:`SmallNet`: a four-stage residual net (stride-2 stem, then one stage per resolution,
  channel width doubling per stage), ``width`` and units per stage configurable.
* :class:`LeNet5`: the classic LeNet-5 of the DAFL paper's MNIST experiments (``width=0.5`` is the
  paper's "LeNet-5-half" student).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import Unit, sequence


class ResidualUnit(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallNet(nn.Module):
    """Stem (3x3 conv, stride 2) + four residual stages (stride 1, 2, 2, 2) + pool + linear.

    Stage ``s`` has ``width * 2**s`` channels and ``depth[s]`` residual units.
    """

    def __init__(self, num_classes: int, width: int = 16, depth: Sequence[int] = (1, 1, 1, 1), in_channels: int = 3):
        super().__init__()
        self.width, self.depth = int(width), tuple(int(d) for d in depth)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, channels = [], width
        for s, n_units in enumerate(self.depth):
            out = width * 2**s
            units = [ResidualUnit(channels if i == 0 else out, out, (1 if s == 0 else 2) if i == 0 else 1) for i in range(n_units)]
            stages.append(nn.Sequential(*units))
            channels = out
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def smallnet_units(model: SmallNet) -> tuple[list[Unit], nn.Module]:
    units = []
    for s, stage in enumerate(model.stages, 1):
        for i, unit in enumerate(stage, 1):
            mods = [model.stem, unit] if (s, i) == (1, 1) else [unit]
            units.append(Unit(f"b{s}_{i}", s, sequence(mods)))
    return units, nn.Sequential(model.pool, nn.Flatten(1), model.fc)


class LeNet5(nn.Module):
    """LeNet-5 (conv 6 → conv 16 → conv 120 → fc 84 → fc classes) for 32x32 inputs.

    ``width`` scales every layer's channels (the DAFL paper's LeNet-5-half is ``width=0.5``). A
    global average pool before the classifier is an identity at 32x32 and lets larger inputs run.
    """

    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        self.width = float(width)
        c1, c2, c3, f1 = (max(1, round(c * width)) for c in (6, 16, 120, 84))
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(nn.Conv2d(c2, c3, 5), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c3, f1), nn.ReLU(), nn.Linear(f1, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def lenet5_units(model: LeNet5) -> tuple[list[Unit], nn.Module]:
    units = [Unit(f"b{s}_1", s, conv) for s, conv in enumerate((model.conv1, model.conv2, model.conv3), 1)]
    return units, nn.Sequential(model.pool, nn.Flatten(1), model.fc)
