"""The supported architectures: how to build each, split it into blocks, and find its classifier."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torchvision.models as tvm
from torch import nn

from ..errors import KamalError
from . import small_nets, torchvision_nets
from .blocks import GRANULARITIES, BlockNet, Unit


@dataclass(frozen=True)
class Architecture:
    """How the engine builds, splits and recognises one architecture."""

    name: str
    family: str
    build: Callable[..., nn.Module]  # build(num_outputs, **kwargs) -> model
    units: Callable[[nn.Module], tuple[list[Unit], nn.Module]]
    classifier_key: str  # state-dict key of the last layer's weight: its first dim is the output count
    default_input_size: int = 224


def _torchvision(builder: Callable[..., nn.Module], num_outputs: int, **kwargs) -> nn.Module:
    return builder(weights=None, num_classes=num_outputs, **kwargs)


def _spec(name, family, builder, units, classifier_key, size=224):
    return Architecture(name, family, partial(_torchvision, builder), units, classifier_key, size)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        *(_spec(f"resnet{d}", "resnet", getattr(tvm, f"resnet{d}"), torchvision_nets.resnet_units, "fc.weight")
          for d in (18, 34, 50, 101, 152)),
        *(_spec(f"densenet{d}", "densenet", getattr(tvm, f"densenet{d}"), torchvision_nets.densenet_units,
                "classifier.weight") for d in (121, 161, 169, 201)),
        _spec("mobilenet_v2", "mobilenet", tvm.mobilenet_v2, torchvision_nets.mobilenet_units, "classifier.1.weight"),
        _spec("mobilenet_v3_small", "mobilenet", tvm.mobilenet_v3_small, torchvision_nets.mobilenet_units,
              "classifier.3.weight"),
        _spec("mobilenet_v3_large", "mobilenet", tvm.mobilenet_v3_large, torchvision_nets.mobilenet_units,
              "classifier.3.weight"),
        *(_spec(f"vgg{d}{bn}", "vgg", getattr(tvm, f"vgg{d}{bn}"), torchvision_nets.vgg_units, "classifier.6.weight")
          for d in (11, 13, 16, 19) for bn in ("", "_bn")),
        Architecture("smallnet", "small", small_nets.SmallNet, small_nets.smallnet_units, "fc.weight", 56),
        Architecture("lenet5", "small", small_nets.LeNet5, small_nets.lenet5_units, "fc.2.weight", 32),
    ]
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KamalError(
            f"unknown architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def build_model(arch: str, num_outputs: int, **kwargs) -> nn.Module:
    """A freshly initialised model of ``arch`` with ``num_outputs`` outputs."""
    spec = get_architecture(arch)
    try:
        return spec.build(num_outputs, **kwargs)
    except TypeError as exc:
        raise KamalError(f"bad constructor arguments {kwargs} for architecture {arch!r}: {exc}") from None


def split_model(model: nn.Module, arch: str, granularity: str = "stage") -> BlockNet:
    """``model`` as blocks + head, sharing its modules (see :class:`BlockNet`)."""
    if granularity not in GRANULARITIES:
        raise KamalError(f"unknown block granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    units, head = get_architecture(arch).units(model)
    return BlockNet.from_units(units, head, granularity)
