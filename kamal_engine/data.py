"""Images and labelled sets (``docs/architecture.md``, "Labelled data").

Training never needs labels: a folder of unlabeled images is enough. Labelled data is only for
evaluation:

* multi-label: a CSV with an ``image`` column (path relative to the CSV) and one 0/1 column per
  label name;
* multi-class: an ImageFolder-style tree, one sub-folder per class.

Images are handed around as uint8 ``(N, 3, H, W)`` tensors; each model normalises them its own way.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("image folder not found; check the path", folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})", folder)
    return paths


def load_image(path: str | os.PathLike, size: Sequence[int] | None = None) -> torch.Tensor:
    """One image as uint8 ``(3, H, W)`` RGB, resized (bilinear) to ``size = (H, W)`` if given."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image cannot be read ({exc})", path) from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_images(paths: Sequence[str | os.PathLike], size: Sequence[int]) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` of ``paths``, each resized to ``size``."""
    if not paths:
        return torch.zeros(0, 3, *size, dtype=torch.uint8)
    return torch.stack([load_image(p, size) for p in paths])


def batches(paths: Sequence[Path], size: Sequence[int], batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start index, uint8 batch)`` over ``paths`` in order."""
    for start in range(0, len(paths), batch_size):
        yield start, load_images(paths[start:start + batch_size], size)


@dataclass
class LabelledSet:
    """Images with labels: ``targets`` is ``(N, L)`` 0/1 (multilabel) or ``(N,)`` class indices."""

    source: Path
    task: str
    labels: list[str]
    paths: list[Path]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def read_labelled_csv(csv_path: str | os.PathLike) -> LabelledSet:
    """A multi-label set: ``image`` column (relative paths) and one 0/1 column per label."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError("labelled CSV not found; check the path", csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"CSV cannot be read ({exc})", csv_path) from None
    if not rows:
        raise DataError("CSV is empty; expected a header 'image,<label>,<label>...'", csv_path)
    header = [h.strip() for h in rows[0]]
    if "image" not in header:
        raise DataError(f"CSV has no 'image' column (header: {','.join(header)})", csv_path)
    image_col = header.index("image")
    label_cols = [(j, h) for j, h in enumerate(header) if j != image_col]
    if not label_cols:
        raise DataError("CSV has no label columns; add one 0/1 column per label name", csv_path)
    seen: set[str] = set()
    for _, h in label_cols:
        if not h or h in seen:
            raise DataError(f"CSV header has an empty or duplicate label column {h!r}", csv_path)
        seen.add(h)
    paths, targets = [], []
    for line, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"line {line} has {len(row)} fields, the header has {len(header)}", csv_path)
        image = csv_path.parent / row[image_col].strip()
        if not image.is_file():
            raise DataError(f"line {line}: image {row[image_col].strip()!r} not found (paths are relative to the CSV)", csv_path)
        values = []
        for j, label in label_cols:
            cell = row[j].strip()
            if cell not in ("0", "1"):
                raise DataError(f"line {line}, column {label!r}: expected 0 or 1, got {cell!r}", csv_path)
            values.append(int(cell))
        paths.append(image)
        targets.append(values)
    if not paths:
        raise DataError("CSV lists no images", csv_path)
    return LabelledSet(csv_path, "multilabel", [h for _, h in label_cols], paths, np.asarray(targets, dtype=np.int64))


def read_class_folders(root: str | os.PathLike) -> LabelledSet:
    """A multi-class set: one sub-folder per class, named after the class label."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("labelled folder not found; check the path", root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, targets = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        targets += [index] * len(files)
    if not paths:
        raise DataError("holds no class sub-folders with images (expected <root>/<class name>/<image>)", root)
    return LabelledSet(root, "multiclass", classes, paths, np.asarray(targets, dtype=np.int64))


def read_labelled(path: str | os.PathLike) -> LabelledSet:
    """A CSV file (multi-label) or a folder of class folders (multi-class)."""
    path = Path(path)
    if path.is_dir():
        return read_class_folders(path)
    if path.suffix.lower() == ".csv":
        return read_labelled_csv(path)
    if not path.exists():
        raise DataError("labelled data not found; give a .csv file (multi-label) or a folder of class folders", path)
    raise DataError("is neither a .csv file (multi-label) nor a folder of class folders (multi-class)", path)
