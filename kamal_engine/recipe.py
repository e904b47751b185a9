"""Recipes: one TOML file holds everything a run needs (``docs/architecture.md``, "Recipe").

``kamal run recipe.toml`` reproduces what the GUI did. Sections: ``[run]``, ``[[teachers]]``,
``[student]``, ``[data]``, ``[method]`` and ``[export]``. Paths are relative to the recipe file.
Unknown keys and bad values are :class:`RecipeError`s that name the key, the file and its line.
Method hyper-parameters are checked against the method's declared parameters by the method
registry, with the same kind of message.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import KamalError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
MODES = ("data", "data-free")
INITS = ("teacher", "random", "checkpoint")


class RecipeError(KamalError):
    """A recipe file cannot be run as written."""


class _Lines:
    """Finds the line of ``key`` in table ``[section]`` (or the n-th ``[[section]]``) of a TOML text."""

    HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?\s*(#.*)?$")
    KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str):
        self.lines: dict[tuple[str, int, str], int] = {}
        self.headers: dict[tuple[str, int], int] = {}
        counts: dict[str, int] = {}
        section, index = "", 0
        for number, line in enumerate(text.splitlines(), 1):
            header = self.HEADER.match(line)
            if header:
                section = header.group(2)
                index = counts.get(section, -1) + 1 if header.group(1) == "[[" else 0
                counts[section] = index
                self.headers[(section, index)] = number
                continue
            key = self.KEY.match(line)
            if key:
                self.lines.setdefault((section, index, key.group(1).strip('"')), number)

    def of(self, section: str, index: int, key: str | None) -> int | None:
        if key is None:
            return self.headers.get((section, index))
        return self.lines.get((section, index, key)) or self.headers.get((section, index))


@dataclass
class TeacherEntry:
    checkpoint: Path
    select: list[str] | None = None  # None: every label of the teacher
    name: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    labels_file: Path | None = None
    labels: list[str] | None = None
    task: str | None = None
    input_size: int | list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    trust: bool = False

    def load(self, raw=None):
        """The :class:`~kamal_engine.teacher.Teacher` this entry describes (``raw``: the file, already read)."""
        from .teacher import TeacherOverrides, load_teacher

        overrides = TeacherOverrides(self.arch, self.arch_kwargs or None, self.labels, self.labels_file, self.task,
                                     self.input_size, self.mean, self.std, self.name)
        return load_teacher(self.checkpoint, overrides, trust=self.trust, raw=raw)


@dataclass
class Recipe:
    path: Path | None
    # [run]
    name: str = "run"
    output_dir: Path = Path("runs/run")
    device: str = "auto"
    seed: int = 0
    precision: str = "auto"
    memory_format: str = "contiguous"  # the networks' tensor layout in training (auto: measured per network)
    nproc: int = 1  # processes of distributed data parallel on this machine (kamal_engine.distributed)
    # [[teachers]]
    teachers: list[TeacherEntry] = field(default_factory=list)
    # [student]
    student_arch: str | None = None  # None: the architecture of the teacher it is initialised from
    student_arch_kwargs: dict[str, Any] = field(default_factory=dict)
    student_init: str = "teacher"
    student_teacher: int = 1  # 1-based index of the teacher to initialise from
    student_checkpoint: Path | None = None  # the weights file of init = "checkpoint" (e.g. ImageNet weights)
    # [data]
    mode: str = "data"
    unlabeled: Path | None = None
    validation: Path | None = None
    image_size: int | None = None
    max_damaged: float = 0.01  # the share of unreadable unlabeled images a run skips (more stop it)
    # [method]
    method: str = "filtered-ka"
    params: dict[str, Any] = field(default_factory=dict)
    # [export]
    onnx: Path | None = None
    opset: int = 18
    fp16: bool = False
    text: str = ""

    def line_of(self, section: str, key: str | None = None, index: int = 0) -> int | None:
        return _Lines(self.text).of(section, index, key) if self.text else None

    def error(self, message: str, section: str, key: str | None = None, index: int = 0) -> RecipeError:
        line = self.line_of(section, key, index)
        where = f"{self.path}" + (f", line {line}" if line else "")
        name = f"[{section}]" + (f".{key}" if key else "")
        return RecipeError(f"{where}: {name}: {message}")

    def to_toml(self) -> str:
        """The recipe as TOML with absolute paths (what a run writes into its output folder)."""
        import tomli_w

        def clean(d):
            return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if v is not None and v != {}}

        data: dict[str, Any] = {
            "run": clean({"name": self.name, "output_dir": self.output_dir, "device": self.device,
                          "seed": self.seed, "precision": self.precision,
                          "memory_format": None if self.memory_format == "contiguous" else self.memory_format,
                          "nproc": None if self.nproc == 1 else self.nproc}),
            "teachers": [clean({"checkpoint": t.checkpoint, "name": t.name, "arch": t.arch,
                                "arch_kwargs": t.arch_kwargs, "labels_file": t.labels_file, "labels": t.labels,
                                "task": t.task, "input_size": t.input_size, "mean": t.mean, "std": t.std,
                                "trust": t.trust or None, "select": t.select}) for t in self.teachers],
            "student": clean({"arch": self.student_arch, "arch_kwargs": self.student_arch_kwargs,
                              "init": self.student_init, "teacher": self.student_teacher,
                              "checkpoint": self.student_checkpoint}),
            "data": clean({"mode": self.mode, "unlabeled": self.unlabeled, "validation": self.validation,
                           "image_size": self.image_size,
                           "max_damaged": self.max_damaged if self.max_damaged != 0.01 else None}),
            "method": {"id": self.method, **self.params},
            "export": clean({"onnx": self.onnx, "opset": self.opset, "fp16": self.fp16}),
        }
        return tomli_w.dumps(data)


# --- parsing --------------------------------------------------------------------------------------

def follow_output_dir(path: Path | None, old: Path | None, new: Path | None) -> Path | None:
    """``path`` moved from inside the output folder ``old`` to the same place inside ``new`` (the ONNX file of
    ``[export]`` follows a changed output folder, so that a run never writes into another run's folder); a
    path outside ``old`` is the user's own choice and stays."""
    if path is None or old is None or new is None:
        return path
    try:
        inside = Path(path).resolve().relative_to(Path(old).resolve())
    except ValueError:
        return path
    return Path(new) / inside


def _check(value: Any, kind: Callable[[Any], bool], describe: str, recipe: Recipe, section: str, key: str,
           index: int = 0) -> Any:
    if not kind(value):
        raise recipe.error(f"expected {describe}, got {value!r}", section, key, index)
    return value


def _is_str(v):
    return isinstance(v, str) and v != ""


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v):
    return isinstance(v, list) and all(isinstance(x, str) and x for x in v)


def _is_size(v):
    return (_is_int(v) and v > 0) or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v))


def _is_triple(v):
    return isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


SECTIONS = {
    "run": {"name", "output_dir", "device", "seed", "precision", "memory_format", "nproc"},
    "teachers": {"checkpoint", "select", "name", "arch", "arch_kwargs", "labels_file", "labels", "task",
                 "input_size", "mean", "std", "trust"},
    "student": {"arch", "arch_kwargs", "init", "teacher", "checkpoint"},
    "data": {"mode", "unlabeled", "validation", "image_size", "max_damaged"},
    "method": None,  # 'id' + the method's own parameters, checked by the method registry
    "export": {"onnx", "opset", "fp16"},
}


TEACHER_KEYS = (("name", _is_str, "a name"), ("arch", _is_str, "an architecture name"),
                ("task", lambda v: v in ("multilabel", "multiclass"), "multilabel or multiclass"),
                ("labels", _is_str_list, "a list of label names"),
                ("input_size", _is_size, "a positive int or [height, width]"),
                ("mean", _is_triple, "three numbers"), ("std", _is_triple, "three numbers"),
                ("arch_kwargs", lambda v: isinstance(v, dict), "a table"),
                ("trust", lambda v: isinstance(v, bool), "true or false"))  # [[teachers]] keys taken as they are


def _is_share(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


class _Parser:
    """Fills a :class:`Recipe` section by section from parsed TOML, each error naming the key and its line."""

    def __init__(self, recipe: Recipe, base: Path, check_files: bool):
        self.recipe, self.base, self.check_files = recipe, base, check_files

    def check(self, value: Any, kind: Callable[[Any], bool], describe: str, section: str, key: str, index: int = 0):
        return _check(value, kind, describe, self.recipe, section, key, index)

    def resolve(self, p: str) -> Path:
        return (self.base / os.path.expanduser(p)).resolve()

    def existing(self, value: Any, section: str, key: str, index: int = 0, folder: bool | None = None) -> Path:
        """A path that must exist (a folder with ``folder`` true, a file with false), relative to the recipe."""
        self.check(value, _is_str, "a path (string)", section, key, index)
        p = self.resolve(value)
        if self.check_files:
            if not p.exists():
                raise self.recipe.error(f"{p} not found", section, key, index)
            if folder is True and not p.is_dir():
                raise self.recipe.error(f"{p} is not a folder", section, key, index)
            if folder is False and not p.is_file():
                raise self.recipe.error(f"{p} is not a file", section, key, index)
        return p

    def sections(self, data: dict) -> None:
        """Every section and key is one the recipe format has."""
        for section, value in data.items():
            if section not in SECTIONS:
                raise self.recipe.error(f"unknown section; expected one of {', '.join(SECTIONS)}", section)
            if section == "teachers" and not isinstance(value, list):
                raise self.recipe.error("write each teacher as its own [[teachers]] table", section)
            for index, table in enumerate(value if section == "teachers" else [value]):
                if not isinstance(table, dict):
                    raise self.recipe.error("expected a table", section)
                allowed = SECTIONS[section]
                for key in table:
                    if allowed is not None and key not in allowed:
                        raise self.recipe.error(f"unknown key; expected one of {', '.join(sorted(allowed))}",
                                                section, key, index)

    def run(self, run: dict) -> None:
        r, path = self.recipe, self.recipe.path
        r.name = self.check(run.get("name", path.stem if path else "run"), _is_str, "a name", "run", "name")
        r.output_dir = self.resolve(self.check(run.get("output_dir", f"runs/{r.name}"), _is_str, "a path", "run",
                                               "output_dir"))
        r.device = self.check(run.get("device", "auto"), lambda v: isinstance(v, str) and bool(DEVICE_PATTERN.match(v)),
                              "auto, cpu, cuda or cuda:N", "run", "device")
        r.seed = self.check(run.get("seed", 0), _is_int, "an integer", "run", "seed")
        r.precision = self.check(run.get("precision", "auto"), lambda v: v in PRECISIONS, " or ".join(PRECISIONS),
                                 "run", "precision")
        r.memory_format = self.check(run.get("memory_format", "contiguous"), lambda v: v in MEMORY_FORMATS,
                                     " or ".join(MEMORY_FORMATS), "run", "memory_format")
        r.nproc = self.check(run.get("nproc", 1), lambda v: _is_int(v) and v >= 1, "an integer of 1 or more (the "
                             "processes of a distributed run; 1: one process)", "run", "nproc")

    def teachers(self, teachers: list) -> None:
        if not teachers:
            raise RecipeError(f"{self.recipe.path}: no [[teachers]]: a recipe needs at least one teacher checkpoint")
        for i, t in enumerate(teachers):
            if "checkpoint" not in t:
                raise self.recipe.error("missing key 'checkpoint' (the teacher's file)", "teachers", None, i)
            entry = TeacherEntry(self.existing(t["checkpoint"], "teachers", "checkpoint", i, folder=False))
            if "select" in t:
                entry.select = self.check(t["select"], _is_str_list, "a list of label names ([]: the teacher is kept "
                                          "but teaches nothing)", "teachers", "select", i)
            for key, kind, describe in TEACHER_KEYS:
                if key in t:
                    setattr(entry, key, self.check(t[key], kind, describe, "teachers", key, i))
            if "labels_file" in t:
                entry.labels_file = self.existing(t["labels_file"], "teachers", "labels_file", i, folder=False)
            self.recipe.teachers.append(entry)

    def student(self, student: dict) -> None:
        r, count = self.recipe, len(self.recipe.teachers)
        if "arch" in student:
            r.student_arch = self.check(student["arch"], _is_str, "an architecture name", "student", "arch")
        r.student_arch_kwargs = self.check(student.get("arch_kwargs", {}), lambda v: isinstance(v, dict), "a table",
                                           "student", "arch_kwargs")
        r.student_init = self.check(student.get("init", "teacher"), lambda v: v in INITS, " or ".join(INITS),
                                    "student", "init")
        r.student_teacher = self.check(student.get("teacher", 1), lambda v: _is_int(v) and 1 <= v <= count,
                                       f"a teacher number from 1 to {count}", "student", "teacher")
        if "checkpoint" in student:
            if r.student_init != "checkpoint":
                raise r.error("a weights file is only read with init = \"checkpoint\"; set that or remove the key",
                              "student", "checkpoint")
            r.student_checkpoint = self.existing(student["checkpoint"], "student", "checkpoint", folder=False)
        elif r.student_init == "checkpoint":
            raise r.error("init = \"checkpoint\" needs 'checkpoint', the weights file to start the student from "
                          "(for example ImageNet weights of the student's architecture)", "student", "init")

    def data(self, d: dict) -> None:
        r = self.recipe
        r.mode = self.check(d.get("mode", "data"), lambda v: v in MODES, " or ".join(MODES), "data", "mode")
        if "unlabeled" in d:
            r.unlabeled = self.existing(d["unlabeled"], "data", "unlabeled", folder=True)
        elif r.mode == "data":
            raise r.error("data mode needs 'unlabeled', a folder of unlabeled images (or set mode = \"data-free\")",
                          "data", "mode")
        if "validation" in d:
            r.validation = self.existing(d["validation"], "data", "validation")
        if "image_size" in d:
            r.image_size = self.check(d["image_size"], lambda v: _is_int(v) and v > 0, "a positive integer",
                                      "data", "image_size")
        if "max_damaged" in d:
            r.max_damaged = float(self.check(d["max_damaged"], _is_share, "a share from 0 to 1 (0.01: up to 1 % of "
                                             "the images may be unreadable)", "data", "max_damaged"))

    def method(self, m: dict) -> None:
        self.recipe.method = self.check(m.get("id", "filtered-ka"), _is_str, "a method id", "method", "id")
        self.recipe.params = {k: v for k, v in m.items() if k != "id"}

    def export(self, e: dict) -> None:
        r = self.recipe
        if "onnx" in e:
            r.onnx = self.resolve(self.check(e["onnx"], _is_str, "a path", "export", "onnx"))
        r.opset = self.check(e.get("opset", 18), lambda v: _is_int(v) and 17 <= v <= 30, "an ONNX opset from 17 to 30",
                             "export", "opset")
        r.fp16 = self.check(e.get("fp16", False), lambda v: isinstance(v, bool), "true or false", "export", "fp16")


def parse_recipe(text: str, path: str | os.PathLike | None = None, *, check_files: bool = True) -> Recipe:
    """Parse and validate recipe ``text``; relative paths are resolved against ``path``'s folder."""
    path = Path(path) if path is not None else None
    recipe = Recipe(path, text=text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: is not valid TOML ({exc})") from None
    parser = _Parser(recipe, path.parent if path is not None else Path.cwd(), check_files)
    parser.sections(data)
    parser.run(data.get("run", {}))
    parser.teachers(data.get("teachers", []))
    parser.student(data.get("student", {}))
    parser.data(data.get("data", {}))
    parser.method(data.get("method", {}))
    parser.export(data.get("export", {}))
    return recipe


def load_recipe(path: str | os.PathLike, *, check_files: bool = True) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: recipe cannot be read ({exc})") from None
    return parse_recipe(text, path.resolve(), check_files=check_files)
