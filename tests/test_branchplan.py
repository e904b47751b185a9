"""Branch plans (kamal_engine.branchplan): exact sizes by Eq. 10, the rules (Eq. 9, tolerance, branch_at,
the budget) and the exact search under a parameter budget, against brute force."""

import itertools
import math
import random
import re

import pytest
import torch

from kamal_engine.backbones import build_model, split_model
from kamal_engine.branchplan import (BranchSizes, PlanSpace, budget_parameters, choose_plan, over_budget,
                                     parse_branch_at)
from kamal_engine.errors import KamalError
from kamal_engine.filters import build_filter, filter_spec
from kamal_engine.methods.blockwise import assemble, branch_sizes
from kamal_engine.preprocessing import Preprocessing
from kamal_engine.profile import count_parameters
from kamal_engine.selection import TaskSelection
from kamal_engine.teacher import Teacher

NAMES = ["b1", "b2", "b3", "b4"]


def teacher(name, labels, task="multilabel", seed=0, width=4):
    torch.manual_seed(seed)
    model = build_model("smallnet", len(labels), width=width).eval()
    return Teacher(name, "smallnet", list(labels), task, Preprocessing(32), model, {"width": width})


def small_case():
    """Two multi-label tasks of teacher a, a multi-class task of teacher b (twice as wide: its filters are
    adapters, so sizes differ by teacher and block), the student as wide as teacher a."""
    a = teacher("a", ["cat", "dog", "cow"])
    b = teacher("b", ["red", "green", "blue"], task="multiclass", seed=1, width=8)
    selection = TaskSelection.build([a, b], [["dog", "cat"], ["blue", "red"]])
    torch.manual_seed(2)
    student = split_model(build_model("smallnet", 1, width=4), "smallnet", "stage")
    nets = [t.blocks("stage") for t in selection.teachers]
    s_shapes = student.output_shapes((32, 32))
    t_shapes = [net.output_shapes((32, 32)) for net in nets]
    specs = [[filter_spec(s_shapes[k], t_shapes[n][k], 4) for n in range(2)] for k in range(4)]
    filters = {(k, n): build_filter(specs[k - 1][n]) for k in range(1, 5) for n in range(2)}
    return selection, student, nets, specs, filters


def test_every_plans_size_is_the_parameter_count_of_its_built_targetnet():
    selection, student, nets, specs, filters = small_case()
    sizes = branch_sizes(student, nets, filters, 4)
    teacher_of = {t.name: t.teacher for t in selection.tasks}
    converged = {t.name: [0.1 * (i + 1)] * 4 for i, t in enumerate(selection.tasks)}
    space = PlanSpace(converged, teacher_of, sizes)
    seen = set()
    for combo in itertools.product(range(1, 5), repeat=len(selection.tasks)):
        blocks = dict(zip(converged, combo))
        net = assemble(blocks, list(student.blocks), NAMES, nets, filters, specs, selection, "stage")
        assert space.plan(blocks).parameters == count_parameters(net), blocks
        seen.add(count_parameters(net))
    assert len(seen) > 10  # the case tells plans apart
    candidates = space.candidates()
    assert len(candidates) == 4 ** 3 and {c.parameters for c in candidates} == seen


def random_space(rng, n_teachers, tasks_per_teacher, n_blocks, joint=False, fixed=None):
    trunk = [rng.randint(5, 60) for _ in range(n_blocks)]
    tail = [sorted((rng.randint(1, 200) for _ in range(n_blocks)), reverse=True) for _ in range(n_teachers)]
    filters = {(k, n): rng.randint(0, 9) for k in range(1, n_blocks + 1) for n in range(n_teachers)}
    teacher_of = {f"t{n}.{i}": n for n in range(n_teachers) for i in range(tasks_per_teacher)}
    converged = {task: [rng.random() for _ in range(n_blocks)] for task in teacher_of}
    return PlanSpace(converged, teacher_of, BranchSizes(trunk, tail, filters), joint=joint, fixed=dict(fixed or {}))


def brute_force(space):
    """Every plan (task → block) the rules allow, with its size and loss."""
    tasks = space.tasks
    options = [space.allowed(t) for t in tasks]
    out = []
    for combo in itertools.product(*options):
        blocks = dict(zip(tasks, combo))
        if space.joint and any(len({blocks[t] for t in ts}) > 1 for ts in space.tasks_of.values()):
            continue
        out.append(space.plan(blocks))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("joint", [False, True])
def test_the_budget_choice_is_the_least_loss_plan_that_fits_by_brute_force(seed, joint):
    rng = random.Random(seed)
    fixed = {"t0.0": rng.randint(1, 4)} if seed % 3 == 2 else {}
    space = random_space(rng, n_teachers=2 + seed % 2, tasks_per_teacher=2, n_blocks=4, joint=joint, fixed=fixed)
    every = brute_force(space)
    sizes = sorted({p.parameters for p in every})
    front = space.front()
    # the front is exactly the non-dominated plans
    dominated = [p for p in every if any(q.parameters <= p.parameters and q.loss < p.loss for q in every)]
    assert {(p.parameters, round(p.loss, 12)) for p in front} == \
        {(p.parameters, round(p.loss, 12)) for p in every if p not in dominated} - \
        {(p.parameters, round(p.loss, 12)) for p in every
         if any(q.parameters < p.parameters and q.loss == p.loss for q in every)}
    for budget in [sizes[0], sizes[len(sizes) // 3], sizes[len(sizes) // 2], sizes[-1], sizes[0] - 1]:
        fitting = [p for p in every if p.parameters <= budget]
        found = space.best_within(budget)
        if not fitting:
            assert found is None
            continue
        best = min(fitting, key=lambda p: (p.loss, p.parameters))
        assert found.parameters <= budget and found.loss == pytest.approx(best.loss)
        assert found.parameters == best.parameters
        assert all(found.blocks[t] == k for t, k in space.fixed.items())


def test_many_tasks_the_search_stays_exact_where_brute_force_still_runs():
    rng = random.Random(7)
    space = random_space(rng, n_teachers=3, tasks_per_teacher=3, n_blocks=3)  # 3**9 = 19683 plans
    every = brute_force(space)
    for budget in sorted({p.parameters for p in every})[::400]:
        best = min((p for p in every if p.parameters <= budget), key=lambda p: (p.loss, p.parameters))
        assert space.best_within(budget).loss == pytest.approx(best.loss)


def sizes_example():
    """Two teachers of 100 parameters each in four blocks of 10, 20, 30, 40 (no head); the student trunk is
    the same; filters cost 1."""
    blocks = [10, 20, 30, 40]
    tail = [sum(blocks[k:]) for k in range(1, 5)]
    return BranchSizes(blocks, [tail, tail], {(k, n): 1 for k in range(1, 5) for n in range(2)})


def test_the_rules_eq9_then_the_budget_and_the_smallest_plan_named_when_none_fits():
    sizes = sizes_example()
    teacher_of = {"a1": 0, "a2": 0, "b1": 1}
    # teacher 0's two labels branch at b1 and b2 by Eq. 9: its tail is copied twice
    converged = {"a1": [0.10, 0.20, 0.30, 0.40], "a2": [0.30, 0.10, 0.35, 0.50], "b1": [0.20, 0.25, 0.30, 0.35]}
    space = PlanSpace(converged, teacher_of, sizes)
    assert space.tolerance_plan(0) == {"a1": 1, "a2": 2, "b1": 1}
    big = space.plan(space.tolerance_plan(0)).parameters
    assert big == 30 + (90 + 1) + (70 + 1) + (90 + 1) and big > 200
    plan, how = choose_plan(space, 0.0, None)
    assert how == "eq9" and plan.parameters == big
    plan, how = choose_plan(space, 0.0, 200)
    assert how == "budget" and plan.blocks == {"a1": 2, "a2": 2, "b1": 1} and plan.parameters <= 200
    assert plan.loss == pytest.approx(0.5)
    plan, how = choose_plan(space, 0.0, 150)
    assert how == "budget" and plan.parameters <= 150
    smallest = space.smallest()
    assert smallest.blocks == {"a1": 4, "a2": 4, "b1": 4} and smallest.parameters == 100 + 2
    plan, how = choose_plan(space, 0.0, 101)
    assert how == "over-budget" and plan == smallest
    assert re.search(r"fits max_params \(101 parameters, 0.51 x.*smallest TargetNet has 102 parameters \(0.51 x\), "
                     r"with a1 at b4, a2 at b4, b1 at b4", over_budget(plan, 101, 200, NAMES))


def test_tolerance_takes_the_deepest_block_within_it_and_branch_at_fixes_blocks():
    converged = {"a": [0.100, 0.104, 0.120, 0.200], "b": [0.300, 0.200, 0.205, 0.209]}
    space = PlanSpace(converged, {"a": 0, "b": 1}, sizes_example())
    assert space.tolerance_plan(0.0) == {"a": 1, "b": 2}
    assert space.tolerance_plan(0.05) == {"a": 2, "b": 4}
    assert space.tolerance_plan(10.0) == {"a": 4, "b": 4}
    fixed = PlanSpace(converged, {"a": 0, "b": 1}, sizes_example(), fixed={"a": 3})
    plan, how = choose_plan(fixed, 0.0, None)
    assert plan.blocks == {"a": 3, "b": 2} and how == "eq9"
    every = PlanSpace(converged, {"a": 0, "b": 1}, sizes_example(), fixed={"a": 3, "b": 1})
    assert choose_plan(every, 0.0, None)[1] == "branch_at"
    # joint (dual-gan): the teacher's summed loss; one teacher's labels at one block
    joint = PlanSpace({"a1": [0.1, 0.3], "a2": [0.4, 0.1]}, {"a1": 0, "a2": 0},
                      BranchSizes([1, 1], [[5, 1]], {(1, 0): 0, (2, 0): 0}), joint=True)
    assert joint.tolerance_plan(0) == {"a1": 2, "a2": 2}
    with pytest.raises(KamalError, match="branches a teacher's labels out together"):
        PlanSpace({"a1": [0.1, 0.3], "a2": [0.4, 0.1]}, {"a1": 0, "a2": 0},
                  BranchSizes([1, 1], [[5, 1]], {(1, 0): 0, (2, 0): 0}), joint=True, fixed={"a1": 1, "a2": 2})


def test_branch_at_names_labels_and_blocks_and_the_budget_reads_shares_and_counts():
    selection = small_case()[0]
    assert parse_branch_at({"dog": "b3", "blue": "b2"}, selection.tasks, NAMES) == {"dog": 3, "b:blue+red": 2}
    with pytest.raises(KamalError, match=r"branch_at: 'horse' is not a selected label.*dog, cat"):
        parse_branch_at({"horse": "b3"}, selection.tasks, NAMES)
    with pytest.raises(KamalError, match=r"dog = 'b9' is not a block of the student; its blocks are b1, b2"):
        parse_branch_at({"dog": "b9"}, selection.tasks, NAMES)
    assert budget_parameters(0, 1000) is None
    assert budget_parameters(0.6, 1000) == 600 and budget_parameters(1.5, 1000) == 1500
    assert budget_parameters(250_000, 1000) == 250_000


def test_the_search_is_quick_for_many_labels_and_unit_blocks():
    rng = random.Random(3)
    space = random_space(rng, n_teachers=4, tasks_per_teacher=5, n_blocks=8)  # 8**20 plans
    front = space.front()
    assert front and all(a.parameters < b.parameters and a.loss > b.loss for a, b in zip(front, front[1:]))
    assert math.isfinite(space.best_within(front[len(front) // 2].parameters).loss)
    assert len(space.candidates()) <= 4096 + len(front)
