"""Where a run's time goes: wall seconds, calls and images per named part (``report.json`` → ``profile``).

The runner times its own steps (loading and decoding the images, the teachers' soft targets, the
evaluation, the student file, the ONNX export and check); every training phase times its steps'
forward pass, backward pass and optimiser update (``<phase> forward`` …, per block for the block-wise
methods); methods time their own parts inside those (``filtered-ka``: the frozen student prefix and the
teachers' remaining blocks inside the forward pass, the converged-loss pass, the diagnosis, the AP by
block). Nested parts are also counted in the part around them; ``profile.parts`` lists each part's
share of the run's wall time. On a GPU the timings are those of the host (kernels run asynchronously),
so the step parts there say where the host waits, not what each kernel costs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class RunProfile:
    """Wall seconds, calls and images per named part of one run."""

    def __init__(self):
        self.parts: dict[str, list[float]] = {}  # name -> [seconds, calls, images]
        self.started = time.perf_counter()

    def add(self, name: str, seconds: float, images: int = 0) -> None:
        entry = self.parts.setdefault(name, [0.0, 0, 0])
        entry[0] += seconds
        entry[1] += 1
        entry[2] += images

    @contextmanager
    def part(self, name: str, images: int = 0) -> Iterator[None]:
        """Time the body as part ``name`` (``images``: how many images it handled)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, images)

    def seconds(self, name: str) -> float:
        return self.parts.get(name, [0.0])[0]

    def to_dict(self, total: float | None = None) -> dict:
        """The parts by decreasing time: seconds, share of ``total`` (default: since the profile began),
        calls and, where images were counted, images per second."""
        total = total if total is not None else time.perf_counter() - self.started
        parts = {}
        for name, (seconds, calls, images) in sorted(self.parts.items(), key=lambda kv: -kv[1][0]):
            parts[name] = {"seconds": round(seconds, 3), "share": round(seconds / max(total, 1e-9), 4),
                           "calls": int(calls)}
            if images:
                parts[name]["images_per_second"] = round(images / max(seconds, 1e-9), 1)
        return {"seconds": round(total, 2), "parts": parts}


def summary(profile: dict, top: int = 6) -> str:
    """The ``top`` biggest parts of a report's ``profile`` in one line (a nested part's time is also in
    the part around it)."""
    parts = profile.get("parts", {})
    shown = []
    for name, part in parts.items():
        if len(shown) == top:
            break
        shown.append(f"{name} {part['seconds']:.1f} s ({part['share']:.0%})")
    return f"Time ({profile.get('seconds', 0):.0f} s): " + ", ".join(shown)
