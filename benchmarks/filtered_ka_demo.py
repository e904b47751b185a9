"""Filtered-KA vs the teachers and the KD baseline on the demo workspace (README "Measured").

    python benchmarks/filtered_ka_demo.py [--workspace DIR] [--init teacher|checkpoint] [--only PART,...]

1. All 10 labels (teachers 0-4 and 5-9): per-label AP of the teachers, ``filtered-ka`` (defaults),
   ``filtered-ka`` in the paper's form (SE gates, a fixed 3 epochs per block, no size cap) and ``kd``.
2. Two labels, one per teacher (like the paper's 'bus' + 'diningtable'): AP per label when every
   label branches at each block (the paper's Fig. 3 as a table, before fine-tuning), the chosen
   branch points, the TargetNet's mAP and its parameters against the teachers'; and each label's
   lowest possible converged loss (its teacher's mean entropy on the unlabeled images), the floor
   every block's converged loss is measured against.

Runs on the CPU with the methods' default hyper-parameters; builds the demo workspace first if
``DIR`` has none. ``--only`` runs some parts and keeps the others from the saved results. Writes
``benchmarks/results/filtered_ka_demo.json`` and ``.md``. ``--init
checkpoint`` starts every student from the demo's pre-trained backbone instead of teacher 0-4 (the
paper starts its TargetNet from ImageNet weights) and writes ``filtered_ka_demo_pretrained.*``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kamal_engine import demo  # noqa: E402
from kamal_engine.recipe import load_recipe  # noqa: E402
from kamal_engine.runner import run_recipe  # noqa: E402
from kamal_engine.selection import TaskSelection  # noqa: E402
from kamal_engine.training import UnlabeledImages, task_losses, teacher_targets  # noqa: E402

TWO_LABELS = ("one", "eight")


PAPER = {"filter": "se", "max_rounds_per_block": 1, "max_params": 0.0}  # the paper's form of filtered-ka
PARTS = ("filtered-ka", "kd", "paper", "two")


def recipe_for(workspace: Path, name: str, method: str, selects: tuple[list[str], list[str]] | None,
               init: str = "teacher", params: dict | None = None) -> Path:
    text = (workspace / "recipes" / "filtered-ka.toml").read_text()
    if init == "checkpoint":  # the recipe's commented lines: start from the pre-trained backbone
        try:
            text = demo.with_pretrained_init(text)
        except ValueError as exc:
            raise SystemExit(f"{workspace}: {exc}") from None
    overlay = "".join(f"\n{k} = {v!r}" if not isinstance(v, str) else f'\n{k} = "{v}"' for k, v in (params or {}).items())
    text = text.replace('id = "filtered-ka"', f'id = "{method}"{overlay}').replace('device = "auto"', 'device = "cpu"')
    text = text.replace('output_dir = "../runs/filtered-ka"', f'output_dir = "../runs/bench-{name}"')
    text = text.replace('onnx = "../runs/filtered-ka/student.onnx"', f'onnx = "../runs/bench-{name}/student.onnx"')
    text = text.replace('name = "demo-filtered-ka"', f'name = "bench-{name}"')
    if selects is not None:
        selections = iter(selects)
        text = re.sub(r"^select = \[.*\]$", lambda m: "select = [" + ", ".join(f'"{x}"' for x in next(selections)) + "]",
                      text, flags=re.M)
    path = workspace / "recipes" / f"bench-{name}.toml"
    path.write_text(text)
    return path


def run(path: Path) -> dict:
    started = time.process_time()
    wall = time.monotonic()
    result = run_recipe(load_recipe(path), restart=True, replace=True)
    return {**result.report, "cpu_seconds": round(time.process_time() - started, 1),
            "wall_seconds": round(time.monotonic() - wall, 1)}


def entropy_floor(path: Path) -> dict[str, float]:
    """Each selected task's lowest possible converged loss: the soft-target loss of the teacher's own
    prediction, i.e. its mean entropy over the unlabeled images (ℓ(p, q) = H(p) + KL(p‖q) ≥ H(p))."""
    recipe = load_recipe(path)
    teachers = [entry.load() for entry in recipe.teachers]
    selection = TaskSelection.build(teachers, [entry.select for entry in recipe.teachers])
    size = (max(max(t.preprocessing.input_size) for t in teachers),) * 2
    images = UnlabeledImages.from_folder(recipe.unlabeled, size).images
    with torch.no_grad():
        targets = torch.cat(teacher_targets(selection, images, torch.device("cpu")), 1)
        p = targets.double().clamp(1e-12, 1 - 1e-12)
        columns = p.split([len(t.outputs) for t in selection.tasks], 1)
        # logits that give back the teachers' own probabilities: sigmoid⁻¹ per label, log within a softmax
        logits = torch.cat([torch.logit(c) if t.kind == "multilabel" else c.log()
                            for t, c in zip(selection.tasks, columns)], 1).float()
        floors = task_losses(logits, targets, selection.tasks)
    return {task.name: round(float(v), 6) for task, v in zip(selection.tasks, floors)}


def fmt(x):
    return "" if x is None else f"{100 * x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="demo-workspace", help="demo workspace (built if missing)")
    parser.add_argument("--init", choices=("teacher", "checkpoint"), default="teacher",
                        help="the students start from teacher 0-4 (the recipe's default) or the pre-trained backbone")
    parser.add_argument("--only", help="comma-separated parts to run, the others kept from the saved results: "
                        "filtered-ka, kd, paper (filtered-ka in the paper's form), two (default: all)")
    args = parser.parse_args()
    parts = args.only.split(",") if args.only else list(PARTS)
    if any(part not in PARTS for part in parts):
        raise SystemExit(f"--only {args.only}: the parts are {', '.join(PARTS)}")
    suffix = "" if args.init == "teacher" else "_pretrained"
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    out = Path(__file__).resolve().parent / "results"
    saved_path = out / f"filtered_ka_demo{suffix}.json"
    results = {"all_labels": {}, "two_labels": {}}
    if args.only and saved_path.exists():
        results = json.loads(saved_path.read_text())

    for method in ("filtered-ka", "kd"):
        if method in parts:
            print(f"== all labels, {method}", flush=True)
            results["all_labels"][method] = run(recipe_for(workspace, f"all-{method}", method, None, args.init))
    if "paper" in parts:
        print("== all labels, filtered-ka in the paper's form", flush=True)
        results["all_labels"]["paper"] = run(recipe_for(workspace, "all-paper", "filtered-ka", None, args.init, PAPER))
    if "two" in parts:
        print("== two labels, filtered-ka", flush=True)
        two_recipe = recipe_for(workspace, "two", "filtered-ka", ([TWO_LABELS[0]], [TWO_LABELS[1]]), args.init)
        results["two_labels"]["filtered-ka"] = run(two_recipe)
        results["two_labels"]["entropy_floor"] = entropy_floor(two_recipe)

    # --- tables ---
    fk, kd = results["all_labels"]["filtered-ka"], results["all_labels"]["kd"]
    labels = fk["labels"]
    teacher_ap = {k: v for t in fk["validation"]["teachers"].values() for k, v in t["ap"].items()}
    teacher_map = sum(teacher_ap[label] for label in labels) / len(labels)
    lines = ["### All 10 labels (AP in %, validation split)", "",
             "| model | " + " | ".join(labels) + " | mAP | CPU time |", "|---" * (len(labels) + 3) + "|"]
    lines.append("| teachers (0-4, 5-9) | " + " | ".join(fmt(teacher_ap[label]) for label in labels)
                 + f" | {fmt(teacher_map)} | |")
    rows = [("filtered-ka", fk), ("filtered-ka, the paper's form", results["all_labels"].get("paper")), ("kd", kd)]
    for name, r in [(n, r) for n, r in rows if r is not None]:
        ap = r["validation"]["student"]["ap"]
        lines.append(f"| {name} | " + " | ".join(fmt(ap[label]) for label in labels)
                     + f" | **{fmt(r['validation']['student']['mean_ap'])}** | {r['cpu_seconds']:.0f} s |")
    lines += ["", "filtered-ka branch points: " + ", ".join(f"{k} → {v}" for k, v in fk["branch_points"].items())
              + f"; student parameters {fk['size']['student']['parameters']:,} "
              f"({fk['size']['student_vs_teachers_parameters']:.2f} × the teachers')."]

    two = results["two_labels"]["filtered-ka"]
    lines += ["", f"### Two labels ('{TWO_LABELS[0]}' from teacher 0-4, '{TWO_LABELS[1]}' from teacher 5-9)", "",
              "AP (%) when both labels branch out at each block, before fine-tuning (the paper's Fig. 3):", "",
              "| branch block | " + " | ".join(TWO_LABELS) + " | converged loss |", "|---|---|---|---|"]
    for block, v in two["ap_by_block"].items():
        losses = ", ".join(f"{label} {two['converged_loss'][label][block]:.4f}" for label in TWO_LABELS)
        lines.append(f"| {block} | " + " | ".join(fmt(v["ap"][label]) for label in TWO_LABELS) + f" | {losses} |")
    floor = results["two_labels"]["entropy_floor"]
    lines.append("| lowest possible (the teacher's own entropy) | | | "
                 + ", ".join(f"{label} {floor[label]:.4f}" for label in TWO_LABELS) + " |")
    t_ap = {k: v for t in two["validation"]["teachers"].values() for k, v in t["ap"].items()}
    s = two["validation"]["student"]
    lines += ["", "| | " + " | ".join(TWO_LABELS) + " | mAP | parameters |", "|---|---|---|---|---|",
              "| teachers | " + " | ".join(fmt(t_ap[label]) for label in TWO_LABELS)
              + f" | {fmt(sum(t_ap.values()) / 2)} | {sum(v['parameters'] for v in two['size']['teachers'].values()):,} (sum) |",
              "| TargetNet | " + " | ".join(fmt(s["ap"][label]) for label in TWO_LABELS)
              + f" | **{fmt(s['mean_ap'])}** | {two['size']['student']['parameters']:,} "
              f"({two['size']['student_vs_teachers_parameters']:.2f} ×) |",
              "", "Chosen branch points: " + ", ".join(f"{k} → {v}" for k, v in two["branch_points"].items())
              + f"; CPU time {two['cpu_seconds']:.0f} s."]
    table = "\n".join(lines) + "\n"
    out.mkdir(exist_ok=True)
    results["init"] = args.init
    (out / f"filtered_ka_demo{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"filtered_ka_demo{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
