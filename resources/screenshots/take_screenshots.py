"""Screenshots of every page of KAmal Studio at the default size and at 1024x700, and of the Train page
after a Resume, written next to this file.

Run it on a real X server (a virtual one is fine)::

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python resources/screenshots/take_screenshots.py

It builds the quick demo workspace in a temporary folder (seconds), runs a short filtered-ka run,
cancels it after the first block, resumes it to the end (so the Train page shows a resumed run),
then shows each page and saves what the window draws (``QWidget.grab``: the X server's rendering);
the Train page shows the run's branch plans on its size/quality tab, the Results page one of them
clicked.
Nothing outside the temporary folder and this folder is written.

With ``--data-free`` it instead runs a short ``dual-gan`` run (every data-free option on) on the quick
demo and saves the Train page while the generator trains — its losses, samples and the bar per label
of how often the teachers call it present — at both sizes (``train-dual-gan-<size>.png``).

With ``--gpus N`` it shows the Data & method page as on a machine with N GPUs, the device list open on
its "all N GPUs" entry, at both sizes (``data-method-gpus-<size>.png``; the screen itself is grabbed,
``import -window root``, since the list is a window of its own).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = (None, (1024, 700))  # None: the window's default size on a first start


def wait(app, condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {seconds:.0f} s waiting for the app")
        app.processEvents()
        time.sleep(0.02)


def settle(app, seconds: float = 0.4) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def several_gpus(app, window, work: Path, gpus: int) -> list[Path]:
    """The Data & method page's device list as on a machine with ``gpus`` GPUs, open, at both sizes."""
    import subprocess

    from kamal_app.main_window import PAGES, default_size

    assert window.open_recipe(work / "demo" / "recipes" / "filtered-ka.toml")
    window.nav.setCurrentRow(PAGES.index("Data & method"))
    combo = window.data_page.device
    combo.setCurrentIndex(combo.findData(f"cuda*{gpus}"))
    written = []
    for size in SIZES:
        window.resize(default_size(window) if size is None else window.size().__class__(*size))
        window.move(0, 0)
        settle(app)
        window.data_page.scroll_to(combo) if hasattr(window.data_page, "scroll_to") else None
        combo.showPopup()
        settle(app, 0.8)
        path = HERE / f"data-method-gpus-{window.width()}x{window.height()}.png"
        subprocess.run(["import", "-window", "root", "-crop", f"{window.width()}x{window.height()}+0+0", str(path)],
                       check=True)
        combo.hidePopup()
        written.append(path)
    return written


def data_free(app, window, work: Path) -> list[Path]:
    """The Train page of a short dual-gan run, grabbed during Step I at both sizes."""
    from kamal_app.main_window import PAGES, default_size

    assert window.open_recipe(work / "demo" / "recipes" / "dual-gan.toml")
    window.session.set_output_dir(work / "runs" / "screenshot-dual-gan")
    window.session.params = {"generator_epochs": 40, "iterations": 5, "batch_size": 32, "generator_width": 16,
                             "preview_every": 5, "epochs_per_block": 1, "finetune_epochs": 1, "eval_batches": 1,
                             "balance": "rate", "bn_prior": 1.0, "augment": True, "replay": 256, "adversarial": 1.0}
    window.session.device = "cpu"
    window.session.notify()
    page = window.train_page
    window.start_button.click()
    wait(app, lambda: page.monitor.coverage_epoch >= 6, 300)
    written = []
    for size in SIZES:
        window.resize(default_size(window) if size is None else window.size().__class__(*size))
        window.nav.setCurrentRow(PAGES.index("Train"))
        settle(app, 1.0)
        path = HERE / f"train-dual-gan-{window.width()}x{window.height()}.png"
        window.grab().save(str(path))
        written.append(path)
    page.cancel_button.click()
    wait(app, lambda: not page.is_running(), 60)
    return written


def main() -> int:
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from kamal_app.main_window import PAGES, MainWindow, default_size
    from kamal_engine.demo import DemoConfig, build_demo

    app = QApplication.instance() or QApplication(sys.argv[:1])
    work = Path(tempfile.mkdtemp(prefix="kamal-screenshots-"))
    build_demo(work / "demo", DemoConfig.quick(), log=lambda message: None)
    window = MainWindow(QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat))
    window.show()
    if "--gpus" in sys.argv[1:]:  # the device list as on a machine with that many GPUs
        from kamal_app.pages import data_method
        from kamal_engine.devices import device_choices

        gpus = int(sys.argv[sys.argv.index("--gpus") + 1])
        data_method.device_choices = lambda: device_choices(gpus=gpus)
        window.close()
        window = MainWindow(QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat))
        window.show()
        for path in several_gpus(app, window, work, gpus):
            print(path.relative_to(HERE.parent.parent))
        window.setWindowModified(False)
        window.close()
        return 0
    if "--data-free" in sys.argv[1:]:
        for path in data_free(app, window, work):
            print(path.relative_to(HERE.parent.parent))
        window.setWindowModified(False)
        window.close()
        return 0
    assert window.open_recipe(work / "demo" / "recipes" / "filtered-ka.toml")
    window.session.set_output_dir(work / "runs" / "screenshot-run")
    window.session.params = {"epochs_per_block": 2, "finetune_epochs": 2, "batch_size": 32}
    window.session.device = "cpu"
    window.session.notify()
    page = window.train_page

    window.start_button.click()  # a short run, cancelled after its first block, then resumed
    wait(app, lambda: "converged loss at b1" in page.log.toPlainText(), 300)
    page.cancel_button.click()
    wait(app, lambda: not page.is_running(), 60)
    window.ask_run_folder = lambda info: "resume"  # the "Unfinished run" box, answered Resume
    window.start_button.click()
    wait(app, lambda: not page.is_running(), 600)
    window.open_run(work / "runs" / "screenshot-run")
    export = window.export_page
    images = sorted((work / "demo" / "data" / "validation" / "images").glob("*.png"))[:4]
    export.set_images(images)
    chart = window.results_page.plan_chart  # a plan clicked on the size/quality chart: its text and the button
    others = [i for i in chart.front if i != chart.chosen] or [i for i in range(len(chart.rows)) if i != chart.chosen]
    if others:
        chart.select(others[0])
    settle(app, 1.0)

    written = []
    for size in SIZES:
        if size is None:
            window.resize(default_size(window))
        else:
            window.resize(*size)
        settle(app)
        tag = f"{window.width()}x{window.height()}"
        for index, name in enumerate(PAGES):
            window.nav.setCurrentRow(index)
            settle(app)
            path = HERE / f"{name.lower().replace(' & ', '-').replace(' ', '-')}-{tag}.png"
            window.grab().save(str(path))
            written.append(path)
    for size in SIZES:
        window.resize(default_size(window) if size is None else window.size().__class__(*size))
        window.nav.setCurrentRow(PAGES.index("Results"))
        window.results_page.tabs.setCurrentWidget(chart)
        settle(app)
        path = HERE / f"results-plans-{window.width()}x{window.height()}.png"
        window.grab().save(str(path))
        written.append(path)
    window.results_page.tabs.setCurrentIndex(0)
    window.nav.setCurrentRow(PAGES.index("Train"))
    window.resize(default_size(window))
    settle(app)
    path = HERE / "train-after-resume.png"
    window.grab().save(str(path))
    written.append(path)
    page.log_scale.setChecked(True)
    settle(app)
    path = HERE / "train-log-scale.png"
    window.grab().save(str(path))
    written.append(path)
    window.setWindowModified(False)
    window.close()
    for path in written:
        print(path.relative_to(HERE.parent.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
