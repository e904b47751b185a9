"""Where a filtered-ka run's time goes on the demo, and what the speed-ups give (README "Measured").

    python benchmarks/run_speed_demo.py [--workspace DIR] [--repeat N] [--against DIR] [--only 1,2,4]

Runs the demo's filtered-ka recipe (all 10 labels, CPU) with the defaults (``precision = "auto"``: bf16
autocast on a CPU with native bf16), with ``[run] precision = "fp32"`` and with ``cache_mb = 0`` (no prefix
cache), ``--repeat`` times each, alternating, each run in a fresh process, and prints the wall times
(min / median / max), the branch points and the student mAP of each, and the profile of the fastest
default run.
``--against DIR``: also run the same recipe with the engine of another checkout (e.g. a git worktree of
an earlier commit) in a subprocess, as "before". Writes ``benchmarks/results/run_speed_demo.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from filtered_ka_demo import recipe_for  # noqa: E402

from kamal_engine import demo  # noqa: E402

RUN = ("import json, sys, time; from kamal_engine.recipe import load_recipe; from kamal_engine.runner import "
       "run_recipe; t = time.monotonic(); r = run_recipe(load_recipe(sys.argv[1]), restart=True, replace=True)"
       ".report; print(json.dumps({'wall': time.monotonic() - t, 'branch_points': r['branch_points'], "
       "'mean_ap': r['validation']['student']['mean_ap'], 'profile': r.get('profile')}))")


def run(path: Path, engine: Path) -> dict:
    """One run in a fresh process importing the engine from ``engine`` (so runs do not share warm caches)."""
    out = subprocess.run([sys.executable, "-c", RUN, str(path)], cwd=engine, capture_output=True, text=True,
                         env={"PYTHONPATH": str(engine), "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def precision_recipe(path: Path, precision: str) -> Path:
    """``path`` with ``[run] precision = precision``."""
    text = path.read_text()
    assert 'precision = "auto"' in text
    path.write_text(text.replace('precision = "auto"', f'precision = "{precision}"', 1))
    return path


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="demo-workspace")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--against", help="another checkout whose engine runs as 'before'")
    parser.add_argument("--only", help="variants to run by number: 1 defaults, 2 precision = fp32, "
                        "3 no cache, 4 before (e.g. 1,2,4)")
    args = parser.parse_args()
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    here = Path(__file__).resolve().parents[1]
    variants = {"defaults": (recipe_for(workspace, "speed-cache", "filtered-ka", None), here),
                "precision = fp32": (precision_recipe(recipe_for(workspace, "speed-fp32", "filtered-ka", None),
                                                      "fp32"), here),
                "no cache (cache_mb = 0)": (recipe_for(workspace, "speed-nocache", "filtered-ka", None,
                                                       params={"cache_mb": 0}), here)}
    if args.against:
        variants["before (--against)"] = (recipe_for(workspace, "speed-before", "filtered-ka", None),
                                          Path(args.against).resolve())
    if args.only:
        variants = {k: v for i, (k, v) in enumerate(variants.items()) if str(i + 1) in args.only.split(",")}
    results = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, (path, engine) in variants.items():
            started = time.monotonic()
            results[name].append(run(path, engine))
            print(f"{name}: {results[name][-1]['wall']:.1f} s (process {time.monotonic() - started:.1f} s), "
                  f"mAP {results[name][-1]['mean_ap']:.4f}", flush=True)
    lines = ["Made by `python benchmarks/run_speed_demo.py` (filtered-ka defaults, all 10 labels, CPU).", "",
             "| variant | wall (min / median / max) | student mAP | branch points |", "|---|---|---|---|"]
    for name, runs in results.items():
        points = sorted({", ".join(f"{k} {v}" for k, v in r["branch_points"].items()) for r in runs})
        lines.append(f"| {name} | {spread([r['wall'] for r in runs])} | {runs[0]['mean_ap'] * 100:.2f} | "
                     f"{'; '.join(points)[:80]} |")
    best = min(results["defaults"], key=lambda r: r["wall"])
    lines += ["", "Profile of the fastest default run (seconds, share of the run):", "",
              "| part | seconds | share | images/s |", "|---|---|---|---|"]
    for name, part in best["profile"]["parts"].items():
        lines.append(f"| {name} | {part['seconds']:.2f} | {part['share']:.1%} | {part.get('images_per_second', '')} |")
    out = Path(__file__).parent / "results" / "run_speed_demo"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
