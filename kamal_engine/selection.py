"""Which outputs the student learns from which teacher: the customised task set C (Eq. 1, 8).

A *task* is one unit of branch-out. Each selected label of a multi-label teacher is its own task
(its own sigmoid output); the selected classes of a multi-class teacher form one task whose
softmax is renormalised over the selection. The student's outputs follow the user's label order:
teacher by teacher, in each teacher the order of its ``select`` list.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class TaskSelection:
    teachers: list  # list[Teacher]
    tasks: list[Task]
    labels: list[str]  # student output names, in order

    @classmethod
    def build(cls, teachers: Sequence, selections: Sequence[Sequence[str] | None]) -> "TaskSelection":
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
            if clash:
                raise KamalError(f"label(s) {', '.join(map(repr, clash))} selected from more than one teacher; the "
                                 "student has one output per label: select each label from one teacher only")
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
        return [t for t in self.tasks if t.teacher == teacher]
