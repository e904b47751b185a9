"""The event stream every method reports through (``docs/architecture.md``, "Events").

Methods call ``emit(event)`` with the dataclasses below; the CLI prints them as a progress bar,
the app's worker forwards them as (throttled) Qt signals. Cancellation is a flag the training
loop checks between steps (:class:`CancelToken`); a cancelled run raises :class:`RunCancelled`
after its last finished block checkpoint is on disk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class RunStarted:
    name: str
    method: str
    device: str
    output_dir: str
    total_steps: int
    resumed_from: str | None = None
    moved_aside: str | None = None  # where the folder's earlier run went (restart / replace)


@dataclass
class StageStarted:
    stage: str  # "amalgamate" | "finetune" | "train" | "evaluate" | ...
    block: int | None = None  # 1-based block being trained, when block-wise
    block_name: str | None = None
    blocks: int | None = None
    epochs: int = 0
    steps: int = 0


STAGE_TITLES = {
    "load-images": "Loading the unlabeled images …",
    "teacher-targets": "Computing the teachers' predictions …",
    "evaluate-branch-points": "Evaluating every branch point on the validation set …",
    "finetune": "Fine-tuning the TargetNet",
    "train": "Training",
    "generator": "Training the generator against the teachers",
    "target": "Training the target net",
    "evaluate": "Evaluating the teachers and the student …",
    "export": "Exporting the student to ONNX and checking it with ONNX Runtime …",
}


def format_duration(seconds: float) -> str:
    """``4m02s`` or ``1h07m``: ETAs and run times as the CLI and the app show them."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def plural(n: int, noun: str) -> str:
    """``1 epoch``, ``3 epochs``: a count with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_started(event: RunStarted) -> str:
    """The run's first line (the CLI and the app print the same)."""
    text = f"Run '{event.name}': {event.method} on {event.device} → {event.output_dir}"
    if event.resumed_from:
        text += f", resuming from {event.resumed_from}"
    if event.moved_aside:
        text += f" (the earlier run there was moved to {event.moved_aside})"
    return text


def describe_stage(event: StageStarted) -> str:
    """A one-line, human description of a stage (the CLI and the app print the same)."""
    epochs = plural(event.epochs, "epoch")
    if event.block and event.stage == "component":
        return f"Component net {event.block}/{event.blocks} ({event.block_name}): {epochs}"
    if event.block:
        return f"Block {event.block}/{event.blocks} ({event.block_name}): {epochs}"
    title = STAGE_TITLES.get(event.stage, event.stage)
    return f"{title}: {epochs}" if event.epochs and not title.endswith("…") else title


@dataclass
class Progress:
    """Progress of work that is not a training step (loading images, teacher predictions)."""

    stage: str
    done: int
    total: int


@dataclass
class StepLosses:
    step: int  # global step over the whole run
    total_steps: int
    stage: str
    block: int | None
    epoch: int
    losses: dict[str, float]  # e.g. {"loss": .., "teacher:digits_0to4": .., "label:zero": ..}
    images_per_second: float
    eta_seconds: float


@dataclass
class LossHistory:
    """A resumed run's losses up to its checkpoint (from ``metrics.csv``), so plots show the whole run.

    ``steps`` are :class:`StepLosses` of the finished part (no throughput or ETA: they are not live)."""

    steps: list[StepLosses]


@dataclass
class BlockConverged:
    block: int
    block_name: str
    losses: dict[str, float]  # converged loss per task (label or multi-class task name)


@dataclass
class BlockDiagnosed:
    """How far each teacher's knowledge got through at a block (filtered-KA's diagnosis)."""

    block: int
    block_name: str
    teachers: dict[str, dict[str, Any]]  # teacher -> {filter, related_before, related_after, share, gap}


@dataclass
class RunWarning:
    """Something the user should know about the result, as a plain sentence."""

    message: str


@dataclass
class SamplesGenerated:
    step: int
    images: Any  # uint8 tensor (N, 3, H, W)


@dataclass
class LabelsCovered:
    """After an epoch of generated images: per label, the share the teachers call present, and the
    images' diversity (RMS distance between two images; ``kamal_engine.methods.datafree``)."""
    stage: str
    epoch: int
    rates: dict[str, float]
    diversity: float


@dataclass
class BranchPlansMeasured:
    """The plans of Step III: each one's plan (task -> block name), exact ``parameters``, their ``fraction``
    of ``teachers_parameters``, total converged ``loss`` and, where measured, ``mean_ap`` before fine-tuning;
    ``front`` and ``chosen`` index ``plans``; ``budget``: max_params as a count (None: none)."""
    blocks: list[str]
    teachers_parameters: int
    plans: list[dict[str, Any]]
    front: list[int]
    chosen: int
    budget: int | None = None
    rule: str = "eq9"


@dataclass
class BranchPlanChosen:
    plan: dict[str, str]  # task -> block name


@dataclass
class Evaluated:
    model: str  # "student" or a teacher's name
    ap: dict[str, float] = field(default_factory=dict)
    mean_ap: float | None = None
    accuracy: float | None = None


@dataclass
class Finished:
    output_dir: str
    summary: dict[str, Any]


@dataclass
class Failed:
    message: str


@dataclass
class Cancelled:
    message: str


Event = Any
Emit = Callable[[Event], None]


class RunCancelled(Exception):
    """Raised inside a run when its :class:`CancelToken` is set."""


class CancelToken:
    """A thread-safe flag; ``check()`` raises :class:`RunCancelled` once it is set."""

    def __init__(self):
        self._flag = threading.Event()

    def cancel(self) -> None:
        self._flag.set()

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set()

    def check(self) -> None:
        if self._flag.is_set():
            raise RunCancelled("the run was cancelled")


def _score(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def describe(event: Event) -> str | None:
    """The log line(s) of an event, as ``kamal run`` prints them and the app's Train page logs them;
    None for the events that only move a bar or a plot (steps, progress, samples, loss history)."""
    if isinstance(event, RunStarted):
        return describe_started(event)
    if isinstance(event, StageStarted):
        return describe_stage(event)
    if isinstance(event, BlockConverged):
        return f"  converged loss at {event.block_name}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in event.losses.items())
    if isinstance(event, BlockDiagnosed):
        return f"  knowledge reproduced at {event.block_name}: " + ", ".join(
            f"{name} {d['share']:.0%} ({d['filter']}, CKA {d['related_before']:.2f})"
            for name, d in event.teachers.items())
    if isinstance(event, RunWarning):
        return f"Warning: {event.message}"
    if isinstance(event, LabelsCovered):
        return (f"  epoch {event.epoch}, labels present in the generated images: "
                + ", ".join(f"{k} {v:.0%}" for k, v in event.rates.items()) + f"; diversity {event.diversity:.2f}")
    if isinstance(event, BranchPlansMeasured):
        chosen = event.plans[event.chosen]
        return (f"Branch plans: {len(event.plans)} measured, {len(event.front)} on the size/loss front; chosen by "
                f"{event.rule}: {chosen['parameters']:,} parameters ({chosen['fraction']:.2f} x the teachers'), "
                f"converged loss {chosen['loss']:.4f}")
    if isinstance(event, BranchPlanChosen):
        return "Branch points: " + ", ".join(f"{k} → {v}" for k, v in event.plan.items())
    if isinstance(event, Evaluated):
        score = f"mAP {_score(event.mean_ap)}" if event.mean_ap is not None else f"accuracy {_score(event.accuracy)}"
        return f"  {event.model}: {score}"
    if isinstance(event, Finished):
        text = f"Finished in {format_duration(event.summary.get('seconds', 0))}: {event.summary.get('student')}"
        if event.summary.get("onnx_error"):
            text += f"\nONNX export failed (the student is saved): {event.summary['onnx_error']}"
        return text
    if isinstance(event, Cancelled):
        return f"Cancelled: {event.message}"
    return None  # Failed too: the CLI and the app each say what failed, with the fix, when the run raises
