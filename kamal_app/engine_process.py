"""Training in a child process, supervised by the Train page's worker thread.

The engine could run in the worker thread itself, but then it shares one Python interpreter (one
GIL) with the GUI thread: every redraw, timer tick and signal of the window had to win the GIL from
the training loop and the other way round. On the 2-core benchmark machine that cost 60 % of the
training throughput (165 vs 430 img/s) and stalled the event loop for 150-260 ms
(``benchmarks/app_responsiveness.py``). So the worker thread starts the run in a child process
(``multiprocessing``'s *spawn* start method, the same on Linux, macOS and Windows) and relays:

* the child's engine events, which arrive through a one-way :func:`multiprocessing.Pipe` and are
  handed to the page's :class:`~kamal_app.monitor.EventQueue` (the page drains it 20 times a second);
* cancel: the worker's abort flag becomes a message on a second pipe, which the child turns into
  its :class:`~kamal_engine.events.CancelToken`; the run stops after the current step and keeps
  its finished blocks, exactly as in ``kamal run``;
* the outcome: a :class:`~kamal_engine.runner.RunResult` (the run's folder and report travel; the student is read back from
  its bundle) or the exception the run raised, re-raised in the worker thread, so the worker's
  ``errored`` → ``finished`` contract is unchanged.

Nothing is lost if either side dies: when the app is gone, the child sees the end of the cancel pipe
and cancels itself (keeping its blocks); a child that dies without a word (killed, out of memory)
becomes an :class:`EngineProcessDied` error that says Resume continues the run. (Pipes, not a
``multiprocessing.Event``: setting an Event waits for its waiters, and a dead waiter never answers.)
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the runner imports torch: the app's process loads it only when a run ends
    from kamal_engine.runner import RunResult

POLL_SECONDS = 0.2  # how often the supervisor looks at the abort flag while no event arrives
CHILD_NICENESS = 10  # the training process's scheduling priority, below the window's (POSIX nice)


class EngineProcessDied(RuntimeError):
    """The training process ended without reporting how (killed, crashed, out of memory)."""


def _child_main(recipe, resume: bool, replace: bool, out, cancel_in) -> None:
    """Runs in the child: ``run_recipe`` with every event sent through ``out``, then the outcome."""
    _lower_priority()
    from kamal_engine.events import CancelToken
    from kamal_engine.runner import run_recipe

    token = CancelToken()

    def watch() -> None:  # the app asked to cancel, or the app is gone: stop after the current step
        try:
            cancel_in.recv()
        except (EOFError, OSError):  # end of file: the app's end of the pipe closed, the app is gone
            pass
        token.cancel()

    def send(message) -> None:
        try:
            out.send(message)
        except OSError:  # the app is gone: keep the finished blocks and stop
            token.cancel()

    threading.Thread(target=watch, daemon=True, name="cancel-watch").start()
    try:
        result = run_recipe(recipe, resume=resume, restart=replace, replace=replace, emit=lambda e: send(("event", e)),
                            cancel=token, command=f"KAmal Studio, the window of process {os.getppid()}",
                            nproc=recipe.nproc)  # "all N GPUs": this process is rank 0 of N
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the app
        send(("errored", _picklable(exc)))
    else:
        send(("returned", (str(result.output_dir), result.report)))
    finally:
        out.close()
        # Everything is on disk and the outcome is sent: skip the interpreter's teardown, which
        # takes about a second with torch loaded (the app waits for this process to exit).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _lower_priority() -> None:
    """Training is background work: the window's thread must get a core the moment it needs one.

    Without this, on a machine with few cores the GUI thread waits for the OS to preempt the
    training threads (which take every core), and the window stalls for 100+ ms at a time.
    """
    try:
        os.nice(CHILD_NICENESS)
    except (AttributeError, OSError):  # Windows has no nice(); a refused nice is harmless
        pass


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception type that cannot travel: keep its sentence
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def run_in_child_process(recipe, resume: bool, emit: Callable[[Any], None], abort: threading.Event,
                         poll_seconds: float = POLL_SECONDS, replace: bool = False) -> RunResult:
    """Run ``recipe`` in a child process; call ``emit`` for each of its events (in this thread).

    ``replace``: the user agreed to move an earlier run in the output folder aside
    (:mod:`kamal_engine.runfolder`). Returns when the child has exited. Raises what the run raised (``RunCancelled`` after a
    cancel, ``KamalError`` for bad input, …) or :class:`EngineProcessDied`.
    """
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)  # events and the outcome, child → app
    cancel_in, cancel_out = context.Pipe(duplex=False)  # cancel, app → child (a pipe: a dead end is seen)
    child = context.Process(target=_child_main, name="kamal-engine", args=(recipe, resume, replace, writer, cancel_in))
    child.start()
    writer.close()  # each side holds only its own ends: a process's exit is end of file for the other
    cancel_in.close()

    def cancel() -> None:
        try:
            cancel_out.send(True)
        except OSError:  # the child has already exited
            pass

    outcome = None
    try:
        while outcome is None:
            if abort.is_set():
                cancel()
            ready = wait([reader, child.sentinel], timeout=poll_seconds)
            if reader in ready:
                try:
                    kind, payload = reader.recv()
                except EOFError:
                    outcome = _died(child)
                    continue
                if kind == "event":
                    emit(payload)
                else:
                    outcome = (kind, payload)
            elif ready:  # the child has exited: what it sent last is still in the pipe, or nothing
                outcome = _last_words(reader, emit, child)
    finally:
        if child.is_alive():  # normally a moment: the child has sent its outcome and is exiting
            cancel()
            child.join(60)
        reader.close()
        cancel_out.close()
        if child.is_alive():  # never terminate a run that may still be writing its checkpoint; say so
            raise EngineProcessDied(f"The training process (pid {child.pid}) did not exit within 60 s after "
                                    "its run ended; it is left running.")
    kind, payload = outcome
    if kind == "errored":
        raise payload
    output_dir, report = payload
    from kamal_engine.runner import RunResult
    from kamal_engine.targetnet import load_student

    output_dir = Path(output_dir)
    return RunResult(output_dir=output_dir, report=report, student=load_student(output_dir / "student.kamal.pt"))


def _last_words(reader, emit, child) -> tuple[str, Any]:
    """The child has exited: the outcome it sent last, or an error saying it died."""
    try:
        while reader.poll():
            kind, payload = reader.recv()
            if kind != "event":
                return kind, payload
            emit(payload)
    except EOFError:
        pass
    return _died(child)


def exit_text(code: int | None) -> str:
    """How a process ended, for a sentence: ``killed by signal SIGKILL (9)`` or ``exit code 3``."""
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        why = {"SIGKILL": ", as the system's out-of-memory killer or kill -9 does", "SIGSEGV": ", a crash",
               "SIGTERM": ", asked to stop"}.get(name, "")
        return f"killed by signal {name} ({-code}){why}"
    return f"exit code {code}"


def _died(child) -> tuple[str, Any]:
    child.join()
    return "errored", EngineProcessDied(
        f"The training process (pid {child.pid}) ended unexpectedly: {exit_text(child.exitcode)}. The finished "
        "blocks are kept: Start → Resume continues the run.")
