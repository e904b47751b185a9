"""Amalgamation methods, one per module, registered by id.

Each module defines ``METHOD``, a :class:`MethodInfo`. The registry maps ids to modules and
imports a module only when its method is asked for (no import-everything ``__init__``).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import KamalError

MODULES = {
    "filtered-ka": "kamal_engine.methods.filtered_ka",
    "adaptive-ka": "kamal_engine.methods.adaptive_ka",
    "kd": "kamal_engine.methods.kd",
    "dual-gan": "kamal_engine.methods.dual_gan",
    "dafl": "kamal_engine.methods.dafl",
}


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its default, type and an explanation for the recipe and the app."""

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: Any) -> str | None:
        """None when ``value`` is acceptable, else what is expected."""
        kind = type(self.default)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            return f"a {'number' if kind is float else kind.__name__}"
        if self.choices is not None and value not in self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.minimum is not None and value < self.minimum:
            return f"a value ≥ {self.minimum}"
        if self.maximum is not None and value > self.maximum:
            return f"a value ≤ {self.maximum}"
        return None


@dataclass(frozen=True)
class MethodInfo:
    id: str
    mode: str  # "data" | "data-free"
    title: str
    paper: str
    summary: str
    params: tuple[Param, ...]
    run: Callable[..., Any]  # run(ctx: RunContext) -> MethodResult
    shared_labels: bool = False  # a label may be selected from several teachers (adaptive-ka)
    branches: bool = False  # the TargetNet branches out per task at the block of least converged loss
    soft_targets: bool = True  # data mode: uses the teachers' predictions computed once before training
    renamed: dict[str, str] = field(default_factory=dict)  # a parameter's earlier name -> its name now
    distributed: bool = False  # runs on several processes (kamal run --nproc, torchrun; kamal_engine.distributed)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


@dataclass
class MethodResult:
    net: Any  # TargetNet
    granularity: str
    report: dict[str, Any] = field(default_factory=dict)


def register(method_id: str, module: str) -> None:
    """Make the method whose ``METHOD`` is in ``module`` (an importable module name) available as
    ``method_id``, e.g. a method of one's own outside this package (``docs/architecture.md``, "Adding a
    method"); a built-in id cannot be taken."""
    if method_id in MODULES and MODULES[method_id] != module:
        raise KamalError(f"method id {method_id!r} is taken (by {MODULES[method_id]}); choose another id")
    MODULES[method_id] = module


def get_method(method_id: str) -> MethodInfo:
    if method_id not in MODULES:
        raise KamalError(f"unknown method {method_id!r}; available: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[method_id]).METHOD


def resolve_params(method: MethodInfo, given: dict[str, Any], error: Callable[[str, str], Exception]) -> dict[str, Any]:
    """The method's defaults updated with ``given``; ``error(message, key)`` builds the exception."""
    known = {p.name: p for p in method.params}
    params = method.defaults()
    for key, value in given.items():
        key = method.renamed.get(key, key)  # recipes written before a parameter was renamed still run
        if key not in known:
            raise error(f"unknown parameter for method '{method.id}'; its parameters are {', '.join(known)}", key)
        problem = known[key].check(value)
        if problem:
            raise error(f"expected {problem}, got {value!r}", key)
        params[key] = float(value) if isinstance(known[key].default, float) else value
    return params
