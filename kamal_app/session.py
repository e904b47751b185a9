"""The app's state: loaded teachers, ticked labels, data, method and run settings.

One :class:`StudioSession` per window. It converts to and from a
:class:`~kamal_engine.recipe.Recipe`, so that what the window shows is exactly what a saved recipe
holds and what ``kamal run`` runs. Plain Python plus one Qt signal (``changed``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
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
        # every run setting, as the recipe holds it; ``recipe.teachers`` stays empty (the loaded teachers and
        # their ticked labels are ``teachers``) and ``output_dir`` is None until the user chooses a folder
        self.recipe = Recipe(None, name="my-student", output_dir=None)
        # what the user typed for the methods (and chose per mode) they switched away from: kept for
        # when they switch back
        self.params_by_method: dict[str, dict[str, Any]] = {}
        self.method_by_mode: dict[str, str] = {}

    def edit(self, **changes: Any) -> None:
        """Change run settings by the :class:`~kamal_engine.recipe.Recipe` field names (``dataclasses.replace``,
        so a misspelt name is an error). Does not emit ``changed``: the caller does, once per user edit."""
        self.recipe = replace(self.recipe, **changes)

    def set_param(self, name: str, value: Any) -> None:
        """Set one hyper-parameter of the chosen method."""
        self.edit(params={**self.recipe.params, name: value})

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
        if self.recipe.student_teacher > max(1, len(self.teachers)):
            self.edit(student_teacher=1)
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
        r = self.recipe
        if r.mode == "data" and r.unlabeled is None:
            reasons.append("choose a folder of unlabeled images, or switch to data-free (Data & method page)")
        if r.method not in method_ids(r.mode):
            reasons.append(f"choose a {r.mode} method (Data & method page)")
        if r.output_dir is None:
            reasons.append("choose an output folder (Data & method page)")
        return reasons

    def set_method(self, method_id: str) -> None:
        """Switch method; the hyper-parameters set for the one left are kept for when it comes back."""
        if method_id == self.recipe.method:
            return
        self.params_by_method[self.recipe.method] = dict(self.recipe.params)
        self.edit(method=method_id, params=dict(self.params_by_method.get(method_id, {})))

    def set_mode(self, mode: str) -> None:
        """Switch mode ("data" or "data-free"); the method last chosen in that mode comes back (else its first)."""
        if mode == self.recipe.mode:
            return
        self.method_by_mode[self.recipe.mode] = self.recipe.method
        self.edit(mode=mode)
        ids = method_ids(mode)
        if self.recipe.method not in ids and ids:
            self.set_method(self.method_by_mode.get(mode) if self.method_by_mode.get(mode) in ids else ids[0])

    def teachers_used(self) -> int:
        """Teachers with at least one ticked label."""
        return sum(1 for t in self.teachers if t.selected)

    def set_output_dir(self, folder: Path | None) -> None:
        """Choose the run's output folder; the ONNX export path follows it when it was inside the previous
        one (:func:`~kamal_engine.recipe.follow_output_dir`)."""
        self.edit(onnx=follow_output_dir(self.recipe.onnx, self.recipe.output_dir, folder), output_dir=folder)

    def shares_labels(self) -> bool:
        """Whether the chosen method learns a label ticked in several teachers from all of them."""
        return self.recipe.method in MODULES and get_method(self.recipe.method).shared_labels

    def _selected_owners(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.teachers:
            for label in t.selected:
                counts[label] = counts.get(label, 0) + 1
        return counts

    # --- recipe conversion -----------------------------------------------------------------------
    def to_recipe(self, path: Path | None = None) -> Recipe:
        """The recipe this session describes (absolute paths; :func:`recipe_text` makes them relative)."""
        r = self.recipe
        path = path or self.recipe_path
        teachers = [replace(t.entry, select=list(t.selected), arch_kwargs=dict(t.entry.arch_kwargs))
                    for t in self.teachers]
        out = r.output_dir or ((path.parent if path else Path.cwd()) / "runs" / r.name)
        return replace(r, path=path, output_dir=out, teachers=teachers, text="",
                       student_arch_kwargs=dict(r.student_arch_kwargs), params=dict(r.params),
                       student_checkpoint=r.student_checkpoint if r.student_init == "checkpoint" else None,
                       unlabeled=r.unlabeled if r.mode == "data" else None)

    def load_recipe(self, recipe: Recipe, teachers: list[Teacher]) -> None:
        """Replace the state with ``recipe`` whose teachers are already loaded (``teachers``)."""
        self.reset()
        self.recipe_path = recipe.path
        for entry, teacher in zip(recipe.teachers, teachers):
            self.teachers.append(LoadedTeacher(entry, teacher, list(teacher.labels) if entry.select is None
                                               else [label for label in entry.select]))
        self.recipe = replace(recipe, teachers=[], text="", params=dict(recipe.params),
                              student_arch_kwargs=dict(recipe.student_arch_kwargs))
        self.notify()

    def state(self) -> dict[str, Any]:
        """A comparable snapshot (tests: save, open again → identical)."""
        settings = {f.name: getattr(self.recipe, f.name) for f in fields(Recipe)
                    if f.name not in ("path", "text", "teachers")}
        return {
            "teachers": [(str(t.entry.checkpoint), t.name, t.teacher.arch, t.teacher.task, list(t.teacher.labels),
                          list(t.selected)) for t in self.teachers],
            **settings,
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

    copy = replace(recipe, path=path, output_dir=rel(recipe.output_dir), unlabeled=rel(recipe.unlabeled),
                   validation=rel(recipe.validation), onnx=rel(recipe.onnx),
                   student_checkpoint=rel(recipe.student_checkpoint),
                   teachers=[replace(t, checkpoint=rel(t.checkpoint), labels_file=rel(t.labels_file))
                             for t in recipe.teachers])
    header = (f"{RECIPE_HEADER} Paths are relative to this file.\n"
              f"# Run it with:  kamal run {path.name}\n")
    return header + copy.to_toml()
