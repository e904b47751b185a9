"""``kamal replan RUN``: the TargetNet of another branch plan, from the trained blocks of a finished run.

The block-wise methods (``filtered-ka``, ``dual-gan``) checkpoint the student's blocks, the filters and
every task's converged loss before they choose a plan. A replan starts a new run folder (beside RUN
unless told otherwise; RUN itself is only read) whose checkpoint is RUN's as it stood when its last
block had finished, with the plan options replaced, and resumes it: only the plan, the fine-tuning,
the evaluation and the export run again. Every phase draws from its own seed, so on the CPU the
result equals a fresh run of the same recipe with those options.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace as copy_of
from pathlib import Path
from typing import Any

from . import __version__
from .errors import KamalError
from .events import CancelToken, Emit
from .methods import get_method, resolve_params
from .recipe import follow_output_dir, load_recipe
from .runfolder import inspect_run_folder, lock_run_folder, read_run_checkpoint, write_manifest

PLAN_OPTIONS = ("max_params", "branch_tolerance", "branch_at")
FINETUNE_KEYS = ("finetuned", "targetnet")  # what the fine-tuning added to the checkpoint


def _tag(options: dict[str, Any]) -> str:
    """A short name for the options, for the new folder: ``p0.6``, ``tol0.05``, ``at-one-b3``."""
    parts = []
    if "max_params" in options:
        parts.append(f"p{options['max_params']:g}")
    if "branch_tolerance" in options:
        parts.append(f"tol{options['branch_tolerance']:g}")
    if options.get("branch_at"):
        text = "-".join(f"{k}-{v}" for k, v in sorted(options["branch_at"].items()))
        if len(text) > 40 or not all(c.isalnum() or c in "-_." for c in text):  # long, or not a safe file name
            text = hashlib.sha1(text.encode()).hexdigest()[:10]
        parts.append("at-" + text)
    return "-".join(parts) or "plan"


def parse_branch_at_args(items: list[str] | None) -> dict[str, str] | None:
    """``["one=b3", "eight=b4"]`` (or one comma-separated string) as ``{"one": "b3", "eight": "b4"}``."""
    if not items:
        return None
    out = {}
    for item in ",".join(items).split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise KamalError(f"--branch-at {item!r}: write LABEL=BLOCK, e.g. --branch-at one=b3 eight=b4")
        label, block = (s.strip() for s in item.split("=", 1))
        out[label] = block
    return out


def replan_folder(run_dir: str | Path, options: dict[str, Any]) -> Path:
    """Where a replan of ``run_dir`` with ``options`` goes by default: ``RUN-<options>`` beside RUN."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(f"{run_dir.name}-{_tag(options)}")


def prepare_replan(run_dir: str | Path, options: dict[str, Any], output: str | Path | None = None,
                   replace: bool = False, command: str | None = None):
    """The new run's recipe, its folder claimed and seeded with RUN's block checkpoint; returns the recipe.

    ``options``: the plan options to use (``max_params``, ``branch_tolerance``, ``branch_at``); those not
    given go back to the method's defaults, so the plan follows from the options given alone."""
    from .runner import Checkpointer, fingerprint

    run_dir = Path(run_dir).resolve()
    info = inspect_run_folder(run_dir)
    if not info.is_run:
        raise KamalError("is not a run folder (no run wrote it); give the output folder of a finished kamal run",
                         run_dir)
    checkpoint = read_run_checkpoint(run_dir / "checkpoints" / "last.pt")
    if info.state != "finished" or checkpoint is None:
        raise KamalError("holds a run that has not finished (or has no checkpoint); continue it with kamal run "
                         "--resume first, then replan it", run_dir)
    recipe = load_recipe(run_dir / "recipe.toml")
    method = get_method(recipe.method)
    if not method.branches or "max_params" not in {p.name for p in method.params}:
        raise KamalError(f"is a run of '{method.id}', which does not branch out per task; replan works on runs of "
                         "the block-wise methods (filtered-ka, dual-gan)", run_dir)
    state = dict(checkpoint["state"])
    if not state.get("blocks_done"):
        raise KamalError("has a checkpoint without trained blocks; run the recipe again", run_dir)
    if not any(k in options for k in PLAN_OPTIONS):
        raise KamalError("give the plan to build: --max-params, --branch-tolerance or --branch-at")
    params = {k: v for k, v in recipe.params.items() if method.renamed.get(k, k) not in PLAN_OPTIONS}
    params.update({k: v for k, v in options.items() if v is not None})
    new = copy_of(recipe, params=params, name=f"{recipe.name}-{_tag(options)}", text="")
    new.output_dir = Path(output).resolve() if output else replan_folder(run_dir, options)
    if new.output_dir == run_dir:
        raise KamalError("a replan writes a new run folder and only reads the run it starts from; choose another "
                         "--output", run_dir)
    new.onnx = follow_output_dir(recipe.onnx, recipe.output_dir, new.output_dir)
    if new.onnx is not None and new.onnx == recipe.onnx:  # outside RUN: that file is RUN's export, never replaced
        new.onnx = new.output_dir / "student.onnx"
    resolved = resolve_params(method, new.params, lambda message, key: KamalError(f"--{key.replace('_', '-')}: "
                                                                                  f"{message}"))
    lock, folder = lock_run_folder(new.output_dir, replace=replace, command=command)
    try:
        if folder.state != "new":
            lock.move_aside()
        write_manifest(new.output_dir, engine_version=__version__, method=method.id, recipe=new.name)
        for key in FINETUNE_KEYS:
            state.pop(key, None)
        state["step"] = state.get("blocks_step", state.get("step", 0))
        state["replanned_from"] = str(run_dir)
        Checkpointer(new.output_dir / "checkpoints" / "last.pt", method.id, fingerprint(new, resolved)).save(state)
        if (run_dir / "metrics.csv").is_file():
            shutil.copyfile(run_dir / "metrics.csv", new.output_dir / "metrics.csv")
    finally:
        lock.release()
    return new


def replan(run_dir: str | Path, options: dict[str, Any], *, output: str | Path | None = None, replace: bool = False,
           emit: Emit | None = None, cancel: CancelToken | None = None, command: str | None = None):
    """Build and fine-tune the TargetNet of the plan ``options`` choose from RUN's trained blocks, in a new
    run folder (:func:`prepare_replan`); returns the :class:`~kamal_engine.runner.RunResult`. A cancelled or
    killed replan is an unfinished run there, continued with ``kamal run --resume``."""
    from .runner import run_recipe

    recipe = prepare_replan(run_dir, options, output, replace, command)
    try:
        return run_recipe(recipe, resume=True, emit=emit, cancel=cancel, command=command)
    except KamalError:
        discard_unstarted(recipe.output_dir)
        raise


def discard_unstarted(folder: Path) -> bool:
    """Remove what :func:`prepare_replan` wrote into ``folder`` when the replan was refused before it built a
    student (a budget no plan meets, a bad branch_at): only the files a replan writes, then the folder if
    that left it empty. Returns whether the folder is gone."""
    from .runfolder import LOCK, MANIFEST, lock_holder

    state = (read_run_checkpoint(folder / "checkpoints" / "last.pt") or {}).get("state") or {}
    if (lock_holder(folder) is not None or "replanned_from" not in state or "finetuned" in state
            or (folder / "student.kamal.pt").exists() or (folder / "report.json").exists()):
        return False  # another run holds it, or it is no longer the replan prepare_replan wrote
    for name in ("checkpoints/last.pt", "metrics.csv", "recipe.toml", MANIFEST, LOCK):
        (folder / name).unlink(missing_ok=True)
    for path in (folder / "checkpoints", folder):
        try:
            path.rmdir()  # only when empty: anything else there stays
        except OSError:
            return False
    return True
