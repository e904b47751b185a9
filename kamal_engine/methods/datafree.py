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

The ingredients beyond the papers, each an option of ``dafl`` and ``dual-gan`` (README, "Methods"):

* :func:`rate_balance_loss` (``balance = "rate"``): for multi-label outputs the entropy term of Eq. 6
  is maximal when every label is present in half the images *on average over the batch*, which a
  generator meets by one image type per label, and it says nothing about a label the teachers
  never call present at all beyond a log. The rate form pulls the batch's rate ``m_c`` of each label
  towards a target rate ``r`` with ``KL(Bern(r) || Bern(m_c))``, which grows without bound as a label
  disappears (``m_c → 0``). Multi-class tasks keep Eq. 6 (its softmax entropy already is the
  balance a class-coverage target would ask for).
* :class:`BatchNormPrior` (DeepInversion, Yin et al., CVPR 2020, Eq. 4 of that paper):
  ``Σ_l ||μ_l(x) - μ_l||₂ + ||σ²_l(x) - σ²_l||₂`` over each teacher's batch-norm layers, the batch
  statistics of the generated images against the layer's running statistics; the teachers stay in
  eval mode (the running statistics are read, never updated). We average over layers and over
  teachers, so the weight does not depend on the depth or the number of teachers; a teacher with no
  batch norm (LeNet-5) is skipped and listed.
* :func:`augment` and :class:`ReplayPool` (as Fast-Datafree and CMI do): the student learns on the
  fresh batch and on as many images replayed from a bounded pool of past batches, each randomly
  shifted and flipped; the teachers' targets are computed on the augmented images.
* :func:`disagreement` (the adversarial term of DFAD/CMI): the mean absolute difference of the
  student's and the teachers' probabilities, which the generator *maximises* (weight ``adversarial``)
  after a warm-up, so it seeks the images the student still gets wrong.
* :class:`LabelCoverage` and :func:`diversity` measure what the generator makes (report
  ``coverage``): per label, the share of generated images the teachers call present, and how far
  apart two generated images are.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import SINGLE, World
from ..selection import Task
from ..training import task_probabilities
from . import Param

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


def rate_balance_loss(logits: torch.Tensor, tasks: Sequence[Task], target_rate: float = 0.5,
                      multiclass: str = "entropy") -> torch.Tensor:
    """``balance = "rate"``: per multi-label output ``KL(Bern(r) || Bern(m_c))``, ``m_c`` the batch's mean
    probability and ``r = target_rate``, so each label is present in a share r of the generated images.
    A multi-class task keeps Eq. 6 (``multiclass = "entropy"``) or, with ``"rate"``, gets
    ``KL(uniform || m)`` of its batch-mean softmax m (every class equally often; grows without bound
    as a class vanishes). Zero when every rate is on target."""
    r = min(max(float(target_rate), EPS), 1 - EPS)
    terms = []
    for task, z in _columns(logits, tasks):
        if task.kind == "multilabel":
            m = torch.sigmoid(z).mean(0).clamp(EPS, 1 - EPS)
            kl = r * (torch.log(torch.tensor(r)) - m.log()) + (1 - r) * (torch.log(torch.tensor(1 - r)) - (1 - m).log())
            terms.append(kl.mean())
        elif multiclass == "rate":
            m = F.softmax(z, 1).mean(0).clamp_min(1e-12)
            terms.append(-math.log(m.numel()) - m.log().mean())  # KL(uniform || m)
        else:
            terms.append(information_entropy_loss(z, [task]))
    return torch.stack(terms).mean()


BALANCE_FORMS = ("entropy", "rate", "rate-all")


def balance_loss(logits: torch.Tensor, tasks: Sequence[Task], form: str = "entropy",
                 target_rate: float = 0.5) -> torch.Tensor:
    """The β term: the papers' information entropy (Eq. 6, ``"entropy"``), the per-label rate with
    Eq. 6 for multi-class tasks (``"rate"``), or the rate for both (``"rate-all"``)."""
    if form == "entropy":
        return information_entropy_loss(logits, tasks)
    if form in ("rate", "rate-all"):
        return rate_balance_loss(logits, tasks, target_rate, "rate" if form == "rate-all" else "entropy")
    raise ValueError(f"the balance term is one of {', '.join(BALANCE_FORMS)}, not {form!r}")


class BatchNormPrior:
    """DeepInversion's feature-statistics prior on the teachers' batch-norm layers (see the module docstring).

    Forward hooks read the input of every ``BatchNorm1d/2d`` of each teacher while :meth:`recording`;
    :meth:`value` is the mean over teachers of the mean over their layers of
    ``||μ(x) - running_mean||₂ + ||σ²(x) - running_var||₂`` (biased batch variance, as batch norm's own).
    Teachers without batch norm are listed in ``skipped``.
    """

    def __init__(self, teachers: Sequence[tuple[str, nn.Module]]):
        self.layers: dict[str, list[nn.Module]] = {}
        self.skipped: list[str] = []
        self.handles = []
        self.distances: dict[str, list[torch.Tensor]] = {}
        self.active = False
        for name, model in teachers:
            layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
                      and m.track_running_stats and m.running_mean is not None]
            if not layers:
                self.skipped.append(name)
                continue
            self.layers[name] = layers
            for layer in layers:
                self.handles.append(layer.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if not self.active:
                return
            x = inputs[0].float()
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            distance = (torch.linalg.vector_norm(mean - module.running_mean)
                        + torch.linalg.vector_norm(var - module.running_var))
            self.distances.setdefault(name, []).append(distance)
        return hook

    @contextmanager
    def recording(self):
        """Record the statistics of the forward passes inside the block (earlier records are dropped)."""
        self.distances, self.active = {}, True
        try:
            yield self
        finally:
            self.active = False

    def value(self) -> torch.Tensor:
        """The prior of the last :meth:`recording` (0 when no teacher has batch norm)."""
        per_teacher = [torch.stack(d).mean() for d in self.distances.values() if d]
        return torch.stack(per_teacher).mean() if per_teacher else torch.zeros(())

    def describe(self) -> dict:
        return {"teachers": {name: len(layers) for name, layers in self.layers.items()},
                "skipped": list(self.skipped),
                "note": ("teachers without batch norm have no running statistics to match: "
                         + ", ".join(self.skipped)) if self.skipped else ""}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def augment(x: torch.Tensor, draw: torch.Generator, shift: float = 0.125, flip: bool = True) -> torch.Tensor:
    """Each image randomly shifted by up to ``shift`` of its size (reflected at the border) and, with
    ``flip``, mirrored left-right with probability 1/2 — the random crop and flip of Fast-Datafree/CMI."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3)
    sign = torch.where(torch.rand(n, generator=draw) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta[:, 0, 0], theta[:, 1, 1] = sign, 1.0
    theta[:, :, 2] = (torch.rand(n, 2, generator=draw) * 2 - 1) * 2 * shift  # grid units: the image is 2 wide
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class ReplayPool:
    """A bounded pool of past generated images (oldest dropped first); :meth:`sample` draws from it."""

    def __init__(self, capacity: int, device: torch.device | None = None):
        self.capacity, self.device = int(capacity), device
        self.images: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    def add(self, x: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        x = x.detach()
        self.images = x if self.images is None else torch.cat([self.images, x])
        self.images = self.images[-self.capacity:]

    def sample(self, count: int, draw: torch.Generator) -> torch.Tensor | None:
        if not len(self):
            return None
        idx = torch.randint(len(self), (count,), generator=draw)
        return self.images[idx.to(self.images.device)]

    def state_dict(self) -> dict:
        return {"images": None if self.images is None else self.images.cpu()}

    def load_state_dict(self, state: dict) -> None:
        images = state.get("images")
        self.images = None if images is None else images.to(self.device or images.device)


def disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tasks: Sequence[Task]) -> torch.Tensor:
    """Mean ``|p_student - p_teacher|`` over outputs and images: what the adversarial term maximises."""
    return (task_probabilities(student_logits, tasks) - task_probabilities(teacher_logits, tasks)).abs().mean()


def presence(logits: torch.Tensor, tasks: Sequence[Task]) -> torch.Tensor:
    """Per output, 1 where the teachers call the label present: sigmoid above 0.5 (multi-label) or the
    task's arg-max (multi-class)."""
    cols = []
    for task, z in _columns(logits, tasks):
        if task.kind == "multilabel":
            cols.append((z > 0).float())
        else:
            cols.append(F.one_hot(z.argmax(1), z.shape[1]).float())
    return torch.cat(cols, 1)


class LabelCoverage:
    """How often the teachers call each label present on generated images, and their diversity. The
    counts stay where the images are (no wait for a GPU per step) until :meth:`summary`, which in a
    distributed run adds up every rank's images (each rank generates its own)."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.reset()

    def reset(self) -> None:
        self.present: torch.Tensor | float = 0.0  # per label, a tensor once a batch was added
        self.spread: torch.Tensor | float = 0.0
        self.images, self.batches = 0, 0

    def add(self, x: torch.Tensor, logits: torch.Tensor, tasks: Sequence[Task]) -> None:
        self.present = self.present + presence(logits.detach(), tasks).float().sum(0)
        self.images += len(x)
        if len(x) >= 2:
            self.spread = self.spread + pixel_distance(x.detach())
        self.batches += 1

    def totals(self, world: World = SINGLE) -> tuple[list[float], int, float, int]:
        """Label counts, images, summed diversity and batches, over every rank of ``world``."""
        local = torch.zeros(len(self.labels) + 3, dtype=torch.float64)
        if isinstance(self.present, torch.Tensor):
            local[:len(self.labels)] = self.present.detach().double().cpu()
        local[-3:] = torch.tensor([self.images, float(self.spread), self.batches], dtype=torch.float64)
        summed = world.sum(local).tolist()
        return summed[:len(self.labels)], int(summed[-3]), summed[-2], int(summed[-1])

    def rates(self, world: World = SINGLE) -> dict[str, float]:
        return self.summary(0, world)["rates"]

    def summary(self, epoch: int, world: World = SINGLE) -> dict:
        present, images, spread, batches = self.totals(world)
        return {"epoch": epoch, "images": images,
                "rates": {label: v / max(1, images) for label, v in zip(self.labels, present)},
                "diversity": spread / max(1, batches)}


def diversity(x: torch.Tensor) -> float:
    """The RMS pixel distance between each generated image and the next one of the batch (√2 for
    independent unit-variance noise, 0 for a batch of one image repeated)."""
    if len(x) < 2:
        return 0.0
    return float(pixel_distance(x))


def pixel_distance(x: torch.Tensor) -> torch.Tensor:
    """:func:`diversity` as a 0-d tensor on ``x``'s device (``x``: at least 2 images)."""
    return ((x - x.roll(1, 0)).float() ** 2).mean().sqrt()


PAPER_FORM = {"balance": "entropy", "bn_prior": 0.0, "augment": False, "replay": 0, "adversarial": 0.0}


INGREDIENTS = (*PAPER_FORM, "target_rate", "adversarial_warmup")  # the options a report lists


def recording(prior: "BatchNormPrior | None"):
    """``prior.recording()``, or nothing to record when the prior is off."""
    return nullcontext() if prior is None else prior.recording()


def effective_params(params: dict) -> dict:
    """The parameters as the run uses them: with ``paper_faithful`` the ingredients beyond the paper off."""
    return {**params, **PAPER_FORM} if params.get("paper_faithful") else dict(params)


def student_batch(x: torch.Tensor, pool: ReplayPool, p: dict, draw: torch.Generator) -> tuple[torch.Tensor, bool]:
    """The student's images: the fresh batch, as many replayed from the pool (``replay``), each
    augmented (``augment``); the flag says whether they differ from the generated batch."""
    changed = False
    if p["replay"] > 0:
        old = pool.sample(len(x), draw)
        pool.add(x)
        if old is not None:
            x, changed = torch.cat([x, old]), True
    if p["augment"]:
        x, changed = augment(x, draw), True
    return x, changed


DEFAULTS = {"balance": "rate", "target_rate": 0.5, "bn_prior": 1.0, "augment": False, "replay": 0,
            "adversarial": 0.0}  # measured on the demo (README "Measured", data-free ablation)


def datafree_params(warmup: int = 2, warmup_help: str = "epochs before the adversarial term starts"
                    ) -> tuple[Param, ...]:
    """The options of ``dafl`` and ``dual-gan`` beyond the papers (module docstring); ``DEFAULTS`` are
    on where the demo's ablation showed they help."""
    d = DEFAULTS
    return (
        Param("balance", d["balance"], "the β term: 'rate' (each multi-label output's share of present images "
              "pulled towards target_rate; Eq. 6 for multi-class tasks), 'rate-all' (multi-class tasks too: "
              "every class equally often) or 'entropy' (the papers' information entropy, Eq. 6)",
              choices=BALANCE_FORMS),
        Param("target_rate", d["target_rate"], "balance = 'rate': the share of generated images in which each "
              "label should be present", minimum=0.0, maximum=1.0),
        Param("bn_prior", d["bn_prior"], "weight of the batch-norm statistics prior (DeepInversion) in the "
              "generator's loss (0: off); teachers without batch norm are skipped", minimum=0.0),
        Param("augment", d["augment"], "train the student on randomly shifted and mirrored generated images"),
        Param("replay", d["replay"], "generated images kept in a pool of past batches and replayed to the student, "
              "as many as the fresh batch per step (0: no pool)", minimum=0),
        Param("adversarial", d["adversarial"], "weight of the adversarial term: the generator seeks images on which "
              "the student disagrees with the teachers (0: off)", minimum=0.0),
        Param("adversarial_warmup", warmup, warmup_help, minimum=0),
        Param("paper_faithful", False, "true: the paper's method, every option above off"),
    )
