"""adaptive-ka on the heterogeneous demo (README "Measured"; the paper's Tables 3, 4, 8 and 9).

    python benchmarks/adaptive_ka_demo.py [--workspace DIR] [--only two-stage,one-shot,...] [--seeds 0,1,2]

Four source teachers of three architectures (`kamal demo --heterogeneous`); four labels (zero,
three, five, eight), each covered by two of them. Runs `recipes/adaptive-ka.toml` with the
method's defaults as

* ``two-stage``: component nets, then the target net (the method);
* ``one-shot``: the teachers straight into the target net (Table 9);
* ``no-bridge``: two-stage without the transfer bridge (Table 8, "wo/TB");
* ``no-selection``: two-stage learning from every covering teacher equally (Table 8, "wo/TS").

Prints and writes ``benchmarks/results/adaptive_ka_demo.json`` and ``.md``: AP per label of each
source teacher, of the prediction Eq. 6 selects for each image (what a component imitates), of
each component net and of the target net; parameters; the variants side by side; the checks the
issue asks for (component ≥ best source teacher, target ≥ component − 0.5 points, two-stage ≥
one-shot). CPU, 2 threads' worth of time is stated per run.

``--seeds``: each variant is run once per seed (the recipe's ``[run] seed``: initialisation of the
new layers, image order) and every figure is the mean over the seeds, with the spread (± one standard
deviation) beside it; the checks compare means. A single run's AP moves by up to about a point
between seeds on these 1000 validation images, so one seed decides a ±0.5-point check partly by
chance. Results then go to ``adaptive_ka_demo_seeds.json`` and ``.md``, so the one-seed tables of the
README stay.

``--only`` adds to the results file: variants it does not run are kept from the file when they were
run on the same workspace with the same seeds (another workspace or other seeds replace them).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kamal_engine import demo  # noqa: E402
from kamal_engine.recipe import load_recipe  # noqa: E402
from kamal_engine.runner import run_recipe  # noqa: E402

VARIANTS = {
    "two-stage": "",
    "one-shot": 'variant = "one-shot"',
    "no-bridge": "transfer_bridge = false",
    "no-selection": "selective = false",
}


def recipe_for(workspace: Path, name: str, extra: str, seed: int = 0) -> Path:
    text = (workspace / "recipes" / "adaptive-ka.toml").read_text()
    text = text.replace('id = "adaptive-ka"', f'id = "adaptive-ka"\n{extra}').replace('device = "auto"', 'device = "cpu"')
    tag = name if seed == 0 else f"{name}-seed{seed}"
    text = re.sub(r"(?m)^seed = \d+$", f"seed = {seed}", text)
    text = text.replace("../runs/adaptive-ka", f"../runs/bench-adaptive-{tag}")
    path = workspace / "recipes" / f"bench-adaptive-{tag}.toml"
    path.write_text(text)
    return path


def run(path: Path, seed: int) -> dict:
    started, wall = time.process_time(), time.monotonic()
    result = run_recipe(load_recipe(path), restart=True, replace=True)
    return {**result.report, "seed": seed, "cpu_seconds": round(time.process_time() - started, 1),
            "wall_seconds": round(time.monotonic() - wall, 1)}


def earlier_results(path: Path, workspace: Path, seeds: list[int]) -> dict:
    """The variants an earlier invocation wrote to ``path`` for the same workspace and seeds (so that
    ``--only`` adds to a results file instead of replacing it)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    kept = {}
    for name, runs in results.items() if isinstance(results, dict) else ():
        if (name in VARIANTS and isinstance(runs, list) and [r.get("seed") for r in runs] == seeds
                and all(Path(r["validation"]["data"]).resolve().is_relative_to(workspace) for r in runs)):
            kept[name] = runs
    return kept


def selection_ap(workspace: Path) -> dict[str, float]:
    """Per label, the AP on the validation split of the prediction Eq. 6 picks for each image: the
    covering teacher of least entropy impurity (Eq. 5, the engine's own functions). That is the soft
    target a stage-1 component net imitates, so a component can beat its best source only by
    generalising past this target. Multi-label teachers (as in the demo)."""
    from kamal_engine.data import read_labelled_csv
    from kamal_engine.evaluation import predict_all
    from kamal_engine.methods.adaptive_ka import entropy_impurity, select_teacher
    from kamal_engine.metrics import per_label_ap

    recipe = load_recipe(workspace / "recipes" / "adaptive-ka.toml")
    validation = read_labelled_csv(recipe.validation)
    covering: dict[str, list[torch.Tensor]] = {}
    for entry in recipe.teachers:
        teacher = entry.load()
        teacher.model.eval()

        def logits(images, teacher=teacher):
            with torch.no_grad():
                return teacher.model(teacher.preprocessing(images))

        scores = torch.from_numpy(predict_all(logits, validation, teacher.preprocessing.input_size))
        for label in entry.select or teacher.labels:
            covering.setdefault(label, []).append(scores[:, teacher.labels.index(label)])
    result = {}
    for label, columns in covering.items():
        stacked = torch.stack(columns, 1)  # (N, teachers covering the label)
        impurity = torch.stack([entropy_impurity(c.unsqueeze(1), "multilabel") for c in columns], 1)
        chosen = stacked.gather(1, select_teacher(impurity).unsqueeze(1)).numpy()
        targets = validation.targets[:, [validation.labels.index(label)]]
        result[label] = per_label_ap(chosen, targets, [label])[label]
    return result


def fmt(x):
    return "" if x is None else f"{100 * x:.1f}"


def mean(values) -> float:
    return statistics.fmean(values)


def fmt_runs(values) -> str:
    """Mean AP in %, with ± one standard deviation when there are several runs."""
    values = list(values)
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(mean(values))} ± {100 * statistics.stdev(values):.1f}"


def tables(results: dict, selected: dict[str, float]) -> str:
    """``results``: variant → the list of its runs' reports (one per seed); ``selected``: the AP of
    the Eq. 6 selection per label (:func:`selection_ap`)."""
    runs = results["two-stage"]
    main = runs[0]
    labels = main["labels"]
    teachers = main["validation"]["teachers"]
    sources = {t["name"]: t["teachers"] for t in main["tasks"]}
    best = {label: max(teachers[n]["ap"][label] for n in sources[label]) for label in labels}
    components = {label: [r["components"][label]["validation"]["ap"][label] for r in runs] for label in labels}
    targets = {label: [r["validation"]["student"]["ap"][label] for r in runs] for label in labels}
    component = {label: mean(v) for label, v in components.items()}
    target = {label: mean(v) for label, v in targets.items()}
    seeds = f"mean of {len(runs)} seeds ± one standard deviation, " if len(runs) > 1 else ""
    lines = [f"#### Source teachers → component nets → target net (AP in %, {seeds}validation split; the paper's "
             "Table 3)", "", "| label | source teachers | selected teacher (Eq. 6) | component net | target net |",
             "|---|---|---|---|---|"]
    for label in labels:
        srcs = ", ".join(f"{n} {fmt(teachers[n]['ap'][label])}" for n in sources[label])
        lines.append(f"| {label} | {srcs} | {fmt(selected[label])} | {fmt_runs(components[label])} "
                     f"({100 * (component[label] - best[label]):+.1f}) | {fmt_runs(targets[label])} "
                     f"({100 * (target[label] - component[label]):+.1f}) |")
    best_map = sum(best.values()) / len(labels)
    lines.append(f"| mAP | best source per label {fmt(best_map)} | {fmt(mean(selected[x] for x in labels))} | "
                 f"{fmt(mean(component.values()))} | "
                 f"**{fmt_runs(r['validation']['student']['mean_ap'] for r in runs)}** |")
    lines += ["", "Selected teacher (Eq. 6): the AP of the prediction of the least ambiguous covering teacher of each "
              "image, the soft target a component imitates. In brackets: component − best source teacher; target − "
              "component. How often each teacher was "
              "selected (share of images, last epoch" + (", first seed" if any(
                  r["components"][label]["selection_share"] != main["components"][label]["selection_share"]
                  for r in runs for label in labels) else "") + "): "
              + "; ".join(f"{label}: " + ", ".join(f"{n} {100 * v:.0f} %" for n, v in
                                                   main["components"][label]["selection_share"].items())
                          for label in labels) + "."]
    size = main["size"]
    used = list(teachers)
    comp_params = sum(_params(Path(main["components"][label]["file"])) for label in labels)
    lines += ["", "| model | parameters |", "|---|---|",
              f"| {len(used)} source teachers | {sum(size['teachers'][n]['parameters'] for n in used):,} |",
              f"| {len(labels)} component nets | {comp_params:,} |",
              f"| target net | {size['student']['parameters']:,} |"]
    lines += ["", "#### Variants (target net, AP in %; the paper's Tables 8 and 9)", "",
              "| variant | " + " | ".join(labels) + " | mAP | seeds | CPU time per run |",
              "|---" * (len(labels) + 4) + "|",
              "| best source teacher | " + " | ".join(fmt(best[label]) for label in labels) + f" | {fmt(best_map)} | | |"]
    for name, rs in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt_runs(r["validation"]["student"]["ap"][label] for r in rs)
                                                for label in labels)
                     + f" | **{fmt_runs(r['validation']['student']['mean_ap'] for r in rs)}** | {len(rs)} | "
                     f"{mean(r['cpu_seconds'] for r in rs):.0f} s |")
    checks = [(f"component ≥ best source teacher on '{label}'", component[label] >= best[label]) for label in labels]
    checks += [(f"target ≥ component − 0.5 points on '{label}'", target[label] >= component[label] - 0.005)
               for label in labels]
    if "one-shot" in results:
        checks.append(("two-stage mAP ≥ one-shot mAP", mean(r["validation"]["student"]["mean_ap"] for r in runs)
                       >= mean(r["validation"]["student"]["mean_ap"] for r in results["one-shot"])))
    lines += ["", ("Checks (on the means): " if len(runs) > 1 else "Checks: ")
              + "; ".join(f"{text}: {'yes' if ok else '**no**'}" for text, ok in checks) + "."]
    return "\n".join(lines) + "\n"


def _params(path: Path) -> int:
    from kamal_engine.teacher import load_teacher

    return sum(p.numel() for p in load_teacher(path).model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="demo-workspace", help="demo workspace (built if missing)")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants to run")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each variant runs once per seed and "
                        "the tables show means (default: 0, one run)")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated whole numbers, not {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds names a seed twice: {args.seeds}")
    workspace = Path(args.workspace).resolve()
    out = Path(__file__).resolve().parent / "results"
    stem = "adaptive_ka_demo" if seeds == [0] else "adaptive_ka_demo_seeds"
    kept = {n: r for n, r in earlier_results(out / f"{stem}.json", workspace, seeds).items() if n not in names}
    if "two-stage" not in names and "two-stage" not in kept:
        parser.error(f"--only must include two-stage: benchmarks/results/{stem}.json has no two-stage run of this "
                     "workspace with these seeds, and the tables compare the other variants with it")
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    if not (workspace / "recipes" / "adaptive-ka.toml").is_file():
        demo.build_heterogeneous(workspace, demo.DemoConfig(), log=print)
    out.mkdir(exist_ok=True)
    if kept:
        print(f"Keeping {', '.join(kept)} from the earlier {stem}.json (same workspace and seeds).", flush=True)
    results = dict(kept)
    for seed in seeds:
        for name in names:
            print(f"== {name}, seed {seed}", flush=True)
            if seed == seeds[0]:
                results[name] = []
            results[name].append(run(recipe_for(workspace, name, VARIANTS[name], seed), seed))
            ordered = {n: results[n] for n in VARIANTS if n in results}
            (out / f"{stem}.json").write_text(json.dumps(ordered, indent=2) + "\n")
    results = {n: results[n] for n in VARIANTS if n in results}
    table = tables(results, selection_ap(workspace))
    (out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
