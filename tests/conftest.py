import os

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """A tiny demo workspace, built once per test session."""
    from kamal_engine.demo import DemoConfig, build_demo

    root = tmp_path_factory.mktemp("demo")
    manifest = build_demo(root, DemoConfig.quick(), log=lambda message: None)
    return root, manifest
