"""Train page: runs the current recipe from a worker thread, with live plots.

The worker thread starts the run in a child process (:mod:`kamal_app.engine_process`), puts every
engine event it relays into an :class:`~kamal_app.monitor.EventQueue`; a 20 Hz timer in the GUI
thread, running while the run does, drains the queue into a :class:`~kamal_app.monitor.RunMonitor`
and redraws only what changed, so the GUI thread never handles a signal per training step. Cancel sets the engine's cancel flag in the child: the
run stops after the current step and keeps its finished blocks (Start → Resume continues them).

Shows: overall progress with ETA, the stage text, per-block losses (a curve per block and teacher,
log-scale toggle), the converged loss of each task at each block with the chosen branch points
marked, how much of each teacher's knowledge the student reproduces at each block (filtered-ka's
diagnosis, with the filter used and the features' relatedness in a tooltip) and any warning about it,
and for data-free methods the generator's losses, the latest generated samples and, beside them, a
bar per label: the share of the last epoch's generated images the teachers call it present in.
"""

from __future__ import annotations

import gc
import html
import math
import threading

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QElapsedTimer, Qt, QTimer, Signal
from PySide6.QtGui import QFontMetricsF, QImage, QPixmap
from PySide6.QtWidgets import (QCheckBox, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar,
                               QPushButton, QSizePolicy, QTabWidget, QVBoxLayout, QWidget)

from kamal_engine.errors import KamalError
from kamal_engine.events import RunCancelled, format_duration
from kamal_engine.methods import get_method

from ..engine_process import run_in_child_process
from ..monitor import EventQueue, RunMonitor
from ..plan_chart import PlanChart
from ..widgets import StatusLine, page_header
from ..workers import WorkerHandle

REDRAW_HZ = 20
NEW_LINES_PER_TICK = 2  # converged-loss lines created per redraw tick (on top of the loss curves)
PROGRESS_STEPS = 200  # the bar repaints only when it moves a visible amount (0.5 %), not every step


def run_in_worker(recipe, resume: bool, events: EventQueue, replace: bool = False):
    """The worker function: the run in a child process, its events queued for the redraw timer.

    See :mod:`kamal_app.engine_process` for why the engine does not train in this process.
    """
    def work(_yield, abort: threading.Event):
        return run_in_child_process(recipe, resume, events.put, abort, replace=replace)

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


class ReadableAxis(pg.AxisItem):
    """An axis whose log-scale labels never pile up: 1-2-5 per decade where they fit, else the decades
    (every n-th when even those do not), printed as plain numbers (0.02, not 2x10⁻²)."""

    def logTickValues(self, minVal, maxVal, size, stdTicks):  # noqa: N802, N803 - pyqtgraph's names
        if not (math.isfinite(minVal) and math.isfinite(maxVal)) or maxVal <= minVal:
            return [(None, [])]
        room = max(2, int(size / (QFontMetricsF(self.font()).height() * 1.6)))
        lo, hi = math.floor(minVal), math.ceil(maxVal)
        for mantissas in ((1, 2, 5), (1,)):
            values = [e + math.log10(m) for e in range(lo, hi + 1) for m in mantissas]
            values = [v for v in values if minVal <= v <= maxVal]
            if 2 <= len(values) <= room:
                return [(None, values)]
        if hi - lo <= 1:  # less than a decade shown: a few evenly spaced values
            return [(None, list(np.linspace(minVal, maxVal, min(room, 4))))]
        decades = [v for v in range(lo, hi + 1) if minVal <= v <= maxVal]
        return [(None, decades[::math.ceil(len(decades) / room)])]

    def logTickStrings(self, values, scale, spacing):  # noqa: N802 - pyqtgraph's name
        return [f"{10 ** v * scale:.3g}" for v in values]


class Legend(QLabel):
    """A plot's legend beside it, never over its data; hidden while the plot has no curve."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setTextFormat(Qt.TextFormat.RichText)
        self.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Preferred)
        self.entries: list[tuple[str, str]] = []
        self.setVisible(False)

    def set_entries(self, entries: list[tuple[str, object]]) -> None:
        """``(name, colour)`` per curve, in drawing order."""
        entries = [(name, pg.mkColor(color).name()) for name, color in entries]
        if entries == self.entries:
            return
        self.entries = entries
        self.setText("<br>".join(f"<span style='color:{c}'>&#9632;</span>&nbsp;{html.escape(n)}" for n, c in entries))
        self.setVisible(bool(entries))


def _plot(title: str, left: str, bottom: str) -> pg.PlotWidget:
    widget = pg.PlotWidget(axisItems={"left": ReadableAxis("left")})
    palette = widget.palette()
    widget.setBackground(palette.base().color())
    item = widget.getPlotItem()
    item.setTitle(title, color=palette.text().color().name())
    for axis in ("left", "bottom"):
        item.getAxis(axis).setTextPen(palette.text().color())
        item.getAxis(axis).setPen(palette.mid().color())
    item.setLabel("left", left)
    item.setLabel("bottom", bottom)
    # no grid: pyqtgraph draws grid lines as part of its axes, which re-render whenever the range
    # grows (every step while training); with a grid, a repaint costs 4-5x the CPU
    item.setClipToView(True)  # draw what is visible, and at most about one point per pixel
    item.setDownsampling(auto=True, mode="peak")
    item.getAxis("left").enableAutoSIPrefix(False)  # 0.02, not 20 with "(x0.001)" beside the axis
    widget.legend = Legend()
    return widget


def with_legend(plot: pg.PlotWidget) -> QWidget:
    """The plot with its :class:`Legend` to the right."""
    panel = QWidget()
    row = QHBoxLayout(panel)
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(plot, 1)
    row.addWidget(plot.legend)
    return panel


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


def method_branches(method_id: str) -> bool:
    """Whether the method's TargetNet branches out per task (and so has converged losses to plot)."""
    try:
        return get_method(method_id).branches
    except KamalError:
        return True


class TrainPage(QWidget):
    run_finished = Signal(object)  # the RunResult
    run_stopped = Signal()  # after the worker thread ended, however it ended
    replan_requested = Signal(object, dict)  # a finished run's folder, the plan to build from its blocks

    def __init__(self, parent=None):
        super().__init__(parent)
        self.handle: WorkerHandle | None = None
        self.finished_dir = None  # the folder of the last run that finished here (its plans can be fine-tuned)
        self.events = EventQueue()
        self.monitor = RunMonitor()
        self.cancelled = False
        self.heartbeat = Heartbeat(self)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.generator_curves: dict[str, pg.PlotDataItem] = {}
        self.converged_curves: dict[str, tuple[pg.PlotDataItem, object]] = {}  # task → (line, colour)
        self.branch_stars: pg.ScatterPlotItem | None = None
        self._converged_ticks = None

        layout = QVBoxLayout(self)
        layout.addWidget(page_header("Train"))
        # these two change many times a second: StatusLine repaints itself without re-laying out the window
        self.stage = StatusLine("Not started. Press Start when it is enabled (bottom right).")
        layout.addWidget(self.stage)
        row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, PROGRESS_STEPS)
        self.progress.setFormat("%p%")
        row.addWidget(self.progress, 1)
        self.eta = StatusLine("", alignment=Qt.AlignmentFlag.AlignRight)
        self.eta.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        self.eta.setFixedWidth(self.fontMetrics().horizontalAdvance("ETA 00h00m") + 8)
        row.addWidget(self.eta)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.warning = QLabel()  # a teacher whose knowledge does not get through, in a plain sentence
        self.warning.setWordWrap(True)
        self.warning.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.warning.setStyleSheet("QLabel { background: #fff3cd; color: #664d03; border: 1px solid #e0c36b; "
                                   "padding: 4px; }")
        self.warning.setVisible(False)
        layout.addWidget(self.warning)

        grid = QGridLayout()
        layout.addLayout(grid, 1)
        self.loss_plot = _plot("Per-block losses (per teacher)", "loss", "step")
        grid.addWidget(with_legend(self.loss_plot), 0, 0)
        self.log_scale = QCheckBox("Log scale")
        self.log_scale.toggled.connect(lambda on: self.loss_plot.getPlotItem().setLogMode(y=on))
        grid.addWidget(self.log_scale, 1, 0)
        self.converged_plot = _plot("Converged loss · ★ branch", "converged loss", "block")
        self.converged_panel = with_legend(self.converged_plot)
        self.plan_chart = PlanChart()  # every branch plan's size and quality, once the blocks are trained
        self.plan_chart.finetune_requested.connect(self._replan)
        self.branch_tabs = QTabWidget()
        self.branch_tabs.addTab(self.converged_panel, "Converged loss")
        self.branch_tabs.addTab(self.plan_chart, "Size / quality")
        grid.addWidget(self.branch_tabs, 0, 1)
        self.knowledge = QLabel()  # teacher x block: the share of its knowledge the student reproduces
        self.knowledge.setTextFormat(Qt.TextFormat.RichText)
        self.knowledge.setVisible(False)
        grid.addWidget(self.knowledge, 1, 1)
        self.free_box = QGroupBox("Data-free: generator")
        free = QHBoxLayout(self.free_box)
        self.generator_plot = _plot("Generator losses", "loss", "step")
        free.addWidget(with_legend(self.generator_plot), 1)
        self.samples = QLabel("No samples yet.")
        self.samples.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.samples.setMinimumWidth(self.fontMetrics().averageCharWidth() * 40)
        free.addWidget(self.samples)
        self.coverage_plot = _plot("Labels present (last epoch)", "share of images", "label")
        self.coverage_plot.setYRange(0, 1, padding=0.02)
        self.coverage_plot.setMouseEnabled(x=False, y=False)
        self.coverage_bars = None
        self.coverage_plot.getPlotItem().getViewBox().sigResized.connect(self._coverage_ticks)
        free.addWidget(self.coverage_plot, 1)
        grid.addWidget(self.free_box, 2, 0, 1, 2)
        self.free_box.setVisible(False)
        grid.setRowStretch(0, 1)
        grid.setColumnStretch(0, 1)
        grid.setColumnStretch(1, 1)
        self.plots_grid = grid  # the data-free row gets a share of the height only when shown (start)
        for plot in (self.loss_plot, self.converged_plot, self.generator_plot, self.coverage_plot):
            plot.setMinimumHeight(self.fontMetrics().height() * 12)

        self.log = QPlainTextEdit()  # shown in the main window's log dock
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)

        self.redraw_timer = QTimer(self)
        self.redraw_timer.setInterval(1000 // REDRAW_HZ)
        self.redraw_timer.timeout.connect(self.redraw)

    # --- control ---
    def is_running(self) -> bool:
        """True from Start until the run's last signal was handled (``on_done``).

        Not the thread's state: the thread stops before its queued ``returned``/``errored``
        reach the GUI thread, and until then the page has not shown how the run ended.
        """
        return self.handle is not None

    def start(self, recipe, resume: bool = False, data_free: bool = False, replace: bool = False) -> None:
        """Run ``recipe`` (``resume``: continue the unfinished run in its folder; ``replace``: the user
        agreed to move the folder's earlier run aside)."""
        if self.is_running():
            return
        self.cancelled = False
        self.monitor.reset()
        self.events.drain()
        self.loss_plot.getPlotItem().clear()
        self.converged_plot.getPlotItem().clear()
        self.converged_curves = {}
        self.branch_stars = None
        self._converged_ticks = None
        self.generator_plot.getPlotItem().clear()
        self.coverage_plot.getPlotItem().clear()
        self.coverage_plot.getPlotItem().setTitle("Labels present (last epoch)", color=self.palette().text().color().name())
        self.coverage_plot.setToolTip("")
        self.coverage_bars = None
        for plot in (self.loss_plot, self.converged_plot, self.generator_plot):
            plot.legend.set_entries([])
        for plot in (self.loss_plot, self.generator_plot):
            plot.x_extent = None
            plot.getPlotItem().enableAutoRange(x=True)
        self.curves, self.generator_curves = {}, {}
        self.free_box.setVisible(data_free)
        self.plots_grid.setRowStretch(2, 1 if data_free else 0)  # shares the height, never squashing the loss plots
        self.branch_tabs.setVisible(method_branches(recipe.method))  # kd, dafl, adaptive-ka: no branch-out
        self.branch_tabs.setCurrentIndex(0)
        self.plan_chart.clear()
        self.plan_chart.set_finetune_allowed(False, "Another plan can be fine-tuned once this run has finished.")
        self.finished_dir = None
        self.knowledge.setVisible(False)
        self.knowledge.clear()
        self.warning.setVisible(False)
        self.samples.setText("No samples yet.")
        self.progress.setValue(0)
        self.eta.setText("")
        self.stage.setText("Resuming …" if resume else "Starting …")
        self.append(f"Starting '{recipe.name}' ({recipe.method}) → {recipe.output_dir}")
        # what exists now lives as long as the window: keep it out of the garbage collector's full
        # scans, which otherwise walk every object (torch's included) several times a second of plotting
        gc.freeze()
        self.handle = WorkerHandle(run_in_worker(recipe, resume, self.events, replace), self)
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
    def redraw(self) -> None:
        """Drain the queued events and redraw what changed (called by the 20 Hz timer)."""
        for event in self.events.drain():
            self.monitor.feed(event)
        m = self.monitor
        for line in m.take_log():
            self.append(line)
        dirty, m.dirty = m.dirty, set()
        if "progress" in dirty:
            self.progress.setValue(int(PROGRESS_STEPS * m.fraction))
            self.stage.setText(m.stage_text)
            if m.eta_seconds is not None and m.fraction < 1:
                self.eta.setText(f"ETA {format_duration(m.eta_seconds)}")
        created = 0  # new lines this tick: each costs a legend entry, so few per tick (one paint each)
        if "losses" in dirty:
            self._fix_x_extent(self.loss_plot, m.total_steps)
            created += self._update_curves(self.loss_plot, self.curves, m.series, m.dirty_series)
            m.dirty_series = set()
        if "generator" in dirty:
            self._show_free_box()
            self._fix_x_extent(self.generator_plot, m.total_steps)
            created += self._update_curves(self.generator_plot, self.generator_curves, m.generator,
                                           m.dirty_generator)
            m.dirty_generator = set()
        if "converged" in dirty and not self._draw_converged(max(0, NEW_LINES_PER_TICK - created)):
            m.dirty.add("converged")  # more new lines to create: on the next tick
        if "knowledge" in dirty:
            self._draw_knowledge()
        if "samples" in dirty and m.samples is not None:
            self._show_free_box()
            pixmap = QPixmap.fromImage(sample_grid(m.samples))
            side = self.samples.minimumWidth()
            self.samples.setPixmap(pixmap.scaled(side, side, Qt.AspectRatioMode.KeepAspectRatio,
                                                 Qt.TransformationMode.FastTransformation))
            self.samples.setToolTip(f"generated at step {m.samples_step}")

        if "plans" in dirty and m.plans is not None:
            plans = m.plans
            budget = None if plans.budget is None else plans.budget / max(plans.teachers_parameters, 1)
            self.plan_chart.set_plans(plans.plans, plans.chosen, budget)
            self.branch_tabs.setCurrentWidget(self.plan_chart)

        if "coverage" in dirty and m.coverage:
            self._show_free_box()
            self._draw_coverage()

    def _draw_coverage(self) -> None:
        """One bar per label: the share of the last epoch's generated images the teachers call it present in."""
        m = self.monitor
        names = list(m.coverage)
        x = np.arange(1, len(names) + 1, dtype=np.float64)
        heights = np.nan_to_num(np.asarray([m.coverage[n] for n in names], dtype=np.float64))
        item = self.coverage_plot.getPlotItem()
        if self.coverage_bars is None:
            self.coverage_bars = pg.BarGraphItem(x=x, height=heights, width=0.7, brush=pg.mkBrush(70, 130, 180))
            item.addItem(self.coverage_bars)
            item.setXRange(0.4, len(names) + 0.6, padding=0)
        else:
            self.coverage_bars.setOpts(x=x, height=heights)
        self._coverage_ticks()
        item.setTitle(f"Labels present, epoch {m.coverage_epoch}", color=self.palette().text().color().name())
        item.setYRange(0, 1, padding=0.02)
        self.coverage_plot.setToolTip("Share of the epoch's generated images each label is present in:\n"
                                      + "\n".join(f"{n}: {v:.0%}" for n, v in zip(names, heights))
                                      + f"\ndiversity {m.coverage_diversity:.2f}")

    def _coverage_ticks(self) -> None:
        """The label names under the bars: every k-th name on the axis's first level, k as small as lets
        them fit side by side at the plot's present width (the rest on a second level, which the axis
        draws only where there is room; every name and value is in the tooltip)."""
        names = list(self.monitor.coverage)
        if not names:
            return
        metrics = QFontMetricsF(self.coverage_plot.font())
        widest = max(metrics.horizontalAdvance(n) for n in names) + metrics.averageCharWidth() * 2
        width = max(1.0, self.coverage_plot.getPlotItem().getViewBox().width())
        k = max(1, math.ceil(widest * len(names) / width))
        ticks = [(float(i + 1), n) for i, n in enumerate(names)]
        self.coverage_plot.getPlotItem().getAxis("bottom").setTicks(
            [[t for i, t in enumerate(ticks) if i % k == 0], [t for i, t in enumerate(ticks) if i % k]])

    def _show_free_box(self) -> None:
        self.free_box.setVisible(True)
        self.plots_grid.setRowStretch(2, 1)

    @staticmethod
    def _fix_x_extent(plot: pg.PlotWidget, total_steps: int) -> None:
        """The x axis spans the whole run, so a new step does not rescale (and re-render) the axes."""
        item = plot.getPlotItem()
        if total_steps > 0 and getattr(plot, "x_extent", None) != total_steps:
            plot.x_extent = total_steps
            item.enableAutoRange(x=False)
            item.setXRange(0, total_steps, padding=0.01)

    def _update_curves(self, plot: pg.PlotWidget, curves: dict, series: dict, changed: set) -> int:
        """Only the series with new points are handed to pyqtgraph (finished blocks stay as drawn).

        Returns how many curves were created."""
        created = 0
        for name in [n for n in curves if n not in series]:  # renamed (a resumed run's history)
            plot.getPlotItem().removeItem(curves.pop(name))
        for name in [n for n in series if n in changed]:
            s = series[name]
            curve = curves.get(name)
            if curve is None:
                # width 1: Qt draws 1-pixel lines directly; wider ones go through its (slow) path stroker
                curve = plot.plot(name=name, pen=pg.mkPen(pg.intColor(len(curves), hues=9), width=1),
                                  connect="finite")
                curves[name] = curve
                created += 1
            y = np.asarray(s.y, dtype=np.float64)
            curve.setData(np.asarray(s.x, dtype=np.float64), np.where(np.isfinite(y), y, np.nan))
        if created:
            plot.legend.set_entries([(n, c.opts["pen"].color()) for n, c in curves.items()])
        return created

    def _draw_converged(self, new_lines_per_tick: int = NEW_LINES_PER_TICK) -> bool:
        """One line (and one ★ marker) per task, created once and then only given new data.

        Creating a line with its legend entry is the costliest thing this page does, so at most
        ``new_lines_per_tick`` are created per timer tick (one paint each): the event loop never
        stalls when ten labels converge at once. Returns False while lines remain to be created.
        """
        m = self.monitor
        item = self.converged_plot.getPlotItem()
        blocks = [m.block_names[k] for k in sorted(m.block_names)]
        position = {name: i + 1 for i, name in enumerate(blocks)}
        ticks = [[(i + 1, name) for i, name in enumerate(blocks)]]
        if ticks != self._converged_ticks:
            self._converged_ticks = ticks
            item.getAxis("bottom").setTicks(ticks)
        created, stars = 0, []
        for task, values in m.converged.items():
            if task not in self.converged_curves:
                if created == new_lines_per_tick:
                    return False
                created += 1
                color = pg.intColor(len(self.converged_curves), hues=max(9, len(m.converged)))
                line = item.plot(name=task, pen=pg.mkPen(color, width=1.5), symbol="o", symbolSize=6,
                                 symbolBrush=color, connect="finite")
                self.converged_curves[task] = (line, color)
                self.converged_plot.legend.set_entries([(t, c) for t, (_, c) in self.converged_curves.items()])
            line, color = self.converged_curves[task]
            known = [b for b in values if b in position]
            line.setData(np.asarray([position[b] for b in known], dtype=np.float64),
                         np.asarray([values[b] for b in known], dtype=np.float64))
            chosen = m.plan.get(task)
            if chosen in values and chosen in position:
                stars.append({"pos": (float(position[chosen]), float(values[chosen])), "brush": color})
        if self.branch_stars is None:
            self.branch_stars = pg.ScatterPlotItem(symbol="star", size=16, pen=None)
            item.addItem(self.branch_stars)
        self.branch_stars.setData(stars)  # one item for all the ★ markers: one update, one paint
        return True

    def _draw_knowledge(self) -> None:
        """The diagnosis as a small table (teacher x block, share of its knowledge and the filter), and the
        warnings above the plots."""
        m = self.monitor
        if m.knowledge:
            blocks = list(m.knowledge)
            teachers = list(dict.fromkeys(t for b in blocks for t in m.knowledge[b]))
            head = "".join(f"<th>&nbsp;{b}&nbsp;</th>" for b in blocks)
            rows = []
            for t in teachers:
                cells = []
                for b in blocks:
                    d = m.knowledge[b].get(t)
                    if d is None:
                        cells.append("<td></td>")
                        continue
                    color = "#1e7e34" if d["share"] >= 0.9 else "#b8860b" if d["share"] >= 0.7 else "#c0392b"
                    cells.append(f"<td align='right' style='color:{color}'>&nbsp;{d['share']:.0%} "
                                 f"<small>{'SE' if d['filter'] == 'se' else 'adapter'}</small>&nbsp;</td>")
                rows.append(f"<tr><td>{t}&nbsp;</td>{''.join(cells)}</tr>")
            self.knowledge.setText("<b>Knowledge reproduced</b> (share of each teacher's, by block; filter)"
                                   f"<table cellspacing='0'><tr><th></th>{head}</tr>{''.join(rows)}</table>")
            self.knowledge.setToolTip("\n".join(
                f"{b} · {t}: {d['share']:.0%} of what the teacher's predictions say about the images; "
                f"filter {d['filter']}; linear CKA of the features {d['related_before']:.2f} before training, "
                f"{d['related_after']:.2f} after (through the filter)"
                for b in blocks for t, d in m.knowledge[b].items()))
            self.knowledge.setVisible(True)
        if m.warnings:
            self.warning.setText("⚠ " + "\n⚠ ".join(m.warnings))
            self.warning.setVisible(True)

    # --- worker results ---
    def on_returned(self, result) -> None:
        self.redraw()
        self.progress.setValue(PROGRESS_STEPS)
        self.eta.setText("")
        self.stage.setText(f"Finished: {result.output_dir}")
        self.finished_dir = result.output_dir
        self.plan_chart.set_finetune_allowed(True)
        self.run_finished.emit(result)

    def _replan(self, plan: dict) -> None:
        if self.finished_dir is not None and not self.is_running():
            self.replan_requested.emit(self.finished_dir, plan)

    def on_errored(self, exc) -> None:
        self.redraw()
        self.eta.setText("")
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
        while "converged" in self.monitor.dirty:  # the timer stops now: create the lines still missing
            self.redraw()
        self.redraw_timer.stop()
        self.heartbeat.stop()
        self.cancel_button.setEnabled(False)
        self.handle = None
        self.run_stopped.emit()
