"""The app as a program: ``kamal-studio --version`` and ``--self-test``, and the check of Qt's xcb platform
that ``./bootstrap demo`` runs before the window opens (``kamal_app.xcb_check``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kamal_app import xcb_check
from kamal_engine import __version__

LDD = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f55)
\tlibxcb-cursor.so.0 => /lib/x86_64-linux-gnu/libxcb-cursor.so.0 (0x00007f55)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibxcb-icccm.so.4 => not found
\tlibfoo-unknown.so.3 => not found
"""


def test_the_check_names_each_missing_library_once_and_the_packages_to_install():
    assert xcb_check.unresolved(LDD) == ["libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libfoo-unknown.so.3"]
    text = xcb_check.advice(xcb_check.unresolved(LDD))
    assert "sudo apt-get install libxcb-icccm4 libxcb-keysyms1" in text
    assert "libfoo-unknown.so.3" in text and "kamal demo DIR" in text


@pytest.mark.skipif(not sys.platform.startswith("linux") or xcb_check.plugin_path() is None,
                    reason="Linux with PySide6's xcb plugin")
def test_a_machine_lacking_xcb_libraries_gets_the_packages_and_exit_status_2(tmp_path):
    fake = tmp_path / "ldd"  # ldd as on a fresh headless Debian: two of the plugin's libraries missing
    fake.write_text("#!/bin/sh\nprintf '\\tlibxcb-icccm.so.4 => not found\\n\\tlibxcb-keysyms.so.1 => not found\\n'\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    out = subprocess.run([sys.executable, "-m", "kamal_app.xcb_check"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "libxcb-icccm4 libxcb-keysyms1" in out.stderr and "xcb" in out.stderr
    offscreen = subprocess.run([sys.executable, "-m", "kamal_app.xcb_check"], capture_output=True, text=True,
                               env={**env, "QT_QPA_PLATFORM": "offscreen"})
    assert offscreen.returncode == 0  # another platform asked for: the check does not apply


def studio(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kamal_app.main", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})


def test_version_and_the_self_test_on_a_recipe(quick_demo, tmp_path):
    root, _ = quick_demo
    version = studio("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"kamal-studio {__version__}"
    ok = studio("--self-test", str(root / "recipes" / "filtered-ka.toml"))
    assert ok.returncode == 0, ok.stderr
    assert "loaded" in ok.stdout and "(2 teachers)" in ok.stdout and "self-test passed" in ok.stdout



def test_the_self_test_fails_on_a_bad_recipe_saying_why(qapp, tmp_path, capsys):
    from kamal_app.main import self_test

    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nname = "x"\n')
    assert self_test(bad, None) == 1  # the window's error box is closed and its text reported
    out = capsys.readouterr()
    assert "no [[teachers]]" in out.err and "self-test failed" in out.out
    assert self_test(tmp_path / "nope.toml", None) == 1
    assert "is not a file" in capsys.readouterr().err


# --- desktop integration (packaging/, kamal_app.desktop) ---------------------------------------------------------

from pathlib import Path  # noqa: E402

from kamal_app import desktop  # noqa: E402

PACKAGING = Path(__file__).resolve().parents[1] / "packaging"
DESKTOP_FILE = PACKAGING / f"{desktop.APP_ID}.desktop"
METAINFO = PACKAGING / f"{desktop.APP_ID}.metainfo.xml"


def _tool(name: str) -> str:
    """A validator the tests need (``.ci/run`` installs it); a clear failure where it is missing."""
    import shutil

    found = shutil.which(name)
    assert found, f"{name} is not installed: apt-get install -y desktop-file-utils appstream (as .ci/run does)"
    return found


def test_the_desktop_file_is_valid_and_names_the_app_its_icon_and_window_class():
    out = subprocess.run([_tool("desktop-file-validate"), str(DESKTOP_FILE)], capture_output=True, text=True)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr  # not even a hint
    keys = dict(line.split("=", 1) for line in DESKTOP_FILE.read_text().splitlines() if "=" in line)
    for key in ("Type", "Name", "GenericName", "Comment", "Exec", "Icon", "Categories", "StartupWMClass"):
        assert keys.get(key), key
    assert keys["Icon"] == desktop.APP_ID and keys["Exec"].split()[0] == "kamal-studio"
    assert keys["StartupWMClass"] == "kamal-studio"  # Qt's WM_CLASS for the application name the app sets


def test_the_metainfo_validates_and_provides_both_programs_with_the_screenshots_of_the_repository():
    import xml.etree.ElementTree as ET

    out = subprocess.run([_tool("appstreamcli"), "validate", "--no-net", str(METAINFO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not [line for line in out.stdout.splitlines() if line[:2] in ("E:", "W:")], out.stdout
    root = ET.parse(METAINFO).getroot()
    assert root.findtext("id") == desktop.APP_ID
    assert root.find("launchable").text == DESKTOP_FILE.name
    assert sorted(b.text for b in root.iter("binary")) == ["kamal", "kamal-studio"]
    assert root.find("content_rating") is not None and root.find("releases/release").get("version") == __version__
    shots = [i.text for i in root.iter("image")]
    assert shots and all((Path(__file__).resolve().parents[1] / "resources" / "screenshots" / s.rsplit("/", 1)[1]).is_file()
                         for s in shots)


def test_the_icons_exist_at_the_declared_sizes_and_the_window_carries_them(qapp):
    from PySide6.QtGui import QImage

    svg = desktop.icon_file().read_text()
    assert 'viewBox="0 0 256 256"' in svg
    for size in desktop.ICON_SIZES:
        image = QImage(str(desktop.icon_file(size)))
        assert (image.width(), image.height()) == (size, size)
        assert image.pixelColor(size // 2, size // 2).alpha() == 255 and image.pixelColor(0, 0).alpha() == 0
    icon = desktop.window_icon()
    assert sorted(s.width() for s in icon.availableSizes()) == list(desktop.ICON_SIZES)
    from kamal_app.main import identify

    identify(qapp)
    assert not qapp.windowIcon().isNull() and qapp.desktopFileName() == desktop.APP_ID


def test_the_menu_entry_round_trips_in_a_temporary_data_home_and_never_replaces_a_file_it_did_not_write(
        tmp_path, monkeypatch):
    home = tmp_path / "share"
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    program = tmp_path / "my venv" / "bin" / "kamal-studio"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    (home / "applications").mkdir(parents=True)
    theirs = home / "applications" / "someone.else.desktop"
    theirs.write_text("[Desktop Entry]\n")
    assert desktop.main(["--exec", str(program)]) == 0
    written = sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file() and p != theirs)
    assert written == sorted([f"applications/{desktop.APP_ID}.desktop", f"metainfo/{desktop.APP_ID}.metainfo.xml",
                              f"icons/hicolor/scalable/apps/{desktop.APP_ID}.svg", "kamal-studio/desktop-entry.json",
                              *[f"icons/hicolor/{s}x{s}/apps/{desktop.APP_ID}.png" for s in desktop.ICON_SIZES]])
    entry = (home / "applications" / f"{desktop.APP_ID}.desktop").read_text()
    assert f'Exec="{program.resolve()}" %f' in entry and f"TryExec={program.resolve()}" in entry
    check = subprocess.run([_tool("desktop-file-validate"), str(home / "applications" / f"{desktop.APP_ID}.desktop")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert desktop.main(["--exec", str(program)]) == 0  # again: its own files are replaced
    assert desktop.main(["--uninstall"]) == 0
    assert sorted(p for p in home.rglob("*")) == [home / "applications", theirs]  # exactly what it wrote is gone

    icon = home / "icons" / "hicolor" / "48x48" / "apps" / f"{desktop.APP_ID}.png"
    icon.parent.mkdir(parents=True)
    icon.write_bytes(b"the user's own icon")
    assert desktop.main(["--exec", str(program)]) == 2  # a file in the way that it did not write: nothing written
    assert icon.read_bytes() == b"the user's own icon"
    assert not (home / "applications" / f"{desktop.APP_ID}.desktop").exists()
    icon.unlink()
    assert desktop.main(["--exec", str(program)]) == 0
    changed = home / "metainfo" / f"{desktop.APP_ID}.metainfo.xml"
    changed.write_text("edited by the user")
    assert desktop.main(["--uninstall"]) == 0
    assert changed.read_text() == "edited by the user"  # changed after the install: kept
    assert desktop.main(["--uninstall"]) == 2  # nothing installed any more: a sentence, exit 2


def test_the_packaging_scripts_run_on_their_own(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "share"), "KAMAL_PYTHON": sys.executable}
    for script in ("install-desktop-entry", "build-bundle", "render-icons"):
        out = subprocess.run([str(PACKAGING / script), "--help"], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stdout.strip(), script
    out = subprocess.run([sys.executable, "-m", "kamal_app.main", "--install-desktop-entry"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "share" / "applications" / f"{desktop.APP_ID}.desktop").is_file()
    out = subprocess.run([str(PACKAGING / "install-desktop-entry"), "--uninstall"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0 and not (tmp_path / "share" / "applications").exists(), out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bundle is built on Linux")
def test_build_bundle_never_replaces_an_archive_it_did_not_write(tmp_path):
    import shutil

    repo = tmp_path / "checkout"  # a copy: the script works in the checkout it is in
    (repo / "packaging").mkdir(parents=True)
    shutil.copy(PACKAGING / "build-bundle", repo / "packaging")
    shutil.copy(PACKAGING.parent / "pyproject.toml", repo)
    theirs = repo / "dist" / f"KAmalStudio-{__version__}-linux-x86_64.tar.gz"
    theirs.parent.mkdir()
    theirs.write_bytes(b"someone's own archive")
    out = subprocess.run([str(repo / "packaging" / "build-bundle")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "was not written by build-bundle" in out.stderr and theirs.name in out.stderr
    assert theirs.read_bytes() == b"someone's own archive" and not (repo / "build").exists()
