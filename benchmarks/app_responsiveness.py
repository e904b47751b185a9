"""The app while it trains: UI event-loop stalls and throughput vs `kamal run` (README "Measured").

    python benchmarks/app_responsiveness.py [--workspace DIR] [--epochs-per-block N] [--repeats R]

Both measurements are repeated ``R`` times (default 3), alternating, because a 2-core machine's
throughput varies by several per cent from run to run; the table gives the medians and the range.

1. ``kamal run`` on a copy of the demo's filtered-KA recipe (CPU, ``N`` epochs per block, one
   fine-tuning epoch, no ONNX export), as a subprocess; its throughput is the images/s of its last
   progress line (the engine's running average over the whole training).
2. The same recipe started from the app's Start button (``kamal-studio``'s main window, offscreen
   Qt platform unless ``QT_QPA_PLATFORM`` says otherwise), training in the engine process its
   worker thread supervises, while the GUI thread redraws the live plots from its 20 Hz timer. A 10 ms heartbeat timer in the GUI thread records
   the longest gap between its ticks: the longest stall of the UI event loop. The app's throughput
   is the same engine figure, read from its last step event.

Writes ``benchmarks/results/app_responsiveness.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kamal_engine import demo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def write_recipe(workspace: Path, epochs: int) -> Path:
    text = (workspace / "recipes" / "filtered-ka.toml").read_text()
    text = text.replace('device = "auto"', 'device = "cpu"')
    text = text.replace('output_dir = "../runs/filtered-ka"', 'output_dir = "../runs/bench-app"')
    text = text.replace('id = "filtered-ka"', f'id = "filtered-ka"\nepochs_per_block = {epochs}\nfinetune_epochs = 1')
    text = re.sub(r"\[export\][^\[]*", "", text)  # no ONNX export: the training is what is compared
    path = workspace / "recipes" / "bench-app.toml"
    path.write_text(text)
    return path


def cli_run(recipe: Path) -> dict:
    kamal = Path(sys.executable).with_name("kamal")
    started = time.monotonic()
    proc = subprocess.run([str(kamal), "run", str(recipe), "--replace"], capture_output=True, text=True, check=True)
    rates = re.findall(r"([0-9.]+) img/s", proc.stderr)
    return {"images_per_second": float(rates[-1]), "wall_seconds": round(time.monotonic() - started, 1)}


def app_run(recipe: Path) -> dict:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    from kamal_app.main_window import MainWindow

    app = QApplication.instance() or QApplication([])
    settings = QSettings(str(RESULTS / ".bench-app-settings.ini"), QSettings.Format.IniFormat)
    window = MainWindow(settings)
    window.resize(1280, 860)
    window.show()
    assert window.open_recipe(recipe), "the recipe did not open"
    page = window.train_page
    out: dict = {}
    started = time.monotonic()

    def finished(result):
        out["images_per_second"] = page.monitor.images_per_second
        out["wall_seconds"] = round(time.monotonic() - started, 1)

    page.run_finished.connect(finished)
    page.run_stopped.connect(app.quit)
    window.ask_run_folder = lambda info: "replace"  # an earlier benchmark run there: answered "Replace it"
    QTimer.singleShot(0, window.start_run)
    app.exec()
    out["longest_stall_ms"] = round(page.heartbeat.max_gap_ms, 1)
    out["heartbeat_ticks"] = page.heartbeat.ticks
    out["platform"] = app.platformName()
    window.close()
    return out


def main() -> None:
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="demo-workspace", help="demo workspace (built if missing)")
    parser.add_argument("--epochs-per-block", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (the medians are reported)")
    args = parser.parse_args()
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    recipe = write_recipe(workspace, args.epochs_per_block)
    clis, guis = [], []
    for i in range(args.repeats):
        print(f"[{i + 1}/{args.repeats}] kamal run …", flush=True)
        clis.append(cli_run(recipe))
        print(f"  {clis[-1]}", flush=True)
        print(f"[{i + 1}/{args.repeats}] the app …", flush=True)
        guis.append(app_run(recipe))
        print(f"  {guis[-1]}", flush=True)
    cli_rate = statistics.median(c["images_per_second"] for c in clis)
    gui_rate = statistics.median(g["images_per_second"] for g in guis)
    stalls = [g["longest_stall_ms"] for g in guis]
    ratios = [g["images_per_second"] / c["images_per_second"] for c, g in zip(clis, guis)]
    results = {"recipe": str(recipe), "epochs_per_block": args.epochs_per_block, "repeats": args.repeats,
               "cores": os.cpu_count(), "kamal_run": clis, "app": guis,
               "median_images_per_second": {"kamal_run": cli_rate, "app": round(gui_rate, 1)},
               "app_vs_cli_throughput": round(gui_rate / cli_rate, 3),
               "app_vs_cli_per_pair": [round(r, 3) for r in ratios],
               "longest_stall_ms": {"median": statistics.median(stalls), "max": max(stalls)}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "app_responsiveness.json").write_text(json.dumps(results, indent=2) + "\n")

    def span(values, fmt):
        return f"{fmt.format(min(values))}-{fmt.format(max(values))}"

    lines = [f"{args.repeats} runs of each, alternating, {os.cpu_count()} cores, Qt platform {guis[0]['platform']}; "
             "median (range):", "",
             "| measure | result |", "|---|---|",
             "| longest UI event-loop stall during training (10 ms heartbeat) | "
             f"{statistics.median(stalls):.0f} ms ({span(stalls, '{:.0f}')} ms) |",
             f"| training throughput, `kamal run` | {cli_rate:.0f} img/s "
             f"({span([c['images_per_second'] for c in clis], '{:.0f}')}) |",
             f"| training throughput, in the app | {gui_rate:.0f} img/s "
             f"({span([g['images_per_second'] for g in guis], '{:.0f}')}) |",
             f"| app / `kamal run` | {results['app_vs_cli_throughput']:.3f} (pairs {span(ratios, '{:.2f}')}) |"]
    (RESULTS / "app_responsiveness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
