"""Branch plans: where each task leaves the shared trunk, what that TargetNet costs, and the search for
the plan of least converged loss under a parameter budget.

A *plan* maps every task to its branch block (1-based). Its size follows Eq. 10 exactly
(:class:`BranchSizes`): the student's blocks up to the deepest branch point, and per (teacher, block)
pair that some task branches at, the filter joining the trunk to that teacher and the teacher's
remaining blocks and head (tasks of one teacher branching at one block share that tail). Its loss is
the sum of every task's converged loss at its block (Eq. 9 minimises each term alone).

Four rules give a plan (:func:`choose_plan`), applied in this order:

* ``branch_at``: blocks the user fixes for some (or all) tasks;
* ``branch_tolerance`` ε: every other task at the deepest block whose converged loss is within
  (1 + ε) × its minimum (ε = 0 is Eq. 9, ties going to the deeper block);
* ``max_params``: when that plan is bigger than the budget, the plan of least total converged loss
  that fits (ties: the smaller net), searched exactly (:meth:`PlanSpace.front`);
* ``joint`` (dual-gan, Eq. 18): the tasks of one teacher always branch together.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

from .errors import KamalError

CANDIDATES = 4096  # plans drawn on the size/quality chart at most (the exact front always)
MAX_SUBSET = 4  # beyond 10 blocks, a teacher's tasks branch at up to this many blocks in the search


@dataclass
class BranchSizes:
    """Parameter counts of the parts Eq. 10 assembles, so a plan's size is known without building it.

    ``trunk[k-1]``: student block k; ``tail[n][k-1]``: teacher n after block k (its remaining blocks
    and its head); ``filters[(k, n)]``: the filter joining student block k to teacher n.
    """

    trunk: Sequence[int]
    tail: Sequence[Sequence[int]]
    filters: dict[tuple[int, int], int]

    def size(self, plan: dict[str, int], teacher_of: dict[str, int]) -> int:
        """Parameters of the TargetNet of ``plan`` (task → block); tasks of one teacher at one block share
        a branch, trunk blocks after the deepest branch point are dropped."""
        groups = {(teacher_of[task], k) for task, k in plan.items()}
        depth = max(k for _, k in groups)
        return sum(self.trunk[:depth]) + sum(self.branch(n, k) for n, k in groups)

    def branch(self, n: int, k: int) -> int:
        """One branch: teacher n's filter at block k, its blocks after k and its head."""
        return self.tail[n][k - 1] + self.filters[(k, n)]


@dataclass(frozen=True)
class BranchPlan:
    """One plan with its exact TargetNet size, its total converged loss and, where the AP of every
    block was measured, the mAP its TargetNet has before fine-tuning."""

    blocks: dict[str, int]  # task -> branch block (1-based)
    parameters: int
    loss: float
    mean_ap: float | None = None

    def key(self) -> tuple:
        return tuple(sorted(self.blocks.items()))

    def named(self, names: Sequence[str]) -> dict[str, str]:
        return {task: names[k - 1] for task, k in self.blocks.items()}

    def to_dict(self, names: Sequence[str], teachers_parameters: int) -> dict:
        return {"plan": self.named(names), "parameters": self.parameters,
                "fraction": round(self.parameters / max(teachers_parameters, 1), 4),
                "loss": round(self.loss, 6), "mean_ap": None if self.mean_ap is None else round(self.mean_ap, 6)}


def _finite(value) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


@dataclass
class PlanSpace:
    """Every plan of a run: the tasks' converged losses per block, whose teacher each task is, the parts'
    sizes, the blocks fixed by the user, and whether a teacher's tasks branch together (``joint``)."""

    converged: dict[str, Sequence[float]]
    teacher_of: dict[str, int]
    sizes: BranchSizes
    joint: bool = False
    fixed: dict[str, int] = field(default_factory=dict)
    ap: dict[str, dict[int, float | None]] | None = None  # label -> block -> AP before fine-tuning
    labels_of: dict[str, Sequence[str]] | None = None  # task -> its labels (for ``mean_ap``)

    def __post_init__(self):
        self.n_blocks = len(self.sizes.trunk)
        self.tasks = list(self.converged)
        self.tasks_of: dict[int, list[str]] = {}
        for task in self.tasks:
            self.tasks_of.setdefault(self.teacher_of[task], []).append(task)
        self.teachers = sorted(self.tasks_of)
        if self.joint:
            for n, tasks in self.tasks_of.items():
                fixed = {self.fixed[t] for t in tasks if t in self.fixed}
                if len(fixed) > 1:
                    raise KamalError(f"branch_at gives the labels of one teacher ({', '.join(tasks)}) different blocks; "
                                     "this method branches a teacher's labels out together: give them one block")
                if fixed:
                    self.fixed.update({t: next(iter(fixed)) for t in tasks})

    # --- one plan ------------------------------------------------------------------------------
    def loss(self, blocks: dict[str, int]) -> float:
        return sum(_finite(self.converged[t][k - 1]) for t, k in blocks.items())

    def mean_ap(self, blocks: dict[str, int]) -> float | None:
        if not self.ap or not self.labels_of:
            return None
        values = [self.ap.get(label, {}).get(k) for t, k in blocks.items() for label in self.labels_of[t]]
        values = [v for v in values if v is not None and math.isfinite(v)]
        return sum(values) / len(values) if values else None

    def plan(self, blocks: dict[str, int]) -> BranchPlan:
        blocks = {t: blocks[t] for t in self.tasks}
        return BranchPlan(blocks, self.sizes.size(blocks, self.teacher_of), self.loss(blocks), self.mean_ap(blocks))

    def allowed(self, task: str, depth: int | None = None) -> list[int]:
        depth = self.n_blocks if depth is None else depth
        if task in self.fixed:
            return [self.fixed[task]] if self.fixed[task] <= depth else []
        return list(range(1, depth + 1))

    def teacher_loss(self, n: int, k: int) -> float:
        return sum(_finite(self.converged[t][k - 1]) for t in self.tasks_of[n])

    # --- the rules ----------------------------------------------------------------------------
    def tolerance_plan(self, tolerance: float = 0.0) -> dict[str, int]:
        """Each task not fixed at the deepest block whose converged loss is within (1 + ``tolerance``) × its
        minimum (``tolerance`` = 0: Eq. 9); with ``joint`` the same rule on each teacher's summed loss."""
        def deepest(losses: list[tuple[int, float]], what: str) -> int:
            finite = [(k, v) for k, v in losses if math.isfinite(v)]
            if not finite:
                raise ValueError(f"{what} has no finite converged loss: the training diverged")
            best = min(v for _, v in finite)
            return max(k for k, v in finite if v <= best * (1 + tolerance) or v == best)

        if self.joint:
            plan = {}
            for n, tasks in self.tasks_of.items():
                if tasks[0] in self.fixed:
                    plan.update({t: self.fixed[t] for t in tasks})
                    continue
                k = deepest([(k, self.teacher_loss(n, k)) for k in range(1, self.n_blocks + 1)], f"teacher {n}")
                plan.update({t: k for t in tasks})
            return plan
        return {t: self.fixed[t] if t in self.fixed else
                deepest([(k, _finite(v)) for k, v in enumerate(self.converged[t], 1)], f"task {t!r}")
                for t in self.tasks}

    def _teacher_options(self, n: int, depth: int) -> list[tuple[int, float, dict[str, int]]]:
        """Teacher n's Pareto-optimal ways to branch its tasks at blocks ≤ ``depth``: (parameters of its
        branches, summed loss, task → block). A set of blocks is tried whole: each task takes the block of
        least loss among them (ties: the deeper), and a set with an unused block is skipped (dominated)."""
        tasks = self.tasks_of[n]
        if self.joint:
            allowed = set.intersection(*(set(self.allowed(t, depth)) for t in tasks))
            subsets = [(k,) for k in sorted(allowed)]
        else:
            largest = depth if depth <= 10 else MAX_SUBSET
            subsets = [s for r in range(1, largest + 1) for s in itertools.combinations(range(1, depth + 1), r)]
        options = []
        for subset in subsets:
            blocks, used = {}, set()
            for t in tasks:
                choice = [k for k in self.allowed(t, depth) if k in subset]
                if not choice:
                    break
                k = min(choice, key=lambda j: (_finite(self.converged[t][j - 1]), -j))
                blocks[t] = k
                used.add(k)
            else:
                if len(used) == len(subset):
                    options.append((sum(self.sizes.branch(n, k) for k in subset),
                                    sum(_finite(self.converged[t][k - 1]) for t, k in blocks.items()), blocks))
        return _pareto(options)

    def front(self) -> list[BranchPlan]:
        """The exact Pareto front of (parameters, total converged loss) over every plan, smallest first:
        for each depth (the deepest branch block), the teachers' own fronts merged (computed once)."""
        if getattr(self, "_front", None) is None:
            self._front = self._search()
        return list(self._front)

    def _search(self) -> list[BranchPlan]:
        found = []
        for depth in range(1, self.n_blocks + 1):
            merged = [(sum(self.sizes.trunk[:depth]), 0.0, {})]
            for n in self.teachers:
                options = self._teacher_options(n, depth)
                merged = _pareto([(c + c2, l + l2, {**b, **b2}) for c, l, b in merged for c2, l2, b2 in options])
                if not merged:
                    break
            found += merged
        plans = {}
        for _, _, blocks in found:
            plan = self.plan(blocks)  # the true size: the deepest block used may be above ``depth``
            plans.setdefault(plan.key(), plan)
        front, best = [], math.inf
        for plan in sorted(plans.values(), key=lambda p: (p.parameters, p.loss)):
            if plan.loss < best:
                front.append(plan)
                best = plan.loss
        return front

    def smallest(self) -> BranchPlan:
        return self.front()[0]

    def best_within(self, budget: int) -> BranchPlan | None:
        """The plan of least total converged loss with at most ``budget`` parameters (ties: the smaller)."""
        fitting = [p for p in self.front() if p.parameters <= budget]
        return min(fitting, key=lambda p: (p.loss, p.parameters)) if fitting else None

    def candidates(self, limit: int = CANDIDATES) -> list[BranchPlan]:
        """Plans for the chart: every plan when there are at most ``limit``, else every plan giving each
        teacher's tasks one block (at most ``limit``), and always the front."""
        per_task = [self.allowed(t) for t in self.tasks]
        plans = {p.key(): p for p in self.front()}
        if math.prod(len(a) for a in per_task) <= limit and not self.joint:
            for combo in itertools.product(*per_task):
                plan = self.plan(dict(zip(self.tasks, combo)))
                plans.setdefault(plan.key(), plan)
            return sorted(plans.values(), key=lambda p: (p.parameters, p.loss))
        per_teacher = [sorted(set.intersection(*(set(self.allowed(t)) for t in self.tasks_of[n])))
                       for n in self.teachers]
        for i, combo in enumerate(itertools.product(*per_teacher)):
            if i >= limit:
                break
            chosen = dict(zip(self.teachers, combo))
            plan = self.plan({t: chosen[self.teacher_of[t]] for t in self.tasks})
            plans.setdefault(plan.key(), plan)
        return sorted(plans.values(), key=lambda p: (p.parameters, p.loss))


def _pareto(options: list[tuple[int, float, dict]]) -> list[tuple[int, float, dict]]:
    """The options no other one beats in both size and loss (smallest first; equal loss: the smaller)."""
    out, best = [], math.inf
    for option in sorted(options, key=lambda o: (o[0], o[1])):
        if option[1] < best:
            out.append(option)
            best = option[1]
    return out


def budget_parameters(max_params: float, teachers_parameters: int) -> int | None:
    """``max_params`` as a parameter count: 0 means no budget; up to 100 a fraction of the teachers'
    summed parameters; above 100 a count."""
    if max_params <= 0:
        return None
    return int(max_params) if max_params > 100 else int(max_params * teachers_parameters)


def parse_branch_at(branch_at: dict, tasks, names: Sequence[str]) -> dict[str, int]:
    """``branch_at`` (task or label → block name, e.g. ``{one = "b3"}``) as task → 1-based block; an
    error naming the recipe key and what is known when a label or a block does not exist."""
    by_label = {}
    for task in tasks:
        by_label[task.name] = task.name
        for label in task.labels:
            by_label.setdefault(label, task.name)
    out = {}
    for key, block in branch_at.items():
        if key not in by_label:
            raise KamalError(f"[method].branch_at: {key!r} is not a selected label; the selected labels are "
                             f"{', '.join(by_label)}")
        if block not in names:
            raise KamalError(f"[method].branch_at: {key} = {block!r} is not a block of the student; its blocks are "
                             f"{', '.join(names)} (set granularity to change them)")
        out[by_label[key]] = list(names).index(block) + 1
    return out


def choose_plan(space: PlanSpace, tolerance: float, budget: int | None) -> tuple[BranchPlan, str]:
    """The run's plan and the rule that gave it: ``"eq9"`` (ε = 0), ``"tolerance"``, ``"branch_at"`` (every
    task fixed), ``"budget"`` (the rules' plan did not fit ``budget``: the least-loss plan that does) or
    ``"over-budget"`` (no plan fits: the smallest there is; :func:`over_budget` says so)."""
    plan = space.plan(space.tolerance_plan(tolerance))
    how = ("branch_at" if len(space.fixed) == len(space.tasks) else "tolerance" if tolerance > 0 else "eq9")
    if budget is None or plan.parameters <= budget:
        return plan, how
    best = space.best_within(budget)
    return (best, "budget") if best is not None else (space.smallest(), "over-budget")


def over_budget(smallest: BranchPlan, budget: int, teachers_parameters: int, names: Sequence[str],
                fixed: bool = False) -> str:
    """The sentence for a budget no plan meets, naming the smallest TargetNet there is."""
    total = max(teachers_parameters, 1)
    return (f"no branch plan fits max_params ({budget:,} parameters, {budget / total:.2f} x the teachers'"
            f"{' with the blocks branch_at fixes' if fixed else ''}): the smallest TargetNet has "
            f"{smallest.parameters:,} parameters ({smallest.parameters / total:.2f} x), with "
            f"{', '.join(f'{t} at {names[k - 1]}' for t, k in smallest.blocks.items())}, and is the one built; "
            "raise [method] max_params to at least that to silence this, or choose a smaller student")
