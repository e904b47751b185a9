"""Recognise the architecture of a bare ``state_dict`` from its keys and tensor shapes."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..errors import CheckpointError
from .registry import ARCHITECTURES

_RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_DENSENETS = {(6, 12, 24, 16): "densenet121", (6, 12, 36, 24): "densenet161",
              (6, 12, 32, 32): "densenet169", (6, 12, 48, 32): "densenet201"}
_VGGS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}
# densenet checkpoints from before torchvision 0.3 name 'norm1' as 'norm.1' (torchvision remaps them too)
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def normalize_state_dict_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` prefix (DataParallel) and rename old-style densenet keys."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        match = _OLD_DENSENET_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def _count(keys, pattern: str, groups: int) -> tuple[int, ...]:
    """For ``pattern`` with two numeric groups (group, index): the number of indices per group."""
    found: dict[int, set[int]] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(found.get(g, ())) for g in range(1, groups + 1))


def detect_architecture(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """``(arch, constructor kwargs)`` for a state dict with normalised keys, or a clear error."""
    keys = set(state_dict)
    if {"stem.0.weight", "stages.0.0.conv1.weight", "fc.weight"} <= keys:
        n_stages = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("stages."))
        depth = tuple(len({k.split(".")[2] for k in keys if k.startswith(f"stages.{s}.")}) for s in range(n_stages))
        kwargs = {"width": int(state_dict["stem.0.weight"].shape[0]), "depth": list(depth)}
        if state_dict["stem.0.weight"].shape[1] != 3:
            kwargs["in_channels"] = int(state_dict["stem.0.weight"].shape[1])
        return "smallnet", kwargs
    if {"conv1.0.weight", "conv3.0.weight", "fc.2.weight"} <= keys:
        kwargs = {"width": float(state_dict["conv1.0.weight"].shape[0]) / 6}
        if state_dict["conv1.0.weight"].shape[1] != 3:
            kwargs["in_channels"] = int(state_dict["conv1.0.weight"].shape[1])
        return "lenet5", kwargs
    if {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= keys:
        depths = _count(keys, r"^layer(\d)\.(\d+)\.conv1\.weight$", 4)
        arch = _RESNETS.get((depths, "layer1.0.conv3.weight" in keys))
        if arch:
            return arch, {}
    if "features.denseblock1.denselayer1.norm1.weight" in keys:
        arch = _DENSENETS.get(_count(keys, r"^features\.denseblock(\d)\.denselayer(\d+)\.norm1\.weight$", 4))
        if arch:
            return arch, {}
    if "features.0.0.weight" in keys and "classifier.3.weight" in keys:
        last = max(int(k.split(".")[1]) for k in keys if k.startswith("features."))
        arch = {12: "mobilenet_v3_small", 16: "mobilenet_v3_large"}.get(last)
        if arch:
            return arch, {}
    if "features.0.0.weight" in keys and "classifier.1.weight" in keys and "features.18.0.weight" in keys:
        return "mobilenet_v2", {}
    if "features.0.weight" in keys and "classifier.6.weight" in keys:
        convs = sum(1 for k, v in state_dict.items() if re.match(r"^features\.\d+\.weight$", k) and v.dim() == 4)
        bn = any(re.match(r"^features\.\d+\.running_mean$", k) for k in keys)
        if convs in _VGGS:
            return _VGGS[convs] + ("_bn" if bn else ""), {}
    sample = ", ".join(sorted(keys)[:4])
    raise CheckpointError(
        f"the architecture could not be recognised from the weights (keys such as {sample}); "
        f"name it explicitly (--arch / 'arch' in the recipe), one of: {', '.join(sorted(ARCHITECTURES))}"
    )
