"""Networks seen as blocks: ``[B_1 ... B_n]`` followed by a head (``docs/architecture.md``, "Blocks").

Filtered-KA (Eq. 3) writes a teacher as a stack of blocks ``A^1 ... A^B`` plus the fully connected
layers ``F``; every method of the engine works on that view. A :class:`BlockNet` is built *around*
an existing model: its blocks hold references to the model's own modules, so the split shares the
parameters and buffers with the original (nothing is copied) and running the blocks and then the
head gives exactly the original output.

Two granularities:

* ``unit``: every residual / dense / inverted-residual unit (or conv layer for VGG and the small
  nets), named ``b<stage>_<index>`` like the paper's ``b3_6``; the stem is folded into the first
  unit and any final layers before pooling into the last one;
* ``stage``: the units of a stage run as one block, named ``b<stage>`` (e.g. resnet layer1..4).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

GRANULARITIES = ("stage", "unit")


@dataclass
class Unit:
    """The smallest block the engine splits a network into."""

    name: str
    stage: int
    module: nn.Module


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode, then give every submodule back its own training flag.

    (``module.train(was_training)`` would not do: a split shares modules whose flags may differ
    from the wrapper's, and a frozen teacher must stay in eval mode.)
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def sequence(modules: Sequence[nn.Module]) -> nn.Module:
    """One module that runs ``modules`` in order (the module itself when there is only one)."""
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


class BlockNet(nn.Module):
    """A classifier as blocks ``B_1 .. B_n`` and a head (pooling + classifier)."""

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]], head: nn.Module, granularity: str):
        super().__init__()
        self.block_names = [name for name, _ in blocks]
        self.blocks = nn.ModuleList([module for _, module in blocks])
        self.head = head
        self.granularity = granularity

    @classmethod
    def from_units(cls, units: Sequence[Unit], head: nn.Module, granularity: str) -> "BlockNet":
        if granularity == "unit":
            return cls([(u.name, u.module) for u in units], head, granularity)
        if granularity == "stage":
            stages: dict[int, list[nn.Module]] = {}
            for unit in units:
                stages.setdefault(unit.stage, []).append(unit.module)
            return cls([(f"b{s}", sequence(mods)) for s, mods in sorted(stages.items())], head, granularity)
        raise ValueError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every block, ``[F^1 .. F^B]``."""
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward_from(self, k: int, feature: torch.Tensor) -> torch.Tensor:
        """Continue from ``feature`` standing for the output of block ``k`` (1-based) to the logits.

        This is the teacher side of Eq. 6 in filtered-KA: ``F^{k+1*} .. F^{B*}`` and the head, fed
        with a feature that replaces the teacher's own ``F^k``. ``k = 0`` runs the whole network.
        """
        for block in self.blocks[k:]:
            feature = block(feature)
        return self.head(feature)

    @torch.no_grad()
    def output_shapes(self, input_size: Sequence[int], in_channels: int = 3) -> list[tuple[int, ...]]:
        """``(C, H, W)`` of every block's output for an input of ``input_size = (H, W)``."""
        with eval_mode(self):
            param = next(self.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            x = torch.zeros(1, in_channels, *input_size, device=device)
            return [tuple(f.shape[1:]) for f in self.features(x)]
