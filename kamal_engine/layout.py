"""The networks' tensor layout during training: ``[run] memory_format`` (``contiguous`` by default).

``channels_last`` stores convolution weights and activations as N, H, W, C. Whether it is faster
depends on the network, the image size and the device (measured on 2 CPU cores: the demo's smallnet
at 56 px trains 1.46x faster in it, a ResNet-18 at 64 px 0.89x as fast), so ``auto`` measures each
network once, on a copy and a batch of the run's size, in the way the run uses it (the student: a
forward and a backward pass in train mode; a teacher: in eval mode, the gradient reaching its input),
and takes ``channels_last`` only where it is at least ``MARGIN`` faster. The choice is kept in the
run's checkpoint, so a resumed run (and ``kamal replan``) uses the same layout. The numbers differ
from the other layout's only by float rounding; the student file is written in the default layout.
Not the default: in the demo's amalgamation steps (the filters and the teachers' later blocks between
them) channels_last was no faster than contiguous on 2 CPU cores (``benchmarks/step_parts_demo.py``),
though the networks alone were; ``auto`` times the networks alone.
"""

from __future__ import annotations

import copy
import time
from typing import Sequence

import torch
from torch import nn

LAYOUTS = ("contiguous", "channels_last")
MARGIN = 0.15  # channels_last must be this much faster (timings vary by ±10 % run to run)
FORMAT = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def apply(model: nn.Module, layout: str) -> nn.Module:
    """``model`` in ``layout``, in place (a 4-d parameter or buffer is re-strided; nothing else changes)."""
    return model.to(memory_format=FORMAT[layout])


def _pass_seconds(model: nn.Module, x: torch.Tensor, teacher: bool, repeats: int) -> float:
    def once():
        inp = x.clone().requires_grad_(teacher)
        out = model(inp)
        out.float().sum().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    times = []
    for _ in range(1 + repeats):  # the first pass warms up (kernel choice, allocations)
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return min(times[1:]) if repeats else times[0]


def measure(model: nn.Module, batch: int, input_size: Sequence[int], device: torch.device, teacher: bool = False,
            repeats: int = 3) -> dict[str, float]:
    """Seconds of one pass of a copy of ``model`` in each layout (the fastest of ``repeats``; one when a pass
    takes over a second)."""
    x = torch.randn(batch, 3, *input_size, device=device)
    out = {}
    for layout in LAYOUTS:
        net = apply(copy.deepcopy(model), layout).to(device)
        net.eval() if teacher else net.train()
        for p in net.parameters():
            p.requires_grad_(not teacher)
        first = _pass_seconds(net, x, teacher, 0)
        out[layout] = first if first > 1.0 else _pass_seconds(net, x, teacher, repeats)
    return out


def choose(times: dict[str, float]) -> str:
    return "channels_last" if times["channels_last"] * (1 + MARGIN) <= times["contiguous"] else "contiguous"
