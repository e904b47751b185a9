"""The generator losses of the data-free methods (DAFL Eq. 4-7; dual-GAN supplementary Eq. 1-3).

Each takes what the fixed teachers (the "discriminator") return on a batch of generated images:
the logits of every selected output side by side (the columns of ``tasks``, as in
:func:`kamal_engine.training.task_losses`) and the features before each teacher's classifier.

* :func:`one_hot_loss` (DAFL Eq. 4): cross entropy against the teacher's own arg-max, per
  multi-class task. For a multi-label task (the supplementary gives no formula for it) the pseudo
  label of each output is "present" when its probability is above 0.5 and the loss is the binary
  cross entropy against it — the multi-label counterpart of an arg-max.
* :func:`activation_loss` (DAFL Eq. 5; supplementary Eq. 2): minus the mean absolute activation of
  the features before the classifier, averaged over teachers. The paper writes a sum of L1 norms
  divided by the number of images; we divide by the feature size too, so that α does not depend on
  the teacher's width (the DAFL reference code does the same with ``.abs().mean()``).
* :func:`information_entropy_loss` (DAFL Eq. 6; supplementary Eq. 3): for a multi-class task
  ``-H_info(mean_i p_i)`` with ``H_info(p) = -1/k Σ p log p``; for multi-label outputs
  ``1/C Σ_c [m_c log m_c + (1 - m_c) log(1 - m_c)]`` with ``m_c`` the mean probability of output c
  over the batch. Both are minimal when the batch covers the classes evenly.
* :func:`discrete_loss` (dual-GAN Eq. 8): ``L_dis = -1/C Σ_i |y_i|``, "the L1-norm loss" that the
  paper says makes the outputs "sparse" / "discrete". What ``y`` is, is ambiguous: the main text
  calls it the "raw output" of the discriminator, the supplementary a value in [0, 1]; and
  minimising ``-|y|`` of a probability makes every label present, not sparse. Three readings:

  - ``"decision"`` (the default): ``y = 2p - 1``, the output re-centred on the undecided 0.5, in
    [-1, 1]. The printed sign, the L1 norm and the name "discrete" then agree: each output is pushed
    to a clear yes or no, the loss is bounded, and how often a label is present is left to
    ``L_ie``. This is the reading that works (see below).
  - ``"probabilities"``: ``y = p`` as printed. It is linear in the batch's mean prediction ``m_c``,
    so against ``β L_ie`` it settles where ``β log(m / (1 - m)) = γ``: with the paper's β = 1, γ = 5
    every label is present in 99.3 % of the generated images.
  - ``"logits"``: ``y = z``. Unbounded: on the demo it outweighed every other term (L_dis ≈ -35 per
    output after 400 steps) and the generator collapsed to images on which every prediction is
    saturated and constant (L_ie ≈ 0, i.e. no diversity), from which the student learned nothing
    (mAP 0.23, chance level). Kept for comparison.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..selection import Task
from ..training import task_probabilities

EPS = 1e-6  # 1 - EPS must stay below 1 in float32, or (1 - m) log(1 - m) is 0 · -inf


def _columns(logits: torch.Tensor, tasks: Sequence[Task]):
    col = 0
    for task in tasks:
        width = len(task.outputs)
        yield task, logits[:, col:col + width].float()
        col += width


def one_hot_loss(logits: torch.Tensor, tasks: Sequence[Task]) -> torch.Tensor:
    """DAFL Eq. 4: the teachers' outputs pushed towards their own (one-hot) decisions."""
    terms = []
    for task, z in _columns(logits, tasks):
        if task.kind == "multilabel":
            terms.append(F.binary_cross_entropy_with_logits(z, (z.detach() > 0).float()))
        else:
            terms.append(F.cross_entropy(z, z.detach().argmax(1)))
    return torch.stack(terms).mean()


def activation_loss(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """DAFL Eq. 5: ``-mean |F|`` of the features before each teacher's classifier, averaged over teachers."""
    return -torch.stack([f.float().abs().mean() for f in features]).mean()


def information_entropy_loss(logits: torch.Tensor, tasks: Sequence[Task]) -> torch.Tensor:
    """DAFL Eq. 6 (multi-class) and supplementary Eq. 3 (multi-label): minus the entropy of the batch's
    mean prediction, so minimising it balances the classes of the generated images."""
    terms = []
    for task, z in _columns(logits, tasks):
        if task.kind == "multilabel":
            m = torch.sigmoid(z).mean(0).clamp(EPS, 1 - EPS)
            terms.append((m * m.log() + (1 - m) * (1 - m).log()).mean())
        else:
            p = F.softmax(z, 1).mean(0).clamp_min(1e-12)  # only log 0 to avoid; no 1 - p here
            terms.append((p * p.log()).sum() / p.numel())  # -H_info(p), H_info(p) = -1/k Σ p log p
    return torch.stack(terms).mean()


def discrete_loss(logits: torch.Tensor, tasks: Sequence[Task], on: str = "decision") -> torch.Tensor:
    """Dual-GAN Eq. 8: ``-1/C Σ_i |y_i|`` averaged over the batch, with ``y = 2p - 1`` (``"decision"``),
    ``y = p`` (``"probabilities"``) or ``y = z`` (``"logits"``); see the module docstring."""
    if on == "logits":
        return -logits.float().abs().mean()
    if on not in ("decision", "probabilities"):
        raise ValueError(f"L_dis reads the outputs as 'decision', 'probabilities' or 'logits', not {on!r}")
    p = task_probabilities(logits, tasks)
    return -(2 * p - 1).abs().mean() if on == "decision" else -p.mean()
