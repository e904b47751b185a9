"""Which outputs the student learns from which teacher: the customised task set C (Eq. 1, 8).

A *task* is one unit of branch-out. Each selected label of a multi-label teacher is its own task
(its own sigmoid output); the selected classes of a multi-class teacher form one task whose
softmax is renormalised over the selection. The student's outputs follow the user's label order:
teacher by teacher, in each teacher the order of its ``select`` list.

Most methods learn each label from one teacher, and a label ticked in two teachers is an error.
``adaptive-ka`` learns a label from every teacher that has it (``shared=True``): the label is one
task whose :attr:`Task.sources` lists each covering teacher with its output columns; the first
teacher that selects it is the task's ``teacher`` and fixes its place among the student's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from .errors import KamalError


@dataclass(frozen=True)
class Task:
    name: str  # the label for a multi-label task; "<teacher>:<classes>" for a multi-class task
    teacher: int  # index into the teacher list
    kind: str  # "multilabel" | "multiclass"
    outputs: tuple[int, ...]  # indices into the teacher's outputs
    labels: tuple[str, ...]
    positions: tuple[int, ...]  # indices into the student's outputs
    also: tuple[tuple[int, tuple[int, ...]], ...] = ()  # further teachers covering it: (teacher, outputs)

    @property
    def sources(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """Every teacher covering the task, with its output columns in the order of ``labels``."""
        return ((self.teacher, self.outputs),) + self.also


@dataclass
class TaskSelection:
    teachers: list  # list[Teacher]
    tasks: list[Task]
    labels: list[str]  # student output names, in order

    @classmethod
    def build(cls, teachers: Sequence, selections: Sequence[Sequence[str] | None],
              shared: bool = False) -> "TaskSelection":
        """The tasks of ``selections`` (one list of label names per teacher; None: all its labels).

        ``shared``: a label selected from several teachers is one task learned from all of them
        (a multi-class task then needs the same classes from each teacher).
        """
        tasks, labels = [], []
        for n, (teacher, select) in enumerate(zip(teachers, selections)):
            chosen = list(teacher.labels) if select is None else list(select)
            unknown = [label for label in chosen if label not in teacher.labels]
            if unknown:
                raise KamalError(f"teacher '{teacher.name}' has no label(s) {', '.join(map(repr, unknown))}; its labels "
                                 f"are {', '.join(teacher.labels[:12])}{'…' if len(teacher.labels) > 12 else ''}",
                                 teacher.source)
            if len(set(chosen)) != len(chosen):
                raise KamalError(f"a label is selected twice from teacher '{teacher.name}'", teacher.source)
            clash = [label for label in chosen if label in labels]
            if clash and shared:
                tasks = _add_source(tasks, teacher, n, chosen, clash)
                chosen = [label for label in chosen if label not in clash]
                if not chosen:
                    continue
            elif clash:
                raise KamalError(f"label(s) {', '.join(map(repr, clash))} selected from more than one teacher; the "
                                 "student has one output per label: select each label from one teacher only (or use "
                                 "the adaptive-ka method, which learns a label from every teacher that has it)")
            outputs = [teacher.labels.index(label) for label in chosen]
            positions = list(range(len(labels), len(labels) + len(chosen)))
            labels += chosen
            if teacher.task == "multilabel":
                tasks += [Task(label, n, "multilabel", (o,), (label,), (p,))
                          for label, o, p in zip(chosen, outputs, positions)]
            else:
                if len(chosen) < 2:
                    raise KamalError(f"select at least two classes from the multi-class teacher '{teacher.name}' "
                                     "(a softmax over one class predicts nothing)", teacher.source)
                tasks.append(Task(f"{teacher.name}:{'+'.join(chosen)}" if len(chosen) <= 4 else f"{teacher.name}:classes",
                                  n, "multiclass", tuple(outputs), tuple(chosen), tuple(positions)))
        if not tasks:
            raise KamalError("no labels are selected: tick at least one label of one teacher")
        return cls(list(teachers), tasks, labels)

    def tasks_of(self, teacher: int) -> list[Task]:
        """The tasks whose first (or only) teacher is ``teacher``."""
        return [t for t in self.tasks if t.teacher == teacher]

    def covered_by(self, teacher: int) -> list[tuple[Task, tuple[int, ...]]]:
        """Every task ``teacher`` covers (first or further source), with its output columns."""
        return [(t, outputs) for t in self.tasks for n, outputs in t.sources if n == teacher]


def _add_source(tasks: list[Task], teacher, n: int, chosen: list[str], clash: list[str]) -> list[Task]:
    """``tasks`` with teacher ``n`` added as a further source of the labels in ``clash``."""
    tasks = list(tasks)
    if teacher.task == "multilabel":
        for label in clash:
            i = next((i for i, t in enumerate(tasks) if t.kind == "multilabel" and t.labels == (label,)), None)
            if i is None:
                raise KamalError(f"label {label!r} of the multi-label teacher '{teacher.name}' is a class of a "
                                 "multi-class teacher already selected; a label must be of one kind in every teacher",
                                 teacher.source)
            tasks[i] = replace(tasks[i], also=tasks[i].also + ((n, (teacher.labels.index(label),)),))
        return tasks
    match = [i for i, t in enumerate(tasks) if t.kind == "multiclass" and set(t.labels) == set(chosen)]
    if not match or len(clash) != len(chosen):
        raise KamalError(f"the classes selected from the multi-class teacher '{teacher.name}' overlap another "
                         "teacher's selection only in part; a multi-class task learned from several teachers needs "
                         "the same classes selected from each of them", teacher.source)
    i = match[0]
    tasks[i] = replace(tasks[i], also=tasks[i].also + ((n, tuple(teacher.labels.index(c) for c in tasks[i].labels)),))
    return tasks
