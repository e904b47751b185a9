"""Time `kamal demo` from nothing and record the teachers' validation AP (README "Measured").

    python benchmarks/demo_build.py            # writes benchmarks/results/demo_build.json

Builds the full demo workspace in a temporary folder on the CPU, the way `./bootstrap demo` does
on a fresh machine, and reports the wall time and each teacher's per-label AP and mAP.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kamal_engine.demo import DemoConfig, build_demo  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        manifest = build_demo(Path(tmp) / "demo", DemoConfig(), device="cpu", log=print)
        seconds = time.monotonic() - started
    result = {
        "what": "kamal demo, full workspace, CPU",
        "wall_seconds": round(seconds, 1),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "teachers": {t["name"]: {"mean_ap": round(t["validation"]["mean_ap"], 4),
                                 "ap": {k: round(v, 4) for k, v in t["validation"]["ap"].items()}}
                     for t in manifest["teachers"]},
    }
    out = Path(__file__).resolve().parent / "results" / "demo_build.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
