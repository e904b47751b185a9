"""adaptive-ka on the heterogeneous demo (README "Measured"; the paper's Tables 3, 4, 8 and 9).

    python benchmarks/adaptive_ka_demo.py [--workspace DIR] [--only two-stage,one-shot,...]

Four source teachers of three architectures (`kamal demo --heterogeneous`); four labels (zero,
three, five, eight), each covered by two of them. Runs `recipes/adaptive-ka.toml` with the
method's defaults as

* ``two-stage``: component nets, then the target net (the method);
* ``one-shot``: the teachers straight into the target net (Table 9);
* ``no-bridge``: two-stage without the transfer bridge (Table 8, "wo/TB");
* ``no-selection``: two-stage learning from every covering teacher equally (Table 8, "wo/TS").

Prints and writes ``benchmarks/results/adaptive_ka_demo.json`` and ``.md``: AP per label of each
source teacher, component net and target net; parameters; the variants side by side; the checks the
issue asks for (component ≥ best source teacher, target ≥ component − 0.5 points, two-stage ≥
one-shot). CPU, 2 threads' worth of time is stated per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


def recipe_for(workspace: Path, name: str, extra: str) -> Path:
    text = (workspace / "recipes" / "adaptive-ka.toml").read_text()
    text = text.replace('id = "adaptive-ka"', f'id = "adaptive-ka"\n{extra}').replace('device = "auto"', 'device = "cpu"')
    text = text.replace("../runs/adaptive-ka", f"../runs/bench-adaptive-{name}")
    path = workspace / "recipes" / f"bench-adaptive-{name}.toml"
    path.write_text(text)
    return path


def run(path: Path) -> dict:
    started, wall = time.process_time(), time.monotonic()
    result = run_recipe(load_recipe(path), restart=True)
    return {**result.report, "cpu_seconds": round(time.process_time() - started, 1),
            "wall_seconds": round(time.monotonic() - wall, 1)}


def fmt(x):
    return "" if x is None else f"{100 * x:.1f}"


def tables(results: dict) -> str:
    main = results["two-stage"]
    labels = main["labels"]
    teachers = main["validation"]["teachers"]
    sources = {t["name"]: t["teachers"] for t in main["tasks"]}
    best = {label: max(teachers[n]["ap"][label] for n in sources[label]) for label in labels}
    component = {label: main["components"][label]["validation"]["ap"][label] for label in labels}
    target = main["validation"]["student"]["ap"]
    lines = ["#### Source teachers → component nets → target net (AP in %, validation split; the paper's Table 3)", "",
             "| label | source teachers | component net | target net |", "|---|---|---|---|"]
    for label in labels:
        srcs = ", ".join(f"{n} {fmt(teachers[n]['ap'][label])}" for n in sources[label])
        lines.append(f"| {label} | {srcs} | {fmt(component[label])} ({100 * (component[label] - best[label]):+.1f}) "
                     f"| {fmt(target[label])} ({100 * (target[label] - component[label]):+.1f}) |")
    best_map = sum(best.values()) / len(labels)
    lines.append(f"| mAP | best source per label {fmt(best_map)} | {fmt(sum(component.values()) / len(labels))} | "
                 f"**{fmt(main['validation']['student']['mean_ap'])}** |")
    lines += ["", "In brackets: component − best source teacher; target − component. How often each teacher was "
              "selected (share of images, last epoch): "
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
    lines += ["", "#### Variants (AP in %; the paper's Tables 8 and 9)", "",
              "| variant | " + " | ".join(labels) + " | mAP | CPU time |", "|---" * (len(labels) + 3) + "|",
              "| best source teacher | " + " | ".join(fmt(best[label]) for label in labels) + f" | {fmt(best_map)} | |"]
    for name, r in results.items():
        ap = r["validation"]["student"]["ap"]
        lines.append(f"| {name} | " + " | ".join(fmt(ap[label]) for label in labels)
                     + f" | **{fmt(r['validation']['student']['mean_ap'])}** | {r['cpu_seconds']:.0f} s |")
    checks = [(f"component ≥ best source teacher on '{label}'", component[label] >= best[label]) for label in labels]
    checks += [(f"target ≥ component − 0.5 points on '{label}'", target[label] >= component[label] - 0.005)
               for label in labels]
    if "one-shot" in results:
        checks.append(("two-stage mAP ≥ one-shot mAP", main["validation"]["student"]["mean_ap"]
                       >= results["one-shot"]["validation"]["student"]["mean_ap"]))
    lines += ["", "Checks: " + "; ".join(f"{text}: {'yes' if ok else '**no**'}" for text, ok in checks) + "."]
    return "\n".join(lines) + "\n"


def _params(path: Path) -> int:
    from kamal_engine.teacher import load_teacher

    return sum(p.numel() for p in load_teacher(path).model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="demo-workspace", help="demo workspace (built if missing)")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants to run")
    args = parser.parse_args()
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    if not (workspace / "recipes" / "adaptive-ka.toml").is_file():
        demo.build_heterogeneous(workspace, demo.DemoConfig(), log=print)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    results = {}
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        results[name] = run(recipe_for(workspace, name, VARIANTS[name]))
        (out / "adaptive_ka_demo.json").write_text(json.dumps(results, indent=2) + "\n")
    table = tables(results)
    (out / "adaptive_ka_demo.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
