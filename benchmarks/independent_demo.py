"""filtered-ka on teachers trained apart (`kamal demo --independent`; README "Measured").

    python benchmarks/independent_demo.py [--workspace DIR] [--only NAME,...] [--set key=value ...] [--student key=value ...]

Three torchvision teachers trained from scratch, each on its own third of the teacher-train split
with its own labels and seed (ResNet-18 'zero'-'three', ResNet-18 'four'-'six', ResNet-34
'seven'-'nine'), saved as bare ``state_dict`` + labels file; the student is a ResNet-18 started from
teacher 1; 3000 unlabeled mosaics; CPU. Variants (rows of the table), each a ``[method]`` overlay of
``recipes/filtered-ka-independent.toml``:

* ``defaults``: filtered-ka with the engine's defaults;
* ``paper``: the paper's own form: SE gates (Eq. 4), a fixed 3 epochs per block, Eq. 7 alone, no
  augmentation, Eq. 9 + 10 with no size cap;
* one row per ingredient added to or removed from the defaults (see ``VARIANTS``), so the gain of
  each is visible;
* ``kd``: the plain distillation baseline (one ResNet-18 with every label).

Per variant: AP per label, mAP, mAP over the labels of teacher 1 (the student's start) and of the
other two, the worst label's gap to its teacher, the TargetNet's parameters against the teachers'
sum, branch points, each teacher's knowledge share and filter per block, CPU and wall time.
Writes ``benchmarks/results/independent_demo.json`` and ``.md``; ``--only`` adds to the file
(variants it does not run are kept). ``--set key=value`` (repeatable) overrides a parameter of every
variant run, for exploration; results with ``--set`` go to ``independent_demo_explore.*``; so do those with ``--student key=value``, which
overrides a key of the recipe's ``[student]`` table (``init = random``, ``teacher = 2``).
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

PAPER = {"filter": "se", "max_rounds_per_block": 1, "feature_weight": 0.0, "augment": "none", "max_params": 0.0}
VARIANTS: dict[str, tuple[str, dict]] = {
    "defaults": ("filtered-ka", {}),
    "paper": ("filtered-ka", PAPER),
    "paper+adapter": ("filtered-ka", {**PAPER, "filter": "adapter", "adapter_init": "identity"}),
    "paper+adapter-lsq": ("filtered-ka", {**PAPER, "filter": "adapter", "adapter_init": "least-squares"}),
    "kd": ("kd", {}),
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def recipe_for(workspace: Path, name: str, method: str, params: dict, student: dict | None = None) -> Path:
    text = (workspace / "recipes" / "filtered-ka-independent.toml").read_text()
    for key, value in (student or {}).items():  # [student] is the only table with these keys
        text, found = re.subn(rf"^{key} = .*$", f"{key} = {toml_value(value)}", text, count=1, flags=re.M)
        if not found:
            text = text.replace("[student]\n", f"[student]\n{key} = {toml_value(value)}\n", 1)
    lines = "".join(f"\n{k} = {toml_value(v)}" for k, v in params.items())
    text = text.replace('id = "filtered-ka"', f'id = "{method}"{lines}').replace('device = "auto"', 'device = "cpu"')
    text = text.replace('output_dir = "../runs/filtered-ka-independent"', f'output_dir = "../runs/bench-ind-{name}"')
    text = text.replace('onnx = "../runs/filtered-ka-independent/student.onnx"', f'onnx = "../runs/bench-ind-{name}/student.onnx"')
    text = text.replace('name = "demo-filtered-ka-independent"', f'name = "bench-ind-{name}"')
    path = workspace / "recipes" / f"bench-ind-{name}.toml"
    path.write_text(text)
    return path


def run(path: Path) -> dict:
    cpu, wall = time.process_time(), time.monotonic()
    report = run_recipe(load_recipe(path), restart=True, replace=True).report
    return {**report, "cpu_seconds": round(time.process_time() - cpu, 1), "wall_seconds": round(time.monotonic() - wall, 1)}


def summary(report: dict) -> dict:
    """The figures of the table, from one run's report."""
    teachers = report["validation"]["teachers"]
    teacher_ap = {label: ap for t in teachers.values() for label, ap in t["ap"].items()}
    student_ap = report["validation"]["student"]["ap"]
    first = next(iter(teachers))
    own = list(teachers[first]["ap"])
    others = [label for label in report["labels"] if label not in own]

    def mean(labels, ap):
        return sum(ap[label] for label in labels) / len(labels)

    return {
        "teachers_map": mean(report["labels"], teacher_ap), "map": report["validation"]["student"]["mean_ap"],
        "start_teacher_labels": {"teachers": mean(own, teacher_ap), "student": mean(own, student_ap)},
        "other_labels": {"teachers": mean(others, teacher_ap), "student": mean(others, student_ap)},
        "worst_gap": min((student_ap[label] - teacher_ap[label], label) for label in report["labels"]),
        "size_ratio": report["size"]["student_vs_teachers_parameters"],
    }


def fmt(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def table(results: dict) -> str:
    any_report = next(iter(results.values()))
    labels = any_report["labels"]
    teacher_ap = {label: ap for t in any_report["validation"]["teachers"].values() for label, ap in t["ap"].items()}
    s0 = summary(any_report)
    lines = ["| model | " + " | ".join(labels) + " | mAP | teacher 1's labels | other labels | worst label vs "
             "its teacher | parameters vs the teachers' | CPU time |", "|---" * (len(labels) + 7) + "|"]
    lines.append("| teachers | " + " | ".join(fmt(teacher_ap[label]) for label in labels)
                 + f" | {fmt(s0['teachers_map'])} | {fmt(s0['start_teacher_labels']['teachers'])} | "
                   f"{fmt(s0['other_labels']['teachers'])} | | 1.00 | |")
    for name, report in results.items():
        s = summary(report)
        ap = report["validation"]["student"]["ap"]
        gap, label = s["worst_gap"]
        lines.append(f"| {name} | " + " | ".join(fmt(ap[x]) for x in labels)
                     + f" | **{fmt(s['map'])}** | {fmt(s['start_teacher_labels']['student'])} | "
                       f"{fmt(s['other_labels']['student'])} | {100 * gap:+.1f} ({label}) | {s['size_ratio']:.2f} | "
                       f"{report['cpu_seconds']:.0f} s |")
    lines.append("")
    for name, report in results.items():
        if "diagnosis" not in report:
            continue
        branch = ", ".join(f"{k} → {v}" for k, v in report["branch_points"].items())
        lines.append(f"**{name}**: branch points {branch} (rule: {report['branch_plan']['rule']}); knowledge "
                     "reproduced per block (filter, linear CKA before):")
        for block in report["diagnosis"]["blocks"]:
            cells = "; ".join(f"{t} {d['share']:.0%} ({d['filter']}, {d['related_before']:.2f})"
                              for t, d in block["teachers"].items())
            lines.append(f"  {block['block']} ({block['rounds']} round{'s' if block['rounds'] > 1 else ''}): {cells}")
        for warning in report["diagnosis"]["warnings"]:
            lines.append(f"  warning: {warning}")
        lines.append("")
    return "\n".join(lines) + "\n"


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="demo-workspace", help="demo workspace (built if missing)")
    parser.add_argument("--only", help=f"comma-separated variants to run (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a filtered-ka parameter in every variant run (exploration)")
    parser.add_argument("--student", action="append", default=[], metavar="KEY=VALUE",
                        help="override a [student] key of the recipe (init = teacher|random, teacher = N; exploration)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; the variants are {', '.join(VARIANTS)}")
    overrides, student = {}, {}
    for flag, items, into in (("--set", args.set, overrides), ("--student", args.student, student)):
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"{flag} {item!r}: write KEY=VALUE")
            into[key] = parse_value(value)
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    manifest = json.loads((workspace / demo.MANIFEST).read_text())
    if "independent" not in manifest or not all(p.is_file() for p in demo.independent_paths(workspace)):
        demo.build_independent(workspace, demo.DemoConfig(), log=print)

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stem = "independent_demo_explore" if overrides or student else "independent_demo"
    results_path = out / f"{stem}.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results = saved.get("variants", {}) if saved.get("workspace") == str(workspace) else {}
    for name in names:
        method, params = VARIANTS[name]
        params = {**params, **(overrides if method == "filtered-ka" else {})}
        tag = name + "".join(f"-{k}={v}" for k, v in {**overrides, **{f"student.{k}": v for k, v in student.items()}}.items())
        print(f"== {tag}: {method} {params} student {student}", flush=True)
        recipe = recipe_for(workspace, tag.replace("=", "_"), method, params, student)
        results[tag] = {**run(recipe), "overlay": params, "student_overlay": student}
        saved = json.loads(results_path.read_text()) if results_path.exists() else {}  # another run may have added
        if saved.get("workspace") == str(workspace):
            results = {**saved["variants"], **results}
        results_path.write_text(json.dumps({"workspace": str(workspace), "variants": results}, indent=2) + "\n")
        print(table({tag: results[tag]}), flush=True)
    text = table(results)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
