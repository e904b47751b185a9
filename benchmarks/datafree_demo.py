"""Data-free amalgamation on the demo mosaics, like Table 1 of the dual-GAN paper, with an ablation of
the data-free options (README "Measured").

    python benchmarks/datafree_demo.py [--workspace DIR] [--only ROW ...] [--init teacher|checkpoint|random]
                                       [--iterations N] [--set KEY=VALUE ...] [--tag NAME]

Teachers 0-4 and 5-9, all 10 labels selected, the student a SmallNet as the teachers; per-label AP,
mAP, the worst label's AP as a share of its teacher's, wall and CPU time, for the rows of ``ROWS``:

* ``filtered-ka`` with the unlabeled images (data mode, default settings; ``--skip-filtered-ka`` takes
  it from ``benchmarks/results/filtered_ka_demo.json``);
* random noise (``dafl`` with ``source = "noise"``), DAFL in the paper's form and with its defaults;
* dual-GAN in the paper's form, then each data-free option alone on top of it (rate balance,
  batch-norm prior, augmentation, replay pool, adversarial term), then with its defaults.

Every data-free row uses the method's default budget (``--iterations`` etc. override it for all
rows; the DAFL rows get as many epochs as the dual-GAN's epochs added up) and the same initial
student: ``--init teacher`` (default, as the demo's data-free recipe) starts from teacher 0-4's trunk;
``--init checkpoint`` from the demo's pre-trained backbone (``pretrained/backbone_digits.kamal.pt``,
as the paper starts from ImageNet weights); ``--init random`` from nothing. Below the table, per label,
the share of generated images the teachers call it present in (first, middle and last generator
epoch of each run) against the share on the real validation images. Builds the demo workspace first
if ``DIR`` has none. Writes ``benchmarks/results/datafree_demo[_<init>][_<tag>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kamal_engine import demo  # noqa: E402
from kamal_engine.methods import get_method  # noqa: E402
from kamal_engine.methods.datafree import PAPER_FORM  # noqa: E402
from kamal_engine.recipe import load_recipe  # noqa: E402
from kamal_engine.runner import run_recipe  # noqa: E402


def recipe_for(workspace: Path, name: str, base: str, method: str, params: dict, init: str | None = None) -> Path:
    text = (workspace / "recipes" / f"{base}.toml").read_text()
    if init == "checkpoint":  # the recipe's commented lines: start from the demo's pre-trained backbone
        try:
            text = demo.with_pretrained_init(text)
        except ValueError as exc:
            raise SystemExit(f"{workspace}: {exc}") from None
    elif init is not None:
        text = re.sub(r'^init = "(teacher|random)"$', f'init = "{init}"', text, flags=re.M)
    lines = "".join(f"\n{k} = {json.dumps(v)}" for k, v in params.items())
    text = text.replace(f'id = "{base}"', f'id = "{method}"{lines}').replace('device = "auto"', 'device = "cpu"')
    text = text.replace(f'output_dir = "../runs/{base}"', f'output_dir = "../runs/bench-{name}"')
    text = text.replace(f'onnx = "../runs/{base}/student.onnx"', f'onnx = "../runs/bench-{name}/student.onnx"')
    text = text.replace(f'name = "demo-{base}"', f'name = "bench-{name}"')
    path = workspace / "recipes" / f"bench-{name}.toml"
    path.write_text(text)
    return path


def run(path: Path) -> dict:
    cpu, wall = time.process_time(), time.monotonic()
    report = run_recipe(load_recipe(path), restart=True, replace=True).report
    return {**report, "cpu_seconds": round(time.process_time() - cpu, 1), "wall_seconds": round(time.monotonic() - wall, 1)}


def fmt(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


# The rows: name -> (title, method, parameters beyond the budget). Each ingredient is added alone to the
# paper's method (paper_faithful = true turns every other option off), then all that helped together
# (the methods' defaults).
ROWS = {
    "noise": ("random noise", "dafl", {"source": "noise", "paper_faithful": True}),
    "dafl-paper": ("DAFL, paper's form", "dafl", {"paper_faithful": True}),
    "dafl": ("DAFL, defaults", "dafl", {}),
    "dual-gan-paper": ("dual-GAN, paper's form", "dual-gan", {"paper_faithful": True}),
    "rate": ("  + rate balance", "dual-gan", {"balance": "rate"}),
    "bn-prior": ("  + batch-norm prior", "dual-gan", {"bn_prior": "BN"}),
    "augment": ("  + augmentation", "dual-gan", {"augment": True}),
    "replay": ("  + replay pool", "dual-gan", {"replay": "POOL"}),
    "adversarial": ("  + adversarial term", "dual-gan", {"adversarial": "ADV"}),
    "dual-gan": ("dual-GAN, defaults", "dual-gan", {}),
}


def row_params(name: str, args) -> tuple[str, str, dict]:
    """The row's method and parameters: an ablation row is the paper's form with one ingredient on."""
    title, method, params = ROWS[name]
    values = {"BN": args.bn_prior, "POOL": args.replay, "ADV": args.adversarial}
    params = {k: values.get(v, v) if isinstance(v, str) else v for k, v in params.items()}
    if name in ("rate", "bn-prior", "augment", "replay", "adversarial"):  # one ingredient on the paper's form
        params = {**PAPER_FORM, "paper_faithful": False, **params}
    given = {"iterations": args.iterations, "batch_size": args.batch_size, "generator_width": args.generator_width,
             "generator_epochs": args.generator_epochs, "epochs_per_block": args.epochs_per_block,
             "finetune_epochs": args.finetune_epochs}
    defaults = get_method("dual-gan").defaults()  # the dual-GAN's budget, given to every row
    budget = {k: defaults[k] if v is None else v for k, v in given.items()}
    if method == "dafl":
        epochs = budget.pop("generator_epochs") + 4 * budget.pop("epochs_per_block") + budget.pop("finetune_epochs")
        budget["epochs"] = epochs
        if name != "noise":
            budget["lr_generator"] = args.dafl_lr_generator
    if params.get("source") == "noise":
        budget.pop("generator_width")
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    return title, method, {**{k: v for k, v in budget.items() if v is not None}, **params, **extra}


def coverage_lines(results: dict, names: list[str], labels: list[str]) -> list[str]:
    """Per label: how often the teachers call it present on real validation images, and on each run's
    generated images (first, middle and last generator epoch), with the images' diversity."""
    real = next((results[n]["coverage"].get("real") for n in names if "coverage" in results[n]), None)
    if real is None:
        return []
    lines = ["", "Labels present (%) in the teachers' eyes: real validation images, then each run's generated "
             "images at its first, middle and last generator epoch; diversity = RMS distance between two images "
             "(√2 for noise).", "",
             "| images | epoch | " + " | ".join(labels) + " | diversity |", "|---|---|" + "---|" * len(labels) + "---|",
             "| real (validation) | | " + " | ".join(f"{100 * real[label]:.0f}" for label in labels) + " | |"]
    for name in names:
        epochs = results[name].get("coverage", {}).get("generated", [])
        if not epochs:
            continue
        for e in dict.fromkeys([epochs[0]["epoch"], epochs[len(epochs) // 2]["epoch"], epochs[-1]["epoch"]]):
            row = next(x for x in epochs if x["epoch"] == e)
            lines.append(f"| {ROWS[name][0].strip()} | {e} | " + " | ".join(f"{100 * row['rates'][label]:.0f}"
                                                                       for label in labels)
                         + f" | {row['diversity']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="demo-workspace", help="demo workspace (built if missing)")
    parser.add_argument("--iterations", type=int, help="steps per epoch of every data-free run (default: the "
                        "method's)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--generator-width", type=int)
    parser.add_argument("--generator-epochs", type=int, default=None, help="dual-gan Step I")
    parser.add_argument("--epochs-per-block", type=int, default=None, help="dual-gan Step II, per block")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="dual-gan fine-tuning")
    parser.add_argument("--bn-prior", type=float, default=1.0, help="the batch-norm prior row's weight")
    parser.add_argument("--replay", type=int, default=2048, help="the replay row's pool size")
    parser.add_argument("--adversarial", type=float, default=1.0, help="the adversarial row's weight")
    parser.add_argument("--init", default="teacher", choices=("teacher", "checkpoint", "random"),
                        help="initial student of the data-free runs (teacher: the trunk of teacher 0-4, the demo's "
                             "stand-in for the paper's ImageNet-pretrained TargetNet; checkpoint: the demo's "
                             "pre-trained backbone)")
    parser.add_argument("--dafl-lr-generator", type=float, default=None,
                        help="the DAFL rows' generator rate (default: the method's)")
    parser.add_argument("--only", nargs="+", choices=tuple(ROWS), help="run only these rows (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="method parameters set in every data-free row (VALUE read as JSON, e.g. bn_prior=2)")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--skip-filtered-ka", action="store_true",
                        help="take the data-mode row from benchmarks/results/filtered_ka_demo.json (same demo "
                             "workspace and seed) instead of running it again")
    args = parser.parse_args()
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    names = list(args.only or ROWS)
    results = {"settings": vars(args)}
    if not args.skip_filtered_ka:
        print("== filtered-ka", flush=True)
        results["filtered-ka"] = run(recipe_for(workspace, "filtered-ka", "filtered-ka", "filtered-ka", {}))
    for name in names:
        title, method, params = row_params(name, args)
        print(f"== {name}: {method} {params}", flush=True)
        results[name] = run(recipe_for(workspace, name, "dual-gan", method, params, args.init))
        r = results[name]
        print(f"   mAP {r['validation']['student']['mean_ap']:.4f}, {r['wall_seconds']} s wall, {r['cpu_seconds']} s CPU",
              flush=True)
    if args.skip_filtered_ka:
        previous = Path(__file__).resolve().parent / "results" / "filtered_ka_demo.json"
        if previous.is_file():
            results["filtered-ka"] = json.loads(previous.read_text())["all_labels"]["filtered-ka"]
    any_run = results[names[0]]
    labels = any_run["labels"]
    teacher_ap = {k: v for t in any_run["validation"]["teachers"].values() for k, v in t["ap"].items()}
    teacher_map = sum(teacher_ap[label] for label in labels) / len(labels)
    rows = [("teachers", "labelled mosaics", teacher_ap, teacher_map, None, None)]
    if "filtered-ka" in results:
        fk = results["filtered-ka"]
        rows.append(("filtered-ka", "unlabeled mosaics", fk["validation"]["student"]["ap"],
                     fk["validation"]["student"]["mean_ap"], fk.get("wall_seconds"), fk.get("cpu_seconds")))
    for name in names:
        s = results[name]["validation"]["student"]
        rows.append((ROWS[name][0], "none", s["ap"], s["mean_ap"], results[name]["wall_seconds"],
                     results[name]["cpu_seconds"]))
    lines = ["| model | data | " + " | ".join(labels) + " | mAP | × teachers | worst label × | wall | CPU |",
             "|---|---|" + "---|" * len(labels) + "---|---|---|---|---|"]
    for title, data, ap, mean_ap, wall, cpu in rows:
        worst = min(ap[label] / teacher_ap[label] for label in labels)
        lines.append(f"| {title} | {data} | " + " | ".join(fmt(ap[label]) for label in labels)
                     + f" | **{fmt(mean_ap)}** | {mean_ap / teacher_map:.2f} | {worst:.2f} | "
                     + f"{'' if wall is None else f'{wall:.0f} s'} | {'' if cpu is None else f'{cpu:.0f} s'} |")
    budgets = sorted({json.dumps({k: v for k, v in results[n]["params"].items()
                                  if k in ("iterations", "batch_size", "generator_width", "generator_epochs",
                                           "epochs_per_block", "finetune_epochs", "epochs")}) for n in names})
    lines += ["", "Budgets: " + "; ".join(budgets) + f"; initial student: {args.init}; 2 CPU cores."]
    for name in names:
        r = results[name]
        if "branch_points" in r:
            lines.append(f"{name} branch points: " + ", ".join(f"{t} → {b}" for t, b in r["branch_points"].items()))
        if r.get("ingredients"):
            lines.append(f"{name} ingredients: " + ", ".join(f"{k} = {v}" for k, v in r["ingredients"].items()))
    lines += coverage_lines(results, names, labels)
    table = "\n".join(lines) + "\n"
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    suffix = (f"_{args.init}" if args.init != "teacher" else "") + (f"_{args.tag}" if args.tag else "")
    (out / f"datafree_demo{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"datafree_demo{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
