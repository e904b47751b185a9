import itertools
import os
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def no_worker_threads_left():
    """Fails any test that leaves one of the app's worker threads running (and stops it)."""
    yield
    import sys

    workers = sys.modules.get("kamal_app.workers")
    if workers is None:
        return
    leftover = workers.running_handles()
    for handle in leftover:
        handle.stop()
    assert not leftover, f"the test left {len(leftover)} worker thread(s) running"


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """A tiny demo workspace, built once per test session."""
    from kamal_engine.demo import DemoConfig, build_demo

    root = tmp_path_factory.mktemp("demo")
    manifest = build_demo(root, DemoConfig.quick(), log=lambda message: None)
    return root, manifest


@pytest.fixture(scope="session")
def quick_student(quick_demo, session_recipe_factory, tmp_path_factory):
    """A tiny filtered-ka run on the quick demo (its recipe's [export] writes student.onnx too)."""
    from kamal_engine.recipe import load_recipe
    from kamal_engine.runner import run_recipe

    root, _ = quick_demo
    out = tmp_path_factory.mktemp("quick-run")
    path = session_recipe_factory(root / "recipes" / "filtered-ka.toml",
                                  method={"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32},
                                  run={"output_dir": out}, export={"onnx": out / "student.onnx"})
    result = run_recipe(load_recipe(path))
    return out, result


# --- recipes for test runs ------------------------------------------------------------------------------

RECIPE_PATHS = {"run": ("output_dir",), "teachers": ("checkpoint", "labels_file"), "student": ("checkpoint",),
                "data": ("unlabeled", "validation"), "export": ("onnx",)}  # the keys kamal_engine.recipe resolves


def write_recipe(source, folder, *, teachers=None, **sections):
    """A copy of the recipe file ``source`` with overrides, written into ``folder`` (its path, same file name).

    ``sections``: ``run={...}``, ``student={...}``, ``data={...}``, ``method={...}``, ``export={...}``, each
    merged key by key into that section (a value of None removes the key; ``export=None`` the whole section).
    ``teachers``: ``{index: {...}}`` merged into the n-th (0-based) ``[[teachers]]`` table the same way, or a
    list of tables that replaces them all. Every path key (``RECIPE_PATHS``) ends up absolute: the source's
    relative paths and relative override values are resolved against the source recipe's folder, as
    ``kamal_engine.recipe`` resolves them. The written recipe never writes into the source's workspace: without
    a ``run.output_dir`` override the run goes to ``folder / "run"``, and an ``[export] onnx`` inside the old
    output folder follows the new one (as ``kamal run --output`` does) unless it is overridden too.
    """
    from kamal_engine.recipe import follow_output_dir

    source = Path(source).resolve()
    data = tomllib.loads(source.read_text(encoding="utf-8"))
    base = source.parent

    def absolute(table, section):
        for key in RECIPE_PATHS.get(section, ()):
            if key in table:
                table[key] = str((base / os.path.expanduser(str(table[key]))).resolve())

    def merge(table, overrides):
        for key, value in overrides.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = str(value) if isinstance(value, Path) else value

    for section, table in data.items():
        for entry in table if section == "teachers" else [table]:
            absolute(entry, section)
    old_output = data.get("run", {}).get("output_dir")
    unknown = set(sections) - set(RECIPE_PATHS) - {"method"}
    assert not unknown, f"no such recipe section: {unknown}"
    for section, overrides in sections.items():
        if overrides is None:
            data.pop(section, None)
            continue
        merge(data.setdefault(section, {}), overrides)
        absolute(data[section], section)
    if isinstance(teachers, list):
        data["teachers"] = []
        for table in teachers:
            entry = {}
            merge(entry, table)
            absolute(entry, "teachers")
            data["teachers"].append(entry)
    elif teachers:
        for index, overrides in teachers.items():
            merge(data["teachers"][index], overrides)
            absolute(data["teachers"][index], "teachers")
    run = data.setdefault("run", {})
    if "output_dir" not in (sections.get("run") or {}):
        run["output_dir"] = str(folder / "run")
    export = data.get("export", {})
    if "onnx" in export and "onnx" not in (sections.get("export") or {}):
        export["onnx"] = str(follow_output_dir(Path(export["onnx"]), old_output, Path(run["output_dir"])))
    workspace = base.parent
    for written in (run["output_dir"], export.get("onnx")):
        assert written is None or not Path(written).is_relative_to(workspace), (
            f"a test recipe would write {written} into the workspace {workspace}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / source.name
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


class RecipeFactory:
    """``factory(source, **overrides)``: :func:`write_recipe` into a fresh folder of its own each call."""

    def __init__(self, fresh_folder):
        self._fresh_folder = fresh_folder

    def __call__(self, source, *, teachers=None, **sections) -> Path:
        return write_recipe(source, self._fresh_folder(), teachers=teachers, **sections)


@pytest.fixture
def recipe_factory(tmp_path):
    """Recipes for a test's runs, built from a workspace recipe as data (see :func:`write_recipe`), each
    written into its own fresh folder under ``tmp_path``; returns the recipe file's path."""
    count = itertools.count(1)
    return RecipeFactory(lambda: tmp_path / f"recipe-{next(count)}")


@pytest.fixture(scope="session")
def session_recipe_factory(tmp_path_factory):
    """:func:`recipe_factory` for module- and session-scoped fixtures (folders from ``tmp_path_factory``)."""
    return RecipeFactory(lambda: tmp_path_factory.mktemp("recipe"))
