"""Same seed, same CPU, same results: tiny runs of every method here and at an earlier commit.

    python benchmarks/same_results.py --against REV [--work DIR] [--only NAME,...]

A refactor of the engine must not change what a run computes. This builds a quick demo workspace
(with the heterogeneous teachers) once, writes a tiny recipe per method and variant (the paper's
forms: dual-GAN and DAFL losses, adaptive-ka's two stages and one shot; and the options that take
other code paths: the adapter filter, augmentation, feature loss, unit blocks, 4 generator
groups, DAFL's noise baseline), runs each on the CPU with this checkout's
engine and with the engine of ``REV`` (a ``git worktree`` in ``DIR``, on the same teachers and
data), and compares the student's weights (every tensor, bit for bit) and ``metrics.csv`` (every
evaluation figure). Prints one row per run and exits 1 when any differs.

Bit-identity holds for CPU runs with the same seed and the same torch build; the timing columns
of ``report.json`` are not compared, and neither is the report's layout (it may gain fields).
About 10 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]

BLOCKWISE = {"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32}
FKA = {**BLOCKWISE, "max_rounds_per_block": 1, "diagnose_images": 64}
DUAL = {"generator_epochs": 1, "epochs_per_block": 1, "finetune_epochs": 1, "iterations": 4, "batch_size": 16,
        "eval_batches": 2, "preview_every": 2}
DAFL = {"epochs": 2, "iterations": 4, "batch_size": 32, "preview_every": 2}
AKA = {"component_epochs": 1, "target_epochs": 1, "batch_size": 32}

# name → (the workspace recipe it starts from, method id, hyper-parameters)
RUNS = {
    "filtered-ka": ("filtered-ka", "filtered-ka", FKA),
    "filtered-ka-adapter": ("filtered-ka", "filtered-ka", {**FKA, "filter": "adapter", "adapter_init": "identity"}),
    "filtered-ka-augment": ("filtered-ka", "filtered-ka", {**FKA, "augment": "shift+flip"}),
    "filtered-ka-features": ("filtered-ka", "filtered-ka", {**FKA, "feature_weight": 0.5, "granularity": "unit"}),
    "kd": ("filtered-ka", "kd", {"epochs": 1, "batch_size": 32}),
    "dual-gan": ("dual-gan", "dual-gan", DUAL),
    "dual-gan-4-groups": ("dual-gan", "dual-gan", {**DUAL, "groups": 4, "discrete_on": "probabilities"}),
    "dafl": ("dual-gan", "dafl", DAFL),
    "dafl-noise": ("dual-gan", "dafl", {**DAFL, "source": "noise"}),
    "adaptive-ka": ("adaptive-ka", "adaptive-ka", AKA),
    "adaptive-ka-one-shot": ("adaptive-ka", "adaptive-ka", {**AKA, "variant": "one-shot"}),
}

RUN_ONE = """
import sys
from pathlib import Path
import kamal_engine
assert Path(kamal_engine.__file__).resolve().is_relative_to(Path(sys.argv[2]).resolve()), kamal_engine.__file__
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe
run_recipe(load_recipe(Path(sys.argv[1])))
"""

DIGEST = """
import hashlib, sys
import torch
from kamal_engine.targetnet import load_student
student = load_student(sys.argv[1])
h = hashlib.sha256()
for name, tensor in sorted(student.net.state_dict().items()):
    h.update(name.encode())
    h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def absolute(entry: dict, key: str, folder: Path) -> None:
    if entry.get(key):
        entry[key] = str((folder / entry[key]).resolve())


def write_recipe(workspace: Path, name: str, out: Path) -> Path:
    """The tiny recipe of run ``name`` (absolute paths, no ONNX export) in ``workspace/same-results``."""
    source, method, params = RUNS[name]
    path = workspace / "recipes" / f"{source}.toml"
    data = tomllib.loads(path.read_text())
    for teacher in data["teachers"]:
        absolute(teacher, "checkpoint", path.parent)
        absolute(teacher, "labels_file", path.parent)
    for key in ("unlabeled", "validation"):
        absolute(data.get("data", {}), key, path.parent)
    data.setdefault("student", {})
    absolute(data["student"], "checkpoint", path.parent)
    data["run"] = {**data.get("run", {}), "name": name, "output_dir": str(out), "device": "cpu", "seed": 0}
    data["method"] = {"id": method, **params}
    data.pop("export", None)
    target = workspace / "same-results" / f"{name}.toml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(tomli_w.dumps(data))
    return target


def run(source: Path, args: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(source), "CUDA_VISIBLE_DEVICES": ""}
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-c", *args], cwd=source, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"same_results: a run failed, see {log}")


def digest(source: Path, run_dir: Path) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    weights = subprocess.run([sys.executable, "-c", DIGEST, str(run_dir / "student.kamal.pt")], cwd=source, env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    metrics = hashlib.sha256((run_dir / "metrics.csv").read_bytes()).hexdigest()
    return weights, metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the commit to compare with (e.g. the one before a refactor)")
    parser.add_argument("--work", type=Path, default=Path("same-results-work"),
                        help="folder for the workspace, the worktree and the runs (default ./same-results-work)")
    parser.add_argument("--only", help="comma-separated run names (default: all of " + ", ".join(RUNS) + ")")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}: choose from {', '.join(RUNS)}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"source-{args.against}"
    if not base.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.against], check=True)
    workspace = work / "workspace"
    if not (workspace / "demo.json").is_file():
        print("building the quick demo workspace (with the heterogeneous teachers) …", flush=True)
        subprocess.run([sys.executable, "-m", "kamal_engine.cli", "demo", "--quick", "--heterogeneous", str(workspace)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, stdout=subprocess.DEVNULL)
    rows, differ = [], 0
    for name in names:
        results = {}
        for side, source in (("here", REPO), (args.against, base)):
            out = work / "runs" / side / name
            if not (out / "report.json").is_file():
                recipe = write_recipe(workspace, name, out)
                run(source, [RUN_ONE, str(recipe), str(source)], work / "runs" / f"{side}-{name}.log")
            results[side] = digest(REPO, out)
        same_weights = results["here"][0] == results[args.against][0]
        same_metrics = results["here"][1] == results[args.against][1]
        differ += not (same_weights and same_metrics)
        rows.append(f"| {name} | {'identical' if same_weights else 'DIFFER'} | {'identical' if same_metrics else 'DIFFER'} "
                    f"| {results['here'][0][:12]} |")
        print(rows[-1], flush=True)
    print(f"\n| run | student weights vs {args.against} | metrics.csv | weights sha256 |\n|---|---|---|---|")
    print("\n".join(rows))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
