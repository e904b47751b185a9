"""ONNX export of a student (``docs/architecture.md``, "Exported ONNX").

One self-contained graph (weights inside, no external data file) for the whole branched TargetNet:

* input ``image``: float32 ``(N, 3, H, W)``, dynamic N, already preprocessed, i.e. resized to the
  student's input size, scaled to [0, 1], minus ``mean``, divided by ``std`` (both in the metadata);
* outputs ``logits`` ``(N, L)`` and ``probabilities`` ``(N, L)``: a sigmoid per multi-label output,
  a softmax within each multi-class task, in the order of the label names in the metadata;
* metadata property ``kamal`` (JSON): format, engine version, labels, task groups (type and output
  positions), input size, mean, std, method, the branch plan, and whether the weights are fp16.
  Each field is also stored as its own property (``labels``, ``input_size``...) for other tools.

``--fp16`` stores the weights and computes in float16; the input and outputs stay float32 (a cast
at each end), so callers feed the same tensors either way.

The file is written atomically and only after it passed ``onnx.checker`` and a comparison of ONNX
Runtime (CPU) with PyTorch on a batch of random images: the export fails, and nothing is written, if
the largest absolute difference of logits or probabilities is above 1e-4 (fp32). An fp16 graph is
compared with the fp32 PyTorch student; its bound is 1e-2 on the probabilities (fp16 keeps about 3
significant digits, so its logits differ by a few 1e-2 and are reported, not checked).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..checkpoints import atomic_write
from ..errors import KamalError
from ..targetnet import Student
from .format import (DEFAULT_OPSET, INPUT_NAME, METADATA_KEY, MIN_OPSET, ONNX_FORMAT, ONNX_FORMAT_VERSION,
                     OUTPUT_NAMES)
from .runtime import quiet_onnxruntime

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2


class ExportError(KamalError):
    """The student could not be exported, or the exported graph does not agree with PyTorch."""


class ExportGraph(nn.Module):
    """``image → (logits, probabilities)`` around a TargetNet; with ``fp16`` the net runs in float16."""

    def __init__(self, net: nn.Module, fp16: bool = False):
        super().__init__()
        self.net = net
        self.fp16 = fp16

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fp16:
            logits = self.net(image.to(torch.float16)).float()
        else:
            logits = self.net(image)
        return logits, self.net.probabilities(logits)


@dataclass
class ExportResult:
    path: Path
    opset: int
    fp16: bool
    max_abs_diff: dict[str, float]  # "logits" / "probabilities": ONNX Runtime vs PyTorch fp32
    tolerance: float
    checked: str  # which difference the tolerance applies to
    batch: int
    size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def student_metadata(student: Student, fp16: bool) -> dict[str, Any]:
    """The ``kamal`` metadata of an exported student (what :mod:`.runtime` reads back)."""
    return {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "engine_version": __version__,
        "method": student.method,
        "labels": list(student.labels),
        "groups": [asdict(g) for g in student.net.groups],
        "task_types": {g.name or str(i): g.kind for i, g in enumerate(student.net.groups)},
        **student.preprocessing.to_dict(),
        "input": INPUT_NAME,
        "input_layout": "NCHW float32, resized to input_size, (x / 255 - mean) / std",
        "outputs": list(OUTPUT_NAMES),
        "fp16": fp16,
        "student": {"arch": student.student_arch, "granularity": student.granularity},
        "branches": student.net.describe()["branches"],
        "info": student.info,
    }


def _sample_batch(student: Student, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random images, preprocessed like real ones (uint8 noise through the student's normalisation)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *student.preprocessing.input_size), dtype=torch.uint8, generator=generator)
    return student.preprocessing(images)


def _export_program(graph: nn.Module, sample: torch.Tensor, opset: int):
    """``torch.onnx.export`` (dynamo) with a dynamic batch; its chatter is kept for the error message."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(graph, (sample,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                     dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}},
                                     opset_version=opset, dynamo=True, external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many types; the user needs the reason, not the type
        tail = " ".join(chatter.getvalue().split())[-300:]
        raise ExportError(f"PyTorch could not export the student to ONNX ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}) {tail}".strip()) from None


def export_onnx(student: Student, path: str | Path, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                verify_batch: int = 8, log: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``student`` to ``path``; check, verify against PyTorch, then move it into place."""
    import onnx

    log = log or (lambda message: None)
    path = Path(path)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is not supported: choose an opset from {MIN_OPSET} to "
                          f"{onnx.defs.onnx_opset_version()} (default {DEFAULT_OPSET})")
    started = time.monotonic()
    reference = copy.deepcopy(student.net).cpu().float().eval()
    exported = copy.deepcopy(reference)
    graph = ExportGraph(exported.half() if fp16 else exported, fp16).eval()
    x = _sample_batch(student, verify_batch)
    with torch.no_grad():
        want_logits = reference(x)
        want = {"logits": want_logits.numpy(), "probabilities": reference.probabilities(want_logits).numpy()}

    log(f"Exporting the TargetNet to ONNX (opset {opset}{', fp16' if fp16 else ''}) …")
    program = _export_program(graph, x[:2], opset)
    model = program.model_proto
    written_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written_opset != opset:
        raise ExportError(f"the exporter wrote opset {written_opset} instead of the requested {opset}; choose opset "
                          f"{DEFAULT_OPSET} or later")
    meta = student_metadata(student, fp16)
    props = {METADATA_KEY: json.dumps(meta), "labels": json.dumps(meta["labels"]),
             "task_types": json.dumps(meta["task_types"]), "input_size": json.dumps(meta["input_size"]),
             "mean": json.dumps(meta["mean"]), "std": json.dumps(meta["std"]), "engine_version": __version__}
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "kamal-studio", __version__
    model.doc_string = f"KAmal Studio student ({student.method}): {', '.join(student.labels)}"

    result: dict[str, Any] = {}

    def write_and_verify(tmp: Path) -> None:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported graph fails onnx.checker ({' '.join(str(exc).split())[:300]})") from None
        import onnxruntime as ort

        quiet_onnxruntime()
        try:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})))
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot run the exported graph ({' '.join(str(exc).split())[:300]})") from None
        diffs = {k: float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in OUTPUT_NAMES}
        checked = "probabilities" if fp16 else "logits and probabilities"
        worst = diffs["probabilities"] if fp16 else max(diffs.values())
        tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
        result.update(diffs=diffs, checked=checked, tolerance=tolerance)
        if not worst <= tolerance:  # also catches NaN
            raise ExportError(f"ONNX Runtime and PyTorch disagree: max |difference| of the {checked} is {worst:.3g}, "
                              f"above the {tolerance:g} allowed; {path} was not written")

    atomic_write(path, write_and_verify)
    return ExportResult(path, opset, fp16, result["diffs"], result["tolerance"], result["checked"], verify_batch,
                        path.stat().st_size, round(time.monotonic() - started, 2))
