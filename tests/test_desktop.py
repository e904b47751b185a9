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
