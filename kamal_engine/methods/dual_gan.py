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
``max_params``, ``branch_tolerance`` and ``branch_at`` (none by default) choose another plan by size
(:mod:`kamal_engine.branchplan`); a teacher's tasks still branch together.

Beyond the paper (options, all off with ``paper_faithful = true``; the ingredients in
:mod:`kamal_engine.methods.datafree`; on by default: the rate balance and the batch-norm prior,
which the demo's ablation showed to help): ``balance = "rate"`` (the per-label rate in place of Eq. 6 for
multi-label outputs) and ``bn_prior`` (DeepInversion's batch-norm prior, on the teachers' pass over
the image group) join L_gan in Step I; ``augment`` and ``replay`` give the student's image stream
shifted/mirrored images and a pool of past ones in Steps II and III (the teachers' targets recomputed
on them; the generator-feature stream is left as generated); ``adversarial`` makes the fine-tuning
(Step III) alternate: after ``adversarial_warmup`` of its epochs, each step first updates G on
L_gan minus the weighted student-teacher disagreement, then the TargetNet. The share of generated
images each label is present in is reported after every generator epoch (report ``coverage``).

The paper gives no step counts or generator optimiser; ours: Adam (β1 = 0.5) for G as in DAFL,
``iterations`` steps per epoch of generated batches, and a budget sized for 2 CPU cores (8 generator
epochs, 2 per block, 2 of fine-tuning, 50 steps of 64 images, generator width 24: 900 steps).
Checkpoints after every generator epoch, every block and the fine-tuning, so ``--resume`` continues
with the same random draws. Seeds: G's initial
weights phase 0, generator epoch e phase e, block b phase 1000 + b, the fine-tuning 2000, the
generated images measuring η 3000.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import KamalError
from ..events import BlockConverged, LabelsCovered, SamplesGenerated, StageStarted
from ..filters import build_filter
from ..targetnet import TargetNet
from ..training import StepLoop, autocast, set_mode, task_losses, task_probabilities, to_device
from . import MethodInfo, MethodResult, Param
from .blockwise import check_budget, pair_blocks, plan_branches, plan_params, regroup, resume_blocks, save_block
from .common import RunContext, Term, columns, descend, describe_terms, loss_dict, sgd_params, total_loss
from .datafree import (INGREDIENTS, BatchNormPrior, LabelCoverage, ReplayPool, activation_loss, balance_loss,
                       datafree_params, disagreement, discrete_loss, effective_params, one_hot_loss, recording,
                       student_batch)
from .generators import GeneratedImages, GroupStackGenerator, group_boundaries
from .phases import Loss, train_block


FINETUNE_PHASE, EVAL_PHASE, BLOCK_PHASE = 2000, 3000, 1000  # seeds: generator epoch e is phase e, block b 1000 + b


def gan_terms(p: dict) -> tuple[Term, ...]:
    """Eq. 12: L_gan (Eq. 9, the balance term named by its form) of the image group, the intermediate
    groups' agreement, then the batch-norm prior when it is on."""
    balance = "entropy" if p["balance"] == "entropy" else "rate"
    terms = [Term("one-hot"), Term("activation", "alpha"), Term(balance, "beta"), Term("discrete", "gamma"),
             Term("groups")]
    if p["bn_prior"] > 0:
        terms.append(Term("batch-norm", "bn_prior"))
    return tuple(terms)


class DualGAN:
    """One dual-gan run: the group-stack generator G, its filters, the teachers as discriminators, and
    the step functions of the three steps."""

    def __init__(self, ctx: RunContext):
        p, selection = effective_params(ctx.params), ctx.selection
        self.ctx, self.p, self.selection, self.device = ctx, p, selection, ctx.device
        self.tasks, self.teachers = selection.tasks, selection.teachers
        self.paired = paired = pair_blocks(ctx, p["granularity"], p["reduction"])
        check_budget(ctx, paired, joint=True)
        self.n_blocks = n_blocks = len(paired.names)
        if p["groups"] > n_blocks:
            raise KamalError(f"[method] groups = {p['groups']}, but the student has {n_blocks} blocks at "
                             f"'{p['granularity']}' granularity and the generator can have at most one group per "
                             "block: lower groups")
        self.boundaries = group_boundaries(p["groups"], n_blocks)
        self.last = len(self.boundaries) - 1
        size = tuple(ctx.student_preprocessing.input_size)
        shapes = [(3, *size) if b == 0 else paired.student_shapes[b - 1] for b in self.boundaries]
        self.second_stream = {b + 1: j for j, b in enumerate(self.boundaries) if b > 0}  # block -> group feeding it
        self.view = GeneratedImages(ctx.student_preprocessing)
        self.active, self.outputs_of = paired.active, paired.outputs
        self.total = p["iterations"] * (p["generator_epochs"] + n_blocks * p["epochs_per_block"] + p["finetune_epochs"])
        ctx.student.to(self.device)
        for t in self.teachers:
            t.model.to(self.device)
        set_mode([], [t.model for t in self.teachers])
        ctx.seeded(0)
        self.generator = GroupStackGenerator(p["latent_dim"], shapes, p["generator_width"]).to(self.device)
        self.group_filters = nn.ModuleDict({f"{j}:{n}": build_filter(paired.specs[b - 1][n])
                                            for j, b in enumerate(self.boundaries) if b > 0
                                            for n in self.active}).to(self.device)
        self.opt_g = torch.optim.Adam([*self.generator.parameters(), *self.group_filters.parameters()],
                                      lr=p["lr_generator"], betas=(0.5, 0.999))
        self.terms = gan_terms(p)
        self.prior = BatchNormPrior([(self.teachers[n].name, self.teachers[n].model) for n in self.active]
                                    ) if p["bn_prior"] > 0 else None
        self.pool = ReplayPool(p["replay"], self.device)
        self.coverage = LabelCoverage(selection.labels)
        self.covered: list[dict] = []  # one coverage summary per generator epoch
        # a distributed run: G's (and its filters') gradients averaged over the ranks (DDP) in Step I and in
        # the adversarial steps of the fine-tuning; the student's parts are wrapped by the phases themselves
        self.gan_objective = ctx.world.objective([self.generator, self.group_filters], self.gan_loss)
        self.adversarial_objective = ctx.world.objective([self.generator], self.adversarial_loss)

    def judge(self, n: int, boundary: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher n from ``boundary`` on: its selected logits and its features before the head."""
        for block in list(self.paired.teachers[n].blocks)[boundary:]:
            x = block(x)
        return self.paired.teachers[n].head(x)[:, columns(self.outputs_of[n])], x

    def discriminate(self, j: int, feature: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``O_gan(F^j)`` (Eq. 10-11): every teacher on group j's output, through the filter f^j_m."""
        logits, features = [], []
        for n in self.active:
            if self.boundaries[j] == 0:
                x = self.view.for_teacher(feature, self.teachers[n].preprocessing)
            else:
                x = self.group_filters[f"{j}:{n}"](feature)
            z, h = self.judge(n, self.boundaries[j], x)
            logits.append(z)
            features.append(h)
        return torch.cat(logits, 1), features

    def batches(self, draw: torch.Generator | None = None):
        """One epoch: ``iterations`` steps; the indices only tell the loop the batch size (images are drawn)."""
        return (torch.arange(self.p["batch_size"]) for _ in range(self.p["iterations"]))

    def noise(self, draw: torch.Generator) -> torch.Tensor:
        """A step's latent codes: ``batch_size`` of them, or this rank's share in a distributed run (each rank
        draws its own: :meth:`RunContext.rank_draw`)."""
        count = self.ctx.world.local_batch(self.p["batch_size"])
        return to_device(torch.randn(count, self.p["latent_dim"], generator=draw), self.device)

    def gan_values(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms of Eq. 12 (and the batch-norm prior) on one generated batch; also ``"logits"``, the
        teachers' selected logits on the image."""
        p, tasks = self.p, self.tasks
        with recording(self.prior):
            logits, teacher_features = self.discriminate(self.last, features[-1])
        target = task_probabilities(logits.detach(), tasks)
        groups = torch.zeros(())
        if self.last > 0:
            groups = torch.stack([task_losses(self.discriminate(j, features[j])[0], target, tasks).sum() / len(tasks)
                                  for j in range(self.last)]).mean()
        values = {"one-hot": one_hot_loss(logits, tasks), "activation": activation_loss(teacher_features),
                  self.terms[2].name: balance_loss(logits, tasks, p["balance"], p["target_rate"]),
                  "discrete": discrete_loss(logits, tasks, p["discrete_on"]), "groups": groups}
        if self.prior is not None:
            values["batch-norm"] = self.prior.value()
        return {**values, "logits": logits}

    def gan_loss(self, z: torch.Tensor):
        """Eq. 12 on the batch G makes from ``z``, and (the image, the teachers' logits, the terms)."""
        with autocast(self.device, self.ctx.precision):
            features = self.generator(z)
            values = self.gan_values(features)
            logits = values.pop("logits")
            joint = total_loss(self.terms, values, self.p)
        return joint, (features[-1].detach(), logits.detach(), {k: v.detach() for k, v in values.items()})

    def generator_step(self, loop: StepLoop, draw: torch.Generator) -> dict[str, float]:
        """Step I (Eq. 12): one Adam step of G and its filters against the fixed teachers."""
        p = self.p
        joint, (image, logits, values) = self.gan_objective(self.noise(draw))
        descend(joint, self.opt_g)
        self.coverage.add(image, logits, self.tasks)
        if p["preview_every"] and (loop.state.step + 1) % p["preview_every"] == 0:
            self.ctx.emit(SamplesGenerated(loop.state.step + 1, self.view.preview(image)))
        return self.ctx.world.average({"loss": joint.detach(), "generator:joint": joint.detach(),
                                       **{f"generator:{k}": v for k, v in values.items()}})

    def train_generator(self, loop: StepLoop) -> dict[str, float]:
        """Step I, resumed after the last finished generator epoch; then G is fixed. Returns the last
        epoch's mean losses (none when resumed after Step I)."""
        p, ctx, saved = self.p, self.ctx, self.ctx.saved()
        done = saved.get("generator_epochs_done", 0)
        if done:
            self.generator.load_state_dict(saved["generator"])
            self.group_filters.load_state_dict(saved["group_filters"])
            self.opt_g.load_state_dict(saved["opt_generator"])
            self.covered = list(saved.get("coverage", []))
        if done < p["generator_epochs"]:
            ctx.emit(StageStarted("generator", None, None, self.n_blocks, p["generator_epochs"],
                                  p["generator_epochs"] * p["iterations"]))
        set_mode([self.generator, self.group_filters], [])
        means: dict[str, float] = {}
        for epoch in range(done + 1, p["generator_epochs"] + 1):
            draw = ctx.rank_draw(epoch)
            means = loop.run_epoch(self.batches(), lambda idx: self.generator_step(loop, draw), "generator", None, epoch)
            ctx.world.settle([self.generator, self.group_filters])  # rank 0's batch-norm statistics, as saved
            summary = self.coverage.summary(epoch, ctx.world)  # every rank's images
            self.covered.append(summary)
            self.coverage.reset()
            ctx.emit(LabelsCovered("generator", epoch, summary["rates"], summary["diversity"]))
            ctx.save(loop, generator_epochs_done=epoch, generator=self.generator.state_dict(),
                     group_filters=self.group_filters.state_dict(), opt_generator=self.opt_g.state_dict(),
                     coverage=self.covered)
        if self.prior is not None and p["adversarial"] <= 0:  # the adversarial fine-tuning still needs it
            self.prior.remove()
        # G stays in train mode (its batch norms use the batch's statistics, as while it was trained) but
        # gets no gradients
        self.generator.requires_grad_(False)
        self.group_filters.requires_grad_(False)
        return means

    @torch.no_grad()
    def generate(self, draw: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Generated features and image, and the teachers' selected probabilities on the image."""
        with autocast(self.device, self.ctx.precision):
            features = self.generator(self.noise(draw))
            return features, task_probabilities(self.discriminate(self.last, features[-1])[0], self.tasks)

    def student_images(self, image: torch.Tensor, target: torch.Tensor, draw: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image stream's images with ``replay`` and ``augment``, and the teachers' targets on them."""
        seen, changed = student_batch(image, self.pool, self.p, draw)
        if not changed:
            return image, target
        with torch.no_grad(), autocast(self.device, self.ctx.precision):
            return seen, task_probabilities(self.discriminate(self.last, seen)[0], self.tasks)

    def dual_logits(self, b: int, fb: dict[int, nn.Module], x: torch.Tensor) -> torch.Tensor:
        """``g_m(O_m(F^b_u))`` for every teacher, side by side: T^b, the filter f^b_m, teacher m after b."""
        return self.paired.through_teachers(b, self.paired.student.blocks[b - 1](x), fb)

    def image_stream(self, b: int, image: torch.Tensor) -> torch.Tensor:
        """``F^1_in``: the image through the student's frozen blocks before b."""
        with torch.no_grad():
            for block in list(self.paired.student.blocks)[:b - 1]:
                image = block(image)
        return image

    def block_loss(self, b: int, fb: dict[int, nn.Module], draw: torch.Generator) -> Loss:
        """Step II (Eq. 14-17): the image stream, plus the generator's own feature where a group ends."""
        p, tasks = self.p, self.tasks

        def loss(idx: torch.Tensor):
            features, target = self.generate(draw)
            image, image_target = self.student_images(features[-1], target, draw)
            with autocast(self.device, self.ctx.precision):
                per_task = task_losses(self.dual_logits(b, fb, self.image_stream(b, image)), image_target, tasks)
                total = p["lambda_image"] * per_task.sum() / len(tasks)
                extra = {}
                if b in self.second_stream and p["lambda_generator"] > 0:
                    per_task_g = task_losses(self.dual_logits(b, fb, features[self.second_stream[b]]), target, tasks)
                    loss_g = per_task_g.sum() / len(tasks)
                    total = total + p["lambda_generator"] * loss_g
                    extra["dual:generator-stream"] = loss_g.detach()
            return total, {**loss_dict(total, per_task, self.selection), **extra}
        return loss

    def converged_losses(self, b: int, fb: dict[int, nn.Module]) -> dict[str, float]:
        """η^{b,m}: the block's final weights, eval mode, a fixed set of generated images, the image stream."""
        set_mode([], [self.paired.student.blocks[b - 1], *fb.values()])
        eval_draw = self.ctx.rank_draw(EVAL_PHASE)  # a distributed run: each rank its own share, summed
        sums = torch.zeros(len(self.tasks))
        with torch.no_grad():
            for _ in range(self.p["eval_batches"]):
                self.ctx.cancel.check()
                features, target = self.generate(eval_draw)
                with autocast(self.device, self.ctx.precision):
                    sums += task_losses(self.dual_logits(b, fb, self.image_stream(b, features[-1])), target,
                                        self.tasks).cpu()
        sums = self.ctx.world.sum(sums) / self.ctx.world.size  # the same on every rank: the same branch plan
        return {t.name: float(v) for t, v in zip(self.tasks, sums / self.p["eval_batches"])}

    def amalgamate_block(self, loop: StepLoop, b: int) -> tuple[dict[int, nn.Module], dict[str, float]]:
        """Block b of Step II with G fixed; returns its filters and converged losses."""
        self.ctx.seeded(BLOCK_PHASE + b)  # the filters' initial weights (the same on every rank)
        draw = self.ctx.rank_draw(BLOCK_PHASE + b)
        fb = {n: build_filter(self.paired.specs[b - 1][n]).to(self.device) for n in self.active}
        train_block(self.ctx, loop, self.paired.student, b, fb.values(), epochs=self.p["epochs_per_block"], steps_per_epoch=self.p["iterations"],
                    batches=self.batches, loss=self.block_loss(b, fb, draw))
        return fb, self.converged_losses(b, fb)

    def finetune_loss(self, net: TargetNet, draw: torch.Generator) -> Loss:
        """The TargetNet against the teachers on generated images (Algorithm 1 line 23); with
        ``adversarial``, after the warm-up each step first moves G towards images where they disagree."""
        steps = iter(range(10**12))
        if self.ctx.world.distributed:  # each rank generates its own images
            draw = self.ctx.rank_draw(FINETUNE_PHASE)

        def loss(idx: torch.Tensor):
            epoch = next(steps) // self.p["iterations"] + 1
            logged = {}
            if self.p["adversarial"] > 0 and epoch > self.p["adversarial_warmup"]:
                logged = self.adversarial_step(net, draw)
            features, target = self.generate(draw)
            image, image_target = self.student_images(features[-1], target, draw)
            with autocast(self.device, self.ctx.precision):
                per_task = task_losses(net(image), image_target, self.tasks)
            total = per_task.sum() / len(self.tasks)
            return total, {**loss_dict(total, per_task, self.selection), **logged}
        return loss

    def adversarial_step(self, net: TargetNet, draw: torch.Generator) -> dict[str, float]:
        """One Adam step of G on L_gan (Eq. 9 and the prior) minus ``adversarial`` × the disagreement of
        the TargetNet (in eval mode, not trained here) with the teachers on G's images."""
        self.generator.requires_grad_(True)
        net.eval()
        joint, apart = self.adversarial_objective((self.noise(draw), net))
        descend(joint, self.opt_g)
        net.train()
        self.generator.requires_grad_(False)
        return {"generator:adversarial": apart, "generator:joint": joint.detach()}

    def adversarial_loss(self, batch: tuple[torch.Tensor, nn.Module]):
        """L_gan of G's batch from the codes ``z`` minus ``adversarial`` × the disagreement of the TargetNet
        ``net`` (judged, not trained) with the teachers on it, and the disagreement; ``batch`` is ``(z, net)``."""
        z, net = batch
        with autocast(self.device, self.ctx.precision):
            features = self.generator(z)
            values = self.gan_values(features)
            logits = values.pop("logits")
            apart = disagreement(net(features[-1]), logits, self.tasks)
            joint = total_loss(self.terms, values, self.p) - self.p["adversarial"] * apart
        return joint, apart.detach()

    def branch_plan(self, converged: dict[str, list[float]], means: dict[str, float], filters: dict
                    ) -> tuple[dict[str, int], dict]:
        """Eq. 18: each teacher's tasks branch out together at the block of least mean converged loss, under
        the plan rules (:func:`~.blockwise.plan_branches`, ``joint``)."""
        selection, names = self.selection, self.paired.names
        by_teacher = {self.teachers[n].name: [sum(converged[t.name][k] for t in selection.tasks_of(n))
                                              / len(selection.tasks_of(n)) for k in range(self.n_blocks)]
                      for n in self.active}
        report = {
            "granularity": self.p["granularity"],
            "blocks": names,
            "generator_groups": [("image" if b == 0 else names[b - 1]) for b in self.boundaries],
            "converged_loss": {task: dict(zip(names, losses)) for task, losses in converged.items()},
            "converged_loss_by_teacher": {name: dict(zip(names, losses)) for name, losses in by_teacher.items()},
        }
        plan = plan_branches(self.ctx, self.paired, filters, converged, report, joint=True, rule="Eq. 18")
        report.update({
            "branch_points": {task: names[k - 1] for task, k in plan.items()},
            "generated_images": self.total * self.p["batch_size"],
            "loss_terms": {"generator": describe_terms(self.terms, self.p, means, "generator:")},
            "paper_faithful": bool(self.p["paper_faithful"]),
            "ingredients": {k: self.p[k] for k in INGREDIENTS},
            "coverage": {"generated": self.covered},
            **({"batch_norm_prior": self.prior.describe()} if self.prior is not None else {}),
        })
        return plan, report


def run(ctx: RunContext) -> MethodResult:
    """Step I (the generator), Step II (the student block by block), Step III (branch-out, fine-tuning)."""
    gan = DualGAN(ctx)
    loop = ctx.loop(gan.total)
    means = gan.train_generator(loop)
    blocks_done, converged, filters = resume_blocks(ctx, gan.paired)
    if blocks_done and "pool" in ctx.saved():
        gan.pool.load_state_dict(ctx.saved()["pool"])
    for b in range(blocks_done + 1, gan.n_blocks + 1):
        fb, values = gan.amalgamate_block(loop, b)
        for task, value in values.items():
            converged[task].append(value)
        ctx.emit(BlockConverged(b, gan.paired.names[b - 1], values))
        filters.update({(b, n): f for n, f in fb.items()})
        save_block(ctx, loop, b, converged, filters, pool=gan.pool.state_dict())
    plan, report = gan.branch_plan(converged, means, filters)
    net = regroup(ctx, loop, gan.paired, filters, plan, report, phase=FINETUNE_PHASE,
                  steps_per_epoch=ctx.params["iterations"], batches=gan.batches, loss=gan.finetune_loss)
    return MethodResult(net, ctx.params["granularity"], report)


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
        Param("generator_epochs", 8, "epochs training the generator (Step I)", minimum=1),
        Param("epochs_per_block", 2, "epochs training each student block (Step II)", minimum=1),
        Param("finetune_epochs", 2, "epochs fine-tuning the branched TargetNet (0: none)", minimum=0),
        Param("iterations", 50, "steps per epoch, one generated batch each", minimum=1),
        Param("latent_dim", 100, "size of the generator's input noise z", minimum=1),
        Param("generator_width", 24, "channels inside each generator group", minimum=1),
        Param("lr_generator", 0.02, "Adam learning rate of the generator and its filters", minimum=0.0),
        Param("alpha", 0.1, "weight α of the activation loss L_a (Eq. 9; supplementary: 1, DAFL: 0.1)", minimum=0.0),
        Param("beta", 5.0, "weight β of the information-entropy loss L_ie (Eq. 9; supplementary: 1, DAFL: 5)",
              minimum=0.0),
        Param("gamma", 5.0, "weight γ of the discrete loss L_dis (Eq. 9; supplementary: 5)", minimum=0.0),
        Param("discrete_on", "decision", "how L_dis (Eq. 8) reads the outputs: 'decision' (2p - 1), "
              "'probabilities' (p, as printed) or 'logits'", choices=("decision", "probabilities", "logits")),
        Param("lambda_image", 1.0, "weight λ1 of the image stream in Eq. 17 (paper: 1)", minimum=0.0),
        Param("lambda_generator", 1.0, "weight λ2 of the generator-feature stream in Eq. 17 (paper: 1)", minimum=0.0),
        *sgd_params(batch_size=64, weight_decay=5e-3, batch_help="generated images per step",
                    lr_help="base learning rate of the block-wise training (paper: 0.01, poly policy)",
                    weight_decay_help="weight decay (paper: 5e-3)",
                    poly_help="power of the poly learning-rate policy (paper: 0.9)"),
        Param("finetune_lr", 0.01, "base learning rate of the fine-tuning", minimum=0.0),
        Param("granularity", "stage", "blocks of the student: 'stage' or 'unit'", choices=("stage", "unit")),
        Param("reduction", 4, "channel reduction r of the teacher-level filters (supplementary: 4)", minimum=1),
        Param("eval_batches", 8, "generated batches measuring each block's converged loss (Eq. 18)", minimum=1),
        Param("ap_by_block", True, "with a validation set: AP of every task branching at each block"),
        *plan_params(0.0, "Eq. 18"),
        *datafree_params(warmup=0, warmup_help="fine-tuning epochs before the adversarial term starts"),
        Param("preview_every", 100, "generator steps between generated-sample previews (0: none)", minimum=0),
    ),
    run=run,
    branches=True,
    distributed=True,
)
