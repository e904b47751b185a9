"""The size/quality trade-off of the branch plan on the demo workspace (README "Measured", "The student's size").

    python benchmarks/branch_budget_demo.py [--workspace DIR] [--only all,two] [--budgets 1,0.9,0.6,0.5]

1. All 10 labels: one filtered-ka run with the defaults (``max_params = 1``), then ``kamal replan`` of it
   under each budget (the block-wise stage runs once; each budget builds and fine-tunes its own TargetNet):
   budget → plan → parameters, FLOPs (× the teachers'), mAP against the teachers' on the validation split.
2. Two labels ('one' from teacher 0-4, 'eight' from teacher 5-9): a fresh run with ``max_params = 0.6``
   (what a user writes in the recipe), then replans of it under the other budgets.

Also the budget's whole front (every plan's size, converged loss and mAP before fine-tuning, from the
run's report). CPU, the method's defaults otherwise; builds the demo workspace first if DIR has none.
Writes ``benchmarks/results/branch_budget_demo.json`` and ``.md``; ``--only`` keeps the other part from
the saved results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from filtered_ka_demo import TWO_LABELS, recipe_for  # noqa: E402

from kamal_engine import demo  # noqa: E402
from kamal_engine.errors import KamalError  # noqa: E402
from kamal_engine.recipe import load_recipe  # noqa: E402
from kamal_engine.replan import replan  # noqa: E402
from kamal_engine.runner import run_recipe  # noqa: E402

PARTS = ("all", "two")
BUDGETS = (1.0, 0.9, 0.8, 0.6, 0.55, 0.5)


def teachers_map(report: dict) -> float:
    """The teachers' mAP on the student's labels (each label from the teacher it was learned from)."""
    aps = {label: ap for t in report["validation"]["teachers"].values() for label, ap in t["ap"].items()}
    return sum(aps[label] for label in report["labels"]) / len(report["labels"])


def row(report: dict, budget, seconds: float) -> dict:
    size = report["size"]
    plan = report["branch_plan"]
    return {"budget": budget, "rule": plan["rule"], "plan": report["branch_points"],
            "parameters": size["student"]["parameters"], "teachers_parameters": plan["teachers_parameters"],
            "parameters_x": round(size["student_vs_teachers_parameters"], 4),
            "flops_x": round(size["student_vs_teachers_flops"], 4),
            "mean_ap": report["validation"]["student"]["mean_ap"], "teachers_mean_ap": teachers_map(report),
            "ap": report["validation"]["student"]["ap"], "seconds": round(seconds, 1),
            "mean_ap_before_finetuning": plan["chosen"]["mean_ap"]}


def timed(fn):
    wall = time.monotonic()
    result = fn()
    return result, time.monotonic() - wall


def trade_off(workspace: Path, name: str, selects, first: float, budgets) -> dict:
    """A fresh run under the budget ``first``, then a replan of it under each other budget."""
    path = recipe_for(workspace, name, "filtered-ka", selects, params={"max_params": first})
    result, seconds = timed(lambda: run_recipe(load_recipe(path), restart=True, replace=True))
    rows = [row(result.report, first, seconds)]
    print(f"{name}: budget {first}: {rows[-1]['parameters_x']:.2f} x, mAP {rows[-1]['mean_ap']:.4f} "
          f"({seconds:.0f} s)", flush=True)
    for budget in budgets:
        if budget == first:
            continue
        try:
            replanned, seconds = timed(lambda: replan(result.output_dir, {"max_params": budget}, replace=True))
        except KamalError as exc:  # a budget no plan meets: refused before any training
            rows.append({"budget": budget, "refused": " ".join(str(exc).split())})
            print(f"{name}: budget {budget}: refused: {rows[-1]['refused']}", flush=True)
            continue
        rows.append(row(replanned.report, budget, seconds))
        print(f"{name}: budget {budget}: {rows[-1]['parameters_x']:.2f} x, mAP {rows[-1]['mean_ap']:.4f} "
              f"({seconds:.0f} s)", flush=True)
    plan = result.report["branch_plan"]
    front = [plan["plans"][i] for i in plan["front"]]
    return {"rows": sorted(rows, key=lambda r: -r["budget"]), "front": front, "plans": len(plan["plans"]),
            "block_seconds": rows[0]["seconds"]}


def fmt_plan(plan: dict) -> str:
    by_block: dict[str, list[str]] = {}
    for label, block in plan.items():
        by_block.setdefault(block, []).append(label)
    return "; ".join(f"{block}: {', '.join(labels) if len(labels) < 10 else 'all'}"
                     for block, labels in sorted(by_block.items()))


def table(part: dict, title: str) -> list[str]:
    lines = [f"### {title}", "", "| max_params | plan (labels by branch block) | parameters | FLOPs | mAP | teachers' mAP "
             "| difference | wall |", "|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        if "refused" in r:
            lines.append(f"| {r['budget']:g} | refused before training: *{r['refused'].split(': ', 1)[-1]}* "
                         "| | | | | | |")
            continue
        lines.append(f"| {r['budget']:g} | {fmt_plan(r['plan'])} | {r['parameters']:,} ({r['parameters_x']:.2f} x) | "
                     f"{r['flops_x']:.2f} x | {100 * r['mean_ap']:.2f} | {100 * r['teachers_mean_ap']:.2f} | "
                     f"{100 * (r['mean_ap'] - r['teachers_mean_ap']):+.2f} | {r['seconds']:.0f} s |")
    lines += ["", f"The front of the run's {part['plans']} measured plans (size, total converged loss, mAP before "
              "fine-tuning):", "", "| parameters | converged loss | mAP before fine-tuning | plan |", "|---|---|---|---|"]
    for p in part["front"]:
        ap = "" if p["mean_ap"] is None else f"{100 * p['mean_ap']:.2f}"
        lines.append(f"| {p['parameters']:,} ({p['fraction']:.2f} x) | {p['loss']:.4f} | {ap} | {fmt_plan(p['plan'])} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="demo-workspace", help="demo workspace (built if missing)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run: {', '.join(PARTS)}")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="max_params values to compare")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "branch_budget_demo"),
                        help="results file stem (.json and .md are written)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    budgets = [float(b) for b in args.budgets.split(",")]
    only = set(args.only.split(","))
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    if "all" in only:
        results["all"] = trade_off(workspace, "budget-all", None, budgets[0], budgets)
    if "two" in only:
        results["two"] = trade_off(workspace, "budget-two", ([TWO_LABELS[0]], [TWO_LABELS[1]]), 0.6, budgets)
    results["torch_threads"] = torch.get_num_threads()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["Made by `python benchmarks/branch_budget_demo.py` (CPU, filtered-ka defaults; each budget after "
             "the first is `kamal replan RUN --max-params X` of the first run's trained blocks; wall: the first "
             "row includes the block-wise stage).", ""]
    if "all" in results:
        lines += table(results["all"], "All 10 labels")
    if "two" in results:
        lines += table(results["two"], "Two labels ('one' from teacher 0-4, 'eight' from teacher 5-9), the run "
                                       "under max_params = 0.6")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
