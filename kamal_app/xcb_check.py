"""Whether Qt's xcb platform (the X11 window system) can load here, and which packages it lacks.

Qt aborts with "could not load the Qt platform plugin xcb" when a shared library of the xcb plugin is
missing, without saying which. ``python -m kamal_app.xcb_check`` (run by ``./bootstrap demo`` before
the window opens) lists the plugin's unresolved libraries (``ldd``) and names the Debian/Ubuntu
packages that provide them; exit status 2 when some are missing, 0 when all are there or the check
does not apply (not Linux, no ``ldd``, another platform asked for with ``QT_QPA_PLATFORM``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# library (soname) -> the Debian/Ubuntu package that provides it
PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1", "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0", "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-randr.so.0": "libxcb-randr0", "libxcb-shape.so.0": "libxcb-shape0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0", "libxkbcommon.so.0": "libxkbcommon0",
    "libxcb-util.so.1": "libxcb-util1", "libxcb-shm.so.0": "libxcb-shm0", "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0", "libxcb-render.so.0": "libxcb-render0", "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb.so.1": "libxcb1", "libX11-xcb.so.1": "libx11-xcb1", "libX11.so.6": "libx11-6",
    "libGL.so.1": "libgl1", "libEGL.so.1": "libegl1", "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6", "libglib-2.0.so.0": "libglib2.0-0", "libgthread-2.0.so.0": "libglib2.0-0",
    "libdbus-1.so.3": "libdbus-1-3", "libSM.so.6": "libsm6", "libICE.so.6": "libice6",
}


def plugin_path() -> Path | None:
    """Qt's xcb platform plugin in the installed PySide6, if there is one."""
    try:
        import PySide6
    except ImportError:
        return None
    path = Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    return path if path.is_file() else None


def unresolved(ldd_output: str) -> list[str]:
    """The libraries ``ldd`` printed as ``not found``, in its order, each once."""
    found = re.findall(r"^\s*(\S+)\s+=>\s+not found", ldd_output, flags=re.MULTILINE)
    return list(dict.fromkeys(found))


def missing_libraries(plugin: Path | None = None) -> list[str]:
    """The shared libraries Qt's xcb plugin needs and this machine lacks (``[]``: none, or no way to tell)."""
    plugin = plugin or plugin_path()
    if plugin is None or shutil.which("ldd") is None:
        return []
    out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True)
    return unresolved(out.stdout + out.stderr)


def advice(missing: list[str]) -> str:
    """What to tell a user whose machine lacks ``missing``: the libraries and the packages to install."""
    packages = sorted({PACKAGES.get(lib, "") for lib in missing} - {""})
    unknown = [lib for lib in missing if lib not in PACKAGES]
    text = (f"KAmal Studio cannot open its window: Qt's X11 (xcb) platform plugin needs {', '.join(missing)}, "
            "which this machine lacks.")
    if packages:
        text += f" On Debian or Ubuntu install them with:\n  sudo apt-get install {' '.join(packages)}"
    if unknown:
        text += f"\n(No package is known here for {', '.join(unknown)}: search your distribution's packages for it.)"
    return text + ("\nWithout a display, `kamal demo DIR` builds the demo workspace and `kamal run` trains from the "
                   "command line.")


def main() -> int:
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM", "xcb").split(":")[0] != "xcb":
        return 0
    missing = missing_libraries()
    if not missing:
        return 0
    print(advice(missing), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
