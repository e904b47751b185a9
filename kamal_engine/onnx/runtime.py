"""Running a student for prediction: a student bundle in PyTorch, or its exported ``.onnx`` in ONNX Runtime.

Both give a :class:`Predictor` with the same interface (labels, task groups, preprocessing,
``predict(uint8 images) → probabilities``), so ``kamal predict`` and ``kamal eval`` treat them alike
and can show that both runtimes give the same numbers.

Execution providers: ``auto`` uses CUDA when ONNX Runtime has its CUDA provider *and* a GPU is
present, otherwise the CPU; ``cuda`` fails with a clear message when no GPU can be used; ``cpu``
always works. The provider actually used (``session.get_providers()[0]``) is reported. The CUDA
provider's failure to load on a machine without a GPU is never attempted in ``auto`` mode, so ONNX
Runtime prints nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from ..errors import CheckpointError, KamalError
from ..preprocessing import Preprocessing
from ..targetnet import TaskGroup
from .format import METADATA_KEY, ONNX_FORMAT, ONNX_FORMAT_VERSION

PROVIDERS = ("auto", "cuda", "cpu")


class Predictor(Protocol):
    labels: list[str]
    groups: list[TaskGroup]
    preprocessing: Preprocessing
    runtime: str  # "pytorch" | "onnxruntime"
    provider: str  # e.g. "cpu", "cuda:0", "CPUExecutionProvider"

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


def quiet_onnxruntime() -> None:
    """Only errors from ONNX Runtime's own logger (its provider fallback warnings are noise here)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


def cuda_usable_by_onnxruntime() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def onnx_providers(provider: str = "auto") -> list[str]:
    """The ONNX Runtime provider list for ``auto | cuda | cpu``."""
    if provider not in PROVIDERS:
        raise KamalError(f"unknown provider '{provider}': choose one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if cuda_usable_by_onnxruntime():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cuda":
        import onnxruntime as ort

        reason = ("this ONNX Runtime has no CUDA provider (install onnxruntime-gpu)"
                  if "CUDAExecutionProvider" not in ort.get_available_providers() else "no CUDA GPU is available")
        raise KamalError(f"--provider cuda was asked for, but {reason}; use --provider cpu or auto")
    return ["CPUExecutionProvider"]


@dataclass
class OnnxStudent:
    """An exported student in an ONNX Runtime session."""

    path: Path
    session: Any
    labels: list[str]
    groups: list[TaskGroup]
    preprocessing: Preprocessing
    metadata: dict[str, Any] = field(default_factory=dict)
    runtime: str = "onnxruntime"

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, probabilities)`` for preprocessed float32 ``x`` ``(N, 3, H, W)``."""
        logits, probabilities = self.session.run(["logits", "probabilities"], {self.input_name: x})
        return logits, probabilities

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities for uint8 images ``(N, 3, H, W)``."""
        x = self.preprocessing(images.cpu()).numpy().astype(np.float32, copy=False)
        return torch.from_numpy(self.run(x)[1])


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``kamal`` metadata of an exported student; errors name the file and say what is wrong."""
    import onnx


    path = Path(path)
    if not path.is_file():
        raise CheckpointError("ONNX file not found; check the path", path)
    if path.stat().st_size == 0:
        raise CheckpointError("is empty (0 bytes): export the student again", path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(f"is not a readable ONNX model ({type(exc).__name__}); the file is damaged or "
                              "not ONNX: export the student again with kamal export", path) from None
    if not model.graph.node:
        raise CheckpointError("is not a usable ONNX model (its graph is empty); the file is damaged or not ONNX: "
                              "export the student again with kamal export", path)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise CheckpointError("is an ONNX model without KAmal Studio metadata (labels, preprocessing); only "
                              "models written by kamal export can be used here", path)
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError:
        raise CheckpointError("has damaged KAmal Studio metadata; export the student again", path) from None
    if meta.get("format") != ONNX_FORMAT or not isinstance(meta.get("format_version"), int):
        raise CheckpointError("has metadata of another format; export the student again with kamal export", path)
    if meta["format_version"] > ONNX_FORMAT_VERSION:
        raise CheckpointError(f"was exported by a newer KAmal Studio (format version {meta['format_version']}); "
                              "update KAmal Studio", path)
    return meta


def load_onnx(path: str | os.PathLike, provider: str = "auto") -> OnnxStudent:
    """An exported student in ONNX Runtime with the providers of ``provider`` (``auto | cuda | cpu``)."""
    import onnxruntime as ort

    path = Path(path)
    meta = read_onnx_metadata(path)
    providers = onnx_providers(provider)
    quiet_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise CheckpointError(f"cannot be loaded by ONNX Runtime ({' '.join(str(exc).split())[:300]}); export the "
                              "student again with kamal export", path) from None
    try:
        groups = [TaskGroup(**g) for g in meta["groups"]]
        preprocessing = Preprocessing(meta["input_size"], meta["mean"], meta["std"])
        labels = list(meta["labels"])
    except (KeyError, TypeError, KamalError) as exc:
        raise CheckpointError(f"has incomplete KAmal Studio metadata ({exc}); export the student again", path) from None
    return OnnxStudent(path, session, labels, groups, preprocessing, meta)


@dataclass
class TorchStudent:
    """A student bundle in PyTorch on a device, with the :class:`Predictor` interface."""

    student: Any  # targetnet.Student
    device: torch.device
    runtime: str = "pytorch"

    @property
    def labels(self) -> list[str]:
        return self.student.labels

    @property
    def groups(self) -> list[TaskGroup]:
        return self.student.net.groups

    @property
    def preprocessing(self) -> Preprocessing:
        return self.student.preprocessing

    @property
    def provider(self) -> str:
        return str(self.device)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.predict(images).cpu()


def is_onnx_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load_predictor(path: str | os.PathLike, provider: str = "auto") -> Predictor:
    """A student bundle (PyTorch) or an ``.onnx`` (ONNX Runtime), on ``auto | cuda | cpu``."""
    if is_onnx_path(path):
        return load_onnx(path, provider)
    from ..devices import resolve_device
    from ..targetnet import load_student

    if provider not in PROVIDERS:
        raise KamalError(f"unknown provider '{provider}': choose one of {', '.join(PROVIDERS)}")
    student = load_student(path)
    device = resolve_device(provider)
    student.net.to(device)
    return TorchStudent(student, device)


def positive_labels(predictor: Predictor, probabilities: Sequence[float], threshold: float) -> list[str]:
    """Multi-label outputs at or above ``threshold``; the most probable class of each multi-class task."""
    out = []
    for group in predictor.groups:
        if group.kind == "multiclass":
            best = max(group.positions, key=lambda p: probabilities[p])
            out.append(predictor.labels[best])
        else:
            out.extend(predictor.labels[p] for p in group.positions if probabilities[p] >= threshold)
    return out


def compare_latency(runners: dict[str, Any], rounds: int = 10, per_round: int = 10, warmup: int = 5) -> dict[str, dict]:
    """Milliseconds per call of each zero-argument runner, measured interleaved (rounds alternate
    between the runners, so machine load affects them alike): ``{name: {median_ms, p90_ms, calls}}``."""
    import statistics
    import time

    times: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: {"median_ms": statistics.median(ms), "p90_ms": float(np.percentile(ms, 90)), "calls": len(ms)}
            for name, ms in times.items()}


def latency_runners(student, onnx_student: OnnxStudent, batch: int) -> dict[str, Any]:
    """PyTorch eager and ONNX Runtime on the same preprocessed batch of ``batch`` random images."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *student.preprocessing.input_size), dtype=torch.uint8,
                           generator=generator)
    x = student.preprocessing(images)
    xn = x.numpy()
    net = student.net.cpu().eval()

    def run_torch():
        with torch.inference_mode():
            net.probabilities(net(x))

    def run_ort():
        onnx_student.session.run(["logits", "probabilities"], {onnx_student.input_name: xn})

    return {"pytorch": run_torch, "onnxruntime": run_ort}
