"""``dual-gan``: data-free knowledge amalgamation via the group-stack dual-GAN (Ye et al., CVPR 2020).

Algorithm 1 of ``data-free-ka-dual-gan-cvpr2020.txt`` and its supplementary, in three steps.

**Step I, the group-stack generator** ``G = {G^1 .. G^J}`` (Eq. 3,
:class:`~kamal_engine.methods.generators.GroupStackGenerator`), ``J = groups`` (default 2, the best of the
supplementary's Table 3). Each group's output is aligned with the student's feature at a block
boundary (:func:`~kamal_engine.methods.generators.group_boundaries`: with J = B, group j stands for the output
of block B − j as in Eq. 5; with J = 2 and B = 4, for the output of block 2, then the image). The
discriminator ``D^j_m`` of group j for teacher m (Eq. 5, 10, 11) is teacher m's blocks after that
boundary and its head, fed through a learnable teacher-level filter ``f^j_m`` (filtered-KA's SE
filter, or the 1x1 adapter when the shapes differ); the image group's discriminator is the whole
teacher, which sees the image in its own preprocessing. G and its filters are trained with Adam on

    L_joint = L_gan(image) + 1/(J-1) Σ_{j<J} ℓ(O(F^j), O(I_gan))           (Eq. 12)
    L_gan   = L_oh + α L_a + β L_ie + γ L_dis                              (Eq. 9)

over every teacher's selected outputs (the task-level filter). ℓ is the soft-target cross entropy
of the predictions made from an intermediate feature against those made from the image, which are
held fixed (detached): the intermediate groups are pulled to agree with the image, not the
reverse (our reading of "restrains the intermediate features [...] to make the same predictions
as I_gan"). For the reading of L_dis see :func:`kamal_engine.methods.datafree.discrete_loss`.

The weights deviate from the supplementary's Table 1 (α = 1, β = 1, γ = 5) in α and β, which
default to DAFL's 0.1 and 5 (the paper takes L_a and L_ie from DAFL): with α = β = 1 the unbounded
activation loss outweighs the entropy term and, measured on the demo, the generator collapsed to
images that all get the same labels (L_ie → -0.001 within 200 steps). γ = 5 is the paper's.

**Step II, the dual generator** T, i.e. the student, block by block (Eq. 13-17) with G fixed. For
block b, ``T^1 .. T^{b-1}`` are frozen and ``T^b`` with its filters ``f^b_m`` is trained (SGD with
the paper's poly policy, base rate 0.01, weight decay 5e-3) on

    L^b_u = λ1 L^b_dual(F^1_in) + λ2 L^b_dual(F^2_in),   L^b_dual = Σ_m ℓ(g_m(O_m(F^b_u)), g_m(O_m(I_gan)))

(Eq. 14, 15 with λ_m = 1, 17 with λ1 = λ2 = 1), where ``O_m(F^b_u)`` is teacher m's blocks after b
and head on ``f^b_m(T^b(F_in))``. The first stream is ``F^1_in = T^{b-1}..T^1(I_gan)``; the second
is the generator's own feature at the input of block b (Eq. 16). With fewer groups than blocks the
second stream exists only where a group boundary is (J = 2, B = 4: block 3, fed with G^1's
feature); at block 1 both streams are the image, counted once. ℓ and its 1/|C| scaling are
filtered-KA's Eq. 7 (the same code).

**Step III, branch-out and regrouping.** ``η^{b,m}`` is the converged ``L^{b,m}_dual`` of teacher
m's tasks after block b: measured in eval mode with the block's final weights on a fixed set of
generated images (``eval_batches`` batches drawn from a fixed seed), through the image stream, the
one the TargetNet uses. ``S_m = argmin_b η^{b,m}`` (Eq. 18, ties to the deeper block): the tasks
selected from one teacher branch out together. The TargetNet (Eq. 19-20) is regrouped as
filtered-KA's (Eq. 10) and fine-tuned on generated images against the teachers (Algorithm 1 l. 23).

The paper gives no step counts or generator optimiser; ours: Adam (β1 = 0.5) for G as in DAFL,
``iterations`` steps per epoch of generated batches. Checkpoints after every generator epoch, every
block and the fine-tuning, so ``--resume`` continues with the same random draws.
"""

from __future__ import annotations

import torch
from torch import nn

from .datafree import activation_loss, discrete_loss, information_entropy_loss, one_hot_loss
from ..errors import KamalError
from ..events import BlockConverged, BranchPlanChosen, SamplesGenerated, StageStarted
from ..filters import build_filter
from .generators import GeneratedImages, GroupStackGenerator, group_boundaries
from ..targetnet import choose_branch_points
from ..training import autocast, poly_schedule, set_mode, task_losses, task_probabilities
from . import MethodInfo, MethodResult, Param
from .common import RunContext, loss_dict
from .filtered_ka import ap_by_block, assemble, filters_state, pair_blocks, restore_filters

FINETUNE_PHASE, EVAL_PHASE, BLOCK_PHASE = 2000, 3000, 1000


def run(ctx: RunContext) -> MethodResult:
    p, selection, device = ctx.params, ctx.selection, ctx.device
    granularity, tasks, teachers = p["granularity"], ctx.selection.tasks, ctx.selection.teachers
    paired = pair_blocks(ctx, granularity, p["reduction"])
    teacher_nets, student_blocks, specs, names = paired.teachers, list(paired.student.blocks), paired.specs, paired.names
    n_blocks = len(student_blocks)
    if p["groups"] > n_blocks:
        raise KamalError(f"[method] groups = {p['groups']}, but the student has {n_blocks} blocks at '{granularity}' "
                         "granularity and the generator can have at most one group per block: lower groups")
    boundaries = group_boundaries(p["groups"], n_blocks)
    last = len(boundaries) - 1
    size = tuple(ctx.student_preprocessing.input_size)
    shapes = [(3, *size) if b == 0 else paired.student_shapes[b - 1] for b in boundaries]
    second_stream = {b + 1: j for j, b in enumerate(boundaries) if b > 0}  # block -> group feeding its input
    view = GeneratedImages(ctx.student_preprocessing)
    active = [n for n in range(len(teachers)) if selection.tasks_of(n)]
    outputs_of = {n: [o for t in selection.tasks_of(n) for o in t.outputs] for n in active}
    batch, iterations = p["batch_size"], p["iterations"]
    total = iterations * (p["generator_epochs"] + n_blocks * p["epochs_per_block"] + p["finetune_epochs"])

    ctx.student.to(device)
    for t in teachers:
        t.model.to(device)
    set_mode([], [t.model for t in teachers])
    torch.manual_seed(ctx.phase_seed(0))
    generator = GroupStackGenerator(p["latent_dim"], shapes, p["generator_width"]).to(device)
    group_filters = nn.ModuleDict({f"{j}:{n}": build_filter(specs[b - 1][n]) for j, b in enumerate(boundaries)
                                   if b > 0 for n in active}).to(device)
    opt_g = torch.optim.Adam([*generator.parameters(), *group_filters.parameters()], lr=p["lr_generator"],
                             betas=(0.5, 0.999))

    state = ctx.checkpoint.load() or {}
    generator_done = state.get("generator_epochs_done", 0)
    if generator_done:
        generator.load_state_dict(state["generator"])
        group_filters.load_state_dict(state["group_filters"])
        opt_g.load_state_dict(state["opt_generator"])
    loop = ctx.loop(total, state.get("step", 0))

    def judge(n: int, boundary: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher n from ``boundary`` on: its selected logits and its features before the head."""
        for block in list(teacher_nets[n].blocks)[boundary:]:
            x = block(x)
        return teacher_nets[n].head(x)[:, outputs_of[n]], x

    def discriminate(j: int, feature: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``O_gan(F^j)`` (Eq. 10-11): every teacher on group j's output, through the filter f^j_m."""
        logits, features = [], []
        for n in active:
            if boundaries[j] == 0:
                x = view.for_teacher(feature, teachers[n].preprocessing)
            else:
                x = group_filters[f"{j}:{n}"](feature)
            z, h = judge(n, boundaries[j], x)
            logits.append(z)
            features.append(h)
        return torch.cat(logits, 1), features

    def generated_batches():
        """One epoch: ``iterations`` steps; the indices only tell the loop the batch size (images are drawn)."""
        return (torch.arange(batch) for _ in range(iterations))

    def noise(count: int, draw: torch.Generator) -> torch.Tensor:
        return torch.randn(count, p["latent_dim"], generator=draw).to(device)

    # Step I: the group-stack generator (Eq. 12)
    if generator_done < p["generator_epochs"]:
        ctx.emit(StageStarted("generator", None, None, n_blocks, p["generator_epochs"],
                              p["generator_epochs"] * iterations))
    set_mode([generator, group_filters], [])

    def generator_step(draw: torch.Generator) -> dict[str, float]:
        with autocast(device, ctx.precision):
            features = generator(noise(batch, draw))
            logits, teacher_features = discriminate(last, features[-1])
            l_oh = one_hot_loss(logits, tasks)
            l_a = activation_loss(teacher_features)
            l_ie = information_entropy_loss(logits, tasks)
            l_dis = discrete_loss(logits, tasks, p["discrete_on"])
            l_gan = l_oh + p["alpha"] * l_a + p["beta"] * l_ie + p["gamma"] * l_dis
            target = task_probabilities(logits.detach(), tasks)
            joint, l_groups = l_gan, torch.zeros(())
            if last > 0:
                l_groups = torch.stack([task_losses(discriminate(j, features[j])[0], target, tasks).sum() / len(tasks)
                                        for j in range(last)]).mean()
                joint = l_gan + l_groups
        opt_g.zero_grad(set_to_none=True)
        joint.backward()
        opt_g.step()
        if p["preview_every"] and (loop.state.step + 1) % p["preview_every"] == 0:
            ctx.emit(SamplesGenerated(loop.state.step + 1, view.preview(features[-1])))
        return {"loss": float(joint.detach()), **{f"generator:{k}": float(v.detach()) for k, v in (
            ("joint", joint), ("one-hot", l_oh), ("activation", l_a), ("entropy", l_ie), ("discrete", l_dis),
            ("groups", l_groups))}}

    for epoch in range(generator_done + 1, p["generator_epochs"] + 1):
        draw = torch.Generator().manual_seed(ctx.phase_seed(epoch))
        loop.run_epoch(generated_batches(), lambda idx: generator_step(draw),
                       "generator", None, epoch)
        state = {"generator_epochs_done": epoch, "step": loop.state.step, "generator": generator.state_dict(),
                 "group_filters": group_filters.state_dict(), "opt_generator": opt_g.state_dict()}
        ctx.checkpoint.save(state)

    # Step II: the dual generator (the student), block by block (Eq. 13-17). G stays in train mode
    # (its batch norms use the batch's statistics, as while it was trained) but gets no gradients.
    generator.requires_grad_(False)
    group_filters.requires_grad_(False)

    @torch.no_grad()
    def generate(draw: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Generated features and image, and the teachers' selected probabilities on the image."""
        with autocast(device, ctx.precision):
            features = generator(noise(batch, draw))
            return features, task_probabilities(discriminate(last, features[-1])[0], tasks)

    def dual_logits(b: int, fb: dict[int, nn.Module], x: torch.Tensor) -> torch.Tensor:
        """``g_m(O_m(F^b_u))`` for every teacher, side by side: T^b, the filter f^b_m, teacher m after b."""
        feature = student_blocks[b - 1](x)
        return torch.cat([teacher_nets[n].forward_from(b, fb[n](feature))[:, outputs_of[n]] for n in active], 1)

    def image_stream(b: int, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for block in student_blocks[:b - 1]:
                image = block(image)
        return image

    blocks_done = state.get("blocks_done", 0)
    converged: dict[str, list[float]] = state.get("converged", {t.name: [] for t in tasks})
    filters: dict[tuple[int, int], nn.Module] = {}
    if blocks_done:
        ctx.student.load_state_dict(state["student"])
        filters = restore_filters(state["filters"], specs, device)
    for k in range(1, blocks_done + 1):  # resumed: the finished blocks' converged losses, for the plots
        ctx.emit(BlockConverged(k, names[k - 1], {task: losses[k - 1] for task, losses in converged.items()}))
    eval_draw_seed = ctx.phase_seed(EVAL_PHASE)

    for b in range(blocks_done + 1, n_blocks + 1):
        steps = p["epochs_per_block"] * iterations
        ctx.emit(StageStarted("amalgamate", b, names[b - 1], n_blocks, p["epochs_per_block"], steps))
        torch.manual_seed(ctx.phase_seed(BLOCK_PHASE + b))
        fb = {n: build_filter(specs[b - 1][n]).to(device) for n in active}
        block = student_blocks[b - 1]
        set_mode([block, *fb.values()], student_blocks[:b - 1])
        optimizer = ctx.sgd([q for m in (block, *fb.values()) for q in m.parameters()], p["lr"])
        schedule = poly_schedule(optimizer, steps, p["poly_power"])
        draw = torch.Generator().manual_seed(ctx.phase_seed(BLOCK_PHASE + b))

        def block_step(b=b, fb=fb, optimizer=optimizer, schedule=schedule, draw=draw) -> dict[str, float]:
            features, target = generate(draw)
            with autocast(device, ctx.precision):
                per_task = task_losses(dual_logits(b, fb, image_stream(b, features[-1])), target, tasks)
                loss = p["lambda_image"] * per_task.sum() / len(tasks)
                extra = {}
                if b in second_stream and p["lambda_generator"] > 0:
                    per_task_g = task_losses(dual_logits(b, fb, features[second_stream[b]]), target, tasks)
                    loss_g = per_task_g.sum() / len(tasks)
                    loss = loss + p["lambda_generator"] * loss_g
                    extra["dual:generator-stream"] = float(loss_g.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            return {**loss_dict(loss, per_task, selection), **extra}

        for epoch in range(1, p["epochs_per_block"] + 1):
            loop.run_epoch(generated_batches(), lambda idx: block_step(), "amalgamate",
                           b, epoch)

        # η^{b,m}: the block's final weights, eval mode, a fixed set of generated images, the image stream
        set_mode([], [block, *fb.values()])
        eval_draw = torch.Generator().manual_seed(eval_draw_seed)
        sums = torch.zeros(len(tasks))
        with torch.no_grad():
            for _ in range(p["eval_batches"]):
                ctx.cancel.check()
                features, target = generate(eval_draw)
                with autocast(device, ctx.precision):
                    sums += task_losses(dual_logits(b, fb, image_stream(b, features[-1])), target, tasks).cpu()
        values = {t.name: float(v) for t, v in zip(tasks, sums / p["eval_batches"])}
        for task, value in values.items():
            converged[task].append(value)
        ctx.emit(BlockConverged(b, names[b - 1], values))
        filters.update({(b, n): f for n, f in fb.items()})
        state = {**state, "blocks_done": b, "step": loop.state.step, "converged": converged,
                 "student": ctx.student.state_dict(), "filters": filters_state(filters)}
        ctx.checkpoint.save(state)

    # Step III: per-teacher branch-out (Eq. 18) and the TargetNet (Eq. 19-20)
    by_teacher = {teachers[n].name: [sum(converged[t.name][k] for t in selection.tasks_of(n)) / len(selection.tasks_of(n))
                                     for k in range(n_blocks)] for n in active}
    teacher_plan = choose_branch_points(by_teacher)
    plan = {t.name: teacher_plan[teachers[t.teacher].name] for t in tasks}
    ctx.emit(BranchPlanChosen({task: names[k - 1] for task, k in plan.items()}))

    def build(plan_):
        return assemble(plan_, student_blocks, names, teacher_nets, filters, specs, selection, granularity)

    report = {
        "granularity": granularity,
        "blocks": names,
        "generator_groups": [("image" if b == 0 else names[b - 1]) for b in boundaries],
        "converged_loss": {task: dict(zip(names, losses)) for task, losses in converged.items()},
        "converged_loss_by_teacher": {name: dict(zip(names, losses)) for name, losses in by_teacher.items()},
        "branch_points": {task: names[k - 1] for task, k in plan.items()},
        "generated_images": total * batch,
    }
    if ctx.evaluate is not None and p["ap_by_block"]:
        report["ap_by_block"] = ap_by_block(ctx, build, names)

    net = build(plan).to(device)
    if state.get("finetuned"):
        net.load_state_dict(state["targetnet"])
    elif p["finetune_epochs"] > 0:
        steps = p["finetune_epochs"] * iterations
        ctx.emit(StageStarted("finetune", None, None, n_blocks, p["finetune_epochs"], steps))
        torch.manual_seed(ctx.phase_seed(FINETUNE_PHASE))
        set_mode([net], [])
        optimizer = ctx.sgd(net.parameters(), p["finetune_lr"])
        schedule = poly_schedule(optimizer, steps, p["poly_power"])
        draw = torch.Generator().manual_seed(ctx.phase_seed(FINETUNE_PHASE))

        def finetune_step() -> dict[str, float]:
            features, target = generate(draw)
            with autocast(device, ctx.precision):
                per_task = task_losses(net(features[-1]), target, tasks)
            loss = per_task.sum() / len(tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            return loss_dict(loss, per_task, selection)

        for epoch in range(1, p["finetune_epochs"] + 1):
            loop.run_epoch(generated_batches(), lambda idx: finetune_step(), "finetune",
                           None, epoch)
        ctx.checkpoint.save({**state, "finetuned": True, "step": loop.state.step, "targetnet": net.state_dict()})
    net.eval()
    return MethodResult(net, granularity, report)


METHOD = MethodInfo(
    id="dual-gan",
    mode="data-free",
    title="Data-free amalgamation (group-stack dual-GAN)",
    paper="Ye et al., Data-Free Knowledge Amalgamation via Group-Stack Dual-GAN, CVPR 2020",
    summary="A group-stack generator learns from the teachers alone to make images and intermediate features they "
            "respond to; the student (the dual generator) is then trained block by block on them, branches out per "
            "teacher at the block of least converged loss and is fine-tuned. No training data is needed.",
    params=(
        Param("groups", 2, "groups of the generator, each aligned to a block boundary (supplementary: 2 is best)",
              minimum=1),
        Param("generator_epochs", 20, "epochs training the generator (Step I)", minimum=1),
        Param("epochs_per_block", 4, "epochs training each student block (Step II)", minimum=1),
        Param("finetune_epochs", 4, "epochs fine-tuning the branched TargetNet (0: none)", minimum=0),
        Param("iterations", 100, "steps per epoch, one generated batch each", minimum=1),
        Param("batch_size", 64, "generated images per step", minimum=2),
        Param("latent_dim", 100, "size of the generator's input noise z", minimum=1),
        Param("generator_width", 64, "channels inside each generator group", minimum=1),
        Param("lr_generator", 0.02, "Adam learning rate of the generator and its filters", minimum=0.0),
        Param("alpha", 0.1, "weight α of the activation loss L_a (Eq. 9; supplementary: 1, DAFL: 0.1)", minimum=0.0),
        Param("beta", 5.0, "weight β of the information-entropy loss L_ie (Eq. 9; supplementary: 1, DAFL: 5)",
              minimum=0.0),
        Param("gamma", 5.0, "weight γ of the discrete loss L_dis (Eq. 9; supplementary: 5)", minimum=0.0),
        Param("discrete_on", "decision", "how L_dis (Eq. 8) reads the outputs: 'decision' (2p - 1), "
              "'probabilities' (p, as printed) or 'logits'", choices=("decision", "probabilities", "logits")),
        Param("lambda_image", 1.0, "weight λ1 of the image stream in Eq. 17 (paper: 1)", minimum=0.0),
        Param("lambda_generator", 1.0, "weight λ2 of the generator-feature stream in Eq. 17 (paper: 1)", minimum=0.0),
        Param("lr", 0.01, "base learning rate of the block-wise training (paper: 0.01, poly policy)", minimum=0.0),
        Param("finetune_lr", 0.01, "base learning rate of the fine-tuning", minimum=0.0),
        Param("momentum", 0.9, "SGD momentum", minimum=0.0),
        Param("weight_decay", 5e-3, "weight decay (paper: 5e-3)", minimum=0.0),
        Param("poly_power", 0.9, "power of the poly learning-rate policy (paper: 0.9)", minimum=0.0),
        Param("granularity", "stage", "blocks of the student: 'stage' or 'unit'", choices=("stage", "unit")),
        Param("reduction", 4, "channel reduction r of the teacher-level filters (supplementary: 4)", minimum=1),
        Param("eval_batches", 8, "generated batches measuring each block's converged loss (Eq. 18)", minimum=1),
        Param("ap_by_block", True, "with a validation set: AP of every task branching at each block"),
        Param("preview_every", 100, "generator steps between generated-sample previews (0: none)", minimum=0),
    ),
    run=run,
    branches=True,
)
