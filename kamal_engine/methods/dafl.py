"""``dafl``: data-free learning of a student network (Chen et al., ICCV 2019), for several teachers.

Algorithm 1 of ``dafl-iccv2019.txt``: the fixed teachers act as the discriminator of a generator G
(:class:`~kamal_engine.methods.generators.DCGANGenerator`). Each step draws ``z ~ N(0, I)``, generates a
batch and

1. updates G on ``L_Total = L_oh + α L_a + β L_ie`` (Eq. 7; the terms in :mod:`kamal_engine.methods.datafree`),
   computed on every teacher's *selected* outputs (the task-level filter of the amalgamation
   papers) and, for ``L_a``, on every teacher's features before its classifier;
2. updates the student by knowledge distillation (Eq. 1) on the same, detached images: the soft-target
   cross entropy against the teachers' predictions restricted to the selected labels (the loss of
   ``kd`` and ``filtered-ka``), so several teachers are amalgamated into one student.

Generator and student are thus updated alternately, one step each, as in the authors' code. Both use
Adam (paper: "the generator was trained [...] using Adam", no rate given); α = 0.1 and β = 5 (Section
4.1), the student's rate 2e-3 as in the authors' MNIST script. The generator's rate is 0.02, not that
script's 0.2: on the digits benchmark (``benchmarks/dafl_digits.py``, 600 steps of 256 images, width
16) 0.2 gave a student of 73.5 % and one that got worse with longer runs (64.8 % after 1200 steps,
62.3 % after 4800), 0.02 gave 87.6 %. (Also measured there, 600 steps: the DCGAN code's batch-norm
``eps = 0.8`` 37.6 %; a one-channel generator repeated to RGB 73.8 %; β scaled to the authors'
``Σ p log10 p`` instead of the paper's ``1/k Σ p log p``, i.e. 21.7, 86.1 % with the rate 0.02.) An epoch
is ``iterations`` steps (120 in the authors' code); the student's rate is divided by 10 for the last
20 % of the epochs (our choice; the paper does not give a schedule for MNIST).

Beyond the paper (options, all off with ``paper_faithful = true``; the ingredients in
:mod:`kamal_engine.methods.datafree`; on by default: the rate balance and the batch-norm prior,
which the demo's ablation showed to help): ``balance = "rate"`` replaces Eq. 6 for multi-label
outputs by the per-label rate term; ``bn_prior`` adds DeepInversion's batch-norm statistics prior to
the generator's loss; ``augment`` and ``replay`` train the student on shifted/flipped images and on a
pool of past batches; ``adversarial`` adds, after ``adversarial_warmup`` epochs, the term by which
the generator seeks images where the student disagrees with the teachers. After every epoch the
share of generated images the teachers call each label present (and their diversity) is reported
(:class:`~kamal_engine.events.LabelsCovered`, report ``coverage``).

``source = "noise"`` is the paper's baseline of Table 1 ("data randomly generated from normal
distribution"): no generator, the student learns by KD on N(0, 1) images.

The generated images are read as normalised the student's way; a teacher with other
preprocessing sees the same picture in its own normalisation (:class:`GeneratedImages`). A
preview grid is emitted every ``preview_every`` steps. Checkpoints after every epoch (generator,
student and both optimisers), so ``--resume`` continues with the same random draws. Seeds: the
generator's initial weights are phase 0, epoch e's noise phase e.
"""

from __future__ import annotations

import torch

from ..events import LabelsCovered, SamplesGenerated, StageStarted
from ..training import StepLoop, autocast, set_mode, task_losses, task_probabilities, to_device
from . import MethodInfo, MethodResult, Param
from .common import RunContext, Term, descend, describe_terms, loss_dict, total_loss, whole_student
from .datafree import (INGREDIENTS, BatchNormPrior, LabelCoverage, ReplayPool, activation_loss, balance_loss,
                       datafree_params, disagreement, effective_params, one_hot_loss, recording, student_batch)
from .generators import DCGANGenerator, GeneratedImages


class TeacherDiscriminator:
    """The fixed teachers on generated images: selected logits (in task order) and pre-classifier features."""

    def __init__(self, ctx: RunContext, view: GeneratedImages):
        self.selection, self.view = ctx.selection, view
        self.active = [n for n in range(len(ctx.selection.teachers)) if ctx.selection.tasks_of(n)]
        self.nets = {n: ctx.selection.teachers[n].blocks("stage") for n in self.active}
        self.outputs = {n: [o for t in ctx.selection.tasks_of(n) for o in t.outputs] for n in self.active}

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, features = [], []
        for n in self.active:
            teacher, net = self.selection.teachers[n], self.nets[n]
            h = self.view.for_teacher(x, teacher.preprocessing)
            for block in net.blocks:
                h = block(h)
            features.append(h)
            logits.append(net.head(h)[:, self.outputs[n]])
        return torch.cat(logits, 1), features




def generator_terms(p: dict) -> tuple[Term, ...]:
    """Eq. 7's terms (the balance term named by its form), then the options that are on."""
    terms = [Term("one-hot", "one_hot"), Term("activation", "alpha"),
             Term("entropy" if p["balance"] == "entropy" else "rate", "beta")]
    if p["bn_prior"] > 0:
        terms.append(Term("batch-norm", "bn_prior"))
    if p["adversarial"] > 0:
        terms.append(Term("adversarial", "adversarial"))
    return tuple(terms)


class DAFL:
    """One dafl run: the generator, the student, their optimisers, and the alternating step."""

    def __init__(self, ctx: RunContext):
        p = effective_params(ctx.params)
        self.ctx, self.p, self.device, self.tasks = ctx, p, ctx.device, ctx.selection.tasks
        self.student = whole_student(ctx).to(self.device)
        self.size = tuple(ctx.student_preprocessing.input_size)
        self.view = GeneratedImages(ctx.student_preprocessing)
        self.teachers = TeacherDiscriminator(ctx, self.view)
        for t in ctx.selection.teachers:
            t.model.to(self.device)
        self.use_generator = p["source"] == "generator"
        ctx.seeded(0)
        self.generator = DCGANGenerator(p["latent_dim"], self.size, p["generator_width"]).to(self.device)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=p["lr_generator"], betas=(0.5, 0.999))
        self.opt_s = torch.optim.Adam(self.student.parameters(), lr=p["lr_student"])
        self.terms = generator_terms(p)
        self.prior = BatchNormPrior([(t.name, t.model) for n, t in enumerate(ctx.selection.teachers)
                                     if n in self.teachers.active]) if p["bn_prior"] > 0 else None
        self.pool = ReplayPool(p["replay"], self.device)
        self.coverage = LabelCoverage(ctx.selection.labels)
        self.covered: list[dict] = []  # one coverage summary per epoch
        self.epoch = 0
        self.parts = {"student": self.student, "generator": self.generator, "opt_student": self.opt_s,
                      "opt_generator": self.opt_g, "pool": self.pool}  # what a checkpoint holds
        # a distributed run: the generator's and the student's gradients averaged over the ranks (DDP);
        # the student inside the generator's loss (the adversarial term) is the module itself, not reduced
        self.generator_objective = ctx.world.objective([self.generator], self.generator_loss)
        self.student_objective = ctx.world.objective([self.student], self.student_loss)

    def images(self, count: int, draw: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """A batch for the student and the teachers' logits on it: generated after one generator step
        (Module 1, Eq. 7 and the options that are on), or N(0, 1) noise for the ``source = "noise"`` baseline."""
        p = self.p
        z = to_device(torch.randn(count, p["latent_dim"], generator=draw), self.device)
        if not self.use_generator:
            x = to_device(torch.randn(count, 3, *self.size, generator=draw), self.device)
            with torch.no_grad(), autocast(self.device, self.ctx.precision):
                return x, self.teachers(x)[0], {}
        l_total, (x, logits, logged) = self.generator_objective(z)
        descend(l_total, self.opt_g)
        return x, logits, logged

    def generator_loss(self, z: torch.Tensor):
        """Eq. 7 (with the options that are on) of the images generated from ``z``, and (the images, the
        teachers' logits on them, the values to log)."""
        p = self.p
        with autocast(self.device, self.ctx.precision):
            x = self.generator(z)
            with recording(self.prior):
                logits, features = self.teachers(x)
            values = {"one-hot": one_hot_loss(logits, self.tasks), "activation": activation_loss(features),
                      self.terms[2].name: balance_loss(logits, self.tasks, p["balance"], p["target_rate"])}
            if self.prior is not None:
                values["batch-norm"] = self.prior.value()
            if p["adversarial"] > 0:
                warm = self.epoch > p["adversarial_warmup"]
                self.student.eval()  # judged, not trained: its batch-norm statistics stay its own images'
                values["adversarial"] = -disagreement(self.student(x), logits, self.tasks) * float(warm)
                self.student.train()
        l_total = total_loss(self.terms, values, p)
        logged = {"generator:total": l_total.detach(),
                  **{f"generator:{k}": v.detach() for k, v in values.items()}}
        return l_total, (x.detach(), logits.detach(), logged)

    def student_loss(self, batch: tuple[torch.Tensor, torch.Tensor]):
        """Module 2, Eq. 1: KD of the images ``seen`` against the teachers' ``targets``."""
        seen, targets = batch
        with autocast(self.device, self.ctx.precision):
            per_task = task_losses(self.student(seen), targets, self.tasks)
        loss = per_task.sum() / len(self.tasks)
        return loss, loss_dict(loss, per_task, self.ctx.selection)

    def step(self, loop: StepLoop, idx: torch.Tensor, draw: torch.Generator) -> dict[str, float]:
        """One generator step, then one student step by KD (Module 2, Eq. 1) on the same images, or on
        them replayed and augmented (then the teachers judge the images the student sees)."""
        x, teacher_logits, logged = self.images(len(idx), draw)
        self.coverage.add(x, teacher_logits, self.tasks)
        seen, changed = student_batch(x, self.pool, self.p, draw)
        if changed:
            with torch.no_grad(), autocast(self.device, self.ctx.precision):
                teacher_logits = self.teachers(seen)[0]
        loss, values = self.student_objective((seen, task_probabilities(teacher_logits, self.tasks)))
        descend(loss, self.opt_s)
        if self.p["preview_every"] and (loop.state.step + 1) % self.p["preview_every"] == 0:
            self.ctx.emit(SamplesGenerated(loop.state.step + 1, self.view.preview(x)))
        return self.ctx.world.average({**values, **logged})

    def end_epoch(self, epoch: int) -> None:
        """The epoch's label coverage: kept for the report and sent to the app."""
        summary = self.coverage.summary(epoch, self.ctx.world)  # every rank's images
        self.covered.append(summary)
        self.coverage.reset()
        self.ctx.emit(LabelsCovered("train", epoch, summary["rates"], summary["diversity"]))


def run(ctx: RunContext) -> MethodResult:
    """Epochs of alternating generator and student steps, resumed after the last finished epoch."""
    dafl = DAFL(ctx)
    p = dafl.p
    batch, iterations, epochs = p["batch_size"], p["iterations"], p["epochs"]
    local = ctx.world.local_batch(batch)  # a distributed run: each rank generates its share of the batch
    decay_from = max(1, int(round(0.8 * epochs)))
    saved = ctx.saved()
    done = saved.get("epochs_done", 0)
    if done:
        for key, part in dafl.parts.items():
            if key in saved:  # a checkpoint from before the replay pool has none
                part.load_state_dict(saved[key])
        dafl.covered = list(saved.get("coverage", []))
    loop = ctx.loop(epochs * iterations)
    ctx.emit(StageStarted("train", None, None, len(dafl.student.trunk), epochs, epochs * iterations))
    set_mode([dafl.student, dafl.generator] if dafl.use_generator else [dafl.student],
             [t.model for t in ctx.selection.teachers])
    means: dict[str, float] = {}
    for epoch in range(done + 1, epochs + 1):
        for group in dafl.opt_s.param_groups:
            group["lr"] = p["lr_student"] * (0.1 if epoch > decay_from else 1.0)
        draw, dafl.epoch = ctx.rank_draw(epoch), epoch
        batches = (torch.arange(i * local, (i + 1) * local) for i in range(iterations))
        means = loop.run_epoch(batches, lambda idx: dafl.step(loop, idx, draw), "train", None, epoch)
        ctx.world.settle([dafl.student, dafl.generator])  # rank 0's batch-norm statistics, as checkpointed
        dafl.end_epoch(epoch)
        ctx.save(loop, epochs_done=epoch, coverage=dafl.covered,
                 **{key: part.state_dict() for key, part in dafl.parts.items()})
    if dafl.prior is not None:
        dafl.prior.remove()
    dafl.student.eval()
    report = {"epochs": epochs, "iterations": iterations, "source": p["source"],
              "generated_images": epochs * iterations * batch, "paper_faithful": bool(p["paper_faithful"]),
              "ingredients": {k: p[k] for k in INGREDIENTS},
              "coverage": {"generated": dafl.covered}}
    if dafl.use_generator:
        report["loss_terms"] = {"generator": describe_terms(dafl.terms, p, means, "generator:")}
    if dafl.prior is not None:
        report["batch_norm_prior"] = dafl.prior.describe()
    return MethodResult(dafl.student, "stage", report)


METHOD = MethodInfo(
    id="dafl",
    mode="data-free",
    title="Data-free learning (DAFL)",
    paper="Chen et al., Data-Free Learning of Student Networks, ICCV 2019",
    summary="A generator is trained against the fixed teachers (one-hot, activation and information-entropy "
            "losses) while the student learns by distillation on its images; no training data is needed.",
    params=(
        Param("epochs", 20, "epochs of generated batches (paper: 200; ours sized for 2 CPU cores)", minimum=1),
        Param("iterations", 50, "generator/student steps per epoch (authors' code: 120)", minimum=1),
        Param("batch_size", 64, "generated images per step (authors' code: 512)", minimum=2),
        Param("latent_dim", 100, "size of the generator's input noise z", minimum=1),
        Param("generator_width", 24, "channels of the generator's last convolution (paper: 64)", minimum=1),
        Param("lr_generator", 0.02, "Adam learning rate of the generator (authors' MNIST script: 0.2, which made "
              "students worse with longer runs on the digits benchmark)", minimum=0.0),
        Param("lr_student", 2e-3, "Adam learning rate of the student (authors' code: 2e-3)", minimum=0.0),
        Param("one_hot", 1.0, "weight of the one-hot loss L_oh (Eq. 7)", minimum=0.0),
        Param("alpha", 0.1, "weight α of the activation loss L_a (Eq. 7; paper: 0.1)", minimum=0.0),
        Param("beta", 5.0, "weight β of the information-entropy loss L_ie (Eq. 7; paper: 5)", minimum=0.0),
        Param("source", "generator", "'generator' (DAFL) or 'noise' (the paper's random-noise baseline)",
              choices=("generator", "noise")),
        *datafree_params(),
        Param("preview_every", 200, "steps between generated-sample previews (0: none)", minimum=0),
    ),
    run=run,
    distributed=True,
)
