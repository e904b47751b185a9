"""Backbones: the supported architectures, split into blocks + head (``docs/architecture.md``, "Blocks")."""

from .blocks import GRANULARITIES, BlockNet, Unit, eval_mode
from .detect import detect_architecture, normalize_state_dict_keys
from .registry import ARCHITECTURES, Architecture, build_model, get_architecture, split_model

__all__ = [
    "ARCHITECTURES", "Architecture", "BlockNet", "GRANULARITIES", "Unit", "build_model",
    "detect_architecture", "eval_mode", "get_architecture", "normalize_state_dict_keys", "split_model",
]
