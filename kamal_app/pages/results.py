"""Results page: the branched TargetNet as a diagram, AP per label vs the teachers, its parameters and FLOPs
as a share of the teachers', the size/quality chart of the run's branch plans (a plan clicked there can be
fine-tuned from the run's trained blocks), Save student."""

from __future__ import annotations

import html
import json
from pathlib import Path

from PySide6.QtCore import QRectF, QSize, Qt, Signal
from PySide6.QtGui import QPainter, QPen
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QPushButton,
                               QScrollArea, QSizePolicy, QTableWidget, QTableWidgetItem, QTabWidget, QVBoxLayout,
                               QWidget)

from kamal_engine.targetnet import Student, load_student

from ..plan_chart import PlanChart
from ..widgets import page_header, remember_folder, start_path


class TargetNetDiagram(QWidget):
    """Shared trunk blocks left to right; each branch leaves its block downwards: filter (if any) → tail → labels."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.layout_info: dict | None = None
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_layout_info(self, info: dict | None) -> None:
        """``info``: ``TargetNet.describe()`` plus, per branch, ``tail`` (block names after the branch)."""
        self.layout_info = info
        self.updateGeometry()
        self.update()

    def _metrics(self):
        fm = self.fontMetrics()
        return fm, fm.height() * 2, fm.averageCharWidth() * 6, fm.height()  # font, box height, box width, gap

    def sizeHint(self) -> QSize:
        fm, box_h, box_w, gap = self._metrics()
        n = len(self.layout_info["branches"]) if self.layout_info else 0
        width = max(400, (len(self.layout_info["trunk"]) if self.layout_info else 4) * (box_w + gap) + 40 * gap)
        return QSize(width, box_h + gap * 2 + n * (box_h + gap) + gap)

    def paintEvent(self, event) -> None:
        if not self.layout_info:
            return
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        pal = self.palette()
        fm, box_h, box_w, gap = self._metrics()
        trunk = self.layout_info["trunk"]
        x0, y0 = gap, gap
        centers = {}
        p.setPen(QPen(pal.text().color()))
        p.drawText(QRectF(x0, 0, 400, gap), Qt.AlignmentFlag.AlignLeft, "shared trunk")
        for i, name in enumerate(trunk):
            rect = QRectF(x0 + i * (box_w + gap), y0, box_w, box_h)
            p.setBrush(pal.highlight())
            p.setPen(QPen(pal.highlight().color().darker(130)))
            p.drawRoundedRect(rect, 4, 4)
            p.setPen(QPen(pal.highlightedText().color()))
            p.drawText(rect, Qt.AlignmentFlag.AlignCenter, name)
            if i:
                p.setPen(QPen(pal.text().color(), 1.5))
                p.drawLine(int(rect.left() - gap), int(rect.center().y()), int(rect.left()), int(rect.center().y()))
            centers[name] = rect
        for j, branch in enumerate(self.layout_info["branches"]):
            start = centers.get(branch["block"])
            if start is None:
                continue
            y = y0 + box_h + gap + j * (box_h + gap)
            tail = branch.get("tail") or []
            gate = "" if branch.get("filter") == "identity" else "filter → "  # unbranched students have none
            text = (f"{gate}{branch['source']} " + (f"{tail[0]}…{tail[-1]} " if len(tail) > 1 else
                                                       f"{tail[0]} " if tail else "") + "+ head")
            rect = QRectF(start.left() + box_w / 2 + gap, y, fm.horizontalAdvance(text) + gap, box_h)
            p.setPen(QPen(pal.text().color(), 1.5))
            p.drawLine(int(start.center().x()), int(start.bottom()), int(start.center().x()), int(rect.center().y()))
            p.drawLine(int(start.center().x()), int(rect.center().y()), int(rect.left()), int(rect.center().y()))
            p.setBrush(pal.button())
            p.setPen(QPen(pal.mid().color()))
            p.drawRoundedRect(rect, 4, 4)
            p.setPen(QPen(pal.buttonText().color()))
            p.drawText(rect, Qt.AlignmentFlag.AlignCenter, text)
            p.setPen(QPen(pal.text().color()))
            labels = ", ".join(branch["labels"])
            p.drawText(QRectF(rect.right() + gap, y, self.width() - rect.right() - 2 * gap, box_h),
                       Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft, f"→ {labels}")
        p.end()


def diagram_info(student: Student) -> dict:
    """``TargetNet.describe()`` with each branch's tail named (``b2``… at stage granularity)."""
    info = student.net.describe()
    for branch, spec, module in zip(info["branches"], student.net.specs, student.net.branches):
        n = len(module.tail)
        if spec.granularity == "stage":
            branch["tail"] = [f"b{k}" for k in range(spec.block + 1, spec.block + n + 1)]
        else:
            branch["tail"] = [f"{n} units"] if n else []
    return info


class ResultsPage(QWidget):
    student_saved = Signal(object)
    replan_requested = Signal(object, dict)  # this run's folder, the plan to build from its trained blocks

    def __init__(self, parent=None):
        super().__init__(parent)
        self.student: Student | None = None
        self.report: dict | None = None
        self.output_dir: Path | None = None
        outer = QVBoxLayout(self)
        outer.addWidget(page_header("Results"))
        self.summary = QLabel("No results yet: finish a run on the Train page, or open one (File → Open run results…).")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        outer.addWidget(self.summary)
        self.diagram_scroll = QScrollArea()
        self.diagram_scroll.setWidgetResizable(True)
        self.diagram = TargetNetDiagram()
        self.diagram_scroll.setWidget(self.diagram)
        self.diagram_scroll.setMaximumHeight(self.fontMetrics().height() * 16)
        outer.addWidget(self.diagram_scroll)
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["Label", "From teacher", "Teacher AP", "Student AP", "Difference"])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.plan_chart = PlanChart(side_by_side=True)  # the run's branch plans (block-wise methods)
        self.plan_chart.set_finetune_allowed(True)
        self.plan_chart.finetune_requested.connect(
            lambda plan: self.output_dir is not None and self.replan_requested.emit(self.output_dir, plan))
        self.tabs = QTabWidget()  # the AP table, and the plans' chart where the method branches out
        self.tabs.addTab(self.table, "Per label")
        self.tabs.addTab(self.plan_chart, "Size / quality")
        self.tabs.setTabVisible(1, False)
        outer.addWidget(self.tabs, 1)
        self.sizes = QLabel()
        self.sizes.setWordWrap(True)
        outer.addWidget(self.sizes)
        row = QHBoxLayout()
        row.addStretch(1)
        self.save_button = QPushButton("Save student…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self.save_student_dialog)
        row.addWidget(self.save_button)
        outer.addLayout(row)

    def set_result(self, output_dir: Path, student: Student, report: dict) -> None:
        self.output_dir, self.student, self.report = Path(output_dir), student, report
        self.diagram.set_layout_info(diagram_info(student))
        self.diagram_scroll.setMinimumHeight(min(self.diagram.sizeHint().height() + 2 * self.diagram_scroll.frameWidth(),
                                                 self.diagram_scroll.maximumHeight()))
        plan = report.get("branch_points") or {}
        self.summary.setText(
            f"<b>{report.get('method')}</b> run in {self.output_dir} · {len(student.labels)} labels · "
            + ("branch points: " + ", ".join(f"{k} → {v}" for k, v in plan.items()) if plan else "no branch-out")
            + (f" · {report['seconds']:.0f} s" if report.get("seconds") else ""))
        val = report.get("validation") or {}
        teacher_ap: dict[str, tuple[str, float | None]] = {}  # label -> the best teacher's (name, AP)
        for name, t in (val.get("teachers") or {}).items():
            for label, ap in (t.get("ap") or {}).items():
                if label not in teacher_ap or (ap is not None and (teacher_ap[label][1] or -1.0) < ap):
                    teacher_ap[label] = (name, ap)
        student_ap = ((val.get("student") or {}).get("ap")) or {}
        tasks = {label: ", ".join(t.get("teachers") or [t["teacher"]]) for t in report.get("tasks", [])
                 for label in t["labels"]}
        size = report.get("size") or {}
        self.table.setRowCount(len(student.labels) + (3 if size else 1))
        for row, label in enumerate(student.labels):
            _, t_ap = teacher_ap.get(label, (None, None))
            s_ap = student_ap.get(label)
            diff = None if t_ap is None or s_ap is None else s_ap - t_ap
            self._row(row, [label, tasks.get(label, ""), _fmt(t_ap), _fmt(s_ap), _signed(diff)])
        s_map = (val.get("student") or {}).get("mean_ap")
        t_vals = [teacher_ap[label][1] for label in student.labels if label in teacher_ap and teacher_ap[label][1] is not None]
        t_mean = sum(t_vals) / len(t_vals) if t_vals else None
        self._row(len(student.labels), ["mAP", "", _fmt(t_mean), _fmt(s_map),
                                        _signed(None if t_mean is None or s_map is None else s_map - t_mean)],
                  bold=True)
        if size:  # the TargetNet's cost beside the teachers' (those it learns from)
            used = {t for task in report.get("tasks", []) for t in task.get("teachers") or [task["teacher"]]}
            teachers = {k: v for k, v in (size.get("teachers") or {}).items() if k in used or not used}
            for row, (key, name, unit) in enumerate((("parameters", "Parameters", 1), ("flops", "FLOPs / image", 1e6)),
                                                    len(student.labels) + 1):
                t_sum = sum(v[key] for v in teachers.values())
                own = size["student"][key]
                text = (lambda v: f"{v:,}") if unit == 1 else (lambda v: f"{v / unit:.1f} M")
                self._row(row, [name, "sum of the teachers", text(t_sum), text(own),
                                f"{own / t_sum:.2f} ×" if t_sum else ""])
        plan = report.get("branch_plan") or {}
        self.tabs.setTabVisible(1, bool(plan.get("plans")))
        if plan.get("plans"):
            budget = plan.get("budget_parameters")
            self.plan_chart.set_plans(plan["plans"], plan["plans"].index(plan["chosen"])
                                      if plan.get("chosen") in plan["plans"] else None,
                                      None if budget is None else budget / max(plan.get("teachers_parameters") or 1, 1))
        if not val:
            self.summary.setText(self.summary.text() + " · no validation set: AP not measured")
        if size:
            teachers = size.get("teachers", {})
            t_params = sum(v["parameters"] for v in teachers.values())
            t_flops = sum(v["flops"] for v in teachers.values())
            s = size["student"]
            self.sizes.setText(
                f"Student: <b>{s['parameters']:,}</b> parameters, {s['flops'] / 1e6:.1f} MFLOPs per image · "
                f"teachers: {t_params:,} parameters, {t_flops / 1e6:.1f} MFLOPs (sum) · "
                f"student / teachers: <b>{size.get('student_vs_teachers_parameters', 0):.2f} ×</b> the parameters"
                + (f", <b>{size['student_vs_teachers_flops']:.2f} ×</b> the FLOPs" if "student_vs_teachers_flops" in size
                   else ""))
        if report.get("profile"):  # where the run's time went
            from kamal_engine.profiling import summary

            self.sizes.setText(self.sizes.text() + "<br>" + html.escape(summary(report["profile"])))
        warnings = (report.get("diagnosis") or {}).get("warnings") or []
        if warnings:  # a teacher whose knowledge did not get through (filtered-ka's diagnosis)
            self.sizes.setText(self.sizes.text() + "".join(f"<br><span style='color:#8a6d00'>⚠ {html.escape(w)}</span>"
                                                           for w in warnings))
        self.save_button.setEnabled(True)

    def load_run(self, folder: Path) -> None:
        """A finished run's folder (``report.json`` + ``student.kamal.pt``)."""
        folder = Path(folder)
        report = json.loads((folder / "report.json").read_text())
        self.set_result(folder, load_student(folder / "student.kamal.pt"), report)

    def _row(self, row: int, values, bold: bool = False) -> None:
        for col, value in enumerate(values):
            item = QTableWidgetItem(value)
            if col >= 2:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            if bold:
                font = item.font()
                font.setBold(True)
                item.setFont(font)
            self.table.setItem(row, col, item)

    def save_student_dialog(self) -> None:
        if self.student is None:
            return
        start = start_path(self.output_dir / "student.kamal.pt" if self.output_dir else None)
        path, _ = QFileDialog.getSaveFileName(self, "Save student", start, "Student bundles (*.kamal.pt *.pt)")
        remember_folder(path)
        if path:
            self.save_student(Path(path))

    def save_student(self, path: Path) -> Path:
        saved = self.student.save(path)
        self.student_saved.emit(saved)
        return saved


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _signed(value) -> str:
    return "" if value is None else f"{value:+.4f}"
