"""Labels page: a tree teacher → labels with checkboxes, a filter, select all / none, the count."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QHBoxLayout, QHeaderView, QLabel, QLineEdit, QPushButton, QTreeWidget, QTreeWidgetItem,
                               QVBoxLayout, QWidget)

from ..session import StudioSession
from ..widgets import page_header

NAME_ROLE = Qt.ItemDataRole.UserRole + 1


class LabelsPage(QWidget):
    def __init__(self, session: StudioSession, parent=None):
        super().__init__(parent)
        self.session = session
        self._updating = False  # the tree is being rebuilt: ignore its itemChanged signals
        self._pushing = False  # the session changes because of a click here: keep the tree, update the counts
        self._sync = QTimer(self)  # one session update per click (a tristate parent changes many children)
        self._sync.setSingleShot(True)
        self._sync.setInterval(0)
        self._sync.timeout.connect(self._push_to_session)
        layout = QVBoxLayout(self)
        layout.addWidget(page_header(
            "Labels", "Tick the labels the student should predict. A label that several teachers offer is in italics: "
            "tick it in one of them, or in several with the adaptive-ka method, which learns it from each."))
        bar = QHBoxLayout()
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter labels…")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self._apply_filter)
        bar.addWidget(self.filter, 1)
        self.all_button = QPushButton("Select all")
        self.none_button = QPushButton("Select none")
        self.all_button.setToolTip("Tick every label of the teacher of the current row (with a filter: the shown ones)")
        self.none_button.setToolTip("Untick every label of the teacher of the current row (with a filter: the shown ones)")
        self.all_button.clicked.connect(lambda: self._set_current_teacher(True))
        self.none_button.clicked.connect(lambda: self._set_current_teacher(False))
        bar.addWidget(self.all_button)
        bar.addWidget(self.none_button)
        layout.addLayout(bar)
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["Label", "Also offered by"])
        self.tree.header().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.itemChanged.connect(self._item_changed)
        layout.addWidget(self.tree, 1)
        self.count = QLabel()
        layout.addWidget(self.count)
        session.changed.connect(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        if self._pushing:
            self._update_counts()
            return
        self._updating = True
        expanded = {self.tree.topLevelItem(i).data(0, NAME_ROLE): self.tree.topLevelItem(i).isExpanded()
                    for i in range(self.tree.topLevelItemCount())}
        self.tree.clear()
        owners = self.session.label_owners()
        for n, loaded in enumerate(self.session.teachers):
            t = loaded.teacher
            top = QTreeWidgetItem([f"{t.name}  ({len(loaded.selected)}/{len(t.labels)})"])
            top.setData(0, Qt.ItemDataRole.UserRole, n)
            top.setData(0, NAME_ROLE, t.name)
            top.setFlags(top.flags() | Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsAutoTristate)
            for label in t.labels:
                child = QTreeWidgetItem([label, ", ".join(o for o in owners[label] if o != t.name)])
                child.setData(0, Qt.ItemDataRole.UserRole, label)
                child.setFlags(child.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                child.setCheckState(0, Qt.CheckState.Checked if label in loaded.selected else Qt.CheckState.Unchecked)
                if len(owners[label]) > 1:
                    font = child.font(0)
                    font.setItalic(True)
                    child.setFont(0, font)
                    child.setToolTip(0, f"'{label}' is offered by {len(owners[label])} teachers: "
                                        f"{', '.join(owners[label])}. Tick it in one, or in several with the "
                                        "adaptive-ka method, which learns it from each of them")
                top.addChild(child)
            self.tree.addTopLevelItem(top)
            top.setExpanded(expanded.get(t.name, True))
        self._updating = False
        self._update_counts()
        self._apply_filter(self.filter.text())

    def _update_counts(self) -> None:
        self._updating = True
        for i in range(min(self.tree.topLevelItemCount(), len(self.session.teachers))):
            loaded = self.session.teachers[i]
            self.tree.topLevelItem(i).setText(0, f"{loaded.name}  ({len(loaded.selected)}/{len(loaded.teacher.labels)})")
        self._updating = False
        total = sum(len(t.teacher.labels) for t in self.session.teachers)
        ticked, distinct = self.session.selected_count(), self.session.distinct_count()
        shared = f" ({distinct} distinct: {ticked - distinct} ticked in more than one teacher)" if distinct < ticked else ""
        self.count.setText(f"<b>{ticked}</b> of {total} labels selected{shared}"
                           if total else "No teachers loaded: add them on the Teachers page.")

    def _apply_filter(self, text: str) -> None:
        needle = text.strip().lower()
        for i in range(self.tree.topLevelItemCount()):
            top = self.tree.topLevelItem(i)
            shown = 0
            for j in range(top.childCount()):
                child = top.child(j)
                hide = bool(needle) and needle not in child.text(0).lower()
                child.setHidden(hide)
                shown += not hide
            top.setHidden(shown == 0 and bool(needle))

    def _selection_of(self, top: QTreeWidgetItem) -> list[str]:
        return [top.child(j).data(0, Qt.ItemDataRole.UserRole) for j in range(top.childCount())
                if top.child(j).checkState(0) == Qt.CheckState.Checked]

    def _item_changed(self, item: QTreeWidgetItem, column: int) -> None:
        if not self._updating and column == 0:
            self._sync.start()

    def _push_to_session(self) -> None:
        changed = False
        for i in range(min(self.tree.topLevelItemCount(), len(self.session.teachers))):
            labels = self._selection_of(self.tree.topLevelItem(i))
            loaded = self.session.teachers[i]
            if labels != loaded.selected:
                loaded.selected = labels
                changed = True
        if changed:
            self._pushing = True
            try:
                self.session.notify()
            finally:
                self._pushing = False

    def _current_top(self) -> QTreeWidgetItem | None:
        item = self.tree.currentItem() or (self.tree.topLevelItem(0) if self.tree.topLevelItemCount() == 1 else None)
        if item is None:
            return None
        return item if item.parent() is None else item.parent()

    def _set_current_teacher(self, checked: bool) -> None:
        top = self._current_top()
        if top is None:
            return
        index = top.data(0, Qt.ItemDataRole.UserRole)
        loaded = self.session.teachers[index]
        visible = {top.child(j).data(0, Qt.ItemDataRole.UserRole) for j in range(top.childCount())
                   if not top.child(j).isHidden()}
        wanted = (set(loaded.selected) | visible) if checked else (set(loaded.selected) - visible)
        self.session.set_selected(index, sorted(wanted))
