"""``kamal-studio [RECIPE] [--demo-dir DIR | --no-demo] [--version] [--self-test]
[--install-desktop-entry | --uninstall-desktop-entry]``: the desktop app.

With no argument the app brings back the last session (its unsaved edits, else the recipe it had
open); on the very first start it opens the demo workspace. ``--self-test`` opens the window
offscreen with settings of its own (the user's are not touched), loads RECIPE or, if present, the
demo workspace's recipe, and quits: 0 when all of it worked (a bundle's smoke test).
``--install-desktop-entry`` puts this installation's app in the desktop's menu (``kamal_app.desktop``;
``--uninstall-desktop-entry`` takes out exactly what it wrote).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kamal-studio", description="KAmal Studio: amalgamate pre-trained teacher "
                                     "CNNs into one customised multi-task student, in a window.")
    parser.add_argument("recipe", nargs="?", help="recipe to open (.toml)")
    parser.add_argument("--demo-dir", metavar="DIR", help="open the demo workspace in DIR (built first if missing, "
                        "with a progress dialog)")
    parser.add_argument("--no-demo", action="store_true", help="start empty: no demo on the first start, no last session")
    parser.add_argument("--self-test", action="store_true", help="open the window offscreen, load RECIPE (default: the "
                        "demo workspace's recipe, when it is built), quit; exit status 0 when it all worked")
    parser.add_argument("--install-desktop-entry", action="store_true", help="add this kamal-studio to the desktop's "
                        "menu under $XDG_DATA_HOME (default ~/.local/share) and quit")
    parser.add_argument("--uninstall-desktop-entry", action="store_true", help="remove exactly the files "
                        "--install-desktop-entry wrote, and quit")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kamal-studio {__version__}")
    return parser


def self_test(recipe: Path | None, demo_dir: Path | None) -> int:
    """``--self-test``: the window opened offscreen (own settings in a temporary folder), a recipe loaded, closed."""
    import os
    import tempfile

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication, QMessageBox

    from .main_window import MainWindow, default_demo_dir

    app = QApplication.instance() or QApplication(sys.argv[:1])
    identify(app)
    if recipe is not None and not recipe.is_file():
        print(f"kamal-studio: self-test failed: {recipe} is not a file; give an existing recipe (.toml)", file=sys.stderr)
        return 1
    said: list[str] = []

    def answer_dialogs() -> None:  # an error box would wait for a click that never comes: note it, close it
        modal = QApplication.activeModalWidget()
        if isinstance(modal, QMessageBox):
            said.append(" ".join(modal.text().split()))
            modal.done(0)

    closer = QTimer()
    closer.timeout.connect(answer_dialogs)
    closer.start(50)
    with tempfile.TemporaryDirectory(prefix="kamal-self-test-") as folder:
        window = MainWindow(QSettings(str(Path(folder) / "settings.ini"), QSettings.Format.IniFormat))
        window.show()
        app.processEvents()
        if recipe is None:
            candidate = Path(demo_dir or default_demo_dir()) / "recipes" / "filtered-ka.toml"
            recipe = candidate if candidate.is_file() else None
        ok = True
        if recipe is not None:
            ok = window.open_recipe(recipe, remember=False)
            print(f"kamal-studio: self-test: {'loaded' if ok else 'could not load'} {recipe}"
                  + (f" ({len(window.session.teachers)} teachers)" if ok else ""))
        else:
            print("kamal-studio: self-test: no recipe given and no demo workspace built; the window opened")
        window.setWindowModified(False)
        window.close()
        app.processEvents()
    closer.stop()
    for text in said:
        print(f"kamal-studio: self-test: the window said: {text}", file=sys.stderr)
    ok = ok and not said
    print(f"kamal-studio: self-test {'passed' if ok else 'failed'} (Qt platform {app.platformName()})")
    return 0 if ok else 1


def identify(app) -> None:
    """Name, version, icon and desktop id of the application (the window icon, the task bar, the menu entry)."""
    from . import __version__
    from .desktop import APP_ID, window_icon

    app.setOrganizationName("KAmal Studio")
    app.setApplicationName("kamal-studio")
    app.setApplicationVersion(__version__)
    app.setDesktopFileName(APP_ID)
    app.setWindowIcon(window_icon())


def main(argv: Sequence[str] | None = None) -> int:
    import multiprocessing

    multiprocessing.freeze_support()  # the engine trains in a spawned child process (a frozen app re-enters here)
    args = build_parser().parse_args(argv)
    if args.install_desktop_entry or args.uninstall_desktop_entry:
        from .desktop import main as desktop_entry

        return desktop_entry(["--uninstall"] if args.uninstall_desktop_entry else [])
    if args.self_test:
        return self_test(Path(args.recipe) if args.recipe else None, Path(args.demo_dir) if args.demo_dir else None)
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    from .main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    identify(app)
    settings = QSettings()
    window = MainWindow(settings)
    window.show()
    first_start = not settings.value("started_before", False, type=bool)
    settings.setValue("started_before", True)
    if args.recipe:
        QTimer.singleShot(0, lambda: window.open_recipe(Path(args.recipe)))
    elif args.demo_dir or (first_start and not args.no_demo):
        QTimer.singleShot(0, lambda: window.open_demo_workspace(Path(args.demo_dir) if args.demo_dir else None))
    elif not args.no_demo:  # the last session: its unsaved edits, else the recipe it had open
        QTimer.singleShot(0, window.restore_session)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
