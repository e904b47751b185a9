"""The app's state: loaded teachers, ticked labels, data, method and run settings.

One :class:`StudioSession` per window. It converts to and from a
:class:`~kamal_engine.recipe.Recipe`, so that what the window shows is exactly what a saved recipe
holds and what ``kamal run`` runs. Plain Python plus one Qt signal (``changed``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from kamal_engine.methods import MODULES, get_method
from kamal_engine.recipe import Recipe, TeacherEntry, follow_output_dir
from kamal_engine.teacher import Teacher


@dataclass
class LoadedTeacher:
    entry: TeacherEntry  # how it was loaded (what the recipe stores)
    teacher: Teacher
    selected: list[str] = field(default_factory=list)  # in the teacher's label order

    @property
    def name(self) -> str:
        return self.teacher.name


def method_ids(mode: str) -> list[str]:
    return [m for m in MODULES if get_method(m).mode == mode]


class StudioSession(QObject):
    """Everything a run needs, as the window edits it. Emits ``changed`` after every edit."""

    changed = Signal()

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.reset()

    def reset(self) -> None:
        self.recipe_path: Path | None = None
        self.teachers: list[LoadedTeacher] = []
        self.name = "my-student"
        self.output_dir: Path | None = None
        self.device = "auto"
        self.seed = 0
        self.precision = "auto"
        self.student_arch: str | None = None
        self.student_arch_kwargs: dict[str, Any] = {}
        self.student_init = "teacher"
        self.student_teacher = 1
        self.student_checkpoint: Path | None = None  # the weights file of student_init == "checkpoint"
        self.mode = "data"
        self.unlabeled: Path | None = None
        self.validation: Path | None = None
        self.image_size: int | None = None
        self.max_damaged = 0.01  # [data] max_damaged: not edited in the app, kept from the recipe
        self.method = "filtered-ka"
        self.params: dict[str, Any] = {}
        # what the user typed for the methods (and chose per mode) they switched away from: kept for
        # when they switch back
        self.params_by_method: dict[str, dict[str, Any]] = {}
        self.method_by_mode: dict[str, str] = {}
        self.onnx: Path | None = None
        self.opset = 18
        self.fp16 = False

    def notify(self) -> None:
        self.changed.emit()

    # --- teachers and labels ---------------------------------------------------------------------
    def add_teacher(self, entry: TeacherEntry, teacher: Teacher, selected: list[str] | None = None) -> LoadedTeacher:
        loaded = LoadedTeacher(entry, teacher, list(teacher.labels) if selected is None else list(selected))
        self.teachers.append(loaded)
        self.notify()
        return loaded

    def remove_teacher(self, index: int) -> None:
        del self.teachers[index]
        if self.student_teacher > max(1, len(self.teachers)):
            self.student_teacher = 1
        self.notify()

    def set_selected(self, index: int, labels: list[str]) -> None:
        teacher = self.teachers[index]
        wanted = set(labels)
        teacher.selected = [label for label in teacher.teacher.labels if label in wanted]
        self.notify()

    def selected_count(self) -> int:
        return sum(len(t.selected) for t in self.teachers)

    def distinct_count(self) -> int:
        """Selected labels counted once however many teachers they are ticked in."""
        return len({label for t in self.teachers for label in t.selected})

    def label_owners(self) -> dict[str, list[str]]:
        """Label name → the names of the teachers offering it."""
        owners: dict[str, list[str]] = {}
        for t in self.teachers:
            for label in t.teacher.labels:
                owners.setdefault(label, []).append(t.name)
        return owners

    def start_blockers(self) -> list[str]:
        """Why a run cannot start yet (empty when it can), in the order a user would fix them."""
        reasons = []
        if not self.teachers:
            reasons.append("add at least one teacher (Teachers page)")
        elif not self.selected_count():
            reasons.append("tick at least one label (Labels page)")
        else:
            clash = [label for label, n in self._selected_owners().items() if n > 1]
            if clash and not self.shares_labels():
                reasons.append(f"label {clash[0]!r} is ticked in more than one teacher: tick it in one only, or "
                               "choose adaptive-ka, which learns a label from every teacher that has it")
        if self.mode == "data" and self.unlabeled is None:
            reasons.append("choose a folder of unlabeled images, or switch to data-free (Data & method page)")
        if self.method not in method_ids(self.mode):
            reasons.append(f"choose a {self.mode} method (Data & method page)")
        if self.output_dir is None:
            reasons.append("choose an output folder (Data & method page)")
        return reasons

    def set_method(self, method_id: str) -> None:
        """Switch method; the hyper-parameters set for the one left are kept for when it comes back."""
        if method_id == self.method:
            return
        self.params_by_method[self.method] = dict(self.params)
        self.method = method_id
        self.params = dict(self.params_by_method.get(method_id, {}))

    def set_mode(self, mode: str) -> None:
        """Switch mode ("data" or "data-free"); the method last chosen in that mode comes back (else its first)."""
        if mode == self.mode:
            return
        self.method_by_mode[self.mode] = self.method
        self.mode = mode
        ids = method_ids(mode)
        if self.method not in ids and ids:
            self.set_method(self.method_by_mode.get(mode) if self.method_by_mode.get(mode) in ids else ids[0])

    def teachers_used(self) -> int:
        """Teachers with at least one ticked label."""
        return sum(1 for t in self.teachers if t.selected)

    def set_output_dir(self, folder: Path | None) -> None:
        """Choose the run's output folder; the ONNX export path follows it when it was inside the previous
        one (:func:`~kamal_engine.recipe.follow_output_dir`)."""
        self.onnx = follow_output_dir(self.onnx, self.output_dir, folder)
        self.output_dir = folder

    def shares_labels(self) -> bool:
        """Whether the chosen method learns a label ticked in several teachers from all of them."""
        return self.method in MODULES and get_method(self.method).shared_labels

    def _selected_owners(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.teachers:
            for label in t.selected:
                counts[label] = counts.get(label, 0) + 1
        return counts

    # --- recipe conversion -----------------------------------------------------------------------
    def to_recipe(self, path: Path | None = None) -> Recipe:
        """The recipe this session describes (absolute paths; :func:`recipe_text` makes them relative)."""
        path = path or self.recipe_path
        teachers = []
        for t in self.teachers:
            e = t.entry
            teachers.append(TeacherEntry(e.checkpoint, list(t.selected), e.name, e.arch, dict(e.arch_kwargs),
                                         e.labels_file, e.labels, e.task, e.input_size, e.mean, e.std, e.trust))
        out = self.output_dir or ((path.parent if path else Path.cwd()) / "runs" / self.name)
        return Recipe(path, name=self.name, output_dir=out, device=self.device, seed=self.seed,
                      precision=self.precision, teachers=teachers, student_arch=self.student_arch,
                      student_arch_kwargs=dict(self.student_arch_kwargs), student_init=self.student_init,
                      student_teacher=self.student_teacher,
                      student_checkpoint=self.student_checkpoint if self.student_init == "checkpoint" else None,
                      mode=self.mode,
                      unlabeled=self.unlabeled if self.mode == "data" else None, validation=self.validation,
                      image_size=self.image_size, max_damaged=self.max_damaged, method=self.method, params=dict(self.params), onnx=self.onnx,
                      opset=self.opset, fp16=self.fp16)

    def load_recipe(self, recipe: Recipe, teachers: list[Teacher]) -> None:
        """Replace the state with ``recipe`` whose teachers are already loaded (``teachers``)."""
        self.reset()
        self.recipe_path = recipe.path
        for entry, teacher in zip(recipe.teachers, teachers):
            self.teachers.append(LoadedTeacher(entry, teacher, list(teacher.labels) if entry.select is None
                                               else [label for label in entry.select]))
        self.name, self.output_dir, self.device, self.seed = recipe.name, recipe.output_dir, recipe.device, recipe.seed
        self.precision = recipe.precision
        self.student_arch, self.student_arch_kwargs = recipe.student_arch, dict(recipe.student_arch_kwargs)
        self.student_init, self.student_teacher = recipe.student_init, recipe.student_teacher
        self.student_checkpoint = recipe.student_checkpoint
        self.mode, self.unlabeled, self.validation = recipe.mode, recipe.unlabeled, recipe.validation
        self.image_size, self.method, self.params = recipe.image_size, recipe.method, dict(recipe.params)
        self.max_damaged = recipe.max_damaged
        self.onnx, self.opset, self.fp16 = recipe.onnx, recipe.opset, recipe.fp16
        self.notify()

    def state(self) -> dict[str, Any]:
        """A comparable snapshot (tests: save, open again → identical)."""
        return {
            "teachers": [(str(t.entry.checkpoint), t.name, t.teacher.arch, t.teacher.task, list(t.teacher.labels),
                          list(t.selected)) for t in self.teachers],
            "run": (self.name, str(self.output_dir), self.device, self.seed, self.precision),
            "student": (self.student_arch, self.student_arch_kwargs, self.student_init, self.student_teacher,
                        str(self.student_checkpoint)),
            "data": (self.mode, str(self.unlabeled), str(self.validation), self.image_size, self.max_damaged),
            "method": (self.method, dict(self.params)),
            "export": (str(self.onnx), self.opset, self.fp16),
        }


RECIPE_HEADER = "# KAmal Studio recipe, saved by the app."  # the first line of every recipe the app writes


def recipe_text(recipe: Recipe, path: Path) -> str:
    """The recipe as TOML, paths relative to ``path``'s folder where they are below or beside it."""
    folder = path.parent.resolve()

    def rel(p: Path | None) -> Path | None:
        if p is None:
            return None
        try:
            return Path(os.path.relpath(Path(p).resolve(), folder))
        except ValueError:  # another drive on Windows
            return Path(p)

    copy = Recipe(path, **{k: getattr(recipe, k) for k in (
        "name", "device", "seed", "precision", "student_arch", "student_arch_kwargs", "student_init",
        "student_teacher", "mode", "image_size", "max_damaged", "method", "params", "opset", "fp16")})
    copy.output_dir = rel(recipe.output_dir)
    copy.unlabeled, copy.validation, copy.onnx = rel(recipe.unlabeled), rel(recipe.validation), rel(recipe.onnx)
    copy.student_checkpoint = rel(recipe.student_checkpoint)
    copy.teachers = [TeacherEntry(rel(t.checkpoint), t.select, t.name, t.arch, t.arch_kwargs, rel(t.labels_file),
                                  t.labels, t.task, t.input_size, t.mean, t.std, t.trust) for t in recipe.teachers]
    header = (f"{RECIPE_HEADER} Paths are relative to this file.\n"
              f"# Run it with:  kamal run {path.name}\n")
    return header + copy.to_toml()
