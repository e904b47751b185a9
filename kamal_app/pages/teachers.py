"""Teachers page: the loaded teacher checkpoints, add (dialog or drag & drop) and remove."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from kamal_engine.profile import count_parameters

from ..session import StudioSession
from ..widgets import page_header

COLUMNS = ("Name", "Architecture", "Task type", "Labels", "Parameters", "File")


class TeachersPage(QWidget):
    add_requested = Signal()

    def __init__(self, session: StudioSession, parent=None):
        super().__init__(parent)
        self.session = session
        layout = QVBoxLayout(self)
        layout.addWidget(page_header(
            "Teachers", "The pre-trained networks to amalgamate. Add checkpoints (<code>.pt</code>, <code>.pth</code>, "
            "<code>.safetensors</code>) with the button or drop them anywhere on this window. Bare weights from "
            "elsewhere open an import dialog."))
        buttons = QHBoxLayout()
        self.add_button = QPushButton("Add teachers…")
        self.add_button.clicked.connect(self.add_requested)
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self._remove)
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        layout.addLayout(buttons)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        for c in range(len(COLUMNS) - 1):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        layout.addWidget(self.table, 1)
        self.empty_hint = QLabel("No teachers yet. Add checkpoints, or open the demo workspace (File menu).")
        self.empty_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(self.empty_hint)
        self._params: dict[int, int] = {}
        session.changed.connect(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        teachers = self.session.teachers
        self.table.setRowCount(len(teachers))
        for row, loaded in enumerate(teachers):
            t = loaded.teacher
            key = id(t.model)
            if key not in self._params:
                self._params[key] = count_parameters(t.model)
            task = "multi-label" if t.task == "multilabel" else "multi-class"
            values = (t.name, t.arch, task, str(len(t.labels)), f"{self._params[key]:,}", str(loaded.entry.checkpoint))
            for col, value in enumerate(values):
                item = QTableWidgetItem(value)
                if col in (3, 4):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if col == 5:
                    item.setToolTip(value)
                self.table.setItem(row, col, item)
        self.empty_hint.setVisible(not teachers)
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.remove_button.setEnabled(bool(self.table.selectionModel().selectedRows()))

    def _remove(self) -> None:
        for row in sorted((i.row() for i in self.table.selectionModel().selectedRows()), reverse=True):
            self.session.remove_teacher(row)
