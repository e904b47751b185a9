"""The demo student through ONNX: export check, mAP in both runtimes, a second runtime, latency (README "Measured").

    python benchmarks/onnx_demo.py [--workspace DIR] [--student STUDENT.kamal.pt]

1. Exports the demo's filtered-KA student (all 10 labels; trained with the demo recipe's defaults
   if ``--student`` is not given and the workspace has no such run yet) to ONNX, fp32 and fp16.
2. max |ONNX Runtime - PyTorch| on the export check batch; validation mAP through PyTorch and
   through ONNX Runtime; the same ``.onnx`` in a second runtime (``onnx.reference``) vs ONNX Runtime.
3. Latency of PyTorch eager vs ONNX Runtime (CPU provider) at batch 1 and 16, measured in one
   process, interleaved (rounds alternate between the runtimes), each with its default threads;
   the input is the preprocessed float32 batch (preprocessing is the same code for both).

Writes ``benchmarks/results/onnx_demo.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kamal_engine import demo  # noqa: E402
from kamal_engine.data import load_images, read_labelled  # noqa: E402
from kamal_engine.onnx.export import export_onnx  # noqa: E402
from kamal_engine.recipe import load_recipe  # noqa: E402
from kamal_engine.evaluation import evaluate_student  # noqa: E402
from kamal_engine.runner import run_recipe  # noqa: E402
from kamal_engine.onnx.runtime import compare_latency, latency_runners, load_onnx  # noqa: E402
from kamal_engine.targetnet import load_student  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def demo_student(workspace: Path) -> Path:
    """The demo recipe's filtered-KA student (all labels, default settings), trained on the CPU if missing."""
    for name in ("bench-all-filtered-ka", "bench-onnx"):
        path = workspace / "runs" / name / "student.kamal.pt"
        if path.is_file():
            return path
    text = (workspace / "recipes" / "filtered-ka.toml").read_text()
    text = text.replace('device = "auto"', 'device = "cpu"').replace('"../runs/filtered-ka"', '"../runs/bench-onnx"')
    text = text.replace('onnx = "../runs/filtered-ka/student.onnx"', 'onnx = "../runs/bench-onnx/student.onnx"')
    recipe = workspace / "recipes" / "bench-onnx.toml"
    recipe.write_text(text)
    print("Training the demo student (filtered-ka, all labels, CPU) …", flush=True)
    return run_recipe(load_recipe(recipe), restart=True, replace=True).output_dir / "student.kamal.pt"


def summary(timing: dict, batch: int) -> dict:
    return {"median_ms": round(timing["median_ms"], 3), "p90_ms": round(timing["p90_ms"], 3),
            "images_per_second": round(1000 * batch / timing["median_ms"], 1), "calls": timing["calls"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="demo-workspace", help="demo workspace (built if missing)")
    parser.add_argument("--student", help="student bundle to use (default: the demo's filtered-KA student)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    workspace = Path(args.workspace).resolve()
    if not demo.is_complete(workspace):
        demo.build_demo(workspace, demo.DemoConfig(), log=print)
    student_path = Path(args.student) if args.student else demo_student(workspace)
    student = load_student(student_path)
    out_dir = workspace / "runs" / "onnx-bench"
    results: dict = {"student": str(student_path), "labels": student.labels,
                     "machine": {"cpu_threads_torch": torch.get_num_threads(), "python": platform.python_version(),
                                 "torch": torch.__version__}}
    import onnxruntime as ort

    results["machine"]["onnxruntime"] = ort.__version__

    exports = {}
    for name, fp16 in (("fp32", False), ("fp16", True)):
        result = export_onnx(student, out_dir / f"student-{name}.onnx", fp16=fp16)
        exports[name] = result
        results[f"export_{name}"] = result.to_dict()
        print(f"export {name}: {result.size_bytes / 1e6:.2f} MB, max |ORT - torch| {result.max_abs_diff}", flush=True)

    # validation mAP in both runtimes
    validation = read_labelled(workspace / "data" / "validation" / "labels.csv")
    onnx_student = load_onnx(exports["fp32"].path, "cpu")
    torch_eval = evaluate_student(student, validation, "cpu")
    ort_eval = evaluate_student(onnx_student, validation)
    half_eval = evaluate_student(load_onnx(exports["fp16"].path, "cpu"), validation)
    results["validation_map"] = {"pytorch": torch_eval.mean_ap, "onnxruntime": ort_eval.mean_ap,
                                 "onnxruntime_fp16": half_eval.mean_ap,
                                 "difference": abs(torch_eval.mean_ap - ort_eval.mean_ap)}
    print(f"validation mAP: PyTorch {torch_eval.mean_ap:.4f}, ONNX Runtime {ort_eval.mean_ap:.4f}, "
          f"fp16 {half_eval.mean_ap:.4f}", flush=True)

    # a second runtime: the ONNX reference evaluator
    from onnx.reference import ReferenceEvaluator

    x4 = student.preprocessing(load_images(validation.paths[:4], student.preprocessing.input_size)).numpy()
    reference = ReferenceEvaluator(str(exports["fp32"].path)).run(None, {"image": x4})
    ort_out = onnx_student.run(x4)
    with torch.no_grad():
        torch_logits = student.net(torch.from_numpy(x4)).numpy()
    results["second_runtime"] = {
        "runtime": "onnx.reference.ReferenceEvaluator", "images": 4,
        "max_abs_diff_vs_onnxruntime": {k: float(np.abs(a - b).max()) for k, a, b in
                                        zip(("logits", "probabilities"), reference, ort_out)},
        "max_abs_diff_logits_vs_pytorch": float(np.abs(reference[0] - torch_logits).max())}
    print(f"onnx.reference vs ONNX Runtime: {results['second_runtime']['max_abs_diff_vs_onnxruntime']}", flush=True)

    # latency, batch 1 and 16 (the same measurement as the app's Export & Test page)
    results["latency"] = {}
    for batch in (1, 16):
        per_round = 20 if batch == 1 else 5
        timings = compare_latency(latency_runners(student, onnx_student, batch), args.rounds, per_round)
        results["latency"][f"batch_{batch}"] = {name: summary(t, batch) for name, t in timings.items()}
        t, o = (results["latency"][f"batch_{batch}"][k]["median_ms"] for k in ("pytorch", "onnxruntime"))
        results["latency"][f"batch_{batch}"]["onnxruntime_vs_pytorch"] = round(o / t, 3)
        print(f"batch {batch}: PyTorch {t:.3f} ms, ONNX Runtime {o:.3f} ms (median)", flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_demo.json").write_text(json.dumps(results, indent=2) + "\n")
    lat = results["latency"]
    e32, e16 = results["export_fp32"], results["export_fp16"]
    lines = [
        "| check | result |", "|---|---|",
        f"| max \\|ORT − PyTorch\\|, fp32 (8 images) | logits {e32['max_abs_diff']['logits']:.1e}, "
        f"probabilities {e32['max_abs_diff']['probabilities']:.1e} (limit 1e-4) |",
        f"| validation mAP, PyTorch / ONNX Runtime | {torch_eval.mean_ap:.4f} / {ort_eval.mean_ap:.4f} "
        f"(difference {results['validation_map']['difference']:.1e}) |",
        f"| onnx.reference vs ONNX Runtime (4 images) | logits "
        f"{results['second_runtime']['max_abs_diff_vs_onnxruntime']['logits']:.1e}, probabilities "
        f"{results['second_runtime']['max_abs_diff_vs_onnxruntime']['probabilities']:.1e} |",
        f"| fp16 export | {e16['size_bytes'] / 1e6:.2f} MB vs {e32['size_bytes'] / 1e6:.2f} MB, max \\|Δp\\| "
        f"{e16['max_abs_diff']['probabilities']:.1e}, mAP {half_eval.mean_ap:.4f} |",
        "", "| batch | PyTorch eager (median) | ONNX Runtime CPU (median) | ORT / PyTorch |", "|---|---|---|---|",
    ]
    for batch in (1, 16):
        row = lat[f"batch_{batch}"]
        lines.append(f"| {batch} | {row['pytorch']['median_ms']:.2f} ms ({row['pytorch']['images_per_second']:.0f} img/s) "
                     f"| {row['onnxruntime']['median_ms']:.2f} ms ({row['onnxruntime']['images_per_second']:.0f} img/s) "
                     f"| {row['onnxruntime_vs_pytorch']:.2f} |")
    (RESULTS / "onnx_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
