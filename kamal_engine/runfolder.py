"""A run's output folder is the run's own: what is in it, and the rule for starting a run there.

A run writes ``.kamal-run.json`` (its manifest: who wrote the folder and when) before anything else,
then ``checkpoints/last.pt``, ``metrics.csv``, ``recipe.toml``, ``student.kamal.pt``, ``report.json``
(and ``components/``, ``student.onnx`` where the method or the recipe's ``[export]`` ask for them).
:func:`inspect_run_folder` tells a folder's state; :func:`claim_run_folder` applies the rule that
the CLI (``kamal run``) and the app follow alike:

============  =====================================================================================
state         starting a fresh run there
============  =====================================================================================
``new``       missing or empty: the run starts.
``unfinished``  refused unless ``restart`` (or ``resume``, which continues it): the old run is
              moved aside to ``<folder>.previous-<timestamp>``, never deleted.
``finished``  refused unless ``replace``: the old run is moved aside the same way.
``foreign``   holds files no run wrote (a user's own folder): always refused; choose another folder.
============  =====================================================================================

Moving aside is one ``rename`` in the same parent folder: it is atomic, and it loses nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KamalError

MANIFEST = ".kamal-run.json"
MANIFEST_FORMAT = "kamal-run"
CHECKPOINT_FORMAT = "kamal-run-checkpoint"
#: names a run writes in its folder (anything else there came from elsewhere)
RUN_ENTRIES = (MANIFEST, "checkpoints", "metrics.csv", "recipe.toml", "student.kamal.pt", "report.json",
               "components", "student.onnx")


@dataclass
class RunFolder:
    """What is in a run's output folder (:func:`inspect_run_folder`)."""

    path: Path
    state: str  # "new" | "unfinished" | "finished" | "foreign"
    foreign: list[str] = field(default_factory=list)  # entries no run wrote (sorted; a few)

    resumable: bool = False  # unfinished with a checkpoint to continue from

    @property
    def is_run(self) -> bool:
        return self.state in ("unfinished", "finished")


def _checkpoint(path: Path) -> dict | None:
    """``checkpoints/last.pt`` when it is a run's checkpoint (not a user's file of the same name)."""
    if not path.is_file():
        return None
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable, foreign or damaged: not a run's checkpoint
        return None
    return data if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT else None


def _manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def inspect_run_folder(folder: str | Path) -> RunFolder:
    """The state of ``folder`` as a run's output folder (see the module's table)."""
    folder = Path(folder)
    if not folder.exists():
        return RunFolder(folder, "new")
    if not folder.is_dir():
        return RunFolder(folder, "foreign", [folder.name])
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return RunFolder(folder, "new")
    checkpoint = _checkpoint(folder / "checkpoints" / "last.pt")
    ours = _manifest(folder) is not None or checkpoint is not None or (
        (folder / "report.json").is_file() and (folder / "student.kamal.pt").is_file())
    foreign = [name for name in entries if name not in RUN_ENTRIES]
    if not ours:
        return RunFolder(folder, "foreign", [name for name in entries if name != MANIFEST][:5])
    if checkpoint is not None and not checkpoint.get("finished", False):
        return RunFolder(folder, "unfinished", foreign[:5], resumable=True)
    if (folder / "report.json").is_file() or (checkpoint is not None and checkpoint.get("finished")):
        return RunFolder(folder, "finished", foreign[:5])
    return RunFolder(folder, "unfinished", foreign[:5])  # started, stopped before its first checkpoint


def aside_path(folder: Path, now: float | None = None) -> Path:
    """``<folder>.previous-<YYYYmmdd-HHMMSS>`` beside ``folder`` (``-2``, ``-3`` … when taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    target = folder.with_name(f"{folder.name}.previous-{stamp}")
    n = 2
    while target.exists():
        target = folder.with_name(f"{folder.name}.previous-{stamp}-{n}")
        n += 1
    return target


def move_aside(folder: Path) -> Path:
    """Rename ``folder`` to :func:`aside_path` (atomic, nothing deleted). Returns the new path."""
    target = aside_path(folder)
    try:
        os.rename(folder, target)
    except OSError as exc:
        raise KamalError(f"could not be moved aside to {target.name} ({exc.strerror or exc}); move or rename it "
                         "yourself, or choose another output folder", folder) from None
    return target


def free_sibling(folder: Path) -> Path:
    """The first of ``<folder>-2``, ``<folder>-3`` … that does not exist (a new folder to suggest)."""
    n = 2
    while folder.with_name(f"{folder.name}-{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}-{n}")


def refusal(info: RunFolder) -> str:
    """Why a fresh run may not start in ``info.path``, and what to do (one sentence each)."""
    if info.state == "foreign":
        shown = ", ".join(info.foreign) + (" …" if len(info.foreign) == 5 else "")
        return (f"holds files that no run wrote ({shown}); a run never writes into such a folder. Choose an empty "
                f"or new output folder (e.g. --output {free_sibling(info.path)})")
    if info.state == "unfinished":
        return ("holds an unfinished run; continue it with --resume, or start over with --restart (the old run is "
                f"moved to {info.path.name}.previous-<timestamp>, nothing is deleted)")
    return (f"holds a finished run; look at it with kamal eval {info.path / 'student.kamal.pt'}, choose another "
            f"output folder (--output {free_sibling(info.path)}), or replace it with --replace (the old run is moved "
            f"to {info.path.name}.previous-<timestamp>, nothing is deleted)")


def check_run_folder(folder: str | Path, *, restart: bool = False, replace: bool = False) -> RunFolder:
    """``folder``'s state when a fresh run may start there by the module's rule; else :class:`KamalError`.

    ``restart`` allows an unfinished run there, ``replace`` a finished (or unfinished) one.
    """
    info = inspect_run_folder(folder)
    if info.state == "foreign" or (info.state == "unfinished" and not (restart or replace)) or (
            info.state == "finished" and not replace):
        raise KamalError(refusal(info), Path(folder))
    return info


def claim_run_folder(folder: str | Path, *, restart: bool = False, replace: bool = False) -> Path | None:
    """Make ``folder`` ready for a fresh run (:func:`check_run_folder`), moving an earlier run aside.

    Returns where the old run went, or None when there was none.
    """
    info = check_run_folder(folder, restart=restart, replace=replace)
    return None if info.state == "new" else move_aside(Path(folder))


def write_manifest(folder: Path, **info) -> None:
    """``.kamal-run.json``: marks ``folder`` as a run's own (written first, atomically)."""
    from .checkpoints import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    data = {"format": MANIFEST_FORMAT, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **info}
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))
