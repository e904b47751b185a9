"""The size/quality chart of the branch plans (Train and Results pages).

Every plan the engine measured is a point: its TargetNet's parameters as a multiple of the teachers'
(x) against its total converged loss, or against its mAP before fine-tuning where a validation set
measured the AP of every block (y). The Pareto front (no other plan is both smaller and better) is the
line, the chosen plan the star, the budget (``max_params``) a dashed line. Clicking a point shows its
plan; "Fine-tune this plan" asks the owner to build it from the run's trained blocks (``kamal replan``).
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

QUALITIES = {"loss": "total converged loss", "mean_ap": "mAP before fine-tuning (%)"}
SCALE = {"loss": 1.0, "mean_ap": 100.0}  # mAP drawn in %, as the tables show it
AXIS = {"loss": "converged loss", "mean_ap": "mAP (%)"}  # short: the axis is as high as the plot


def front_of(xs, ys, higher_better: bool) -> list[int]:
    """Indices of the points no other point beats in both x (smaller) and y, smallest x first; points
    whose y is not a number are left out."""
    order = sorted((i for i in range(len(xs)) if ys[i] is not None and math.isfinite(ys[i])),
                   key=lambda i: (xs[i], -ys[i] if higher_better else ys[i]))
    out, best = [], -math.inf if higher_better else math.inf
    for i in order:
        if (ys[i] > best) if higher_better else (ys[i] < best):
            out.append(i)
            best = ys[i]
    return out


def describe_plan(row: dict) -> str:
    """A plan in a sentence: its blocks (labels grouped by block), size and quality."""
    by_block: dict[str, list[str]] = {}
    for task, block in row["plan"].items():
        by_block.setdefault(block, []).append(task)
    blocks = "; ".join(f"{block}: {', '.join(tasks)}" for block, tasks in sorted(by_block.items()))
    quality = f"converged loss {row['loss']:.4f}"
    if row.get("mean_ap") is not None:
        quality += f", mAP before fine-tuning {100 * row['mean_ap']:.2f} %"
    return f"<b>{row['parameters']:,}</b> parameters ({row['fraction']:.2f} × the teachers') · {quality}<br>{blocks}"


class PlanChart(QWidget):
    """Every branch plan as a point; ``finetune_requested(plan)`` (task → block name) from the button."""

    finetune_requested = Signal(dict)

    def __init__(self, parent=None, side_by_side: bool = False):
        """``side_by_side``: the plan's text and the button beside the plot (a wide, low place) instead of
        below it."""
        super().__init__(parent)
        self.rows: list[dict] = []
        self.chosen: int | None = None
        self.budget: float | None = None  # as a fraction of the teachers' parameters
        self.selected: int | None = None
        self.front: list[int] = []
        self._allowed, self._why = False, "Fine-tuning another plan needs a finished run."
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        top = QHBoxLayout()
        top.addWidget(QLabel("Quality:"))
        self.quality = QComboBox()
        self.quality.setToolTip("what the y axis shows: the total converged loss of the plan's tasks (lower is "
                                "better), or its mAP before fine-tuning (with a validation set)")
        self.quality.currentIndexChanged.connect(lambda *_: self.redraw())
        top.addWidget(self.quality, 1)
        layout.addLayout(top)
        self.plot = pg.PlotWidget(background=None)
        item = self.plot.getPlotItem()
        item.setLabel("bottom", "parameters (× the teachers')")
        item.showGrid(x=True, y=True, alpha=0.25)
        for side in ("left", "bottom"):  # plain numbers: no "(x0.001)" prefix on the axis
            item.getAxis(side).enableAutoSIPrefix(False)
        item.setTitle("Branch plans · ★ chosen", color=self.palette().text().color().name())
        self.plot.setMinimumHeight(self.fontMetrics().height() * 8)
        self.points = pg.ScatterPlotItem(size=7, pen=pg.mkPen(None), brush=pg.mkBrush(90, 120, 200, 150))
        self.points.sigClicked.connect(self._clicked)
        self.line = pg.PlotDataItem(pen=pg.mkPen((220, 120, 0), width=2))
        self.star = pg.ScatterPlotItem(size=16, symbol="star", pen=pg.mkPen("k"), brush=pg.mkBrush(250, 200, 0))
        self.ring = pg.ScatterPlotItem(size=14, symbol="o", pen=pg.mkPen((200, 0, 0), width=2), brush=None)
        self.budget_line = pg.InfiniteLine(angle=90, pen=pg.mkPen((120, 120, 120), style=Qt.PenStyle.DashLine))
        for part in (self.line, self.points, self.star, self.ring, self.budget_line):
            item.addItem(part)
        self.budget_line.setVisible(False)
        self.info = QLabel("No branch plans yet: they are measured once every block is trained.")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.info.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.button = QPushButton("Fine-tune this plan")
        self.button.setToolTip("build this plan's TargetNet from the run's trained blocks and fine-tune it, in a new "
                               "run folder beside the run (kamal replan); the run itself is kept as it is")
        self.button.setEnabled(False)
        self.button.clicked.connect(self._finetune)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.button)
        if side_by_side:
            body, side = QHBoxLayout(), QVBoxLayout()
            body.addWidget(self.plot, 3)
            side.addWidget(self.info, 1)
            side.addLayout(row)
            body.addLayout(side, 2)
            layout.addLayout(body, 1)
        else:
            layout.addWidget(self.plot, 1)
            layout.addWidget(self.info)
            layout.addLayout(row)

    # --- data ---
    def clear(self) -> None:
        self.quality.blockSignals(True)
        self.quality.clear()  # the next plans show mAP where measured
        self.quality.blockSignals(False)
        self.set_plans([], None, None)
        self.info.setText("No branch plans yet: they are measured once every block is trained.")

    def set_plans(self, rows: list[dict], chosen: int | None, budget_fraction: float | None) -> None:
        """The plans (``report.json`` → ``branch_plan.plans`` rows), the chosen one's index, the budget."""
        self.rows, self.chosen, self.budget, self.selected = list(rows), chosen, budget_fraction, None
        measured = any(r.get("mean_ap") is not None for r in self.rows)
        current = self.quality.currentData() if self.quality.count() > 1 else None  # what the user chose
        self.quality.blockSignals(True)
        self.quality.clear()
        for key in (("mean_ap", "loss") if measured else ("loss",)):
            self.quality.addItem(QUALITIES[key], key)
        if current is not None and self.quality.findData(current) >= 0:
            self.quality.setCurrentIndex(self.quality.findData(current))
        self.quality.blockSignals(False)
        if self.rows and chosen is not None:
            self.info.setText(f"{len(self.rows)} plans. Chosen: {describe_plan(self.rows[chosen])}"
                              "<br>Click a point to see its plan.")
        self.redraw()
        self._update_button()

    def set_finetune_allowed(self, allowed: bool, why: str = "") -> None:
        self._allowed, self._why = allowed, why
        self._update_button()

    # --- drawing ---
    def key(self) -> str:
        return self.quality.currentData() or "loss"

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        key = self.key()
        xs = np.array([r["fraction"] for r in self.rows], dtype=np.float64)
        ys = np.array([math.nan if r.get(key) is None else SCALE[key] * float(r[key]) for r in self.rows],
                      dtype=np.float64)
        return xs, ys

    def redraw(self) -> None:
        xs, ys = self.values()
        key = self.key()
        self.plot.getPlotItem().setLabel("left", AXIS[key])
        ok = np.isfinite(xs) & np.isfinite(ys)
        index = np.flatnonzero(ok)
        self.points.setData(x=xs[ok], y=ys[ok], data=list(index))
        front = front_of(list(xs), [None if not math.isfinite(y) else y for y in ys], higher_better=key == "mean_ap")
        self.line.setData(x=xs[front], y=ys[front]) if front else self.line.setData([], [])
        marked = [] if self.chosen is None or not ok[self.chosen] else [self.chosen]
        self.star.setData(x=xs[marked], y=ys[marked])
        picked = [] if self.selected is None or not ok[self.selected] else [self.selected]
        self.ring.setData(x=xs[picked], y=ys[picked])
        self.budget_line.setVisible(self.budget is not None and bool(self.rows))
        if self.budget is not None:
            self.budget_line.setValue(float(self.budget))
        self.front = front

    def select(self, index: int) -> None:
        """Show plan ``index`` (what a click on its point does)."""
        self.selected = index
        row = self.rows[index]
        where = " (the chosen plan)" if index == self.chosen else (" · on the front" if index in self.front else "")
        self.info.setText(describe_plan(row) + where)
        self.redraw()
        self._update_button()

    def _clicked(self, item, points, *args) -> None:
        if len(points):
            self.select(int(points[0].data()))

    def _update_button(self) -> None:
        can = self._allowed and self.selected is not None and self.selected != self.chosen
        self.button.setEnabled(can)
        self.button.setToolTip(self._why if not self._allowed else
                               "build this plan's TargetNet from the run's trained blocks and fine-tune it, in a "
                               "new run folder beside the run (kamal replan); the run itself is kept as it is")

    def _finetune(self) -> None:
        if self.selected is not None:
            self.finetune_requested.emit(dict(self.rows[self.selected]["plan"]))
