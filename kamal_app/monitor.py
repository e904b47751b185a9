"""What the Train page shows, accumulated from the engine's events (no Qt here).

The worker thread puts every event (relayed from the engine process) into :class:`EventQueue`;
the GUI thread drains it from its redraw timer (20 Hz) into a :class:`RunMonitor`, which keeps:

* ``series``: per-block training losses, one series per block and teacher (``b2 · digits_0to4``,
  the mean loss of that teacher's selected tasks at each step; ``finetune · …`` after the blocks);
* ``generator``: generator losses of data-free methods (step losses named ``generator:<term>``);
* ``converged``: the converged loss of each task at each block, and ``plan``: the chosen branch points;
  ``plans``: every branch plan measured (size, converged loss, mAP before fine-tuning), the front, the choice;
* ``knowledge``: per block and teacher, how much of the teacher's knowledge the student reproduces
  (filtered-ka's diagnosis: share, filter kind, feature relatedness), and ``warnings``: plain sentences;
* ``samples``: the latest grid of generated images (data-free methods), progress, ETA and stage text.
* ``coverage``: per label, the share of the last epoch's generated images the teachers call it present in.
"""

from __future__ import annotations

import math
import queue
from dataclasses import dataclass, field
from typing import Any

from kamal_engine import events as ev


class EventQueue:
    """Thread-safe hand-over of events from the worker to the GUI thread."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, event: Any) -> None:
        self._queue.put(event)

    def drain(self, limit: int = 100000) -> list[Any]:
        out = []
        try:
            while len(out) < limit:
                out.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return out


@dataclass
class Series:
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def add(self, x: float, y: float) -> None:
        self.x.append(float(x))
        self.y.append(float(y) if y is not None else math.nan)


class RunMonitor:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.series: dict[str, Series] = {}
        self.generator: dict[str, Series] = {}
        self.converged: dict[str, dict[str, float]] = {}
        self.block_names: dict[int, str] = {}
        self.plan: dict[str, str] = {}
        self.plans = None  # the last BranchPlansMeasured: every plan's size and quality, the front, the choice
        self.knowledge: dict[str, dict[str, dict]] = {}  # block name -> teacher -> diagnosis
        self.warnings: list[str] = []
        self.samples = None
        self.samples_step = 0
        self.coverage: dict[str, float] = {}  # per label: share of the last epoch's generated images present
        self.coverage_epoch = 0
        self.coverage_diversity = float("nan")
        self.fraction = 0.0
        self.total_steps = 0  # of the whole run (the loss plot's x extent)
        self.images_per_second = 0.0  # the engine's running throughput (last step event)
        self.eta_seconds: float | None = None
        self.stage_text = ""
        self.points = 0  # loss points received (tests: "the plot receives points")
        self.new_log: list[str] = []
        self.dirty = set()  # "losses", "generator", "converged", "samples", "coverage", "progress"
        self.dirty_series: set[str] = set()  # loss series with new points since the last redraw
        self.dirty_generator: set[str] = set()

    def block_name(self, block: int) -> str:
        return self.block_names.get(block, f"b{block}")

    def learn_block_name(self, block: int, name: str) -> None:
        """Name block ``block``; series drawn under its stand-in name (``b3``: a resumed run's history,
        which comes before the names) take the real one."""
        if self.block_names.get(block) == name:
            return
        old = f"{self.block_name(block)} · "
        self.block_names[block] = name
        for key in [k for k in self.series if k.startswith(old)]:
            new = f"{name} · {key[len(old):]}"
            self.series[new] = self.series.pop(key)
            self.dirty_series.discard(key)
            self.dirty_series.add(new)
            self.dirty.add("losses")

    def feed(self, event: Any) -> None:
        line = ev.describe(event)
        if line is not None:
            self.new_log.append(line)
        if isinstance(event, ev.StepLosses):
            self._step(event)
        elif isinstance(event, ev.LossHistory):  # a resumed run: the finished part, before the live steps
            for step in event.steps:
                self._add_losses(step)
            if event.steps:
                self.new_log.append(f"Resumed: the plots show the {len(event.steps):,} steps already done")
        elif isinstance(event, ev.Progress):
            self.stage_text = f"{ev.STAGE_TITLES.get(event.stage, event.stage)} {event.done}/{event.total}"
            self.dirty.add("progress")
        elif isinstance(event, ev.StageStarted):
            if event.block and event.block_name:
                self.learn_block_name(event.block, event.block_name)
            self.stage_text = line
            self.dirty.add("progress")
        elif isinstance(event, ev.BlockConverged):
            self.learn_block_name(event.block, event.block_name)
            for task, value in event.losses.items():
                self.converged.setdefault(task, {})[event.block_name] = value
            self.dirty.add("converged")
        elif isinstance(event, ev.BlockDiagnosed):
            self.knowledge[event.block_name] = dict(event.teachers)
            self.dirty.add("knowledge")
        elif isinstance(event, ev.RunWarning):
            self.warnings.append(event.message)
            self.dirty.add("knowledge")
        elif isinstance(event, ev.BranchPlansMeasured):
            self.plans = event
            self.dirty.add("plans")
        elif isinstance(event, ev.BranchPlanChosen):
            self.plan = dict(event.plan)
            self.dirty.add("converged")
        elif isinstance(event, ev.SamplesGenerated):
            self.samples, self.samples_step = event.images, event.step
            self.dirty.add("samples")
        elif isinstance(event, ev.LabelsCovered):
            self.coverage, self.coverage_epoch = dict(event.rates), event.epoch
            self.coverage_diversity = event.diversity
            self.dirty.add("coverage")
        elif isinstance(event, ev.Finished):
            self.fraction, self.eta_seconds = 1.0, 0.0
            self.dirty.add("progress")

    def _step(self, event: ev.StepLosses) -> None:
        self.fraction = event.step / max(1, event.total_steps)
        self.total_steps = event.total_steps
        self.eta_seconds = event.eta_seconds
        self.images_per_second = event.images_per_second
        where = "" if not event.block else f"{'Net' if event.stage == 'component' else 'Block'} {event.block} · "
        loss = event.losses.get("loss", math.nan)
        self.stage_text = (f"{event.stage.capitalize()} · {where}epoch {event.epoch} · "
                           f"{event.images_per_second:.0f} img/s · loss {loss:.4f}")
        self._add_losses(event)
        self.dirty.add("progress")

    def _add_losses(self, event: ev.StepLosses) -> None:
        prefix = self.block_name(event.block) if event.block else event.stage
        for key, value in event.losses.items():
            if key.startswith("teacher:"):
                name = f"{prefix} · {key[8:]}"
                self.series.setdefault(name, Series()).add(event.step, value)
                self.dirty_series.add(name)
                self.points += 1
                self.dirty.add("losses")
            elif key.startswith("generator:"):
                self.generator.setdefault(key[10:], Series()).add(event.step, value)
                self.dirty_generator.add(key[10:])
                self.dirty.add("generator")

    def take_log(self) -> list[str]:
        lines, self.new_log = self.new_log, []
        return lines
