"""Model size and cost: parameter and FLOP counts."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .backbones.blocks import eval_mode


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_flops(module: nn.Module, input_size: Sequence[int], in_channels: int = 3) -> int:
    """FLOPs of one forward pass on one image (a multiply-add counts as 2), as counted by
    :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products)."""
    with eval_mode(module):
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        counter = FlopCounterMode(display=False)
        with counter:
            module(torch.zeros(1, in_channels, *input_size, device=device))
        return int(counter.get_total_flops())
