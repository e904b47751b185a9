"""The main window: pages on the left, Start with its reason at the bottom, File menu, drag & drop."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, QSize, QStandardPaths, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QHBoxLayout, QLabel, QListWidget, QMainWindow, QMessageBox,
                               QProgressDialog, QPushButton, QStackedWidget, QVBoxLayout, QWidget)

from kamal_engine.checkpoints import atomic_write, read_checkpoint
from kamal_engine.errors import KamalError, UnsafeCheckpointError
from kamal_engine.events import format_duration, plural
from kamal_engine.recipe import TeacherEntry, load_recipe, parse_recipe
from kamal_engine.teacher import load_teacher

from .dialogs import ErrorLog, ImportTeacherDialog, ask_trust, show_error
from .pages.data_method import DataMethodPage
from .pages.export_test import ExportTestPage
from .pages.labels import LabelsPage
from .pages.results import ResultsPage
from .pages.teachers import TeachersPage
from .pages.train import TrainPage
from .session import RECIPE_HEADER, StudioSession, recipe_text
from .widgets import DialogFolders, remember_folder, start_folder, start_path
from .workers import WorkerHandle

CHECKPOINT_SUFFIXES = {".pt", ".pth", ".safetensors", ".bin", ".ckpt"}
MAX_RECENT = 8
AUTOSAVE_DELAY_MS = 1000
DEFAULT_SIZE = (1200, 760)  # fits a 1280x800 screen with its panels
LOG_LINES = 6  # the log dock's height on a first start
MINIMUM_SIZE = (1024, 700)  # every page stays usable down to this (its forms wrap or scroll vertically)
DEMO_PROGRESS_STEPS = 1000
DEMO_PROGRESS_SECONDS = 0.25  # the build reports its progress at least this often (while training)
PAGES = ("Teachers", "Labels", "Data & method", "Train", "Results", "Export & test")


def default_demo_dir() -> Path:
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
    return Path(base or Path.home() / ".kamal-studio") / "demo-workspace"


def default_size(window: QWidget) -> QSize:
    """The first start's window: DEFAULT_SIZE (every page fits it), less where the screen is smaller."""
    screen = window.screen().availableGeometry() if window.screen() is not None else None
    width, height = DEFAULT_SIZE
    if screen is not None:
        width, height = min(width, screen.width() - 40), min(height, screen.height() - 40)
    return QSize(max(MINIMUM_SIZE[0], width), max(MINIMUM_SIZE[1], height))


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
        metrics = self.fontMetrics()
        self.nav.setMaximumWidth(metrics.horizontalAdvance("Data & method") + 6 * metrics.averageCharWidth())
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
        ErrorLog.sink = self.train_page.append  # every error shown is also in the log
        # the log starts a few lines high: the pages get the height (the user can drag it taller)
        self.resizeDocks([self.log_dock], [self.fontMetrics().lineSpacing() * LOG_LINES], Qt.Orientation.Vertical)

        self._build_menus()
        self.session.changed.connect(self._session_changed)
        self.train_page.run_finished.connect(self.show_result)
        self.train_page.replan_requested.connect(self.replan)
        self.results_page.replan_requested.connect(self.replan)
        self.train_page.run_stopped.connect(self._update_start)
        self.results_page.student_saved.connect(lambda path: self.statusBar().showMessage(f"Saved {path}", 5000))
        geometry = self.settings.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
            self.restoreState(self.settings.value("window/state") or b"")
        else:
            self.resize(default_size(self))
        last = self.settings.value("dialogs/last_folder")
        DialogFolders.last = Path(last) if last else None
        self.autosave_timer = QTimer(self)  # unsaved work is on disk a second after each edit (crash, kill -9)
        self.autosave_timer.setSingleShot(True)
        self.autosave_timer.setInterval(AUTOSAVE_DELAY_MS)
        self.autosave_timer.timeout.connect(self.autosave)
        self._session_changed()
        self.setWindowModified(False)
        self.autosave_timer.stop()

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
        self.autosave_timer.start()
        if self.session.recipe_path is not None:
            DialogFolders.workspace = self.session.recipe_path.parent
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
            text = (f"Ready: {plural(self.session.distinct_count(), 'label')} from "
                    f"{plural(self.session.teachers_used(), 'teacher')}, method {self.session.recipe.method}.")
        if text != self.start_reason.text():  # a new text re-lays out the window: only when it changed
            self.start_reason.setText(text)

    def _update_device(self) -> None:
        from kamal_engine.devices import available_devices, resolve_device

        try:
            device = resolve_device(self.session.recipe.device)
        except KamalError:
            self.device_label.setText(f"Device: {self.session.recipe.device} is not available here")
            return
        key = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
        name = dict(available_devices()).get(key, key)
        text = "Device: CPU" if key == "cpu" else f"Device: {key} · {name}"
        n = self.session.recipe.nproc
        if n > 1:  # distributed data parallel
            text = f"Device: CPU, {n} processes" if key == "cpu" else f"Device: all {n} GPUs · {name}"
        self.device_label.setText(text)

    # --- teachers ---
    def add_teachers_dialog(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Add teacher checkpoints", str(start_folder()),
                                                "Checkpoints (*.pt *.pth *.safetensors *.bin *.ckpt);;All files (*)")
        remember_folder(paths[0] if paths else None)
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
            tasks = {t.teacher.task for t in self.session.teachers}
            dialog = ImportTeacherDialog(raw, trust, self, task_hint=tasks.pop() if len(tasks) == 1 else None)
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
        self._forget_autosave()
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
        path, _ = QFileDialog.getOpenFileName(self, "Open recipe", str(start_folder()), "Recipes (*.toml);;All files (*)")
        remember_folder(path)
        if path:
            self.open_recipe(Path(path))

    def open_recipe(self, path: Path, remember: bool = True) -> bool:
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
        if not remember:  # the autosave: not a recipe of the user's
            return True
        self.setWindowModified(False)
        self._forget_autosave()
        self._remember(path)
        self.statusBar().showMessage(f"Opened {path}", 5000)
        return True

    def save_recipe(self) -> bool:
        if self.session.recipe_path is None:
            return self.save_recipe_as()
        return self.write_recipe(self.session.recipe_path)

    def save_recipe_as(self) -> bool:
        start = start_path(self.session.recipe_path or start_folder() / f"{self.session.recipe.name}.toml")
        path, _ = QFileDialog.getSaveFileName(self, "Save recipe", start, "Recipes (*.toml)")
        remember_folder(path)
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
        self._forget_autosave()
        self._remember(path)
        self.statusBar().showMessage(f"Saved {path}", 5000)
        return True

    # --- demo workspace ---
    def open_demo_workspace(self, folder: Path | None = None, independent: bool = False) -> bool:
        """Open the demo workspace's recipe, building what is missing first (in a worker, with a progress
        dialog). ``independent``: the recipe of the teachers trained apart (``kamal demo --independent``)."""
        from kamal_engine import demo

        folder = Path(folder or self.settings.value("demo/folder", "") or default_demo_dir()).resolve()
        folder, why = demo.workspace_root(folder)  # a folder of the user's own: a sub-folder, theirs untouched
        if why:
            self.train_page.append(why)
        recipe = folder / "recipes" / ("filtered-ka-independent.toml" if independent else "filtered-ka.toml")
        built = demo.is_complete(folder)
        if built and (not independent or recipe.is_file() and all(p.is_file() for p in demo.independent_paths(folder))):
            return self.open_recipe(recipe)
        if self.demo_handle is not None:
            return False
        config = demo.DemoConfig()
        parts = demo.build_parts(config, demo=not built, independent=independent)
        what = "Training three ResNet teachers apart" if independent and built else "Building the demo workspace"
        estimate = format_duration(sum(parts.values()) / 1000)
        dialog = QProgressDialog(f"{what} (about {estimate} on an idle 2-core machine) …", "Cancel", 0,
                                 DEMO_PROGRESS_STEPS, self)
        dialog.setWindowTitle("KAmal Studio demo")
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.setMinimumDuration(0)
        dialog.setAutoReset(False)  # the bar full is not the end: the recipe opens after the build returns
        dialog.setAutoClose(False)
        self.demo_dialog, self.demo_folder, self.demo_recipe = dialog, folder, recipe
        self.demo_what, self.demo_message, self.demo_eta = what, "", f"about {estimate} left"

        def work(report, abort):  # runs in the worker thread: only the engine, no widgets
            def log(message):
                if abort.is_set():
                    raise KamalError("the demo build was cancelled; start it again from the File menu")
                report(message)
            meter = demo.BuildMeter(parts, log, every=DEMO_PROGRESS_SECONDS)  # Cancel is seen within a step
            manifest = None if built else demo.build_demo(folder, config, log=log, meter=meter)
            if independent:
                manifest = demo.build_independent(folder, config, log=log, meter=meter)
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
        """A log line or a :class:`~kamal_engine.demo.BuildProgress` of the build: the bar, the ETA, the part."""
        from kamal_engine.demo import BuildProgress

        if isinstance(message, BuildProgress):
            self.demo_dialog.setValue(int(DEMO_PROGRESS_STEPS * message.fraction))
            if message.eta_seconds is not None:
                self.demo_eta = f"{message.fraction:.0%} · about {format_duration(message.eta_seconds)} left"
        else:
            self.demo_message = " ".join(str(message).split())[:120]
        self.demo_dialog.setLabelText(f"{self.demo_what} …\n{self.demo_message}\n{self.demo_eta}")

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
        """Start the session's recipe. A folder holding another run (or files no run wrote) asks first:
        a run folder is the run's own, and an earlier run is moved aside, never deleted."""
        from kamal_engine.methods import get_method
        from kamal_engine.runfolder import holder_text, inspect_run_folder, lock_holder

        if self.session.start_blockers() or self.train_page.is_running():
            return
        recipe = self.session.to_recipe()
        holder = lock_holder(recipe.output_dir)
        if holder is not None:  # another run (a kamal run in a terminal, another window) is writing there
            QMessageBox.warning(self, "Output folder in use",
                                f"{recipe.output_dir} is in use by another run: {holder_text(holder)}. Wait for it "
                                "to finish or stop it, or choose another output folder on the Data & method page.")
            return
        info = inspect_run_folder(recipe.output_dir)
        resume = replace = False
        if info.state != "new":
            choice = self.ask_run_folder(info)
            if choice == "open":
                self.open_run(info.path)
                return
            if choice == "choose":
                self.choose_output_folder()
                return
            if choice not in ("resume", "replace"):
                return
            resume, replace = choice == "resume", choice == "replace"
        self.nav.setCurrentRow(PAGES.index("Train"))
        self.statusBar().clearMessage()  # not "Run finished" of the previous run
        self.train_page.start(recipe, resume=resume, data_free=get_method(recipe.method).mode == "data-free",
                              replace=replace)
        self._update_start()

    def replan(self, run_dir: Path, plan: dict) -> None:
        """Fine-tune another branch plan of the finished run in ``run_dir`` from its trained blocks, in a new
        run folder beside it (``kamal replan``; a folder already there is never reused: the next free name)."""
        from kamal_engine.methods import get_method
        from kamal_engine.replan import prepare_replan, replan_folder
        from kamal_engine.runfolder import free_sibling

        if self.train_page.is_running():
            QMessageBox.information(self, "A run is going", "Wait for the current run to finish (or cancel it), "
                                    "then fine-tune the plan.")
            return
        options = {"branch_at": dict(plan)}
        target = replan_folder(run_dir, options)
        if target.exists():
            target = free_sibling(target)
        try:
            recipe = prepare_replan(run_dir, options, output=target)
        except KamalError as exc:
            show_error(self, "Cannot fine-tune this plan", exc)
            return
        self.nav.setCurrentRow(PAGES.index("Train"))
        self.statusBar().showMessage(f"Fine-tuning another plan of {run_dir} into {target}", 10000)
        self.train_page.start(recipe, resume=True, data_free=get_method(recipe.method).mode == "data-free")
        self._update_start()

    def ask_run_folder(self, info) -> str | None:
        """What to do with a folder that holds a run or foreign files: "resume", "replace", "open", "choose"
        (another folder), or None (cancel)."""
        from kamal_engine.runfolder import aside_path

        aside = aside_path(info.path).name
        if info.state == "unfinished":
            title, text = "Unfinished run", (f"{info.path} holds an unfinished run."
                                             + (" Resume it after its last finished block, or start over?"
                                                if info.resumable else " No block of it has finished yet."))
        elif info.state == "finished":
            title, text = "Finished run", f"{info.path} holds a finished run. Open its results, or replace it?"
        else:
            shown = ", ".join(info.foreign)
            title, text = "Folder in use", (f"{info.path} holds files that no run wrote ({shown}). A run never "
                                            "writes into such a folder: choose another output folder.")
        box = QMessageBox(QMessageBox.Icon.Question, title, text, parent=self)
        buttons = {}
        if info.state == "unfinished" and info.resumable:
            buttons[box.addButton("Resume", QMessageBox.ButtonRole.AcceptRole)] = "resume"
        if info.state == "finished":
            buttons[box.addButton("Open results", QMessageBox.ButtonRole.AcceptRole)] = "open"
        if info.is_run:
            replace = box.addButton("Start over" if info.state == "unfinished" else "Replace it",
                                    QMessageBox.ButtonRole.DestructiveRole)
            replace.setToolTip(f"The earlier run is moved to {aside} beside it; nothing is deleted.")
            buttons[replace] = "replace"
            box.setInformativeText(f"Starting over moves the earlier run to {aside}; nothing is deleted.")
        buttons[box.addButton("Choose another folder…", QMessageBox.ButtonRole.ActionRole)] = "choose"
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        return buttons.get(box.clickedButton())

    def choose_output_folder(self) -> bool:
        """Ask for the run's output folder (the Data & method page shows it)."""
        current = self.session.recipe.output_dir
        start = start_folder(current.parent if current is not None else None)
        folder = QFileDialog.getExistingDirectory(self, "Output folder of the run", str(start))
        remember_folder(folder)
        if not folder:
            return False
        self.session.set_output_dir(Path(folder).resolve())
        self.session.notify()
        self.nav.setCurrentRow(PAGES.index("Data & method"))
        return True

    # --- results ---
    def show_result(self, result) -> None:
        self.results_page.set_result(result.output_dir, result.student, result.report)
        self.export_page.set_student(result.output_dir / "student.kamal.pt", result.student.labels)
        self.statusBar().showMessage(f"Run finished: {result.output_dir}", 10000)

    def open_run_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a run's output folder",
                                                  str(start_folder(self.session.recipe.output_dir)))
        remember_folder(folder)
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

    # --- keeping the user's work ---
    def autosave_path(self) -> Path:
        """Beside the settings file: the session as a recipe, written a second after each unsaved edit."""
        return Path(self.settings.fileName()).resolve().parent / "kamal-studio-autosave.toml"

    def autosave(self) -> bool:
        """Write the unsaved session to :meth:`autosave_path` (atomically); restored on the next start."""
        self.autosave_timer.stop()
        if not self.isWindowModified() or not self.session.teachers:
            return False
        path = self.autosave_path()
        try:
            text = recipe_text(self.session.to_recipe(path), path)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_text(text))
        except (KamalError, OSError) as exc:
            self.statusBar().showMessage(f"Could not keep the unsaved session in {path}: {exc}", 10000)
            return False
        self.settings.setValue("session/autosave_of", str(self.session.recipe_path or ""))
        self.settings.setValue("session/output_unset", self.session.recipe.output_dir is None)
        return True

    def _forget_autosave(self) -> None:
        self.autosave_timer.stop()
        path = self.autosave_path()
        try:
            ours = path.read_text().startswith(RECIPE_HEADER)  # a file of that name not saved by the app stays
        except (OSError, UnicodeDecodeError):
            ours = False
        if ours:
            path.unlink(missing_ok=True)
        self.settings.remove("session/autosave_of")
        self.settings.remove("session/output_unset")

    def restore_session(self) -> bool:
        """Bring back the last session: its unsaved edits (the autosave), else the recipe it had open."""
        path = self.autosave_path()
        if path.is_file():
            original = self.settings.value("session/autosave_of") or ""
            output_unset = self.settings.value("session/output_unset", False, type=bool)
            if self.open_recipe(path, remember=False):
                self.session.recipe_path = Path(original) if original else None
                if output_unset:
                    self.session.edit(output_dir=None)
                self.session.notify()  # modified: the edits are still unsaved
                self.statusBar().showMessage("Restored the unsaved session of the last time the app ran", 10000)
                return True
        last = self.settings.value("session/recipe") or ""
        if last and Path(last).is_file():
            return self.open_recipe(Path(last))
        return False

    def ask_save_changes(self) -> str:
        """"save", "discard" or "cancel": what to do with unsaved changes before quitting."""
        box = QMessageBox(QMessageBox.Icon.Question, "Save changes?",
                          f"The recipe '{self.session.recipe.name}' has unsaved changes. Save them before quitting?",
                          QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
                          | QMessageBox.StandardButton.Cancel, self)
        box.setDefaultButton(QMessageBox.StandardButton.Save)
        answer = box.exec()
        return {QMessageBox.StandardButton.Save: "save",
                QMessageBox.StandardButton.Discard: "discard"}.get(QMessageBox.StandardButton(answer), "cancel")

    def closeEvent(self, event) -> None:
        if self.isWindowModified() and self.session.teachers:
            answer = self.ask_save_changes()
            if answer == "cancel" or (answer == "save" and not self.save_recipe()):
                event.ignore()
                return
            if answer == "discard":
                self._forget_autosave()
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
        self.settings.setValue("session/recipe", str(self.session.recipe_path or ""))
        if DialogFolders.last is not None:
            self.settings.setValue("dialogs/last_folder", str(DialogFolders.last))
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.sync()
        super().closeEvent(event)
