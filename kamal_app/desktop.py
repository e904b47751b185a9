"""The app as an installed desktop program: its id, its icon, and its entry in the user's menu.

``kamal-studio --install-desktop-entry`` (or ``packaging/install-desktop-entry``) copies the desktop
file, the AppStream metainfo and the icons of ``packaging/`` into ``$XDG_DATA_HOME`` (default
``~/.local/share``): ``applications/``, ``metainfo/`` and ``icons/hicolor/<size>/apps/``, with the
desktop file's ``Exec`` and ``TryExec`` set to this installation's ``kamal-studio``. It writes a
manifest of what it wrote (``kamal-studio/desktop-entry.json``, with each file's SHA-256);
``--uninstall`` removes exactly those files, and only while they still hold what was written. A file
already there that this program did not write is never replaced: the install stops and names it.
No cache is rebuilt (``update-desktop-database``, ``gtk-update-icon-cache`` would write files of their
own there): the desktops watch these folders and pick the entry up by themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

APP_ID = "io.github.kamal_studio.KAmalStudio"  # reverse-DNS application id (desktop file, metainfo, icon, Wayland)
HOMEPAGE = "https://github.com/kamal-studio/kamal-studio"
ICON_SIZES = (48, 128, 256)
ICONS = Path(__file__).resolve().parent / "icons"
MANIFEST = Path("kamal-studio") / "desktop-entry.json"


def icon_file(size: int | None = None) -> Path:
    """The app icon: the SVG (``size`` None) or the PNG of ``size`` px shipped in the package."""
    return ICONS / ("kamal-studio.svg" if size is None else f"kamal-studio-{size}.png")


def window_icon():
    """The icon as a ``QIcon`` of the shipped PNGs, every size (the window, the task bar, the dialogs)."""
    from PySide6.QtCore import QSize
    from PySide6.QtGui import QIcon

    icon = QIcon()
    for size in ICON_SIZES:
        icon.addFile(str(icon_file(size)), QSize(size, size))
    return icon


def render_icons(out: Path = ICONS) -> list[Path]:
    """The PNG icons drawn from the SVG with Qt's SVG renderer, one per size of ``ICON_SIZES``
    (``packaging/render-icons``; run it after changing the SVG)."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication(["render-icons"])  # painting text and gradients needs one
    renderer = QSvgRenderer(str(icon_file()))
    if not renderer.isValid():
        raise ValueError(f"{icon_file()} is not a valid SVG; fix it and run packaging/render-icons again")
    written = []
    for size in ICON_SIZES:
        image = QImage(size, size, QImage.Format.Format_ARGB32)
        image.fill(Qt.GlobalColor.transparent)
        painter = QPainter(image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        renderer.render(painter)
        painter.end()
        path = out / f"kamal-studio-{size}.png"
        if not image.save(str(path)):
            raise OSError(f"could not write {path}; check that the folder is writable")
        written.append(path)
    del app
    return written


def packaging_dir() -> Path:
    """``packaging/`` of a checkout, or the copy of its desktop files inside a bundle or an installation."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "packaging", here / "packaging"):
        if (candidate / f"{APP_ID}.desktop").is_file():
            return candidate
    raise FileNotFoundError(f"the desktop files ({APP_ID}.desktop) are not next to {here}; install from a checkout "
                            "of KAmal Studio or from its bundle")


def data_home() -> Path:
    """``$XDG_DATA_HOME``, or ``~/.local/share`` when it is unset or not absolute (the XDG rule)."""
    value = os.environ.get("XDG_DATA_HOME", "")
    return Path(value) if value and Path(value).is_absolute() else Path.home() / ".local" / "share"


def studio_executable() -> Path:
    """This installation's ``kamal-studio``: the bundle's program, or the one beside this Python."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent / "kamal-studio"
    found = Path(sys.executable).parent / "kamal-studio"
    if found.exists():
        return found
    on_path = shutil.which("kamal-studio")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError("no kamal-studio program beside this Python or on PATH; install KAmal Studio first "
                            "(./bootstrap demo) or pass --exec PATH")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class EntryFile:
    """One file of the entry: where it goes (under the data home) and what it holds."""

    relative: Path
    data: bytes


def entry_files(executable: Path) -> list[EntryFile]:
    """The files of the menu entry for ``executable``."""
    source = packaging_dir()
    desktop = []
    for line in (source / f"{APP_ID}.desktop").read_text().splitlines():
        if line.startswith("Exec="):
            line = f"Exec={_quote(executable)} %f"
        elif line.startswith("TryExec="):
            line = f"TryExec={executable}"
        desktop.append(line)
    files = [EntryFile(Path("applications") / f"{APP_ID}.desktop", ("\n".join(desktop) + "\n").encode()),
             EntryFile(Path("metainfo") / f"{APP_ID}.metainfo.xml", (source / f"{APP_ID}.metainfo.xml").read_bytes()),
             EntryFile(Path("icons/hicolor/scalable/apps") / f"{APP_ID}.svg", icon_file().read_bytes())]
    files += [EntryFile(Path(f"icons/hicolor/{s}x{s}/apps") / f"{APP_ID}.png", icon_file(s).read_bytes())
              for s in ICON_SIZES]
    return files


def _quote(path: Path) -> str:
    """``path`` as one argument of a desktop file's ``Exec`` (quoted when it has a space or a reserved character)."""
    text = str(path)
    if not any(c in text for c in ' \t\n"\'\\><~|&;$*?#()`'):
        return text
    escaped = "".join("\\" + c if c in '"`$\\' else c for c in text)
    return f'"{escaped}"'


class DesktopEntryError(Exception):
    """The entry could not be installed or removed; the message says which file and what to do."""


def install(executable: Path | None = None, home: Path | None = None) -> list[Path]:
    """Write the menu entry under ``home`` (default :func:`data_home`) and its manifest; return the files
    written. Reinstalling replaces this program's own earlier files; any other file in the way stops
    the install before anything is written."""
    home = home or data_home()
    executable = (executable or studio_executable()).resolve()
    if not executable.is_file():
        raise DesktopEntryError(f"{executable} is not a file; give the kamal-studio program with --exec")
    ours = {Path(p): h for p, h in _read_manifest(home).items()}
    files = entry_files(executable)
    for f in files:
        target = home / f.relative
        if target.exists() and (f.relative not in ours or _sha256(target.read_bytes()) != ours[f.relative]):
            raise DesktopEntryError(f"{target} exists and was not written by kamal-studio (or was changed since); "
                                    "move it away, then install again")
    written = {}
    for f in files:
        _write(home / f.relative, f.data)  # the target is absent or this program's own (checked above)
        written[str(f.relative)] = _sha256(f.data)
    record = {"app_id": APP_ID, "executable": str(executable), "files": written}
    _write(home / MANIFEST, (json.dumps(record, indent=2) + "\n").encode())
    return [home / p for p in written] + [home / MANIFEST]


def _write(target: Path, data: bytes) -> None:
    """``target`` holding ``data``, whole or not at all: written to a new temporary file of its own beside
    it, then moved over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.replace(tmp, target)


def uninstall(home: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Remove what :func:`install` wrote under ``home`` (by its manifest): (removed, kept because they
    were changed since). Folders are removed only when this left them empty."""
    home = home or data_home()
    ours = _read_manifest(home)
    if not ours:
        raise DesktopEntryError(f"no menu entry of kamal-studio is installed under {home} (no {home / MANIFEST})")
    removed, kept = [], []
    for relative, digest in ours.items():
        target = home / relative
        if not target.exists():
            continue
        if _sha256(target.read_bytes()) != digest:
            kept.append(target)
            continue
        target.unlink()
        removed.append(target)
        _prune(target.parent, home)
    manifest = home / MANIFEST
    manifest.unlink()
    removed.append(manifest)
    _prune(manifest.parent, home)
    return removed, kept


def _read_manifest(home: Path) -> dict[str, str]:
    path = home / MANIFEST
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DesktopEntryError(f"{path} is not a manifest kamal-studio wrote ({exc}); remove the entry's files by "
                                "hand, then delete it") from exc


def _prune(folder: Path, home: Path) -> None:
    """Remove ``folder`` and its parents up to ``home`` while they are empty."""
    while folder != home and home in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def main(argv: list[str] | None = None) -> int:
    """``install-desktop-entry [--uninstall] [--exec PATH]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="install-desktop-entry", description="Add KAmal Studio to your desktop's "
                                     "menu under $XDG_DATA_HOME (default ~/.local/share), or take it out again.")
    parser.add_argument("--uninstall", action="store_true", help="remove exactly the files an install wrote")
    parser.add_argument("--exec", dest="executable", metavar="PATH",
                        help="the kamal-studio program the entry starts (default: this installation's)")
    args = parser.parse_args(argv)
    try:
        if args.uninstall:
            removed, kept = uninstall()
            print(f"install-desktop-entry: removed {len(removed)} files under {data_home()}")
            for path in kept:
                print(f"install-desktop-entry: kept {path}: it was changed after the install", file=sys.stderr)
        else:
            written = install(Path(args.executable) if args.executable else None)
            print(f"install-desktop-entry: KAmal Studio is in the menu ({len(written)} files under {data_home()}); "
                  "remove it with --uninstall")
    except (DesktopEntryError, FileNotFoundError) as exc:
        print(f"install-desktop-entry: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
