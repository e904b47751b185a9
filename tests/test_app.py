"""The desktop app (pytest-qt, offscreen): teachers, labels, data & method, recipes, drop, errors, Start."""

import os
import shutil

import pytest
from PySide6.QtCore import QMimeData, QPointF, QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from kamal_app import dialogs
from kamal_app.main_window import MainWindow
from kamal_engine.cli import main as kamal
from kamal_engine.recipe import load_recipe


# what the Export & test page says ran each image, on a machine without a GPU (CI's)
PROVIDER_SHOWN = {"onnx": "ONNX Runtime on CPUExecutionProvider", "torch": "PyTorch on cpu"}


@pytest.fixture
def window(qtbot, tmp_path):
    w = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    # a failed test may leave a run going: stop it so that closing the window does not ask
    # and a test's unsaved edits must not ask "Save changes?" at the end
    qtbot.addWidget(w, before_close_func=lambda widget: (widget.train_page.stop_and_wait(),
                                                         widget.export_page.stop_and_wait(),
                                                         widget.setWindowModified(False)))
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
    assert window.session.recipe.mode == "data-free" and "folder of unlabeled images" not in window.start_reason.text()
    # only the data-free methods are offered, and Start still says what is missing
    assert window.data_page.methods.count() == 2 and window.session.recipe.method == "dual-gan"
    assert "Group-Stack Dual-GAN" in window.data_page.method_info.text()
    assert "tick at least one label" in window.start_reason.text()
    window.data_page.mode_data.setChecked(True)
    assert window.data_page.methods.count() == 3 and window.session.recipe.method == "filtered-ka"  # + adaptive-ka, kd


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
    assert window.session.recipe.params == {"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32, "lr": 0.02}
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


def test_student_can_start_from_a_weights_file_and_the_recipe_keeps_it(window, quick_demo, auto_import, tmp_path,
                                                                        qtbot, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    from kamal_engine.demo import pretrained_path

    root, _ = quick_demo
    window.add_teacher_files(list(demo_files(root)))
    combo, answers = window.data_page.student_init, ["", str(pretrained_path(root))]
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *args: (answers.pop(0), ""))
    combo.setCurrentIndex(combo.findData("teacher:2"))
    assert (window.session.recipe.student_init, window.session.recipe.student_teacher) == ("teacher", 2)
    window.data_page.refresh()  # what opening a recipe does: teacher 2 is shown again, not the first item
    assert combo.currentData() == "teacher:2"
    combo.setCurrentIndex(combo.findData("random"))
    assert window.session.recipe.student_init == "random"
    combo.setCurrentIndex(combo.findData("browse"))  # cancelled: the previous choice stays
    assert window.session.recipe.student_init == "random" and combo.currentData() == "random"
    combo.setCurrentIndex(combo.findData("browse"))
    assert window.session.recipe.student_init == "checkpoint"
    assert window.session.recipe.student_checkpoint == pretrained_path(root).resolve()
    assert combo.currentText() == "weights file: backbone_digits.kamal.pt"
    path = tmp_path / "recipes" / "pre.toml"
    window.data_page.unlabeled.set_path(root / "data" / "unlabeled", emit=True)
    window.data_page.output.set_path(tmp_path / "out", emit=True)
    assert window.write_recipe(path)
    assert 'init = "checkpoint"' in path.read_text()
    assert load_recipe(path).student_checkpoint == pretrained_path(root).resolve()
    other = MainWindow(QSettings(str(tmp_path / "other.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(other)
    assert other.open_recipe(path)
    assert other.session.state() == window.session.state()
    assert other.data_page.student_init.currentText() == "weights file: backbone_digits.kamal.pt"


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
    w.show()
    size = w.minimumSizeHint()
    wanted = (size.width() + 37, size.height() + 23)
    w.resize(*wanted)
    recipe = quick_demo[0] / "recipes" / "filtered-ka.toml"
    assert w.open_recipe(recipe)
    w.close()
    again = MainWindow(QSettings(settings_file, QSettings.Format.IniFormat))
    qtbot.addWidget(again)
    assert (again.width(), again.height()) == wanted
    assert again.recent_files() == [recipe.resolve()]
    assert [a.text() for a in again.recent_menu.actions()] == [str(recipe.resolve())]


def test_standard_shortcuts(window):
    from PySide6.QtGui import QKeySequence

    assert window.open_action.shortcut() == QKeySequence(QKeySequence.StandardKey.Open)
    assert window.save_action.shortcut() == QKeySequence(QKeySequence.StandardKey.Save)
    assert window.quit_action.shortcut() == QKeySequence(QKeySequence.StandardKey.Quit)


def _tiny_demo_window(window, root, out):
    assert window.open_recipe(root / "recipes" / "filtered-ka.toml")
    window.session.edit(output_dir=out, params={"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32},
                        device="cpu", onnx=None)
    window.session.notify()
    assert window.start_button.isEnabled(), window.start_reason.text()


def test_the_whole_demo_flow_start_plot_results_export_test(window, quick_demo, tmp_path, qtbot, capsys):
    import json

    root, _ = quick_demo
    _tiny_demo_window(window, root, tmp_path / "gui-run")
    window.start_button.click()
    assert window.pages.currentWidget() is window.train_page and not window.start_button.isEnabled()
    page = window.train_page
    qtbot.waitUntil(lambda: page.monitor.points > 0 and bool(page.curves), timeout=60000)  # the plot receives points
    curve = next(iter(page.curves.values()))
    assert len(curve.getData()[0]) > 0 and curve.getData()[0].dtype.name == "float64"
    with qtbot.waitSignal(page.run_finished, timeout=120000):
        pass
    qtbot.waitUntil(lambda: not page.is_running())
    assert (tmp_path / "gui-run" / "student.kamal.pt").is_file()
    assert "Branch points:" in page.log.toPlainText() and window.log_dock.widget() is page.log
    assert page.monitor.plan and set(page.monitor.converged) == set(page.monitor.plan)
    assert page.heartbeat.ticks > 10
    # the branch plans: every plan a point on the Train page's size/quality tab, the chosen one starred
    chart = page.plan_chart
    assert page.branch_tabs.currentWidget() is chart and chart.rows and chart.chosen is not None
    assert len(chart.points.data) == len(chart.rows) and len(chart.star.data) == 1
    assert chart.points.getData()[0].dtype.name == "float64"
    assert chart.quality.currentData() == "mean_ap"  # with a validation set: the mAP before fine-tuning
    # results: the table is filled, one row per label plus mAP, parameters and FLOPs
    results = window.results_page
    labels = results.student.labels
    assert results.table.rowCount() == len(labels) + 3
    assert results.table.item(len(labels) + 1, 0).text() == "Parameters"
    assert results.table.item(len(labels) + 2, 4).text().endswith("×")
    assert results.tabs.isTabVisible(1) and results.plan_chart.rows == chart.rows
    assert all(results.table.item(r, 3).text() for r in range(len(labels) + 1))  # student AP
    assert all(results.table.item(r, 2).text() for r in range(len(labels) + 1))  # teacher AP
    assert "parameters" in results.sizes.text() and results.diagram.layout_info["trunk"]
    saved = results.save_student(tmp_path / "copy" / "saved.kamal.pt")
    assert saved.is_file()
    # export, verified
    export = window.export_page
    export.onnx_edit.set_path(tmp_path / "gui.onnx")
    with qtbot.waitSignal(export.exported, timeout=60000) as blocker:
        export.export_button.click()
    assert blocker.args[0].max_abs_diff["logits"] <= 1e-4 and (tmp_path / "gui.onnx").is_file()
    qtbot.waitUntil(lambda: export.handle is None)
    assert "onnx.checker passed" in export.export_result.text()
    # test one image: the same probabilities as `kamal predict` on it, in both runtimes
    image = sorted((root / "data" / "validation" / "images").glob("*.png"))[0]
    export.set_images([image])
    for runtime, model in (("onnx", tmp_path / "gui.onnx"), ("torch", tmp_path / "gui-run" / "student.kamal.pt")):
        export.runtime.setCurrentIndex(export.runtime.findData(runtime))
        shown = export.probabilities[runtime][0]
        capsys.readouterr()
        assert kamal(["predict", str(model), str(image), "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)["images"][0]["probabilities"]
        assert list(cli) == export.labels
        assert max(abs(a - b) for a, b in zip(shown, cli.values())) <= 1e-6
        assert export.table.rowCount() == 1 and export.table.item(0, 1).text() == f"{shown[0]:.3f}"
        assert export.provider.text().startswith(PROVIDER_SHOWN[runtime]), export.provider.text()
    # latency of both runtimes, measured in a worker
    export.latency_button.click()
    qtbot.waitUntil(lambda: export.handle is None and "Latency" in export.latency.text(), timeout=60000)
    assert "ONNX Runtime" in export.latency.text() and "PyTorch" in export.latency.text()
    qtbot.waitUntil(window.start_button.isEnabled)


def test_results_of_a_finished_run_can_be_opened(window, quick_student, qtbot):
    out, result = quick_student
    assert window.open_run(out)
    assert window.pages.currentWidget() is window.results_page
    assert window.results_page.table.rowCount() == len(result.student.labels) + 3
    assert window.export_page.student_path == out / "student.kamal.pt"
    closer = ModalCloser()
    assert not window.open_run(out.parent)  # not a run folder: an error naming it
    assert closer.texts and "report.json" in closer.texts[0]
    closer.timer.stop()


def test_data_free_plots_and_sample_grid_follow_their_events(window, qtbot):
    import torch

    from kamal_engine import events as ev

    page = window.train_page
    page.free_box.setVisible(False)
    for step in range(1, 4):
        page.events.put(ev.StepLosses(step, 10, "generator", None, 1, {"loss": 1.0 / step, "generator:oh": 0.5,
                                                                        "generator:ie": float("nan")}, 50.0, 3.0))
    page.events.put(ev.SamplesGenerated(3, torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)))
    page.redraw()
    assert not page.free_box.isHidden()
    assert set(page.generator_curves) == {"oh", "ie"}
    assert page.samples.pixmap() is not None and not page.samples.pixmap().isNull()


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
    """One build: a bar over the whole build with an overall ETA, then the workspace opened."""
    from kamal_engine import demo

    quick = demo.DemoConfig.quick()
    monkeypatch.setattr(demo, "DemoConfig", lambda: quick)
    folder = tmp_path / "fresh-demo"
    messages, values, labels = [], [], []
    assert window.open_demo_workspace(folder)
    dialog = window.demo_dialog
    assert dialog.maximum() == 1000 and "idle 2-core machine" in dialog.labelText()
    window.demo_handle.worker.yielded.connect(
        lambda m: (messages.append(m), values.append(dialog.value()), labels.append(dialog.labelText())))
    assert dialog.isVisible() and not window.start_button.isEnabled()
    qtbot.waitUntil(lambda: window.demo_handle is None, timeout=120000)
    assert demo.is_complete(folder) and messages
    assert values == sorted(values) and len(set(values)) > 10 and max(values) >= 990
    assert any("left" in text and "%" in text for text in labels)
    assert [t.name for t in window.session.teachers] == ["digits_0to4", "digits_5to9"]
    assert window.session.recipe_path == (folder / "recipes" / "filtered-ka.toml").resolve()
    assert window.settings.value("demo/folder") == str(folder.resolve())


def test_the_demo_with_teachers_trained_apart_is_built_once_then_opened(window, quick_demo, tmp_path, qtbot,
                                                                        monkeypatch):
    import shutil

    from kamal_engine import demo

    tiny = (demo.IndependentTeacher("apart_a", "smallnet", (0, 1, 2, 3, 4), 0, 11, 2, {"width": 8}),
            demo.IndependentTeacher("apart_b", "smallnet", (5, 6, 7, 8, 9), 1, 12, 2, {"width": 8}))
    build, paths = demo.build_independent, demo.independent_paths
    monkeypatch.setattr(demo, "build_independent",
                        lambda root, config, log, meter=None: build(root, config, log=log, teachers=tiny, meter=meter))
    errors = []
    monkeypatch.setattr("kamal_app.main_window.show_error", lambda parent, title, exc: errors.append(exc))
    monkeypatch.setattr(demo, "independent_paths", lambda root, teachers=tiny: paths(root, teachers))
    monkeypatch.setattr(demo, "DemoConfig", demo.DemoConfig.quick)
    root, _ = quick_demo
    folder = tmp_path / "demo"
    for part in ("data", "demo.json", "recipes", "teachers"):
        (shutil.copytree if (root / part).is_dir() else shutil.copy)(root / part, folder / part)
    assert window.open_demo_workspace(folder, independent=True)
    assert "apart" in window.demo_dialog.labelText() and not window.start_button.isEnabled()
    qtbot.waitUntil(lambda: window.demo_handle is None, timeout=120000)
    assert not errors
    recipe = (folder / "recipes" / "filtered-ka-independent.toml").resolve()
    assert window.session.recipe_path == recipe
    assert [t.name for t in window.session.teachers] == ["apart_a", "apart_b"]
    assert window.open_demo_workspace(folder, independent=True) and window.demo_handle is None  # opened, no build


def test_the_onnx_export_moves_with_the_output_folder_and_a_users_own_path_stays(window, quick_demo, tmp_path):
    """A run into another folder must not write its ONNX file into the demo run's folder, over its file."""
    root, _ = quick_demo
    assert window.open_recipe(root / "recipes" / "filtered-ka.toml")
    demo_run = (root / "runs" / "filtered-ka").resolve()
    assert window.session.recipe.onnx.resolve() == demo_run / "student.onnx"
    window.data_page.output.set_path(tmp_path / "gui-one", emit=True)
    assert window.session.recipe.onnx == (tmp_path / "gui-one").resolve() / "student.onnx"
    assert window.session.to_recipe().onnx == window.session.recipe.onnx
    mine = tmp_path / "exports" / "mine.onnx"
    window.session.edit(onnx=mine)
    window.data_page.output.set_path(tmp_path / "gui-two", emit=True)
    assert window.session.recipe.onnx == mine and window.session.recipe.output_dir == (tmp_path / "gui-two").resolve()


def test_the_qt_binding_keeps_none_alive_through_many_paints(qtbot):
    """PySide6 6.12.0 drops a reference to None on each Python ``paint`` override call: on Python
    < 3.12 the app then aborts mid-run ("deallocating None"). The pinned binding must not."""
    import sys

    from PySide6.QtWidgets import QGraphicsRectItem, QGraphicsScene, QGraphicsView

    class Item(QGraphicsRectItem):
        def paint(self, painter, *args):
            super().paint(painter, *args)

    scene = QGraphicsScene()
    scene.addItem(Item(0, 0, 10, 10))
    view = QGraphicsView(scene)
    qtbot.addWidget(view)
    view.show()
    before = sys.getrefcount(None)
    for _ in range(300):
        view.viewport().repaint()
    assert sys.getrefcount(None) > before - 100


def test_converged_lines_are_created_a_few_per_tick_and_the_stars_follow_the_plan(window):
    from kamal_engine import events as ev
    from kamal_app.pages.train import NEW_LINES_PER_TICK

    page = window.train_page
    tasks = [f"label{i}" for i in range(10)]
    for block in (1, 2):
        page.events.put(ev.BlockConverged(block, f"b{block}", {t: 1.0 / (block + i) for i, t in enumerate(tasks)}))
    page.redraw()
    assert len(page.converged_curves) == NEW_LINES_PER_TICK  # one tick creates only a few (no long stall)
    assert "converged" in page.monitor.dirty
    for _ in range(10):
        page.redraw()
    assert list(page.converged_curves) == tasks and "converged" not in page.monitor.dirty
    x, y = page.converged_curves["label3"][0].getData()
    assert list(x) == [1.0, 2.0] and list(y) == [1.0 / 4, 1.0 / 5]
    page.events.put(ev.BranchPlanChosen({"label3": "b2", "label7": "b1"}))
    page.redraw()
    stars = sorted(tuple(p) for p in zip(*page.branch_stars.getData()))
    assert stars == [(1.0, 1.0 / 8), (2.0, 1.0 / 5)]


def test_the_stage_and_eta_lines_are_visible_and_change_without_a_relayout(window, qtbot):
    from kamal_engine import events as ev

    window.nav.setCurrentRow(3)
    page = window.train_page
    qtbot.waitExposed(window)
    page.events.put(ev.StepLosses(5, 100, "amalgamate", 2, 1, {"loss": 0.5, "teacher:t": 0.5}, 123.0, 84.0))
    page.redraw()
    assert page.eta.text() == "ETA 1m24s" and page.eta.isVisible() and page.eta.width() > 40
    assert "Block 2" in page.stage.text() and "123 img/s" in page.stage.text() and page.stage.width() > 200


def test_the_knowledge_table_and_warning_follow_the_diagnosis(window, qtbot):
    from kamal_engine import events as ev

    window.nav.setCurrentRow(3)
    page = window.train_page
    qtbot.waitExposed(window)
    assert not page.knowledge.isVisible() and not page.warning.isVisible()
    row = {"filter": "se", "related_before": 0.8, "related_after": 0.9, "share": 0.97, "gap": 0.01}
    page.events.put(ev.BlockDiagnosed(1, "b1", {"t_a": row, "t_b": {**row, "filter": "adapter", "share": 0.42}}))
    page.redraw()
    text = page.knowledge.text()
    assert page.knowledge.isVisible() and "t_a" in text and "97%" in text and "42%" in text and "adapter" in text
    assert "linear CKA" in page.knowledge.toolTip() and not page.warning.isVisible()
    page.events.put(ev.RunWarning("the student reproduces t_b only 42 % of the way at every block"))
    page.redraw()
    assert page.warning.isVisible() and "t_b only 42 %" in page.warning.text()
    assert "Warning: the student reproduces t_b" in page.log.toPlainText()


# --- issue: nothing overwritten, nothing forgotten ---------------------------------------------------

class Answer:
    """Answers the next message boxes by clicking the buttons named ``texts`` in turn, as a user would."""

    def __init__(self, *texts):
        self.queue, self.seen, self.errors = list(texts), [], []
        self.timer = QTimer()
        self.timer.timeout.connect(self._check)
        self.timer.start(30)

    @property
    def done(self):
        return not self.queue

    def _check(self):
        modal = QApplication.activeModalWidget()
        if not isinstance(modal, QMessageBox) or not self.queue:
            return
        self.seen.append(modal.text() + "\n" + modal.informativeText())
        wanted = self.queue.pop(0)
        for button in modal.buttons():
            if button.text().replace("&", "") == wanted:
                button.click()
                break
        else:
            self.errors.append(f"no button {wanted!r} in {[b.text() for b in modal.buttons()]}")
            modal.done(0)
        if not self.queue:
            self.timer.stop()


def _run_to_the_end(window, qtbot):
    page = window.train_page
    qtbot.waitUntil(lambda: not page.is_running(), timeout=180000)
    assert "Finished" in page.stage.text(), page.log.toPlainText()[-2000:]


def test_start_on_a_finished_run_asks_and_replacing_moves_the_old_run_aside(window, quick_demo, tmp_path, qtbot):
    root, _ = quick_demo
    out = tmp_path / "gui-done"
    _tiny_demo_window(window, root, out)
    window.start_button.click()
    _run_to_the_end(window, qtbot)
    first = (out / "report.json").read_text()
    checkpoint = (out / "checkpoints" / "last.pt").read_bytes()

    answer = Answer("Cancel")
    window.start_button.click()  # the box is modal: click returns once it is answered
    assert answer.done and not answer.errors and "holds a finished run" in answer.seen[0]
    assert "nothing is deleted" in answer.seen[0] and not window.train_page.is_running()
    assert (out / "report.json").read_text() == first

    answer = Answer("Open results")
    window.start_button.click()
    assert answer.done and window.pages.currentWidget() is window.results_page
    assert not window.train_page.is_running()

    answer = Answer("Replace it")
    window.start_button.click()
    assert answer.done and not answer.errors and window.train_page.is_running()
    _run_to_the_end(window, qtbot)
    previous = [p for p in tmp_path.iterdir() if p.name.startswith("gui-done.previous-")]
    assert len(previous) == 1, list(tmp_path.iterdir())
    assert (previous[0] / "report.json").read_text() == first  # the old run, whole, beside the new one
    assert (previous[0] / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert (out / "report.json").is_file() and "earlier run there was moved to" in window.train_page.log.toPlainText()


def test_start_on_a_folder_with_a_users_files_offers_another_folder_and_touches_nothing(window, quick_demo, tmp_path,
                                                                                       monkeypatch):
    root, _ = quick_demo
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "epoch10.pt").write_bytes(b"my weights")
    _tiny_demo_window(window, root, mine)
    chosen = tmp_path / "elsewhere"
    chosen.mkdir()
    monkeypatch.setattr("kamal_app.main_window.QFileDialog.getExistingDirectory", lambda *a, **k: str(chosen))
    answer = Answer("Choose another folder…")
    window.start_button.click()
    assert answer.done and not answer.errors and "files that no run wrote (checkpoints)" in answer.seen[0]
    assert not window.train_page.is_running() and window.session.recipe.output_dir == chosen.resolve()
    assert window.data_page.output.path() == chosen.resolve()
    assert (mine / "checkpoints" / "epoch10.pt").read_bytes() == b"my weights"
    assert sorted(p.name for p in mine.rglob("*")) == ["checkpoints", "epoch10.pt"]


def test_quitting_with_unsaved_changes_offers_to_save_and_the_session_comes_back(qtbot, quick_demo, tmp_path):
    root, _ = quick_demo
    settings = str(tmp_path / "settings.ini")

    def new_window():
        w = MainWindow(QSettings(settings, QSettings.Format.IniFormat))
        qtbot.addWidget(w, before_close_func=lambda widget: widget.setWindowModified(False))
        w.show()
        return w

    w = new_window()
    assert w.open_recipe(root / "recipes" / "filtered-ka.toml")
    mine = tmp_path / "mine.toml"
    assert w.write_recipe(mine)
    w.session.set_selected(0, w.session.teachers[0].selected[:1])  # an edit: the title shows '*'
    w.data_page.seed.setValue(7)
    assert w.isWindowModified()
    edited = w.session.state()

    answer = Answer("Cancel")
    assert not w.close() and answer.done and "unsaved changes" in answer.seen[0] and w.isVisible()
    qtbot.waitUntil(w.autosave_path().is_file, timeout=5000)  # on disk a second after the edit: kill -9 loses nothing

    killed = new_window()  # the next start after a crash: the unsaved session comes back, still unsaved
    assert killed.restore_session()
    assert killed.session.state() == edited and killed.isWindowModified()
    assert killed.session.recipe_path == mine.resolve()
    killed.setWindowModified(False)
    killed.close()

    answer = Answer("Save")
    assert w.close() and answer.done
    saved = load_recipe(mine)
    assert saved.teachers[0].select == edited["teachers"][0][5] and saved.seed == 7
    assert not w.autosave_path().exists()

    again = new_window()  # a normal start: the recipe that was open
    assert again.restore_session() and again.session.state() == edited and not again.isWindowModified()
    again.session.set_selected(1, [])
    answer = Answer("Discard")
    assert again.close() and answer.done
    assert load_recipe(mine).teachers[1].select != [] and not again.autosave_path().exists()


def test_switching_method_or_mode_and_back_keeps_the_typed_hyper_parameters(window, quick_demo):
    root, _ = quick_demo
    assert window.open_recipe(root / "recipes" / "filtered-ka.toml")
    page = window.data_page

    def choose(method_id):
        for i in range(page.methods.count()):
            if page.methods.item(i).data(Qt.ItemDataRole.UserRole) == method_id:
                page.methods.setCurrentRow(i)
                return
        raise AssertionError(method_id)

    page._param_widgets["epochs_per_block"][1].setValue(7)
    assert window.session.recipe.params["epochs_per_block"] == 7
    choose("kd")
    assert window.session.recipe.method == "kd" and "epochs_per_block" not in window.session.recipe.params
    page._param_widgets["epochs"][1].setValue(3)
    choose("filtered-ka")
    assert page._param_widgets["epochs_per_block"][1].value() == 7 and window.session.recipe.params == {"epochs_per_block": 7}
    choose("kd")
    assert page._param_widgets["epochs"][1].value() == 3
    choose("filtered-ka")
    page.mode_free.setChecked(True)
    assert window.session.recipe.mode == "data-free" and window.session.recipe.method != "filtered-ka"
    assert "epochs_per_block" not in window.session.recipe.params
    page.mode_data.setChecked(True)
    assert window.session.recipe.method == "filtered-ka" and window.session.recipe.params == {"epochs_per_block": 7}
    assert page._param_widgets["epochs_per_block"][1].value() == 7


def test_after_resume_the_plots_keep_the_finished_blocks(window, quick_demo, tmp_path, qtbot):
    root, _ = quick_demo
    _tiny_demo_window(window, root, tmp_path / "gui-resume")
    page = window.train_page
    window.start_button.click()
    qtbot.waitUntil(lambda: "converged loss at b1" in page.log.toPlainText(), timeout=60000)
    page.cancel_button.click()
    qtbot.waitUntil(lambda: not page.is_running(), timeout=5000)
    assert page.eta.text() == ""  # no ETA after Cancel
    answer = Answer("Resume")
    window.start_button.click()
    assert answer.done and not answer.errors and page.is_running()
    _run_to_the_end(window, qtbot)
    b1 = [name for name in page.curves if name.startswith("b1 · ")]
    assert b1, list(page.curves)
    x, _ = page.curves[b1[0]].getData()
    assert x[0] == 1.0  # from the first step of the run, not from the resumed block
    assert all("b1" in values for values in page.monitor.converged.values())
    line, _ = next(iter(page.converged_curves.values()))
    assert line.getData()[0][0] == 1.0  # the branch chart starts at b1 too
    assert set(page.monitor.plan) == set(page.monitor.converged)


def test_the_build_meter_weights_parts_and_its_eta_follows_the_measured_rate():
    from kamal_engine.demo import BuildMeter, DemoConfig, build_parts

    now = [0.0]
    seen = []
    meter = BuildMeter({"a": 1000.0, "b": 3000.0}, seen.append, every=0.25, clock=lambda: now[0])
    meter.begin("a")
    assert seen[-1].fraction == 0 and seen[-1].eta_seconds == 4.0  # the cost model (ms) before any rate
    for i in range(1, 11):
        now[0] += 0.5  # the machine is 5x slower than the model: "a" takes 5 s
        meter.tick(i / 10)
    meter.end()
    assert seen[-1].fraction == 0.25 and abs(seen[-1].eta_seconds - 15.0) < 1e-9
    times = len(seen)
    meter.begin("b")
    meter.tick(0.01)  # within `every` of the last report: not sent
    assert len(seen) == times + 1
    parts = build_parts(DemoConfig(), demo=True, independent=True)
    assert set(parts) >= {"write images", "backbone", "digits_0to4", "ind3_resnet34", "evaluate apart"}
    assert parts["ind3_resnet34"] > parts["digits_0to4"]  # a ResNet-34 costs more than a SmallNet


def test_small_things_the_start_line_the_predictions_header_and_the_log(window, quick_demo):
    root, _ = quick_demo
    assert window.open_recipe(root / "recipes" / "filtered-ka.toml")
    window.session.set_selected(1, [])
    assert "from 1 teacher," in window.start_reason.text()  # not "2 teacher(s)" when one has nothing ticked
    assert window.export_page.table.horizontalHeaderItem(0).text() == "image"
    answer = Answer("OK")
    dialogs.show_error(window, "Cannot load this teacher", "x.pt: is damaged")
    assert answer.done and "Cannot load this teacher: x.pt: is damaged" in window.train_page.log.toPlainText()


def test_the_data_page_never_scrolls_sideways_and_stacks_its_columns_when_narrow(window, quick_demo, qtbot):
    from PySide6.QtWidgets import QBoxLayout

    from kamal_app.main_window import DEFAULT_SIZE, MINIMUM_SIZE

    root, _ = quick_demo
    assert window.open_recipe(root / "recipes" / "filtered-ka.toml")
    window.nav.setCurrentRow(2)
    body = window.data_page.body
    viewport = body.parentWidget()
    for size, side_by_side in ((DEFAULT_SIZE, True), (MINIMUM_SIZE, True), ((560, 600), False)):
        window.resize(*size)
        qtbot.waitUntil(lambda: body.width() <= viewport.width())
        qtbot.wait(50)
        assert body.minimumSizeHint().width() <= viewport.width(), size
        wide = body.box.direction() == QBoxLayout.Direction.LeftToRight
        assert wide == side_by_side, (size, viewport.width(), body.side_by_side_width())


def test_log_ticks_are_few_and_plain_numbers():
    from PySide6.QtGui import QFontMetricsF

    from kamal_app.pages.train import ReadableAxis

    axis = ReadableAxis("left")
    line = QFontMetricsF(axis.font()).height()
    ((_, values),) = axis.logTickValues(-3.0, 0.5, 200, [])  # 0.001 .. 3 on 200 pixels
    assert 2 <= len(values) <= 200 / line
    assert axis.logTickStrings(values, 1.0, None)[0] == "0.001"
    ((_, values),) = axis.logTickValues(-0.6, -0.2, 200, [])  # less than a decade: still labelled
    assert len(values) >= 2 and all(-0.6 <= v <= -0.2 for v in values)
    ((_, values),) = axis.logTickValues(-30.0, 5.0, 100, [])  # many decades on a short axis: thinned
    assert len(values) <= 100 / line


def test_a_killed_training_process_is_reported_with_its_signal_and_resume_continues(window, quick_demo, tmp_path,
                                                                                   qtbot, monkeypatch):
    import multiprocessing
    import signal

    root, _ = quick_demo
    out = tmp_path / "gui-killed"
    _tiny_demo_window(window, root, out)
    page = window.train_page
    shown = []
    monkeypatch.setattr(dialogs, "show_error", lambda parent, title, exc: shown.append((title, str(exc))))
    window.start_button.click()
    qtbot.waitUntil(lambda: "knowledge reproduced at b1" in page.log.toPlainText(), timeout=60000)
    qtbot.waitUntil(lambda: (out / "checkpoints" / "last.pt").exists(), timeout=30000)
    children = [c for c in multiprocessing.active_children() if c.name == "kamal-engine"]
    assert len(children) == 1
    os.kill(children[0].pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: not page.is_running(), timeout=10000)
    assert page.stage.text() == "Failed."
    assert "killed by signal SIGKILL (9)" in page.log.toPlainText()
    assert shown and "SIGKILL" in shown[0][1] and "Start → Resume continues the run" in shown[0][1]
    assert window.start_button.isEnabled()  # the window stays usable
    answer = Answer("Resume")  # Start offers Resume: the finished blocks are kept
    window.start_button.click()
    assert answer.done and not answer.errors and "unfinished run" in answer.seen[0]
    _run_to_the_end(window, qtbot)


def test_the_train_page_draws_a_bar_per_label_of_the_generated_images_coverage(window, qtbot):
    from kamal_engine import events as ev

    page = window.train_page
    page.free_box.setVisible(False)
    page.events.put(ev.LabelsCovered("train", 1, {"zero": 0.9, "one": 0.0, "two": 0.25}, 0.7))
    page.redraw()
    assert not page.free_box.isHidden()
    assert page.coverage_bars.opts["height"].tolist() == [0.9, 0.0, 0.25]
    assert "epoch 1" in page.coverage_plot.getPlotItem().titleLabel.text
    page.events.put(ev.LabelsCovered("train", 2, {"zero": 0.5, "one": 0.4, "two": 0.3}, 0.8))
    page.redraw()
    assert page.coverage_bars.opts["height"].tolist() == [0.5, 0.4, 0.3]  # the same bars, new heights
    assert "epoch 2" in page.coverage_plot.getPlotItem().titleLabel.text
    assert "one: 40%" in page.coverage_plot.toolTip() and "diversity 0.80" in page.coverage_plot.toolTip()


@pytest.mark.parametrize("method", ["dafl", "dual-gan"])
def test_the_data_free_options_round_trip_through_the_method_form_and_the_recipe(window, quick_demo, method,
                                                                               tmp_path):
    root, _ = quick_demo
    assert window.open_recipe(root / "recipes" / "dual-gan.toml")
    page = window.data_page
    for i in range(page.methods.count()):
        if page.methods.item(i).data(Qt.ItemDataRole.UserRole) == method:
            page.methods.setCurrentRow(i)
    widgets = {name: w for name, (_, w) in page._param_widgets.items()}
    widgets["balance"].setCurrentText("entropy")
    for name, text in (("target_rate", "0.3"), ("bn_prior", "2"), ("adversarial", "0.5"), ("target_rate", "1.5")):
        widgets[name].setText(text)
        widgets[name].editingFinished.emit()  # 1.5 is above target_rate's maximum: refused, 0.3 kept
    widgets["augment"].setChecked(True)
    widgets["replay"].setValue(256)
    widgets["paper_faithful"].setChecked(True)
    expected = {"balance": "entropy", "target_rate": 0.3, "bn_prior": 2.0, "adversarial": 0.5, "augment": True,
                "replay": 256, "paper_faithful": True}
    assert {k: window.session.recipe.params[k] for k in expected} == expected
    assert widgets["target_rate"].text() == "0.3"
    path = tmp_path / "free.toml"
    assert window.write_recipe(path)
    assert {k: load_recipe(path).params[k] for k in expected} == expected


def test_a_plan_clicked_on_the_results_chart_is_fine_tuned_into_a_folder_of_its_own(window, quick_student, qtbot):
    import json

    out, result = quick_student
    before = (out / "report.json").read_text()
    assert window.open_run(out)
    chart = window.results_page.plan_chart
    assert window.results_page.tabs.isTabVisible(1) and not chart.button.isEnabled()  # nothing picked yet
    chart.select(chart.chosen)
    assert "the chosen plan" in chart.info.text() and not chart.button.isEnabled()
    other = next(i for i, row in enumerate(chart.rows) if i != chart.chosen and i in chart.front) \
        if len(chart.front) > 1 else next(i for i in range(len(chart.rows)) if i != chart.chosen)
    chart.select(other)
    assert f"{chart.rows[other]['parameters']:,}" in chart.info.text() and chart.button.isEnabled()
    page = window.train_page
    with qtbot.waitSignal(page.run_finished, timeout=120000) as blocker:
        chart.button.click()
        assert window.pages.currentWidget() is page and page.is_running()
    qtbot.waitUntil(lambda: not page.is_running())
    new = blocker.args[0].output_dir
    assert new.parent == out.parent and new.name.startswith(out.name + "-at-")
    report = json.loads((new / "report.json").read_text())
    assert report["branch_points"] == chart.rows[other]["plan"] and report["replanned_from"] == str(out)
    assert report["size"]["student"]["parameters"] == chart.rows[other]["parameters"]
    assert (out / "report.json").read_text() == before  # the run it came from is only read
    assert window.results_page.output_dir == new


def test_the_plan_chart_front_and_the_mapping_editor():
    from kamal_app.pages.data_method import MappingEdit
    from kamal_app.plan_chart import front_of

    xs, ys = [0.5, 0.6, 0.7, 0.9, 1.0], [0.30, 0.35, 0.20, 0.20, 0.10]
    assert front_of(xs, ys, higher_better=False) == [0, 2, 4]
    assert front_of(xs, [90.0, 95.0, None, 94.0, 99.0], higher_better=True) == [0, 1, 4]
    edit = MappingEdit({"one": "b3"})
    assert edit.text() == "one=b3"
    changed = []
    edit.valueChanged.connect(changed.append)
    edit.setText("one=b2, eight=b4")
    edit.editingFinished.emit()
    assert edit.value() == {"one": "b2", "eight": "b4"} and changed == [{"one": "b2", "eight": "b4"}]
    edit.setText("one")  # malformed: the last good value comes back
    edit.editingFinished.emit()
    assert edit.text() == "one=b2, eight=b4" and len(changed) == 1


def test_with_several_gpus_the_device_list_offers_all_of_them_as_one_distributed_run(qtbot, tmp_path, quick_demo,
                                                                                       monkeypatch, recipe_factory):
    from kamal_app.pages import data_method
    from kamal_engine.devices import device_choices

    monkeypatch.setattr(data_method, "device_choices", lambda: device_choices(gpus=2))  # a machine with 2 GPUs
    w = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w, before_close_func=lambda widget: widget.setWindowModified(False))
    root, _ = quick_demo
    assert w.open_recipe(root / "recipes" / "filtered-ka.toml")
    combo = w.data_page.device
    combo.setCurrentIndex(combo.findData("cuda*2"))
    assert combo.currentText().startswith("all 2 GPUs")
    assert (w.session.recipe.device, w.session.recipe.nproc) == ("cuda", 2)
    combo.setCurrentIndex(combo.findData("cpu"))
    assert (w.session.recipe.device, w.session.recipe.nproc) == ("cpu", 1)
    cpu_two = recipe_factory(root / "recipes" / "filtered-ka.toml", run={"device": "cpu", "nproc": 2,
                                                                        "output_dir": tmp_path / "run"})
    assert w.open_recipe(cpu_two)
    assert combo.currentText() == "CPU, 2 processes (distributed data parallel)"
    assert w.device_label.text() == "Device: CPU, 2 processes"
