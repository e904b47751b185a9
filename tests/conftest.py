import os

import pytest
import torch

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
def quick_student(quick_demo, tmp_path_factory):
    """A tiny filtered-ka run on the quick demo (its recipe's [export] writes student.onnx too)."""
    from kamal_engine.recipe import load_recipe
    from kamal_engine.runner import run_recipe

    root, _ = quick_demo
    out = tmp_path_factory.mktemp("quick-run")
    text = (root / "recipes" / "filtered-ka.toml").read_text()
    text = text.replace('id = "filtered-ka"', 'id = "filtered-ka"\nepochs_per_block = 1\nfinetune_epochs = 1\nbatch_size = 32')
    text = text.replace('output_dir = "../runs/filtered-ka"', f'output_dir = "{out}"')
    text = text.replace('onnx = "../runs/filtered-ka/student.onnx"', f'onnx = "{out / "student.onnx"}"')
    path = root / "recipes" / "test-quick-student.toml"
    path.write_text(text)
    result = run_recipe(load_recipe(path))
    return out, result
