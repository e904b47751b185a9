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

One run at a time: a run holds ``.kamal-run.lock`` (:class:`RunLock`, an OS file lock, so a killed
process never leaves it held) from its start to its end; a second run on that folder, from the CLI
or the app, is refused with the process that holds it. The file names that process (pid, command,
host, start time); when its process is gone, the next run takes the lock over and says so.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KamalError

MANIFEST = ".kamal-run.json"
LOCK = ".kamal-run.lock"
MANIFEST_FORMAT = "kamal-run"
CHECKPOINT_FORMAT = "kamal-run-checkpoint"
#: names a run writes in its folder (anything else there came from elsewhere)
RUN_ENTRIES = (MANIFEST, LOCK, "checkpoints", "metrics.csv", "recipe.toml", "student.kamal.pt", "report.json",
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


def read_run_checkpoint(path: Path) -> dict | None:
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
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
    if not entries:
        return RunFolder(folder, "new")
    checkpoint = read_run_checkpoint(folder / "checkpoints" / "last.pt")
    ours = _manifest(folder) is not None or checkpoint is not None or (
        (folder / "report.json").is_file() and (folder / "student.kamal.pt").is_file())
    foreign = [name for name in entries if name not in RUN_ENTRIES]
    if not ours:
        return RunFolder(folder, "foreign", [name for name in entries if name not in (MANIFEST, LOCK)][:5])
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


def remove_partial_writes(folder: Path) -> list[Path]:
    """Remove the temporary files a killed run left mid-write (``.<name>.<random>.part`` of the run's own
    outputs, as :func:`~kamal_engine.checkpoints.atomic_write` names them). Returns what was removed."""
    removed = []
    for place in (folder, folder / "checkpoints"):
        if not place.is_dir():
            continue
        for path in place.glob(".*.part"):
            name = path.name[1:].rsplit(".", 2)[0]  # ".last.pt.k3j2_x.part" -> "last.pt"
            if path.is_file() and name in (("last.pt",) if place.name == "checkpoints" else RUN_ENTRIES):
                path.unlink()
                removed.append(path)
    return removed


def write_manifest(folder: Path, **info) -> None:
    """``.kamal-run.json``: marks ``folder`` as a run's own (written first, atomically)."""
    from .checkpoints import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    data = {"format": MANIFEST_FORMAT, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **info}
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


# --- one run per folder ----------------------------------------------------------------------------

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # Windows: a byte-range lock on the file's first byte (also released when a process dies)
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def holder_text(info: dict) -> str:
    """``process 1234 (kamal run r.toml, on host, since 20:10:03)`` from a lock file's contents."""
    parts = [str(info.get("command") or "a KAmal run")]
    if info.get("host") and info.get("host") != socket.gethostname():
        parts.append(f"on {info['host']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return f"process {info.get('pid', '?')} ({', '.join(parts)})"


def lock_holder(folder: str | Path) -> dict | None:
    """Who holds ``folder``'s run lock (the lock file's contents), or None when no live process does."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        return _read_lock(path)
    finally:
        os.close(fd)


def _read_lock(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


def _default_command() -> str:
    """This process's command line, e.g. ``kamal run recipes/r.toml`` or ``kamal-studio``."""
    return " ".join([Path(sys.argv[0]).name or "python", *sys.argv[1:]]) if sys.argv else "python"


def _in_use(folder: Path, info: dict) -> KamalError:
    return KamalError(f"is in use by another run: {holder_text(info)}. Wait for it to finish or stop it (Ctrl-C "
                      "where it runs, Cancel in the app), or choose another output folder", folder)


class RunLock:
    """``<folder>/.kamal-run.lock``, held while a run writes the folder (:meth:`acquire`, :meth:`release`).

    The OS holds the lock for the process, so a run killed with ``kill -9`` leaves the file but not the
    lock: the next run takes it over (``stale`` then holds what the file said about the dead process).
    """

    def __init__(self, folder: Path, fd: int, stale: dict | None, command: str, created: bool):
        self.folder, self.fd, self.stale, self.command, self.created = folder, fd, stale, command, created

    @property
    def path(self) -> Path:
        return self.folder / LOCK

    @classmethod
    def acquire(cls, folder: str | Path, command: str | None = None) -> "RunLock":
        """Lock ``folder`` (created if missing) for this process, or :class:`KamalError` naming the holder."""
        folder = Path(folder)
        command = command or _default_command()
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK
        for _ in range(10):  # the file can be removed between open and lock (a run ending): lock the new one
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                raise _in_use(folder, _read_lock(path))
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if same:
                break
            _unlock(fd)
            os.close(fd)
        else:  # pragma: no cover - needs ten runs ending in the same instant
            raise KamalError("could not be locked for this run (its lock file kept changing); try again", folder)
        previous = _read_lock(path)
        stale = previous if previous.get("pid") not in (None, os.getpid()) else None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": command}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        return cls(folder, fd, stale, command, created)

    def move_aside(self) -> Path:
        """:func:`move_aside` the locked folder, then lock the new, empty folder at the same path.

        The lock file moves with the old folder; should another run take the new, empty folder first,
        this run is refused (nothing is lost either way).
        """
        target = move_aside(self.folder)
        old_fd = self.fd
        try:
            fresh = RunLock.acquire(self.folder, command=self.command)
        finally:
            (target / LOCK).unlink(missing_ok=True)  # our own lock file, held by us until here
            _unlock(old_fd)
            os.close(old_fd)
            self.fd = None
        self.fd = fresh.fd
        return target

    def release(self) -> None:
        """Remove the lock file (while holding it, so no run can lock the removed file) and unlock; a
        folder this lock created and nothing else was written to goes too."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        _unlock(self.fd)
        os.close(self.fd)
        self.fd = None
        if self.created:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_folder(folder: str | Path, *, resume: bool = False, restart: bool = False, replace: bool = False,
                    command: str | None = None) -> tuple[RunLock, RunFolder]:
    """Lock ``folder`` for a run: refused when another run holds it, then by :func:`check_run_folder`
    (unless ``resume``), checked before anything is written and once more under the lock."""
    folder = Path(folder)
    holder = lock_holder(folder)
    if holder is not None:
        raise _in_use(folder, holder)
    if not resume:
        check_run_folder(folder, restart=restart, replace=replace)  # a foreign folder gets no lock file
    lock = RunLock.acquire(folder, command)
    try:
        info = inspect_run_folder(folder) if resume else check_run_folder(folder, restart=restart, replace=replace)
    except BaseException:
        lock.release()
        raise
    return lock, info
