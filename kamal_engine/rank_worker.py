"""A rank > 0 of a run started by :func:`kamal_engine.distributed.start_ranks` (``kamal run --nproc N``, the
app's "all N GPUs"): ``python -m kamal_engine.rank_worker PARENT_PID`` with the pickled recipe and run
options on its standard input. It runs its share of the training and writes nothing."""

from __future__ import annotations

import os
import pickle
import signal
import sys



def _die_with(parent: int) -> None:
    """Tie this worker to rank 0's process ``parent``: Ctrl-C is rank 0's to act on (it stops the others),
    and on Linux the worker gets SIGKILL the moment rank 0 dies (killed with -9, crashed); it never lingers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # rank 0 died before the tie was made
        os._exit(1)


def worker_main(parent: int) -> int:
    """A rank > 0 started by ``start_ranks``: the run of the payload, writing nothing; its exit status."""
    _die_with(parent)  # before torch loads (seconds)
    from .distributed import leave
    from .errors import KamalError
    from .events import RunCancelled
    from .runner import run_recipe

    payload = pickle.loads(sys.stdin.buffer.read())
    rank = os.environ.get("RANK", "?")
    try:
        run_recipe(payload["recipe"], resume=payload["resume"], restart=payload["restart"],
                   replace=payload["replace"], command=payload.get("command"))
    except RunCancelled:
        return 130
    except KamalError as exc:
        print(f"kamal (process {rank}): error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        leave()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1])))
