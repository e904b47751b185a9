"""``kamal-studio [RECIPE] [--demo-dir DIR | --no-demo]``: the desktop app.

With no argument the app brings back the last session (its unsaved edits, else the recipe it had
open); on the very first start it opens the demo workspace.
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import multiprocessing

    multiprocessing.freeze_support()  # the engine trains in a spawned child process (a frozen app re-enters here)
    args = build_parser().parse_args(argv)
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    from . import __version__
    from .main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName("KAmal Studio")
    app.setApplicationName("kamal-studio")
    app.setApplicationVersion(__version__)
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
