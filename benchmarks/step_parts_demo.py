"""A filtered-ka step against the sum of its irreducible parts, per block, on the demo (README "Measured").

    python benchmarks/step_parts_demo.py [--workspace DIR] [--batch N] [--memory-format contiguous|channels_last]
                                         [--precision auto|fp32|bf16] [--rounds R] [--ops]

For student block k (the demo's teachers and a student started from teacher 1, batch 16, 56 px, CPU):
the time of the engine's training step (``FilteredKA.block_loss`` with the prefix cache, then the backward
pass and the SGD update, as ``sgd_epochs`` runs it) against the sum of the parts no implementation can
skip: the block's own forward and backward on its (cached) input, each teacher's filter forward and
backward, and each teacher's remaining blocks forward with the gradient to their input; the rest is the
overhead (loss, bookkeeping, the update). Every part runs under the step's precision (``--precision``, as
``[run] precision``: ``auto`` is bf16 autocast on a CPU with native bf16). Best of 3 timings of 20 steps
each, in ``--rounds`` interleaved rounds (default 5) of which each part's least time counts (on a shared
machine, noise only ever adds time). ``--ops`` also runs the step and the parts under torch's profiler
and lists, per block, their operators' total self time and the operators the step runs beyond the
parts (what the rest of the step is: the update, gathers, the loss). Writes ``benchmarks/results/step_parts_demo_<layout>[_<precision>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kamal_engine import demo, layout  # noqa: E402
from kamal_engine.events import CancelToken  # noqa: E402
from kamal_engine.methods import get_method, resolve_params  # noqa: E402
from kamal_engine.methods.common import RunContext  # noqa: E402
from kamal_engine.methods.filtered_ka import FilteredKA  # noqa: E402
from kamal_engine.recipe import load_recipe  # noqa: E402
from kamal_engine.runner import build_student  # noqa: E402
from kamal_engine.selection import TaskSelection  # noqa: E402
from kamal_engine.training import (UnlabeledImages, autocast, effective_precision, set_mode,  # noqa: E402
                                   teacher_targets)


def best_ms(fn, steps: int = 20, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1000


def operator_times(step, parts, steps: int = 40, top: int = 6) -> dict:
    """Self CPU time per step of every operator of ``step`` and of ``parts`` (run one after the other),
    under torch's profiler: the totals and the ``top`` operators the step spends the most time on beyond
    the parts."""
    from torch.profiler import ProfilerActivity, profile

    def per_op(fns) -> dict[str, float]:
        for fn in fns:
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                for fn in fns:
                    fn()
        return {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}

    a, b = per_op([step]), per_op(parts)
    extra = sorted(((a[k] - b.get(k, 0.0), k) for k in a), reverse=True)[:top]
    return {"step_us": round(sum(a.values()), 1), "parts_us": round(sum(b.values()), 1),
            "extra": [(k.replace("Optimizer.step#", "").replace("Optimizer.zero_grad#", ""), round(d, 1))
                      for d, k in extra if d > 0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="demo-workspace")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=512, help="unlabeled images loaded (the cache is of these)")
    parser.add_argument("--memory-format", default="contiguous", choices=layout.LAYOUTS)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each time is the least of them")
    parser.add_argument("--ops", action="store_true", help="also compare the operators of the step and of its parts")
    args = parser.parse_args()
    precision = effective_precision(torch.device("cpu"), args.precision)
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    recipe = load_recipe(workspace / "recipes" / "filtered-ka.toml")
    teachers = [entry.load() for entry in recipe.teachers]
    selection = TaskSelection.build(teachers, [entry.select for entry in recipe.teachers])
    student, arch, kwargs, preprocessing = build_student(recipe, selection)
    for model in [student, *(t.model for t in teachers)]:
        layout.apply(model, args.memory_format)
    size = max(max(t.preprocessing.input_size) for t in teachers)
    images = UnlabeledImages.from_folder(recipe.unlabeled, (size, size))
    images.images = images.images[:args.images]
    targets = teacher_targets(selection, images.images, torch.device("cpu"))
    method = get_method("filtered-ka")
    params = resolve_params(method, {}, lambda message, key: ValueError(f"{key}: {message}"))
    params["batch_size"] = args.batch
    ctx = RunContext(selection, student, arch, kwargs, preprocessing, images, targets, torch.device("cpu"), precision,
                     params, 0, lambda event: None, CancelToken(), None, None, None, "filtered-ka")
    ka = FilteredKA(ctx)
    idx = torch.arange(args.batch)
    rows = []
    for k in range(1, ka.n_blocks + 1):
        fk, _ = ka.new_filters(k)
        ka.build_cache(k)
        block = ka.paired.student.blocks[k - 1]
        set_mode([block, *fk.values()], list(ka.paired.student.blocks)[:k - 1])
        optimizer = ctx.sgd([q for m in [block, *fk.values()] for q in m.parameters()], 0.0)
        loss = ka.block_loss(k, fk, torch.Generator().manual_seed(0))

        def step():
            value, _ = loss(idx)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()

        x = ka.cache[1][idx] if ka.cache is not None else ctx.student_preprocessing(images.images[idx])
        with torch.no_grad(), autocast(torch.device("cpu"), precision):
            feature = block(x).detach()

        cpu = torch.device("cpu")

        def block_part():
            with autocast(cpu, precision):
                y = block(x)
            y.float().sum().backward()

        def filter_part():
            f = feature.clone().requires_grad_(True)
            with autocast(cpu, precision):
                y = sum(fk[n](f).float().sum() for n in ka.active)
            y.backward()

        with torch.no_grad(), autocast(cpu, precision):
            filtered = {n: fk[n](feature).detach() for n in ka.active}

        def teacher_part():
            for n in ka.active:
                f = filtered[n].clone().requires_grad_(True)
                with autocast(cpu, precision):
                    y = ka.paired.teachers[n].forward_from(k, f)
                y.float().sum().backward()

        fns = {"block": block_part, "filters": filter_part, "teachers": teacher_part, "step": step}
        best = {name: float("inf") for name in fns}
        for _ in range(args.rounds):  # interleaved rounds, the least of each: noise only ever adds time
            for name, fn in fns.items():
                best[name] = min(best[name], best_ms(fn))
        total = best.pop("step")
        parts = best
        rows.append({"block": ka.paired.names[k - 1], "step_ms": round(total, 2),
                     **{f"{name}_ms": round(v, 2) for name, v in parts.items()},
                     "irreducible_ms": round(sum(parts.values()), 2),
                     "ratio": round(total / sum(parts.values()), 3)})
        if args.ops:
            rows[-1]["ops"] = operator_times(step, [block_part, filter_part, teacher_part])
        print(rows[-1], flush=True)
    lines = [f"Made by `python benchmarks/step_parts_demo.py --memory-format {args.memory_format} --precision "
             f"{args.precision}` (batch {args.batch}, CPU, {torch.get_num_threads()} threads, {precision}).", "",
             "| block | step | block fwd+bwd | filters fwd+bwd | teachers' blocks fwd + input grad | irreducible sum "
             "| step / irreducible |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['step_ms']:.2f} ms | {r['block_ms']:.2f} | {r['filters_ms']:.2f} | "
                     f"{r['teachers_ms']:.2f} | {r['irreducible_ms']:.2f} | **{r['ratio']:.2f}** |")
    if args.ops:
        lines += ["", "Operators under torch's profiler (self CPU time per step, 40 steps): the step's against its parts', "
                  "and the operators the step spends more on than the parts do.", "",
                  "| block | step's operators | parts' operators | ratio | beyond the parts (us per step) |",
                  "|---|---|---|---|---|"]
        for r in rows:
            o = r["ops"]
            extra = ", ".join(f"{name} {us:.0f}" for name, us in o["extra"])
            lines.append(f"| {r['block']} | {o['step_us']:.0f} us | {o['parts_us']:.0f} us | "
                         f"{o['step_us'] / o['parts_us']:.2f} | {extra} |")
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"  # fp32: the files of earlier runs
    out = Path(__file__).parent / "results" / f"step_parts_demo_{args.memory_format}{suffix}"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
