"""Small reusable widgets."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QSize, Qt, Signal
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import (QBoxLayout, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton, QScrollArea,
                               QSizePolicy, QVBoxLayout, QWidget)


class DialogFolders:
    """Where file dialogs start: the folder last used in one, else the workspace (the open recipe's
    folder), else the home folder. One per process; the main window saves and restores ``last``."""

    last: Path | None = None
    workspace: Path | None = None


def start_folder(*prefer: Path | None) -> Path:
    """The first existing folder of ``prefer`` (a file stands for its folder), the last one used, the
    workspace, home."""
    for candidate in (*prefer, DialogFolders.last, DialogFolders.workspace):
        if candidate is None:
            continue
        candidate = Path(candidate)
        folder = candidate if candidate.is_dir() else candidate.parent
        if folder.is_dir():
            return folder
    return Path.home()


def start_path(path: Path | None, *prefer: Path | None) -> str:
    """A dialog's start: ``path`` itself when its folder exists (a save dialog proposes the name), else
    :func:`start_folder`."""
    if path is not None and Path(path).parent.is_dir():
        return str(path)
    return str(start_folder(*prefer))


def remember_folder(chosen: str | Path | None) -> None:
    """Note the folder of what a dialog returned (the next dialog starts there)."""
    if chosen:
        chosen = Path(chosen)
        DialogFolders.last = chosen if chosen.is_dir() else chosen.parent


def page_header(title: str, text: str = "") -> QLabel:
    """A page's title (rich text ``title``, already escaped) and an optional sentence below it."""
    label = QLabel(f"<h2>{title}</h2>{text}")
    label.setWordWrap(True)
    return label


class StatusLine(QWidget):
    """One line of text that changes often (stage text, ETA) without ever re-laying out the window.

    A ``QLabel`` asks its parent layouts to recompute on every ``setText``, and on a page inside a
    stacked widget that means the height-for-width of every wrapped label on every page, many times
    a second while training. This widget has a fixed height, takes the width it is given and only
    repaints itself; a text too long for it is elided in the middle (the full text is the tooltip).
    """

    def __init__(self, text: str = "", parent=None, alignment=Qt.AlignmentFlag.AlignLeft):
        super().__init__(parent)
        self._text = text
        self.alignment = alignment | Qt.AlignmentFlag.AlignVCenter
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(self.fontMetrics().height() + 6)

    def text(self) -> str:
        return self._text

    def setText(self, text: str) -> None:  # noqa: N802 - QLabel's name, so it can stand in for one
        if text != self._text:
            self._text = text
            self.setToolTip(text)
            self.update()

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(self.fontMetrics().horizontalAdvance(self._text) + 8, self.height())

    def paintEvent(self, event) -> None:  # noqa: N802
        painter = QPainter(self)
        painter.setPen(self.palette().windowText().color())
        rect = self.rect().adjusted(2, 0, -2, 0)
        painter.drawText(rect, self.alignment,
                         self.fontMetrics().elidedText(self._text, Qt.TextElideMode.ElideMiddle, rect.width()))


class PathEdit(QWidget):
    """A path field with browse buttons. ``kinds``: any of "file", "folder", "save" (a file to write).
    Emits ``edited(path or None)``."""

    edited = Signal(object)

    def __init__(self, kinds=("file",), file_filter: str = "", placeholder: str = "", parent=None):
        super().__init__(parent)
        self.file_filter = file_filter
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.line = QLineEdit()
        self.line.setPlaceholderText(placeholder)
        self.line.editingFinished.connect(self._typed)
        layout.addWidget(self.line, 1)
        self.buttons = {}
        for kind in kinds:
            button = QPushButton("File…" if kind == "file" and len(kinds) > 1 else
                                 "Folder…" if kind == "folder" and len(kinds) > 1 else "Browse…")
            button.setObjectName(f"browse-{kind}")
            button.clicked.connect(lambda checked=False, k=kind: self._browse(k))
            layout.addWidget(button)
            self.buttons[kind] = button
        self._last: Path | None = None

    def path(self) -> Path | None:
        text = self.line.text().strip()
        return Path(text).expanduser() if text else None

    def set_path(self, path: Path | None, emit: bool = False) -> None:
        self.line.setText(str(path) if path else "")
        self._last = self.path()
        if emit:
            self.edited.emit(self._last)

    def _typed(self) -> None:
        if self.path() != self._last:
            self._last = self.path()
            self.edited.emit(self._last)

    def _browse(self, kind: str) -> None:
        start = start_path(self.path())
        if kind == "folder":
            chosen = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        elif kind == "save":
            chosen, _ = QFileDialog.getSaveFileName(self, "Save as", start, self.file_filter)
        else:
            chosen, _ = QFileDialog.getOpenFileName(self, "Choose a file", start, self.file_filter)
        remember_folder(chosen)
        if chosen:
            self.set_path(Path(chosen), emit=True)


class Columns(QWidget):
    """A page body of two columns (``left``, ``right``), side by side when the scroll area it sits in is
    wide enough for both, else one above the other: the page then scrolls vertically, never sideways."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.box = QBoxLayout(QBoxLayout.Direction.LeftToRight, self)
        self.left, self.right = QVBoxLayout(), QVBoxLayout()
        self.box.addLayout(self.left, 1)
        self.box.addLayout(self.right, 1)
        self._viewport: QWidget | None = None

    def in_scroll_area(self, scroll: QScrollArea) -> None:
        """Put this body into ``scroll`` (vertical scrolling only) and follow its width."""
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(self)
        self._viewport = scroll.viewport()
        self._viewport.installEventFilter(self)

    def side_by_side_width(self) -> int:
        """The width two columns need (their minimum widths, the spacing and margins)."""
        margins = self.box.contentsMargins()
        return (self.left.minimumSize().width() + self.right.minimumSize().width() + self.box.spacing()
                + margins.left() + margins.right())

    def fit(self, width: int) -> None:
        wide = width >= self.side_by_side_width()
        direction = QBoxLayout.Direction.LeftToRight if wide else QBoxLayout.Direction.TopToBottom
        if self.box.direction() != direction:
            self.box.setDirection(direction)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if watched is self._viewport and event.type() == QEvent.Type.Resize:
            self.fit(event.size().width())
        return False
