"""The ``kamal`` command line (``docs/architecture.md``, "Command line").

Human tables on stdout by default, ``--json`` for machines; progress goes to stderr. Bad input
ends with a non-zero exit code and a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import KamalError
from .events import format_duration

EXIT_BAD_INPUT = 2


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- teacher loading options shared by inspect and eval -------------------------------------------

def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture of a foreign checkpoint (default: detected from the weights)")
    p.add_argument("--labels", metavar="FILE", help="labels file for a foreign checkpoint, one label per line "
                   "(default: <name>.labels.txt, <name>.txt or labels.txt beside it)")
    p.add_argument("--task", choices=("multilabel", "multiclass"),
                   help="task type of a foreign checkpoint (default: multiclass, the torchvision convention)")
    p.add_argument("--input-size", type=int, metavar="N", help="input size in pixels (overrides the file's)")
    p.add_argument("--trust", action="store_true",
                   help="allow a file holding pickled Python objects (a whole nn.Module); only for files you trust")


def _load_teacher(args, path: str, require_labels: bool = True, raw=None):
    from .teacher import load_teacher

    return load_teacher(path, raw=raw, arch=args.arch,
                        labels_file=args.labels, task=args.task, input_size=args.input_size, trust=args.trust,
                        require_labels=require_labels)


# --- kamal inspect -------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from .backbones import GRANULARITIES
    from .profile import count_flops, count_parameters

    teacher = _load_teacher(args, args.checkpoint, require_labels=False)
    size = teacher.preprocessing.input_size
    blocks = {}
    for granularity in GRANULARITIES:
        net = teacher.blocks(granularity)
        blocks[granularity] = [{"name": n, "output_shape": list(s)}
                               for n, s in zip(net.block_names, net.output_shapes(size))]
    info = {
        "file": str(teacher.source),
        "format": teacher.source_format,
        "name": teacher.name,
        "arch": teacher.arch,
        "arch_kwargs": teacher.arch_kwargs,
        "task": teacher.task,
        "task_assumed": teacher.task_assumed,
        "labels": teacher.labels,
        "labels_source": teacher.labels_source,
        "preprocessing": teacher.preprocessing.to_dict(),
        "parameters": count_parameters(teacher.model),
        "flops": count_flops(teacher.model, size),
        "blocks": blocks,
    }
    if args.json:
        _print_json(info)
        return 0
    shown = ", ".join(teacher.labels[:20]) + (f", … ({len(teacher.labels) - 20} more)" if len(teacher.labels) > 20 else "")
    task = teacher.task + ("  (assumed: the file does not say; set it with --task)" if teacher.task_assumed else "")
    kwargs = f"  {teacher.arch_kwargs}" if teacher.arch_kwargs else ""
    pre = teacher.preprocessing
    print(format_table(["field", "value"], [
        ["file", f"{teacher.source}  ({teacher.source_format})"],
        ["architecture", teacher.arch + kwargs],
        ["task type", task],
        ["labels", f"{len(teacher.labels)} ({teacher.labels_source}): {shown}"],
        ["input", f"{pre.input_size[0]}x{pre.input_size[1]}, mean {list(pre.mean)}, std {list(pre.std)}"],
        ["parameters", f"{info['parameters']:,}"],
        ["FLOPs", f"{_si(info['flops'])} per image at {size[0]}x{size[1]} (multiply-add = 2)"],
    ]))
    for granularity in GRANULARITIES:
        rows = [[i, b["name"], " x ".join(map(str, b["output_shape"]))] for i, b in enumerate(blocks[granularity], 1)]
        print(f"\nBlocks at '{granularity}' granularity: {len(rows)}")
        print(format_table(["#", "block", "output C x H x W"], rows, right=(0,)))
    return 0


# --- kamal eval ----------------------------------------------------------------------------------

def _print_evaluation(evaluation, title: str) -> None:
    if evaluation.task == "multilabel":
        rows = [[label, _fmt(ap)] for label, ap in evaluation.ap.items()] + [["mAP", _fmt(evaluation.mean_ap)]]
        print(title)
        print(format_table(["label", "AP"], rows, right=(1,)))
        if evaluation.not_evaluated:
            print(f"(not in the data, not evaluated: {', '.join(evaluation.not_evaluated)})")
    else:
        print(f"{title}\ntop-1 accuracy  {_fmt(evaluation.accuracy)}  on {evaluation.n_images} images")


def cmd_eval(args) -> int:
    from .checkpoints import read_checkpoint
    from .data import read_labelled
    from .devices import resolve_device
    from .evaluation import evaluate_teacher
    from .evaluation import evaluate_student
    from .targetnet import STUDENT_FORMAT, student_from_bundle

    from .onnx.runtime import is_onnx_path, load_onnx

    if is_onnx_path(args.model):
        data = read_labelled(args.data)
        model = load_onnx(args.model, _provider_for_device(args.device))
        evaluation = evaluate_student(model, data)
        title = f"exported student (ONNX Runtime, {model.provider}, {len(model.labels)} labels)"
        if args.json:
            _print_json({"model": str(model.path), "data": str(data.source), "runtime": model.runtime,
                         "provider": model.provider, **evaluation.to_dict()})
        else:
            _print_evaluation(evaluation, f"{title} on {data.source} ({evaluation.n_images} images)")
        return 0
    raw = read_checkpoint(args.model, trust=args.trust)
    data = read_labelled(args.data)
    device = resolve_device(args.device)
    if raw.kind == "bundle" and raw.bundle.get("format") == STUDENT_FORMAT:
        student = student_from_bundle(raw.bundle, raw.path)
        evaluation = evaluate_student(student, data, device)
        title = f"student ({student.method}, {len(student.labels)} labels)"
    else:
        teacher = _load_teacher(args, args.model, raw=raw)
        evaluation = evaluate_teacher(teacher, data, batch_size=args.batch_size, device=device)
        title = f"{teacher.name} ({teacher.arch}, {teacher.task})"
    if args.json:
        _print_json({"model": str(raw.path), "data": str(data.source), **evaluation.to_dict()})
    else:
        _print_evaluation(evaluation, f"{title} on {data.source} ({evaluation.n_images} images)")
    return 0


def _provider_for_device(device: str) -> str:
    """``kamal eval --device`` for an ``.onnx``: auto, cpu, or cuda (any cuda:N)."""
    device = (device or "auto").lower()
    return "cuda" if device.startswith("cuda") else device


# --- kamal export / predict ----------------------------------------------------------------------

def cmd_export(args) -> int:
    from .onnx.export import export_onnx
    from .targetnet import load_student

    student = load_student(args.student)
    result = export_onnx(student, args.onnx, opset=args.opset, fp16=args.fp16, log=None if args.json else _log)
    if args.json:
        _print_json(result.to_dict())
        return 0
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in result.max_abs_diff.items())
    print(f"Wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, opset {result.opset}"
          f"{', fp16' if result.fp16 else ''}, one file) in {result.seconds:.1f} s")
    print(f"onnx.checker: passed. ONNX Runtime vs PyTorch on {result.batch} images, max |difference|: {diffs} "
          f"(allowed {result.tolerance:g} on the {result.checked})")
    print(f"Input 'image' (N, 3, {', '.join(map(str, student.preprocessing.input_size))}) float32, normalised with "
          f"mean {list(student.preprocessing.mean)} std {list(student.preprocessing.std)}; outputs 'logits' and "
          f"'probabilities' over {len(student.labels)} labels: {', '.join(student.labels)}")
    return 0


def cmd_predict(args) -> int:
    import torch

    from .data import load_image
    from .onnx.runtime import load_predictor, positive_labels

    if not 0.0 <= args.threshold <= 1.0:
        raise KamalError(f"--threshold must be between 0 and 1, got {args.threshold}")
    model = load_predictor(args.model, args.provider)
    size = model.preprocessing.input_size
    images = [load_image(path, size) for path in args.images]
    results = []
    for start in range(0, len(images), args.batch_size):
        batch = torch.stack(images[start:start + args.batch_size])
        for path, probabilities in zip(args.images[start:start + args.batch_size], model.predict(batch).tolist()):
            results.append({"image": str(path), "probabilities": dict(zip(model.labels, probabilities)),
                            "positive": positive_labels(model, probabilities, args.threshold)})
    runtime = "ONNX Runtime" if model.runtime == "onnxruntime" else "PyTorch"
    if args.json:
        _print_json({"model": str(args.model), "runtime": model.runtime, "provider": model.provider,
                     "threshold": args.threshold, "labels": model.labels, "images": results})
        return 0
    _log(f"{runtime} on {model.provider}")
    names = [Path(r["image"]).name for r in results]
    rows = [[name] + [f"{p:.3f}{'*' if label in r['positive'] else ' '}" for label, p in r["probabilities"].items()]
            + [", ".join(r["positive"]) or "-"] for name, r in zip(names, results)]
    print(format_table(["image"] + model.labels + [f"predicted (* >= {args.threshold:g})"], rows,
                       right=tuple(range(1, len(model.labels) + 1))))
    return 0


# --- kamal demo ----------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from . import demo
    from .devices import resolve_device

    root = Path(args.dir)
    config = demo.DemoConfig.quick() if args.quick else demo.DemoConfig()
    device = resolve_device(args.device)
    if root.exists() and not root.is_dir():
        raise KamalError("exists and is not a folder; choose another place for the demo workspace", root)
    root, why = demo.workspace_root(root)  # a user's own folder: a sub-folder, nothing of theirs touched
    if why:
        _log(why)
    started = time.monotonic()
    if demo.is_complete(root) and not args.force:
        _log(f"The demo workspace in {root} is already built (--force rebuilds it); evaluating its teachers …")
        manifest = json.loads((root / demo.MANIFEST).read_text())
        results = demo.evaluate_demo_teachers(root, config, device)
        manifest["teachers"] = demo.teacher_summaries(root, results)
    else:
        if demo.is_complete(root):  # --force: the old build is set aside whole (with anything added inside)
            _log(f"Moved the previous build to {demo.set_aside_parts(root)}")
        elif demo.is_partial(root):  # an interrupted build of ours: all of it was written by the builder
            demo.clear_partial(root)
        manifest = demo.build_demo(root, config, device, log=_log)
    if args.heterogeneous:
        if "heterogeneous" not in manifest or not all(p.is_file() for p in demo.heterogeneous_paths(root)):
            manifest = demo.build_heterogeneous(root, config, device, log=_log)
        else:
            _log("The heterogeneous source teachers are already built (--force rebuilds everything).")
    if args.independent:
        if "independent" not in manifest or not all(p.is_file() for p in demo.independent_paths(root)):
            manifest = demo.build_independent(root, config, device, log=_log)
        else:
            _log("The independent teachers are already built (--force rebuilds everything).")
    if args.json:
        _print_json({"workspace": str(root), **manifest})
        return 0
    teachers = manifest["teachers"]
    print(f"\nDemo workspace: {root}  ({time.monotonic() - started:.0f} s)")
    print(format_table(["teacher", "file", "labels", "validation mAP"],
                       [[t["name"], t["file"], ", ".join(t["labels"]), _fmt(t["validation"]["mean_ap"])]
                        for t in teachers], right=(3,)))
    print()
    labels = [label for t in teachers for label in t["labels"]]
    rows = [[t["name"]] + [_fmt(t["validation"]["ap"].get(label), 3) if label in t["labels"] else "" for label in labels]
            for t in teachers]
    print("Per-label AP on the validation split:")
    print(format_table(["teacher"] + labels, rows, right=tuple(range(1, len(labels) + 1))))
    if "heterogeneous" in manifest:
        sources = manifest["heterogeneous"]["teachers"]
        print("\nHeterogeneous source teachers (for adaptive-ka):")
        print(format_table(["teacher", "file", "labels", "validation mAP"],
                           [[t["name"], t["file"], ", ".join(t["labels"]), _fmt(t["validation"]["mean_ap"])]
                            for t in sources], right=(3,)))
    if "independent" in manifest:
        print("\nTeachers trained apart (for filtered-ka on unrelated features):")
        print(format_table(["teacher", "file", "labels", "validation mAP"],
                           [[t["name"], t["file"], ", ".join(t["labels"]), _fmt(t["validation"]["mean_ap"])]
                            for t in manifest["independent"]["teachers"]], right=(3,)))
    recipes = manifest["recipes"] + [manifest[part]["recipe"] for part in ("heterogeneous", "independent")
                                     if part in manifest]
    print(f"\nRecipes: {', '.join(recipes)}")
    return 0


# --- kamal run -----------------------------------------------------------------------------------

class ProgressPrinter:
    """Prints run events on stderr: a redrawn bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0
        self.bar_open = False

    def line(self, text: str) -> None:
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event) -> None:
        from . import events as ev

        if isinstance(event, ev.Progress):
            now = time.monotonic()
            if self.tty and (now - self.last >= 0.2 or event.done == event.total):
                self.last = now
                self.stream.write(f"\r  {event.done}/{event.total}")
                self.stream.flush()
                self.bar_open = True
        elif isinstance(event, ev.StepLosses):
            now = time.monotonic()
            if now - self.last < (0.2 if self.tty else 10.0) and event.step != event.total_steps:
                return
            self.last = now
            frac = event.step / max(1, event.total_steps)
            where = "" if not event.block else f"{'net' if event.stage == 'component' else 'block'} {event.block} "
            text = (f"[{'#' * int(frac * 24):<24}] {frac:4.0%}  {event.stage} {where}epoch {event.epoch}  "
                    f"loss {event.losses.get('loss', float('nan')):.4f}  {event.images_per_second:.0f} img/s  "
                    f"ETA {format_duration(event.eta_seconds)}")
            if self.tty:
                self.stream.write("\r" + text.ljust(100))
                self.stream.flush()
                self.bar_open = True
            else:
                self.line(text)
        else:
            text = ev.describe(event)
            if text is not None:
                self.line(text)


def cmd_run(args) -> int:
    from .recipe import follow_output_dir, load_recipe
    from .runner import run_recipe

    recipe = load_recipe(args.recipe)
    if args.output:  # the ONNX file of [export] inside the recipe's output folder moves with it
        output = Path(args.output).resolve()
        recipe.onnx = follow_output_dir(recipe.onnx, recipe.output_dir, output)
        recipe.output_dir = output
    if int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a rank > 0 started by torchrun: it runs its share and writes nothing; rank 0 reports
        run_recipe(recipe, resume=args.resume, restart=args.restart, replace=args.replace, command=args.command_line)
        return 0
    if args.nproc is not None and args.nproc < 1:
        raise KamalError(f"--nproc must be 1 or more (got {args.nproc})")
    nproc = recipe.nproc if args.nproc is None else args.nproc
    result = _interruptible(args, lambda emit, cancel: run_recipe(
        recipe, resume=args.resume, restart=args.restart, replace=args.replace, emit=emit, cancel=cancel,
        command=args.command_line, nproc=nproc))
    return 130 if result is None else print_run_summary(result, args)


def _interruptible(args, work):
    """``work(emit, cancel)`` with progress printed (none with --json) and Ctrl-C stopping after the current
    step (a second Ctrl-C at once); None when interrupted."""
    from .events import CancelToken, RunCancelled

    cancel = CancelToken()
    printer = None if args.json else ProgressPrinter()

    def on_interrupt(signum, frame):  # first Ctrl-C: stop after the current step; second: at once
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        print("\nkamal: stopping after this step (Ctrl-C again to stop at once) …", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        return work(printer or (lambda event: None), cancel)
    except (RunCancelled, KeyboardInterrupt):
        print("kamal: interrupted; the finished blocks are kept: continue with kamal run --resume", file=sys.stderr)
        return None
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_replan(args) -> int:
    from .replan import parse_branch_at_args, replan

    options = {}
    if args.max_params is not None:
        options["max_params"] = args.max_params
    if args.branch_tolerance is not None:
        options["branch_tolerance"] = args.branch_tolerance
    branch_at = parse_branch_at_args(args.branch_at)
    if branch_at:
        options["branch_at"] = branch_at
    result = _interruptible(args, lambda emit, cancel: replan(args.run, options, output=args.output,
                                                              replace=args.replace, emit=emit, cancel=cancel,
                                                              command=args.command_line))
    return 130 if result is None else print_run_summary(result, args)


def print_run_summary(result, args) -> int:
    """What ``kamal run`` and ``kamal replan`` print at the end: outputs, branch points, the AP table, the
    ONNX check and the student's size; the exit status (1 when the ONNX export failed)."""
    report = result.report
    if args.json:
        _print_json({"output_dir": str(result.output_dir), **report})
        return 1 if (report.get("onnx") or {}).get("error") else 0
    print(f"\nOutputs in {result.output_dir}: student.kamal.pt, report.json, metrics.csv, recipe.toml")
    if report.get("branch_points"):
        print("Branch points: " + ", ".join(f"{k} → {v}" for k, v in report["branch_points"].items()))
    val = report.get("validation")
    if val:
        best = {}  # per label, the best AP of the teachers it was learned from
        for t in val["teachers"].values():
            for label, ap in t["ap"].items():
                if ap is not None:
                    best[label] = max(ap, best.get(label, ap))
        rows = []
        for label in report["labels"]:
            teacher_ap, student_ap = best.get(label), val["student"]["ap"].get(label)
            diff = "" if teacher_ap is None or student_ap is None else f"{student_ap - teacher_ap:+.4f}"
            rows.append([label, _fmt(teacher_ap), _fmt(student_ap), diff])
        known = [best[label] for label in report["labels"] if label in best]
        rows.append(["mAP", _fmt(sum(known) / len(known)) if known else "n/a", _fmt(val["student"]["mean_ap"]), ""])
        print(format_table(["label", "teacher AP", "student AP", "difference"], rows, right=(1, 2, 3)))
    onnx = report.get("onnx")
    if onnx and onnx.get("error"):
        print(f"kamal: the ONNX export asked for in [export] failed (the student bundle is saved): {onnx['error']}",
              file=sys.stderr)
    elif onnx:
        print(f"ONNX: {onnx['path']} (max |ONNX Runtime - PyTorch| {max(onnx['max_abs_diff'].values()):.2e})")
    size = report["size"]
    teachers_params = round(size["student"]["parameters"] / size["student_vs_teachers_parameters"])
    flops = size.get("student_vs_teachers_flops")
    print(f"Student: {size['student']['parameters']:,} parameters ({size['student_vs_teachers_parameters']:.2f} x the "
          f"teachers' {teachers_params:,}), {_si(size['student']['flops'])}FLOPs per image"
          + (f" ({flops:.2f} x the teachers')" if flops is not None else ""))
    if report.get("profile"):
        from .profiling import summary

        print(summary(report["profile"]))
    return 1 if onnx and onnx.get("error") else 0


# --- entry point ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kamal", description="KAmal Studio: amalgamate pre-trained teacher CNNs "
                                     "into one customised multi-task student.")
    parser.add_argument("--version", action="version", version=f"kamal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="build the demo workspace (digit mosaics, two teachers, recipes)",
                       description="Build the demo workspace in DIR: real MNIST digits composed into multi-label "
                       "mosaics, two teachers trained on digits 0-4 and 5-9, and a recipe per mode. Prints each "
                       "teacher's per-label AP and mAP on the validation split. An already built workspace is "
                       "only re-evaluated.")
    p.add_argument("dir", help="folder for the workspace (created if missing)")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR already holds a built workspace")
    p.add_argument("--quick", action="store_true", help="a tiny workspace in seconds (weaker teachers), for trying commands")
    p.add_argument("--heterogeneous", action="store_true",
                   help="also train four source teachers of mixed architectures with overlapping labels and write "
                        "recipes/adaptive-ka.toml (about three minutes more on a laptop CPU)")
    p.add_argument("--independent", action="store_true",
                   help="also train three torchvision teachers apart (two ResNet-18s and a ResNet-34, from scratch, "
                        "each on its own images, labels and seed; saved as bare state_dicts + labels files) and write "
                        "recipes/filtered-ka-independent.toml (about five minutes more on two CPU cores)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default: cpu, repeatable)")
    p.add_argument("--json", action="store_true", help="print the workspace manifest as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("inspect", help="show a checkpoint's architecture, labels, blocks, parameters and FLOPs",
                       description="Load a teacher checkpoint (native bundle, .safetensors, or a foreign "
                       "state_dict) and show its architecture, task type, labels, preprocessing, parameter and "
                       "FLOP counts, and its blocks with output shapes at both granularities.")
    p.add_argument("checkpoint", help="checkpoint file (.pt, .pth, .safetensors)")
    _add_checkpoint_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="evaluate a model on a labelled set (AP/mAP or top-1 accuracy)",
                       description="Evaluate MODEL on labelled data: a CSV (image column + one 0/1 column per "
                       "label) gives per-label AP and mAP for a multi-label model; a folder of class folders "
                       "gives top-1 accuracy for a multi-class model. Labels are matched by name.")
    p.add_argument("model", help="student bundle (student.kamal.pt from kamal run), exported student (.onnx, run in "
                   "ONNX Runtime) or teacher checkpoint file")
    p.add_argument("--data", required=True, metavar="CSV|DIR", help="labelled CSV or class-folder tree")
    _add_checkpoint_options(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a student bundle to one ONNX file, verified with ONNX Runtime",
                       description="Export STUDENT (student.kamal.pt from kamal run) to a single self-contained "
                       "ONNX file: input 'image' (N, 3, H, W) float32 normalised with the student's mean/std, "
                       "dynamic N; outputs 'logits' and 'probabilities'; labels, task types, input size, mean/std "
                       "and engine version in the metadata. The file is written only if onnx.checker passes and "
                       "ONNX Runtime agrees with PyTorch within 1e-4 (1e-2 on probabilities with --fp16).")
    p.add_argument("student", help="student bundle (student.kamal.pt)")
    p.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or later (default: 18)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and compute (input/outputs stay float32)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="per-label probabilities for images, with a student bundle or an .onnx",
                       description="Predict IMAGE files with MODEL: a student bundle (runs in PyTorch) or an "
                       "exported .onnx (runs in ONNX Runtime). Preprocessing comes from the model. Prints one row "
                       "per image with every label's probability; '*' marks those at or above the threshold (for "
                       "a multi-class task: its most probable class). The runtime and provider used are reported.")
    p.add_argument("model", help="student bundle (student.kamal.pt) or exported .onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability marking a label present (default 0.5)")
    p.add_argument("--provider", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: CUDA when available, else the CPU (default); cuda; cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("run", help="run a recipe: amalgamate the teachers into a student",
                       description="Run RECIPE (a TOML file, see the README): train the student, write "
                       "student.kamal.pt, metrics.csv, report.json and the recipe as run into the recipe's output "
                       "folder, with resumable checkpoints at every block boundary. The folder is the run's own: "
                       "one holding another run is used only with --resume, --restart or --replace, and one holding "
                       "files no run wrote is refused.")
    p.add_argument("recipe", help="recipe file (.toml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run after its last finished block")
    p.add_argument("--restart", action="store_true", help="start over although the output folder holds an unfinished "
                   "run (the old run is moved to FOLDER.previous-TIMESTAMP, nothing is deleted)")
    p.add_argument("--replace", action="store_true", help="start over although the output folder holds a finished "
                   "run (moved to FOLDER.previous-TIMESTAMP, nothing is deleted). A folder holding files no run wrote "
                   "is always refused")
    p.add_argument("--output", metavar="DIR", help="output folder (overrides [run].output_dir)")
    p.add_argument("--nproc", type=int, metavar="N", help="distributed data parallel on N processes of this machine "
                   "(one GPU each on CUDA, gloo on the CPU; every built-in method); for several machines start it "
                   "with torchrun instead (README, \"Several GPUs\"). Default: the recipe's [run] nproc, 1")
    p.add_argument("--json", action="store_true", help="print the report as JSON at the end (no progress output)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replan", help="build and fine-tune another branch plan from a finished run's trained blocks",
                       description="Choose another branch plan for the finished filtered-ka or dual-gan run in RUN "
                       "(its output folder) and build, fine-tune, evaluate and export that TargetNet in a new run "
                       "folder, from the blocks RUN trained (the block-wise stage is not run again; RUN is only "
                       "read). The plan options given replace the run's; those not given take their defaults. The "
                       "new folder is RUN-<options> beside RUN (e.g. runs/filtered-ka-p0.6) unless --output names "
                       "one. Equal, on the CPU, to a fresh run of the recipe with these options.")
    p.add_argument("run", metavar="RUN", help="the output folder of a finished run")
    p.add_argument("--max-params", type=float, metavar="X", help="parameter budget: up to 100 a multiple of the "
                   "teachers' summed parameters (0.6: 60 %%), above 100 a count; the plan of least total converged "
                   "loss within it (0: none)")
    p.add_argument("--branch-tolerance", type=float, metavar="EPS", help="each label branches at the deepest block "
                   "whose converged loss is within (1 + EPS) x its minimum (0: Eq. 9)")
    p.add_argument("--branch-at", nargs="+", metavar="LABEL=BLOCK", help="fix labels' branch blocks, e.g. "
                   "--branch-at one=b3 eight=b4 (the others follow the other options)")
    p.add_argument("--output", metavar="DIR", help="the new run folder (default: RUN-<options> beside RUN)")
    p.add_argument("--replace", action="store_true", help="the new folder holds an earlier replan: move it to "
                   "FOLDER.previous-TIMESTAMP (nothing is deleted) and start over")
    p.add_argument("--json", action="store_true", help="print the report as JSON at the end (no progress output)")
    p.set_defaults(func=cmd_replan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["kamal", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except KamalError as exc:
        print(f"kamal: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kamal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
