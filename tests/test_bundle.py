"""The self-contained bundle (``packaging/build-bundle``): built, unpacked into an empty folder and run with
no Python environment on PATH. Slow (a PyInstaller build of torch: about 10-20 minutes on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kamal_engine import __version__

ROOT = Path(__file__).resolve().parents[1]
NAME = f"KAmalStudio-{__version__}-linux-x86_64"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bundle is built for Linux x86-64")]


@pytest.mark.timeout(3600)
def test_the_bundle_runs_both_programs_with_no_python_environment(quick_demo, quick_student, tmp_path):
    build = subprocess.run([str(ROOT / "packaging" / "build-bundle")], cwd=ROOT, capture_output=True, text=True,
                           timeout=3500)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    print(build.stdout.strip().splitlines()[-2])  # the archive, its sizes and the build time (-s shows it)
    archive = ROOT / "dist" / f"{NAME}.tar.gz"
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="tar")
    bundle = unpacked / NAME
    assert sorted(p.name for p in bundle.iterdir()) == ["kamal", "kamal-studio", "lib"]
    print(f"unpacked: {sum(f.stat().st_size for f in bundle.rglob('*') if f.is_file() and not f.is_symlink()) / 2**30:.2f} GiB, "
          f"archive {archive.stat().st_size / 2**30:.2f} GiB")
    cuda = (bundle / "lib" / "CUDA-LIBRARIES.txt").read_text()
    assert "libcudart.so" in cuda and "libcudnn_engines_precompiled" in cuda.split("Left out")[1]

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
           "QT_QPA_PLATFORM": "offscreen", "XDG_DATA_HOME": str(tmp_path / "share")}  # no venv, no PYTHONPATH

    def run(*args: str) -> str:
        out = subprocess.run([str(bundle / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
        assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
        return out.stdout

    root, _ = quick_demo
    out, _ = quick_student
    assert run("kamal", "--version").strip() == f"kamal {__version__}"
    assert run("kamal-studio", "--version").strip() == f"kamal-studio {__version__}"
    teacher = next((root / "teachers").glob("*.kamal.pt"))
    shown = json.loads(run("kamal", "inspect", str(teacher), "--json"))
    assert shown["labels"]
    image = next(p for p in sorted((root / "data" / "unlabeled").rglob("*")) if p.suffix.lower() in (".png", ".jpg"))
    predicted = json.loads(run("kamal", "predict", str(out / "student.onnx"), str(image), "--json"))
    assert predicted
    exported = run("kamal", "export", str(out / "student.kamal.pt"), "--onnx", str(tmp_path / "again.onnx"))
    assert "onnx.checker: passed" in exported and (tmp_path / "again.onnx").is_file()
    said = run("kamal-studio", "--self-test", str(root / "recipes" / "filtered-ka.toml"))
    assert "self-test passed" in said and "(2 teachers)" in said
    assert run("kamal-studio", "--install-desktop-entry")
    entry = (tmp_path / "share" / "applications" / "io.github.kamal_studio.KAmalStudio.desktop").read_text()
    assert f"Exec={bundle / 'kamal-studio'} %f" in entry
    run("kamal-studio", "--uninstall-desktop-entry")
    assert not (tmp_path / "share" / "applications").exists()
    two = tmp_path / "two"  # a distributed run: the bundle's kamal starts its other rank (no python -m there)
    trained = run("kamal", "run", str(root / "recipes" / "filtered-ka.toml"), "--nproc", "2", "--output", str(two))
    assert trained.count("Outputs in") == 1 and (two / "report.json").is_file()
