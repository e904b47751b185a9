"""Reading checkpoint files a user hands us, safely.

``torch.load`` always runs with ``weights_only=True``: a file holding pickled Python objects (a
whole ``nn.Module``, or a crafted file whose unpickling would run code) is refused with
:class:`UnsafeCheckpointError` unless the caller passes ``trust=True`` (GUI confirmation, CLI
``--trust``). ``.safetensors`` files never hold code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UnsafeCheckpointError

STATE_DICT_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_UMASK = os.umask(0)
os.umask(_UMASK)
SAFETENSORS_META_KEY = "kamal"


@dataclass
class RawCheckpoint:
    """What a checkpoint file holds, before it is interpreted as a teacher or a student."""

    path: Path
    kind: str  # "bundle" (a dict with a 'format' tag) | "state_dict" | "module" (trusted pickle)
    state_dict: dict[str, torch.Tensor] | None = None
    bundle: dict[str, Any] | None = None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def check_zip(path: Path) -> None:
    """A ``torch.save`` file is a zip archive whose every part carries a CRC-32 checksum; ``torch.load``
    does not look at them, so a flipped byte inside the weights would load as a silently different model.
    Every part is read once and checked here (parts written without a checksum, CRC 0, are skipped)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 or info.is_dir():
                    continue
                with archive.open(info) as part:  # raises BadZipFile at the end of a part whose CRC differs
                    while part.read(1 << 22):
                        pass
    except zipfile.BadZipFile as exc:
        text = str(exc)
        found = re.search(r"Bad CRC-32 for file '([^']+)'", text)
        what = f"its part '{found.group(1)}' does not match its checksum" if found else f"{text.rstrip('.')}"
        raise CheckpointError(f"is damaged ({what}; a copy or download went wrong); save or copy it again",
                              path) from None
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(f"is truncated or corrupt ({type(exc).__name__}: {exc}); save or copy it again",
                              path) from None


def _torch_load(path: Path, trust: bool) -> Any:
    if zipfile.is_zipfile(path):
        check_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise CheckpointError(f"is truncated or corrupt ({text.splitlines()[0]}); save or copy it again", path) from None
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global[: ]+([\w.]+)", text, re.I)
        what = f" (it refers to {found.group(1)})" if found else ""
        if not trust:
            raise UnsafeCheckpointError(
                f"holds pickled Python objects{what}, and loading it could run arbitrary code, so it was "
                "not loaded. Re-save it with torch.save(model.state_dict(), path), or, only if you trust "
                "where the file came from, pass --trust (CLI) or confirm in the app",
                path,
            ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
        raise CheckpointError(f"is truncated or corrupt ({first}); save or copy it again", path) from None
    # Reached only when the caller explicitly trusts the file.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - arbitrary code may fail in arbitrary ways
        raise CheckpointError(f"could not be unpickled even as a trusted file ({type(exc).__name__}: {exc})", path) from None


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"is not a readable .safetensors file, truncated or corrupt ({exc})", path) from None
    raw = RawCheckpoint(path, "state_dict", state_dict=state_dict)
    if SAFETENSORS_META_KEY in metadata:
        try:
            bundle = json.loads(metadata[SAFETENSORS_META_KEY])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"has unreadable KAmal metadata ({exc})", path) from None
        if not isinstance(bundle, dict):
            raise CheckpointError("has KAmal metadata that is not a JSON object", path)
        bundle["state_dict"] = state_dict
        return RawCheckpoint(path, "bundle", state_dict=state_dict, bundle=bundle)
    return raw


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> RawCheckpoint:
    """Read ``path`` (``torch.save`` file or ``.safetensors``) without running code from it.

    Weights holding NaN or Inf are refused (:func:`check_finite`): a model with them predicts nothing
    useful, and amalgamating it would spread them to the student.
    """
    raw = _read_checkpoint(Path(path), trust)
    if raw.kind == "bundle":
        weights = raw.bundle.get("state_dict")  # a missing one is told by the bundle's reader, with its fields
        weights = weights if isinstance(weights, dict) else {}
        wrong = next((k for k, v in weights.items() if not isinstance(v, torch.Tensor)), None)
        if wrong is not None:
            raise CheckpointError(f"is a damaged KAmal bundle: its weights hold a {type(weights[wrong]).__name__}, "
                                  f"not a tensor, under '{wrong}'; save or copy it again", raw.path)
    if raw.state_dict:
        check_finite(raw.state_dict, raw.path)
    return raw


def check_finite(state_dict: dict[str, Any], path: Path) -> None:
    """:class:`CheckpointError` naming the first floating-point tensor holding NaN or Inf, if any."""
    bad = []
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(key)
    if bad:
        first = state_dict[bad[0]]
        nan, inf = int(torch.isnan(first).sum()), int(torch.isinf(first).sum())
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"holds weights that are not finite numbers: tensor '{bad[0]}' has {nan} NaN and {inf} Inf values of "
            f"{first.numel()}{more}. The file is damaged, or the model diverged while it was trained; use an "
            "earlier checkpoint of the model", path)


def _read_checkpoint(path: Path, trust: bool) -> RawCheckpoint:
    if not path.exists():
        raise CheckpointError("file not found; check the path", path)
    if path.is_dir():
        raise CheckpointError("is a folder, not a checkpoint file", path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError("is empty (0 bytes); save or copy it again", path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    # torch.save writes a zip archive; torch < 1.6 and legacy files start with a pickle protocol byte.
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(
            "is not a PyTorch checkpoint (expected a file written by torch.save, or a .safetensors file)", path
        )
    obj = _torch_load(path, trust)
    if isinstance(obj, nn.Module):
        return RawCheckpoint(path, "module", state_dict=obj.state_dict())
    if isinstance(obj, dict) and isinstance(obj.get("format"), str):
        return RawCheckpoint(path, "bundle", state_dict=obj.get("state_dict"), bundle=obj)
    if _is_tensor_dict(obj):
        return RawCheckpoint(path, "state_dict", state_dict=dict(obj))
    if isinstance(obj, dict):
        for key in STATE_DICT_WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return RawCheckpoint(path, "module", state_dict=inner.state_dict())
            if _is_tensor_dict(inner):
                return RawCheckpoint(path, "state_dict", state_dict=dict(inner))
        keys = ", ".join(map(str, list(obj)[:6]))
        raise CheckpointError(
            f"holds a dict without model weights (keys: {keys}); expected a state_dict, or one under "
            f"{' / '.join(repr(k) for k in STATE_DICT_WRAPPER_KEYS)}",
            path,
        )
    raise CheckpointError(f"holds a {type(obj).__name__}, not model weights; expected a state_dict", path)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
