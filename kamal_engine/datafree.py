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

A multi-class task's probabilities are the softmax over its selected classes (renormalised, as
everywhere in the engine). All three are averaged over tasks (over teachers for ``L_a``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .selection import Task

EPS = 1e-8


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
            p = F.softmax(z, 1).mean(0).clamp_min(EPS)
            terms.append((p * p.log()).sum() / p.numel())  # -H_info(p), H_info(p) = -1/k Σ p log p
    return torch.stack(terms).mean()
