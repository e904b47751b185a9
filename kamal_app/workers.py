"""Background work in a QThread, in the style of superqt/napari's workers.

A :class:`Worker` runs ``fn(report, abort)`` in its own thread. ``report(value)`` forwards a value
to the GUI thread as ``yielded`` (throttled by the caller where needed); ``abort`` is a
:class:`threading.Event` the function checks between steps (cooperative cancel; a thread is never
terminated). Signals: ``started``, ``yielded(object)``, ``returned(object)``, ``errored(object)``
(the exception), ``finished`` — ``errored`` is always followed by ``finished``. Values are never
``None`` across threads (``returned`` carries :data:`NOTHING` instead): PySide6 miscounts the
references of ``None`` sent through queued signals and crashes after many.

:class:`WorkerHandle` keeps the Python references to the thread and the worker until the thread
has finished, then quits and waits; :meth:`WorkerHandle.stop` requests the abort and waits.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot


NOTHING = object()  # what ``returned`` carries when the function returned None


class Worker(QObject):
    started = Signal()
    yielded = Signal(object)
    returned = Signal(object)
    errored = Signal(object)
    finished = Signal()

    def __init__(self, fn: Callable[[Callable[[Any], None], threading.Event], Any]):
        super().__init__()
        self.fn = fn
        self.abort = threading.Event()

    @Slot()
    def run(self) -> None:
        self.started.emit()
        try:
            result = self.fn(self.yielded.emit, self.abort)
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the GUI, then finished
            self.errored.emit(exc)
        else:  # never None through a queued signal: PySide6 miscounts None's references across threads
            self.returned.emit(NOTHING if result is None else result)
        finally:
            self.finished.emit()


class WorkerHandle(QObject):
    """Owns a worker and its thread from start until the thread has stopped."""

    done = Signal()  # after the thread has fully stopped

    _live: set["WorkerHandle"] = set()  # keeps running handles referenced even if the caller drops them

    def __init__(self, fn, parent: QObject | None = None):
        super().__init__(parent)
        self.thread = QThread()
        self.worker = Worker(fn)
        self.worker.moveToThread(self.thread)
        self.thread.started.connect(self.worker.run)
        # direct: quit() runs in the worker thread, so stop() can wait without the GUI event loop
        self.worker.finished.connect(self.thread.quit, Qt.ConnectionType.DirectConnection)
        self.thread.finished.connect(self._thread_finished)

    def start(self) -> "WorkerHandle":
        WorkerHandle._live.add(self)
        self.thread.start()
        return self

    def is_running(self) -> bool:
        return self.thread.isRunning()

    def request_abort(self) -> None:
        self.worker.abort.set()

    def stop(self, timeout_ms: int = 30000) -> bool:
        """Ask the work to stop and wait for the thread; True when it has stopped."""
        self.request_abort()
        if self.thread.isRunning():
            return self.thread.wait(timeout_ms)
        return True

    @Slot()
    def _thread_finished(self) -> None:
        WorkerHandle._live.discard(self)
        self.done.emit()


def running_handles() -> list[WorkerHandle]:
    return [h for h in WorkerHandle._live if h.is_running()]
