"""Export & Test page: export the student to ONNX (verified), test it on images, compare latency.

Prediction goes through :func:`kamal_engine.onnx.runtime.load_predictor`, the code ``kamal predict``
uses, so the probabilities shown here are the command's. Export and the latency measurement run in
worker threads; the page stays responsive.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QBrush, QIcon, QPixmap
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout,
                               QGroupBox, QHBoxLayout, QHeaderView, QLabel, QPushButton, QSpinBox, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from kamal_engine.data import IMAGE_EXTENSIONS, load_image
from kamal_engine.onnx.format import DEFAULT_OPSET, MIN_OPSET

from ..dialogs import show_error
from ..workers import WorkerHandle
from ..widgets import PathEdit, page_header, remember_folder, start_folder

THUMB = 48


class ExportTestPage(QWidget):
    exported = Signal(object)  # ExportResult

    def __init__(self, parent=None):
        super().__init__(parent)
        self.student_path: Path | None = None
        self.onnx_path: Path | None = None
        self.images: list[Path] = []
        self.probabilities: dict[str, list[list[float]]] = {}  # runtime → rows
        self.labels: list[str] = []
        self._predictors: dict[Path, object] = {}  # loaded models by file: switching runtimes does not reload
        self.handle: WorkerHandle | None = None
        self.setAcceptDrops(True)
        outer = QVBoxLayout(self)
        outer.addWidget(page_header("Export &amp; test"))
        self.source = QLabel("No student yet: finish a run, or open one (File → Open run results…).")
        outer.addWidget(self.source)

        box = QGroupBox("Export to ONNX")
        form = QFormLayout(box)
        self.onnx_edit = PathEdit(("save",), "ONNX models (*.onnx)")
        form.addRow("File", self.onnx_edit)
        row = QHBoxLayout()
        self.opset = QSpinBox()
        self.opset.setRange(MIN_OPSET, onnx.defs.onnx_opset_version())
        self.opset.setValue(DEFAULT_OPSET)
        row.addWidget(QLabel("Opset"))
        row.addWidget(self.opset)
        self.fp16 = QCheckBox("fp16")
        self.fp16.setToolTip("float16 weights and compute: half the size; input and outputs stay float32")
        row.addWidget(self.fp16)
        row.addStretch(1)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self.export)
        row.addWidget(self.export_button)
        form.addRow(row)
        self.export_result = QLabel()
        self.export_result.setWordWrap(True)
        self.export_result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow(self.export_result)
        outer.addWidget(box)

        box = QGroupBox("Test on images (choose them or drop them here)")
        v = QVBoxLayout(box)
        row = QHBoxLayout()
        self.add_images_button = QPushButton("Choose images…")
        self.add_images_button.clicked.connect(self.choose_images)
        row.addWidget(self.add_images_button)
        row.addStretch(1)
        self.latency_button = QPushButton("Measure latency")
        self.latency_button.clicked.connect(self.measure_latency)
        row.addWidget(self.latency_button)
        v.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Runtime"))
        self.runtime = QComboBox()
        self.runtime.addItem("ONNX Runtime (.onnx)", "onnx")
        self.runtime.addItem("PyTorch (bundle)", "torch")
        self.runtime.currentIndexChanged.connect(self.predict)
        row.addWidget(self.runtime)
        row.addWidget(QLabel("Threshold"))
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.threshold.valueChanged.connect(self._fill_table)
        row.addWidget(self.threshold)
        row.addStretch(1)
        v.addLayout(row)
        self.provider = QLabel()
        v.addWidget(self.provider)
        self.table = QTableWidget(0, 1)
        self.table.setHorizontalHeaderLabels(["image"])  # not Qt's "1" before a student is chosen
        self.table.setIconSize(QSize(THUMB, THUMB))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setDefaultSectionSize(THUMB + 6)
        v.addWidget(self.table, 1)
        self.latency = QLabel()
        v.addWidget(self.latency)
        outer.addWidget(box, 1)
        self._update_buttons()

    # --- state ---
    def set_student(self, path: Path, labels: list[str]) -> None:
        self.student_path, self.labels = Path(path), list(labels)
        self.source.setText(f"Student: {self.student_path}")
        if self.onnx_edit.path() is None:
            self.onnx_edit.set_path(self.student_path.with_name("student.onnx"))
        self.probabilities = {}
        self._predictors = {}
        self._fill_table()
        self._update_buttons()

    def _busy(self) -> bool:
        return self.handle is not None and self.handle.is_running()

    def _update_buttons(self) -> None:
        has_student = self.student_path is not None
        idle = not self._busy()
        self.export_button.setEnabled(has_student and idle)
        self.add_images_button.setEnabled(has_student)
        self.latency_button.setEnabled(has_student and self.onnx_path is not None and idle)

    def _run(self, fn, on_result, on_error_title: str) -> None:
        self.handle = WorkerHandle(lambda report, abort: fn(), self)
        self._on_result, self._error_title = on_result, on_error_title
        self.handle.worker.returned.connect(self._returned)
        self.handle.worker.errored.connect(self._errored)
        self.handle.done.connect(self._done)
        self.handle.start()
        self._update_buttons()

    def _returned(self, value) -> None:
        self._on_result(value)

    def _errored(self, exc) -> None:
        show_error(self, self._error_title, exc)

    def _done(self) -> None:
        self.handle = None
        self._update_buttons()

    def stop_and_wait(self) -> None:
        if self.handle is not None:
            self.handle.stop()

    # --- export ---
    def export(self) -> None:
        from kamal_engine.onnx.export import export_onnx
        from kamal_engine.targetnet import load_student

        path = self.onnx_edit.path()
        if self.student_path is None or path is None or self._busy():
            return
        path = path.resolve()
        student_path, opset, fp16 = self.student_path, self.opset.value(), self.fp16.isChecked()
        self.export_result.setText(f"Exporting to {path} and checking it with ONNX Runtime …")
        self._run(lambda: export_onnx(load_student(student_path), path, opset=opset, fp16=fp16),
                  self._exported, "The export failed")

    def _exported(self, result) -> None:
        self.onnx_path = result.path
        self._predictors.pop(result.path, None)  # a new file at that path
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in result.max_abs_diff.items())
        self.export_result.setText(
            f"<b>Exported</b> {result.path} ({result.size_bytes / 1e6:.2f} MB, opset {result.opset}"
            f"{', fp16' if result.fp16 else ''}, one file) · onnx.checker passed · ONNX Runtime vs PyTorch on "
            f"{result.batch} images, max |difference|: {diffs} (limit {result.tolerance:g})")
        self.exported.emit(result)
        self.predict()

    # --- test ---
    def choose_images(self) -> None:
        filters = "Images (" + " ".join(f"*{e}" for e in sorted(IMAGE_EXTENSIONS)) + ")"
        paths, _ = QFileDialog.getOpenFileNames(self, "Choose images", str(start_folder()), filters)
        remember_folder(paths[0] if paths else None)
        self.set_images([Path(p) for p in paths])

    def dragEnterEvent(self, event) -> None:
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        if urls and all(Path(u.toLocalFile()).suffix.lower() in IMAGE_EXTENSIONS for u in urls):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        paths = [Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()]
        event.acceptProposedAction()
        self.set_images(paths)

    def set_images(self, paths: list[Path]) -> None:
        if paths:
            self.images = list(paths)
            self.probabilities = {}
            self.predict()

    def current_runtime(self) -> str:
        runtime = self.runtime.currentData()
        return "torch" if runtime == "onnx" and self.onnx_path is None else runtime

    def predict(self) -> None:
        """Probabilities of every image with the chosen runtime (the code of ``kamal predict``)."""
        from kamal_engine.errors import KamalError
        from kamal_engine.onnx.runtime import load_predictor

        if not self.images or self.student_path is None:
            return
        runtime = self.current_runtime()
        try:
            path = self.onnx_path if runtime == "onnx" else self.student_path
            if path not in self._predictors:
                self._predictors[path] = load_predictor(path, "auto")
            model = self._predictors[path]
            import torch

            batch = torch.stack([load_image(p, model.preprocessing.input_size) for p in self.images])
            self.probabilities[runtime] = model.predict(batch).tolist()
        except KamalError as exc:
            show_error(self, "Cannot test these images", exc)
            return
        name = "ONNX Runtime" if runtime == "onnx" else "PyTorch"
        self.provider.setText(f"{name} on {model.provider}" + (
            "  (export first to test the ONNX file)" if runtime != self.runtime.currentData() else ""))
        self.labels = list(model.labels)
        self._fill_table()

    def _fill_table(self) -> None:
        rows = self.probabilities.get(self.current_runtime()) or []
        threshold = self.threshold.value()
        self.table.clear()
        self.table.setColumnCount(1 + len(self.labels))
        self.table.setHorizontalHeaderLabels(["image"] + self.labels)
        self.table.setRowCount(len(rows))
        highlight = self.palette().highlight()
        for r, (path, probs) in enumerate(zip(self.images, rows)):
            item = QTableWidgetItem(QIcon(QPixmap(str(path))), path.name)
            item.setToolTip(str(path))
            self.table.setItem(r, 0, item)
            for c, p in enumerate(probs, 1):
                cell = QTableWidgetItem(f"{p:.3f}")
                cell.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if p >= threshold:
                    font = cell.font()
                    font.setBold(True)
                    cell.setFont(font)
                    cell.setBackground(highlight)
                    cell.setForeground(QBrush(self.palette().highlightedText().color()))
                self.table.setItem(r, c, cell)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)

    # --- latency ---
    def measure_latency(self) -> None:
        from kamal_engine.onnx.runtime import compare_latency, latency_runners, load_onnx
        from kamal_engine.targetnet import load_student

        if self.onnx_path is None or self._busy():
            return
        student_path, onnx_path = self.student_path, self.onnx_path
        self.latency.setText("Measuring (batch 1, interleaved) …")

        def work():
            session = load_onnx(onnx_path, "auto")
            timings = compare_latency(latency_runners(load_student(student_path), session, 1), rounds=5, per_round=10)
            return timings, session.provider

        self._run(work, self._latency_measured, "The latency measurement failed")

    def _latency_measured(self, value) -> None:
        timings, provider = value
        o, t = timings["onnxruntime"]["median_ms"], timings["pytorch"]["median_ms"]
        self.latency.setText(f"Latency, batch 1 (median of {timings['pytorch']['calls']}): ONNX Runtime "
                             f"<b>{o:.2f} ms</b> ({provider}) · PyTorch eager <b>{t:.2f} ms</b> (CPU) · "
                             f"ratio {o / t:.2f}")
