"""Choosing the compute device."""

from __future__ import annotations

import torch

from .errors import KamalError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU; ``cpu``; ``cuda``; ``cuda:N``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise KamalError(f"device {spec!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'")
        index = int(spec.split(":")[1]) if ":" in spec and spec.split(":")[1].isdigit() else 0
        if index >= torch.cuda.device_count():
            raise KamalError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(f"cuda:{index}")
    raise KamalError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def available_devices() -> list[tuple[str, str]]:
    """``(spec, human name)`` for the CPU and every CUDA device."""
    devices = [("cpu", "CPU")]
    if torch.cuda.is_available():
        devices += [(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    return devices


def device_choices(gpus: int | None = None) -> list[tuple[str, str]]:
    """The app's device list: ``(key, text)`` for ``auto``, every device of :func:`available_devices`, and,
    with more than one GPU, ``cuda*N``: all N GPUs, one process each (distributed data parallel). A key
    is :func:`parse_device_choice`'s input; ``gpus`` overrides the count (for tests)."""
    devices = available_devices()
    count = torch.cuda.device_count() if gpus is None else gpus
    choices = [("auto", "auto (CUDA when present, else the CPU)")]
    choices += [(spec, name if spec == "cpu" else f"{spec} · {name}") for spec, name in devices]
    if count > 1:
        choices.append((device_choice_key("cuda", count), f"all {count} GPUs (distributed data parallel, one process "
                                                          "each)"))
    return choices


def device_choice_key(device: str, nproc: int) -> str:
    """The key of a recipe's ``[run] device`` and ``nproc``: the device, with ``*N`` for N processes."""
    return device if nproc <= 1 else f"{device}*{nproc}"


def parse_device_choice(key: str) -> tuple[str, int]:
    """``(device, nproc)`` of a :func:`device_choice_key`."""
    device, _, n = key.partition("*")
    return device, int(n) if n else 1
