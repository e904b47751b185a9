"""Running a recipe end to end: ``kamal run RECIPE [--resume]`` and the app's worker.

Outputs in the recipe's output folder (``docs/architecture.md``, "Run folder"): ``recipe.toml`` (the recipe as run),
``metrics.csv``, ``report.json``, ``student.kamal.pt`` and ``checkpoints/last.pt``. A checkpoint
is written at every block boundary (and after fine-tuning); a cancelled or crashed run keeps its
finished blocks and ``resume=True`` continues after the last one. Every phase draws its random
numbers from its own seed, so a resumed CPU run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, distributed, layout
from .backbones import build_model
from .checkpoints import atomic_write
from .data import read_labelled
from .devices import resolve_device
from .errors import DiskFullError, DivergedError, KamalError, OutOfMemoryError
from .evaluation import Evaluation, evaluate_student, evaluate_teacher_on_selection
from .events import (CancelToken, Cancelled, Emit, Evaluated, Failed, Finished, LossHistory, Progress, RunCancelled,
                     RunStarted, RunWarning, StageStarted)
from .onnx.export import export_onnx
from .methods import MethodResult, get_method, resolve_params
from .methods.common import RunContext
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .profile import count_flops, count_parameters
from .profiling import RunProfile
from .recipe import Recipe
from .runfolder import (CHECKPOINT_FORMAT, holder_text, inspect_run_folder, lock_run_folder,
                        read_run_checkpoint, remove_partial_writes, write_manifest)
from .selection import TaskSelection
from .targetnet import Student
from .teacher import load_pretrained
from .training import MetricsLog, UnlabeledImages, effective_precision, teacher_targets



class Checkpointer:
    """``checkpoints/last.pt``: plain data (``weights_only``-loadable), written atomically."""

    def __init__(self, path: Path, method: str, fingerprint: dict[str, Any] | None = None, write: bool = True):
        self.path, self.method = path, method
        self.write = write  # False on the ranks > 0 of a distributed run: the state is kept, never written
        self.fingerprint = json.loads(json.dumps(fingerprint or {}, default=str))
        self.extra: dict[str, Any] = {}  # the runner's own part of every state saved (the networks' layout)
        self._state: dict[str, Any] | None = None
        self._file: dict[str, Any] | None = None

    def _read(self) -> dict[str, Any] | None:
        """The checkpoint file's contents, read once (never on a rank that does not write: it gets rank 0's
        state, :meth:`adopt`)."""
        if self._file is None and self.write and self.path.exists():
            self._file = torch.load(self.path, map_location="cpu", weights_only=True)
        return self._file

    def load(self) -> dict[str, Any] | None:
        if self._state is None and self._read() is not None:
            data = self._read()
            if data.get("format") != CHECKPOINT_FORMAT or data.get("method") != self.method:
                raise KamalError(f"is not a checkpoint of a '{self.method}' run; start over with --restart", self.path)
            saved = json.loads(data.get("fingerprint", "{}"))
            changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            if changed:
                raise KamalError(f"was written by a run with other settings ({', '.join(changed)} changed since); resume "
                                 "with the recipe the run was started with, or start over with --restart", self.path)
            self._state = data["state"]
        return self._state

    def adopt(self, state: dict[str, Any] | None) -> None:
        """The state rank 0 loaded, on another rank of a distributed run (which may be on another machine)."""
        self._state = state

    def save(self, state: dict[str, Any], finished: bool = False) -> None:
        """Write ``state`` atomically; weights that turned NaN/Inf are never saved over the last good ones."""
        state = {**state, **self.extra}
        bad = _non_finite(state)
        if bad:
            raise DivergedError(f"the training diverged: the weights to checkpoint ({bad}) are not finite numbers "
                                f"at step {state.get('step', '?')}; the previous checkpoint is kept",
                                step=state.get("step"))
        self._state = state
        data = {"format": CHECKPOINT_FORMAT, "method": self.method, "finished": finished, "state": state,
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        if self.write:
            atomic_write(self.path, lambda tmp: torch.save(data, tmp))

    def mark_finished(self) -> None:
        if self.load() is not None:
            self.save(self._state, finished=True)

    def is_unfinished(self) -> bool:
        data = self._read()
        return data is not None and not data.get("finished", False)


def _non_finite(value, name: str = "") -> str | None:
    """The name of the first floating-point tensor in ``value`` (nested dicts/lists) holding NaN or Inf."""
    if isinstance(value, torch.Tensor):
        return name or "a tensor" if value.is_floating_point() and not bool(torch.isfinite(value).all()) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


@dataclass
class RunResult:
    output_dir: Path
    student: Student
    report: dict[str, Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_student(recipe: Recipe, selection: TaskSelection) -> tuple[torch.nn.Module, str, dict, Preprocessing]:
    """The initial student: ``init = "teacher"`` copies a teacher's weights (not its classifier);
    ``init = "checkpoint"`` starts from a weights file, as the papers start from ImageNet weights
    (:func:`~kamal_engine.teacher.load_pretrained`); ``init = "random"`` from nothing."""
    source = selection.teachers[recipe.student_teacher - 1]
    arch = recipe.student_arch or source.arch
    if recipe.student_arch_kwargs:
        kwargs = dict(recipe.student_arch_kwargs)
    else:  # the same architecture as its teacher: the same constructor arguments unless others are given
        kwargs = dict(source.arch_kwargs) if arch == source.arch else {}
    model = build_model(arch, len(selection.labels), **kwargs)
    if recipe.student_init == "teacher":
        if arch != source.arch or kwargs != source.arch_kwargs:
            raise KamalError(f"[student] init = \"teacher\" copies teacher {recipe.student_teacher} ('{source.name}', "
                             f"{source.arch} {source.arch_kwargs}), but the student is {arch} {kwargs}; use the same "
                             "architecture or init = \"random\"", recipe.path)
        own = model.state_dict()
        weights = {k: v for k, v in source.model.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(weights, strict=False)
        preprocessing = source.preprocessing
    else:
        preprocessing = Preprocessing(recipe.image_size or source.preprocessing.input_size, IMAGENET_MEAN, IMAGENET_STD)
        if recipe.student_init == "checkpoint":
            # a bundle's own normalisation (what its weights were trained with), else the ImageNet one
            preprocessing = load_pretrained(model, arch, recipe.student_checkpoint) or preprocessing
    if recipe.image_size:
        preprocessing = preprocessing.replace(input_size=recipe.image_size)
    return model, arch, kwargs, preprocessing


def _clean(value):
    if isinstance(value, float):
        return None if value != value else round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def run_recipe(recipe: Recipe, *, resume: bool = False, restart: bool = False, replace: bool = False,
               emit: Emit | None = None, cancel: CancelToken | None = None, command: str | None = None,
               nproc: int = 1) -> RunResult:
    """Run ``recipe``; report through ``emit``; stop between steps once ``cancel`` is set.

    ``command`` says who runs it, for a second run refused on the folder (default: this process's
    command line). ``nproc`` > 1: distributed data parallel on that many processes of this machine,
    this one rank 0 (:mod:`~kamal_engine.distributed`); started by torchrun, each rank calls this
    with ``nproc=1`` and the process group comes from the environment.

    A fresh run (not ``resume``) starts only in a folder of its own (:mod:`~kamal_engine.runfolder`):
    ``restart`` moves an unfinished run there aside, ``replace`` a finished one; a folder with files
    no run wrote is refused.

    Raises :class:`RunCancelled` when cancelled (after emitting :class:`Cancelled`), and re-raises
    any failure after emitting :class:`Failed`.
    """
    emit = emit or (lambda event: None)
    cancel = cancel or CancelToken()
    if nproc > 1 and not distributed.current().distributed:
        return _run_ranks(recipe, nproc, resume=resume, restart=restart, replace=replace, emit=emit, cancel=cancel,
                          command=command)
    try:
        try:
            return _run(recipe, resume, restart, replace, emit, cancel, command)
        except DivergedError as exc:
            raise explain_divergence(exc, recipe) from None
        except torch.cuda.OutOfMemoryError as exc:
            raise explain_out_of_memory(exc, recipe) from None
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise DiskFullError(f"the disk is full (or over quota) while writing {exc.filename or 'a file'} for the run "
                                f"in {recipe.output_dir}; free some space, then continue with --resume (Start → Resume "
                                "in the app): the last checkpoint is intact and no file is left half-written") from None
    except RunCancelled:
        emit(Cancelled("the finished blocks are kept"))
        raise
    except KamalError as exc:
        emit(Failed(str(exc)))
        raise
    except Exception as exc:
        emit(Failed(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


def _run_ranks(recipe: Recipe, nproc: int, **options) -> RunResult:
    """:func:`run_recipe` as rank 0 of ``nproc`` processes (:func:`~kamal_engine.distributed.start_ranks`);
    the other ranks are waited for, or stopped when this one fails or is cancelled."""
    method = get_method(recipe.method)
    if not method.distributed:
        raise one_process_only(recipe, method, "run it without --nproc")
    payload = {"recipe": recipe, **{k: options[k] for k in ("resume", "restart", "replace", "command")}}
    ranks = distributed.start_ranks(nproc, payload, recipe.device)
    ok = False
    try:
        result = run_recipe(recipe, **options)
        ok = True
        return result
    finally:
        codes = ranks.finish(ok)
        distributed.leave()
        failed = [(rank, code) for rank, code in enumerate(codes, 1) if code]
        if ok and failed:
            raise KamalError(f"the run in {recipe.output_dir} finished on process 0, but process {failed[0][0]} of "
                             f"{nproc} ended with exit code {failed[0][1]} (its error is printed above)")


def one_process_only(recipe: Recipe, method, what_to_do: str) -> KamalError:
    """The error for a distributed run of a method that runs in one process only."""
    from .methods import MODULES

    others = ", ".join(m for m in MODULES if get_method(m).distributed)
    return recipe.error(f"method '{method.id}' runs in one process only (the distributed runs are those of {others}); "
                        f"{what_to_do}", "method", "id")


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def explain_divergence(exc: DivergedError, recipe: Recipe) -> DivergedError:
    """``exc`` with what is kept and what to do: the last good checkpoint, and a lower ``lr``."""
    state = (read_run_checkpoint(recipe.output_dir / "checkpoints" / "last.pt") or {}).get("state")
    kept = (f"The last good checkpoint (step {state.get('step', '?')}) is kept in "
            f"{recipe.output_dir / 'checkpoints' / 'last.pt'}" if state else "No block had finished, so no checkpoint "
            "was written")
    lr = recipe.params.get("lr")
    hint = f"lower [method] lr (now {lr}), for example to {lr / 10:g}," if isinstance(lr, (int, float)) else \
        "lower [method] lr (for example ten times)"
    return DivergedError(f"{exc}. {kept}. To go on, {hint} and start over (kamal run --restart, or Start → Start "
                         "over in the app)", exc.stage, exc.block, exc.step)


def fitting_batch_size(batch: int, peak: int, request: int, free: int) -> int:
    """A batch size that fits when ``batch`` needed ``peak`` bytes plus a ``request`` that failed while
    ``free`` bytes were left: memory grows about linearly with the batch, and 10 % is kept in reserve;
    when that estimate is no smaller (the memory was fragmented, not short), half the batch."""
    estimate = int(batch * 0.9 * (peak + free) / max(1, peak + request))
    return max(1, estimate if estimate < batch else batch // 2)


def explain_out_of_memory(exc: BaseException, recipe: Recipe) -> OutOfMemoryError:
    """CUDA ran out of memory: the batch size that would fit (:func:`fitting_batch_size`)."""
    import re

    batch = recipe.params.get("batch_size")
    suggestion = "lower [method] batch_size"
    if isinstance(batch, int) and torch.cuda.is_available():
        found = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)", str(exc))
        request = float(found.group(1)) * {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[found.group(2)] if found \
            else 0
        peak = torch.cuda.max_memory_allocated()
        free = torch.cuda.mem_get_info()[0]
        suggestion = f"set [method] batch_size = {fitting_batch_size(batch, peak, int(request), free)} (now {batch})"
    return OutOfMemoryError(f"the GPU ran out of memory during the run in {recipe.output_dir}; {suggestion} and "
                            "start over (--restart), or close other programs using the GPU and continue with --resume "
                            "(the last checkpoint is intact)")


def _run(recipe: Recipe, resume: bool, restart: bool, replace: bool, emit: Emit, cancel: CancelToken,
         command: str | None = None) -> RunResult:
    started = time.monotonic()
    try:
        method = get_method(recipe.method)
    except KamalError as exc:
        raise recipe.error(str(exc), "method", "id") from None
    if method.mode != recipe.mode:
        raise recipe.error(f"method '{method.id}' works in {method.mode} mode but [data].mode is '{recipe.mode}'",
                           "method", "id")
    params = resolve_params(method, recipe.params, lambda message, key: recipe.error(message, "method", key))
    world = distributed.join(recipe.device)  # torchrun's ranks, or those of _run_ranks; one process otherwise
    if world.distributed and not method.distributed:
        raise one_process_only(recipe, method, "start it without torchrun or --nproc")
    checkpointer = Checkpointer(recipe.output_dir / "checkpoints" / "last.pt", method.id, fingerprint(recipe, params),
                                write=world.main)
    if resume and world.main and not checkpointer.path.exists():
        raise KamalError(f"there is no checkpoint to resume from in {recipe.output_dir} (no block of a run there has "
                         "finished); start over with --restart instead of --resume")
    # one run per folder; a fresh run is refused early by the folder rule, and claims the folder (moving an
    # earlier run aside) only once the recipe's inputs have loaded
    if world.main:
        lock, folder = lock_run_folder(recipe.output_dir, resume=resume, restart=restart, replace=replace,
                                       command=command)
    else:  # the other ranks of a distributed run write nothing: rank 0 holds the folder
        lock, folder = _NoLock(), None
    try:
        run = RecipeRun(recipe, method, params, checkpointer, resume, emit, cancel, world)
        return run.execute(lock, folder, started)
    finally:
        lock.release()


class _NoLock:
    stale = None

    def release(self) -> None:
        pass


def fingerprint(recipe: Recipe, params: dict[str, Any]) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    return {
        "params": params, "seed": recipe.seed,
        "teachers": [[str(t.checkpoint), t.select, t.arch, t.task, t.input_size, t.mean, t.std] for t in recipe.teachers],
        "student": [recipe.student_arch, recipe.student_arch_kwargs, recipe.student_init, recipe.student_teacher]
        + ([str(recipe.student_checkpoint)] if recipe.student_checkpoint else []),
        "data": [str(recipe.unlabeled), recipe.image_size],
    }


@dataclass
class RunInputs:
    """What a run reads before training: teachers, their selected tasks, the initial student, the data."""

    teachers: list
    selection: TaskSelection
    student: torch.nn.Module
    arch: str
    arch_kwargs: dict
    preprocessing: Preprocessing
    validation: Any  # LabelledSet | None
    images: UnlabeledImages | None
    targets: list[torch.Tensor] | None


class RecipeRun:
    """One run of a recipe in its locked output folder: the pipeline's steps, in order (:meth:`execute`)."""

    def __init__(self, recipe: Recipe, method, params: dict[str, Any], checkpointer: Checkpointer, resume: bool,
                 emit: Emit, cancel: CancelToken, world: distributed.World = distributed.SINGLE):
        self.recipe, self.method, self.params, self.checkpointer = recipe, method, params, checkpointer
        self.resume, self.emit, self.cancel = resume, emit, cancel
        self.world = world  # a distributed run's processes; only rank 0 writes and evaluates
        self.out = recipe.output_dir
        self.device: torch.device | None = None
        self.profile = RunProfile()  # report.json "profile": where the run's time went
        self.layouts: dict[str, dict] = {}  # report.json "layout": each network's layout (choose_layouts)

    def execute(self, lock, folder, started: float) -> RunResult:
        """Inputs, training, the student file, its size and validation, the ONNX export, ``report.json``."""
        if self.world.main:  # a killed run's half-written temporary files (never the files they replace)
            remove_partial_writes(self.out)
        resumed = self.checkpointer.load() if self.resume and self.world.main else None
        if self.resume and self.world.distributed:  # rank 0's checkpoint, also on ranks of other machines
            resumed = self.world.from_main(resumed)
            self.checkpointer.adopt(resumed)
        seed_everything(self.recipe.seed)
        self.device = resolve_device(self.recipe.device)
        if self.world.backend == "nccl":  # one GPU per rank
            self.device = torch.device("cuda", self.world.local_rank)
        inputs = self.load_inputs(lock, folder, resumed)
        result = self.train(inputs, resumed)
        net = layout.apply(result.net.cpu(), "contiguous")  # the student file in the default layout
        student = Student(net, inputs.preprocessing, inputs.arch, inputs.arch_kwargs, result.granularity, self.method.id,
                          info={"recipe": self.recipe.name, "seed": self.recipe.seed})
        if not self.world.main:  # rank 0 saves, evaluates, exports and reports
            return RunResult(self.out, student, {})
        with self.profile.part("save student"):
            student.save(self.out / "student.kamal.pt")
        with self.profile.part("sizes"):
            report = self.describe(inputs, result, student)
        if inputs.validation is not None:
            with self.profile.part("evaluate"):
                report["validation"] = self.validate(inputs, student)
            if "coverage" in report:  # a data-free run: the rates its generated images are compared with
                report["coverage"]["real"] = {label: rate for t in report["validation"]["teachers"].values()
                                              for label, rate in t.get("present", {}).items()}
        with self.profile.part("export onnx"):
            summary = {"student": str(self.out / "student.kamal.pt"), **self.export(student, report)}
        report["seconds"] = round(time.monotonic() - started, 1)
        report["profile"] = self.profile.to_dict(time.monotonic() - started)
        report = _clean(report)
        atomic_write(self.out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
        self.checkpointer.mark_finished()
        self.emit(Finished(str(self.out), {**summary, "seconds": report["seconds"]}))
        return RunResult(self.out, student, report)

    def load_inputs(self, lock, folder, resumed) -> RunInputs:
        """Teachers, selection and initial student; then the folder is claimed (an earlier run moved
        aside) and the validation set, the unlabeled images and the teachers' soft targets are read."""
        recipe, method, emit = self.recipe, self.method, self.emit
        teachers = [entry.load() for entry in recipe.teachers]
        selection = TaskSelection.build(teachers, [entry.select for entry in recipe.teachers], shared=method.shared_labels)
        model, arch, kwargs, preprocessing = build_student(recipe, selection)
        if self.world.main:
            self.claim(lock, folder, resumed)
        self.world.barrier()  # the other ranks read nothing of the folder before rank 0 has claimed it
        validation = read_labelled(recipe.validation) if recipe.validation else None  # refused before training
        images, targets = None, None
        if recipe.unlabeled:  # data mode; a data-free run has no images to load or predict on
            size = max(max(max(t.preprocessing.input_size) for t in teachers), max(preprocessing.input_size))
            with self.profile.part("load images"):
                images = self.load_images((size, size))
            if method.soft_targets:  # adaptive-ka runs its teachers during training (features too)
                emit(StageStarted("teacher-targets"))
                with self.profile.part("teacher targets", len(images)):
                    targets = teacher_targets(selection, images.images, self.device, cancel=self.cancel)
        return RunInputs(teachers, selection, model, arch, kwargs, preprocessing, validation, images, targets)

    def claim(self, lock, folder, resumed) -> None:
        """The folder becomes the run's own (an earlier run moved aside, the manifest written); the recipe
        as run is saved and the run announced."""
        moved = None
        if not self.resume:  # a foreign folder was refused before; an earlier run of ours is moved aside
            moved = None if folder.state == "new" else lock.move_aside()
            write_manifest(self.out, engine_version=__version__, method=self.method.id, recipe=self.recipe.name)
        atomic_write(self.out / "recipe.toml", lambda tmp: tmp.write_text(self.recipe.to_toml()))
        self.emit(RunStarted(self.recipe.name, self.method.id, str(self.device), str(self.out), 0,
                             resumed_from=str(self.checkpointer.path) if resumed else None,
                             moved_aside=str(moved) if moved else None))
        if lock.stale:
            self.emit(RunWarning(f"the run folder's lock was left by {holder_text(lock.stale)}, which is no longer "
                                 "running (killed or crashed); this run took it over"))

    def load_images(self, size: tuple[int, int]) -> UnlabeledImages:
        """The unlabeled images, decoded once; damaged ones skipped with a warning (up to ``max_damaged``)."""
        emit = self.emit
        emit(StageStarted("load-images"))
        images = UnlabeledImages.from_folder(self.recipe.unlabeled, size, cancel=self.cancel,
                                             max_damaged=self.recipe.max_damaged,
                                             progress=lambda done, total: emit(Progress("load-images", done, total)))
        if images.damaged:
            shown = "; ".join(f"{p} ({why})" for p, why in images.damaged[:3])
            emit(RunWarning(f"{len(images.damaged)} of {len(images) + len(images.damaged)} unlabeled images cannot be "
                            f"read and are skipped: {shown}" + (" …" if len(images.damaged) > 3 else "")))
        return images

    def train(self, inputs: RunInputs, resumed) -> MethodResult:
        """The method itself, with ``metrics.csv`` open (a resumed run keeps the rows up to its checkpoint)."""
        def evaluate_net(net) -> Evaluation:
            student = Student(net, inputs.preprocessing, inputs.arch, inputs.arch_kwargs, "stage", self.method.id)
            return evaluate_student(student, inputs.validation, self.device)

        self.layouts = self.choose_layouts(inputs, resumed)
        main = self.world.main
        metrics = MetricsLog(self.out / "metrics.csv" if main else None,
                             keep_until_step=resumed.get("step", 0) if resumed else None)
        if inputs.images is not None:
            inputs.images.world = self.world
        if metrics.kept:  # resumed: the plots get the finished part of the run too
            self.emit(LossHistory(metrics.history()))
        try:
            ctx = RunContext(inputs.selection, inputs.student, inputs.arch, inputs.arch_kwargs, inputs.preprocessing,
                             inputs.images, inputs.targets, self.device, self.recipe.precision, self.params,
                             self.recipe.seed, self.emit, self.cancel, metrics, self.checkpointer,
                             evaluate_net if inputs.validation is not None and main else None, self.method.id,
                             self.out, self.profile, self.world)
            return self.method.run(ctx)
        finally:
            metrics.close()

    def choose_layouts(self, inputs: RunInputs, resumed) -> dict[str, dict]:
        """Each network's tensor layout (:mod:`~kamal_engine.layout`): a resumed run's own, else
        ``[run] memory_format``, measured per network with ``auto``; applied, and kept in the checkpoint."""
        saved = (resumed or {}).get("layout") or {}
        batch = int(self.params.get("batch_size", 16))
        nets = [("student", inputs.student, inputs.preprocessing.input_size, False)]
        nets += [(t.name, t.model, t.preprocessing.input_size, True) for n, t in enumerate(inputs.teachers)
                 if inputs.selection.covered_by(n)]
        out = {}
        with self.profile.part("layout"):
            for name, model, size, teacher in nets:
                times = None
                if name in saved:
                    chosen = saved[name]
                elif self.recipe.memory_format != "auto":
                    chosen = self.recipe.memory_format
                else:
                    times = layout.measure(model, batch, size, self.device, teacher=teacher)
                    chosen = layout.choose(times)
                out[name] = {"layout": chosen, **({"ms": {k: round(v * 1000, 2) for k, v in times.items()}}
                                                 if times else {})}
            out = self.world.from_main(out)  # distributed: rank 0's measurement decides for every rank
            for name, model, _, _ in nets:
                layout.apply(model, out[name]["layout"])
        self.checkpointer.extra["layout"] = {name: v["layout"] for name, v in out.items()}
        return out

    def describe(self, inputs: RunInputs, result: MethodResult, student: Student) -> dict[str, Any]:
        """The report's description of the run: method, tasks, the method's own report, data and sizes."""
        teachers, selection, images = inputs.teachers, inputs.selection, inputs.images
        report: dict[str, Any] = {
            "engine_version": __version__, "method": self.method.id, "params": self.params, "device": str(self.device),
            "precision": effective_precision(self.device, self.recipe.precision),
            "labels": selection.labels,
            "tasks": [{"name": t.name, "teacher": teachers[t.teacher].name, "kind": t.kind, "labels": list(t.labels),
                       "teachers": [teachers[n].name for n, _ in t.sources]} for t in selection.tasks],
            **result.report,
            "targetnet": student.net.describe(),
        }
        if images is not None:
            report["data"] = {"images": len(images), "damaged": len(images.damaged),
                              "damaged_files": [{"path": str(p), "error": why} for p, why in images.damaged[:100]]}
        sizes = {t.name: {"parameters": count_parameters(t.model),
                          "flops": count_flops(t.model, t.preprocessing.input_size)} for t in teachers}
        used = [t.name for n, t in enumerate(teachers) if selection.covered_by(n)]
        covered = sum(sizes[name]["parameters"] for name in used)
        own = {"parameters": count_parameters(student.net), "flops": count_flops(student.net, inputs.preprocessing.input_size)}
        report["layout"] = self.layouts
        report["size"] = {"student": own, "teachers": sizes, "student_vs_teachers_parameters": own["parameters"] / covered,
                          "student_vs_teachers_flops": own["flops"] / max(1, sum(sizes[name]["flops"] for name in used))}
        origin = (self.checkpointer.load() or {}).get("replanned_from") if self.resume else None
        if origin:  # kamal replan: the blocks were trained by that run
            report["replanned_from"] = origin
        return report

    def validate(self, inputs: RunInputs, student: Student) -> dict[str, Any]:
        """Every teacher on its selected labels, then the student, on the validation set."""
        self.emit(StageStarted("evaluate"))
        out = {"data": str(self.recipe.validation), "teachers": {}, "student": None}
        for n, teacher in enumerate(inputs.teachers):
            if not inputs.selection.covered_by(n):  # kept in the recipe with select = [], teaches nothing
                continue
            ev = evaluate_teacher_on_selection(teacher, inputs.selection, n, inputs.validation, self.device)
            out["teachers"][teacher.name] = ev.to_dict()
            self.emit(Evaluated(teacher.name, ev.ap, ev.mean_ap, ev.accuracy))
        ev = evaluate_student(student, inputs.validation, self.device)
        out["student"] = ev.to_dict()
        self.emit(Evaluated("student", ev.ap, ev.mean_ap, ev.accuracy))
        return out

    def export(self, student: Student, report: dict[str, Any]) -> dict[str, str]:
        """``[export]``: the ONNX file, verified against PyTorch (a failure keeps the student, and is reported)."""
        recipe = self.recipe
        if not recipe.onnx:
            return {}
        self.emit(StageStarted("export"))
        try:
            exported = export_onnx(student, recipe.onnx, opset=recipe.opset, fp16=recipe.fp16)
        except KamalError as exc:
            report["onnx"] = {"path": str(recipe.onnx), "error": str(exc)}
            return {"onnx_error": str(exc)}
        report["onnx"] = exported.to_dict()
        return {"onnx": str(exported.path)}


def has_unfinished_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a run that stopped before it finished (``--resume`` continues it)."""
    return inspect_run_folder(output_dir).state == "unfinished"
