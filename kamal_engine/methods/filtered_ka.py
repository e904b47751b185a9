"""``filtered-ka``: amalgamating filtered knowledge into a task-customised student (Ye et al., IJCAI 2019).

Algorithm 1 of ``filtered-ka-ijcai2019.txt``, block by block (Sections 3.2-3.5):

1. For block k = 1..B, the student's earlier blocks ``T^1..T^{k-1}`` are frozen. The student
   feature ``F_u^k = T^k(F_u^{k-1})`` goes through a teacher-level filter ``f_k^n`` per teacher
   (Eq. 4; :class:`~kamal_engine.filters.TeacherFilter`) and replaces teacher n's own ``F_n^k``:
   teacher n's remaining blocks and head produce ``O_un`` (Eq. 6). Only the selected outputs count
   (task-level filter g). The loss (Eq. 7) is ``L_u = 1/|C| Σ_n Σ_i ℓ(O^i_n, O^i_un)`` with ``O_n``
   the teacher's own prediction on the real image and ℓ the soft-target cross entropy of Eq. 2
   (binary per label for multi-label teachers; over the renormalised selected classes for a
   multi-class teacher). ``T^k`` and every ``f_k^n`` are trained; teachers are frozen.
2. After block k, each task's converged loss ``L^i_k`` is measured: the loss of Eq. 7 per task,
   averaged over the whole unlabeled set in eval mode with the block's final weights (reading
   "convergence loss value" of Algorithm 1 line 10 as the loss once training of the block ended).
3. Branch-out (Eq. 9): ``S_i = argmin_k L^i_k``; ties go to the deeper block (more sharing).
4. Regroup (Eq. 10) into a :class:`~kamal_engine.targetnet.TargetNet`: shared trunk up to each
   branch point, the filter ``f^n_{S_i}``, copies of teacher n's blocks after ``S_i`` and its head.
5. Fine-tune the whole TargetNet against the teachers' soft predictions (Algorithm 1 line 14).

Where the teachers were not fine-tuned from one backbone (README "Teachers trained apart"), four
departures, each a parameter whose other value is the paper's form:

* ``filter = "auto"``: per teacher and block, the SE gate where the student's channels are aligned
  with the teacher's (:func:`~kamal_engine.relatedness.channel_alignment`), else a 1x1-conv adapter
  started at the least-squares map between the two features (``"se"``: the paper).
* ``max_rounds_per_block``: a block trains again while a round still lowers its converged loss
  (Algorithm 1 trains to convergence; 1: the paper's fixed epochs).
* ``max_params`` (default 1): the branch plan of Eq. 9 is replaced, when its TargetNet is bigger than
  that share of the teachers it replaces, by the plan of least total converged loss that fits
  (:mod:`kamal_engine.branchplan`; 0: Eq. 10 as it falls). ``branch_tolerance`` and ``branch_at``
  choose other plans on purpose (0 and empty: Eq. 9).
* Every block is diagnosed: linear CKA and channel alignment before, and the share of each teacher's
  knowledge reproduced after (:mod:`kamal_engine.relatedness`), in the report, the events and a
  warning when a teacher's share at its branch block is below ``warn_share``.

``augment`` (consistent views for teachers and student) and ``feature_weight`` (Eq. 5's feature
term beside Eq. 7) are there to try; both are off by default.

Optimisation as in Section 4.1: SGD with the poly policy (power 0.9), base learning rate 0.01,
weight decay 5e-3 (momentum 0.9 is our choice; the paper does not give it). The paper's batch size
16 is kept as the default. When a teacher's block k differs from the student's in shape, a 1x1-conv
+ resize adapter replaces the SE filter (the paper assumes equal shapes).

Seeds (:meth:`~.common.RunContext.seeded`): block k is phase k, the fine-tuning phase B + 1.
"""

from __future__ import annotations

import copy

import torch

from ..backbones.blocks import eval_mode
from ..events import BlockConverged, BlockDiagnosed, RunWarning
from ..filters import FeatureAdapter, build_filter, filter_spec
from ..relatedness import channel_alignment, feature_cka, knowledge_share, least_squares_map, reference_losses
from ..targetnet import TargetNet
from ..training import (AUGMENTATIONS, StepLoop, autocast, consistent_views, set_mode, task_losses, task_probabilities,
                        to_device)
from . import MethodInfo, MethodResult, Param
from .blockwise import (PairedBlocks, check_budget, pair_blocks, plan_branches, plan_params, regroup,
                        resume_blocks, save_block)
from .common import RunContext, columns, loss_dict, sgd_params
from .phases import Loss, train_block


PROBE_BATCH = 64  # images per forward pass of the probe (the features are kept on the CPU)


@torch.no_grad()
def probe_features(ctx: RunContext, paired: PairedBlocks, k: int, idx: torch.Tensor, active: list[int]
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The student's block-k feature ``F_u^k`` and every active teacher's own ``F_n^k`` on images ``idx``
    (each network sees them preprocessed its own way), in eval mode, as float32 on the CPU."""
    students, teachers = [], {n: [] for n in active}
    with eval_mode(paired.student):
        for start in range(0, len(idx), PROBE_BATCH):
            x = ctx.images.images[idx[start:start + PROBE_BATCH]].to(ctx.device)
            feature = ctx.student_preprocessing(x)
            for block in list(paired.student.blocks)[:k]:
                feature = block(feature)
            students.append(feature.float().cpu())
            for n in active:
                feature = ctx.selection.teachers[n].preprocessing(x)
                for block in list(paired.teachers[n].blocks)[:k]:
                    feature = block(feature)
                teachers[n].append(feature.float().cpu())
    return torch.cat(students), {n: torch.cat(f) for n, f in teachers.items()}


def choose_filter(p: dict, student_shape, teacher_shape, aligned: float) -> dict:
    """The spec of the filter f_k^n: the paper's SE gate (``filter = "se"``), a 1x1-conv adapter
    (``"adapter"``), or by measurement (``"auto"``): the SE gate where the shapes match and the student's
    channels stand for the teacher's (channel alignment ≥ ``aligned_threshold``; a gate can only rescale
    channels), an adapter where they do not."""
    kind = p["filter"]
    if kind == "auto":
        kind = "se" if aligned >= p["aligned_threshold"] else "adapter"
    return filter_spec(student_shape, teacher_shape, p["reduction"], kind)


def new_filter(spec: dict, p: dict, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.nn.Module:
    """A fresh filter; an adapter starts as the least-squares 1x1 map from the student's probe feature to
    the teacher's (``adapter_init = "least-squares"``) or as the identity on channels (``"identity"``)."""
    module = build_filter(spec)
    if isinstance(module, FeatureAdapter):
        if p["adapter_init"] == "least-squares":
            module.set_map(*least_squares_map(student_feature.cpu(), teacher_feature.cpu()))
        else:
            module.set_identity()
    return module


def feature_distance(filtered: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Dist of Eq. 5: the mean squared difference relative to the teacher feature's mean square, so that
    blocks of any magnitude weigh alike (the paper's objection to Eq. 5 is exactly those magnitudes)."""
    filtered, teacher = filtered.float(), teacher.float()
    return (filtered - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-8)


class FilteredKA:
    """One filtered-ka run's networks and its step functions (Eq. 4-7): the student's blocks paired with
    the teachers', and which outputs of which teacher the selected tasks are."""

    def __init__(self, ctx: RunContext):
        p, selection = ctx.params, ctx.selection
        self.ctx, self.p, self.selection, self.device = ctx, p, selection, ctx.device
        self.paired = pair_blocks(ctx, p["granularity"], p["reduction"])
        check_budget(ctx, self.paired, joint=False)
        self.n_blocks = len(self.paired.names)
        self.active, self.outputs_of = self.paired.active, self.paired.outputs
        self.tasks_of = {n: selection.tasks_of(n) for n in self.active}
        self.task_index = {n: [i for i, t in enumerate(selection.tasks) if t.teacher == n] for n in self.active}
        self.spe = ctx.images.steps_per_epoch(p["batch_size"])
        self.round_steps = p["epochs_per_block"] * self.spe
        self.total = self.n_blocks * p["max_rounds_per_block"] * self.round_steps + p["finetune_epochs"] * self.spe
        ctx.student.to(self.device)
        for t in selection.teachers:
            t.model.to(self.device)
        set_mode([], [t.model for t in selection.teachers])
        self.floors, self.priors = reference_losses(torch.cat(ctx.targets, 1), selection.tasks)
        self.probe = torch.randperm(len(ctx.images), generator=torch.Generator().manual_seed(ctx.seed)
                                    )[:p["diagnose_images"]]
        self.cache: tuple[int, torch.Tensor] | None = None  # (block, F_u^{k-1} of every image): build_cache
        self.cache_report: dict[str, str] = {}

    def batches(self, generator: torch.Generator):
        return self.ctx.images.batches(self.p["batch_size"], generator)

    @torch.no_grad()
    def teacher_views(self, x: torch.Tensor, k: int, need_targets: bool = True):
        """Each teacher's own F_n^k on the views ``x`` (k ≥ 1), and with ``need_targets`` the soft targets of
        every selected output on them (the teachers then run to their heads)."""
        probs, features = [], {}
        for n in self.active:
            net = self.paired.teachers[n]
            f = self.selection.teachers[n].preprocessing(x)
            for j, block in enumerate(net.blocks, 1):
                if j > k and not need_targets:
                    break
                f = block(f)
                if j == k:
                    features[n] = f
            if need_targets:
                probs.append(task_probabilities(net.head(f)[:, columns(self.outputs_of[n])], self.tasks_of[n]))
        return (torch.cat(probs, 1) if need_targets else None), features

    def student_feature(self, k: int, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``F_u^k = T^k(F_u^{k-1})``, the earlier (frozen) blocks without gradients; their output comes from
        the block's prefix cache when it holds images ``idx`` (:meth:`build_cache`)."""
        blocks = list(self.paired.student.blocks)
        with self.ctx.profile.part(f"amalgamate {self.paired.names[k - 1]} frozen prefix"):
            if idx is not None and self.cached(k):
                xs = self.cache[1][idx].to(self.device, non_blocking=True)
            else:
                xs = self.ctx.student_preprocessing(x)
                with torch.no_grad():
                    for block in blocks[:k - 1]:
                        xs = block(xs)
        return blocks[k - 1](xs)

    def cached(self, k: int) -> bool:
        """Whether block k's input comes from the prefix cache (:meth:`build_cache`)."""
        return self.cache is not None and self.cache[0] == k

    def forward_tasks(self, k: int, x: torch.Tensor, fk: dict[int, torch.nn.Module],
                      idx: torch.Tensor | None = None) -> torch.Tensor:
        """Per-task logits of Eq. 6: student block k entangled with every teacher through f_k^n."""
        feature = self.student_feature(k, x, idx)
        with self.ctx.profile.part(f"amalgamate {self.paired.names[k - 1]} teachers' blocks"):
            return self.paired.through_teachers(k, feature, fk)

    @torch.no_grad()
    def build_cache(self, k: int) -> None:
        """The frozen prefix's output ``F_u^{k-1}`` of every unlabeled image, computed once for block k
        (the earlier blocks are frozen and in eval mode, so it is the same at every step; for block 1, the
        preprocessed images) when it fits in ``cache_mb`` and the images are used as they are (no
        ``augment``); else none, and each step runs the prefix. What was decided is in the report
        (``prefix_cache``)."""
        self.cache = None
        name, p = self.paired.names[k - 1], self.p
        blocks = list(self.paired.student.blocks)[:k - 1]
        set_mode([], blocks)
        images = self.ctx.images

        def prefix(chunk: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(self.device, self.ctx.precision):
                xs = self.ctx.student_preprocessing(chunk.to(self.device))
                for block in blocks:
                    xs = block(xs)
            return xs

        sample = prefix(images.images[:1])
        needed = len(images) * sample[0].numel() * sample.element_size() / 2**20
        if p["cache_mb"] <= 0 or p["augment"] != "none" or p["feature_weight"] > 0 or needed > p["cache_mb"]:
            why = ("cache_mb = 0" if p["cache_mb"] <= 0 else "augment" if p["augment"] != "none" else
                   "feature_weight" if p["feature_weight"] > 0 else f"needs {needed:.0f} MB > cache_mb")
            self.cache_report[name] = f"off ({why})"
            return
        parts = []
        with self.ctx.profile.part("prefix cache", len(images)):
            for start in range(0, len(images), 128):
                self.ctx.cancel.check()
                parts.append(prefix(images.images[start:start + 128]))
        self.cache = (k, torch.cat(parts))
        self.cache_report[name] = f"{needed:.0f} MB"

    def block_loss(self, k: int, fk: dict[int, torch.nn.Module], generator: torch.Generator) -> Loss:
        """Eq. 7 (+ λ·Eq. 5 when ``feature_weight`` > 0) for block k, on consistent views with ``augment``."""
        ctx, augment, weight = self.ctx, self.p["augment"], self.p["feature_weight"]
        if augment == "none" and weight == 0:  # with the prefix cache, the images themselves are not needed
            return lambda idx: ctx.soft_target_loss(lambda x: self.forward_tasks(k, x, fk, idx), idx,
                                                    images=not self.cached(k))

        def loss(idx: torch.Tensor):
            with autocast(self.device, ctx.precision):
                x = to_device(consistent_views(ctx.images.images[idx], generator, augment), self.device)
                if augment == "none":  # the teachers' predictions on these very images are precomputed
                    targets = ctx.all_targets(idx)
                    _, teacher_f = self.teacher_views(x, k, need_targets=False)
                else:
                    targets, teacher_f = self.teacher_views(x, k)
                feature = self.student_feature(k, x)
                filtered = {n: fk[n](feature) for n in self.active}
                logits = torch.cat([self.paired.teachers[n].forward_from(k, filtered[n])[:, columns(self.outputs_of[n])]
                                    for n in self.active], 1)
            per_task = task_losses(logits, targets, self.selection.tasks)
            total = per_task.sum() / len(self.selection.tasks)
            logged = {}
            if weight > 0:
                terms = [feature_distance(filtered[n], teacher_f[n]) for n in self.active]
                total = total + weight * torch.stack(terms).mean()
                logged = {f"feature:{self.selection.teachers[n].name}": v.detach()
                          for n, v in zip(self.active, terms)}
            return total, {**loss_dict(total, per_task, self.selection), **logged}
        return loss

    def finetune_loss(self, net: TargetNet, generator: torch.Generator) -> Loss:
        """Eq. 7 for the whole TargetNet (consistent views with ``augment``)."""
        ctx = self.ctx
        if self.p["augment"] == "none":
            return lambda idx: ctx.soft_target_loss(lambda x: net(ctx.student_preprocessing(x)), idx)

        def loss(idx: torch.Tensor):
            with autocast(self.device, ctx.precision):
                x = to_device(consistent_views(ctx.images.images[idx], generator, self.p["augment"]), self.device)
                targets, _ = self.teacher_views(x, 0)
                per_task = task_losses(net(ctx.student_preprocessing(x)), targets, self.selection.tasks)
            total = per_task.sum() / len(self.selection.tasks)
            return total, loss_dict(total, per_task, self.selection)
        return loss

    def converged_losses(self, k: int, fk) -> torch.Tensor:
        """Eq. 7's per-task loss with the block's current weights, eval mode, the whole unlabeled set (in a
        distributed run each rank takes its share and the sums are added up)."""
        ctx, images = self.ctx, self.ctx.images
        set_mode([], [self.paired.student.blocks[k - 1], *fk.values()])
        sums = torch.zeros(len(self.selection.tasks))
        share = ctx.world.share(len(images))
        with torch.inference_mode(), ctx.profile.part("converged loss", len(images)):
            for start in range(share.start, share.stop, 128):
                ctx.cancel.check()
                idx = torch.arange(start, min(start + 128, share.stop))
                sums += ctx.batch_losses(lambda x: self.forward_tasks(k, x, fk, idx), idx,
                                         images=not self.cached(k)).cpu() * len(idx)
        return ctx.world.sum(sums) / len(images)

    def remaining(self, losses: torch.Tensor) -> float:
        """Mean over the tasks of 1 − the knowledge share the converged ``losses`` reach."""
        return sum(1 - knowledge_share(float(losses[i]), float(self.floors[i]), float(self.priors[i]))
                   for i in range(len(losses))) / len(losses)

    def new_filters(self, k: int) -> tuple[dict[int, torch.nn.Module], dict]:
        """The filters f_k^n of block k, chosen and started from the probe images' features, and what the
        features were like before the block was trained."""
        specs, paired = self.paired.specs, self.paired
        before_u, before_t = probe_features(self.ctx, paired, k, self.probe, self.active)
        related = {n: feature_cka(before_u, before_t[n]) for n in self.active}
        aligned = {n: channel_alignment(before_u, before_t[n]) for n in self.active}
        for n in self.active:
            specs[k - 1][n] = choose_filter(self.p, paired.student_shapes[k - 1], paired.teacher_shapes[n][k - 1],
                                            aligned[n])
        fk = {n: new_filter(specs[k - 1][n], self.p, before_u, before_t[n]).to(self.device) for n in self.active}
        return fk, {"related": related, "aligned": aligned}

    def amalgamate_block(self, loop: StepLoop, k: int) -> tuple[dict[int, torch.nn.Module], torch.Tensor, int, dict]:
        """Block k (Algorithm 1 lines 3-10): rounds of ``epochs_per_block`` epochs while a round still lowers
        the converged loss (a round that made it worse is undone); the steps of rounds not needed are taken
        off the loop's total. Returns the filters, the converged losses, the rounds and the probe's view."""
        p, block = self.p, self.paired.student.blocks[k - 1]
        generator = self.ctx.seeded(k)
        with self.ctx.profile.part("diagnose"):
            fk, before = self.new_filters(k)
        self.build_cache(k)
        best, best_state, rounds = None, None, 0
        for r in range(1, p["max_rounds_per_block"] + 1):
            train_block(self.ctx, loop, self.paired.student, k, fk.values(), epochs=p["epochs_per_block"], steps_per_epoch=self.spe,
                        batches=lambda: self.batches(generator), loss=self.block_loss(k, fk, generator),
                        epoch_offset=(r - 1) * p["epochs_per_block"])
            losses, rounds = self.converged_losses(k, fk), r
            mean = float(losses.mean())
            improved = best is None or mean < float(best.mean())
            gain = 1.0 if best is None else (float(best.mean()) - mean) / max(float(best.mean()), 1e-12)
            if improved:
                best = losses
                best_state = copy.deepcopy([block.state_dict(), {n: f.state_dict() for n, f in fk.items()}])
            if (not improved or gain < p["converge_tolerance"] or self.remaining(best) < p["converge_tolerance"]
                    or r == p["max_rounds_per_block"]):
                break
        if best_state is not None and rounds > 1:  # a round that made it worse is undone
            block.load_state_dict(best_state[0])
            for n, f in fk.items():
                f.load_state_dict(best_state[1][n])
        left = (p["max_rounds_per_block"] - rounds) * self.round_steps
        loop.state.total_steps -= left
        return fk, best, rounds, before

    def diagnose(self, k: int, fk, best: torch.Tensor, rounds: int, before: dict) -> dict:
        """Block k's row of the report's diagnosis: per teacher the filter, the features' relatedness before
        and after, the knowledge share and gap; per task the converged loss against its floor."""
        paired, active, teachers = self.paired, self.active, self.selection.teachers
        after_u, after_t = probe_features(self.ctx, paired, k, self.probe, active)
        set_mode([], [paired.student.blocks[k - 1], *fk.values()])
        with torch.no_grad():
            reached = {n: feature_cka(torch.cat([fk[n](chunk.to(self.device)).float().cpu()
                                                 for chunk in after_u.split(PROBE_BATCH)]), after_t[n])
                       for n in active}
        floors, tasks = self.floors, self.selection.tasks
        shares = [knowledge_share(float(best[i]), float(floors[i]), float(self.priors[i])) for i in range(len(tasks))]
        index = self.task_index
        return {
            "block": paired.names[k - 1], "rounds": rounds,
            "teachers": {teachers[n].name: {
                "filter": paired.specs[k - 1][n]["kind"], "related_before": round(before["related"][n], 4),
                "aligned_before": round(before["aligned"][n], 4),
                "related_after": round(reached[n], 4),
                "share": round(sum(shares[i] for i in index[n]) / len(index[n]), 4),
                "gap": round(sum(float(best[i] - floors[i]) for i in index[n]) / len(index[n]), 5),
            } for n in active},
            "tasks": {t.name: {"loss": round(float(best[i]), 5), "floor": round(float(floors[i]), 5),
                               "share": round(shares[i], 4)} for i, t in enumerate(tasks)},
        }

    def branch_plan(self, converged: dict, filters: dict, diagnosis: dict) -> tuple[dict[str, int], dict]:
        """Eq. 9's branch points under the plan rules (:func:`~.blockwise.plan_branches`), the warnings of
        teachers whose knowledge does not get through at their branch blocks, and the report so far."""
        names, selection = self.paired.names, self.selection
        report = {"granularity": self.p["granularity"], "blocks": names,
                  "converged_loss": {task: dict(zip(names, losses)) for task, losses in converged.items()}}
        plan = plan_branches(self.ctx, self.paired, filters, converged, report, joint=False, rule="Eq. 9")
        warnings = knowledge_warnings(diagnosis, plan, selection, names, self.p["warn_share"])
        for message in warnings:
            self.ctx.emit(RunWarning(message))
        report["branch_points"] = {task: names[k - 1] for task, k in plan.items()}
        report["diagnosis"] = {**diagnosis, "floor": {t.name: round(float(f), 5)
                                                       for t, f in zip(selection.tasks, self.floors)},
                               "warnings": warnings}
        return plan, report


def run(ctx: RunContext) -> MethodResult:
    """Algorithm 1: every block in turn (resumed after the last finished one), the branch plan, the
    TargetNet fine-tuned."""
    ka = FilteredKA(ctx)
    blocks_done, converged, filters = resume_blocks(ctx, ka.paired)
    saved = ctx.saved()
    diagnosis: dict = saved.get("diagnosis", {"blocks": []})
    for k, block_diagnosis in enumerate(diagnosis["blocks"][:blocks_done], 1):
        ctx.emit(BlockDiagnosed(k, ka.paired.names[k - 1], block_diagnosis["teachers"]))
    skipped = saved.get("skipped_steps", 0)
    loop = ctx.loop(ka.total - skipped)
    for k in range(blocks_done + 1, ka.n_blocks + 1):
        fk, best, rounds, before = ka.amalgamate_block(loop, k)
        skipped += (ctx.params["max_rounds_per_block"] - rounds) * ka.round_steps
        values = {t.name: float(v) for t, v in zip(ctx.selection.tasks, best)}
        for task, value in values.items():
            converged[task].append(value)
        with ctx.profile.part("diagnose"):
            diagnosis["blocks"].append(ka.diagnose(k, fk, best, rounds, before))
        ctx.emit(BlockConverged(k, ka.paired.names[k - 1], values))
        ctx.emit(BlockDiagnosed(k, ka.paired.names[k - 1], diagnosis["blocks"][-1]["teachers"]))
        filters.update({(k, n): f for n, f in fk.items()})
        save_block(ctx, loop, k, converged, filters, skipped_steps=skipped, specs=ka.paired.specs, diagnosis=diagnosis)
    ka.cache = None  # the fine-tuning trains every block: no prefix is frozen
    plan, report = ka.branch_plan(converged, filters, diagnosis)
    report["prefix_cache"] = ka.cache_report
    net = regroup(ctx, loop, ka.paired, filters, plan, report, phase=ka.n_blocks + 1, steps_per_epoch=ka.spe,
                  batches=ka.batches, loss=ka.finetune_loss)
    return MethodResult(net, ctx.params["granularity"], report)


def knowledge_warnings(diagnosis: dict, plan: dict[str, int], selection, names: list[str], threshold: float
                       ) -> list[str]:
    """A plain sentence for every teacher whose knowledge does not get through at its branch block(s):
    the share of :func:`~kamal_engine.relatedness.knowledge_share` below ``threshold``."""
    out = []
    for n, teacher in enumerate(selection.teachers):
        blocks = sorted({plan[t.name] for t in selection.tasks_of(n)})
        if not blocks:
            continue
        rows = [diagnosis["blocks"][k - 1]["teachers"][teacher.name] for k in blocks]
        share = min(r["share"] for r in rows)
        if share >= threshold:
            continue
        every = [b["teachers"][teacher.name]["share"] for b in diagnosis["blocks"]]
        where = ("at every block" if max(every) < threshold else
                 f"at its branch block{'s' if len(blocks) > 1 else ''} {', '.join(names[k - 1] for k in blocks)}")
        out.append(f"the student reproduces {teacher.name} only {share:.0%} of the way {where} (its labels' converged "
                   f"loss stays {max(r['gap'] for r in rows):.3f} above the teacher's own entropy; linear CKA of the "
                   f"features {min(r['related_before'] for r in rows):.2f}): its labels may end below the teacher's; "
                   "see 'Teachers trained apart' in the README for what to try")
    return out


BLOCK_LR_HELP = "base learning rate of the block-wise training (paper: 0.01, poly policy)"

METHOD = MethodInfo(
    id="filtered-ka",
    mode="data",
    title="Filtered knowledge amalgamation",
    paper="Ye et al., Amalgamating Filtered Knowledge: Learning Task-customized Student from Multi-task "
          "Teachers, IJCAI 2019",
    summary="Block-wise: each student block is entangled into every teacher through a teacher-level filter and "
            "trained against the teachers' own predictions on unlabeled images; every task branches out at the "
            "block of minimum converged loss; then the branched TargetNet is fine-tuned.",
    params=(
        Param("granularity", "stage", "blocks the student is trained in: 'stage' (e.g. resnet layer1..4) or 'unit'",
              choices=("stage", "unit")),
        Param("epochs_per_block", 3, "epochs over the unlabeled images in one round of training a student block (a "
              "poly decay from lr to 0)", minimum=1),
        Param("max_rounds_per_block", 2, "rounds of epochs_per_block epochs per block at most: Algorithm 1 trains a "
              "block to convergence, so another round follows until the block has converged (a round that makes it "
              "worse is undone); 1: the paper's fixed epoch count", minimum=1),
        Param("converge_tolerance", 0.02, "a block has converged when the student is within this share of the "
              "teachers' knowledge (mean 1 - knowledge share over the tasks) or when a round lowered the block's "
              "converged loss by less than this fraction", minimum=0.0),
        Param("finetune_epochs", 6, "epochs fine-tuning the branched TargetNet (0: none)", minimum=0),
        *sgd_params(batch_size=16, weight_decay=5e-3, batch_help="images per step (paper: 16)", lr_help=BLOCK_LR_HELP,
                    weight_decay_help="weight decay (paper: 5e-3)",
                    poly_help="power of the poly learning-rate policy (paper: 0.9)"),
        Param("finetune_lr", 0.01, "base learning rate of the fine-tuning (paper: the same base rate)", minimum=0.0),
        Param("filter", "auto", "teacher-level filter f_k^n: 'se' (the paper's channel gate, Eq. 4; an adapter only "
              "where the shapes differ), 'adapter' (a 1x1 convolution, which can re-map channels), 'auto' (per teacher "
              "and block: the SE gate where the student's channels stand for the teacher's, channel alignment ≥ "
              "aligned_threshold, else an adapter)", choices=("auto", "se", "adapter")),
        Param("aligned_threshold", 0.2, "with filter = 'auto': channel alignment between the student's and a "
              "teacher's block feature (the share of the teacher feature a per-channel rescaling explains) at and "
              "above which the SE gate is used", minimum=0.0),
        Param("adapter_init", "least-squares", "how an adapter starts: 'least-squares' (the best 1x1 map from the "
              "student's feature to the teacher's on the probe images) or 'identity'",
              choices=("least-squares", "identity")),
        Param("feature_weight", 0.0, "weight of Eq. 5's feature term, the filtered student feature against the "
              "teacher's own (relative squared distance), added to Eq. 7 (0: Eq. 7 alone, as the paper)",
              minimum=0.0),
        Param("augment", "none", "consistent augmentation: the teachers predict on the very view the student gets "
              "('shift': ±4 pixels; 'shift+flip' adds horizontal flips; 'none': the images as they are, the "
              "teachers' predictions computed once)", choices=AUGMENTATIONS),
        *plan_params(1.0, "Eq. 9"),
        Param("cache_mb", 1024, "memory (MB) for the output of the frozen earlier blocks on every unlabeled image "
              "(for the first block the preprocessed images), computed once per block instead of at every step (the "
              "same numbers: those blocks are frozen); a "
              "block whose cache would need more runs them at every step; 0: never cache", minimum=0),
        Param("diagnose_images", 512, "unlabeled images on which the features' relatedness (linear CKA) is measured "
              "and adapters are started", minimum=16),
        Param("warn_share", 0.9, "warn when the student reproduces less than this share of a teacher's knowledge at "
              "its branch block (1 - converged-loss gap / the gap of a prediction that ignores the image)",
              minimum=0.0),
        Param("reduction", 4, "channel reduction r of the teacher-level filters (c -> c/r)", minimum=1),
        Param("ap_by_block", True, "with a validation set: AP of every task branching at each block (paper Fig. 3)"),
    ),
    run=run,
    branches=True,
    renamed={"max_size": "max_params"},
    distributed=True,
)
