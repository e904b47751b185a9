"""Block splits of the torchvision classifiers a user is likely to have checkpoints of.

Each ``*_units`` function returns the model's units (see :mod:`.blocks`) and its head. Stage
boundaries follow the architecture's own grouping: resnet ``layer1..4``; densenet's dense blocks
(each transition layer opens the next stage, where the resolution halves, as resnet's first unit
of a stage does); VGG's five conv groups (each closed by its max-pool); for the mobilenets the
output stride (stage 1 up to stride 4, then 8, 16, 32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import Unit, sequence


def resnet_units(model: nn.Module) -> tuple[list[Unit], nn.Module]:
    stem = [model.conv1, model.bn1, model.relu, model.maxpool]
    units = []
    for s, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), 1):
        for i, block in enumerate(layer, 1):
            units.append(Unit(f"b{s}_{i}", s, sequence(stem + [block] if (s, i) == (1, 1) else [block])))
    return units, nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)


class DenseUnit(nn.Module):
    """One dense layer as a unit: ``x -> cat(x, layer(x))``.

    torchvision's ``_DenseBlock`` keeps a list of features and each layer concatenates them; the
    running concatenation is the same tensor, so a chain of ``DenseUnit`` equals the dense block.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layer(x)], 1)


def densenet_units(model: nn.Module) -> tuple[list[Unit], nn.Module]:
    f = model.features
    stem = [f.conv0, f.norm0, f.relu0, f.pool0]
    dense_blocks = [f.denseblock1, f.denseblock2, f.denseblock3, f.denseblock4]
    transitions = [f.transition1, f.transition2, f.transition3]
    units = []
    for s, block in enumerate(dense_blocks, 1):
        layers = list(block.children())
        for i, layer in enumerate(layers, 1):
            mods: list[nn.Module] = []
            if i == 1:
                mods += stem if s == 1 else [transitions[s - 2]]
            mods.append(DenseUnit(layer))
            if s == 4 and i == len(layers):
                mods += [f.norm5, nn.ReLU()]  # DenseNet.forward applies relu after features
            units.append(Unit(f"b{s}_{i}", s, sequence(mods)))
    return units, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)


def _stride(module: nn.Module) -> int:
    """Spatial stride of a mobilenet feature module (its convs lie on one path, so strides multiply)."""
    return math.prod(c.stride[0] for c in module.modules() if isinstance(c, nn.Conv2d))


def mobilenet_units(model: nn.Module) -> tuple[list[Unit], nn.Module]:
    features = list(model.features)
    # stem conv folded into the first inverted residual, the final 1x1 conv into the last one
    groups = [features[:2]] + [[m] for m in features[2:-2]] + [features[-2:]]
    units, stride, counts = [], 1, {}
    for mods in groups:
        stride *= math.prod(_stride(m) for m in mods)
        stage = min(4, max(1, int(round(math.log2(stride))) - 1))
        counts[stage] = counts.get(stage, 0) + 1
        units.append(Unit(f"b{stage}_{counts[stage]}", stage, sequence(mods)))
    pool = getattr(model, "avgpool", None) or nn.AdaptiveAvgPool2d(1)  # v2 pools in forward()
    return units, nn.Sequential(pool, nn.Flatten(1), model.classifier)


def vgg_units(model: nn.Module) -> tuple[list[Unit], nn.Module]:
    units: list[Unit] = []
    stage, current = 1, []
    for module in model.features:
        if isinstance(module, nn.MaxPool2d):
            last = units.pop()
            units.append(Unit(last.name, last.stage, sequence([last.module, module])))
            stage += 1
            continue
        current.append(module)
        if isinstance(module, nn.ReLU):
            index = sum(u.stage == stage for u in units) + 1
            units.append(Unit(f"b{stage}_{index}", stage, sequence(current)))
            current = []
    return units, nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
