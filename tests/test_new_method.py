"""Adding a method (docs/architecture.md, "Adding a method"): a tiny block-wise method, written in this
test module from the shared phases and registered by id, runs end to end through ``kamal run``."""

import dataclasses
import json

import pytest
import torch

from kamal_engine import cli, methods
from kamal_engine.filters import build_filter
from kamal_engine.methods import MethodInfo, MethodResult, Param
from kamal_engine.methods.blockwise import pair_blocks, regroup, resume_blocks, save_block
from kamal_engine.methods.common import RunContext, sgd_params, steps_per_epoch
from kamal_engine.methods.phases import train_block
from kamal_engine.recipe import load_recipe
from kamal_engine.targetnet import choose_branch_points
from kamal_engine.training import set_mode


# --- the method: one epoch per block on Eq. 7, Eq. 9's branch points, the shared fine-tuning -------------

def run(ctx: RunContext) -> MethodResult:
    p, paired = ctx.params, pair_blocks(ctx, ctx.params["granularity"], 4)
    spe = steps_per_epoch(len(ctx.images), p["batch_size"])
    loop = ctx.loop((len(paired.names) + p["finetune_epochs"]) * spe)
    ctx.student.to(ctx.device)
    set_mode([], [t.model.to(ctx.device) for t in ctx.selection.teachers])
    done, converged, filters = resume_blocks(ctx, paired)
    for k in range(done + 1, len(paired.names) + 1):
        draw = ctx.seeded(k)
        fk = {n: build_filter(paired.specs[k - 1][n]).to(ctx.device) for n in paired.active}

        def forward(x, k=k, fk=fk):  # student blocks 1..k, then every teacher after k (Eq. 6)
            for block in list(paired.student.blocks)[:k]:
                x = block(x)
            return paired.through_teachers(k, x, fk)

        def eq7(idx, forward=forward):
            return ctx.soft_target_loss(lambda x: forward(ctx.student_preprocessing(x)), idx)

        train_block(ctx, loop, paired.student, k, fk.values(), epochs=1, steps_per_epoch=spe,
                    batches=lambda: ctx.images.batches(p["batch_size"], draw), loss=eq7)
        set_mode([], [paired.student.blocks[k - 1], *fk.values()])
        with torch.no_grad():
            losses = ctx.batch_losses(lambda x: forward(ctx.student_preprocessing(x)), torch.arange(len(ctx.images)))
        for task, value in zip(ctx.selection.tasks, losses.tolist()):
            converged[task.name].append(value)
        filters.update({(k, n): f for n, f in fk.items()})
        save_block(ctx, loop, k, converged, filters)
    plan = choose_branch_points(converged)
    report = {"branch_points": {task: paired.names[k - 1] for task, k in plan.items()}}
    net = regroup(ctx, loop, paired, filters, plan, report, phase=len(paired.names) + 1, steps_per_epoch=spe,
                  batches=lambda draw: ctx.images.batches(p["batch_size"], draw),
                  loss=lambda net, draw: lambda idx: ctx.soft_target_loss(lambda x: net(ctx.student_preprocessing(x)), idx))
    return MethodResult(net, p["granularity"], report)


METHOD = MethodInfo(
    id="tiny-blockwise", mode="data", title="Tiny block-wise KA", paper="(a test)", summary="Blocks, Eq. 9, fine-tuning.",
    params=(Param("granularity", "stage", "blocks", choices=("stage", "unit")),
            Param("finetune_epochs", 1, "fine-tuning epochs", minimum=0),
            Param("finetune_lr", 0.01, "fine-tuning rate", minimum=0.0),
            Param("ap_by_block", False, "AP by branch block"),
            *sgd_params(batch_size=32, weight_decay=5e-3)),
    run=run, branches=True)


# --- the test --------------------------------------------------------------------------------------------

@pytest.fixture
def registered():
    methods.register(METHOD.id, __name__)
    yield METHOD.id
    methods.MODULES.pop(METHOD.id)


def test_a_method_registered_from_outside_the_package_runs_through_kamal_run(quick_demo, registered, tmp_path, capsys):
    root, _ = quick_demo
    recipe = load_recipe(root / "recipes" / "filtered-ka.toml")
    recipe = dataclasses.replace(recipe, method=registered, params={}, output_dir=tmp_path / "run", onnx=None)
    path = tmp_path / "tiny.toml"
    path.write_text(recipe.to_toml())

    assert cli.main(["run", str(path)]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == registered and report["params"]["batch_size"] == 32
    assert set(report["branch_points"]) == set(report["labels"])
    assert (tmp_path / "run" / "student.kamal.pt").exists()
    # the student is as good as the method: well above chance on every label after one epoch a block
    ap = report["validation"]["student"]["ap"]
    assert min(ap.values()) > 0.6, ap
    printed = capsys.readouterr()
    assert "Finished in" in printed.out + printed.err


def test_a_method_that_does_not_say_distributed_is_refused_with_nproc_before_any_process_starts(
        quick_demo, registered, tmp_path):
    from kamal_engine.errors import KamalError
    from kamal_engine.runner import run_recipe

    root, _ = quick_demo
    recipe = dataclasses.replace(load_recipe(root / "recipes" / "filtered-ka.toml"), method=registered, params={},
                                 output_dir=tmp_path / "run", onnx=None)
    with pytest.raises(KamalError, match="'tiny-blockwise' runs in one process only.*filtered-ka.*without --nproc"):
        run_recipe(recipe, nproc=2)
    assert not (tmp_path / "run").exists()


def test_a_taken_method_id_is_refused():
    with pytest.raises(Exception, match="is taken"):
        methods.register("filtered-ka", __name__)
