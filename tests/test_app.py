"""The desktop app (pytest-qt, offscreen): teachers, labels, data & method, recipes, drop, errors, Start."""

import shutil
from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from kamal_app import dialogs
from kamal_app.main_window import MainWindow
from kamal_app.workers import running_handles
from kamal_engine.cli import main as kamal
from kamal_engine.recipe import load_recipe


@pytest.fixture(autouse=True)
def no_threads_left():
    yield
    leftover = running_handles()
    for handle in leftover:
        handle.stop()
    assert not leftover, "a test left a worker thread running"


@pytest.fixture
def window(qtbot, tmp_path):
    w = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    return w


@pytest.fixture
def auto_import(monkeypatch):
    """The import dialog of a foreign checkpoint, answered like a user would for the demo's 5-9 teacher."""
    seen = []

    def exec_(self):
        seen.append(self)
        assert self.arch.currentText() == "smallnet"  # detected from the weights
        assert self.labels_from_file.isChecked() and self.labels_file.path().name == "digits_5to9.labels.txt"
        self.task.setCurrentIndex(self.task.findData("multilabel"))
        self.input_size.setValue(56)
        self.accept()
        return self.result()

    monkeypatch.setattr(dialogs.ImportTeacherDialog, "exec", exec_)
    return seen


class ModalCloser:
    """Closes the next modal dialogs (error boxes) as a user would, remembering their text."""

    def __init__(self):
        self.texts = []
        self.timer = QTimer()
        self.timer.timeout.connect(self._check)
        self.timer.start(50)

    def _check(self):
        modal = QApplication.activeModalWidget()
        if isinstance(modal, QMessageBox):
            self.texts.append(modal.text())
            modal.done(0)


def demo_files(root):
    return root / "teachers" / "digits_0to4.kamal.pt", root / "teachers" / "digits_5to9.pth"


def test_start_is_disabled_with_a_visible_reason_until_everything_is_chosen(window, quick_demo, auto_import, tmp_path):
    root, _ = quick_demo
    assert not window.start_button.isEnabled() and "add at least one teacher" in window.start_reason.text()
    assert window.add_teacher_files(list(demo_files(root))) == 2
    assert len(auto_import) == 1  # only the bare state_dict needed the import dialog
    assert "choose a folder of unlabeled images" in window.start_reason.text()
    page = window.labels_page
    for i in range(page.tree.topLevelItemCount()):
        page.tree.setCurrentItem(page.tree.topLevelItem(i))
        page.none_button.click()
    assert window.session.selected_count() == 0 and "tick at least one label" in window.start_reason.text()
    window.data_page.mode_free.setChecked(True)
    assert window.session.mode == "data-free" and "folder of unlabeled images" not in window.start_reason.text()
    # no data-free method is registered yet: the list says so and Start says why
    assert window.data_page.methods.count() == 0
    assert "No data-free method is available" in window.data_page.method_info.text()
    assert "choose a data-free method" in window.start_reason.text()
    window.data_page.mode_data.setChecked(True)
    assert window.data_page.methods.count() == 2 and window.session.method == "filtered-ka"


def test_load_tick_save_open_gives_the_identical_state_and_kamal_run_runs_it(window, quick_demo, auto_import,
                                                                            tmp_path, qtbot):
    root, _ = quick_demo
    window.add_teacher_files(list(demo_files(root)))
    teachers = window.session.teachers
    assert [t.teacher.task for t in teachers] == ["multilabel", "multilabel"]
    # tick: only 'one' and 'three' of teacher 1, every label but 'nine' of teacher 2
    tree = window.labels_page.tree
    first, second = tree.topLevelItem(0), tree.topLevelItem(1)
    for j in range(first.childCount()):
        first.child(j).setCheckState(0, Qt.CheckState.Checked if first.child(j).text(0) in ("one", "three")
                                     else Qt.CheckState.Unchecked)
    second.child(4).setCheckState(0, Qt.CheckState.Unchecked)
    qtbot.waitUntil(lambda: window.session.selected_count() == 6)
    assert teachers[0].selected == ["one", "three"] and "nine" not in teachers[1].selected
    assert "6</b> of 10 labels selected" in window.labels_page.count.text()
    # data & method
    page = window.data_page
    page.unlabeled.set_path(root / "data" / "unlabeled", emit=True)
    assert page.image_count.text().startswith(f"{len(list((root / 'data' / 'unlabeled').rglob('*.png'))):,} images")
    assert page.thumbnails.count() > 0
    page.validation.set_path(root / "data" / "validation" / "labels.csv", emit=True)
    page.output.set_path(tmp_path / "run-out", emit=True)
    for name, value in (("epochs_per_block", 1), ("finetune_epochs", 1), ("batch_size", 32)):
        page._param_widgets[name][1].setValue(value)
    lr = page._param_widgets["lr"][1]
    lr.setText("0.02")
    lr.editingFinished.emit()
    assert window.session.params == {"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32, "lr": 0.02}
    assert window.start_button.isEnabled(), window.start_reason.text()

    path = tmp_path / "recipes" / "mine.toml"
    assert window.write_recipe(path)
    assert window.settings.value("recent") == [str(path.resolve())]
    other = MainWindow(QSettings(str(tmp_path / "other.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(other)
    assert other.open_recipe(path)
    assert other.session.state() == window.session.state()
    assert other.labels_page.count.text() == window.labels_page.count.text()
    # the saved file is a plain recipe: the command line reads and runs it
    recipe = load_recipe(path)
    assert [t.select for t in recipe.teachers] == [["one", "three"], ["five", "six", "seven", "eight"]]
    assert kamal(["run", str(path)]) == 0
    assert (tmp_path / "run-out" / "student.kamal.pt").is_file()


def test_dropping_a_checkpoint_on_the_window_loads_it(window, quick_demo, qtbot):
    root, _ = quick_demo
    data = QMimeData()
    data.setUrls([QUrl.fromLocalFile(str(demo_files(root)[0]))])
    event = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, data, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)
    qtbot.waitUntil(lambda: len(window.session.teachers) == 1)
    from kamal_engine.profile import count_parameters

    table = window.teachers_page.table
    assert table.rowCount() == 1 and table.item(0, 0).text() == "digits_0to4"
    assert [table.item(0, c).text() for c in (1, 2, 3)] == ["smallnet", "multi-label", "5"]
    assert table.item(0, 4).text() == f"{count_parameters(window.session.teachers[0].teacher.model):,}"


def test_a_bad_file_shows_an_error_naming_it_and_the_window_stays_usable(window, quick_demo, tmp_path, qtbot):
    root, _ = quick_demo
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")
    closer = ModalCloser()
    assert window.add_teacher_files([bad]) == 0
    assert closer.texts and str(bad) in closer.texts[0]
    bad_recipe = tmp_path / "bad.toml"
    bad_recipe.write_text('[run]\nname = "x"\nbogus = 1\n')
    assert not window.open_recipe(bad_recipe)
    assert "bogus" in closer.texts[-1] and str(bad_recipe) in closer.texts[-1]
    assert window.isVisible() and window.session.teachers == []
    assert window.add_teacher_files([demo_files(root)[0]]) == 1  # still works
    closer.timer.stop()


def test_a_label_offered_by_two_teachers_is_marked_and_ticked_once(window, quick_demo, tmp_path, qtbot):
    root, _ = quick_demo
    copy = tmp_path / "copy.kamal.pt"
    shutil.copy(demo_files(root)[0], copy)
    window.add_teacher_files([demo_files(root)[0], copy])
    names = [t.name for t in window.session.teachers]
    assert names[0] == "digits_0to4" and names[1] != names[0]  # names stay unique
    second = window.labels_page.tree.topLevelItem(1)
    assert second.child(0).text(1) == "digits_0to4" and second.child(0).font(0).italic()
    assert window.session.teachers[1].selected == []  # already ticked in the first teacher
    second.child(0).setCheckState(0, Qt.CheckState.Checked)
    qtbot.waitUntil(lambda: window.session.teachers[1].selected == ["zero"])
    assert "ticked in more than one teacher" in window.start_reason.text()


def test_filter_and_select_all_none(window, quick_demo, qtbot):
    root, _ = quick_demo
    window.add_teacher_files([demo_files(root)[0]])
    page = window.labels_page
    page.filter.setText("th")
    top = page.tree.topLevelItem(0)
    visible = [top.child(j).text(0) for j in range(top.childCount()) if not top.child(j).isHidden()]
    assert visible == ["three"]
    page.tree.setCurrentItem(top)
    page.none_button.click()  # only the shown labels
    assert window.session.teachers[0].selected == ["zero", "one", "two", "four"]
    page.filter.clear()
    page.all_button.click()
    assert window.session.teachers[0].selected == ["zero", "one", "two", "three", "four"]


def test_geometry_and_recent_files_are_remembered(qtbot, tmp_path, quick_demo):
    settings_file = str(tmp_path / "settings.ini")
    w = MainWindow(QSettings(settings_file, QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.resize(700, 500)
    w.show()
    recipe = quick_demo[0] / "recipes" / "filtered-ka.toml"
    assert w.open_recipe(recipe)
    w.close()
    again = MainWindow(QSettings(settings_file, QSettings.Format.IniFormat))
    qtbot.addWidget(again)
    assert (again.width(), again.height()) == (700, 500)
    assert again.recent_files() == [recipe.resolve()]
    assert [a.text() for a in again.recent_menu.actions()] == [str(recipe.resolve())]


def test_standard_shortcuts(window):
    from PySide6.QtGui import QKeySequence

    assert window.open_action.shortcut() == QKeySequence(QKeySequence.StandardKey.Open)
    assert window.save_action.shortcut() == QKeySequence(QKeySequence.StandardKey.Save)
    assert window.quit_action.shortcut() == QKeySequence(QKeySequence.StandardKey.Quit)


def _tiny_demo_window(window, root, out):
    assert window.open_recipe(root / "recipes" / "filtered-ka.toml")
    window.session.output_dir = out
    window.session.params = {"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32}
    window.session.device = "cpu"
    window.session.onnx = None
    window.session.notify()
    assert window.start_button.isEnabled(), window.start_reason.text()


def test_start_runs_in_a_worker_and_finishes(window, quick_demo, tmp_path, qtbot):
    root, _ = quick_demo
    _tiny_demo_window(window, root, tmp_path / "gui-run")
    window.start_button.click()
    assert window.pages.currentWidget() is window.train_page and not window.start_button.isEnabled()
    with qtbot.waitSignal(window.train_page.run_finished, timeout=120000) as blocker:
        pass
    qtbot.waitUntil(lambda: not window.train_page.is_running())
    assert blocker.args[0].output_dir == tmp_path / "gui-run"
    assert (tmp_path / "gui-run" / "student.kamal.pt").is_file()
    log = window.train_page.log.toPlainText()
    assert "Branch points:" in log and "Finished in" in log
    qtbot.waitUntil(window.start_button.isEnabled)


def test_cancel_stops_within_a_second_and_keeps_finished_blocks(window, quick_demo, tmp_path, qtbot):
    import time

    root, _ = quick_demo
    _tiny_demo_window(window, root, tmp_path / "gui-cancel")
    window.start_button.click()
    qtbot.waitUntil(lambda: "converged loss at b1" in window.train_page.log.toPlainText(), timeout=60000)
    started = time.monotonic()
    window.train_page.cancel_button.click()
    qtbot.waitUntil(lambda: not window.train_page.is_running(), timeout=5000)
    assert time.monotonic() - started < 1.0
    assert "Cancelled" in window.train_page.stage.text()
    from kamal_engine.runner import has_unfinished_run

    assert has_unfinished_run(tmp_path / "gui-cancel")


def test_the_demo_workspace_is_built_with_a_progress_dialog_then_opened(window, tmp_path, qtbot, monkeypatch):
    from kamal_engine import demo

    quick = demo.DemoConfig.quick()
    monkeypatch.setattr(demo, "DemoConfig", lambda: quick)
    folder = tmp_path / "fresh-demo"
    messages = []
    assert window.open_demo_workspace(folder)
    window.demo_handle.worker.yielded.connect(messages.append)
    assert window.demo_dialog.isVisible() and not window.start_button.isEnabled()
    qtbot.waitUntil(lambda: window.demo_handle is None, timeout=120000)
    assert demo.is_complete(folder) and messages
    assert [t.name for t in window.session.teachers] == ["digits_0to4", "digits_5to9"]
    assert window.session.recipe_path == (folder / "recipes" / "filtered-ka.toml").resolve()
    assert window.settings.value("demo/folder") == str(folder.resolve())
