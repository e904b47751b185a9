"""Dialogs: importing a foreign checkpoint, and errors shown as sentences."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (QButtonGroup, QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QMessageBox,
                               QPlainTextEdit, QRadioButton, QSpinBox, QVBoxLayout, QWidget)

from kamal_engine.backbones import ARCHITECTURES, get_architecture
from kamal_engine.backbones.detect import detect_architecture, normalize_state_dict_keys
from kamal_engine.checkpoints import RawCheckpoint
from kamal_engine.errors import KamalError
from kamal_engine.recipe import TeacherEntry
from kamal_engine.teacher import find_sidecar_labels

from .widgets import PathEdit


class ErrorLog:
    """Where :func:`show_error` also writes each error (the main window's log dock), so it stays readable."""

    sink = None  # a callable taking one line of text


def show_error(parent: QWidget | None, title: str, error: BaseException | str) -> None:
    """A modal error: the sentence the engine wrote (it names the file), never a traceback; also logged."""
    text = " ".join(str(error).split()) if isinstance(error, KamalError) or isinstance(error, str) else (
        f"{type(error).__name__}: {error}")
    if ErrorLog.sink is not None:
        try:
            ErrorLog.sink(f"Error: {title}: {text}")
        except RuntimeError:  # the window that logged is gone
            ErrorLog.sink = None
    box = QMessageBox(QMessageBox.Icon.Critical, title, text, QMessageBox.StandardButton.Ok, parent)
    box.setObjectName("errorDialog")
    box.exec()


class ImportTeacherDialog(QDialog):
    """A foreign checkpoint (bare weights): architecture (detected), labels, task type, input size."""

    def __init__(self, raw: RawCheckpoint, trust: bool = False, parent: QWidget | None = None,
                 task_hint: str | None = None):
        """``task_hint``: the task type of the teachers already loaded (when they agree), the default here."""
        super().__init__(parent)
        self.raw, self.trust = raw, trust
        self.entry: TeacherEntry | None = None
        self.teacher = None
        self.setWindowTitle(f"Import {raw.path.name}")
        state_dict = normalize_state_dict_keys(raw.state_dict or {})
        try:
            detected, self.detected_kwargs = detect_architecture(state_dict)
            detected_text = f"detected from the weights: {detected}"
        except KamalError:
            detected, self.detected_kwargs = None, {}
            detected_text = "not recognised from the weights: choose it"

        layout = QVBoxLayout(self)
        intro = QLabel(f"<b>{raw.path.name}</b> holds bare weights ({len(state_dict)} tensors). Tell KAmal Studio "
                       "what it is; this is saved in the recipe.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        form = QFormLayout()
        self.arch = QComboBox()
        self.arch.addItems(list(ARCHITECTURES))
        if detected:
            self.arch.setCurrentText(detected)
        self.arch.currentTextChanged.connect(self._arch_changed)
        form.addRow("Architecture", self.arch)
        self.arch_note = QLabel(detected_text)
        form.addRow("", self.arch_note)

        self.labels_from_file = QRadioButton("Labels file (one label per line)")
        self.labels_typed = QRadioButton("Type the labels (one per line)")
        group = QButtonGroup(self)
        group.addButton(self.labels_from_file)
        group.addButton(self.labels_typed)
        self.labels_file = PathEdit(("file",), "Text files (*.txt);;All files (*)")
        sidecar = find_sidecar_labels(raw.path)
        self.labels_file.set_path(sidecar)
        self.labels_text = QPlainTextEdit()
        self.labels_text.setPlaceholderText("cat\ndog\n…")
        self.labels_from_file.setChecked(sidecar is not None)
        self.labels_typed.setChecked(sidecar is None)
        self.labels_from_file.toggled.connect(self._labels_mode)
        form.addRow(self.labels_from_file)
        form.addRow(self.labels_file)
        form.addRow(self.labels_typed)
        form.addRow(self.labels_text)

        self.task = QComboBox()
        self.task.addItem("multi-class (one softmax)", "multiclass")
        self.task.addItem("multi-label (a sigmoid per label)", "multilabel")
        form.addRow("Task type", self.task)
        if task_hint in ("multiclass", "multilabel"):
            self.task.setCurrentIndex(self.task.findData(task_hint))
            kind = "multi-label" if task_hint == "multilabel" else "multi-class"
            hint = f"The weights do not say; {kind} like the teachers already loaded. Check how this one was trained."
        else:
            hint = ("The weights do not say: multi-class if it was trained with one softmax over the labels, "
                    "multi-label if with a sigmoid (binary loss) per label.")
        self.task_note = QLabel(hint)
        self.task_note.setWordWrap(True)
        form.addRow("", self.task_note)
        self.input_size = QSpinBox()
        self.input_size.setRange(8, 4096)
        form.addRow("Input size (pixels)", self.input_size)
        self.outputs_note = QLabel()
        form.addRow("Outputs", self.outputs_note)
        layout.addLayout(form)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self._arch_changed(self.arch.currentText())
        self._labels_mode(self.labels_from_file.isChecked())

    def _labels_mode(self, from_file: bool) -> None:
        self.labels_file.setEnabled(from_file)
        self.labels_text.setEnabled(not from_file)

    def _arch_changed(self, name: str) -> None:
        spec = get_architecture(name)
        self.input_size.setValue(spec.default_input_size)
        weight = normalize_state_dict_keys(self.raw.state_dict or {}).get(spec.classifier_key)
        self.outputs_note.setText(f"{int(weight.shape[0])} (from {spec.classifier_key})" if weight is not None
                                  else f"no '{spec.classifier_key}' in the weights: probably another architecture")

    def build_entry(self) -> TeacherEntry:
        arch = self.arch.currentText()
        entry = TeacherEntry(self.raw.path, arch=arch, task=self.task.currentData(), input_size=self.input_size.value(),
                             trust=self.trust)
        if arch == self.arch_note.text().removeprefix("detected from the weights: "):
            entry.arch_kwargs = dict(self.detected_kwargs)
        if self.labels_from_file.isChecked():
            if self.labels_file.path() is None:
                raise KamalError("choose a labels file, or type the labels")
            entry.labels_file = self.labels_file.path().resolve()
        else:
            labels = [line.strip() for line in self.labels_text.toPlainText().splitlines() if line.strip()]
            if not labels:
                raise KamalError("type the labels, one per line, or choose a labels file")
            entry.labels = labels
        return entry

    def accept(self) -> None:
        try:
            entry = self.build_entry()
            self.teacher = entry.load(raw=self.raw)
        except KamalError as exc:
            show_error(self, "Cannot import this checkpoint", exc)
            return
        self.entry = entry
        super().accept()


def ask_trust(parent: QWidget | None, path: Path, reason: str) -> bool:
    """The user's explicit consent to unpickle ``path`` (never silently)."""
    answer = QMessageBox.warning(
        parent, "Untrusted checkpoint",
        f"{path.name} holds pickled Python objects, which can run code when loaded.\n\n{reason}\n\n"
        "Load it only if you trust where it came from. Load it anyway?",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes
