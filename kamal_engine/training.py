"""Training machinery the methods share: images, soft targets, losses, schedule, the step loop.

The loop follows KamalEngine's shape (a step function returns a dict of losses; the loop does the
rest: progress events, ETA, metrics rows, cancellation between steps) without its flaws: the
device is an argument (no hard-coded ``.cuda()``), nothing lives in globals, and checkpoints hold
everything needed to resume.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import atomic_write
from .data import list_images, load_image
from .distributed import SINGLE, batch_count
from .errors import DataError, DivergedError, KamalError
from .events import CancelToken, Emit, StepLosses
from .selection import Task, TaskSelection

MAX_CACHED_BYTES = 4 * 1024**3


class UnlabeledImages:
    """The unlabeled training images, decoded once into memory as uint8 ``(N, 3, S, S)``.

    ``damaged`` lists the files that could not be read and were skipped (:meth:`from_folder`).
    """

    def __init__(self, images: torch.Tensor, paths: Sequence[Path] | None = None,
                 damaged: Sequence[tuple[Path, str]] = ()):
        self.images = images
        self.paths = list(paths or [])
        self.damaged = list(damaged)
        self.world = SINGLE  # a distributed run's: each rank gets its share of every epoch (:meth:`batches`)

    @classmethod
    def from_folder(cls, folder, size: Sequence[int], progress: Callable[[int, int], None] | None = None,
                    cancel: CancelToken | None = None, max_damaged: float = 0.01) -> "UnlabeledImages":
        """Decode every image under ``folder``; a damaged one is skipped (and listed in ``damaged``) unless
        more than ``max_damaged`` (a share, 0.01 = 1 %) of them are, which is a :class:`DataError`."""
        paths = list_images(folder)
        need = len(paths) * 3 * size[0] * size[1]
        if need > MAX_CACHED_BYTES:
            raise KamalError(f"{len(paths)} images at {size[0]}x{size[1]} need {need / 1024**3:.1f} GiB of memory, more "
                             f"than the {MAX_CACHED_BYTES / 1024**3:.0f} GiB this version holds; use a smaller image "
                             "size or fewer images", folder)
        images = torch.empty(len(paths), 3, *size, dtype=torch.uint8)
        kept: list[Path] = []
        damaged: list[tuple[Path, str]] = []
        for i, path in enumerate(paths):
            try:
                images[len(kept)] = load_image(path, size)
                kept.append(path)
            except DataError as exc:
                damaged.append((path, str(exc).removeprefix(f"{path}: ")))
                if len(damaged) > max_damaged * len(paths):
                    raise DataError(
                        f"{len(damaged)} of the {i + 1} images read so far cannot be read, more than the "
                        f"{max_damaged:.1%} a run skips ([data] max_damaged); the first: {damaged[0][0]} "
                        f"({damaged[0][1]}). Check the folder (a copy that did not finish?), or raise max_damaged",
                        folder) from None
            if progress and (i % 256 == 255 or i == len(paths) - 1):
                progress(i + 1, len(paths))
            if cancel is not None and i % 256 == 0:
                cancel.check()
        if not kept:
            raise DataError("holds no readable image", folder)
        return cls(images[:len(kept)].clone() if damaged else images, kept, damaged)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Index batches of one shuffled epoch (the last, smaller batch is dropped if it has < 2 images);
        in a distributed run this rank's part of each (:meth:`~kamal_engine.distributed.World.batches`)."""
        if self.world.distributed:
            yield from self.world.batches(len(self), batch_size, generator)
            return
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) >= 2:
                yield idx

    def steps_per_epoch(self, batch_size: int) -> int:
        """The number of batches :meth:`batches` gives an epoch (on every rank alike)."""
        if self.world.distributed:
            return self.world.steps_per_epoch(len(self), batch_size)
        return batch_count(len(self), batch_size)


@torch.no_grad()
def teacher_targets(selection: TaskSelection, images: torch.Tensor, device: torch.device,
                    batch_size: int = 128, cancel: CancelToken | None = None) -> list[torch.Tensor]:
    """Each teacher's probabilities on every image for its selected outputs: ``[(N, |outputs_n|)]``.

    The teachers see each image normalised their own way; their predictions on the real images are
    the soft targets of filtered-KA's Eq. 7 (and of plain KD). Multi-class probabilities are
    renormalised over the selected classes.
    """
    targets = []
    for n, teacher in enumerate(selection.teachers):
        tasks = selection.tasks_of(n)
        if not tasks:
            targets.append(torch.zeros(len(images), 0))
            continue
        outputs = [o for t in tasks for o in t.outputs]
        teacher.model.to(device).eval()
        chunks = []
        for start in range(0, len(images), batch_size):
            if cancel is not None:
                cancel.check()
            logits = teacher.model(teacher.preprocessing(images[start:start + batch_size].to(device))).float()
            chunks.append(logits[:, outputs].cpu())
        targets.append(task_probabilities(torch.cat(chunks), tasks))
    return targets


def task_probabilities(logits: torch.Tensor, tasks: Sequence[Task]) -> torch.Tensor:
    """Soft targets of the columns of ``tasks``: a sigmoid per multi-label output, a softmax within each
    multi-class task (renormalised over its selected classes)."""
    probs, col = [], 0
    for task in tasks:
        part = logits[:, col:col + len(task.outputs)].float()
        probs.append(torch.sigmoid(part) if task.kind == "multilabel" else torch.softmax(part, dim=1))
        col += len(task.outputs)
    return torch.cat(probs, 1)


def task_losses(logits: torch.Tensor, targets: torch.Tensor, tasks: Sequence[Task]) -> torch.Tensor:
    """Soft-target cross entropy per task (the ℓ of Eq. 2 and 7), averaged over the batch.

    ``logits`` and ``targets`` hold the columns of ``tasks`` side by side. Multi-label: binary cross
    entropy of each sigmoid output against the teacher's probability. Multi-class: cross entropy of
    the softmax over the selected classes against the teacher's renormalised distribution.
    """
    logits = logits.float()
    if all(task.kind == "multilabel" for task in tasks):  # one binary term per column: one call for all
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(0)
    out, col = [], 0
    for task in tasks:
        width = len(task.outputs)
        z, p = logits[:, col:col + width], targets[:, col:col + width]
        if task.kind == "multilabel":
            out.append(F.binary_cross_entropy_with_logits(z, p, reduction="none").mean(0))
        else:
            out.append(-(p * F.log_softmax(z, dim=1)).sum(1).mean().unsqueeze(0))
        col += width
    return torch.cat(out)


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """The papers' "poly" policy: lr = base · (1 − step/total)^power."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - min(step, total_steps) / max(1, total_steps)) ** power)


def autocast(device: torch.device, precision: str):
    """bf16 autocast where :func:`effective_precision` says so, plain fp32 otherwise."""
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def effective_precision(device: torch.device, precision: str) -> str:
    """``[run] precision`` on ``device``: ``auto`` and ``bf16`` are bf16 autocast on CUDA and on a CPU
    that computes bf16 natively (:func:`cpu_bf16`; the demo's steps 1.4 x faster on two AVX-512 BF16
    cores, the same mAP); ``fp32`` (and any other CPU) plain fp32."""
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return "fp32"
    return "bf16" if device.type == "cuda" or cpu_bf16() else "fp32"


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX, as oneDNN sees it); without, CPU
    autocast would emulate bf16 and be slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def set_mode(trainable: Sequence[nn.Module], frozen: Sequence[nn.Module]) -> None:
    """Trainable modules in train mode with gradients; frozen ones in eval mode without."""
    for module in frozen:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    for module in trainable:
        module.train()
        for p in module.parameters():
            p.requires_grad_(True)


class MetricsLog:
    """``metrics.csv``: one row per logged value: step, stage, block, epoch, teacher, task, name, value."""

    FIELDS = ["step", "stage", "block", "epoch", "teacher", "task", "name", "value"]

    def __init__(self, path: Path | None, keep_until_step: int | None = None):
        """A new log at ``path``; or, resuming, the rows up to ``keep_until_step`` kept and appended to;
        ``None``: rows are discarded (the ranks > 0 of a distributed run, which write nothing).

        A run appends rows as it goes; a killed run may leave a torn last row, which resuming drops:
        the kept rows are first rewritten atomically, so a kill at any moment loses no finished row.
        """
        self.path = path
        rows = []
        if path is None:
            self.file = open(os.devnull, "w", newline="")
        elif keep_until_step is not None and path.exists():  # resuming: drop what came after the checkpoint
            rows = [r for r in self.read(path) if int(r["step"]) <= keep_until_step]
            atomic_write(path, lambda tmp: self._write_all(tmp, rows))
            self.file = open(path, "a", newline="")
        else:
            self.file = open(path, "w", newline="")
            csv.DictWriter(self.file, fieldnames=self.FIELDS).writeheader()
        self.kept = rows  # the rows of the finished part of a resumed run (:meth:`history`)
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)

    @classmethod
    def read(cls, path: Path) -> list[dict[str, str]]:
        """The complete rows of ``path`` (a torn or garbled row, as a kill mid-write leaves, is skipped)."""
        rows = []
        with open(path, newline="", errors="replace") as f:
            for r in csv.DictReader(f):
                try:
                    int(r["step"]), float(r["value"])
                    int(r["epoch"])
                except (TypeError, ValueError, KeyError):
                    continue
                if r.get(None) is None and all(r.get(k) is not None for k in cls.FIELDS):
                    rows.append(r)
        return rows

    @classmethod
    def _write_all(cls, path: Path, rows: list[dict[str, str]]) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cls.FIELDS)
            writer.writeheader()
            writer.writerows({k: r[k] for k in cls.FIELDS} for r in rows)

    def history(self) -> list[StepLosses]:
        """The kept rows as one :class:`StepLosses` per step (for :class:`LossHistory`)."""
        steps: dict[int, StepLosses] = {}
        for r in self.kept:
            step = int(r["step"])
            if step not in steps:
                block = int(r["block"]) if r["block"] else None
                steps[step] = StepLosses(step, 0, r["stage"], block, int(r["epoch"]), {}, 0.0, 0.0)
            steps[step].losses[r["name"]] = float(r["value"])
        return [steps[k] for k in sorted(steps)]

    def write(self, step: int, stage: str, block, epoch: int, values: dict[str, float],
              teacher_of: Callable[[str], tuple[str, str]]) -> None:
        for key, value in values.items():
            teacher, task = teacher_of(key)
            self.writer.writerow({"step": step, "stage": stage, "block": "" if block is None else block,
                                  "epoch": epoch, "teacher": teacher, "task": task, "name": key, "value": f"{value:.6g}"})

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class LoopState:
    step: int = 0  # global step
    total_steps: int = 0
    images_seen: int = 0
    started: float = 0.0


def diverged(losses: dict[str, float], stage: str, block: int | None, step: int) -> DivergedError:
    """The error for a non-finite loss: which losses, in which stage, block and step."""
    bad = ", ".join(f"'{k}' is {v}" for k, v in losses.items() if not math.isfinite(v))
    where = f"stage '{stage}'" + (f", block {block}" if block is not None else "") + f", step {step}"
    return DivergedError(f"the training diverged in {where}: {bad}", stage, block, step)


def host_values(steps: Sequence[dict]) -> list[dict[str, float]]:
    """The logged values of ``steps`` as floats. Values a step left on the device (0-d tensors) come
    back in one transfer for all of them, so a GPU is not waited for at every step."""
    tensors = [v for losses in steps for v in losses.values() if isinstance(v, torch.Tensor)]
    flat = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).cpu().tolist() if tensors else [])
    return [{k: next(flat) if isinstance(v, torch.Tensor) else float(v) for k, v in losses.items()}
            for losses in steps]


class StepLoop:
    """Runs step functions, reporting losses, throughput and ETA, and honouring cancellation.

    A step function returns the values to log as floats or as 0-d tensors still on the device; the
    loop brings them to the host every ``sync_every`` steps (and at the end of each epoch) in one
    transfer (:func:`host_values`), then writes the metrics rows, emits the steps' events and checks
    them for NaN. On the CPU that is every step; on a GPU the default (16) leaves it running ahead."""

    def __init__(self, emit: Emit, cancel: CancelToken, metrics: MetricsLog, total_steps: int, start_step: int,
                 teacher_of: Callable[[str], tuple[str, str]], ranks: int = 1, sync_every: int = 1):
        self.emit, self.cancel, self.metrics = emit, cancel, metrics
        self.ranks = ranks  # a distributed run's processes: a step of this one sees 1/ranks of the images
        self.sync_every = max(1, sync_every)
        self.state = LoopState(step=start_step, total_steps=total_steps, started=time.monotonic())
        self.start_step = start_step
        self.teacher_of = teacher_of

    def run_epoch(self, batches: Iterator[torch.Tensor], step_fn: Callable[[torch.Tensor], dict[str, float]],
                  stage: str, block: int | None, epoch: int) -> dict[str, float]:
        """Call ``step_fn(batch_indices)`` for each batch; return the epoch's mean losses."""
        sums: dict[str, float] = {}
        count = 0
        pending: list[tuple[int, dict]] = []  # (images, logged values) of the steps not yet reported
        for idx in batches:
            self.cancel.check()
            pending.append((len(idx), step_fn(idx)))
            if len(pending) >= self.sync_every:
                count += self._report(pending, sums, stage, block, epoch)
                pending = []
        if pending:
            count += self._report(pending, sums, stage, block, epoch)
        self.metrics.flush()
        return {k: v / max(1, count) for k, v in sums.items()}

    def _report(self, pending: list[tuple[int, dict]], sums: dict[str, float], stage: str, block: int | None,
                epoch: int) -> int:
        """Metrics rows and events of the ``pending`` steps, their values added to ``sums``; a non-finite
        value stops the run with the step it came from."""
        for (n_images, _), losses in zip(pending, host_values([logged for _, logged in pending])):
            if not all(math.isfinite(v) for v in losses.values()):
                raise diverged(losses, stage, block, self.state.step + 1)
            s = self.state
            s.step += 1
            s.images_seen += n_images * self.ranks
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            self.metrics.write(s.step, stage, block, epoch, losses, self.teacher_of)
            elapsed = max(1e-9, time.monotonic() - s.started)
            eta = elapsed / max(1, s.step - self.start_step) * (s.total_steps - s.step)
            self.emit(StepLosses(s.step, s.total_steps, stage, block, epoch, losses, s.images_seen / elapsed, eta))
        return len(pending)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory and without waiting for
    the copy (the GPU's stream orders it before the kernels that read it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


AUGMENTATIONS = ("none", "shift", "shift+flip")


def consistent_views(images: torch.Tensor, generator: torch.Generator, augment: str, shift: int = 4) -> torch.Tensor:
    """One random view of each image, which the teachers and the student then both see ("consistent"
    distillation: the soft targets are the teachers' predictions on the very view the student gets).

    ``images``: uint8 ``(N, 3, H, W)``; returns floats in [0, 1]. ``"shift"``: a translation of up to
    ``shift`` pixels each way (borders repeat the edge); ``"shift+flip"`` adds a horizontal flip with
    probability 1/2. ``"none"``: the images themselves.
    """
    x = images.float() / 255.0
    if augment == "none":
        return x
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; use one of {', '.join(AUGMENTATIONS)}")
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).tolist()
    flips = torch.rand(n, generator=generator).tolist() if augment == "shift+flip" else [1.0] * n
    views = []
    for (dy, dx), flip, image in zip(offsets, flips, padded):
        view = image[:, dy:dy + h, dx:dx + w]
        views.append(view.flip(-1) if flip < 0.5 else view)
    return torch.stack(views)
