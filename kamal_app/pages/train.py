"""Train page: runs the current recipe in a worker thread, with live plots.

The worker puts every engine event into an :class:`~kamal_app.monitor.EventQueue` and wakes the
GUI thread with a throttled signal (at most every 50 ms); a 30 Hz timer in the GUI thread drains
the queue into a :class:`~kamal_app.monitor.RunMonitor` and redraws only what changed, so the
GUI thread never handles one signal per training step. Cancel sets the engine's cancel flag: the
run stops after the current step and keeps its finished blocks (Start → Resume continues them).

Shows: overall progress with ETA, the stage text, per-block losses (a curve per block and teacher,
log-scale toggle), the converged loss of each task at each block with the chosen branch points
marked, and for data-free methods the generator's losses and the latest generated samples.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QElapsedTimer, Qt, QTimer, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (QCheckBox, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar,
                               QPushButton, QSizePolicy, QVBoxLayout, QWidget)

from kamal_engine.events import CancelToken, RunCancelled, format_duration

from ..monitor import EventQueue, RunMonitor
from ..widgets import page_header
from ..workers import WorkerHandle

WAKE_INTERVAL = 0.05  # seconds between the worker's wake-up signals
REDRAW_HZ = 20


def run_in_worker(recipe, resume: bool, events: EventQueue):
    """The worker function: ``run_recipe`` with every event queued, wake-ups throttled, cancel wired."""
    def work(wake, abort: threading.Event):
        from kamal_engine.runner import run_recipe

        cancel = CancelToken()
        last = [0.0]

        def emit(event):
            events.put(event)
            now = time.monotonic()
            if now - last[0] >= WAKE_INTERVAL:
                last[0] = now
                wake(True)  # never None: PySide6 miscounts None's references across threads

        watcher = threading.Thread(target=lambda: (abort.wait(), cancel.cancel()), daemon=True)
        watcher.start()
        try:
            return run_recipe(recipe, resume=resume, restart=not resume, emit=emit, cancel=cancel)
        finally:
            abort.set()  # ends the watcher

    return work


class Heartbeat:
    """The longest gap between ticks of a 10 ms GUI-thread timer: how long the event loop stalled."""

    def __init__(self, parent):
        self.timer = QTimer(parent)
        self.timer.setInterval(10)
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self._tick)
        self.clock = QElapsedTimer()
        self.max_gap_ms = 0.0
        self.ticks = 0

    def start(self) -> None:
        self.max_gap_ms, self.ticks = 0.0, 0
        self.clock.start()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def _tick(self) -> None:
        gap = self.clock.nsecsElapsed() / 1e6
        self.clock.restart()
        if self.ticks:
            self.max_gap_ms = max(self.max_gap_ms, gap)
        self.ticks += 1


def _plot(title: str, left: str, bottom: str) -> pg.PlotWidget:
    widget = pg.PlotWidget()
    palette = widget.palette()
    widget.setBackground(palette.base().color())
    item = widget.getPlotItem()
    item.setTitle(title, color=palette.text().color().name())
    for axis in ("left", "bottom"):
        item.getAxis(axis).setTextPen(palette.text().color())
        item.getAxis(axis).setPen(palette.mid().color())
    item.setLabel("left", left)
    item.setLabel("bottom", bottom)
    item.showGrid(x=True, y=True, alpha=0.2)
    item.setClipToView(True)  # draw what is visible, and at most about one point per pixel
    item.setDownsampling(auto=True, mode="peak")
    item.addLegend(offset=(-10, 10), labelTextColor=palette.text().color(), labelTextSize="8pt",
                   brush=pg.mkBrush(palette.base().color()), pen=pg.mkPen(palette.mid().color()))
    return widget


def sample_grid(images, columns: int = 8) -> QImage:
    """uint8 (N, 3, H, W) → one RGB image, ``columns`` per row, a 2-pixel gap."""
    array = np.asarray(images)[:columns * columns]
    n, _, h, w = array.shape
    rows = (n + columns - 1) // columns
    cols = min(n, columns)
    grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), dtype=np.uint8)
    for i, img in enumerate(array):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img.transpose(1, 2, 0)
    grid = np.ascontiguousarray(grid)
    return QImage(grid.data, grid.shape[1], grid.shape[0], grid.strides[0], QImage.Format.Format_RGB888).copy()


class TrainPage(QWidget):
    run_finished = Signal(object)  # the RunResult
    run_stopped = Signal()  # after the worker thread ended, however it ended

    def __init__(self, parent=None):
        super().__init__(parent)
        self.handle: WorkerHandle | None = None
        self.events = EventQueue()
        self.monitor = RunMonitor()
        self.cancelled = False
        self.heartbeat = Heartbeat(self)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.generator_curves: dict[str, pg.PlotDataItem] = {}

        layout = QVBoxLayout(self)
        layout.addWidget(page_header("Train"))
        self.stage = QLabel("Not started. Press Start when it is enabled (bottom right).")
        # text changes must not re-layout the page (a re-layout re-renders every plot)
        self.stage.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        layout.addWidget(self.stage)
        row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFormat("%p%")
        row.addWidget(self.progress, 1)
        self.eta = QLabel("")
        self.eta.setFixedWidth(self.fontMetrics().horizontalAdvance("ETA 00h00m") + 8)
        row.addWidget(self.eta)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)

        grid = QGridLayout()
        layout.addLayout(grid, 1)
        self.loss_plot = _plot("Per-block losses (per teacher)", "loss", "step")
        grid.addWidget(self.loss_plot, 0, 0)
        self.log_scale = QCheckBox("Log scale")
        self.log_scale.toggled.connect(lambda on: self.loss_plot.getPlotItem().setLogMode(y=on))
        grid.addWidget(self.log_scale, 1, 0)
        self.converged_plot = _plot("Converged loss per block (★ branch point)", "converged loss", "block")
        grid.addWidget(self.converged_plot, 0, 1)
        self.free_box = QGroupBox("Data-free: generator")
        free = QHBoxLayout(self.free_box)
        self.generator_plot = _plot("Generator losses", "loss", "step")
        free.addWidget(self.generator_plot, 1)
        self.samples = QLabel("No samples yet.")
        self.samples.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.samples.setMinimumWidth(self.fontMetrics().averageCharWidth() * 30)
        free.addWidget(self.samples)
        grid.addWidget(self.free_box, 2, 0, 1, 2)
        self.free_box.setVisible(False)
        grid.setRowStretch(0, 1)

        self.log = QPlainTextEdit()  # shown in the main window's log dock
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)

        self.redraw_timer = QTimer(self)
        self.redraw_timer.setInterval(1000 // REDRAW_HZ)
        self.redraw_timer.timeout.connect(self.redraw)

    # --- control ---
    def is_running(self) -> bool:
        return self.handle is not None and self.handle.is_running()

    def start(self, recipe, resume: bool = False, data_free: bool = False) -> None:
        if self.is_running():
            return
        self.cancelled = False
        self.monitor.reset()
        self.events.drain()
        self.loss_plot.getPlotItem().clear()
        self.converged_plot.getPlotItem().clear()
        self.generator_plot.getPlotItem().clear()
        self.curves, self.generator_curves = {}, {}
        self.free_box.setVisible(data_free)
        self.samples.setText("No samples yet.")
        self.progress.setValue(0)
        self.eta.setText("")
        self.append(f"Starting '{recipe.name}' ({recipe.method}) → {recipe.output_dir}")
        self.handle = WorkerHandle(run_in_worker(recipe, resume, self.events), self)
        self.handle.worker.yielded.connect(self._wake)
        self.handle.worker.returned.connect(self.on_returned)
        self.handle.worker.errored.connect(self.on_errored)
        self.handle.done.connect(self.on_done)
        self.cancel_button.setEnabled(True)
        self.redraw_timer.start()
        self.heartbeat.start()
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

    # --- events → widgets ---
    def _wake(self, _=True) -> None:
        if not self.redraw_timer.isActive():
            self.redraw_timer.start()

    def redraw(self) -> None:
        """Drain the queued events and redraw what changed (called by the 30 Hz timer)."""
        for event in self.events.drain():
            self.monitor.feed(event)
        m = self.monitor
        for line in m.take_log():
            self.append(line)
        dirty, m.dirty = m.dirty, set()
        if "progress" in dirty:
            self.progress.setValue(int(1000 * m.fraction))
            self.stage.setText(m.stage_text)
            if m.eta_seconds is not None and m.fraction < 1:
                self.eta.setText(f"ETA {format_duration(m.eta_seconds)}")
        if "losses" in dirty:
            self._update_curves(self.loss_plot, self.curves, m.series, m.dirty_series)
            m.dirty_series = set()
        if "generator" in dirty:
            self.free_box.setVisible(True)
            self._update_curves(self.generator_plot, self.generator_curves, m.generator, m.dirty_generator)
            m.dirty_generator = set()
        if "converged" in dirty:
            self._draw_converged()
        if "samples" in dirty and m.samples is not None:
            self.free_box.setVisible(True)
            pixmap = QPixmap.fromImage(sample_grid(m.samples))
            side = self.samples.minimumWidth()
            self.samples.setPixmap(pixmap.scaled(side, side, Qt.AspectRatioMode.KeepAspectRatio,
                                                 Qt.TransformationMode.FastTransformation))
            self.samples.setToolTip(f"generated at step {m.samples_step}")

    def _update_curves(self, plot: pg.PlotWidget, curves: dict, series: dict, changed: set) -> None:
        """Only the series with new points are handed to pyqtgraph (finished blocks stay as drawn)."""
        for name in [n for n in series if n in changed]:
            s = series[name]
            curve = curves.get(name)
            if curve is None:
                curve = plot.plot(name=name, pen=pg.mkPen(pg.intColor(len(curves), hues=9), width=1.5),
                                  connect="finite")
                curves[name] = curve
            y = np.asarray(s.y, dtype=np.float64)
            curve.setData(np.asarray(s.x, dtype=np.float64), np.where(np.isfinite(y), y, np.nan))

    def _draw_converged(self) -> None:
        m = self.monitor
        item = self.converged_plot.getPlotItem()
        item.clear()
        blocks = [m.block_names[k] for k in sorted(m.block_names)]
        position = {name: i + 1 for i, name in enumerate(blocks)}
        item.getAxis("bottom").setTicks([[(i + 1, name) for i, name in enumerate(blocks)]])
        for i, (task, values) in enumerate(m.converged.items()):
            color = pg.intColor(i, hues=max(9, len(m.converged)))
            x = np.asarray([position[b] for b in values if b in position], dtype=np.float64)
            y = np.asarray([values[b] for b in values if b in position], dtype=np.float64)
            item.plot(x, y, name=task, pen=pg.mkPen(color, width=1.5), symbol="o", symbolSize=6,
                      symbolBrush=color, connect="finite")
            chosen = m.plan.get(task)
            if chosen in values and chosen in position:
                item.plot([float(position[chosen])], [float(values[chosen])], pen=None, symbol="star",
                          symbolSize=16, symbolBrush=color)

    # --- worker results ---
    def on_returned(self, result) -> None:
        self.redraw()
        self.progress.setValue(1000)
        self.eta.setText("")
        self.stage.setText(f"Finished: {result.output_dir}")
        self.run_finished.emit(result)

    def on_errored(self, exc) -> None:
        self.redraw()
        if isinstance(exc, RunCancelled) or self.cancelled:
            self.stage.setText("Cancelled. The finished blocks are kept; Start → Resume continues them.")
            self.append("Cancelled.")
        else:
            self.stage.setText("Failed.")
            self.append(f"Failed: {' '.join(str(exc).split())}")
            from ..dialogs import show_error

            show_error(self, "The run failed", exc)

    def on_done(self) -> None:
        self.redraw()
        self.redraw_timer.stop()
        self.heartbeat.stop()
        self.cancel_button.setEnabled(False)
        self.handle = None
        self.run_stopped.emit()
