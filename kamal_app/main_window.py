"""The main window: pages on the left, Start with its reason at the bottom, File menu, drag & drop."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QHBoxLayout, QLabel, QListWidget, QMainWindow, QMessageBox,
                               QProgressDialog, QPushButton, QStackedWidget, QVBoxLayout, QWidget)

from kamal_engine.checkpoints import atomic_write, read_checkpoint
from kamal_engine.errors import KamalError, UnsafeCheckpointError
from kamal_engine.recipe import TeacherEntry, load_recipe, parse_recipe
from kamal_engine.teacher import load_teacher

from .dialogs import ImportTeacherDialog, ask_trust, show_error
from .pages.data_method import DataMethodPage
from .pages.export_test import ExportTestPage
from .pages.labels import LabelsPage
from .pages.results import ResultsPage
from .pages.teachers import TeachersPage
from .pages.train import TrainPage
from .session import StudioSession, recipe_text
from .workers import WorkerHandle

CHECKPOINT_SUFFIXES = {".pt", ".pth", ".safetensors", ".bin", ".ckpt"}
MAX_RECENT = 8
PAGES = ("Teachers", "Labels", "Data & method", "Train", "Results", "Export & test")


def default_demo_dir() -> Path:
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
    return Path(base or Path.home() / ".kamal-studio") / "demo-workspace"


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None):
        super().__init__()
        self.settings = settings or QSettings()
        self.session = StudioSession(self)
        self.demo_handle: WorkerHandle | None = None
        self.setWindowTitle("KAmal Studio[*]")
        self.setAcceptDrops(True)

        central = QWidget()
        self.setCentralWidget(central)
        outer = QVBoxLayout(central)
        body = QHBoxLayout()
        outer.addLayout(body, 1)
        self.nav = QListWidget()
        self.nav.addItems(PAGES)
        self.nav.setMaximumWidth(self.fontMetrics().horizontalAdvance("Data & method") * 2)
        body.addWidget(self.nav)
        self.pages = QStackedWidget()
        self.teachers_page = TeachersPage(self.session)
        self.labels_page = LabelsPage(self.session)
        self.data_page = DataMethodPage(self.session)
        self.train_page = TrainPage()
        self.results_page = ResultsPage()
        self.export_page = ExportTestPage()
        for page in (self.teachers_page, self.labels_page, self.data_page, self.train_page, self.results_page,
                     self.export_page):
            self.pages.addWidget(page)
        body.addWidget(self.pages, 1)
        self.nav.currentRowChanged.connect(self.pages.setCurrentIndex)
        self.nav.setCurrentRow(0)
        self.teachers_page.add_requested.connect(self.add_teachers_dialog)

        bottom = QHBoxLayout()
        self.start_reason = QLabel()
        self.start_reason.setWordWrap(True)
        bottom.addWidget(self.start_reason, 1)
        self.start_button = QPushButton("Start")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(self.start_run)
        bottom.addWidget(self.start_button)
        outer.addLayout(bottom)
        self.device_label = QLabel()
        self.statusBar().addPermanentWidget(self.device_label)
        self.log_dock = QDockWidget("Log", self)
        self.log_dock.setObjectName("logDock")
        self.log_dock.setWidget(self.train_page.log)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.log_dock)

        self._build_menus()
        self.session.changed.connect(self._session_changed)
        self.train_page.run_finished.connect(self.show_result)
        self.train_page.run_stopped.connect(self._update_start)
        self.results_page.student_saved.connect(lambda path: self.statusBar().showMessage(f"Saved {path}", 5000))
        geometry = self.settings.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
            self.restoreState(self.settings.value("window/state") or b"")
        else:
            self.resize(self.fontMetrics().averageCharWidth() * 150, self.fontMetrics().height() * 42)
        self._session_changed()
        self.setWindowModified(False)

    # --- menus ---
    def _build_menus(self) -> None:
        menu = self.menuBar().addMenu("&File")

        def action(text, slot, shortcut=None):
            a = QAction(text, self)
            if shortcut is not None:
                a.setShortcut(shortcut)
            a.triggered.connect(slot)
            menu.addAction(a)
            return a

        self.new_action = action("&New", self.new_session, QKeySequence.StandardKey.New)
        self.open_action = action("&Open recipe…", self.open_recipe_dialog, QKeySequence.StandardKey.Open)
        self.save_action = action("&Save recipe", self.save_recipe, QKeySequence.StandardKey.Save)
        self.save_as_action = action("Save recipe &as…", self.save_recipe_as, QKeySequence.StandardKey.SaveAs)
        menu.addSeparator()
        self.add_action = action("Add &teachers…", self.add_teachers_dialog, QKeySequence("Ctrl+T"))
        self.demo_action = action("Open &demo workspace", lambda: self.open_demo_workspace())
        self.independent_demo_action = action("Open demo with teachers trained a&part",
                                              lambda: self.open_demo_workspace(independent=True))
        self.independent_demo_action.setStatusTip("Three ResNets trained from scratch, each on its own images and "
                                                  "labels (their features are unrelated); built on first use")
        self.open_run_action = action("Open run &results…", self.open_run_dialog)
        self.recent_menu = menu.addMenu("Open &recent")
        self._fill_recent()
        menu.addSeparator()
        self.quit_action = action("&Quit", self.close, QKeySequence.StandardKey.Quit)
        help_menu = self.menuBar().addMenu("&Help")
        about = QAction("&About KAmal Studio", self)
        about.triggered.connect(self.about)
        help_menu.addAction(about)

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        recent = self.recent_files()
        for path in recent:
            a = QAction(str(path), self)
            a.triggered.connect(lambda checked=False, p=path: self.open_recipe(p))
            self.recent_menu.addAction(a)
        self.recent_menu.setEnabled(bool(recent))

    def recent_files(self) -> list[Path]:
        value = self.settings.value("recent", []) or []
        if isinstance(value, str):
            value = [value]
        return [Path(p) for p in value if Path(p).is_file()]

    def _remember(self, path: Path) -> None:
        paths = [str(path)] + [str(p) for p in self.recent_files() if p != path]
        self.settings.setValue("recent", paths[:MAX_RECENT])
        self._fill_recent()

    def about(self) -> None:
        from . import __version__

        QMessageBox.about(self, "About KAmal Studio",
                          f"<b>KAmal Studio {__version__}</b><br>Knowledge amalgamation: one customised multi-task "
                          "student from several pre-trained teachers, with or without data.")

    # --- state ---
    def _session_changed(self) -> None:
        self.setWindowModified(True)
        self._update_start()
        self._update_device()
        name = self.session.recipe_path.name if self.session.recipe_path else "untitled recipe"
        self.setWindowTitle(f"KAmal Studio — {name}[*]")

    def _update_start(self) -> None:
        running = self.train_page.is_running()
        reasons = self.session.start_blockers()
        self.start_button.setEnabled(not reasons and not running and self.demo_handle is None)
        if running:
            text = "A run is in progress (Train page)."
        elif reasons:
            text = "Start needs: " + "; ".join(reasons) + "."
        else:
            text = (f"Ready: {self.session.distinct_count()} labels from {len(self.session.teachers)} teacher(s), "
                    f"method {self.session.method}.")
        if text != self.start_reason.text():  # a new text re-lays out the window: only when it changed
            self.start_reason.setText(text)

    def _update_device(self) -> None:
        from kamal_engine.devices import available_devices, resolve_device

        try:
            device = resolve_device(self.session.device)
        except KamalError:
            self.device_label.setText(f"Device: {self.session.device} is not available here")
            return
        key = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
        name = dict(available_devices()).get(key, key)
        self.device_label.setText("Device: CPU" if key == "cpu" else f"Device: {key} · {name}")

    # --- teachers ---
    def add_teachers_dialog(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Add teacher checkpoints", str(Path.home()),
                                                "Checkpoints (*.pt *.pth *.safetensors *.bin *.ckpt);;All files (*)")
        self.add_teacher_files([Path(p) for p in paths])

    def add_teacher_files(self, paths: list[Path]) -> int:
        """Load each file as a teacher; errors are shown per file and the rest still load. Returns the count."""
        added = 0
        for path in paths:
            try:
                loaded = self._load_teacher_file(path)
            except KamalError as exc:
                show_error(self, "Cannot load this teacher", exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a bad file must never take the window down
                show_error(self, "Cannot load this teacher", f"{path}: could not be read ({type(exc).__name__}: {exc})")
                continue
            added += loaded
        if added:
            self.nav.setCurrentRow(PAGES.index("Labels") if self.session.teachers else 0)
        return added

    def _load_teacher_file(self, path: Path) -> int:
        path = path.resolve()
        if any(t.entry.checkpoint == path for t in self.session.teachers):
            self.statusBar().showMessage(f"{path.name} is already loaded", 5000)
            return 0
        trust = False
        try:
            raw = read_checkpoint(path)
        except UnsafeCheckpointError as exc:
            if not ask_trust(self, path, " ".join(str(exc).split())):
                return 0
            trust = True
            raw = read_checkpoint(path, trust=True)
        if raw.kind == "bundle":
            entry = TeacherEntry(path, trust=trust)
            teacher = load_teacher(path, raw=raw, trust=trust)
        else:
            dialog = ImportTeacherDialog(raw, trust, self)
            if dialog.exec() != ImportTeacherDialog.DialogCode.Accepted:
                return 0
            entry, teacher = dialog.entry, dialog.teacher
        names = {t.name for t in self.session.teachers}
        if teacher.name in names:  # names key the report: keep them unique
            n = 2
            while f"{teacher.name}-{n}" in names:
                n += 1
            teacher.name = entry.name = f"{teacher.name}-{n}"
        taken = {label for t in self.session.teachers for label in t.selected}
        self.session.add_teacher(entry, teacher, [label for label in teacher.labels if label not in taken])
        self.statusBar().showMessage(f"Loaded {teacher.name}: {teacher.arch}, {len(teacher.labels)} labels", 5000)
        return 1

    # --- drag & drop ---
    def _dropped_paths(self, event) -> list[Path]:
        if not event.mimeData().hasUrls():
            return []
        return [Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()]

    def dragEnterEvent(self, event) -> None:
        paths = self._dropped_paths(event)
        if paths and all(p.suffix.lower() in CHECKPOINT_SUFFIXES | {".toml"} for p in paths):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        paths = self._dropped_paths(event)
        event.acceptProposedAction()
        recipes = [p for p in paths if p.suffix.lower() == ".toml"]
        if recipes:
            self.open_recipe(recipes[0])
        # after the drop returns: a modal dialog inside a drop handler blocks the drag source
        checkpoints = [p for p in paths if p.suffix.lower() in CHECKPOINT_SUFFIXES]
        if checkpoints:
            QTimer.singleShot(0, lambda: self.add_teacher_files(checkpoints))

    # --- recipes ---
    def new_session(self) -> None:
        if not self._may_discard():
            return
        self.session.reset()
        self.session.notify()
        self.setWindowModified(False)
        self.nav.setCurrentRow(0)

    def _may_discard(self) -> bool:
        if not self.isWindowModified() or not self.session.teachers:
            return True
        answer = QMessageBox.question(self, "Discard changes?", "The current recipe has unsaved changes. Discard them?",
                                      QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
                                      QMessageBox.StandardButton.Cancel)
        return answer == QMessageBox.StandardButton.Discard

    def open_recipe_dialog(self) -> None:
        if not self._may_discard():
            return
        path, _ = QFileDialog.getOpenFileName(self, "Open recipe", str(Path.home()), "Recipes (*.toml);;All files (*)")
        if path:
            self.open_recipe(Path(path))

    def open_recipe(self, path: Path) -> bool:
        """Load a recipe and its teachers; on any error the current state stays as it was."""
        path = Path(path).resolve()
        try:
            recipe = load_recipe(path)
            teachers = []
            for entry in recipe.teachers:
                teachers.append(entry.load())
        except KamalError as exc:
            show_error(self, "Cannot open this recipe", exc)
            return False
        except Exception as exc:  # noqa: BLE001
            show_error(self, "Cannot open this recipe", f"{path}: could not be read ({type(exc).__name__}: {exc})")
            return False
        self.session.load_recipe(recipe, teachers)
        self.setWindowModified(False)
        self._remember(path)
        self.statusBar().showMessage(f"Opened {path}", 5000)
        return True

    def save_recipe(self) -> bool:
        if self.session.recipe_path is None:
            return self.save_recipe_as()
        return self.write_recipe(self.session.recipe_path)

    def save_recipe_as(self) -> bool:
        start = str(self.session.recipe_path or Path.home() / f"{self.session.name}.toml")
        path, _ = QFileDialog.getSaveFileName(self, "Save recipe", start, "Recipes (*.toml)")
        if not path:
            return False
        path = Path(path)
        if path.suffix.lower() != ".toml":
            path = path.with_suffix(".toml")
        return self.write_recipe(path)

    def write_recipe(self, path: Path) -> bool:
        path = Path(path).resolve()
        try:
            text = recipe_text(self.session.to_recipe(path), path)
            parse_recipe(text, path, check_files=False)  # what the GUI saves, kamal run must read
            atomic_write(path, lambda tmp: tmp.write_text(text))
        except (KamalError, OSError) as exc:
            show_error(self, "Cannot save the recipe", f"{path}: {exc}" if isinstance(exc, OSError) else exc)
            return False
        self.session.recipe_path = path
        self._session_changed()
        self.setWindowModified(False)
        self._remember(path)
        self.statusBar().showMessage(f"Saved {path}", 5000)
        return True

    # --- demo workspace ---
    def open_demo_workspace(self, folder: Path | None = None, independent: bool = False) -> bool:
        """Open the demo workspace's recipe, building what is missing first (in a worker, with a progress
        dialog). ``independent``: the recipe of the teachers trained apart (``kamal demo --independent``)."""
        from kamal_engine import demo

        folder = Path(folder or self.settings.value("demo/folder", "") or default_demo_dir()).resolve()
        recipe = folder / "recipes" / ("filtered-ka-independent.toml" if independent else "filtered-ka.toml")
        built = demo.is_complete(folder)
        if built and (not independent or recipe.is_file() and all(p.is_file() for p in demo.independent_paths(folder))):
            return self.open_recipe(recipe)
        if self.demo_handle is not None:
            return False
        minutes = ("about five minutes" if built else "about six minutes") if independent else "about a minute"
        what = "Training three ResNet teachers apart" if independent and built else "Building the demo workspace"
        dialog = QProgressDialog(f"{what} ({minutes} on two CPU cores) …", "Cancel", 0, 0, self)
        dialog.setWindowTitle("KAmal Studio demo")
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.setMinimumDuration(0)
        self.demo_dialog, self.demo_folder, self.demo_recipe = dialog, folder, recipe

        def work(report, abort):  # runs in the worker thread: only the engine, no widgets
            def log(message):
                if abort.is_set():
                    raise KamalError("the demo build was cancelled; start it again from the File menu")
                report(message)
            manifest = None if built else demo.build_demo(folder, demo.DemoConfig(), log=log)
            if independent:
                manifest = demo.build_independent(folder, demo.DemoConfig(), log=log)
            return manifest

        handle = WorkerHandle(work, self)
        self.demo_handle = handle
        # bound methods of GUI-thread objects: Qt queues these calls into the GUI thread
        handle.worker.yielded.connect(self._demo_progress)
        handle.worker.returned.connect(self._demo_returned)
        handle.worker.errored.connect(self._demo_errored)
        handle.done.connect(self._demo_done)
        dialog.canceled.connect(handle.request_abort)
        handle.start()
        self._update_start()
        dialog.show()
        return True

    def _demo_progress(self, message) -> None:
        self.demo_dialog.setLabelText(" ".join(str(message).split())[:120])

    def _demo_returned(self, _manifest) -> None:
        self.settings.setValue("demo/folder", str(self.demo_folder))
        self.demo_dialog.reset()
        self.open_recipe(self.demo_recipe)

    def _demo_errored(self, exc) -> None:
        self.demo_dialog.reset()
        if not (self.demo_handle is not None and self.demo_handle.worker.abort.is_set()):
            show_error(self, "Cannot build the demo workspace", exc)

    def _demo_done(self) -> None:
        self.demo_handle = None
        self._update_start()

    # --- run ---
    def start_run(self) -> None:
        from kamal_engine.runner import has_unfinished_run

        if self.session.start_blockers() or self.train_page.is_running():
            return
        recipe = self.session.to_recipe()
        resume = False
        if has_unfinished_run(recipe.output_dir):
            box = QMessageBox(QMessageBox.Icon.Question, "Unfinished run",
                              f"{recipe.output_dir} holds an unfinished run. Resume it after its last finished block, "
                              "or start over?", parent=self)
            resume_button = box.addButton("Resume", QMessageBox.ButtonRole.AcceptRole)
            box.addButton("Start over", QMessageBox.ButtonRole.DestructiveRole)
            cancel = box.addButton(QMessageBox.StandardButton.Cancel)
            box.exec()
            if box.clickedButton() is cancel:
                return
            resume = box.clickedButton() is resume_button
        self.nav.setCurrentRow(PAGES.index("Train"))
        from kamal_engine.methods import get_method

        self.train_page.start(recipe, resume=resume, data_free=get_method(recipe.method).mode == "data-free")
        self._update_start()

    # --- results ---
    def show_result(self, result) -> None:
        self.results_page.set_result(result.output_dir, result.student, result.report)
        self.export_page.set_student(result.output_dir / "student.kamal.pt", result.student.labels)
        self.statusBar().showMessage(f"Run finished: {result.output_dir}", 10000)

    def open_run_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a run's output folder", str(Path.home()))
        if folder:
            self.open_run(Path(folder))

    def open_run(self, folder: Path) -> bool:
        folder = Path(folder).resolve()
        try:
            if not (folder / "report.json").is_file() or not (folder / "student.kamal.pt").is_file():
                raise KamalError("is not a finished run's folder (it needs report.json and student.kamal.pt)", folder)
            self.results_page.load_run(folder)
        except (KamalError, OSError, ValueError) as exc:
            show_error(self, "Cannot open these results", exc)
            return False
        self.export_page.set_student(folder / "student.kamal.pt", self.results_page.student.labels)
        self.nav.setCurrentRow(PAGES.index("Results"))
        return True

    def closeEvent(self, event) -> None:
        if self.train_page.is_running():
            answer = QMessageBox.question(self, "Stop the run?", "A run is in progress. Stop it after the current step "
                                          "(its finished blocks are kept) and quit?",
                                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                          QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                event.ignore()
                return
            self.train_page.stop_and_wait()
        if self.demo_handle is not None:
            self.demo_handle.stop()
        self.export_page.stop_and_wait()
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.sync()
        super().closeEvent(event)
