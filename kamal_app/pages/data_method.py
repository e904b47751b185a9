"""Data & method page: the mode and its data, the method and its hyper-parameters, device and output."""

from __future__ import annotations

import math
from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QPixmap
from PySide6.QtWidgets import (QButtonGroup, QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox,
                               QLabel, QLineEdit, QListView, QListWidget, QListWidgetItem, QRadioButton, QScrollArea,
                               QSpinBox, QVBoxLayout, QWidget)

from kamal_engine.backbones import ARCHITECTURES
from kamal_engine.data import list_images
from kamal_engine.devices import device_choice_key, device_choices, parse_device_choice
from kamal_engine.errors import KamalError
from kamal_engine.methods import Param, get_method

from ..session import StudioSession, method_ids
from ..widgets import Columns, PathEdit, page_header, remember_folder, start_folder

THUMBNAILS = 8


def param_widget(param: Param, value) -> QWidget:
    """An editor for one hyper-parameter, typed by its default."""
    if param.choices is not None:
        widget = QComboBox()
        widget.addItems([str(c) for c in param.choices])
        widget.setCurrentText(str(value))
    elif isinstance(param.default, bool):
        widget = QCheckBox()
        widget.setChecked(bool(value))
    elif isinstance(param.default, dict):
        widget = MappingEdit(dict(value))
    elif isinstance(param.default, int):
        widget = QSpinBox()
        widget.setRange(int(param.minimum) if param.minimum is not None else -10**9,
                        int(param.maximum) if param.maximum is not None else 10**9)
        widget.setValue(int(value))
    else:
        widget = FloatEdit(float(value), param.minimum, param.maximum)
    widget.setToolTip(param.help)
    return widget


class FloatEdit(QLineEdit):
    """A number field showing values compactly (0.01, 5e-3); ``valueChanged`` after a valid edit."""

    valueChanged = Signal(float)

    def __init__(self, value: float, minimum: float | None = None, maximum: float | None = None):
        super().__init__(f"{value:g}")
        self._value, self.minimum, self.maximum = value, minimum, maximum
        self.editingFinished.connect(self._finished)

    def value(self) -> float:
        return self._value

    def _finished(self) -> None:
        try:
            value = float(self.text())
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or (self.minimum is not None and value < self.minimum)
                or (self.maximum is not None and value > self.maximum)):
            self.setText(f"{self._value:g}")  # back to the last good value
            return
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)
        self.setText(f"{value:g}")


class MappingEdit(QLineEdit):
    """``label=block, label=block`` for a mapping parameter (branch_at); ``valueChanged`` after a valid edit
    (a malformed entry puts the last good value back)."""

    valueChanged = Signal(dict)

    def __init__(self, value: dict):
        super().__init__(self.format(value))
        self._value = dict(value)
        self.setPlaceholderText("none (e.g. one=b3, eight=b4)")
        self.editingFinished.connect(self._finished)

    @staticmethod
    def format(value: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in value.items())

    def value(self) -> dict:
        return dict(self._value)

    def _finished(self) -> None:
        from kamal_engine.replan import parse_branch_at_args

        try:
            value = parse_branch_at_args([self.text()]) or {}
        except KamalError:
            self.setText(self.format(self._value))
            return
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)
        self.setText(self.format(value))


def param_value(param: Param, widget: QWidget):
    if param.choices is not None:
        return type(param.default)(widget.currentText())
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    return widget.value()


class DataMethodPage(QWidget):
    def __init__(self, session: StudioSession, parent=None):
        super().__init__(parent)
        self.session = session
        self._loading = False
        self._pushing = False  # the session changes because of an edit here: do not rebuild the editors
        self._built_method: str | None = None
        self._thumb_folder: Path | None = None
        self._param_widgets: dict[str, tuple[Param, QWidget]] = {}
        outer = QVBoxLayout(self)
        outer.addWidget(page_header(
            "Data &amp; method", "Where the knowledge flows through: unlabeled images (or none), the amalgamation "
            "method and its settings, and where the run goes."))
        scroll = QScrollArea()
        outer.addWidget(scroll, 1)
        self.body = Columns()  # two columns, or one above the other in a narrow window
        self.body.in_scroll_area(scroll)
        left, right = self.body.left, self.body.right

        # --- data ---
        data_box = QGroupBox("Data")
        form = QFormLayout(data_box)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.mode_data = QRadioButton("Folder of unlabeled images")
        self.mode_free = QRadioButton("Data-free (no images: a generator synthesises them)")
        group = QButtonGroup(self)
        group.addButton(self.mode_data)
        group.addButton(self.mode_free)
        self.mode_data.toggled.connect(self._mode_changed)
        form.addRow(self.mode_data)
        form.addRow(self.mode_free)
        self.unlabeled = PathEdit(("folder",), placeholder="a folder of images (searched recursively)")
        self.unlabeled.edited.connect(self._unlabeled_changed)
        form.addRow("Unlabeled images", self.unlabeled)
        self.image_count = QLabel()
        form.addRow("", self.image_count)
        self.thumbnails = QListWidget()
        self.thumbnails.setViewMode(QListView.ViewMode.IconMode)
        self.thumbnails.setFlow(QListView.Flow.LeftToRight)
        self.thumbnails.setWrapping(False)
        self.thumbnails.setIconSize(QSize(56, 56))
        self.thumbnails.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.thumbnails.setFixedHeight(56 + self.style().pixelMetric(self.style().PixelMetric.PM_ScrollBarExtent)
                                       + 4 * self.thumbnails.frameWidth() + 12)
        self.thumbnails.setSelectionMode(QListWidget.SelectionMode.NoSelection)
        form.addRow("", self.thumbnails)
        self.validation = PathEdit(("file", "folder"), "Labelled CSV (*.csv);;All files (*)",
                                   placeholder="optional: CSV (multi-label) or class folders")
        self.validation.edited.connect(self._validation_changed)
        form.addRow("Validation set", self.validation)
        left.addWidget(data_box)

        # --- run ---
        run_box = QGroupBox("Run")
        form = QFormLayout(run_box)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.run_name = QLineEdit()
        self.run_name.editingFinished.connect(self._run_changed)
        form.addRow("Name", self.run_name)
        self.student_arch = QComboBox()
        self.student_arch.addItem("same as the teacher it starts from", None)
        for name in ARCHITECTURES:
            self.student_arch.addItem(name, name)
        self.student_arch.currentIndexChanged.connect(self._run_changed)
        form.addRow("Student architecture", self.student_arch)
        self.student_init = QComboBox()
        self.student_init.setToolTip("The papers start the student from ImageNet weights: choose such a file of the "
                                     "student's architecture with 'weights from a file…'")
        self.student_init.currentIndexChanged.connect(self._run_changed)
        form.addRow("Student starts from", self.student_init)
        self.device = QComboBox()
        for key, text in device_choices():
            self.device.addItem(text, key)
        self.device.setToolTip("Where the run trains; with several GPUs, 'all N GPUs' runs one process per GPU "
                               "(distributed data parallel, as kamal run --nproc N)")
        self.device.currentIndexChanged.connect(self._run_changed)
        form.addRow("Device", self.device)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.valueChanged.connect(self._run_changed)
        form.addRow("Seed", self.seed)
        self.output = PathEdit(("folder",), placeholder="folder for the student, report and checkpoints")
        self.output.edited.connect(self._run_changed)
        form.addRow("Output folder", self.output)
        left.addWidget(run_box)
        left.addStretch(1)

        # --- method ---
        method_box = QGroupBox("Method")
        v = QVBoxLayout(method_box)
        self.methods = QListWidget()
        self.methods.setWordWrap(True)  # long titles wrap instead of scrolling sideways
        self.methods.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.methods.setFixedHeight(self.fontMetrics().lineSpacing() * 6 + 4 * self.methods.frameWidth())
        self.methods.currentItemChanged.connect(self._method_changed)
        v.addWidget(self.methods)
        self.method_info = QLabel()
        self.method_info.setWordWrap(True)
        self.method_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        v.addWidget(self.method_info)
        params_box = QGroupBox("Hyper-parameters")
        params_layout = QVBoxLayout(params_box)
        note = QLabel("Defaults: the paper's where it gives them. Each field's tooltip says what it does.")
        note.setWordWrap(True)
        params_layout.addWidget(note)
        self.params_form = QFormLayout()
        self.params_form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        params_layout.addLayout(self.params_form)
        v.addWidget(params_box)
        right.addWidget(method_box)
        right.addStretch(1)

        session.changed.connect(self.refresh)
        self.refresh()

    # --- session → widgets ---
    def refresh(self) -> None:
        s, r = self.session, self.session.recipe
        if self._pushing:  # an edit made here: the editors already show it
            self._loading = True
            try:
                self.unlabeled.setEnabled(r.mode == "data")
                self._update_thumbnails(r.unlabeled if r.mode == "data" else None)
                self._fill_methods(rebuild=False)
            finally:
                self._loading = False
            return
        self._loading = True
        try:
            (self.mode_data if r.mode == "data" else self.mode_free).setChecked(True)
            self.unlabeled.set_path(r.unlabeled)
            self.unlabeled.setEnabled(r.mode == "data")
            self._update_thumbnails(r.unlabeled if r.mode == "data" else None)
            self.validation.set_path(r.validation)
            self.run_name.setText(r.name)
            self.student_arch.setCurrentIndex(max(0, self.student_arch.findData(r.student_arch)))
            self.student_init.clear()  # item data are strings: QComboBox.findData compares tuples by identity
            for n, t in enumerate(s.teachers, 1):
                self.student_init.addItem(f"teacher {n}: {t.name}'s weights", f"teacher:{n}")
            self.student_init.addItem("random initialisation", "random")
            if r.student_checkpoint is not None:
                self.student_init.addItem(f"weights file: {r.student_checkpoint.name}", "checkpoint")
                self.student_init.setItemData(self.student_init.count() - 1, str(r.student_checkpoint),
                                              Qt.ItemDataRole.ToolTipRole)
            self.student_init.addItem("weights from a file…", "browse")
            wanted = f"teacher:{r.student_teacher}" if r.student_init == "teacher" else r.student_init
            self.student_init.setCurrentIndex(max(0, self.student_init.findData(wanted)))
            key = device_choice_key(r.device, r.nproc)
            index = self.device.findData(key)
            if index < 0:  # e.g. a recipe for cuda:1 opened on a machine without it: show it anyway
                if r.device == "cpu" and r.nproc > 1:  # a recipe's CPU processes (kamal run --nproc on the CPU)
                    self.device.addItem(f"CPU, {r.nproc} processes (distributed data parallel)", key)
                else:
                    shown = r.device if r.nproc == 1 else f"{r.device}, {r.nproc} processes"
                    self.device.addItem(f"{shown} (not available here)", key)
                index = self.device.count() - 1
            self.device.setCurrentIndex(index)
            self.seed.setValue(r.seed)
            self.output.set_path(r.output_dir)
            self._fill_methods()
        finally:
            self._loading = False

    def _fill_methods(self, rebuild: bool = True) -> None:
        ids = method_ids(self.session.recipe.mode)
        current = [self.methods.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.methods.count())]
        if current != ids:
            self.methods.clear()
            for method_id in ids:
                m = get_method(method_id)
                item = QListWidgetItem(f"{m.title}  ·  {m.id}")
                item.setData(Qt.ItemDataRole.UserRole, m.id)
                item.setToolTip(f"{m.summary}\n\n{m.paper}")
                self.methods.addItem(item)
        if not ids:
            self.method_info.setText(f"No {self.session.recipe.mode} method is available in this version.")
            self._built_method = None
            self._build_params(None)
            return
        for i in range(self.methods.count()):
            if self.methods.item(i).data(Qt.ItemDataRole.UserRole) == self.session.recipe.method:
                self.methods.setCurrentRow(i)
                break
        else:
            self.methods.setCurrentRow(-1)
        chosen = self.session.recipe.method if self.session.recipe.method in ids else None
        if rebuild or chosen != self._built_method:
            self._show_method(chosen)

    def _show_method(self, method_id: str | None) -> None:
        self._built_method = method_id
        if method_id is None:
            self.method_info.setText("Choose a method.")
            self._build_params(None)
            return
        m = get_method(method_id)
        self.method_info.setText(f"{m.summary}<br><i>{m.paper}</i>")
        self._build_params(m)

    def _build_params(self, method) -> None:
        while self.params_form.rowCount():
            self.params_form.removeRow(0)
        self._param_widgets = {}
        if method is None:
            return
        for param in method.params:
            widget = param_widget(param, self.session.recipe.params.get(param.name, param.default))
            label = QLabel(param.name.replace("_", " "))
            label.setToolTip(param.help)
            self.params_form.addRow(label, widget)
            self._param_widgets[param.name] = (param, widget)
            signal = (widget.currentIndexChanged if isinstance(widget, QComboBox) else
                      widget.toggled if isinstance(widget, QCheckBox) else widget.valueChanged)
            signal.connect(lambda *args, name=param.name: self._param_changed(name))

    def _update_thumbnails(self, folder: Path | None) -> None:
        if folder == self._thumb_folder:
            return
        self._thumb_folder = folder
        self.thumbnails.clear()
        if folder is None:
            self.image_count.setText("" if self.session.recipe.mode == "data" else "Not needed in data-free mode.")
            return
        try:
            images = list_images(folder)
        except KamalError as exc:
            self.image_count.setText(f"<span style='color: palette(link)'>{' '.join(str(exc).split())}</span>")
            return
        self.image_count.setText(f"{len(images):,} images")
        for path in images[:THUMBNAILS]:
            pixmap = QPixmap(str(path))
            if not pixmap.isNull():
                item = QListWidgetItem(QIcon(pixmap), "")
                item.setToolTip(path.name)
                self.thumbnails.addItem(item)

    # --- widgets → session ---
    def _push(self) -> None:
        self._pushing = True
        try:
            self.session.notify()
        finally:
            self._pushing = False

    def _mode_changed(self, data_checked: bool) -> None:
        if self._loading:
            return
        self.session.set_mode("data" if data_checked else "data-free")
        self._push()

    def _unlabeled_changed(self, path) -> None:
        if not self._loading:
            self.session.edit(unlabeled=path.resolve() if path else None)
            self._push()

    def _validation_changed(self, path) -> None:
        if not self._loading:
            self.session.edit(validation=path.resolve() if path else None)
            self._push()

    def _method_changed(self, item, previous=None) -> None:
        if self._loading or item is None:
            return
        method_id = item.data(Qt.ItemDataRole.UserRole)
        if method_id != self.session.recipe.method:
            self.session.set_method(method_id)
            self._push()

    def _param_changed(self, name: str) -> None:
        if self._loading:
            return
        param, widget = self._param_widgets[name]
        self.session.set_param(name, param_value(param, widget))
        self._push()

    def _run_changed(self, *args) -> None:
        if self._loading:
            return
        s, r = self.session, self.session.recipe
        init, _, teacher = (self.student_init.currentData() or "teacher:1").partition(":")
        teacher = int(teacher) if teacher else r.student_teacher
        checkpoint, browsed = r.student_checkpoint, init == "browse"
        if browsed:  # ask for the file; cancelling keeps what was chosen before
            chosen, _ = QFileDialog.getOpenFileName(
                self, "Weights to start the student from", str(start_folder(checkpoint)),
                "Checkpoints (*.pt *.pth *.safetensors *.bin *.ckpt);;All files (*)")
            remember_folder(chosen)
            if not chosen:
                self.refresh()  # the combo shows the previous choice again
                return
            init, teacher, checkpoint = "checkpoint", r.student_teacher, Path(chosen).resolve()
        device, nproc = parse_device_choice(self.device.currentData())
        s.edit(name=self.run_name.text().strip() or r.name, student_arch=self.student_arch.currentData(),
               student_init=init, student_teacher=teacher, student_checkpoint=checkpoint,
               device=device, nproc=nproc, seed=self.seed.value())
        out = self.output.path()
        s.set_output_dir(out.resolve() if out else None)
        if browsed:
            self.refresh()  # the combo shows the file
        self._push()
