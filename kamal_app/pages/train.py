"""Train page: runs the current recipe in a worker thread, with progress, ETA, stage and a log.

The engine's events arrive in the GUI thread through the worker's ``yielded`` signal; step events
are throttled in the worker (at most one per 50 ms, and always the last), so the GUI thread never
drowns. Cancel sets the engine's cancel flag; the run stops after the current step and keeps its
finished blocks (``Resume`` continues them).
"""

from __future__ import annotations

import threading
import time

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget

from kamal_engine import events as ev
from kamal_engine.events import CancelToken, RunCancelled

from ..workers import WorkerHandle

STEP_INTERVAL = 0.05


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_in_worker(recipe, resume: bool):
    """The worker function: ``run_recipe`` with events forwarded (steps throttled) and cancel wired."""
    def work(report, abort: threading.Event):
        from kamal_engine.runner import run_recipe

        cancel = CancelToken()
        last = [0.0]

        def emit(event):
            if abort.is_set():
                cancel.cancel()
            if isinstance(event, (ev.StepLosses, ev.Progress)):
                now = time.monotonic()
                done = event.step == event.total_steps if isinstance(event, ev.StepLosses) else event.done == event.total
                if now - last[0] < STEP_INTERVAL and not done:
                    return
                last[0] = now
            report(event)

        watcher = threading.Thread(target=lambda: (abort.wait(), cancel.cancel()), daemon=True)
        watcher.start()
        try:
            return run_recipe(recipe, resume=resume, restart=not resume, emit=emit, cancel=cancel)
        finally:
            abort.set()  # also ends the watcher

    return work


class TrainPage(QWidget):
    run_finished = Signal(object)  # the RunResult

    def __init__(self, parent=None):
        super().__init__(parent)
        self.handle: WorkerHandle | None = None
        self.cancelled = False
        layout = QVBoxLayout(self)
        title = QLabel("<h2>Train</h2>The run: the student learns block by block from the teachers.")
        title.setWordWrap(True)
        layout.addWidget(title)
        self.stage = QLabel("Not started. Press Start when the Start button is enabled.")
        layout.addWidget(self.stage)
        row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        row.addWidget(self.progress, 1)
        self.eta = QLabel("")
        row.addWidget(self.eta)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        layout.addWidget(self.log, 1)

    def is_running(self) -> bool:
        return self.handle is not None and self.handle.is_running()

    def start(self, recipe, resume: bool = False) -> None:
        if self.is_running():
            return
        self.cancelled = False
        self.progress.setValue(0)
        self.eta.setText("")
        self.append(f"Starting '{recipe.name}' ({recipe.method}) → {recipe.output_dir}")
        self.handle = WorkerHandle(run_in_worker(recipe, resume), self)
        self.handle.worker.yielded.connect(self.on_event)
        self.handle.worker.returned.connect(self.on_returned)
        self.handle.worker.errored.connect(self.on_errored)
        self.handle.done.connect(self.on_done)
        self.cancel_button.setEnabled(True)
        self.handle.start()

    def cancel(self) -> None:
        if self.is_running():
            self.cancelled = True
            self.stage.setText("Cancelling after the current step …")
            self.handle.request_abort()

    def stop_and_wait(self, timeout_ms: int = 30000) -> bool:
        if self.handle is None:
            return True
        self.cancelled = self.cancelled or self.is_running()
        return self.handle.stop(timeout_ms)

    def append(self, text: str) -> None:
        self.log.appendPlainText(text)

    def on_event(self, event) -> None:
        if isinstance(event, ev.StepLosses):
            frac = event.step / max(1, event.total_steps)
            self.progress.setValue(int(1000 * frac))
            where = f"Block {event.block} · " if event.block else ""
            self.stage.setText(f"{event.stage.capitalize()} · {where}epoch {event.epoch} · "
                               f"{event.images_per_second:.0f} img/s · loss {event.losses.get('loss', float('nan')):.4f}")
            self.eta.setText(f"ETA {_duration(event.eta_seconds)}")
        elif isinstance(event, ev.Progress):
            self.stage.setText(f"{ev.STAGE_TITLES.get(event.stage, event.stage)} {event.done}/{event.total}")
        elif isinstance(event, ev.RunStarted):
            self.append(f"Run '{event.name}': {event.method} on {event.device}"
                        + (f", resuming from {event.resumed_from}" if event.resumed_from else ""))
        elif isinstance(event, ev.StageStarted):
            text = ev.describe_stage(event)
            self.append(text)
            self.stage.setText(text)
        elif isinstance(event, ev.BlockConverged):
            self.append(f"  converged loss at {event.block_name}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in event.losses.items()))
        elif isinstance(event, ev.BranchPlanChosen):
            self.append("Branch points: " + ", ".join(f"{k} → {v}" for k, v in event.plan.items()))
        elif isinstance(event, ev.Evaluated):
            score = f"mAP {event.mean_ap:.4f}" if event.mean_ap is not None else f"accuracy {event.accuracy:.4f}"
            self.append(f"  {event.model}: {score}")
        elif isinstance(event, ev.Finished):
            self.append(f"Finished in {_duration(event.summary.get('seconds', 0))}: {event.summary.get('student')}")
            if event.summary.get("onnx_error"):
                self.append(f"ONNX export failed (the student is saved): {event.summary['onnx_error']}")

    def on_returned(self, result) -> None:
        self.progress.setValue(1000)
        self.stage.setText(f"Finished: {result.output_dir}")
        self.run_finished.emit(result)

    def on_errored(self, exc) -> None:
        if isinstance(exc, RunCancelled) or self.cancelled:
            self.stage.setText("Cancelled. The finished blocks are kept; Start → Resume continues them.")
            self.append("Cancelled.")
        else:
            self.stage.setText("Failed.")
            self.append(f"Failed: {' '.join(str(exc).split())}")
            from ..dialogs import show_error

            show_error(self, "The run failed", exc)

    def on_done(self) -> None:
        self.cancel_button.setEnabled(False)
        self.eta.setText("")
        self.handle = None
